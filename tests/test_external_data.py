"""Graphs whose weights live in a data file beside them: what `export` writes when protobuf's 2 GiB limit needs it
(a float ViT-H/14 failed with "Failed to serialize proto"), or with --external-data. Every reader takes them, and
the digest in the data file's name is checked."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line_error, random_r20_rtn, snapshot

from mixq_onnx.onnx.graph import external_data_files, graph_sha256, recorded_digest
from mixq_onnx.quant.io import save_quantized
from mixq_onnx.utils import sha256_file


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ext")
    _, q = random_r20_rtn(8, bits=8)
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", x=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), y=np.arange(16) % 10)
    return {"q": save_quantized(q, d / "q"), "npz": d / "data.npz", "dir": d}


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_an_external_data_graph_exports_checks_and_verifies_bit_exact(world, tmp_path, run_cli):
    out = tmp_path / "g" / "m.onnx"
    r = run_cli("export", "--quantized", world["q"], "--out", out, "--external-data")
    assert r.code == 0, r.err
    (loc,) = external_data_files(out)
    assert _files(out.parent) == ["m.onnx", loc] and loc.startswith("m.onnx.") and loc.endswith(".data")
    assert sha256_file(out.parent / loc).startswith(recorded_digest(loc))
    single = tmp_path / "single.onnx"
    assert run_cli("export", "--quantized", world["q"], "--out", single).code == 0
    assert external_data_files(single) == [] and graph_sha256(single) == sha256_file(single)
    # the weights left the graph file (per-channel scales and shape constants, under 1 KiB each, stay inline)
    assert out.stat().st_size < single.stat().st_size / 3 < (out.parent / loc).stat().st_size
    r = run_cli("check", out, "--json")
    assert r.code == 0 and json.loads(r.last_line)["ok"], r.err
    # verify exposes the integer codes: a graph re-serialized for onnxruntime, its weights read from the folder
    r = run_cli("verify", out, "--quantized", world["q"], "--data", world["npz"], "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.last_line)
    assert rep["max_abs_diff"] == 0.0 and rep["top1_agreement"] == 100.0 and rep["code_mismatch_fraction"] == 0.0
    # the same export again names the same file (its digest), and a graph file renamed keeps reading it
    sha = graph_sha256(out)
    assert run_cli("export", "--quantized", world["q"], "--out", out, "--external-data").code == 0
    assert _files(out.parent) == ["m.onnx", loc] and graph_sha256(out) == sha
    shutil.copy(out, out.parent / "renamed.onnx")
    r = run_cli("verify", out.parent / "renamed.onnx", "--quantized", world["q"], "--data", world["npz"], "--json")
    assert r.code == 0 and json.loads(r.last_line)["max_abs_diff"] == 0.0, r.err
    # back to one file: the data file export named for the graph it replaced goes, nothing else does
    (out.parent / "notes.data").write_text("the user's")
    (out.parent / "renamed.onnx").unlink()
    assert run_cli("export", "--quantized", world["q"], "--out", out, "--single-file").code == 0
    assert _files(out.parent) == ["m.onnx", "notes.data"] and external_data_files(out) == []


def test_changed_external_weights_are_refused_by_every_reader(world, tmp_path, run_cli):
    out = tmp_path / "m.onnx"
    assert run_cli("export", "--quantized", world["q"], "--out", out, "--external-data").code == 0
    (loc,) = external_data_files(out)
    data = bytearray((tmp_path / loc).read_bytes())
    data[len(data) // 2] ^= 0x10  # one weight byte: onnxruntime would run it without a word
    (tmp_path / loc).write_bytes(bytes(data))
    for args in (("check", out), ("verify", out, "--quantized", world["q"], "--data", world["npz"])):
        line = one_line_error(run_cli(*args))
        assert f"the external data {loc}" in line and "is not the file export wrote" in line, line
    (tmp_path / loc).write_bytes(bytes(data[:1000]))  # truncated: onnx's loader sees it first
    line = one_line_error(run_cli("check", out))
    assert "cannot read the external data" in line and "exceeds available data" in line, line


def test_export_never_replaces_a_file_of_another_content_at_the_data_files_name(world, tmp_path, run_cli):
    out = tmp_path / "m.onnx"
    assert run_cli("export", "--quantized", world["q"], "--out", out, "--external-data").code == 0
    (loc,) = external_data_files(out)
    out.unlink()
    (tmp_path / loc).write_text("a file of the user's that happens to have that name")
    before = snapshot(tmp_path)
    line = one_line_error(run_cli("export", "--quantized", world["q"], "--out", out, "--external-data"))
    assert f"{loc} exists and is not this graph's data" in line, line
    assert snapshot(tmp_path) == before and _files(tmp_path) == [loc]  # no graph, no temporary left


def test_the_weights_go_to_a_data_file_by_themselves_above_the_threshold(world, tmp_path, monkeypatch):
    """The default decides by the weights' bytes (1.5 GiB here; a 2.5 GB ViT-H export is in
    docs/benchmarks.md, section large-graphs): lowered, so that this small graph crosses it."""
    from mixq_onnx.errors import MixqError
    from mixq_onnx.onnx import graph, storage
    from mixq_onnx.onnx.check import check_model, report
    from mixq_onnx.onnx.export import export_onnx

    plain = export_onnx(tmp_path / "a.onnx", quantized=world["q"])
    assert external_data_files(plain) == []
    whole = graph.GraphIndex.load(plain, infer_shapes=True, input_shapes={"input": [3, 3, 32, 32]})
    monkeypatch.setattr(graph, "EXTERNAL_DATA_ABOVE", 100_000)
    auto = export_onnx(tmp_path / "b.onnx", quantized=world["q"])
    (loc,) = external_data_files(auto)
    assert (tmp_path / loc).stat().st_size > 100_000
    assert export_onnx(tmp_path / "c.onnx", quantized=world["q"], external_data=False)
    assert external_data_files(tmp_path / "c.onnx") == []
    monkeypatch.setattr(storage, "SINGLE_FILE_MAX", 100_000)  # protobuf's 2 GiB, lowered likewise
    with pytest.raises(MixqError, match="one ONNX file holds less than 2 GiB.*drop --single-file"):
        export_onnx(tmp_path / "d.onnx", quantized=world["q"], external_data=False)
    assert not (tmp_path / "d.onnx").exists()
    # above the size, onnx's checker reads the graph by its path and shape inference runs on the structure alone
    # (what a 2.5 GB graph needs): the same verdict and the same shapes as the whole single-file graph
    ix = graph.GraphIndex.load(auto, infer_shapes=True, input_shapes={"input": [3, 3, 32, 32]})
    assert ix.structure() is not ix.model and not graph.uses_external_data(ix.model)
    assert ix.shapes == whole.shapes and len([s for s in ix.shapes.values() if s and -1 not in s]) > 100
    assert report(check_model(auto)) == report(check_model(plain)) and report(check_model(auto))["ok"]


def test_an_external_data_graph_builds_and_inspects_like_the_single_file(world, tmp_path, run_cli):
    pytest.importorskip("tensorrt_rtx")
    from mixq_onnx.trt.builder import BuildConfig, build_engine
    from mixq_onnx.trt.inspect import inspect_plan

    reps = {}
    for flag in ("--external-data", "--single-file"):
        g = tmp_path / flag.strip("-") / "m.onnx"
        assert run_cli("export", "--quantized", world["q"], "--out", g, flag).code == 0
        build_engine(g, g.with_suffix(".plan"), BuildConfig(backend="tensorrt-rtx", batch=(1, 2, 2)))
        reps[flag] = inspect_plan(g.with_suffix(".plan"))
    ext, one = reps["--external-data"], reps["--single-file"]
    assert ext.int8_mac_fraction == one.int8_mac_fraction == 1.0
    assert ext.total_macs == one.total_macs > 0 and len(ext.layers) == len(one.layers)
    assert [c.precision for c in ext.compute] == [c.precision for c in one.compute]


def test_a_re_export_killed_between_its_renames_leaves_the_old_pair_whole(world, tmp_path):
    """The new data file is in place, the graph file not yet: the old graph still reads its old data file (a new
    export never reuses a name for other bytes), and the re-run finishes the job and removes the old data."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    from mixq_onnx.onnx.export import export_onnx

    out = tmp_path / "m.onnx"
    export_onnx(out, quantized=world["q"], external_data=True)
    (old,) = external_data_files(out)
    old_sha = graph_sha256(out)
    _, q4 = random_r20_rtn(8, bits=4)
    q4dir = save_quantized(q4, tmp_path / "q4")
    repo = Path(__file__).resolve().parents[1]
    script = f"""
        import os, signal
        import mixq_onnx.onnx.storage as st
        from mixq_onnx.onnx.export import export_onnx
        real = os.replace
        def replace_then_die(a, b):
            if str(b) == {str(out)!r}:  # the data file is in place; the graph's rename is next
                os.kill(os.getpid(), signal.SIGKILL)
            real(a, b)
        st.os.replace = replace_then_die
        export_onnx({str(out)!r}, quantized={str(q4dir)!r}, external_data=True)
    """
    env = {**os.environ, "PYTHONPATH": str(repo)}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    datas = sorted(p.name for p in tmp_path.glob("m.onnx.*.data"))
    assert len(datas) == 2 and old in datas  # the new data beside the old pair
    assert external_data_files(out) == [old] and graph_sha256(out) == old_sha  # the old graph reads its own data
    export_onnx(out, quantized=q4dir, external_data=True)  # the re-run (and the killed run's folder swept)
    (new,) = external_data_files(out)
    assert new != old and sorted(p.name for p in tmp_path.glob("m.onnx.*.data")) == [new]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.onnx.")]


def test_an_index_without_its_external_data_reads_each_constant_it_is_asked_for(world, tmp_path, run_cli):
    """inspect (and build, for its report) loaded every weight into memory to read the scales: an index loaded
    without its external data now reads a constant from the data file when asked, through onnx's checked reader."""
    from mixq_onnx.errors import MixqError
    from mixq_onnx.onnx.graph import GraphIndex

    out = tmp_path / "m.onnx"
    assert run_cli("export", "--quantized", world["q"], "--out", out, "--external-data").code == 0
    whole, light = GraphIndex.load(out), GraphIndex.load(out, external_data=False)
    external = [n for n, t in light.initializers.items() if t.data_location == 1]
    assert len(external) > 10  # the weights (the small constants stay inline)
    for name in light.initializers:
        a, b = whole.value(name), light.value(name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert all(t.data_location == 1 for t in (light.initializers[n] for n in external))  # the index is unchanged
    (loc,) = external_data_files(out)
    (tmp_path / loc).rename(tmp_path / "elsewhere.data")
    (tmp_path / loc).symlink_to(tmp_path / "elsewhere.data")
    fresh = GraphIndex.load(out, external_data=False)
    with pytest.raises(MixqError, match="cannot read the external data"):
        fresh.value(external[0])


def test_a_file_hashed_again_after_any_write_even_with_its_times_put_back(tmp_path):
    """sha256_file remembers large files' digests by their identity and times (build hashed one graph's data three
    times): a write of the same size whose modification time is put back still changes the ctime."""
    import hashlib
    import os

    from mixq_onnx.utils import MEMO_FROM

    f = tmp_path / "w.bin"
    data = bytearray(np.random.default_rng(0).integers(0, 256, MEMO_FROM + 7, dtype=np.uint8).tobytes())
    f.write_bytes(bytes(data))
    st = f.stat()
    assert sha256_file(f) == sha256_file(f) == hashlib.sha256(data).hexdigest()
    data[12345] ^= 1
    with open(f, "r+b") as h:
        h.seek(12345)
        h.write(bytes([data[12345]]))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()
