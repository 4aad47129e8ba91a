"""Which layers quantize reproduces, and what it says about the rest (review, 2026-11-30): timm's
weight-standardised convs (BiT, NFNet) were quantized from their raw weights, a different network that every
later stage, verify included, agreed with; transposed, reflect-padded and custom-forward layers stayed float
without a word."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ScaledStdConv2d, StdConv2d, StdConv2dSame

from mixq_onnx.errors import MixqError
from mixq_onnx.models.preprocessing import ATTR, Preprocessing
from mixq_onnx.onnx import export_qdq
from mixq_onnx.onnx.check import check_model, report
from mixq_onnx.onnx.verify import verify_onnx
from mixq_onnx.quant import QuantConfig, quantize
from mixq_onnx.quant.graph import prepare, set_quant_state


class Doubled(nn.Conv2d):
    """A conv subclass with its own forward: its `.weight` is not what it convolves with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, 2 * self.weight, self.bias, self.stride, self.padding)


def _net(first: nn.Module, side: int = 8) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        first.weight.add_(0.5).mul_(7)  # a weight whose standardisation changes it a lot
    m = nn.Sequential(first, nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(8 * side * side, 10)).eval()
    setattr(m, ATTR, Preprocessing(input_size=(3, side, side), mean=(0.5,) * 3, std=(0.25,) * 3))
    return m


@pytest.mark.parametrize("make", [lambda: StdConv2d(3, 8, 3, padding=1), lambda: ScaledStdConv2d(3, 8, 3, padding=1),
                                  lambda: StdConv2dSame(3, 8, 3, padding="same")],
                         ids=["StdConv2d", "ScaledStdConv2d", "StdConv2dSame"])
def test_weight_standardised_convs_are_the_network_they_were(make, tmp_path):
    torch.set_num_threads(1)
    model = _net(make())
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    q = quantize(model, QuantConfig(wbits=8, abits=8, method="rtn"), torch.randn(32, 3, 8, 8), progress=False)
    assert "unquantized_layers" not in q.mixq_report
    with torch.no_grad():
        f, y = model(x), q(x)
        set_quant_state(q, False, False)
        off = q(x)
        set_quant_state(q, True, True)
    assert float((off - f).abs().max()) <= 1e-5 * float(f.abs().max())  # the raw weights gave 5.8x the outputs
    assert float((y - f).abs().max()) < 0.1 * float(f.abs().max())
    g = export_qdq(q, tmp_path / "m.onnx")
    assert report(check_model(g))["ok"]
    rep = verify_onnx(g, q, (x * 0.25 + 0.5).mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
    assert rep.top1_agreement == 100.0 and rep.max_abs_diff == 0.0


def test_layers_quantize_cannot_reproduce_stay_float_and_are_named(tmp_path):
    torch.set_num_threads(1)
    model = nn.Sequential(Doubled(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 8, 2, stride=2), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16 * 16, 10)).eval()
    setattr(model, ATTR, Preprocessing(input_size=(3, 8, 8)))
    q = quantize(model, QuantConfig(wbits=8, abits=8, method="rtn"), torch.randn(8, 3, 8, 8), progress=False)
    assert q.mixq_report["unquantized_layers"] == ["0", "2", "4"]
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        set_quant_state(q, False, False)
        assert torch.allclose(q(x), model(x), atol=1e-5)  # the custom forward kept, not its raw weight
    # a transposed conv left float no longer passes check unnoticed
    vs = report(check_model(export_qdq(q, tmp_path / "m.onnx")))["violations"]
    assert any(v["rule"] == "unquantized-input" and "ConvTranspose" in v["node"] for v in vs), vs
    # the reflect-padded conv is a Conv the export tags as the folder's float layer: a warning that names it
    assert [(v["rule"], v["severity"]) for v in vs if v["node"].startswith("4/")] == [("float-layer", "warning")], vs


def test_a_layer_inside_a_module_timm_keeps_opaque_is_the_folders_float_layer(tmp_path):
    """timm traces its ConvMlp (VGG's pre-logits: two convs behind an input-size check) as one leaf, so quantize
    leaves its convs float and says so; the export did not tag them and `check` failed the folder's own graph
    (exit 1: unquantized-input, unquantized-weight) for a layout quantize had reported. Placement revision 3, as a
    folder written before revision 4 (which traces into the leaf, tests/test_tracing.py) is rebuilt."""
    from timm.models.vgg import ConvMlp

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), ConvMlp(8, 10, kernel_size=3),
                          nn.Flatten(), nn.Linear(10 * 6 * 6, 10)).eval()
    setattr(model, ATTR, Preprocessing(input_size=(3, 8, 8)))
    q = quantize(model, QuantConfig(wbits=8, abits=8, method="rtn", placement=3), torch.randn(8, 3, 8, 8),
                 progress=False)
    assert q.mixq_report["unquantized_layers"] == ["2.fc1", "2.fc2"]
    g = export_qdq(q, tmp_path / "m.onnx")
    rep = report(check_model(g))
    assert rep["ok"] and rep["errors"] == 0, rep["violations"]
    floats = sorted(v["node"] for v in rep["violations"] if v["rule"] == "float-layer")
    assert floats == ["2.fc1/Conv", "2.fc2/Conv"] and all("could not quantize" in v["message"]
                                                         for v in rep["violations"] if v["rule"] == "float-layer")
    images = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    v = verify_onnx(g, q, images)
    assert v.top1_agreement == 100.0 and v.max_abs_diff == 0.0


def test_prepare_refuses_a_model_it_would_change(monkeypatch):
    """The safety net behind the list above: with quantizers off, the prepared model must be the user's."""
    import mixq_onnx.quant.modules as modules

    model = _net(Doubled(3, 8, 3, padding=1))
    monkeypatch.setattr(modules, "layer_weight", lambda layer: getattr(layer, "weight", None))  # as before the fix: raw weights
    import mixq_onnx.quant.graph as graph

    monkeypatch.setattr(graph, "layer_weight", lambda layer: getattr(layer, "weight", None))
    with pytest.raises(MixqError, match="differs from the float model by .* before any quantization"):
        prepare(model, QuantConfig(wbits=8, abits=8, method="rtn"))


class Twice(nn.Module):
    """One conv applied to two tensors (tied weights): it cannot have one input quantizer for both."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(torch.relu(self.conv(x))))


def test_a_layer_called_twice_stays_float_and_a_nan_weight_is_refused(tmp_path):
    """A layer called twice passed quantize and failed at export; a NaN weight became an all-zero channel with
    scale 1 and passed every stage (review, 2026-11-30)."""
    torch.set_num_threads(1)
    model = Twice().eval()
    setattr(model, ATTR, Preprocessing(input_size=(3, 8, 8)))
    q = quantize(model, QuantConfig(wbits=8, abits=8, method="rtn"), torch.randn(8, 3, 8, 8), progress=False)
    assert q.mixq_report["unquantized_layers"] == ["conv"]
    x = torch.randn(4, 3, 8, 8)
    rep = verify_onnx(export_qdq(q, tmp_path / "t.onnx"), q, (x * 40 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
    assert rep.top1_agreement == 100.0
    with torch.no_grad():
        model.conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(MixqError, match=r"parameter conv.weight of Twice holds NaN or inf"):
        quantize(model, QuantConfig(wbits=8, abits=8, method="rtn"), torch.randn(8, 3, 8, 8), progress=False)


def test_qat_names_the_layers_it_leaves_float_as_quantize_does():
    """qat's report had no `unquantized_layers` and its command no warning (review, 2026-11-30)."""
    from mixq_onnx.qat import QATConfig
    from mixq_onnx.qat import train as qat_train
    from mixq_onnx.training import TrainData

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 8, 2, stride=2), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16 * 16, 10)).eval()
    setattr(model, ATTR, Preprocessing(input_size=(3, 8, 8)))
    data = TrainData(torch.randn(16, 3, 8, 8), None, "random")
    for cfg in (QATConfig(method="lsq", wbits=4, abits=4, epochs=1, final_epochs=0, batch_size=8),
                QATConfig(target_bits=4.0, epochs=1, final_epochs=0, batch_size=8, first_last_bits=None)):
        q = qat_train(model, cfg, data, progress=False)
        assert q.mixq_report["unquantized_layers"] == ["2"], cfg.method
        assert q.mixq_qat_report["unquantized_layers"] == ["2"]
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    setattr(plain, ATTR, Preprocessing(input_size=(3, 8, 8)))
    q = qat_train(plain, QATConfig(method="lsq", wbits=4, abits=4, epochs=1, final_epochs=0, batch_size=8), data,
                  progress=False)
    assert "unquantized_layers" not in q.mixq_report and "unquantized_layers" not in q.mixq_qat_report
