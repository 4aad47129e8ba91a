"""Integer pools (`quant.graph.quantize_pools`, `onnx.passes.integer_pools`): an average pool that a quantized
layer reads gets a quantizer on its input, averages integer codes and requantizes the mean straight onto
its consumer's grid. onnxruntime then computes exactly what PyTorch does (max |diff| 0, also where the
window is not a power of two), and TensorRT runs the pool as one INT8 layer."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from conftest import RESNET8, RESNET20, TEST_NPZ, TRAIN_NPZ, need_shared

from mixq_onnx.errors import MixqError
from mixq_onnx.models import get_preprocessing, load_model
from mixq_onnx.models.preprocessing import ATTR, Preprocessing
from mixq_onnx.onnx import export_qdq
from mixq_onnx.onnx.check import check_model, report
from mixq_onnx.onnx.graph import REQUANT_KEY
from mixq_onnx.onnx.verify import match_quantizers, verify_onnx
from mixq_onnx.quant import QuantConfig, load_quantized, prepare, quantize, quantizers, save_quantized
from mixq_onnx.quant.modules import QuantPool


class PoolNet(nn.Module):
    """conv-bn-relu, conv-relu, then one of the three pool spellings, flatten, classifier."""

    def __init__(self, pool: str, size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1)
        self.kind = pool
        self.pool = {"adaptive": nn.AdaptiveAvgPool2d(1), "avg": nn.AvgPool2d(size)}.get(pool, nn.Identity())
        self.fc = nn.Linear(24, 10)
        setattr(self, ATTR, Preprocessing(input_size=(3, size, size)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        x = x.mean((2, 3)) if self.kind == "mean" else torch.flatten(self.pool(x), 1)
        return self.fc(x)


def _net(pool: str, size: int) -> nn.Module:
    torch.manual_seed(0)
    m = PoolNet(pool, size).eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _quantized(pool: str, size: int, **cfg):
    model = _net(pool, size)
    calib = get_preprocessing(model)(_images(64, size, seed=1))
    kw = dict(wbits=4, abits=4, method="rtn", scale_grid=10)
    kw.update(cfg)
    return quantize(model, QuantConfig(**kw), calib, progress=False)


@pytest.mark.parametrize("pool", ["adaptive", "avg", "mean"])
def test_pool_gets_a_quantizer_at_its_consumers_grid(pool):
    q = _quantized(pool, 8)
    pools = [m for m in q.modules() if isinstance(m, QuantPool)]
    assert len(pools) == 1
    p = pools[0]
    assert p.input_quantizer.spec.placement == "pool" and p.consumer == "fc"
    assert p.output_quantizer is q.fc.input_quantizer  # one object: the consumer's own quantizer
    assert p.input_quantizer.bits == q.fc.input_quantizer.bits == 8  # the last layer's bits (first/last policy)
    assert p.input_quantizer.name in quantizers(q)
    off = prepare(_net(pool, 8), QuantConfig(wbits=4, abits=4, integer_pools=False))
    assert not any(isinstance(m, QuantPool) for m in off.modules())


def test_integer_pool_is_exact_and_on_the_consumers_grid():
    """PyTorch's integer form equals the mean of the codes requantized by round(m / (s_out / s_in))."""
    q = _quantized("adaptive", 8)
    p = next(m for m in q.modules() if isinstance(m, QuantPool))
    x = torch.rand(4, 24, 8, 8) * 3
    assert p.integer_mode()
    y = p(x)
    iq, oq = p.input_quantizer, p.output_quantizer
    codes = iq.codes(x).to(torch.float64)
    want = torch.clamp(torch.round(codes.mean((2, 3), keepdim=True).float() / p.requant_factor()), *oq.qrange)
    assert torch.equal(y, want * oq.scale.detach())
    assert torch.equal(oq.codes(y), want)  # the consumer reads the very same codes


@pytest.mark.parametrize("pool,size,bits", [("adaptive", 7, 8), ("avg", 5, 8), ("mean", 6, 8), ("adaptive", 7, 4)])
def test_export_is_bit_exact_with_any_window(pool, size, bits, tmp_path):
    """Windows of 49, 25 and 36 values (not powers of two), and a 4-bit classifier input (its range Clip
    moves in front of the requantizing Q): onnxruntime equals PyTorch to the last bit."""
    q = _quantized(pool, size, first_last_bits=None if bits == 4 else 8)
    path = export_qdq(q, tmp_path / "m.onnx")
    assert report(check_model(path))["ok"]
    m = onnx.load(str(path))
    nodes = list(m.graph.node)
    pool_node = next(n for n in nodes if n.op_type in ("AveragePool", "GlobalAveragePool", "ReduceMean"))
    after = [n for n in nodes if pool_node.output[0] in n.input]
    if bits == 4:
        assert [n.op_type for n in after] == ["Clip"]
        after = [n for n in nodes if after[0].output[0] in n.input]
    assert [n.op_type for n in after] == ["QuantizeLinear"]  # right after the pool: one INT8 pooling layer
    qpool = next(mod for mod in q.modules() if isinstance(mod, QuantPool))
    assert {p.key: p.value for p in after[0].metadata_props}[REQUANT_KEY] == qpool.input_quantizer.name
    rep = verify_onnx(path, q, _images(300, size, seed=2))
    assert rep.max_abs_diff == 0.0 and rep.top1_agreement == 100.0, rep
    assert rep.code_mismatch_fraction == 0.0 and rep.propagated_code_mismatch == 0.0, rep.first_divergence
    assert rep.segment_step_diff == 0.0


def test_verify_refuses_a_tampered_requantization(tmp_path):
    q = _quantized("adaptive", 8)
    m = onnx.load(str(export_qdq(q, tmp_path / "m.onnx")))
    qn = next(n for n in m.graph.node if any(p.key == REQUANT_KEY for p in n.metadata_props))
    init = next(i for i in m.graph.initializer if i.name == qn.input[1])
    init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * np.float32(1.01), init.name))
    with pytest.raises(MixqError, match="fc.input has scale"):
        match_quantizers(m, quantizers(q))


def test_check_flags_a_pool_of_codes_that_is_not_requantized(tmp_path):
    q = _quantized("adaptive", 8)
    path = export_qdq(q, tmp_path / "m.onnx")
    m = onnx.load(str(path))
    for n in m.graph.node:  # the Q after the pool loses its mark: the pool's DQ(scale 1) is then unexplained
        if any(p.key == REQUANT_KEY for p in n.metadata_props):
            keep = [p for p in n.metadata_props if p.key != REQUANT_KEY]
            del n.metadata_props[:]
            n.metadata_props.extend(keep)
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    rules = {v.rule for v in check_model(bad) if v.severity == "error"}
    assert "qdq-scale-pair" in rules and report(check_model(path))["ok"]


def test_result_folder_round_trip_and_old_folders(tmp_path):
    q = _quantized("adaptive", 8)
    save_quantized(q, tmp_path / "new")
    meta = json.loads((tmp_path / "new" / "quant.json").read_text())
    assert meta["config"]["integer_pools"] is True
    assert [r["placement"] for r in meta["quantizers"] if r["name"] == "pool.input"] == ["pool"]
    again = load_quantized(_net("adaptive", 8), tmp_path / "new")
    x = get_preprocessing(q)(_images(16, 8, seed=3))
    assert torch.equal(again(x), q(x))
    # a folder written before the rule (no "integer_pools" in its config) has no pool quantizer, and loads so
    old = _quantized("adaptive", 8, integer_pools=False)
    save_quantized(old, tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "quant.json").read_text())
    assert "integer_pools" not in meta["config"]
    back = load_quantized(_net("adaptive", 8), tmp_path / "old")
    assert not any(isinstance(m, QuantPool) for m in back.modules())
    assert torch.equal(back(x), old(x))


@need_shared(RESNET20, TRAIN_NPZ, TEST_NPZ)
def test_resnet20_w2a4_is_bit_exact_on_real_images(tmp_path):
    """The case the float pool broke: W2A4 on the real ResNet-20, 1,000 real test images."""
    torch.set_num_threads(1)
    model = load_model("cifar_resnet20", RESNET20)
    calib = get_preprocessing(model)(torch.from_numpy(np.load(TRAIN_NPZ)["x"][:128]))
    q = quantize(model, QuantConfig(wbits=2, abits=4, method="qdrop", iters=20, scale_grid=20), calib,
                 progress=False)
    path = export_qdq(q, tmp_path / "m.onnx")
    rep = verify_onnx(path, q, torch.from_numpy(np.load(TEST_NPZ)["x"][:1000]))
    assert rep.max_abs_diff == 0.0 and rep.code_mismatch_fraction == 0.0 and rep.propagated_code_mismatch == 0.0


@need_shared(RESNET8)
def test_resnet8_pool_runs_int8_in_the_engine(tmp_path):
    """ResNet-8's `avg_pool2d(x, 8)` covers its whole 8x8 input: the exporter writes it as a global mean
    (ReduceMean, `passes.global_average_pools`), and TensorRT-RTX fuses it into the kernel of the last residual
    add, which writes the classifier's INT8 codes: no pooling layer of its own, no float hand-off around it."""
    pytest.importorskip("tensorrt_rtx")
    from mixq_onnx.trt.builder import BuildConfig, build_engine, plan_layers, read_plan_meta
    from mixq_onnx.trt.inspect import inspect_plan

    model = load_model("mlperf_tiny_resnet8", RESNET8)
    calib = get_preprocessing(model)(_images(32, 32, seed=4))
    q = quantize(model, QuantConfig(wbits=8, abits=8, method="rtn", scale_grid=10), calib, progress=False)
    path = export_qdq(q, tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "AveragePool" not in ops and ops.count("ReduceMean") == 1
    plan = tmp_path / "m.plan"
    build_engine(path, plan, BuildConfig(batch=(1, 2, 4)))
    layers = plan_layers(read_plan_meta(plan))
    assert not [li for li in layers if "pool" in li.layer_type.lower()]
    host = [li for li in layers if "pool/ReduceMean" in li.onnx_nodes]
    assert len(host) == 1 and [t.dtype for t in host[0].outputs] == ["Int8"], \
        [(li.layer_type, li.onnx_nodes, [t.dtype for t in li.outputs]) for li in host]
    rep = inspect_plan(plan, path)
    assert rep.int8_mac_fraction == 1.0 and rep.handoffs == 0, rep.float_handoffs
    # the graph as exported before (the same mean as an 8x8 AveragePool): one engine layer more, a pool
    g = onnx.load(str(path))
    (mean,) = [n for n in g.graph.node if n.op_type == "ReduceMean"]
    pool = onnx.helper.make_node("AveragePool", [mean.input[0]], list(mean.output), name=mean.name,
                                 kernel_shape=[8, 8], strides=[8, 8], pads=[0, 0, 0, 0], ceil_mode=0,
                                 count_include_pad=1)  # as torch exports avg_pool2d(x, 8)
    g.graph.node.insert(list(g.graph.node).index(mean), pool)
    g.graph.node.remove(mean)
    before = tmp_path / "before.onnx"
    onnx.save(g, str(before))
    build_engine(before, tmp_path / "before.plan", BuildConfig(batch=(1, 2, 4)))
    old = plan_layers(read_plan_meta(tmp_path / "before.plan"))
    assert [li for li in old if "pool" in li.layer_type.lower()] and len(old) == len(layers) + 1


def test_nipq_learns_the_pool_quantizers_bits_and_lsq_keeps_its_consumers():
    """The pool's input quantizer is no layer's input: the first/last policy does not fix it, so NIPQ's budget
    sets its bits like any activation's; LSQ keeps the bits `quantize` gives it (its consumer's)."""
    from mixq_onnx.qat import QATConfig
    from mixq_onnx.qat import train as qat_train
    from mixq_onnx.training import TrainData

    model = _net("adaptive", 8)
    data = TrainData(get_preprocessing(model)(_images(48, 8, seed=5)), torch.randint(0, 10, (48,), generator=torch.Generator().manual_seed(5)),
                     "random")
    rows = {}
    for method, kw in (("nipq", dict(target_bits=3.0)), ("lsq", dict(wbits=3, abits=3))):
        q = qat_train(model, QATConfig(method=method, epochs=1, final_epochs=1, batch_size=16, **kw), data,
                      progress=False)
        rows[method] = {r["name"]: r for r in q.mixq_qat_report["quantizers"]}
        pool = next(m for m in q.modules() if isinstance(m, QuantPool))
        assert pool.output_quantizer is q.fc.input_quantizer  # still one object after the QAT swaps
    nipq, lsq = rows["nipq"]["pool.input"], rows["lsq"]["pool.input"]
    assert nipq["placement"] == "pool" and not nipq["fixed"] and nipq["bits"] < 8, nipq
    assert rows["nipq"]["fc.input"]["fixed"] and rows["nipq"]["fc.input"]["bits"] == 8
    assert lsq["bits"] == 8


class WindowNet(nn.Module):
    """conv, then an average pool of `kernel` (stride = kernel, optional padding) on a 6x6 map."""

    def __init__(self, kernel: int, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AvgPool2d(kernel, padding=padding)
        setattr(self, ATTR, Preprocessing(input_size=(3, 6, 6)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(torch.relu(self.conv(x))), 1)


@pytest.mark.parametrize("kernel,padding,global_mean", [(6, 0, True), (3, 0, False), (6, 1, False)])
def test_only_a_whole_window_average_pool_exports_as_a_global_mean(kernel, padding, global_mean, tmp_path):
    """`passes.global_average_pools`: a window that is the whole unpadded input becomes ReduceMean (what
    TensorRT fuses into the kernel before it); a smaller or padded window stays an AveragePool. The float
    graph computes what PyTorch does either way."""
    import onnxruntime as ort

    from mixq_onnx.onnx.export import export_fp

    torch.manual_seed(0)
    m = WindowNet(kernel, padding).eval()
    path = export_fp(m, tmp_path / "fp.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ("ReduceMean" in ops, "AveragePool" in ops) == (global_mean, not global_mean), ops
    x = torch.randn(5, 3, 6, 6)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, m(x).detach().numpy(), rtol=1e-5, atol=1e-6)


class ForkNet(nn.Module):
    """One ReLU output read by a conv and by a pool whose classifier has the conv's grid."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.pool, self.pool2 = nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Linear(16, 10), nn.Linear(16, 10)
        setattr(self, ATTR, Preprocessing(input_size=(3, 8, 8)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        a = torch.relu(self.conv2(y))
        return self.fc1(torch.flatten(self.pool(y), 1)) + self.fc2(torch.flatten(self.pool2(a), 1))


def test_a_pool_shares_the_quantizer_of_a_conv_reading_the_same_tensor(tmp_path):
    """The placement rule "one quantizer per tensor and grid" holds for pool quantizers too: the ReLU output
    that conv2 and the pool read gets one quantizer (conv2's), one Q/DQ in the graph, no duplicate-qdq
    warning, and the export stays bit-exact; the result folder loads back to the same layout."""
    torch.manual_seed(0)
    model = ForkNet().eval()
    calib = get_preprocessing(model)(_images(64, 8, seed=1))
    q = quantize(model, QuantConfig(wbits=8, abits=8, method="rtn", first_last_bits=None, scale_grid=10), calib,
                 progress=False)
    pool = q.pool
    assert isinstance(pool, QuantPool) and pool.input_quantizer is q.conv2.input_quantizer
    assert "pool.input" in q.conv2.input_quantizer.shared_with and "pool.input" not in quantizers(q)
    path = export_qdq(q, tmp_path / "m.onnx")
    violations = check_model(path)
    assert report(violations)["ok"] and not [v for v in violations if v.rule == "duplicate-qdq"], violations
    m = onnx.load(str(path))
    marked = [n for n in m.graph.node if n.op_type == "QuantizeLinear"
              and {p.key: p.value for p in n.metadata_props}.get("mixq.quantizer") == "conv2.input"]
    assert len(marked) == 1
    rep = verify_onnx(path, q, _images(200, 8, seed=2))
    assert rep.max_abs_diff == 0.0 and rep.top1_agreement == 100.0 and rep.code_mismatch_fraction == 0.0, rep
    save_quantized(q, tmp_path / "res")
    back = load_quantized(ForkNet().eval(), tmp_path / "res")
    assert back.pool.input_quantizer is back.conv2.input_quantizer
    assert torch.equal(back(calib[:8]), q(calib[:8]))


class ShortcutNet(nn.Module):
    """A ResNet-D downsampling shortcut: 2x2 stride-2 average pool in ceil mode, then a 1x1 conv."""

    def __init__(self, size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
        self.down = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 10)
        setattr(self, ATTR, Preprocessing(input_size=(3, size, size)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(self.pool(torch.relu(self.conv1(x))))
        return self.fc(torch.relu(y).mean((2, 3)))


@pytest.mark.parametrize("size,integer", [(8, True), (7, False)])
def test_a_ceil_mode_pool_is_an_integer_pool_where_it_has_whole_windows(size, integer, tmp_path):
    """Placement revision 5: on even sizes ceil mode adds no window, so the shortcut pool averages integer codes
    (a QuantPool feeding the 1x1 conv) and the export is bit-exact; on an odd size its last window is partial and
    the pool stays float. Revision 4 (a folder written before) keeps it float, and its folder reloads so."""
    torch.manual_seed(0)
    model = ShortcutNet(size).eval()
    calib = get_preprocessing(model)(_images(64, size, seed=1))
    q = quantize(model, QuantConfig(wbits=4, abits=4, method="rtn", scale_grid=10), calib, progress=False)
    assert q.mixq_config.placement == 6
    assert isinstance(q.pool, QuantPool) == integer
    if integer:
        assert q.pool.consumer == "down" and q.pool.output_quantizer is q.down.input_quantizer
    path = export_qdq(q, tmp_path / "m.onnx")
    assert report(check_model(path))["ok"]
    pools = [n for n in onnx.load(str(path)).graph.node if n.op_type == "AveragePool"]
    if integer:  # whole windows: the mean of a window view of the codes (passes.tiled_average_pools, below)
        assert pools == [] and len(_tiled_means(path)) == 1
    else:
        assert len(pools) == 1 and any(a.name == "ceil_mode" and a.i == 1 for a in pools[0].attribute)
    requant = [n for n in onnx.load(str(path)).graph.node if any(p.key == REQUANT_KEY for p in n.metadata_props)
               and {p.key: p.value for p in n.metadata_props}["mixq.quantizer"] == "down.input"]
    assert len(requant) == int(integer)  # (the global mean before fc is an integer pool in either case)
    rep = verify_onnx(path, q, _images(200, size, seed=2))
    assert rep.max_abs_diff == 0.0 and rep.code_mismatch_fraction == 0.0, rep
    old = quantize(model, QuantConfig(wbits=4, abits=4, method="rtn", scale_grid=10, placement=4), calib,
                   progress=False)
    assert not isinstance(old.pool, QuantPool)
    save_quantized(old, tmp_path / "old")
    back = load_quantized(ShortcutNet(size).eval(), tmp_path / "old")
    assert not isinstance(back.pool, QuantPool) and torch.equal(back(calib[:8]), old(calib[:8]))


def _tiled_means(path) -> list:
    """The ReduceMean nodes that average a window view of quantized codes: Q -> Reshape -> DQ -> ReduceMean."""
    g = onnx.load(str(path)).graph
    prod = {o: n for n in g.node for o in n.output}
    out = []
    for n in g.node:
        dq = prod.get(n.input[0]) if n.op_type == "ReduceMean" else None
        view = prod.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if view is not None and view.op_type == "Reshape" and prod[view.input[0]].op_type == "QuantizeLinear":
            out.append(n)
    return out


class TwoReaders(ShortcutNet):
    """The shortcut pool's input also feeds the block's strided conv (ResNet-D's block input): one quantizer, two
    readers of its DQ."""

    def __init__(self, size: int):
        super().__init__(size)
        self.conv2 = nn.Conv2d(16, 24, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        y = self.down(self.pool(h)) + self.conv2(h)
        return self.fc(torch.relu(y).mean((2, 3)))


@pytest.mark.parametrize("net,bits", [(ShortcutNet, 8), (TwoReaders, 4)])
def test_a_pool_of_whole_windows_averages_a_window_view_of_the_codes(net, bits, tmp_path):
    """TensorRT-RTX ran every AveragePool on float input, between two float hand-offs. A 2x2 stride-2 pool over
    whole windows is exported as a Reshape of the INT8 codes into windows, their DQ and a ReduceMean: the same
    mean, exact in onnxruntime with or without its optimizations (a Reshape after the DQ made its QDQ propagation
    build an invalid graph), and fused by TensorRT-RTX into the kernel before it."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = net(8).eval()
    calib = get_preprocessing(model)(_images(64, 8, seed=1))
    q = quantize(model, QuantConfig(wbits=bits, abits=bits, method="rtn", scale_grid=10), calib, progress=False)
    path = export_qdq(q, tmp_path / "m.onnx")
    nodes = onnx.load(str(path)).graph.node
    assert not any(n.op_type == "AveragePool" for n in nodes)
    (mean,) = _tiled_means(path)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in mean.attribute}
    counts = json.loads({m.key: m.value for m in onnx.load(str(path)).metadata_props}["mixq.counts"])
    assert attrs == {"keepdims": 0} and counts["tiled_pools"] == 1
    assert report(check_model(path))["ok"]
    rep = verify_onnx(path, q, _images(200, 8, seed=2))
    assert rep.max_abs_diff == 0.0 and rep.code_mismatch_fraction == 0.0 and rep.optimized_max_abs_diff == 0.0, rep
    x = get_preprocessing(model)(_images(16, 8, seed=3)).numpy()
    outs = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        outs.append(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0])
    assert np.array_equal(outs[0], outs[1])
    pytest.importorskip("tensorrt_rtx")
    from mixq_onnx.trt.builder import BuildConfig, build_engine
    from mixq_onnx.trt.inspect import inspect_plan

    build_engine(path, tmp_path / "m.plan", BuildConfig(backend="tensorrt-rtx", batch=(1, 1, 1)))
    eng = inspect_plan(tmp_path / "m.plan")
    assert not any("AveragePool" in li["name"] for li in eng.layers), [li["name"] for li in eng.layers]
    assert eng.int8_mac_fraction == 1.0
