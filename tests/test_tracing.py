"""Tracing into the modules timm keeps opaque to torch.fx (placement revision 4, `quant.tracing`).

timm registers ConViT's GPSA, NFNet's NormFreeBlock, MobileViT's and TinyViT's blocks, EfficientViT's LiteMLA and
VGG's ConvMlp as fx leaves; before revision 4 every Conv/Linear/MatMul inside one stayed float (the timm survey:
84 float layers and 116 check errors on nf_regnet_b0, 40 float layers and 49 errors on convit_tiny)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixq_onnx.errors import MixqError
from mixq_onnx.models.preprocessing import ATTR, Preprocessing
from mixq_onnx.onnx import export_qdq
from mixq_onnx.onnx.check import check_model, report
from mixq_onnx.onnx.verify import verify_onnx
from mixq_onnx.quant import QuantConfig, quantize
from mixq_onnx.quant.graph import prepare, set_quant_state
from mixq_onnx.quant.io import load_quantized, save_quantized
from mixq_onnx.quant.reconstruct import summarize
from mixq_onnx.quant.tracing import trace, trace_concrete, trace_leaves


class ShapeBranches(nn.Module):
    """What makes timm keep a module opaque: decisions on the input's shape, `math.ceil` of a size, a plain tensor
    attribute meeting the batch size, the device's type as a string."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.table = torch.arange(6.0).reshape(1, 1, 6)  # a plain attribute, not a buffer (ConViT's rel_indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        if N % 4:  # pad the tokens to a multiple of 4 (taken for N = 6)
            x = F.pad(x, (0, 0, 0, math.ceil(N / 4) * 4 - N))
        else:
            x = x * 3
        if x.device.type == "cpu":
            x = x + self.table.expand(B, -1, -1)
        return self.fc(x)[:, :N]


def test_a_forward_that_branches_on_shapes_traces_on_its_example_and_keeps_the_batch_symbolic():
    m = ShapeBranches().eval()
    with pytest.raises(MixqError, match="cannot trace"):
        trace(m)
    x = torch.randn(2, 6, 6)
    gm = trace_concrete(m, (x,), {})
    code = gm.code
    assert "pad" in code and "* 3" not in code  # the branch that ran, and only it
    for batch in (1, 2, 5):  # the batch was never frozen
        y = torch.randn(batch, 6, 6)
        with torch.no_grad():
            assert torch.equal(gm(y), m(y))
    assert "table" in dict(gm.named_buffers())  # the plain attribute travels with the graph, as a buffer


class BatchBranch(nn.Module):
    """A decision on the batch size: a graph frozen on one example batch would be another function."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * 2 if x.shape[0] > 2 else self.fc(x)


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.branchy, self.head = ShapeBranches(), BatchBranch(), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branchy(self.head(self.inner(x)))


def test_trace_leaves_replaces_a_faithful_graph_and_keeps_the_rest_opaque():
    model = Holder().eval()
    x = torch.randn(2, 6, 6)
    with torch.no_grad():
        want = model(x), model(torch.cat([x, x, x]))
    traced, kept = trace_leaves(model, x, types=(ShapeBranches, BatchBranch))
    assert traced == ["inner"] and kept == ["branchy"]
    assert isinstance(model.inner, torch.fx.GraphModule) and isinstance(model.branchy, BatchBranch)
    assert model.inner.fc is not None and model.get_submodule("inner.fc").out_features == 6  # same paths
    with torch.no_grad():
        assert torch.equal(model(x), want[0]) and torch.equal(model(torch.cat([x, x, x])), want[1])


def _tiny(model: nn.Module, side: int) -> nn.Module:
    setattr(model, ATTR, Preprocessing(input_size=(3, side, side), mean=(0.5,) * 3, std=(0.25,) * 3))
    return model.eval()


def _convmlp() -> nn.Module:
    from timm.models.vgg import ConvMlp

    torch.manual_seed(0)
    return _tiny(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), ConvMlp(8, 10, kernel_size=3),
                               nn.Flatten(), nn.Linear(10 * 6 * 6, 10)), 8)


def _convit() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return _tiny(timm.create_model("convit_tiny", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2,
                                   num_heads=2, local_up_to_layer=1, num_classes=10), 32)


def _nfnet() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return _tiny(timm.create_model("nf_regnet_b0", pretrained=False, num_classes=10), 32)


@pytest.mark.parametrize("make,leaf", [(_convmlp, "2"), (_convit, "blocks.0.attn"), (_nfnet, "stages.0.0")],
                         ids=["vgg-convmlp", "convit-gpsa", "nfnet-normfreeblock"])
def test_layers_inside_timm_leaves_are_quantized_exported_and_checked(tmp_path, make, leaf):
    """Revision 4 quantizes every Conv/Linear inside the leaf, the export passes `check` with no error and no
    float-layer warning, and the folder reloads with the same layout; revision 3 still leaves them float."""
    torch.set_num_threads(1)
    model = make()
    calib = torch.randn(4, *model.mixq_preprocessing.input_size, generator=torch.Generator().manual_seed(0))
    old = prepare(model, QuantConfig(wbits=8, abits=8, method="rtn", placement=3))
    assert any(n == leaf or n.startswith(leaf + ".") for n in old.mixq_unquantized), old.mixq_unquantized
    q = quantize(model, QuantConfig(wbits=8, abits=8, method="rtn"), calib, progress=False)
    assert q.mixq_config.placement >= 4
    assert "unquantized_layers" not in q.mixq_report, q.mixq_report.get("unquantized_layers")
    assert leaf in q.mixq_traced_leaves and leaf in q.mixq_report["traced_leaves"]
    assert "module" in summarize(q.mixq_report) and "timm keeps opaque" in summarize(q.mixq_report)
    g = export_qdq(q, tmp_path / "m.onnx")
    rep = report(check_model(g))
    assert rep["errors"] == 0 and not [v for v in rep["violations"] if v["rule"] == "float-layer"], rep["violations"]
    save_quantized(q, tmp_path / "q")
    back = load_quantized(model, tmp_path / "q")
    x = calib[:2]
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    images = torch.randint(0, 256, (4, *model.mixq_preprocessing.input_size[1:], 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    v = verify_onnx(g, q, images)
    assert v.code_mismatch_fraction == 0.0, v.per_quantizer
    if make is _convmlp:  # ReLU convs only: the integer layout is exact end to end
        assert v.max_abs_diff == 0.0 and v.top1_agreement == 100.0


def test_a_traced_leaf_computes_the_float_model_before_quantization():
    """The float check `prepare` makes (quantizers off: the user's network) holds for a traced leaf."""
    model = _convit()
    gm = prepare(model, QuantConfig(wbits=8, abits=8, method="rtn"))
    set_quant_state(gm, False, False)
    x = torch.randn(3, 3, 32, 32)  # another batch than the example's
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-5)
