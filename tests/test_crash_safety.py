"""A writer killed at the worst moment (SIGKILL, injected in a child process at a named step) leaves
nothing a later run trips over: no half result folder, no stale temporaries, no cache working files;
and a reader whose cache is removed under it says so instead of calling the cache corrupt."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import random_r20_rtn

from mixq_onnx.calib import cache as C
from mixq_onnx.calib import info, load_images, verify
from mixq_onnx.errors import CorruptCacheError, MixqError
from mixq_onnx.models import load_model
from mixq_onnx.onnx import export_qdq
from mixq_onnx.quant import load_quantized, save_quantized
from mixq_onnx.utils import atomic_write_bytes, tmp_prefix

REPO = Path(__file__).resolve().parents[1]


def _run_killed(script: str) -> None:
    """Run `script` in a child (this checkout's package); it must die of SIGKILL, as injected."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def qdir(tmp_path_factory) -> Path:
    return save_quantized(random_r20_rtn(4)[1], tmp_path_factory.mktemp("q") / "r20")


@pytest.mark.parametrize("how", ["folder", "link"])
def test_a_save_killed_between_its_files_leaves_an_empty_folder_empty(qdir, tmp_path, how):
    """`--out` made beforehand and empty (or a link to such a folder): the result is built beside the folder
    and renamed onto it, so a kill after the weights and before quant.json leaves the folder empty (it used to
    hold the weights alone, and the re-run then demanded --overwrite). The re-run succeeds and sweeps the
    killed run's temporary folder."""
    real = tmp_path / "out"
    real.mkdir(mode=0o750)
    out = real
    if how == "link":
        out = tmp_path / "elsewhere" / "link"
        out.parent.mkdir()
        out.symlink_to(real, target_is_directory=True)
    _run_killed(f"""
        import os, signal
        import mixq_onnx.quant.io as qio
        from mixq_onnx.models import load_model
        model = qio.load_quantized(load_model("cifar_resnet20", random_init=True), {str(qdir)!r})
        original, calls = qio._write_file, []
        def write_then_die(path, data):
            calls.append(path)
            if len(calls) == 2:  # the weights are written; quant.json is next
                os.kill(os.getpid(), signal.SIGKILL)
            original(path, data)
        qio._write_file = write_then_die
        qio.save_quantized(model, {str(out)!r})
    """)
    assert real.is_dir() and not any(real.iterdir())
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")  # the killed run's, named by its pid
    model = load_model("cifar_resnet20", random_init=True)
    save_quantized(load_quantized(model, qdir), out)  # no --overwrite needed: the folder is still empty
    assert sorted(p.name for p in real.iterdir()) == ["quant.json", "weights.safetensors"]
    assert (real.stat().st_mode & 0o777) == 0o750  # the user's folder keeps its mode
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []
    assert how == "folder" or (out.is_symlink() and out.resolve() == real.resolve())
    load_quantized(model, out)


def test_an_atomic_write_sweeps_only_dead_writers_temporaries_of_the_same_file(tmp_path):
    target = tmp_path / "graph.onnx"
    me = tmp_prefix(target)  # .graph.onnx.HOST-PID.
    host = me.split(".")[-2].rsplit("-", 1)[0]
    dead = tmp_path / f".graph.onnx.{host}-{_dead_pid()}.abc123.tmp"
    dead_dir = tmp_path / f".graph.onnx.{host}-{_dead_pid()}.def456.tmp"
    live = tmp_path / f".graph.onnx.{host}-{os.getppid()}.ghi789.tmp"
    other_host = tmp_path / f".graph.onnx.{host}x-{_dead_pid()}.jkl012.tmp"
    other_file = tmp_path / f".other.onnx.{host}-{_dead_pid()}.mno345.tmp"
    users = tmp_path / ".graph.onnx.notes.tmp"
    odd = tmp_path / f".graph.onnx.{host}-99999999999999999999.pqr678.tmp"  # no such pid: kept, and no crash
    for f in (dead, live, other_host, other_file, users, odd):
        f.write_bytes(b"x")
    dead_dir.mkdir()
    (dead_dir / "quant.json").write_text("{}")
    atomic_write_bytes(target, b"graph")
    assert target.read_bytes() == b"graph"
    assert not dead.exists() and not dead_dir.exists()
    assert live.exists() and other_host.exists() and other_file.exists() and users.exists() and odd.exists()


def _calib_script(root: Path, kill_at: str) -> str:
    return f"""
        import os, signal
        import mixq_onnx.calib.run as run
        from mixq_onnx.calib import CalibConfig, make_calibration_cache
        def die(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        run.{kill_at} = die
        cfg = CalibConfig(generator="noise", num=12, shard_size=5, filter="energy", keep=7,
                          model="cifar_resnet20", random_weights=True)
        make_calibration_cache(cfg, {str(root)!r}, progress=False, log=lambda m: None)
    """


def _filtered_cache(root: Path) -> Path:
    from mixq_onnx.calib import CalibConfig, make_calibration_cache

    cfg = CalibConfig(generator="noise", num=12, shard_size=5, filter="energy", keep=7, model="cifar_resnet20",
                      random_weights=True)
    return make_calibration_cache(cfg, root, progress=False, log=lambda m: None)


def test_cache_ls_counts_an_interrupted_filter_caches_candidates(tmp_path):
    """Killed after generating every candidate, before scoring them: `cache ls` showed 0 images, as it
    counted only the kept shards that sealing writes."""
    _run_killed(_calib_script(tmp_path, "_apply_filter"))
    (d,) = [p for p in tmp_path.iterdir() if C.is_cache_dir(p)]
    s = info(d).summary()
    assert s["status"] == "incomplete" and s["images"] == 12 and s["shards"] == "3/3", s
    assert s["size_mb"] > 0
    assert _filtered_cache(tmp_path) == d and verify(d).ok  # the re-run seals it from the candidates


def test_calib_sweeps_working_files_a_kill_after_sealing_left(tmp_path):
    """Killed after the manifest, before the candidates and shard stats were removed: they stayed for good.
    The next calib of the same recipe finds the cache complete and removes them."""
    _run_killed(_calib_script(tmp_path, "_remove_leftovers"))
    (d,) = [p for p in tmp_path.iterdir() if C.is_cache_dir(p)]
    assert (d / C.MANIFEST).is_file() and verify(d).ok
    assert list(d.glob("cand-*")) and list(d.glob("*.stats.json"))
    before = json.loads((d / C.MANIFEST).read_text())
    assert _filtered_cache(tmp_path) == d
    assert not list(d.glob("cand-*")) and not list(d.glob("*.stats.json"))
    assert json.loads((d / C.MANIFEST).read_text()) == before and verify(d).ok
    assert load_images(d)[0].shape[0] == 7


def test_a_reader_whose_cache_is_removed_mid_read_says_removed_not_corrupt(tmp_path):
    """`cache rm` renames the folder away; a reader that had read the manifest then finds no shard. That is
    not corruption, and `cache verify` would send the user after a cache that no longer exists."""
    from mixq_onnx.calib import CalibConfig, make_calibration_cache

    d = make_calibration_cache(CalibConfig(generator="noise", num=4), tmp_path, progress=False, log=lambda m: None)
    shard = json.loads((d / C.MANIFEST).read_text())["shards"][0]
    C.remove(d, tmp_path)
    with pytest.raises(MixqError, match="was removed while it was being read") as e:
        C.read_shard_checked(d / shard["file"], shard["sha256"])
    assert not isinstance(e.value, CorruptCacheError)
    d2 = make_calibration_cache(CalibConfig(generator="noise", num=4, seed=1), tmp_path, progress=False,
                                log=lambda m: None)
    (d2 / json.loads((d2 / C.MANIFEST).read_text())["shards"][0]["file"]).unlink()
    with pytest.raises(CorruptCacheError, match="is missing shard"):  # a shard gone from a live cache still is
        load_images(d2)


def _noise_cache(root: Path, **kw) -> Path:
    from mixq_onnx.calib import CalibConfig, make_calibration_cache

    cfg = CalibConfig(generator="noise", num=12, shard_size=5, **kw)
    return make_calibration_cache(cfg, root, progress=False, log=lambda m: None)


@pytest.mark.parametrize("damage", ["missing", "flipped", "manifest"])
def test_calib_re_run_regenerates_what_a_sealed_cache_lost(tmp_path, damage):
    """A shard deleted or altered after sealing, or an unreadable manifest: `cache ls` said complete and
    calib said "already complete", so only `cache rm` and a fresh run got the cache back. Now ls reports a
    missing shard and calib makes the lost files again (noise is a function of seed and index: the same
    bytes)."""
    d = _noise_cache(tmp_path)
    shards = {f.name: f.read_bytes() for f in d.glob("shard-*.safetensors")}
    images = load_images(d)[0]
    if damage == "missing":
        (d / "shard-00001.safetensors").unlink()
        with pytest.raises(CorruptCacheError, match="missing 1 shard"):
            info(d)
    elif damage == "flipped":
        data = bytearray((d / "shard-00001.safetensors").read_bytes())
        data[-1] ^= 1
        (d / "shard-00001.safetensors").write_bytes(bytes(data))
    else:
        (d / C.MANIFEST).write_text("{")
    assert not verify(d).ok
    assert _noise_cache(tmp_path) == d
    assert verify(d).ok and info(d).complete
    assert {f.name: f.read_bytes() for f in d.glob("shard-*.safetensors")} == shards
    assert torch.equal(load_images(d)[0], images)


def test_a_filtered_cache_that_lost_a_kept_shard_is_filtered_again(tmp_path):
    d = _filtered_cache(tmp_path)
    before = load_images(d)
    (d / "shard-00000.safetensors").unlink()
    assert _filtered_cache(tmp_path) == d and verify(d).ok
    after = load_images(d)
    assert torch.equal(after[0], before[0]) and [r["index"] for r in after[1]] == [r["index"] for r in before[1]]
    assert not list(d.glob("cand-*"))


def _assert_build_aborted(script: str, tmp_path: Path) -> None:
    """Run a child that interrupts its own `build` of tmp_path/g.onnx: exit 130, 'aborted', no plan written."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 130 and r.stderr.strip().splitlines()[-1] == "aborted", (r.returncode, r.stderr[-1000:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx"]


def test_ctrl_c_while_tensorrt_parses_the_graph_aborts_and_writes_nothing(tmp_path):
    """The same drop happens earlier: SIGINT while the parser runs (sent from inside TensorRT's logger callback,
    where Python runs the handler) was swallowed, and the build went on to write its plan and exit 0."""
    pytest.importorskip("tensorrt_rtx")
    graph = export_qdq(random_r20_rtn(4)[1], tmp_path / "g.onnx")
    script = f"""
        import os, signal, threading
        import tensorrt_rtx as trt
        import mixq_onnx.trt.builder as B
        parsing, sent = threading.Event(), threading.Event()
        original = trt.OnnxParser.parse_from_file
        def parse(self, *a, **k):
            parsing.set()
            return original(self, *a, **k)
        trt.OnnxParser.parse_from_file = parse
        make = B.make_logger
        def make_logger(trt_, echo=False):
            base = make(trt_, echo)
            class Interrupting(type(base)):
                def log(self, severity, msg):
                    if parsing.is_set() and not sent.is_set():
                        sent.set()
                        os.kill(os.getpid(), signal.SIGINT)
                    super().log(severity, msg)
            return Interrupting()
        B.make_logger = make_logger
        from mixq_onnx.cli import main
        main(["build", {str(graph)!r}, "--out", {str(tmp_path / "g.plan")!r}, "--backend", "tensorrt-rtx"])
    """
    _assert_build_aborted(script, tmp_path)


def test_ctrl_c_during_the_tensorrt_build_aborts_it_and_writes_nothing(tmp_path):
    """A KeyboardInterrupt raised in TensorRT's logger callback is dropped by TensorRT: the build used to run
    on, write its plan and exit 0. SIGINT is sent the moment the build starts (the child's instrumented
    `build_serialized_network` says when)."""
    trt = pytest.importorskip("tensorrt_rtx")
    del trt
    graph = export_qdq(random_r20_rtn(4)[1], tmp_path / "g.onnx")
    script = f"""
        import os, signal, threading
        import tensorrt_rtx as trt
        started = threading.Event()
        original = trt.Builder.build_serialized_network
        def build(self, *a, **k):
            started.set()
            return original(self, *a, **k)
        trt.Builder.build_serialized_network = build
        threading.Thread(target=lambda: (started.wait(300), os.kill(os.getpid(), signal.SIGINT)), daemon=True).start()
        from mixq_onnx.cli import main
        main(["build", {str(graph)!r}, "--out", {str(tmp_path / "g.plan")!r}, "--backend", "tensorrt-rtx"])
    """
    _assert_build_aborted(script, tmp_path)


def test_an_interrupted_cache_rm_is_finished_by_the_next_one(tmp_path):
    """`cache rm` renames the cache to a hidden tomb and then deletes it: a kill mid-delete hid the rest from
    `cache ls` for good. The next `cache rm` (or calib) under the root finishes dead processes' tombs."""
    from mixq_onnx.calib import CalibConfig, list_caches, make_calibration_cache

    make = lambda seed: make_calibration_cache(CalibConfig(generator="noise", num=4, seed=seed), tmp_path,  # noqa: E731
                                               progress=False, log=lambda m: None)
    a, b = make(0), make(1)
    dead = tmp_path / f".{a.name}.removing.{_dead_pid()}.1796056074"
    os.rename(a, dead)  # as a killed `cache rm` leaves it
    live = tmp_path / f".{'f' * 16}.removing.{os.getppid()}.1796056074"
    live.mkdir()
    assert [c.path for c in list_caches(tmp_path)] == [b]
    C.remove(b, tmp_path)
    assert not dead.exists() and live.is_dir() and list_caches(tmp_path) == []


def test_a_checkpoint_replaced_by_a_killed_save_still_loads(tmp_path):
    """save_checkpoint (robustify) over an earlier checkpoint, killed between the checkpoint and its sidecar:
    the new weights sat beside the old sha256, and every reader refused them as "changed after written"."""
    from mixq_onnx.models.checkpoint import read_state_dict
    from mixq_onnx.robust import save_checkpoint

    out = tmp_path / "r.safetensors"
    torch.manual_seed(0)
    save_checkpoint(load_model("cifar_resnet20", random_init=True), out, {"run": 1})
    _run_killed(f"""
        import os, signal, torch
        import mixq_onnx.robust.train as rt
        from mixq_onnx.models import load_model
        rt.atomic_write_json = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        torch.manual_seed(1)
        rt.save_checkpoint(load_model("cifar_resnet20", random_init=True), {str(out)!r}, {{"run": 2}})
    """)
    torch.manual_seed(1)
    new = load_model("cifar_resnet20", random_init=True).state_dict()
    got = read_state_dict(out)
    assert all(torch.equal(got[k], new[k]) for k in new) and not (tmp_path / "r.safetensors.json").exists()
