"""Registries: methods, filters, prompt strategies, block types. A method registered from outside the package
(here, in this test) runs through the library and the CLI with no other file changed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from mixq_onnx.cli import cli
from mixq_onnx.errors import MixqError
from mixq_onnx.methods import METHODS, PRESETS, Method, Phase, register_method
from mixq_onnx.models import load_model
from mixq_onnx.quant import QuantConfig, ReconParams, load_quantized, quantize, save_quantized
from mixq_onnx.registry import FILTERS, PROMPT_STRATEGIES, Registry, resolve

QDROP_DICT = {"wbits": 4, "abits": 4, "method": "qdrop", "symmetric": True, "first_last_bits": 8, "preset": "fast",
              "iters": 100, "batch_size": 32, "num_samples": 1024, "lr_round": 0.003, "lr_act": 0.0004,
              "lr_wscale": 0.0001, "round_weight": 0.01, "drop_prob": 0.5, "warmup": 0.2, "beta": [20.0, 2.0],
              "p_norm": 2.4, "scale_grid": 80, "block_size": None, "holdout": 0.1, "seed": 0, "extra": {}}


@pytest.fixture
def qdrop_nodrop():
    """A throwaway method, registered the way a plugin would: qdrop's phase without QDrop."""

    @register_method
    class QDropNoDrop(Method):
        name = "qdrop-nodrop"
        help = "qdrop without QDrop: rounding and LSQ step sizes jointly"
        phases = (Phase(learn_round=True, learn_act=True),)

    yield QDropNoDrop
    METHODS.unregister("qdrop-nodrop")


def _option(command: str, name: str):
    return next(p for p in cli.commands[command].params if p.name == name)


def test_registered_method_runs_like_its_definition(qdrop_nodrop, tmp_path):
    """qdrop-nodrop must be exactly qdrop with drop_prob 0: the registry entry alone drives the run."""
    torch.set_num_threads(1)
    model = load_model("cifar_resnet20", random_init=True)
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(wbits=4, abits=4, iters=2, batch_size=4)
    mine = quantize(model, QuantConfig(method="qdrop-nodrop", **kw), calib, progress=False)
    ref = quantize(model, QuantConfig(method="qdrop", drop_prob=0.0, **kw), calib, progress=False)
    a, b = mine.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rep = mine.mixq_report
    assert rep["method"] == "qdrop-nodrop" and len(rep["units"]) >= 10
    assert all(u["iters"] == 2 and u["grad_round"] and u["grad_ascale"] and not u["grad_wscale"] for u in rep["units"])
    save_quantized(mine, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "quant.json").read_text())["config"]["method"] == "qdrop-nodrop"
    again = load_quantized(load_model("cifar_resnet20", random_init=True), tmp_path / "q")
    assert torch.equal(again(calib[:2]), mine(calib[:2]))


def test_registered_method_through_the_cli(qdrop_nodrop, tmp_path, run_cli):
    assert "qdrop-nodrop" in _option("quantize", "method").type.choices
    r = run_cli("quantize", "--help")
    assert r.code == 0 and "qdrop-nodrop" in r.out
    r = run_cli("calib", "--generator", "noise", "--num", "16", "--size", "32", "--cache-root", tmp_path / "c", "-q")
    assert r.code == 0, r.err
    r = run_cli("quantize", "--model", "cifar_resnet20", "--random-weights", "--calib", r.last_line, "--method",
                "qdrop-nodrop", "--iters", "2", "--batch-size", "4", "--out", tmp_path / "q", "-q")
    assert r.code == 0, r.err
    cfg = json.loads((tmp_path / "q" / "quant.json").read_text())["config"]
    assert cfg["method"] == "qdrop-nodrop" and cfg["iters"] == 2


def test_unknown_method_is_refused_everywhere(run_cli):
    with pytest.raises(MixqError, match="unknown method 'qdrop-nodrop': choose one of rtn, adaround, brecq, qdrop, genie"):
        QuantConfig(method="qdrop-nodrop").validate()
    r = run_cli("quantize", "--model", "cifar_resnet20", "--calib", "x", "--out", "y", "--method", "qdrop-nodrop")
    assert r.code == 2 and "qdrop-nodrop" in r.err


def test_cli_choices_are_the_registries():
    assert list(_option("quantize", "method").type.choices) == list(METHODS) == ["rtn", "adaround", "brecq", "qdrop",
                                                                                   "genie"]
    assert list(_option("quantize", "preset").type.choices) == list(PRESETS)
    assert list(_option("calib", "filter_").type.choices) == list(FILTERS)
    assert list(_option("calib", "strategy").type.choices) == list(PROMPT_STRATEGIES)
    from mixq_onnx.calib.generators import GENERATORS
    from mixq_onnx.registry import GENERATOR_MODULES

    assert list(_option("calib", "generator").type.choices) == list(GENERATOR_MODULES) == list(GENERATORS)


def test_cli_lists_kept_light_match_the_library():
    """Options whose values live in packages that import torch (qat, robust, quant, trt) spell them out in the
    CLI, which loads no torch at start-up; they must stay the library's lists."""
    from mixq_onnx.qat.config import NOISES, QAT_METHODS, RANGE_INITS, SCHEDULES
    from mixq_onnx.quant.config import BLOCK_SIZES
    from mixq_onnx.robust.regularizers import PAIRINGS
    from mixq_onnx.trt.backend import BACKENDS

    for command, name, values in (("qat", "method", QAT_METHODS), ("qat", "noise", NOISES),
                                  ("qat", "schedule", SCHEDULES), ("qat", "range_init", RANGE_INITS),
                                  ("robustify", "symreg_pairing", PAIRINGS),
                                  ("quantize", "block_size", [str(b) for b in BLOCK_SIZES]),
                                  ("export", "block_size", [str(b) for b in BLOCK_SIZES]),
                                  ("build", "backend", list(BACKENDS)), ("run", "backend", list(BACKENDS)),
                                  ("bench", "backend", list(BACKENDS))):
        assert list(_option(command, name).type.choices) == list(values), (command, name)


def test_phases_under_weight_only():
    brecq, qdrop, genie = METHODS["brecq"], METHODS["qdrop"], METHODS["genie"]
    assert len(brecq.phases_for(False)) == 2 and len(brecq.phases_for(True)) == 1  # no LSQ phase without acts
    for m in (qdrop, genie):
        (p,) = m.phases_for(True)
        assert p.learn_round and not (p.learn_act or p.drop or p.acts_on)
    assert genie.phases_for(True)[0].learn_wscale and not qdrop.phases_for(True)[0].learn_wscale
    assert METHODS["rtn"].phases_for(False) == [] and METHODS["adaround"].granularity == "layer"


def test_registry_basics():
    reg: Registry[int] = Registry("thing")
    reg.register("a", 1)
    reg.register("b", 2)
    assert list(reg) == ["a", "b"] and "a" in reg and "c" not in reg and reg["b"] == 2 and len(reg) == 2
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 3)
    with pytest.raises(MixqError, match="unknown thing 'c': choose one of a, b"):
        reg.lookup("c")
    assert reg.unregister("a") == 1 and list(reg) == ["b"]
    assert resolve("mixq_onnx.registry:Registry") is Registry and resolve(len) is len


def test_registry_implementations_resolve():
    from mixq_onnx.calib.classes import load_classes
    from mixq_onnx.calib.prompts import PromptConfig, plan_images
    from mixq_onnx.quant.graph import BLOCK_TYPES, block_types

    for f in FILTERS.values():
        assert callable(resolve(f.score)), f.name
    vocab = load_classes("cifar10")
    for s in PROMPT_STRATEGIES.values():
        plans = plan_images(PromptConfig(s.name), vocab, 0, 3, 7)
        assert [p.index for p in plans] == [3, 4, 5, 6], s.name
        assert all(bool(p.classes) == s.conditioned for p in plans), s.name
        assert all(bool(p.sub_prompts) == s.embeds for p in plans), s.name
    from mixq_onnx.models.cifar_resnet import BasicBlock

    types = block_types()
    assert BasicBlock in types and len(types) <= len(BLOCK_TYPES)


def test_quant_config_parts_and_flat_interface():
    cfg = QuantConfig(wbits=4, abits=4, method="qdrop", iters=100, lr_round=1e-3)
    assert cfg.params == ReconParams(iters=100, lr_round=1e-3) and cfg.iters == 100 and cfg.lr_round == 1e-3
    cfg.iters = 7
    assert cfg.params.iters == 7
    assert QuantConfig(params=ReconParams(iters=3), drop_prob=0.25).params == ReconParams(iters=3, drop_prob=0.25)
    with pytest.raises(TypeError, match="extra"):
        QuantConfig(extra={})
    # quant.json's config: flat, the same keys in the same order, "extra": {} kept
    d = QuantConfig(wbits=4, abits=4, method="qdrop", iters=100).resolved().to_dict()
    # a new config shares quantizers, quantizes pools and places by the current rules: "share_quantizers": true,
    # "integer_pools": true, "placement": 6, just before "extra"
    shared = {**{k: v for k, v in QDROP_DICT.items() if k != "extra"}, "share_quantizers": True,
              "integer_pools": True, "placement": 6, "extra": {}}
    assert d == shared and list(d) == list(shared)
    new = QuantConfig.from_dict(d)
    assert new.share_quantizers and new.integer_pools and new.placement == 6
    assert QuantConfig.from_dict({**d, "placement": 2}).placement == 2  # a revision-2 folder keeps its rules
    assert QuantConfig.from_dict({**d, "placement": 3}).placement == 3
    assert QuantConfig.from_dict({**d, "placement": 4}).placement == 4
    assert QuantConfig.from_dict({**d, "placement": 5}).placement == 5
    # a file written before placement revision 2 reads back with revision 1's rules, and writes itself back as it was
    before = QuantConfig.from_dict({k: v for k, v in d.items() if k != "placement"})
    assert before.share_quantizers and before.placement == 1
    assert list(before.to_dict()) == [k for k in shared if k != "placement"]
    for bad in (7, 0, True, "2"):
        with pytest.raises(MixqError, match="placement must be one of 1, 2, 3, 4, 5, 6"):
            QuantConfig(placement=bad).validate()
    old = QuantConfig.from_dict(QDROP_DICT)  # an old file reads back: one quantizer per consumer, as it recorded
    assert not old.share_quantizers and old.placement == 1 and not old.integer_pools
    assert old.to_dict() == QDROP_DICT and list(old.to_dict()) == list(QDROP_DICT)
    assert QuantConfig(share_quantizers=False, integer_pools=False, placement=1).resolved().to_dict().keys() == \
        QDROP_DICT.keys()
    assert list(QuantConfig(share_quantizers=False, integer_pools=False).resolved().to_dict())[-2:] == ["placement",
                                                                                                        "extra"]
    paper = QuantConfig(preset="paper").resolved()
    assert (paper.iters, paper.lr_round, paper.lr_act, paper.batch_size) == (20000, 1e-3, 4e-5, 32)
    assert QuantConfig(lr_act=1.0).resolved().lr_act == 1.0  # set values win over defaults


def test_light_modules_stay_light():
    heavy = ("torch", "numpy", "onnx", "timm", "safetensors")
    code = ("import sys, mixq_onnx.methods, mixq_onnx.registry; "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, cwd=Path(__file__).parent)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_genie_anneals_its_weight_scales_with_the_steps_and_keeps_the_rounding_rate():
    """Genie's reference puts the weight scales and the activation steps in one Adam under a cosine decay and
    the rounding logits in another at a constant rate: record the rates every optimizer step really used."""
    torch.set_num_threads(1)
    model = load_model("cifar_resnet20", random_init=True)
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    seen: list[dict[float, float]] = []  # per step: {initial lr: lr used}

    def hook(opt, args, kwargs):
        seen.append({g["initial_lr"] if "initial_lr" in g else g["lr"]: g["lr"] for g in opt.param_groups})

    handle = register_optimizer_step_pre_hook(hook)
    try:
        quantize(model, QuantConfig(wbits=4, abits=4, method="genie", iters=8, batch_size=4, lr_round=3e-3,
                                    lr_act=4e-4, lr_wscale=1e-4), calib, progress=False)
    finally:
        handle.remove()
    wscale = [s[1e-4] for s in seen if 1e-4 in s]
    steps = [s[4e-4] for s in seen if 4e-4 in s]
    rounding = [s[3e-3] for s in seen if 3e-3 in s]
    assert wscale and steps and rounding
    assert wscale[0] == pytest.approx(1e-4) and wscale[7] < 0.05 * 1e-4  # 8 iterations: cosine to ~0 at the last
    assert [w / 1e-4 for w in wscale] == pytest.approx([a / 4e-4 for a in steps])  # the same decay
    assert set(rounding) == {3e-3}
