"""`sweep` (issue 13): the bits x methods grid, its files, resuming, and `robustify` -> `sweep` end to end on a
tiny timm model (random weights: this checks the code paths; accuracy claims live in docs/benchmarks.md)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import RESNET20, TEST_NPZ, need_shared, one_line_error, snapshot

from mixq_onnx.errors import MixqError
from mixq_onnx.sweep import SweepConfig, parse_bits, sweep_table

TINY = ["--model", "test_resnet", "--input-size", "32"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A random test_resnet saved as a checkpoint, a 32-image noise cache, and 48 labelled random images."""
    from safetensors.torch import save_file

    from mixq_onnx.calib import CalibConfig, make_calibration_cache
    from mixq_onnx.models import load_model

    root = tmp_path_factory.mktemp("sweep")
    torch.manual_seed(0)
    m = load_model("test_resnet", random_init=True, input_size=32)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, root / "orig.safetensors")
    cache = make_calibration_cache(CalibConfig(generator="noise", num=32, size=32), root / "cache", progress=False)
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", x=rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8), y=np.arange(48) % 10)
    return root, cache


def test_parse_bits_accepts_the_supported_set_only():
    assert parse_bits("W4A4") == (4, 4) and parse_bits("w2a16") == (2, 16) and parse_bits(" W3A3 ") == (3, 3)
    for bad in ("W1A4", "W9A8", "W4A1", "W4A12", "4/4", "W4", ""):
        with pytest.raises(MixqError):
            parse_bits(bad)
    with pytest.raises(MixqError, match="twice"):
        SweepConfig(bits=("W4A4", "w4a4")).validate()
    with pytest.raises(MixqError, match="unknown method"):
        SweepConfig(methods=("rtn", "gptq")).validate()


def test_robustify_then_sweep_end_to_end(world, tmp_path, run_cli):
    root, cache = world
    robust = tmp_path / "robust.safetensors"
    r = run_cli("robustify", *TINY, "--checkpoint", root / "orig.safetensors", "--data", cache, "--out", robust,
                "--symreg", "1", "--satnl", "--epochs", "1", "--batch-size", "16", "-q")
    assert r.code == 0, r.err
    out = tmp_path / "sweep"
    args = ["sweep", *TINY, "--checkpoint", root / "orig.safetensors", "--label", "original",
            "--compare", f"robust={robust}", "--calib", cache, "--data", root / "data.npz",
            "--bits", "W8A8,W3A3", "--method", "rtn,qdrop", "--seeds", "0,1", "--iters", "2", "--num-samples", "16",
            "--out", out, "--json"]
    r = run_cli(*args)
    assert r.code == 0, r.err
    doc = json.loads((out / "sweep.json").read_text())
    # 2 checkpoints x (FP + 2 methods x 2 bit-widths x 2 seeds)
    assert len(doc["cells"]) == 2 * (1 + 2 * 2 * 2)
    assert {c["label"] for c in doc["cells"]} == {"original", "robust"}
    assert all(0 <= c["top1"] <= 100 and c["n"] == 48 for c in doc["cells"])
    ids = {m["label"]: m["identity"] for m in doc["models"]}
    assert ids["original"] != ids["robust"]  # the fine-tuned weights differ, so do their fingerprints
    # W8A8 RTN of a model barely differs from the model itself: agreement with FP is high
    w8 = [c for c in doc["cells"] if c["bits"] == "W8A8" and c["method"] == "rtn"]
    assert all(c["agreement"] >= 80 for c in w8), w8
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "sweep.md").read_text()
    assert table == sweep_table(doc) and table.count("| original |") == 2 and "| W8A8 | W3A3 |" in table
    assert json.loads(r.last_line)["reused"] == 0

    # re-run: every cell is reused (same fingerprints), nothing is recomputed
    r2 = run_cli(*args)
    assert r2.code == 0, r2.err
    assert json.loads(r2.last_line)["reused"] == len(doc["cells"])
    assert json.loads((out / "sweep.json").read_text())["cells"] == doc["cells"]

    # a changed setting recomputes only the cells it touches (the FP cells stay)
    r3 = run_cli(*args[:-1], "--first-last-bits", "0", "--json")
    assert r3.code == 0, r3.err
    assert json.loads(r3.last_line)["reused"] == 2


@pytest.mark.parametrize("extra,needle", [
    (["--bits", "W4A4,W1A4"], "W1A4"),
    (["--bits", "W4A9"], "supported set"),
    (["--method", "rtn,nope"], "nope"),
    (["--seeds", "0,x"], "--seeds"),
    (["--compare", "=x.pt"], "--compare"),
])
def test_sweep_bad_input_is_one_line_and_writes_nothing(world, tmp_path, run_cli, extra, needle):
    root, cache = world
    base = ["sweep", *TINY, "--checkpoint", root / "orig.safetensors", "--calib", cache, "--data", root / "data.npz",
            "--out", tmp_path / "s", "-q"]
    before = snapshot(tmp_path, root)
    assert needle in one_line_error(run_cli(*base, *extra))
    assert snapshot(tmp_path, root) == before


def test_sweep_refuses_a_foreign_folder_and_a_tampered_checkpoint(world, tmp_path, run_cli):
    root, cache = world
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    base = ["sweep", *TINY, "--calib", cache, "--data", root / "data.npz", "--bits", "W8A8", "--method", "rtn", "-q"]
    assert "without sweep.json" in one_line_error(run_cli(*base, "--checkpoint", root / "orig.safetensors",
                                                          "--out", tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    # robustify's sidecar records the checkpoint's sha256; an edited file is refused by every reader
    ck = tmp_path / "r.safetensors"
    r = run_cli("robustify", *TINY, "--checkpoint", root / "orig.safetensors", "--data", cache, "--out", ck,
                "--epochs", "1", "--batch-size", "32", "-q")
    assert r.code == 0, r.err
    data = bytearray(ck.read_bytes())
    data[-1] ^= 1
    ck.write_bytes(bytes(data))
    assert "sha256" in one_line_error(run_cli(*base, "--checkpoint", ck, "--out", tmp_path / "s2"))
    assert not (tmp_path / "s2").exists()


def test_two_sweeps_into_one_folder_take_turns(tmp_path):
    """Two sweeps into one --out used to interleave: one's sweep.json and sweep.md beside the other's plot,
    or one's cells lost while both exited 0. The second now waits for the first's lock, then reuses its
    cells and adds its own."""
    import threading

    from mixq_onnx.calib import CalibConfig, make_calibration_cache
    from mixq_onnx.models import load_model
    from mixq_onnx.sweep import SweepConfig, SweepModel, read_sweep, run_sweep

    cache = make_calibration_cache(CalibConfig(generator="noise", num=8), tmp_path / "c", progress=False)
    rng = np.random.default_rng(0)
    npz = tmp_path / "d.npz"
    np.savez(npz, x=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), y=np.arange(8) % 10)
    model = SweepModel.of("r20", load_model("cifar_resnet20", random_init=True), {"spec": "cifar_resnet20"})
    out, waited, errors = tmp_path / "out", [], []

    def sweep(bits: str) -> None:
        try:
            run_sweep([model], SweepConfig(bits=(bits,), methods=("rtn",)), cache, npz, out, progress=False,
                      log=waited.append)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=sweep, args=(b,)) for b in ("W8A8", "W4A4")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    keys = sorted(c["key"] for c in read_sweep(out)["cells"])
    assert keys[0].startswith("r20|fp") and len(keys) == 2  # the last sweep's grid: fp + its bits
    assert any("waiting for the lock of sweep" in w for w in waited), waited


@need_shared(RESNET20, TEST_NPZ)
def test_a_sweep_cell_is_what_quantize_and_evaluate_give(tmp_path, run_cli):
    """One cell recomputed with the library's quantize and a plain forward pass, on the real ResNet-20 (a random
    network predicts one class, so a cell scoring the float model in the quantized one's place passed).
    Review, 2026-11-30."""
    from mixq_onnx.calib import CalibConfig, CalibrationSet, make_calibration_cache
    from mixq_onnx.models import get_preprocessing, load_model
    from mixq_onnx.quant import quantize

    z = np.load(TEST_NPZ)
    npz = tmp_path / "d.npz"
    np.savez(npz, x=z["x"][::25], y=z["y"][::25])  # 200 images, every class
    cache = make_calibration_cache(CalibConfig(generator="noise", num=32, size=32), tmp_path / "cache", progress=False)
    out = tmp_path / "sweep"
    r = run_cli("sweep", "--model", "cifar_resnet20", "--checkpoint", RESNET20, "--calib", cache, "--data", npz,
                "--bits", "W3A3", "--method", "rtn", "--num-samples", "32", "--out", out, "-q")
    assert r.code == 0, r.err
    cells = {c["method"]: c for c in json.loads((out / "sweep.json").read_text())["cells"]}
    model = load_model("cifar_resnet20", RESNET20).eval()
    qcfg = SweepConfig(bits=("W3A3",), methods=("rtn",), num_samples=32).quant_config("rtn", "W3A3", 0).resolved()
    q = quantize(model, qcfg, CalibrationSet(cache, model), progress=False).eval()
    x = get_preprocessing(model)(torch.from_numpy(z["x"][::25]))
    y = torch.from_numpy(z["y"][::25]).long()
    with torch.no_grad():
        pq, pf = q(x).argmax(1), model(x).argmax(1)
    assert cells["fp"]["top1"] == round(float((pf == y).float().mean() * 100), 4)
    assert cells["rtn"]["top1"] == round(float((pq == y).float().mean() * 100), 4)
    assert cells["rtn"]["agreement"] == round(float((pq == pf).float().mean() * 100), 4) < 100


def test_an_edited_image_folder_recomputes_the_cells(world, tmp_path, run_cli):
    """An image folder was fingerprinted by file names and sizes: inverting every image (same sizes) reused the
    old cells (review, 2026-11-30)."""
    from PIL import Image

    root, cache = world
    data = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / c / f"{i}.bmp")
    args = ["sweep", *TINY, "--checkpoint", root / "orig.safetensors", "--calib", cache, "--data", data,
            "--bits", "W8A8", "--method", "rtn", "--num-samples", "16", "--out", tmp_path / "s", "--json"]
    assert run_cli(*args).code == 0
    assert json.loads(run_cli(*args).last_line)["reused"] == 2
    for f in data.rglob("*.bmp"):
        size = f.stat().st_size
        Image.fromarray(255 - np.asarray(Image.open(f))).save(f)
        assert f.stat().st_size == size
    r = run_cli(*args)
    assert r.code == 0 and json.loads(r.last_line)["reused"] == 0, r.err


def test_another_mixq_onnx_version_measures_every_cell_again(world, tmp_path, run_cli, monkeypatch):
    """The fingerprint names the code's version: cells an older release measured are not reused after an
    upgrade (review, 2026-11-30)."""
    import mixq_onnx

    root, cache = world
    data = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), y=np.arange(6) % 2)
    args = ["sweep", *TINY, "--checkpoint", root / "orig.safetensors", "--calib", cache, "--data", data,
            "--bits", "W8A8", "--method", "rtn", "--num-samples", "16", "--out", tmp_path / "s", "--json"]
    assert run_cli(*args).code == 0
    assert json.loads(run_cli(*args).last_line)["reused"] == 2
    monkeypatch.setattr(mixq_onnx, "__version__", mixq_onnx.__version__ + ".post1")
    r = run_cli(*args)
    assert r.code == 0 and json.loads(r.last_line)["reused"] == 0, r.err


def test_a_re_run_with_fewer_bits_keeps_the_other_cells_for_later(world, tmp_path, run_cli):
    """A re-run with fewer --bits dropped the cells it did not ask for: asking for them again measured them again."""
    root, cache = world
    base = ["sweep", *TINY, "--checkpoint", root / "orig.safetensors", "--calib", cache, "--data", root / "data.npz",
            "--method", "rtn", "--num-samples", "16", "--out", tmp_path / "s", "--json"]
    r = run_cli(*base, "--bits", "W8A8")
    assert r.code == 0 and json.loads(r.last_line)["reused"] == 0, r.err
    r = run_cli(*base, "--bits", "W3A3")
    assert r.code == 0 and json.loads(r.last_line)["reused"] == 1, r.err  # the FP cell
    doc = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert sorted(c["bits"] for c in doc["cells"]) == ["FP", "W3A3"]  # the table is this run's grid
    assert [c["bits"] for c in doc["earlier"]] == ["W8A8"] and "W8A8" not in (tmp_path / "s" / "sweep.md").read_text()
    r = run_cli(*base, "--bits", "W8A8,W3A3")
    assert r.code == 0 and json.loads(r.last_line)["reused"] == 3, r.err  # nothing measured again
    doc = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert sorted(c["bits"] for c in doc["cells"]) == ["FP", "W3A3", "W8A8"] and doc["earlier"] == []
    doc["earlier"] = [{**doc["cells"][0], "top1": 99.0}]  # an edited kept cell is refused like any other
    (tmp_path / "s" / "sweep.json").write_text(json.dumps(doc))
    assert "changed after the sweep wrote it" in one_line_error(run_cli(*base, "--bits", "W8A8"))
