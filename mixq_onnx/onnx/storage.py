"""Where a written ONNX graph's bytes live: one file, or the graph file plus one external-data file beside it.

protobuf cannot serialize a message of 2 GiB or more, so a graph whose weights pass `graph.EXTERNAL_DATA_ABOVE`
(a float ViT-H/14 is 2.5 GB) keeps them in `<graph file name>.<16 hex digits of their sha256>.data`
(`graph.data_file_name`); onnxruntime, onnx's checker and the TensorRT parsers read it from the graph's folder.
Both files are written under a temporary folder beside the output and renamed into place, data first: the data
file's name changes with its content, so a crash between the two renames leaves the old graph with its old data
or the new graph with its new data, never a graph beside weights it was not written with. Readers check the
digest in the name (`graph.graph_sha256`, which `graph.load_model` runs for every reader of a mixq-onnx graph).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import MixqError
from ..utils import atomic_path, current_umask, sha256_file, sweep_stale_tmp, tmp_prefix
from . import graph
from .graph import data_file_name, external_data_files, recorded_digest, tensors, written_by_mixq

SINGLE_FILE_MAX = 1 << 31  # protobuf's limit on one message: no graph file holds this many bytes of weights
INLINE_MAX = 1024  # tensors up to this many bytes stay in the graph file (shape tensors, scales, zero points)


def weight_bytes(model: Any) -> int:
    """Bytes of `model`'s initializers (an onnx-ir Model or a ModelProto)."""
    if hasattr(model, "graph") and hasattr(model.graph, "initializers"):  # onnx-ir
        return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    return sum(len(t.raw_data) or 4 * (len(t.float_data) + len(t.int32_data)) + 8 * len(t.int64_data)
               for t in tensors(model.graph))


def own_data_files(path: Path) -> list[str]:
    """The data files (names in `path`'s folder) that the graph now at `path` names, when mixq-onnx wrote that
    graph and named them (`graph.data_file_name`): what a new graph written there makes stale. [] otherwise."""
    if not path.is_file() or path.is_symlink():
        return []
    try:
        if not written_by_mixq(path):
            return []
        return [loc for loc in external_data_files(path) if "/" not in loc and recorded_digest(loc)]
    except MixqError:
        return []


def write_graph(model: Any, out: str | os.PathLike, external: bool | None = None) -> Path:
    """Write `model` (an onnx-ir Model or a ModelProto) to `out` atomically; `external` None: with a data file
    exactly when its weights pass `graph.EXTERNAL_DATA_ABOVE`. Data files of the graph it replaces that mixq-onnx
    named are removed once the new graph is in place; nothing else is. Checked with onnx.checker (by path,
    which reads the data file as a runtime does) before anything is renamed."""
    import onnx

    out = Path(out)
    size = weight_bytes(model)
    external = size > graph.EXTERNAL_DATA_ABOVE if external is None else external
    if not external and size >= SINGLE_FILE_MAX:
        raise MixqError(f"the weights are {size / 1e9:.2f} GB and one ONNX file holds less than 2 GiB (protobuf): "
                        "drop --single-file to write them to a data file beside the graph")
    stale = own_data_files(out)
    if not external:
        proto = model if isinstance(model, onnx.ModelProto) else _to_proto(model)
        _check(proto)
        with atomic_path(out) as tmp:
            onnx.save(proto, str(tmp))
    else:
        keep = _write_external(model, out)
        stale = [s for s in stale if s != keep]
    for loc in stale:
        with contextlib.suppress(OSError):
            (out.parent / loc).unlink()
    return out


def _to_proto(model: Any) -> Any:
    import onnx_ir as ir

    return ir.to_proto(model)


def _check(proto_or_path: Any) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(proto_or_path) if isinstance(proto_or_path, Path) else proto_or_path,
                                 full_check=False)
    except Exception as e:  # noqa: BLE001
        raise MixqError(f"exported graph fails onnx.checker: {str(e).splitlines()[0][:200]}") from None


def _write_external(model: Any, out: Path) -> str:
    """The graph and its data file under a temporary folder beside `out`, then renamed into place (data first).
    Returns the data file's name."""
    import onnx

    sweep_stale_tmp(out)  # a killed writer's folder (named like atomic_path's temporaries)
    try:
        work = Path(tempfile.mkdtemp(prefix=tmp_prefix(out), suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise MixqError(f"cannot write {out}: {e.strerror or e}") from None
    try:
        gfile, raw = work / out.name, work / "weights.data"
        if isinstance(model, onnx.ModelProto):  # converts `model`'s tensors to references, in place
            onnx.save_model(model, str(gfile), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=raw.name, size_threshold=INLINE_MAX)
        else:
            import onnx_ir as ir

            ir.save(model, gfile, external_data=raw.name, size_threshold_bytes=INLINE_MAX)
        if not raw.is_file():  # no tensor above INLINE_MAX: the graph is whole without a data file
            _check(gfile)
            os.chmod(gfile, out.stat().st_mode & 0o777 if out.is_file() else 0o666 & ~current_umask())
            os.replace(gfile, out)
            return ""
        digest = sha256_file(raw)
        loc = data_file_name(out.name, digest)
        light = onnx.load(str(gfile), load_external_data=False)
        for t in tensors(light.graph):
            for e in t.external_data:
                if e.key == "location":
                    e.value = loc
        onnx.save(light, str(gfile))
        os.replace(raw, work / loc)
        _check(gfile)
        dest = out.parent / loc
        if (dest.exists() or dest.is_symlink()) and not (dest.is_file() and not dest.is_symlink()
                                                         and sha256_file(dest) == digest):
            raise MixqError(f"{dest} exists and is not this graph's data: move it away and export again")
        mode = out.stat().st_mode & 0o777 if out.is_file() else 0o666 & ~current_umask()
        for f in (work / loc, gfile):
            os.chmod(f, mode)
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(work / loc, dest)
        os.replace(gfile, out)
        return loc
    except OSError as e:
        raise MixqError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
