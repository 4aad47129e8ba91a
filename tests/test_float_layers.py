"""`quantize --float-layers`: named Conv2d/Linear layers stay float (no quantizer), through quant.json, the
export (no Q/DQ, tagged `mixq.float_layer`), `check` (a warning, not the unquantized-layer errors), `verify`
and the engine (`inspect`: intended "float")."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from conftest import one_line_error

from mixq_onnx.errors import MixqError
from mixq_onnx.models import get_preprocessing, load_model
from mixq_onnx.onnx import export_qdq
from mixq_onnx.onnx.check import check_model
from mixq_onnx.onnx.graph import FLOAT_LAYER_KEY
from mixq_onnx.onnx.verify import verify_onnx
from mixq_onnx.quant import QuantConfig, load_quantized, prepare, quantize, quantizers, save_quantized
from mixq_onnx.quant.modules import QuantLinear, QuantPool

FLOATS = ("layer3.2.conv2", "linear")


def _r20() -> nn.Module:
    return load_model("cifar_resnet20", random_init=True).eval()


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_config_records_float_layers_only_when_set():
    cfg = QuantConfig(float_layers=["linear", "layer3.*.conv2"])
    d = cfg.to_dict()
    assert d["float_layers"] == ["linear", "layer3.*.conv2"] and list(d)[-1] == "extra"
    assert QuantConfig.from_dict(d).float_layers == ("linear", "layer3.*.conv2")
    assert "float_layers" not in QuantConfig().to_dict()  # older files stay the same byte for byte
    assert QuantConfig.from_dict(QuantConfig().to_dict()).float_layers == ()
    for bad in ("", " ", "a,b"):
        with pytest.raises(MixqError, match="--float-layers"):
            QuantConfig(float_layers=(bad,)).validate()
    with pytest.raises(MixqError, match="float_layers must be a list"):
        QuantConfig.from_dict({**d, "float_layers": "linear"})


def test_prepare_leaves_the_layers_float_and_the_ends_to_the_network():
    gm = prepare(_r20(), QuantConfig(wbits=4, abits=4, float_layers=("linear", "layer3.2.conv*")))
    assert isinstance(gm.linear, nn.Linear) and not isinstance(gm.linear, QuantLinear)
    assert type(gm.get_submodule("layer3.2.conv2")) is nn.Conv2d
    assert gm.mixq_float_layers == ("layer3.2.conv1", "layer3.2.conv2", "linear")
    qs = quantizers(gm)
    assert not any(n.startswith(("linear.", "layer3.2.conv", "pool.")) for n in qs)
    assert not any(isinstance(m, QuantPool) for m in gm.modules())  # the pool feeds a float layer
    # first/last policy: the network's first layer is 8-bit; its last is float, so the last quantized conv
    # keeps the base width instead of inheriting the policy
    assert qs["conv1.weight"].bits == 8 and gm.mixq_first_last == ("conv1",)
    assert qs["layer3.1.conv2.weight"].bits == 4


def test_a_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(MixqError, match=r"--float-layers 'fc' matches no Conv2d/Linear layer .*layer1\.0\.conv1"):
        prepare(_r20(), QuantConfig(float_layers=("fc",)))


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("float_layers")
    model = _r20()
    calib = get_preprocessing(model)(_images(32, seed=1))
    q = quantize(model, QuantConfig(wbits=4, abits=4, method="rtn", scale_grid=10, float_layers=FLOATS), calib,
                 progress=False)
    save_quantized(q, tmp / "q")
    onnx_path = export_qdq(load_quantized(_r20(), tmp / "q"), tmp / "q.onnx")
    return tmp / "q", onnx_path


def test_float_layers_survive_save_load_and_export(float_folder):
    qdir, onnx_path = float_folder
    meta = json.loads((qdir / "quant.json").read_text())
    assert meta["config"]["float_layers"] == list(FLOATS)
    assert not any(r["name"].startswith(("linear.", "layer3.2.conv2.", "pool.")) for r in meta["quantizers"])
    m = onnx.load(onnx_path)
    tagged = {n.name: {p.key: p.value for p in n.metadata_props}.get(FLOAT_LAYER_KEY) for n in m.graph.node
              if n.op_type in ("Conv", "Gemm")}
    assert {k: v for k, v in tagged.items() if v} == {"layer3.2.conv2/Conv": "layer3.2.conv2", "linear/Gemm": "linear"}
    assert sum(v is None for v in tagged.values()) == 18  # 19 convs and the classifier, two float
    inits = {i.name for i in m.graph.initializer}
    assert {"linear.weight", "layer3.2.conv2.weight"} <= inits  # float weights, no integer codes for them
    counts = json.loads(next(p.value for p in m.metadata_props if p.key == "mixq.counts"))
    assert counts["float_layers"] == 2


def test_check_warns_on_float_layers_and_errors_on_a_missing_qdq(float_folder, tmp_path):
    _, onnx_path = float_folder
    vs = check_model(onnx_path)
    assert not [v for v in vs if v.severity == "error"], vs
    assert sorted(v.node for v in vs if v.rule == "float-layer") == ["layer3.2.conv2/Conv", "linear/Gemm"]
    # the same graph without the tags: the float layers are missing Q/DQ again
    m = onnx.load(onnx_path)
    for n in m.graph.node:
        keep = [p for p in n.metadata_props if p.key != FLOAT_LAYER_KEY]
        del n.metadata_props[:]
        n.metadata_props.extend(keep)
    onnx.save(m, tmp_path / "untagged.onnx")
    rules = {v.rule for v in check_model(tmp_path / "untagged.onnx") if v.severity == "error"}
    assert {"unquantized-input", "unquantized-weight", "residual-identity"} <= rules


def test_verify_float_layers_exact_enough(float_folder):
    qdir, onnx_path = float_folder
    model = load_quantized(_r20(), qdir)
    rep = verify_onnx(onnx_path, model, _images(48, seed=3))  # pixels: verify applies the preprocessing
    assert rep.top1_agreement == 100.0 and not rep.failures()
    assert rep.max_abs_diff < 1e-3  # the float tail (layer3.2.conv2, pool, linear) sums in its own order


def test_cli_float_layers(tmp_path, run_cli):
    r = run_cli("calib", "--generator", "noise", "--size", "32", "--num", "8", "--cache-root", tmp_path / "c", "-q")
    cache = r.last_line
    base = ["quantize", "--model", "cifar_resnet20", "--random-weights", "--calib", cache, "--method", "rtn",
            "--wbits", "8", "--abits", "8", "-q"]
    bad = run_cli(*base, "--float-layers", "fc", "--out", tmp_path / "bad")
    assert "matches no Conv2d/Linear layer" in one_line_error(bad) and not (tmp_path / "bad").exists()
    ok = run_cli(*base, "--float-layers", "linear", "--out", tmp_path / "q")
    assert ok.code == 0, ok.err
    meta = json.loads((tmp_path / "q" / "quant.json").read_text())
    assert meta["config"]["float_layers"] == ["linear"] and meta["report"]["float_layers"] == ["linear"]


def test_engine_runs_the_float_layer_in_float(float_folder, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 not installed (pip install 'mixq-onnx[trt-rtx]')")
    from mixq_onnx.trt.builder import BuildConfig, build_engine
    from mixq_onnx.trt.inspect import inspect_plan

    _, onnx_path = float_folder
    plan = tmp_path / "q.plan"
    build_engine(onnx_path, plan, BuildConfig(backend="tensorrt-rtx", batch=(1, 8, 32)))
    rep = inspect_plan(plan, onnx_path)
    grids = {c.node: c.bits for c in rep.compute}
    assert grids["linear/Gemm"] == grids["layer3.2.conv2/Conv"] == "float"
    assert sum(g == "w4a4" for g in grids.values()) == 17 and grids["conv1/Conv"] == "w8a8"
    assert all(c.precision == "int8" for c in rep.compute if c.bits != "float")
    assert 0.9 < rep.int8_mac_fraction < 1.0  # layer3.2.conv2's MACs run in float
    assert np.isfinite(rep.int8_mac_fraction)
    # the float layers read float tensors from non-compute kernels by design: their precision, not hand-offs
    float_layers = {c.layer for c in rep.compute if c.bits == "float"}
    by_name = {li["name"]: li for li in rep.layers}
    assert len(float_layers) == 2 and all("Float" in by_name[n]["inputs"] for n in float_layers)
    assert not [h for h in rep.float_handoffs if h["to"] in float_layers], rep.handoff_lines()


def test_float_linears_of_a_vit_are_found_in_the_graph(tmp_path):
    """A Linear on 3-D input exports as a MatMul on a transposed constant (not `<module>.weight`), and a plain
    layer inside a traced block has only the block in its namespace: the exporter finds it by its weight."""
    model = load_model("test_vit", random_init=True, input_size=64).eval()
    x = get_preprocessing(model)(torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8,
                                               generator=torch.Generator().manual_seed(0)))
    floats = ("blocks.0.mlp.fc1", "blocks.0.attn.qkv", "head")
    q = quantize(model, QuantConfig(wbits=8, abits=8, method="rtn", scale_grid=5, float_layers=floats), x,
                 progress=False)
    p = export_qdq(q, tmp_path / "vit.onnx")
    m = onnx.load(p)
    tagged = {n.name: {pp.key: pp.value for pp in n.metadata_props}[FLOAT_LAYER_KEY] for n in m.graph.node
              if any(pp.key == FLOAT_LAYER_KEY for pp in n.metadata_props)}
    assert sorted(tagged.values()) == sorted(floats), tagged
    assert {n.split("/")[0] for n in tagged} == set(floats)  # named after their modules
    assert not [v for v in check_model(p) if v.severity == "error"]
