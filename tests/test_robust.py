"""SymReg and SatNL (issue 13, first part): the terms, their fixed points and the plain checkpoint."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import RESNET20, TEST_NPZ, need_shared
from hypothesis import given, settings
from hypothesis import strategies as st

from mixq_onnx.errors import MixqError
from mixq_onnx.robust import (
    RobustConfig,
    apply_satnl,
    regularized_layers,
    remove_satnl,
    symreg_channel_penalty,
    symreg_loss,
)

weights = st.lists(st.floats(-4, 4, allow_nan=False, allow_subnormal=False, width=32), min_size=4, max_size=40)


@settings(max_examples=50, deadline=None)
@given(weights, st.sampled_from(["1:1", "2:2"]))
def test_symreg_is_zero_for_symmetric_channels_and_positive_otherwise(vals, pairing):
    half = torch.tensor(vals)
    sym = torch.cat([half, -half])[torch.randperm(2 * len(vals), generator=torch.Generator().manual_seed(0))]
    assert float(symreg_channel_penalty(sym[None], pairing)[0]) < 1e-10
    shifted = sym + 0.5 * sym.abs().max().clamp(min=0.1)  # a mean shift breaks the symmetry
    assert float(symreg_channel_penalty(shifted[None], pairing)[0]) > 1e-6


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["1:1", "2:2"]))
def test_a_gradient_step_moves_weights_towards_symmetry(seed, pairing):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(8, 27, generator=g).exp() - 0.5).requires_grad_(True)  # skewed channels
    before = symreg_channel_penalty(w, pairing).sum()
    before.backward()
    with torch.no_grad():
        w2 = w - 1e-3 * w.grad / w.grad.norm().clamp(min=1e-12)
    assert float(symreg_channel_penalty(w2, pairing).sum()) < float(before.detach())


def test_symreg_skips_depthwise_and_is_scale_free():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 8, 8))
    names = [n for n, _ in regularized_layers(model)]
    assert names == ["0", "3"]
    w = torch.randn(4, 9, generator=torch.Generator().manual_seed(1)) + 0.3
    assert torch.allclose(symreg_channel_penalty(w), symreg_channel_penalty(10 * w))
    assert float(symreg_loss(model).detach()) > 0


def test_satnl_reproduces_the_weights_and_saves_a_plain_checkpoint():
    from mixq_onnx.models import load_model

    torch.set_num_threads(1)
    model = load_model("cifar_resnet20", random_init=True)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    sats = apply_satnl(model)
    assert len(sats) == len(regularized_layers(model)) == 20
    for name, m in regularized_layers(model):
        assert torch.allclose(m.weight, plain[f"{name}.weight"], rtol=1e-5, atol=1e-7), name
    with torch.no_grad():
        assert torch.allclose(model(x), ref, rtol=1e-4, atol=1e-5)
    assert all(s.alpha.requires_grad for s in sats)
    sd = remove_satnl(model).state_dict()
    assert set(sd) == set(plain)
    fresh = load_model("cifar_resnet20", random_init=True)
    fresh.load_state_dict(sd, strict=True)
    for name, m in regularized_layers(fresh):
        alpha = sats[[n for n, _ in regularized_layers(fresh)].index(name)].alpha
        assert float(m.weight.detach().abs().max()) <= float(alpha.detach()) + 1e-6  # bounded by alpha


@pytest.mark.parametrize("kw,needle", [({"symreg": -0.1}, "--symreg"), ({"pairing": "3:3"}, "pairing"),
                                       ({"epochs": 0}, "--epochs"), ({"sam": "sgd"}, "--sam")])
def test_config_rejects_bad_input(kw, needle):
    with pytest.raises(MixqError, match=needle):
        RobustConfig(**kw).validate()


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


@pytest.mark.parametrize("labelled,sam", [(True, None), (False, "asam")])
def test_robustify_trains_towards_symmetry_and_returns_a_plain_model(labelled, sam):
    from torch.nn.utils import parametrize

    from mixq_onnx.robust import robustify
    from mixq_onnx.training import TrainData

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    model = _tiny()
    with torch.no_grad():
        for _, m in regularized_layers(model):
            m.weight.add_(0.2 * m.weight.abs().amax())  # skew every channel
    before = float(symreg_loss(model).detach())
    x = torch.randn(64, 3, 8, 8, generator=g)
    data = TrainData(x, torch.randint(0, 4, (64,), generator=g) if labelled else None)
    cfg = RobustConfig(symreg=1.0, satnl=True, epochs=3, lr=0.05, batch_size=16, sam=sam)
    out, rep = robustify(model, cfg, data, progress=False)
    assert not any(parametrize.is_parametrized(m) for m in out.modules())
    assert set(out.state_dict()) == set(_tiny().state_dict())
    assert float(symreg_loss(out).detach()) < before
    terms = rep["train"]["epochs"][-1]
    assert ("ce" in terms) == labelled and ("kd" in terms) == (not labelled) and "symreg" in terms
    assert len(rep["satnl_alphas"]) == 2 and rep["train"]["steps"] == 12


def test_unlabelled_data_needs_a_teacher():
    from mixq_onnx.training import TrainConfig, TrainData, train

    with pytest.raises(MixqError, match="teacher"):
        train(_tiny(), TrainData(torch.randn(4, 3, 8, 8)), TrainConfig(epochs=1), progress=False)


@pytest.fixture(scope="module")
def noise_cache(tmp_path_factory):
    from mixq_onnx.calib import CalibConfig, make_calibration_cache

    return make_calibration_cache(CalibConfig(generator="noise", num=32, size=32),
                                  tmp_path_factory.mktemp("cache"), progress=False)


def test_cli_robustify_writes_a_plain_checkpoint_that_loads(noise_cache, tmp_path, run_cli):
    import json

    import numpy as np

    from mixq_onnx.models import load_model

    rng = np.random.default_rng(0)
    npz = tmp_path / "eval.npz"
    np.savez(npz, x=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), y=np.arange(16) % 10)
    out = tmp_path / "robust.safetensors"
    r = run_cli("robustify", "--model", "cifar_resnet20", "--random-weights", "--data", noise_cache, "--out", out,
                "--symreg", "0.1", "--satnl", "--epochs", "1", "--batch-size", "16", "--eval-data", npz, "-q")
    assert r.code == 0, r.err
    side = json.loads((tmp_path / "robust.safetensors.json").read_text())
    assert side["report"]["mode"].startswith("data-free")
    from mixq_onnx.models import ModelOptions
    from mixq_onnx.quant.evaluate import evaluate_data as _ev

    assert side["fp_top1_before"] == _ev(npz, model=ModelOptions("cifar_resnet20", random_init=True)).top1
    assert len(side["report"]["satnl_alphas"]) == 20 and "symreg" in side["report"]["train"]["epochs"][0]
    assert r.last_line == str(out)
    import hashlib

    from safetensors.torch import load_file

    from mixq_onnx.quant.evaluate import evaluate_data

    assert side["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    saved = load_file(out)
    m = load_model("cifar_resnet20", out)  # the plain model loads it, every tensor as saved
    state = m.state_dict()
    assert set(saved) == set(state) == set(load_model("cifar_resnet20", random_init=True).state_dict())
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert evaluate_data(npz, model=m).top1 == side["fp_top1_after"]  # the model the sidecar describes


@pytest.mark.parametrize("args,needle", [
    (["--symreg", "-1"], "--symreg"), (["--symreg-pairing", "3:3"], "3:3"), (["--epochs", "0"], "--epochs"),
    (["--loss", "ce"], "needs labels"), (["--out", "/proc/nope/r.safetensors"], "cannot write"),
    (["--bn-stats", "both"], "--bn-stats"),
])
def test_cli_robustify_bad_input(noise_cache, tmp_path, run_cli, args, needle):
    from conftest import one_line_error, snapshot

    base = ["robustify", "--model", "cifar_resnet20", "--random-weights", "--data", noise_cache,
            "--out", tmp_path / "r.safetensors", "--epochs", "1", "-q"]
    before = snapshot(tmp_path, noise_cache)
    msg = one_line_error(run_cli(*base, *args))
    assert needle in msg
    assert snapshot(tmp_path, noise_cache) == before


@need_shared(RESNET20, TEST_NPZ)
def test_bn_stats_freeze_keeps_the_checkpoints_statistics_that_update_gives_to_synthetic_images():
    """Data-free fine-tuning on images unlike the real ones (N(0, 1) noise in the model's normalised space, what
    `calib --generator noise` draws): with `update` the BatchNorm statistics follow the noise and the real
    ResNet-20 loses most of its accuracy while its weights barely move (lr 1e-9); `freeze` keeps them."""
    from mixq_onnx.models import load_model
    from mixq_onnx.quant.evaluate import evaluate_data
    from mixq_onnx.robust import robustify
    from mixq_onnx.training import TrainData

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    noise = TrainData(torch.randn(128, 3, 32, 32, generator=g))
    top1 = {}
    for mode in ("update", "freeze"):
        model = load_model("cifar_resnet20", RESNET20)
        before = evaluate_data(TEST_NPZ, model=model, limit=500).top1
        cfg = RobustConfig(epochs=2, lr=1e-9, batch_size=32, bn_stats=mode)
        out, rep = robustify(model, cfg, noise, progress=False)
        assert rep["bn_stats"] == mode
        top1[mode] = evaluate_data(TEST_NPZ, model=out, limit=500).top1
    assert before > 75
    assert top1["update"] < before - 30, (before, top1)
    assert abs(top1["freeze"] - before) <= 0.2, (before, top1)


def test_asams_second_pass_leaves_the_batchnorm_statistics_alone():
    """ASAM runs the batch twice (at w and at the perturbed w); only the first pass updates BN's statistics."""
    from mixq_onnx.training import TrainConfig, TrainData, train

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = TrainData(torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g))
    stats = {}
    for sam in (None, "asam"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(8, 4))
        model[0].weight.requires_grad_(False)  # the statistics then see the same conv output in both runs
        model[1].weight.requires_grad_(False)
        model[1].bias.requires_grad_(False)
        train(model, data, TrainConfig(epochs=1, lr=0.1, batch_size=8, sam=sam), progress=False)
        stats[sam] = (model[1].running_mean.clone(), model[1].running_var.clone(), int(model[1].num_batches_tracked))
    assert stats["asam"][2] == stats[None][2] == 4
    assert torch.allclose(stats["asam"][0], stats[None][0]) and torch.allclose(stats["asam"][1], stats[None][1])


def test_symreg_and_satnl_act_on_the_layers_quantize_quantizes_only():
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, groups=4), nn.Linear(4, 2))
    assert [n for n, _ in regularized_layers(model)] == ["1", "3"]


def test_evaluate_runs_a_model_in_eval_mode_and_hands_it_back_as_it_came():
    """A model given in train mode is evaluated with its running statistics, which stay as they were."""
    from mixq_onnx.quant.evaluate import predict

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)  # far from any batch's mean: batch statistics would show
    state = {k: v.clone() for k, v in model.state_dict().items()}
    imgs = torch.randint(0, 256, (6, 8, 8, 3), dtype=torch.uint8)
    want = predict(model.eval(), imgs)
    model.train()
    assert torch.equal(predict(model, imgs), want)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    model[1].eval()  # a mixed state comes back mixed
    predict(model, imgs)
    assert model.training and model[0].training and not model[1].training


def test_cli_robustify_warns_when_the_eval_data_is_the_training_data(tmp_path, run_cli):
    import numpy as np

    rng = np.random.default_rng(0)
    npz = tmp_path / "train.npz"
    np.savez(npz, x=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), y=np.arange(16) % 10)
    copy = tmp_path / "copy.npz"
    copy.write_bytes(npz.read_bytes())
    other = tmp_path / "other.npz"
    np.savez(other, x=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), y=np.arange(16) % 10)
    base = ["robustify", "--model", "cifar_resnet20", "--random-weights", "--data", npz, "--epochs", "1",
            "--batch-size", "16", "-q"]
    for i, (ev, warned) in enumerate(((npz, True), (copy, True), (other, False))):
        r = run_cli(*base, "--eval-data", ev, "--out", tmp_path / f"r{i}.safetensors")
        assert r.code == 0, r.err
        assert ("--eval-data is the training data" in r.err) == warned, r.err


def test_two_two_pairing_is_a_weaker_condition_than_one_to_one():
    """The docstring said 2:2 has the same fixed point as 1:1; it has not: [-3, -1, 2, 2] scores 0 under 2:2
    and is asymmetric (1:1 > 0). A symmetric channel scores 0 under both."""
    from mixq_onnx.robust.regularizers import symreg_channel_penalty

    w = torch.tensor([[-3.0, -1.0, 2.0, 2.0], [-2.0, -0.5, 0.5, 2.0]])
    one, two = symreg_channel_penalty(w, "1:1"), symreg_channel_penalty(w, "2:2")
    assert float(two[0]) == 0.0 and float(one[0]) > 0.1
    assert float(one[1]) == 0.0 and float(two[1]) == 0.0
