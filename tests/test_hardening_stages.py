"""The training stages (`qat`, `robustify`) against input a user can get wrong (review, 2026-11-30): labels
outside the model's classes, tensors of the wrong kind from the library, options the chosen method never
reads, a KD weight nothing reads, a diverged fine-tune written as a checkpoint, a sidecar that was not ours."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import one_line_error, snapshot

from mixq_onnx.errors import MixqError
from mixq_onnx.models.preprocessing import ATTR, Preprocessing
from mixq_onnx.qat import QATConfig
from mixq_onnx.qat import train as qat_train
from mixq_onnx.robust import RobustConfig, robustify, save_checkpoint
from mixq_onnx.robust.regularizers import symreg_channel_penalty
from mixq_onnx.training import TrainData

TINY = ["--model", "test_resnet", "--input-size", "32", "--random-weights"]


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    """48 random labelled images, and the same with labels shifted past the 10 classes."""
    root = tmp_path_factory.mktemp("stages")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
    np.savez(root / "ok.npz", x=x, y=np.arange(48) % 10)
    np.savez(root / "bad.npz", x=x, y=np.arange(48) % 10 + 5000)  # test_resnet has 1,000 classes
    return root


def _small() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                      nn.Linear(8 * 8 * 8, 10)).eval()
    setattr(m, ATTR, Preprocessing(input_size=(3, 8, 8)))
    return m


@pytest.mark.parametrize("stage", ["qat", "robustify"])
def test_labels_outside_the_models_classes_are_one_line(npz, tmp_path, run_cli, stage):
    """They were an IndexError from cross_entropy, exit 1, after the model and data had loaded."""
    out = tmp_path / ("q" if stage == "qat" else "r.safetensors")
    extra = ["--target-bits", "4"] if stage == "qat" else []
    before = snapshot(tmp_path)
    line = one_line_error(run_cli(stage, *TINY, "--data", npz / "bad.npz", "--out", out, "--epochs", "1", *extra))
    assert "48 labels lie outside the model's 1000 classes (first: 5000)" in line, line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("make, needle", [
    (lambda: TrainData(torch.randint(0, 255, (4, 8, 8, 3), dtype=torch.uint8), None, "u8"), "preprocessed float images"),
    (lambda: TrainData(torch.randn(0, 3, 8, 8), None, "empty"), "holds no images"),
    (lambda: TrainData(torch.randn(8, 3, 8, 8), torch.zeros(5, dtype=torch.long), "short"), "8 training images but 5 labels"),
    (lambda: TrainData(torch.randn(8, 3, 8, 8), torch.zeros(8), "float labels"), "integer class indices"),
    (lambda: "images.npz", "must be a TrainData"),
], ids=["uint8-nhwc", "empty", "short-labels", "float-labels", "a-path"])
def test_the_library_stages_refuse_data_of_the_wrong_kind_in_one_line(make, needle):
    for run in (lambda d: qat_train(_small(), QATConfig(method="lsq", epochs=1, final_epochs=0), d, progress=False),
                lambda d: robustify(_small(), RobustConfig(epochs=1), d, progress=False)):
        with pytest.raises(MixqError, match=needle):
            run(make())


def test_configs_refuse_non_integers_and_options_their_method_does_not_read():
    for cfg, needle in ((QATConfig(target_bits=4, epochs=1.5), "--epochs must be an integer"),
                        (QATConfig(target_bits=4, seed=2**64), "--seed must be at most"),
                        (QATConfig(method="lsq", wbits=4.5), "--wbits must be an integer"),
                        (QATConfig(method="lsq", noise="uniform", qlr=0.5), "--noise, --qlr are not read by --method lsq"),
                        (RobustConfig(seed=1.5), "--seed must be an integer"),
                        (RobustConfig(symreg=float("inf")), "--symreg must be >= 0 and finite"),
                        (RobustConfig(rho=2.0), "--rho is not read without --sam asam"),
                        (RobustConfig(pairing="2:2"), "--symreg-pairing is not read without --symreg"),
                        (RobustConfig(learn_alpha=False), "--fixed-alpha is not read without --satnl")):
        with pytest.raises(MixqError, match=needle):
            cfg.validate()
    QATConfig(method="lsq", qlr=2e-2).validate()  # a default given explicitly is no conflict (the bench does it)
    RobustConfig(symreg=1.0, pairing="2:2", satnl=True, learn_alpha=False, sam="asam", rho=1.0).validate()
    with pytest.raises(MixqError, match="'foo' is not a torch device"):
        qat_train(_small(), QATConfig(method="lsq", epochs=1, final_epochs=0),
                  TrainData(torch.randn(8, 3, 8, 8), None, "x"), progress=False, device="foo")


def test_a_kd_weight_nothing_reads_is_refused(npz, tmp_path, run_cli):
    """On a cache --kd-weight was recorded in qat.json and the sidecar but never read; --loss ce with it
    trained CE plus KD."""
    from mixq_onnx.calib import CalibConfig, make_calibration_cache

    cache = make_calibration_cache(CalibConfig(generator="noise", num=8, size=32), tmp_path / "cache", progress=False)
    for stage, extra in (("qat", ["--method", "lsq"]), ("robustify", [])):
        out = tmp_path / ("q" if stage == "qat" else "r.safetensors")
        line = one_line_error(run_cli(stage, *TINY, "--data", cache, "--out", out, "--kd-weight", "3", *extra))
        assert "is a calibration cache: it trains by distillation alone" in line, line
        line = one_line_error(run_cli(stage, *TINY, "--data", npz / "ok.npz", "--out", out, "--loss", "ce",
                                      "--kd-weight", "2", *extra))
        assert "--loss ce trains on cross-entropy alone" in line, line
        assert not out.exists()


def test_cli_refuses_flags_the_method_ignores(npz, tmp_path, run_cli):
    line = one_line_error(run_cli("qat", *TINY, "--data", npz / "ok.npz", "--out", tmp_path / "q", "--method", "lsq",
                                  "--noise", "uniform", "--init-bits", "5"))
    assert "--noise, --init-bits are not read by --method lsq" in line, line
    line = one_line_error(run_cli("robustify", *TINY, "--data", npz / "ok.npz", "--out", tmp_path / "r.safetensors",
                                  "--fixed-alpha"))
    assert "--fixed-alpha is not read without --satnl" in line, line


def test_a_diverged_fine_tune_is_refused_not_written(npz, tmp_path, run_cli):
    """lr 1e8 wrote a NaN checkpoint with exit 0, which every reader then refused."""
    out = tmp_path / "nan.safetensors"
    line = one_line_error(run_cli("robustify", "--model", "cifar_resnet20", "--random-weights", "--data",
                                  npz / "ok.npz", "--out", out, "--lr", "1e8", "--epochs", "3", "--batch-size", "8", "-q"))
    assert "training diverged" in line and "nothing was written" in line, line
    assert not out.exists() and not (tmp_path / "nan.safetensors.json").exists()


def test_symreg_2to2_scores_a_symmetric_channel_zero_whatever_its_size():
    """With an odd count (27 weights per channel of an RGB stem) the largest value was dropped, not the median."""
    g = torch.Generator().manual_seed(0)
    half = torch.randn(4, 13, generator=g)
    for w in (torch.cat([half, torch.zeros(4, 1), -half], 1),  # 27 per channel
              torch.cat([half, -half], 1), torch.tensor([[-2.0, -1.0, 0.0, 1.0, 2.0]])):
        for pairing in ("1:1", "2:2"):
            assert float(symreg_channel_penalty(w, pairing).abs().max()) < 1e-12, (w.shape, pairing)
    assert float(symreg_channel_penalty(torch.tensor([[-2.0, -1.0, 0.0, 1.0, 3.0]]), "2:2")) > 0.05


def test_robustify_follows_its_seed_not_the_callers_rng():
    data = TrainData(torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
                     torch.arange(16) % 10, "x")
    outs = []
    for global_seed in (5, 999):
        model = _small()
        torch.manual_seed(global_seed)  # after _small(), which seeds its own weights
        m, _ = robustify(model, RobustConfig(epochs=1, batch_size=8, lr=0.05), data, progress=False)
        outs.append(m.state_dict())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_save_checkpoint_checks_its_report_and_the_sidecar_first(tmp_path):
    m = _small()
    out = tmp_path / "a.safetensors"
    save_checkpoint(m, out, {"ok": 1})
    side = tmp_path / "a.safetensors.json"
    before = (out.read_bytes(), side.read_text())
    with pytest.raises(MixqError, match="cannot be written as JSON"):
        save_checkpoint(m, out, {"lr": torch.tensor(0.1)}, overwrite=True)
    assert (out.read_bytes(), side.read_text()) == before  # the sidecar used to be gone by then
    mine = tmp_path / "mine.safetensors.json"
    mine.write_text(json.dumps({"my": "notes"}))
    with pytest.raises(MixqError, match="is not the sidecar of a checkpoint robustify wrote"):
        save_checkpoint(m, tmp_path / "mine.safetensors", {"ok": 1})
    assert json.loads(mine.read_text()) == {"my": "notes"} and not (tmp_path / "mine.safetensors").exists()


def test_quantize_over_a_qat_folder_drops_qats_report_and_an_empty_out_is_refused(npz, tmp_path, run_cli):
    """`quantize --overwrite` over a qat folder left qat.json (nipq) beside quant.json (rtn); `qat --out ""` wrote
    into the working directory (review, 2026-11-30)."""
    from mixq_onnx.calib import CalibConfig, make_calibration_cache

    out = tmp_path / "q"
    assert run_cli("qat", *TINY, "--data", npz / "ok.npz", "--out", out, "--epochs", "1", "--final-epochs", "0",
                   "--target-bits", "6", "-q").code == 0
    (out / "notes.txt").write_text("mine")
    assert {"qat.json", "bits.png"} <= {p.name for p in out.iterdir()}
    cache = make_calibration_cache(CalibConfig(generator="noise", num=8, size=32), tmp_path / "cache", progress=False)
    r = run_cli("quantize", *TINY, "--calib", cache, "--method", "rtn", "--out", out, "--overwrite", "-q")
    assert r.code == 0, r.err
    assert {p.name for p in out.iterdir()} == {"quant.json", "weights.safetensors", "notes.txt"}
    line = one_line_error(run_cli("qat", *TINY, "--data", npz / "ok.npz", "--out", "", "--target-bits", "4"))
    assert "--out is empty" in line, line


def test_training_data_records_what_was_read_and_notes_a_foreign_inversion_cache(npz, tmp_path):
    """qat.json and robustify's sidecar did not record --limit or the data's sha256; qat/robustify/sweep did not
    say when an inversion cache came from another network, as quantize does (review, 2026-11-30)."""
    from mixq_onnx.calib import CalibConfig, make_calibration_cache
    from mixq_onnx.models import load_model
    from mixq_onnx.training import load_training_data
    from mixq_onnx.utils import sha256_file

    model = load_model("test_resnet", random_init=True, input_size=32)
    d = load_training_data(npz / "ok.npz", model, limit=20)
    assert d.provenance == {"path": str(npz / "ok.npz"), "sha256": sha256_file(npz / "ok.npz"), "images": 20,
                            "subset": "20 of 48 images, class-stratified sample (seed 0)"}
    other = load_model("cifar_resnet20", random_init=True)
    cache = make_calibration_cache(CalibConfig(generator="inversion", num=4, size=32, model="cifar_resnet20",
                                               random_weights=True, options={"iters": 2}),
                                   tmp_path / "cache", model=other, progress=False, log=lambda m: None)
    lines: list[str] = []
    d = load_training_data(cache, model, log=lines.append)
    assert any(ln.startswith("note:") and "BN inversion of cifar_resnet20" in ln for ln in lines), lines
    assert d.provenance["images"] == 4 and d.provenance["recipe_hash"] == cache.name
    rep = qat_train(model, QATConfig(method="lsq", epochs=1, final_epochs=0, batch_size=4), d,
                    progress=False).mixq_qat_report
    assert rep["data_provenance"] == d.provenance
