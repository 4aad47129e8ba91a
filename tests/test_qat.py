"""`qat` (issue 14): NIPQ's noise and learned bits, the budget and its rounding, the frozen grids, mixed
precision through export / check / verify, and the command end to end on a tiny timm model (random weights:
these check the code paths and the mechanics; accuracy claims belong to the benchmark)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import one_line_error, snapshot

from mixq_onnx.errors import MixqError
from mixq_onnx.qat import QATConfig, average_bits, measure_costs, nipq_quant, round_to_budget, sample_noise
from mixq_onnx.qat import train as qat_train
from mixq_onnx.qat.budget import Costs
from mixq_onnx.qat.noise import NoisyClip, rounding_errors
from mixq_onnx.quant.graph import prepare, quantizers
from mixq_onnx.quant.quantizer import ActQuantizer, WeightQuantizer
from mixq_onnx.training import TrainData

TINY = ["--model", "test_resnet", "--input-size", "32", "--random-weights"]


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b|."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b))))


def ks_critical(n: int, m: int, alpha: float = 0.001) -> float:
    """Asymptotic two-sample KS critical value at level alpha."""
    return math.sqrt(-0.5 * math.log(alpha / 2)) * math.sqrt((n + m) / (n * m))


@pytest.fixture(scope="module")
def tiny():
    """A random test_resnet (32 px) and 48 random images."""
    from mixq_onnx.models import load_model

    torch.manual_seed(0)
    model = load_model("test_resnet", random_init=True, input_size=32)
    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, TrainData(x, None, "random")


PIXELS = torch.randint(0, 256, (32, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 32-image noise cache and 48 labelled random images in an npz."""
    from mixq_onnx.calib import CalibConfig, make_calibration_cache

    root = tmp_path_factory.mktemp("qat")
    cache = make_calibration_cache(CalibConfig(generator="noise", num=32, size=32), root / "cache", progress=False)
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", x=rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8), y=np.arange(48) % 10)
    return root, cache


# ----------------------------------------------------------------------------- noise
def test_hist_noise_reproduces_the_measured_rounding_error_and_uniform_is_uniform():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # Values crowded near 0 on a 3-bit grid: their rounding errors are far from uniform (mostly -v near 0).
    x = torch.randn(200_000, generator=g) * 0.06
    alpha, bits = torch.tensor(1.0), torch.tensor(3.0)
    err = rounding_errors(x.reshape(1, -1), alpha.reshape(1, 1), 2 ** (bits - 1) - 1, signed=True)
    measured = err[~torch.isnan(err)].numpy()
    hist = sample_noise(torch.from_numpy(measured), (100_000,), "hist", g).numpy()
    uni = sample_noise(torch.empty(0), (100_000,), "uniform", g).numpy()
    ref_uniform = torch.rand(100_000, generator=g).numpy() - 0.5
    crit = ks_critical(len(measured), len(hist))
    assert ks_statistic(measured, hist) < crit  # the sampler reproduces the measured distribution
    assert ks_statistic(measured, ref_uniform) > 10 * crit  # ... which is not uniform: the test has power
    assert ks_statistic(uni, ref_uniform) < ks_critical(len(uni), len(ref_uniform))
    assert hist.min() >= -0.5 and hist.max() <= 0.5 and uni.min() >= -0.5 and uni.max() <= 0.5


def test_noise_is_added_inside_the_range_and_gradients_match_the_plain_formula():
    torch.manual_seed(0)
    x = (torch.randn(4, 8, 5, 5) * 2).requires_grad_()
    alpha = torch.full((4, 1, 1, 1), 1.5, requires_grad=True)
    bits = torch.tensor(4.0, requires_grad=True)
    for signed in (True, False):
        n_lv = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        delta = alpha / n_lv
        with torch.no_grad():
            upper = x >= alpha
            lower = x <= -alpha if signed else x <= 0
            noise = torch.rand(x.shape) - 0.5  # a draw for every element, clipped ones too, as nipq_quant passes
        out = NoisyClip.apply(x, alpha, delta, noise, upper, lower, signed)
        floor = -alpha if signed else torch.zeros_like(alpha)
        ref = torch.where(upper, alpha, torch.where(lower, floor, x + noise * delta))
        assert torch.equal(out, ref)
        w = torch.randn(x.shape)
        got = torch.autograd.grad((out * w).sum(), (x, alpha, bits), retain_graph=True)
        want = torch.autograd.grad((ref * w).sum(), (x, alpha, bits))
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    y = nipq_quant(x.detach(), torch.tensor(3.0), torch.tensor(1.0), True, "hist")
    inside = x.detach().abs() < 1.0
    assert (y[~inside].abs() == 1.0).all()
    assert ((y - x.detach())[inside].abs() <= 0.5 / 3 + 1e-6).all()  # at most half a step of noise


def test_lsq_values_rounding_onto_the_end_codes_keep_the_straight_through_gradient():
    """LSQ's gradients as the paper gives them (eq. 3; the official NIPQ code's hardtanh, then round): x with
    -Q_N < v < Q_P passes the gradient and gives the step round(v) - v, also where it rounds onto an end code
    (6.6, 6.9, 0.3); beyond the grid, within half a step of its end too (7.3, -0.4, -1.02), 0 and the end code."""
    from mixq_onnx.qat import lsq_quant

    x = torch.tensor([0.3, 0.6, 6.6, 6.9, 7.3, 7.6, 9.0, -0.4, -2.0], requires_grad=True)
    step = torch.tensor(1.0, requires_grad=True)
    y = lsq_quant(x, step, 0, 7, 1.0)
    y.sum().backward()
    assert y.tolist() == [0.0, 1.0, 7.0, 7.0, 7.0, 7.0, 7.0, 0.0, 0.0]
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    v = x.detach()
    inside = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    want = torch.where(inside, torch.round(v) - v, torch.round(v).clamp(0, 7)).sum()
    assert torch.allclose(step.grad, want)
    # per-channel steps (weights), signed narrow grid: each channel's step gets its own channel's terms
    w = torch.tensor([[0.95, -1.02, 0.2], [2.9, 0.1, -3.1]], requires_grad=True)
    s = torch.tensor([[1.0], [1.0]], requires_grad=True)
    lsq_quant(w, s, -1, 1, 1.0).sum().backward()
    assert w.grad.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]  # -1.02 rounds to -1 but lies beyond it
    assert torch.allclose(s.grad, torch.tensor([[(1 - 0.95) - 1 + (0 - 0.2)], [1 + (0 - 0.1) - 1]]))


def test_a_shared_activation_quantizer_draws_its_noise_once_per_tensor():
    """Two consumers of one tensor read one draw (noise and stochastic bits), as the deployed graph quantizes
    it once; the next forward's tensor gets a new draw, and an unshared quantizer draws per call."""
    from mixq_onnx.qat.quantizers import QATActQuantizer, QATParams

    def make(shared: bool) -> QATActQuantizer:
        base = ActQuantizer("layer.input", 4, True)
        base.shared_with = ("block.identity",) if shared else ()
        p = QATParams(torch.tensor(2.0), signed=True, learn_bits=True, bits=5.0, cap=8, noise="uniform")
        return QATActQuantizer(base, p).train()

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    q = make(True)
    a, b = q(x), q(x)
    assert torch.equal(a, b)
    assert not torch.equal(q(torch.randn(2, 3, 8, 8).copy_(x)), a)  # a new tensor: a new draw
    u = make(False)
    assert not torch.equal(u(x), u(x))


# ----------------------------------------------------------------------------- budget
def test_the_budget_raises_or_lowers_the_learned_bits(tiny):
    model, data = tiny
    learned = {}
    for target in (8.0, 2.0):
        cfg = QATConfig(target_bits=target, init_bits=5.0, epochs=3, final_epochs=0, batch_size=16, qlr=0.5,
                        budget_weight=5.0, lr=1e-4, first_last_bits=None)
        q = qat_train(model, cfg, data, progress=False)
        rows = [r for r in q.mixq_qat_report["quantizers"] if not r["fixed"]]
        learned[target] = sum(r["learned_bits"] for r in rows) / len(rows)
    assert learned[8.0] > 5.5 and learned[2.0] < 4.5, learned


def test_dual_ascent_reaches_a_target_the_fixed_penalty_stops_short_of():
    """A task loss that pulls every bit-width up (as the cross-entropy does at low bits) against the budget
    penalty: the fixed penalty settles where the two pulls balance, 3 bits over the target; the
    multipliers keep growing until both averages sit on it."""
    from mixq_onnx.qat.budget import BudgetMultipliers, budget_loss

    costs = Costs(sizes={"w1": 100, "w2": 300, "a1": 50, "a2": 50},
                  kinds={"w1": "weight", "w2": "weight", "a1": "act", "a2": "act"})
    total = {"weight": 400, "act": 100}
    cfg = QATConfig(target_bits=3.0).validate()
    ends = {}
    for rate in (0.0, 0.05):
        bits = {n: torch.tensor(8.0, requires_grad=True) for n in costs.kinds}
        opt = torch.optim.SGD(bits.values(), lr=0.1)
        mult = BudgetMultipliers.for_config(QATConfig(target_bits=3.0, budget_rate=rate).validate())
        for _ in range(1000):
            task = sum(0.25 * (8.0 - b) ** 2 * costs.sizes[n] / total[costs.kinds[n]]  # pull up
                       for n, b in bits.items())
            opt.zero_grad()
            (task + budget_loss(bits, costs, cfg, mult)).backward()
            opt.step()
        ends[rate] = {k: float(average_bits({n: b.detach() for n, b in bits.items()}, costs, k))
                      for k in ("weight", "act")}
    assert all(v > 4.0 for v in ends[0.0].values()), ends  # the fixed penalty stops well above 3 bits
    assert all(abs(v - 3.0) < 0.05 for v in ends[0.05].values()), ends
    assert mult is not None and all(v > 0 for v in mult.values.values()) and mult.trace


def test_range_bits_is_the_uniform_width_the_budget_stands_for():
    from mixq_onnx.qat.budget import range_bits

    costs = Costs(sizes={"w": 100, "a": 100}, kinds={"w": "weight", "a": "act"}, layers=[("l", "w", "a", 1_000_000)])
    assert range_bits(costs, ["w", "a"], {}, QATConfig(target_bits=3.4).validate()) == 3
    assert range_bits(costs, ["w", "a"], {}, QATConfig(target_bits=3.6).validate()) == 4
    # GBOPs = 1e6 MACs * b * b / 1e9: 0.016 at 4 bits, 0.025 at 5
    assert range_bits(costs, ["w", "a"], {}, QATConfig(target_gbops=0.017).validate()) == 4
    assert range_bits(costs, ["w", "a"], {}, QATConfig(target_gbops=0.024).validate()) == 5


def test_lp_ranges_start_at_the_budgets_grid_inside_the_official_ones(tiny):
    """--range-init lp starts each learned range at quantize's Lp-optimal clip for the budget's bits, which
    at 3 bits clips: below max|w| for weights and below the official 6 / 3 (or the 99.9th percentile) for
    activations."""
    model, data = tiny
    reps = {}
    for init in ("official", "lp"):
        cfg = QATConfig(target_bits=3.0, epochs=1, final_epochs=0, batch_size=16, range_init=init,
                        first_last_bits=None)
        reps[init] = {r["name"]: r for r in qat_train(model, cfg, data, progress=False).mixq_qat_report["quantizers"]}
    learned = [n for n, r in reps["lp"].items() if not r["fixed"]]
    assert learned and {r["kind"] for n, r in reps["lp"].items() if n in learned} == {"weight", "act"}
    live = [n for n in learned if reps["official"][n]["alpha_init"] > 1e-6]  # timm zero-inits each block's last BN
    assert len(live) > len(learned) // 2
    for n in live:
        assert 0 < reps["lp"][n]["alpha_init"] < reps["official"][n]["alpha_init"], n


def test_round_to_budget_lands_within_the_tolerance_and_moves_the_nearest_first():
    costs = Costs(sizes={"a": 100, "b": 300, "c": 600, "x": 1000}, kinds={"a": "weight", "b": "weight",
                                                                          "c": "weight", "x": "act"})
    cont = {"a": 4.4, "b": 4.45, "c": 3.6, "x": 5.2}  # rounds to 4, 4, 4 (avg 4.0) and 5
    cfg = QATConfig(target_bits=4.4).validate()
    bits, moves = round_to_budget(cont, ["a", "b", "c", "x"], {}, costs, cfg)
    assert abs(average_bits(bits, costs, "weight") - 4.4) <= 0.05 and bits["b"] == 5  # b was nearest to 5
    assert abs(average_bits(bits, costs, "act") - 4.4) > 0.05  # one act quantizer: 4 or 5 bits, no better
    assert moves[0]["quantizer"] == "b"
    with pytest.raises(MixqError, match="out of reach"):
        from mixq_onnx.qat.budget import check_reachable

        check_reachable(costs, ["a", "b"], {"c": 8, "x": 8}, QATConfig(target_bits=2.5).validate())


def test_average_bits_land_within_005_of_the_target(tiny):
    model, data = tiny
    for target in (3.5, 5.0):
        cfg = QATConfig(target_bits=target, epochs=1, final_epochs=0, batch_size=24)
        rep = qat_train(model, cfg, data, progress=False).mixq_qat_report
        a = rep["achieved"]
        assert abs(a["weight_bits"] - target) <= 0.05 and abs(a["act_bits"] - target) <= 0.05, (target, a)
    cfg = QATConfig(target_gbops=0.05, epochs=1, final_epochs=0, batch_size=24)
    rep = qat_train(model, cfg, data, progress=False).mixq_qat_report
    assert abs(rep["achieved"]["gbops"] - 0.05) <= 0.05 * 0.05, rep["achieved"]


def test_budget_over_learned_averages_the_learned_quantizers_so_w4a4_measures_4(tiny):
    """`--budget-over learned`: the fixed first/last layers (and the pool feeding the last, at its 8 bits as
    quantize gives it) are outside the averages, so the learned quantizers alone land on the target, and a
    uniform 4-bit assignment of them measures exactly 4 and 4 where the all-quantizer average is above."""
    model, data = tiny
    reps = {}
    for over in ("all", "learned"):
        cfg = QATConfig(target_bits=4.0, budget_over=over, epochs=1, final_epochs=0, batch_size=24)
        reps[over] = qat_train(model, cfg, data, progress=False).mixq_qat_report
    rows = {over: {r["name"]: r for r in rep["quantizers"]} for over, rep in reps.items()}
    pools = [n for n, r in rows["learned"].items() if r["placement"] == "pool"]
    assert pools
    for n in pools:  # fixed at the classifier's 8 bits under "learned"; learned like any activation under "all"
        assert rows["learned"][n]["fixed"] and rows["learned"][n]["bits"] == 8
        assert not rows["all"][n]["fixed"]
    a = reps["learned"]["achieved"]
    bits = {n: r["bits"] for n, r in rows["learned"].items()}
    sizes = {n: r["size"] for n, r in rows["learned"].items()}
    kinds = {n: r["kind"] for n, r in rows["learned"].items()}
    learned = frozenset(n for n, r in rows["learned"].items() if not r["fixed"])
    for kind, key in (("weight", "weight_bits"), ("act", "act_bits")):
        assert abs(a[key] - 4.0) <= 0.05, a
        every = Costs(sizes=sizes, kinds=kinds)
        scoped = Costs(sizes=sizes, kinds=kinds, counted=learned)
        assert a[key] == round(average_bits(bits, scoped, kind), 4)
        assert a[f"{key}_all"] == round(average_bits(bits, every, kind), 4) > a[key]  # the 8-bit ones count
        uniform = {n: (4 if n in learned else b) for n, b in bits.items()}
        assert average_bits(uniform, scoped, kind) == pytest.approx(4.0)
        assert average_bits(uniform, every, kind) > 4.0
    assert "weight_bits_all" not in reps["all"]["achieved"]


def test_budget_over_learned_keeps_its_scope_on_the_deployed_widths(tiny):
    """With `--max-bits 16` the report's deployed averages (float layers at 16) count the same quantizers the
    budget counted, as under `all`, and name the network's real ones beside them."""
    model, data = tiny
    kw = dict(target_bits=8.0, init_bits=12.0, epochs=1, final_epochs=1, batch_size=16, tolerance=6.0, max_bits=16)
    rep = qat_train(model, QATConfig(budget_over="learned", **kw), data, progress=False).mixq_qat_report
    assert rep["float_layers"]
    a, d = rep["achieved"], rep["deployed"]
    for key in ("weight_bits", "act_bits", "weight_bits_all", "act_bits_all"):
        assert abs(d[key] - a[key]) < 0.01, (key, a, d)
    assert d["weight_bits"] != d["weight_bits_all"]  # the fixed 8-bit first/last layers are outside one of them


def test_budget_over_learned_refuses_a_model_whose_policy_fixes_every_layer():
    """Conv, pool, Linear: the first/last-layer policy fixes both layers, so nothing learns its bits and a
    learned-quantizer average does not exist; under `all` the fixed 8 bits cannot reach 4 either."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pool, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1), \
                torch.nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))

    torch.manual_seed(0)
    data = TrainData(torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 10,
                     "random")
    with pytest.raises(MixqError, match="no weight quantizer of this model learns its bits"):
        qat_train(Net().eval(), QATConfig(target_bits=4.0, budget_over="learned", epochs=1), data, progress=False)
    with pytest.raises(MixqError, match="out of reach"):
        qat_train(Net().eval(), QATConfig(target_bits=4.0, epochs=1), data, progress=False)
    with pytest.raises(MixqError, match="with --first-last-bits 0 none is fixed"):
        QATConfig(target_bits=4.0, budget_over="learned", first_last_bits=0).validate()


# ----------------------------------------------------------------------------- frozen grids
def test_after_the_final_phase_every_weight_and_activation_is_on_its_frozen_grid(tiny):
    model, data = tiny
    cfg = QATConfig(target_bits=4.0, epochs=1, final_epochs=1, batch_size=16)
    q = qat_train(model, cfg, data, progress=False)
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out: seen.__setitem__(mod.name, out.detach()))
             for m in q.modules() if isinstance(m, ActQuantizer)]
    with torch.no_grad():
        q(data.inputs[:8])
    for h in hooks:
        h.remove()
    costs = measure_costs(q)
    bits = {}
    for name, qz in quantizers(q).items():
        assert type(qz) in (WeightQuantizer, ActQuantizer)  # plain quantizers again
        lo, hi = qz.spec.grid()
        bits[name] = qz.bits
        if isinstance(qz, WeightQuantizer):
            assert qz.mode == "int"
            codes = qz.int_weight.float()
            layer = next(m for m in q.modules() if getattr(m, "weight_quantizer", None) is qz)
            w = qz(layer.weight)
            assert torch.equal(w, codes * qz.scale.view(-1, *[1] * (w.ndim - 1)))
        else:
            codes = torch.round(seen[name] / qz.scale)
            assert torch.equal(seen[name], codes * qz.scale), name  # an integer multiple of its step
        assert codes.min() >= lo and codes.max() <= hi, name
    assert abs(average_bits(bits, costs, "weight") - 4.0) <= 0.05
    assert q.mixq_qat_report["achieved"]["weight_bits"] == round(average_bits(bits, costs, "weight"), 4)


# ----------------------------------------------------------------------------- --max-bits 16: float layers
def test_max_bits_16_leaves_layers_above_8_bits_float_through_the_folder_and_export(tiny, tmp_path):
    from mixq_onnx.onnx import export_qdq
    from mixq_onnx.onnx.check import check_model
    from mixq_onnx.onnx.verify import verify_onnx
    from mixq_onnx.quant import load_quantized, save_quantized
    from mixq_onnx.quant.modules import QUANT_LAYERS

    model, data = tiny
    # one epoch from 12 bits leaves every learned width near 12, so no layer is paid for by bits the others left
    # unused; a wide rounding tolerance gives the budget that room (a float layer counts 16 bits)
    kw = dict(target_bits=8.0, init_bits=12.0, epochs=1, final_epochs=1, batch_size=16, tolerance=3.0)
    q = qat_train(model, QATConfig(max_bits=16, **kw), data, progress=False)
    rep = q.mixq_qat_report
    floats = [f["name"] for f in rep["float_layers"]]
    assert floats and tuple(floats) == q.mixq_float_layers == q.mixq_config.float_layers
    for f in rep["float_layers"]:  # each learned more than 8.5 bits in its weights or its input; ships at 16
        assert max(f["learned_weight_bits"], f["learned_input_bits"] or 0) > 8.5, f
        assert f["weight_bits"] == 16
    mods = dict(q.named_modules())
    assert all(type(mods[n]) in (torch.nn.Conv2d, torch.nn.Linear) for n in floats)  # float modules now
    assert all(2 <= qz.bits <= 8 for qz in quantizers(q).values())
    kept = [m.name for m in q.modules() if isinstance(m, QUANT_LAYERS)]
    assert kept and not set(kept) & set(floats)
    assert [ly["name"] for ly in rep["layers"] if ly.get("float")] == floats
    # the budget holds on the deployed widths (float layers at 16), as the shipped model's quantizers count them
    assert rep["achieved"]["weight_bits"] <= 8 + 3.0 and rep["achieved"]["act_bits"] <= 8 + 3.0
    assert abs(rep["deployed"]["weight_bits"] - rep["achieved"]["weight_bits"]) < 0.01
    # the checkpoint's weights in the float layers (the folder rebuilds float parameters from it)
    prepared = dict(prepare(model, q.mixq_config).named_modules())
    for n in floats:
        assert torch.equal(mods[n].weight, prepared[n].weight), n

    save_quantized(q, tmp_path / "q")
    back = load_quantized(model, tmp_path / "q")
    x = data.inputs[:16]
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    onnx_path = export_qdq(back, tmp_path / "q.onnx")
    vs = check_model(onnx_path)
    assert not [v for v in vs if v.severity == "error"], vs
    assert sorted(v.node.split("/")[0] for v in vs if v.rule == "float-layer") == sorted(floats)
    rep_v = verify_onnx(onnx_path, back, PIXELS)  # uint8 images: verify preprocesses them
    assert rep_v.top1_agreement == 100.0 and not rep_v.failures()

    capped = qat_train(model, QATConfig(max_bits=8, **kw), data, progress=False)
    assert "float_layers" not in capped.mixq_qat_report and not capped.mixq_float_layers
    # at the usual tolerance no learned width below 8 leaves room for a layer at 16: none stays float
    tight = qat_train(model, QATConfig(max_bits=16, **{**kw, "tolerance": 0.05}), data, progress=False)
    assert not tight.mixq_float_layers and abs(tight.mixq_qat_report["achieved"]["weight_bits"] - 8) <= 0.05


def test_float_layers_are_paid_for_by_bits_the_others_left_unused():
    """`round_with_float_layers`: a layer that learned above 8 ships at 16 bits only while the rest, at their own
    learned widths, keep the deployed averages on the budget; the one that learned least above 8 yields first."""
    from mixq_onnx.qat.budget import round_with_float_layers

    costs = Costs()
    cont = {"l1.w": 11.6, "l1.a": 11.4, "l2.w": 9.3, "l2.a": 4.0, "l3.w": 4.0, "l3.a": 6.0}
    for layer, size in (("l1", 100), ("l2", 100), ("l3", 200)):
        for kind, suffix in (("weight", "w"), ("act", "a")):
            costs.kinds[f"{layer}.{suffix}"], costs.sizes[f"{layer}.{suffix}"] = kind, size
        costs.layers.append((layer, f"{layer}.w", f"{layer}.a", 1000))
    cfg = QATConfig(target_bits=8.0, max_bits=16)
    bits, moves = round_with_float_layers(cont, list(cont), {}, costs, cfg)
    # both l1 and l2 at 16 would put the weights at 10 bits; l2 learned less above 8 (130 against 700 bit-sizes)
    assert bits == {"l1.w": 16, "l1.a": 16, "l2.w": 8, "l2.a": 4, "l3.w": 4, "l3.a": 6} and not moves
    assert average_bits(bits, costs, "weight") == average_bits(bits, costs, "act") == 8.0
    # a tighter target leaves no room: every width back to INT8 and the rounding does the rest
    bits, _ = round_with_float_layers(cont, list(cont), {}, costs, QATConfig(target_bits=6.0, max_bits=16))
    assert max(bits.values()) <= 8 and abs(average_bits(bits, costs, "weight") - 6.0) <= 0.05
    # two layers that read one input quantizer ship float together: l3 would ride along with l2 at 16 bits,
    # so the pair has to fit as a pair (alone, l2 would fit: weights (3 + 16 + 5) / 3 = 8)
    shared = Costs()
    for name, kind, size in (("l1.w", "weight", 100), ("l1.a", "act", 300), ("l2.w", "weight", 100),
                             ("l3.w", "weight", 100), ("x.a", "act", 100)):
        shared.kinds[name], shared.sizes[name] = kind, size
    shared.layers += [("l1", "l1.w", "l1.a", 1000), ("l2", "l2.w", "x.a", 1000), ("l3", "l3.w", "x.a", 1000)]
    cont2 = {"l1.w": 3.0, "l1.a": 5.0, "l2.w": 11.0, "l3.w": 5.0, "x.a": 7.0}
    bits, _ = round_with_float_layers(cont2, list(cont2), {}, shared, QATConfig(target_bits=8.0, max_bits=16))
    assert max(bits.values()) <= 8, bits


# ----------------------------------------------------------------------------- CLI
def test_qat_end_to_end_then_eval_export_check_verify(world, tmp_path, run_cli):
    root, cache = world
    out = tmp_path / "nipq"
    r = run_cli("qat", *TINY, "--data", cache, "--target-bits", "4", "--epochs", "1", "--final-epochs", "1",
                "--batch-size", "16", "--max-update", "0.005", "--init-bits", "7", "--out", out)
    assert r.code == 0, r.err
    assert r.last_line == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["bits.png", "qat.json", "quant.json", "weights.safetensors"]
    assert (out / "bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads((out / "qat.json").read_text())
    assert rep["method"] == "nipq" and rep["mode"] == "data-free (KD)" and rep["target"] == {"bits": 4.0}
    assert rep["config"]["max_update"] == 0.005 and rep["config"]["init_bits"] == 7.0
    assert abs(rep["achieved"]["weight_bits"] - 4) <= 0.05 and abs(rep["achieved"]["act_bits"] - 4) <= 0.05
    assert all("alpha" in q and "learned_bits" in q for q in rep["quantizers"])
    assert "nipq: weights" in r.err and "GBOPs" in r.err and "qat:" in r.err.splitlines()[-1]
    meta = json.loads((out / "quant.json").read_text())
    wbits = {q["bits"] for q in meta["quantizers"] if q["kind"] == "weight"}
    assert len(wbits) >= 2, wbits  # mixed precision, one record per quantizer
    assert run_cli("eval", "--quantized", out, "--data", root / "data.npz").code == 0

    # labelled data with CE (+ KD), the LSQ baseline: weights 3 bits beside activations 5 bits (first/last 8)
    lsq = tmp_path / "lsq"
    r = run_cli("qat", *TINY, "--data", root / "data.npz", "--method", "lsq", "--wbits", "3", "--abits", "5",
                "--loss", "kd", "--epochs", "1", "--final-epochs", "1", "--batch-size", "16", "--out", lsq, "-q")
    assert r.code == 0, r.err
    meta = json.loads((lsq / "quant.json").read_text())
    assert {q["bits"] for q in meta["quantizers"]} == {3, 5, 8}
    assert json.loads((lsq / "qat.json").read_text())["mode"] == "labelled"
    for folder in (out, lsq):
        onnx_path = tmp_path / f"{folder.name}.onnx"
        assert run_cli("export", "--quantized", folder, "--out", onnx_path).code == 0
        assert run_cli("check", onnx_path).code == 0
        r = run_cli("verify", onnx_path, "--quantized", folder, "--data", root / "data.npz", "--json")
        assert r.code == 0, r.err
        v = json.loads(r.last_line)
        assert v["layout"] == "integer" and v["max_abs_diff"] == 0.0 and v["propagated_code_mismatch"] == 0.0, v

    # --overwrite replaces our files and keeps the user's; without it a non-empty folder is refused
    (lsq / "notes.txt").write_text("mine")
    msg = one_line_error(run_cli("qat", *TINY, "--data", cache, "--method", "lsq", "--epochs", "1", "--out", lsq, "-q"))
    assert "not empty" in msg and "--overwrite" in msg
    r = run_cli("qat", *TINY, "--data", cache, "--method", "lsq", "--epochs", "1", "--final-epochs", "0",
                "--out", lsq, "--overwrite", "-q")
    assert r.code == 0, r.err
    assert (lsq / "notes.txt").read_text() == "mine"
    assert {q["bits"] for q in json.loads((lsq / "quant.json").read_text())["quantizers"]} == {4, 8}


@pytest.mark.parametrize("args,needle", [
    (["--target-bits", "1.5"], "--target-bits must be between 2 and 8"),
    (["--target-bits", "8.5"], "--target-bits must be between 2 and 8"),
    (["--target-bits", "4", "--target-gbops", "1"], "not both"),
    ([], "needs a budget"),
    (["--target-bits", "4", "--epochs", "0"], "--epochs must be at least 1"),
    (["--target-bits", "4", "--max-bits", "1"], "--max-bits must be between 2 and 8"),
    (["--target-bits", "4", "--max-bits", "12"], "--max-bits must be between 2 and 8, or 16"),
    (["--target-bits", "4", "--wbits", "4"], "nipq learns them"),
    (["--method", "lsq", "--target-bits", "4"], "budgets of --method nipq"),
    (["--target-bits", "4", "--loss", "ce"], "--loss ce needs labels"),
    (["--target-bits", "2", "--first-last-bits", "8"], "out of reach"),
    (["--target-bits", "4", "--max-update", "0"], "--max-update must be positive"),
    (["--target-bits", "4", "--budget-rate", "-1"], "--budget-rate must be >= 0"),
    (["--target-bits", "4", "--range-init", "max"], "--range-init"),
    (["--target-bits", "4", "--schedule", "cyclic"], "--schedule"),
    (["--target-bits", "4", "--augment", "mixup"], "--augment"),
    (["--target-bits", "4", "--init-bits", "14"], "--init-bits must be in [2, 14)"),
    (["--target-bits", "4", "--init-bits", "nan"], "'nan' is not a finite number"),  # the CLI's FINITE type
    (["--target-bits", "4", "--lr", "inf"], "'inf' is not a finite number"),
    (["--target-gbops", "0.05", "--budget-over", "learned"], "GBOPs count every layer"),
    (["--method", "lsq", "--budget-over", "learned"], "--budget-over is not read by --method lsq"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_input_is_one_line_exit_2_and_no_output(world, tmp_path, run_cli, args, needle):
    root, cache = world
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    line = one_line_error(run_cli("qat", *TINY, "--data", cache, "--out", out, "--epochs", "1", *args))
    assert needle in line, line
    assert not out.exists() and snapshot(tmp_path) == before


def test_the_config_itself_refuses_nan_without_the_cli():
    with pytest.raises(MixqError, match=r"--init-bits must be in \[2, 14\)"):
        QATConfig(target_bits=4, init_bits=float("nan")).validate()
    with pytest.raises(MixqError, match="--lr must be positive"):
        QATConfig(target_bits=4, lr=float("nan")).validate()


def test_nipq_initial_activation_range_covers_an_input_that_is_not_normalised(tiny):
    """ResNet-8 takes raw 0..255 pixels: NIPQ's fixed initial range (3 for a signed input) would clip them in
    the noise phase. Started from the observed range, the 8-bit student matches its teacher in the noise
    phase (distillation loss near 0); clipped at 3, it would not (measured here against a clipped input)."""
    import copy

    model, data = tiny
    big = TrainData(data.inputs * 100.0, None, "random x100")
    cfg = QATConfig(target_bits=8.0, epochs=1, final_epochs=0, batch_size=16, lr=1e-8, qlr=1e-8,
                    first_last_bits=None)
    q = qat_train(model, cfg, big, progress=False)
    kd = q.mixq_qat_report["train"][0]["epochs"][0]["kd"]
    # the same loss when the input really is clipped to the default range: the student sees clamp(x, -3, 3)
    clipped = copy.deepcopy(model)
    with torch.no_grad():
        t = model(big.inputs[:16])
        s = clipped(big.inputs[:16].clamp(-3, 3))
    from mixq_onnx.training import kd_loss

    assert kd < 0.05 * float(kd_loss(s, t, cfg.temperature)), kd


def test_continuous_schedule_gives_each_phase_its_slice_of_one_cosine():
    """`--schedule continuous`: the phases are consecutive slices of one cosine, as the official NIPQ scheduler;
    the training loop really anneals along the slice it is given (measured on the weight displacement)."""
    from mixq_onnx.training import TrainConfig, train

    assert QATConfig(epochs=6, final_epochs=2).lr_windows() == ((0.0, 1.0), (0.0, 1.0))
    assert QATConfig(epochs=6, final_epochs=2, schedule="continuous").lr_windows() == ((0.0, 0.75), (0.75, 1.0))
    assert QATConfig(epochs=6, final_epochs=0, schedule="continuous").lr_windows()[0] == (0.0, 1.0)
    with pytest.raises(MixqError, match="--schedule"):
        QATConfig(method="lsq", schedule="cyclic").validate()
    with pytest.raises(MixqError, match="lr window"):
        TrainConfig(lr_window=(0.5, 0.5)).validate()

    class Fixed(torch.nn.Module):  # logits that do not depend on w: w moves by the extra loss sum(w) alone
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :10]

    data = TrainData(torch.randn(40, 1, 4, 4), torch.arange(40) % 10, "random")
    for window in ((0.0, 1.0), (0.75, 1.0), (0.25, 0.5)):
        m = Fixed()
        cfg = TrainConfig(epochs=3, lr=0.1, batch_size=8, kd_weight=0.0, lr_window=window)
        train(m, data, cfg, extra_loss=lambda mod: {"lin": mod.w.sum()}, params=[m.w], progress=False)
        total, buf, want = 15, 0.0, 0.0  # SGD momentum 0.9 on a constant gradient of 1
        for t in range(total):
            buf = 0.9 * buf + 1.0
            want -= 0.1 * 0.5 * (1 + math.cos(math.pi * (window[0] + (window[1] - window[0]) * t / total))) * buf
        assert float(m.w.detach()) == pytest.approx(want, rel=1e-5), window


@pytest.mark.parametrize("method", ["nipq", "lsq"])
def test_train_biases_learns_the_biases_and_the_folder_carries_them_bit_exact(tiny, tmp_path, method):
    """`--train-biases`: the quantized layers' (folded) biases move with the weights; the result folder stores
    them, so the rebuilt model, its export and verify all use the trained ones; without it they stay the
    checkpoint's and the folder stores none. A damaged stored bias is refused, not loaded."""
    from safetensors.torch import load, save

    from mixq_onnx.onnx import export_qdq
    from mixq_onnx.onnx.verify import verify_onnx
    from mixq_onnx.quant import load_quantized, save_quantized
    from mixq_onnx.quant.modules import QUANT_LAYERS

    model, data = tiny
    kw = dict(epochs=1, final_epochs=1, batch_size=16, lr=0.05)
    kw.update(target_bits=4.0, init_bits=6.0) if method == "nipq" else kw.update(method="lsq")
    q = qat_train(model, QATConfig(train_biases=True, **kw), data, progress=False)
    plain = qat_train(model, QATConfig(train_biases=False, **kw), data, progress=False)
    ref = {m.name: m.bias for m in prepare(model, q.mixq_config).modules() if isinstance(m, QUANT_LAYERS)}
    got = {m.name: m.bias for m in q.modules() if isinstance(m, QUANT_LAYERS) and m.bias is not None}
    assert set(q.mixq_trained_biases) == set(got) and got
    assert all(not torch.equal(got[n], ref[n]) for n in got)  # every bias moved
    assert all(torch.equal(m.bias, ref[m.name]) for m in plain.modules() if isinstance(m, QUANT_LAYERS) and m.bias is not None)

    save_quantized(q, tmp_path / "q")
    save_quantized(plain, tmp_path / "plain")
    meta = json.loads((tmp_path / "q" / "quant.json").read_text())
    assert sorted(meta["trained_biases"]) == sorted(got)
    assert "trained_biases" not in json.loads((tmp_path / "plain" / "quant.json").read_text())
    back = load_quantized(model, tmp_path / "q")
    x = data.inputs[:16]
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    onnx_path = export_qdq(back, tmp_path / "q.onnx")
    rep = verify_onnx(onnx_path, back, PIXELS)  # uint8 images: verify preprocesses them
    assert rep.top1_agreement == 100.0 and rep.max_abs_diff == 0.0 and not rep.failures()

    # a stored bias of the wrong shape, or one that is not finite, is a one-line error naming the layer
    name = sorted(got)[0]
    wpath = tmp_path / "q" / "weights.safetensors"
    for bad in (torch.zeros(3), torch.full_like(got[name], float("nan"))):
        ts = load(wpath.read_bytes())
        ts[f"{name}.bias"] = bad
        blob = save(ts, metadata={"format": "1"})
        import hashlib

        meta["weights_sha256"] = hashlib.sha256(blob).hexdigest()
        d = tmp_path / f"bad{bad.numel()}"
        d.mkdir()
        (d / "weights.safetensors").write_bytes(blob)
        (d / "quant.json").write_text(json.dumps(meta))
        with pytest.raises(MixqError, match=f"trained bias of {name}"):
            load_quantized(model, d)


def test_ranges_start_from_every_class_of_a_class_sorted_file(tiny):
    """The sign/range sample and the freeze's activation sample were the first 256 / 512 images: in a
    class-sorted file (cifar10_train_calib.npz) one class only (review, 2026-11-30). Here class 0 is dim and
    class 1 bright, sorted: the input's initial range must see the bright half."""
    model, _ = tiny
    g = torch.Generator().manual_seed(3)
    x = torch.cat([0.01 * torch.randn(300, 3, 32, 32, generator=g), 8 * torch.randn(300, 3, 32, 32, generator=g)])
    data = TrainData(x, torch.cat([torch.zeros(300), torch.ones(300)]).long(), "sorted")
    cfg = QATConfig(target_bits=8.0, epochs=1, final_epochs=0, batch_size=64, lr=1e-8, qlr=1e-8)
    rep = qat_train(model, cfg, data, progress=False).mixq_qat_report
    first = next(r for r in rep["quantizers"] if r["kind"] == "act")
    assert first["alpha_init"] > 10, first  # |x| up to ~25 in the bright class; the dim one alone gave 3
