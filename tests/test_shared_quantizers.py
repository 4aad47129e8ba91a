"""One activation quantizer per tensor and grid (issue 15): the placement rule on tiny networks, one Q/DQ per
shared tensor in the export, reconstruction of shared scales, old (per-consumer) result folders, the `check`
warning, and `build --max-handoffs`."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import one_line_error

from mixq_onnx.errors import MixqError
from mixq_onnx.methods import METHODS, Method, Phase, register_method
from mixq_onnx.models import load_model
from mixq_onnx.models.cifar_resnet import CifarResNet
from mixq_onnx.models.preprocessing import ATTR, Preprocessing
from mixq_onnx.onnx import export_qdq
from mixq_onnx.onnx.check import check_model, report
from mixq_onnx.onnx.graph import GraphIndex
from mixq_onnx.onnx.verify import verify_onnx
from mixq_onnx.quant import QuantConfig, load_quantized, quantize, quantizers, save_quantized
from mixq_onnx.quant.graph import (
    Unit,
    assign_owners,
    prepare,
    shared_quantizers,
    tensor_quantizers,
)
from mixq_onnx.quant.modules import QUANT_LAYERS
from mixq_onnx.quant.quantizer import ActQuantizer


def tiny_cifar_resnet() -> torch.nn.Module:
    """ResNet-8 in the He et al. CIFAR layout (one BasicBlock per stage, "option A" shortcuts), random weights."""
    torch.manual_seed(0)
    m = CifarResNet(depth=8).eval()
    setattr(m, ATTR, Preprocessing(input_size=(3, 32, 32)))
    return m


def _model(spec: str) -> torch.nn.Module:
    if spec == "tiny_cifar_resnet":
        return tiny_cifar_resnet()
    size = None if spec.startswith("cifar") else (224 if spec.startswith("deit") else 64)
    return load_model(spec, random_init=True, **({"input_size": size} if size else {}))


def _per_grid(qs) -> Counter:
    return Counter((q.bits, q.symmetric) for q in qs)


# (model, merged quantizers): every residual block input feeds its first conv and the residual add
# (subsampling shortcuts too: their slicing and zero padding commute with quantization); timm's downsampling
# blocks feed conv1 and the downsample conv from one tensor; DeiT's residual stream feeds LayerNorms, which
# are not quantized, so nothing there is shared
CASES = [("tiny_cifar_resnet", 3), ("cifar_resnet20", 9), ("resnet18", 8), ("mobilenetv2_100", 10),
         ("deit_tiny_patch16_224", 0)]


@pytest.mark.parametrize("spec,merged", CASES)
def test_placement_rule_shares_one_quantizer_per_tensor_and_grid(spec, merged):
    torch.set_num_threads(1)
    model = _model(spec)
    off = prepare(model, QuantConfig(wbits=4, abits=4, share_quantizers=False))
    on = prepare(model, QuantConfig(wbits=4, abits=4))
    acts_off = [q for q in quantizers(off).values() if q.kind == "act"]
    acts_on = [q for q in quantizers(on).values() if q.kind == "act"]
    assert len(acts_off) - len(acts_on) == merged
    shared = shared_quantizers(on)
    assert sum(len(v) for v in shared.values()) == merged and len(shared) == merged  # here: pairs
    assert not shared_quantizers(off)
    # per consumer, some tensors carry two quantizers of one grid; shared, every tensor carries at most one
    assert sum(max(_per_grid(qs).values()) > 1 for qs in tensor_quantizers(off).values()) == merged
    assert all(max(_per_grid(qs).values()) == 1 for qs in tensor_quantizers(on).values())
    # a layer's input quantizer keeps its name, and the names it replaces are recorded on it
    for name, others in shared.items():
        assert name.endswith(".input") and all(o not in quantizers(on) for o in others)
        assert {o for o in others} <= {q.name for q in acts_off}
    # the same function either way (float until scales are set)
    x = torch.randn(2, *getattr(model, ATTR).input_size)
    with torch.no_grad():
        assert torch.equal(on(x), off(x))


class TwoConvs(torch.nn.Module):
    """The input image feeds two convolutions; the first in execution order is the "first layer"."""

    def __init__(self):
        super().__init__()
        self.conv_a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv_a(x) + self.conv_b(x)).mean((2, 3)))


def test_only_equal_grids_are_shared():
    """8-bit first layer (the first/last policy) and a 4-bit one on the same tensor keep two quantizers; with
    no policy both are 4-bit and share one. Weight-only configs have no activation quantizer to share."""
    model = TwoConvs().eval()
    setattr(model, ATTR, Preprocessing(input_size=(3, 8, 8)))
    gm = prepare(model, QuantConfig(wbits=4, abits=4, first_last_bits=8))
    assert (gm.conv_a.input_quantizer.bits, gm.conv_b.input_quantizer.bits) == (8, 4)
    assert gm.conv_a.input_quantizer is not gm.conv_b.input_quantizer and not shared_quantizers(gm)
    gm = prepare(model, QuantConfig(wbits=4, abits=4, first_last_bits=None))
    assert gm.conv_a.input_quantizer is gm.conv_b.input_quantizer
    assert shared_quantizers(gm) == {"conv_a.input": ("conv_b.input",)}
    gm = prepare(model, QuantConfig(wbits=4, abits=16, first_last_bits=None))
    assert not shared_quantizers(gm) and all(q.kind == "weight" for q in quantizers(gm).values())


class Fork(torch.nn.Module):
    """HRNet's pattern, small: one tensor feeds a residual block (traced on its own) and a conv of the graph that
    calls the block (a transition); `twice` reuses one block on two tensors (it has no single input)."""

    def __init__(self, twice: bool = False):
        super().__init__()
        from mixq_onnx.models.cifar_resnet import BasicBlock

        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.block = BasicBlock(8, 8)
        self.side = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(16, 10)
        self.twice = twice

    def forward(self, x):
        t = torch.relu(self.bn(self.stem(x)))
        y = self.block(self.block(t) if self.twice else t)
        return self.fc(torch.cat([y, self.side(t)], 1).mean((2, 3)))


def _fork(twice: bool = False) -> torch.nn.Module:
    m = Fork(twice).eval()
    setattr(m, ATTR, Preprocessing(input_size=(3, 8, 8)))
    return m


def test_a_block_input_shares_the_quantizer_of_the_graph_calling_the_block():
    """The block's conv1 input (already one quantizer with its residual identity) and the calling graph's `side`
    input read one tensor on one grid: one quantizer across the block boundary, named after the first layer to
    read it. Placement revision 1 (folders written before) keeps one per traced graph."""
    model = _fork()
    on = prepare(model, QuantConfig(wbits=4, abits=4))
    within = prepare(model, QuantConfig(wbits=4, abits=4, placement=1))
    q = on.block.conv1.input_quantizer
    assert on.side.input_quantizer is q and q.name == "block.conv1.input"
    assert set(q.shared_with) == {"block.add.identity", "side.input"}
    nodes = [on.block.get_submodule(n.target) for n in on.block.graph.nodes if n.op == "call_module"]
    assert [m for m in nodes if isinstance(m, ActQuantizer)] == [q]  # the residual add reads it too
    assert within.side.input_quantizer is not within.block.conv1.input_quantizer
    assert within.block.conv1.input_quantizer.shared_with == ("block.add.identity",)
    assert len([1 for x in quantizers(within).values() if x.kind == "act"]) - \
        len([1 for x in quantizers(on).values() if x.kind == "act"]) == 1
    # one tensor, seen from both graphs: one quantizer per grid with the rule, two without it
    assert all(max(_per_grid(qs).values()) == 1 for qs in tensor_quantizers(on).values())
    assert sum(max(_per_grid(qs).values()) > 1 for qs in tensor_quantizers(within).values()) == 1
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(on(x), within(x))
    # the block (first in execution order) owns it; the side conv's unit uses it as left
    owned = assign_owners([Unit("block", on.block, "block"), Unit("side", on.side, "layer")])
    assert [any(a is q for a in u.act_quantizers()) for u in owned] == [True, False]
    # a block called twice reads two tensors: nothing is shared across its boundary
    twice = prepare(_fork(twice=True), QuantConfig(wbits=4, abits=4))
    assert twice.side.input_quantizer is not twice.block.conv1.input_quantizer


def test_a_quantizer_shared_across_a_block_exports_once_checks_clean_and_round_trips(tmp_path):
    torch.set_num_threads(1)
    model = _fork()
    calib = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    qm = {a: quantize(model, QuantConfig(wbits=4, abits=4, method="rtn", first_last_bits=None,
                                        placement=1 + a), calib, progress=False) for a in (False, True)}
    dup = {}
    for a, m in qm.items():
        path = export_qdq(m, tmp_path / f"m{int(a)}.onnx")
        rep = report(check_model(path))
        dup[a] = [v["node"] for v in rep["violations"] if v["rule"] == "duplicate-qdq"]
        assert rep["ok"]
        images = torch.randint(0, 256, (8, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
        v = verify_onnx(path, m, images)
        assert v.top1_agreement == 100.0 and v.max_abs_diff == 0.0 and v.code_mismatch_fraction == 0.0
    assert dup[True] == [] and len(dup[False]) == 1  # within each graph only: the fork tensor quantized twice
    g = GraphIndex.load(tmp_path / "m1.onnx")
    assert max(Counter(g.quantizer_input(n) for n in g.nodes if n.op_type == "QuantizeLinear").values()) == 1
    # the folder records the rule and the one quantizer; it loads back to the same function
    out = save_quantized(qm[True], tmp_path / "new")
    meta = json.loads((out / "quant.json").read_text())
    assert meta["config"]["placement"] == 2
    rec = {r["name"]: r for r in meta["quantizers"]}
    assert set(rec["block.conv1.input"]["shared_with"]) == {"block.add.identity", "side.input"}
    assert "side.input" not in rec
    again = load_quantized(_fork(), out)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(again(x), qm[True](x))
    # a folder written before the rule (no "placement") loads with its own layout, as it recorded
    old = save_quantized(qm[False], tmp_path / "old")
    assert "placement" not in json.loads((old / "quant.json").read_text())["config"]
    again = load_quantized(_fork(), old)
    assert again.side.input_quantizer is not again.block.conv1.input_quantizer
    with torch.no_grad():
        assert torch.equal(again(x), qm[False](x))


class Sum3(torch.nn.Module):
    """y = conv(t) + t + u: the second add sums what a layer started with u, which another conv also reads."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.side = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.other = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        t = torch.relu(self.stem(x))
        u = torch.relu(self.side(t))
        y = torch.relu(self.conv(t) + t + u)
        return self.fc(torch.cat([y, self.other(u)], 1).mean((2, 3)))


def test_a_later_term_of_a_sum_a_layer_started_is_quantized_as_its_identity(tmp_path):
    """Revision 2: the add (conv(t) + t) + u quantizes u, as TensorRT fuses the sum into conv's epilogue and must
    read u in INT8; u's quantizer is the one `other` reads it through. Revision 1 left u float at that add."""
    model = Sum3().eval()
    setattr(model, ATTR, Preprocessing(input_size=(3, 8, 8)))
    v1 = prepare(model, QuantConfig(wbits=4, abits=4, first_last_bits=None, placement=1))
    v2 = prepare(model, QuantConfig(wbits=4, abits=4, first_last_bits=None))
    assert shared_quantizers(v1) == {"side.input": ("conv.input", "add.identity")}
    assert shared_quantizers(v2) == {"side.input": ("conv.input", "add.identity"), "other.input": ("add_1.identity",)}
    add1 = next(n for n in v2.graph.nodes if n.name == "add_1")
    assert [a.op == "call_module" and v2.get_submodule(a.target) is v2.other.input_quantizer
            for a in add1.args] == [False, True]
    assert all(a.op != "call_module" for a in next(n for n in v1.graph.nodes if n.name == "add_1").args)
    calib = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    qm = quantize(model, QuantConfig(wbits=4, abits=4, method="rtn", first_last_bits=None), calib, progress=False)
    path = export_qdq(qm, tmp_path / "m.onnx")
    assert report(check_model(path))["ok"]
    v = verify_onnx(path, qm, torch.randint(0, 256, (8, 8, 8, 3), dtype=torch.uint8,
                                            generator=torch.Generator().manual_seed(2)))
    assert v.top1_agreement == 100.0 and v.max_abs_diff == 0.0 and v.code_mismatch_fraction == 0.0


def test_hrnet_engine_before_and_after_placement_revision_2(tmp_path):
    """timm hrnet_w18_small (random weights, 64 px, W4A4): revision 1 quantized two tensors twice (a branch
    block's input and a transition conv's) and left fuse-layer terms float; revision 2 has one Q/DQ per tensor,
    and its TensorRT-RTX engine has fewer hand-offs and no bypassed Q/DQ."""
    torch.set_num_threads(1)
    model = load_model("hrnet_w18_small", random_init=True, input_size=64)
    calib = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    paths, dups = {}, {}
    for p in (1, 2):
        qm = quantize(model, QuantConfig(wbits=4, abits=4, method="rtn", scale_grid=8, placement=p), calib,
                      progress=False)
        paths[p] = export_qdq(qm, tmp_path / f"p{p}.onnx")
        rep = report(check_model(paths[p]))
        assert rep["ok"]
        dups[p] = [v["node"] for v in rep["violations"] if v["rule"] == "duplicate-qdq"]
    assert len(dups[1]) == 2 and dups[2] == []
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed")
    from mixq_onnx.trt.builder import BuildConfig, build_engine
    from mixq_onnx.trt.inspect import inspect_plan

    reps = {}
    for p, path in paths.items():
        build_engine(path, tmp_path / f"p{p}.plan", BuildConfig(backend="tensorrt-rtx", batch=(1, 1, 1)))
        reps[p] = inspect_plan(tmp_path / f"p{p}.plan")
    assert reps[2].int8_mac_fraction == 1.0 and not reps[2].fallbacks
    assert len(reps[1].fallbacks) == 1 and reps[2].handoffs < reps[1].handoffs, (reps[1].handoffs, reps[2].handoffs)


# ----------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def r20():
    """ResNet-20 (random weights) W4A4, round to nearest: shared and per consumer."""
    torch.set_num_threads(1)
    model = load_model("cifar_resnet20", random_init=True)
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = {share: quantize(model, QuantConfig(wbits=4, abits=4, method="rtn", share_quantizers=share), calib,
                           progress=False) for share in (False, True)}
    return model, out


@pytest.mark.parametrize("layout", ["integer", "dq-scales"])
def test_export_writes_one_qdq_per_shared_tensor(r20, layout, tmp_path):
    _, qm = r20
    path = export_qdq(qm[True], tmp_path / "m.onnx", layout=layout)
    g = GraphIndex.load(path)
    qnodes = [n for n in g.nodes if n.op_type == "QuantizeLinear"]
    per_tensor = Counter(g.quantizer_input(n) for n in qnodes)
    assert max(per_tensor.values()) == 1  # each float tensor is quantized once
    by_q = g.quantizer_nodes()
    acts = [q for q in quantizers(qm[True]).values() if q.kind == "act"]
    assert len(qnodes) == len(acts) == 21  # 19 conv inputs and identities, the pool's input, the classifier's
    for name in shared_quantizers(qm[True]):
        q = [n for n in by_q[name] if n.op_type == "QuantizeLinear"]
        dqs = [n for n in by_q[name] if n.op_type == "DequantizeLinear"]
        assert len(q) == 1 and len(dqs) <= 2
        readers = {u.op_type for d in dqs for u in g.users(d.output[0])}
        assert "Conv" in readers and readers <= {"Conv", "Add", "Slice"}  # conv1 and the residual add
        if layout == "dq-scales" and name.startswith(("layer1", "layer2.1", "layer2.2", "layer3.1", "layer3.2")):
            assert len(dqs) == 1  # identity blocks: one Q/DQ pair whose DQ feeds conv1 and the add
    rep = report(check_model(path))
    assert rep["ok"] and not [v for v in rep["violations"] if v["rule"] == "duplicate-qdq"], rep["violations"][:3]


def test_shared_export_is_exact_in_onnxruntime(r20, tmp_path):
    _, qm = r20
    path = export_qdq(qm[True], tmp_path / "m.onnx")
    images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    v = verify_onnx(path, qm[True], images)
    assert v.top1_agreement == 100.0 and v.max_abs_diff == 0.0 and v.code_mismatch_fraction == 0.0
    assert v.optimized_top1_agreement is not None  # onnxruntime's optimised session takes the graph too


def test_check_warns_on_duplicate_qdq_pairs(r20, tmp_path):
    """Per consumer, round to nearest gives the conv1 input and the identity of a block the same scale: two
    Q/DQ pairs on one tensor that one would do. A warning, not a failure."""
    _, qm = r20
    path = export_qdq(qm[False], tmp_path / "per_consumer.onnx")
    rep = report(check_model(path))
    dup = [v for v in rep["violations"] if v["rule"] == "duplicate-qdq"]
    assert rep["ok"] and len(dup) == 7 and all(v["severity"] == "warning" for v in dup)  # the 7 identity blocks
    assert all(".add.identity/QuantizeLinear" in v["node"] for v in dup)


def test_cli_check_prints_the_warning_and_exits_0(r20, tmp_path, run_cli):
    _, qm = r20
    path = export_qdq(qm[False], tmp_path / "per_consumer.onnx")
    r = run_cli("check", path)
    assert r.code == 0 and "warning: [duplicate-qdq]" in r.out + r.err


# ----------------------------------------------------------------------------- result folders
def test_old_per_consumer_folder_loads_and_exports_as_before(r20, tmp_path):
    """A quant.json written before sharing has no "share_quantizers" in its config and one record per consumer
    (the identity quantizers too): it loads with that layout and exports the same graph, byte for byte."""
    model, qm = r20
    save_quantized(qm[False], tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "quant.json").read_text())
    assert "share_quantizers" not in meta["config"]  # the format before this change
    assert not any("shared_with" in r for r in meta["quantizers"])
    assert sum(r["name"].endswith(".identity") for r in meta["quantizers"]) == 9
    again = load_quantized(load_model("cifar_resnet20", random_init=True), tmp_path / "old")
    assert not again.mixq_config.share_quantizers and not shared_quantizers(again)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(again(x), qm[False](x))
    a = export_qdq(qm[False], tmp_path / "a.onnx")
    b = export_qdq(again, tmp_path / "b.onnx")
    assert _without_stack_traces(a) == _without_stack_traces(b)


def _without_stack_traces(path: Path) -> bytes:
    """The graph's bytes less the exporter's per-node stack traces, which name torch.fx's generated-code
    counter (`<eval_with_key>.N`): it differs between two models traced in one process, not between runs."""
    import onnx

    m = onnx.load(str(path))
    for n in m.graph.node:
        keep = [p for p in n.metadata_props if "stack_trace" not in p.key]
        del n.metadata_props[:]
        n.metadata_props.extend(keep)
    return m.SerializeToString()


def test_shared_folder_records_and_checks_sharing(r20, tmp_path):
    model, qm = r20
    out = save_quantized(qm[True], tmp_path / "new")
    meta = json.loads((out / "quant.json").read_text())
    assert meta["config"]["share_quantizers"] is True
    rec = {r["name"]: r for r in meta["quantizers"]}
    assert rec["layer1.0.conv1.input"]["shared_with"] == ["layer1.0.add.identity"]
    assert list(rec["layer1.0.conv1.input"])[:4] == ["name", "kind", "placement", "shared_with"]
    assert "layer1.0.add.identity" not in rec and "shared_with" not in rec["layer1.0.conv2.input"]
    again = load_quantized(load_model("cifar_resnet20", random_init=True), out)
    assert shared_quantizers(again) == shared_quantizers(qm[True])
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(again(x), qm[True](x))
    # an edited record that no longer says what it serves, or a config that says "per consumer", is refused
    q = out / "quant.json"
    edited = json.loads(q.read_text())
    del next(r for r in edited["quantizers"] if r["name"] == "layer1.0.conv1.input")["shared_with"]
    q.write_text(json.dumps(edited))
    with pytest.raises(MixqError, match=r"quantizer layer1\.0\.conv1\.input: serves also \[\]"):
        load_quantized(model, out)
    edited = dict(meta)
    edited["config"] = {k: v for k, v in meta["config"].items() if k != "share_quantizers"}
    q.write_text(json.dumps(edited))
    with pytest.raises(MixqError, match="only in the model"):
        load_quantized(model, out)


# ----------------------------------------------------------------------------- reconstruction
def test_block_reconstruction_learns_the_shared_scale():
    """QDrop's block unit owns the shared quantizer (conv1 input and residual identity) and learns its step."""
    torch.set_num_threads(1)
    model = load_model("cifar_resnet20", random_init=True)
    calib = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rtn = quantize(model, QuantConfig(wbits=4, abits=4, method="rtn"), calib, progress=False)
    qd = quantize(model, QuantConfig(wbits=4, abits=4, method="qdrop", iters=8, batch_size=8), calib, progress=False)
    for name in shared_quantizers(qd):
        assert float(quantizers(qd)[name].scale) != float(quantizers(rtn)[name].scale), name  # learned
    units = {u["name"]: u for u in qd.mixq_report["units"]}
    assert units["layer1.0"]["grad_ascale"]["mean"] > 0


def test_qdrop_draws_once_for_all_consumers_of_a_shared_quantizer():
    """While learning with QDrop, the consumers of a shared quantizer read one draw (the engine quantizes the
    tensor once); an unshared quantizer, or another tensor, draws afresh."""
    torch.set_num_threads(1)
    gm = prepare(load_model("cifar_resnet20", random_init=True), QuantConfig(wbits=4, abits=4))
    block = gm.layer1.get_submodule("0")
    q = block.conv1.input_quantizer
    assert q.shared_with
    for m in (q, block.conv2.input_quantizer):
        m.initialized.fill_(True)
        m.learning, m.drop_prob = True, 0.5
    x = torch.rand(2, 16, 32, 32)
    seen = []
    h = q.register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        block(x)
    finally:
        h.remove()
    assert len(seen) == 2 and seen[0] is seen[1]  # conv1 and the shortcut: one draw
    assert q(x.clone()) is not seen[0]
    lone = block.conv2.input_quantizer
    assert not torch.equal(lone(x), lone(x))  # unshared: a draw per call
    q.learning = False
    assert q(x) is not q(x) and torch.equal(q(x), q(x))  # no QDrop: plain, deterministic fake quantization


@pytest.fixture
def layerwise_lsq():
    """A layer-granularity method that learns activation steps (none of the registered ones does)."""

    @register_method
    class LayerLSQ(Method):
        name = "layer-lsq-test"
        help = "layer-wise rounding and activation steps"
        granularity = "layer"
        phases = (Phase(learn_round=True, learn_act=True),)

    yield LayerLSQ
    METHODS.unregister("layer-lsq-test")


def test_a_quantizer_shared_by_two_units_belongs_to_the_first(layerwise_lsq):
    """timm resnet18's layer2.0: conv1 and downsample.0 read the block input through one quantizer. With layers
    as units, conv1's unit (first in execution order) learns it; the downsample unit uses it as left."""
    torch.set_num_threads(1)
    model = load_model("resnet18", random_init=True, input_size=32)
    calib = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    gm = prepare(model, QuantConfig(wbits=4, abits=4))
    shared = gm.layer2.get_submodule("0").conv1.input_quantizer
    assert gm.layer2.get_submodule("0").downsample.get_submodule("0").input_quantizer is shared
    owned = assign_owners([Unit(n, m, "layer") for n, m in gm.named_modules() if isinstance(m, QUANT_LAYERS)])
    has = [u.name for u in owned if any(q is shared for q in u.act_quantizers())]
    assert has == ["layer2.0.conv1"]
    qm = quantize(model, QuantConfig(wbits=4, abits=4, method="layer-lsq-test", iters=2, batch_size=4), calib,
                  progress=False)
    units = {u["name"]: u for u in qm.mixq_report["units"]}
    assert units["layer2.0.conv1"]["grad_ascale"] and not units["layer2.0.downsample.0"]["grad_ascale"]
    off = quantize(model, QuantConfig(wbits=4, abits=4, method="layer-lsq-test", iters=2, batch_size=4,
                                      share_quantizers=False), calib, progress=False)
    assert {u["name"]: u for u in off.mixq_report["units"]}["layer2.0.downsample.0"]["grad_ascale"]


# ----------------------------------------------------------------------------- engine
def test_build_max_handoffs(r20, tmp_path, run_cli):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed")
    _, qm = r20
    per = export_qdq(qm[False], tmp_path / "per_consumer.onnx")
    shared = export_qdq(qm[True], tmp_path / "shared.onnx")
    plan = tmp_path / "per.plan"
    r = run_cli("build", per, "--out", plan, "--max-handoffs", "0")
    msg = one_line_error(r, code=1)
    assert "hand-offs, more than --max-handoffs 0" in msg and "no plan written" in msg
    assert not plan.exists() and not Path(f"{plan}.json").exists()
    r = run_cli("build", per, "--out", plan, "--max-handoffs", "0", "--json")  # a script still gets its object
    msg = one_line_error(r, code=1)
    refused = json.loads(r.last_line)
    assert refused["ok"] is False and refused["plan"] is None and refused["handoffs"] > 0
    assert refused["refused"] == msg.removeprefix("error: ") and not plan.exists()
    r = run_cli("build", per, "--out", plan, "--json")
    per_out = json.loads(r.last_line)
    assert r.code == 0 and per_out["handoffs"] > 0  # the subsampling shortcuts' float copies
    assert per_out["handoff_bytes"] >= 4 * per_out["handoffs"]  # each moves at least one float
    plan2 = tmp_path / "shared.plan"
    r = run_cli("build", shared, "--out", plan2, "--max-handoffs", "0", "--json")
    assert r.code == 0, r.err
    out = json.loads(r.last_line)
    assert out["handoffs"] == 0 and out["handoff_bytes"] == 0 and out["int8_mac_fraction"] >= 0.99 and plan2.is_file()
    r = run_cli("inspect", plan2, "--json")
    rep = json.loads(r.last_line)
    assert rep["handoffs"] == 0 and rep["float_handoffs"] == [] and rep["reformat_layers"] == []
    assert len(rep["layers"]) < len(json.loads(run_cli("inspect", plan, "--json").last_line)["layers"])
    r = run_cli("build", shared, "--out", plan2, "--max-handoffs", "-1")
    assert r.code == 2 and "--max-handoffs" in r.err


class _ShapeReadBlock(torch.nn.Module):
    """EfficientViT's ResidualBlock around LiteMLA: `main(pre_norm(x)) + shortcut(x)`, both Identities, and the main
    branch reads `B, C, H, W` off its input. The shape read kept the conv's input (`pre_norm(x)`) from counting as x,
    so x carried two 8-bit quantizers, the conv's and the add's identity (check: duplicate-qdq)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.pre_norm, self.shortcut = torch.nn.Identity(), torch.nn.Identity()
        self.conv = torch.nn.Conv2d(8, 8, 1)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = self.pre_norm(x)
        B, C, H, W = y.shape
        x = self.conv(y).reshape(B, C, H * W).reshape(B, C, H, W) + self.shortcut(x)
        return self.head(x.mean((2, 3)))


def test_a_shape_read_does_not_keep_one_tensor_from_sharing_its_quantizer(tmp_path):
    torch.manual_seed(0)
    model = _ShapeReadBlock().eval()
    setattr(model, ATTR, Preprocessing(input_size=(3, 8, 8)))
    calib = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    counts = {}
    for rev in (3, 4):  # revision 3 kept the two quantizers (a folder written then loads as it was)
        q = quantize(model, QuantConfig(wbits=8, abits=8, method="rtn", placement=rev), calib, progress=False)
        g = export_qdq(q, tmp_path / f"m{rev}.onnx")
        vs = report(check_model(g))["violations"]
        counts[rev] = (sum(v["rule"] == "duplicate-qdq" for v in vs), sorted(shared_quantizers(q)))
        images = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        v = verify_onnx(g, q, images)
        assert v.max_abs_diff == 0.0 and v.top1_agreement == 100.0
    assert counts[3] == (1, []) and counts[4] == (0, ["conv.input"]), counts
