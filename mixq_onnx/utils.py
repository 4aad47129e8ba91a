"""Small helpers shared by every stage: hashing, atomic writes, offline detection."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import MixqError


class NotRegularFileError(OSError):
    """A device, pipe or folder where a file was expected: read, it would never end (or never start)."""


@contextlib.contextmanager
def open_regular(path: str | os.PathLike) -> Iterator[Any]:
    """Open `path` for reading only if it is (or links to) a regular file. A received folder may put
    /dev/zero or a FIFO where its data should be; O_NONBLOCK keeps a FIFO from blocking the open itself."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFileError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def read_regular(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file (`open_regular`); OSError otherwise."""
    with open_regular(path) as f:
        return f.read()


#: sha256 of files this process has hashed, by (device, inode, size, mtime, ctime) of the opened file: `build`
#: hashed a graph's external data three times in one command (the plan's record, inspect's comparison, the
#: loader's digest check; 0.64 GB each for a W8A8 ViT-H). Any write changes the ctime, which no user can set
#: back, so a changed file is hashed again.
_DIGESTS: dict[tuple[int, ...], str] = {}
_DIGESTS_KEPT = 64
MEMO_FROM = 1 << 20  # smaller files are hashed every time (milliseconds)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
        st = os.fstat(f.fileno())
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key in _DIGESTS:
            return _DIGESTS[key]
        while block := f.read(chunk):
            h.update(block)
    if st.st_size >= MEMO_FROM:
        if len(_DIGESTS) >= _DIGESTS_KEPT:
            del _DIGESTS[next(iter(_DIGESTS))]
        _DIGESTS[key] = h.hexdigest()
    return h.hexdigest()


def sidecar_vouches(path: str | os.PathLike, key: str) -> bool:
    """True when PATH.json, the sidecar mixq-onnx writes beside a file it made (a plan's PLAN.json, a
    checkpoint's OUT.json), records PATH's sha256 under `key`: the file is one this tool wrote, unchanged."""
    rec = json.loads(read_regular(f"{os.fspath(path)}.json"))
    return isinstance(rec, dict) and rec.get(key) == sha256_file(path)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> str:
    """Key-sorted compact JSON: the input of every recipe hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


LOCK_NAME = ".lock"


@contextlib.contextmanager
def folder_lock(folder: Path, *, wait: bool = True, log: Any = print, what: str | None = None,
                busy_hint: str = "wait for it to finish", busy_error: type[MixqError] = MixqError) -> Iterator[None]:
    """Hold `folder/.lock` (flock) so one writer at a time works in `folder`: the next waits (`log` says for
    whom), or with `wait=False` fails with `busy_error`. The file holds the holder's pid; it is never opened
    through a link (it is truncated and rewritten, and a received folder may hold one)."""
    what = what or str(folder)
    lock = folder / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise MixqError(f"{lock} is a symbolic link, not a lock this tool made: remove it") from None
        raise MixqError(f"cannot open the lock of {what}: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MixqError(f"{lock} is not a regular file, not a lock this tool made: remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            if not wait:
                raise busy_error(f"{what} is being written by another process (pid {holder}); {busy_hint}") from None
            log(f"waiting for the lock of {what}, held by pid {holder}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def tmp_prefix(path: Path) -> str:
    """The hidden prefix of `path`'s temporaries: `.NAME.HOST-PID.`, so that a later writer of the same
    path can tell a killed process's leftover (`sweep_stale_tmp`) from a live writer's file."""
    return f".{path.name}.{_HOST}-{os.getpid()}."


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (another user's counts as running)."""
    if pid <= 0 or pid == os.getpid():  # 0 would signal our own process group: never "dead"
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: someone else's live process; a pid no kernel gives: not ours
        return True
    return True


def sweep_stale_tmp(path: Path) -> None:
    """Remove the temporaries of `path` (files or folders named by `tmp_prefix`) whose process on this host
    has died: a SIGKILL mid-write leaves one beside the output, and only the next writer of the same path
    can know it is garbage. Never touches another host's temporaries or a live process's."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{re.escape(_HOST)}-(\d+)\..*\.tmp", re.DOTALL)
    try:
        candidates = path.parent.glob(glob.escape(f".{path.name}.{_HOST}-") + "*.tmp")
        for f in candidates:
            m = pattern.fullmatch(f.name)
            if not m or pid_alive(int(m.group(1))):
                continue
            if f.is_dir() and not f.is_symlink():
                shutil.rmtree(f, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    f.unlink()
    except OSError:  # an unreadable folder: the write itself will report it
        pass


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds.

    A crash (even SIGKILL) leaves either the old file or the new one, never a half-written one.
    The file gets the mode of the file it replaces, else 0666 & ~umask like any other tool's output
    (mkstemp alone would leave 0600).
    """
    path = Path(path)
    mode = path.stat().st_mode & 0o777 if path.is_file() else 0o666 & ~current_umask()
    sweep_stale_tmp(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise MixqError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)  # after the block: a writer may have recreated the file
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def check_apart(out: str | os.PathLike, inputs: Iterable[Any] = (), what: str = "--out") -> None:
    """Refuse an output (file or folder) that is one of the command's `inputs`, lies inside an input folder, holds
    an input file, or lies inside a calibration cache: writing there would change what the command reads, or
    leave a user's file inside a folder that `cache rm` deletes."""
    from .calib.cache import is_calib_folder

    target = Path(out).resolve()
    for i in inputs:
        if i is None or not str(i).strip():
            continue
        src = Path(i).resolve()
        if target == src or (src.is_dir() and src in target.parents):
            raise MixqError(f"{what} {out} would overwrite the input {i}: write somewhere else")
        if src.exists() and target in src.parents:
            raise MixqError(f"{what} {out} holds the input {i}: write somewhere else")
    for d in (target, *target.parents):
        if d.is_dir() and is_calib_folder(d):
            raise MixqError(f"{what} {out} lies inside the calibration cache {d}: write somewhere else")


def check_output_file(path: str | os.PathLike, *, what: str = "--out", inputs: tuple[Any, ...] = (),
                      refuse_suffixes: tuple[str, ...] = (),
                      ours: tuple[str, Callable[[Path], bool]] | None = None, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output file the command could not write or must not write: an empty path,
    a directory, a path under a regular file or a read-only folder, a suffix in `refuse_suffixes`, one of
    the command's own `inputs` (a file, or a folder the output would land inside), or, with `ours` = (what
    the command writes, a test that a file is one mixq-onnx wrote), an existing file that fails the test
    unless `overwrite`: a command replaces what it made, never a user's file of another kind. Creates
    nothing: the missing folders are made at write time (`make_parent`)."""
    if not str(path).strip():
        raise MixqError(f"{what} is empty: give a file path")
    p = Path(path)
    if p.is_dir():
        raise MixqError(f"{what} {p} is a directory: give a file path")
    check_apart(p, inputs, what)
    if p.suffix.lower() in refuse_suffixes:
        raise MixqError(f"{what} {p} ends in {p.suffix}: pick another name (it would read as the input's kind)")
    if ours is not None and not overwrite and (p.is_file() or p.is_symlink()):
        kind, made_here = ours
        try:
            mine = p.is_file() and not p.is_symlink() and made_here(p)
        except Exception:  # noqa: BLE001  (unreadable, truncated, another format: not ours)
            mine = False
        if not mine:
            raise MixqError(f"{what} {p} exists and is not {kind} mixq-onnx wrote: pass --overwrite to replace it")
    check_can_create(p)
    return p


def check_can_create(path: str | os.PathLike) -> None:
    """Refuse a path whose nearest existing ancestor is a regular file or a read-only folder (the missing
    folders below it are made at write time)."""
    anc = Path(path).resolve().parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise MixqError(f"cannot write {path}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise MixqError(f"cannot write {path}: the folder {anc} is read-only")


def make_parent(path: str | os.PathLike) -> None:
    """Create the folders above an output file at write time (after the work), as a one-line error if it fails."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MixqError(f"cannot write {path}: {e.strerror or e}") from None


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only swap it, which
    races other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    # a file name that is not UTF-8 reaches Python as lone surrogates: written as \udcXX, never a crash
    atomic_write_bytes(path, text.encode("utf-8", "backslashreplace"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def hf_offline() -> bool:
    """True when Hugging Face hub access is switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return True
    return False


def shared_root() -> Path:
    """Where the real CIFAR-10 models and data live: $MIXQ_SHARED or ../shared beside the checkout."""
    env = os.environ.get("MIXQ_SHARED")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared"


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """Float32 convolutions and matrix products on a CUDA GPU, not TF32 (cuDNN convolutions default to TF32 on
    Ampere and later: a 10-bit mantissa, about 1e-3 relative per product). Quantization searches and learns
    rounding decisions and steps from small differences, and its results are compared with the CPU's; the
    previous settings come back on exit. Usable as a decorator."""
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def resolve_device(device: Any) -> Any:
    """`--device` as given, else CUDA when this torch sees a GPU, else the CPU; a bad or absent device is
    a one-line MixqError, not a traceback from the first tensor moved there."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MixqError(f"--device {device!r} is not a torch device (cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MixqError(f"--device {device}: this torch sees no CUDA GPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise MixqError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise MixqError(f"--device {device}: only cpu and cuda are supported")
    return dev


def model_device(model: Any, fallback: Any = None) -> Any:
    """Where `model` computes: its first parameter's device, else its first buffer's, else `fallback`
    (default: the CPU) for a module with neither."""
    import torch

    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return fallback if fallback is not None else torch.device("cpu")
