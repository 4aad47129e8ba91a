"""Placement revision 3: a BatchNorm1d that normalises a Linear's output features (LeViT's LinearNorm: linear,
flatten(0, 1), BN1d, reshape back) is folded into the Linear, as a conv's BatchNorm is; before, every such BN
stayed a float BatchNormalization between the int8 GEMM and the next quantizer (46 of them in LeViT-128S)."""
from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch
import torch.nn as nn

from mixq_onnx.models.preprocessing import ATTR, Preprocessing
from mixq_onnx.onnx import export_qdq
from mixq_onnx.onnx.check import check_model, report
from mixq_onnx.onnx.verify import verify_onnx
from mixq_onnx.quant import QuantConfig, load_quantized, quantize, quantizers, save_quantized
from mixq_onnx.quant.graph import prepare, set_quant_state


class LinearNorm(nn.Module):
    """timm LeViT's layout."""

    def __init__(self, i: int, o: int, tap: bool = False):
        super().__init__()
        self.linear = nn.Linear(i, o, bias=False)
        self.bn = nn.BatchNorm1d(o)
        self.tap = tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        y = self.bn(x.flatten(0, 1)).reshape_as(x)
        return y + x if self.tap else y  # tapped: the linear's output is read for its values too, so no fold


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.act0 = nn.Hardswish()
        self.mlp1, self.act, self.mlp2 = LinearNorm(16, 32), nn.Hardswish(), LinearNorm(32, 16)
        self.tapped = LinearNorm(16, 16, tap=True)
        self.across = nn.Linear(16, 16)
        self.bn_tokens = nn.BatchNorm1d(16)  # on (B, N, C): normalises the 16 tokens, not the Linear's 16 features
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act0(self.stem(x)).flatten(2).transpose(1, 2)  # (B, 16 tokens, 16 features)
        x = x + self.mlp2(self.act(self.mlp1(x)))
        x = self.act(self.tapped(x))
        y = self.bn_tokens(self.across(x))
        return self.head(y.mean(1))


def tokens() -> nn.Module:
    torch.manual_seed(0)
    m = Tokens().eval()
    for bn in (m.mlp1.bn, m.mlp2.bn, m.tapped.bn, m.bn_tokens):  # trained-looking statistics: a fold that is off shows
        n = bn.num_features
        bn.running_mean.copy_(torch.randn(n))
        bn.running_var.copy_(torch.rand(n) * 2 + 0.3)
        bn.weight.data.copy_(torch.randn(n))
        bn.bias.data.copy_(torch.randn(n))
    setattr(m, ATTR, Preprocessing(input_size=(3, 16, 16), mean=(0.5,) * 3, std=(0.25,) * 3))
    return m


def _bns(m: nn.Module) -> list[str]:
    return sorted(n for n, x in m.named_modules() if isinstance(x, nn.BatchNorm1d))


def test_a_linear_norm_folds_from_revision_3_only_where_it_is_the_same_network():
    model = tokens()
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    kept = {2: ["bn_tokens", "mlp1.bn", "mlp2.bn", "tapped.bn"], 3: ["bn_tokens", "tapped.bn"]}
    for rev, want in kept.items():
        gm = prepare(model, QuantConfig(wbits=8, abits=8, method="rtn", placement=rev))
        assert _bns(gm) == want, (rev, _bns(gm))
        with torch.no_grad():
            out = gm(x)  # no scale set yet: the prepared model computes in float
        assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), rev
    folded = prepare(model, QuantConfig(wbits=8, abits=8, method="rtn", placement=3))
    # the folded Linear now carries the BN's shift as its bias
    assert folded.mlp1.linear.bias is not None and model.mlp1.linear.bias is None
    # the residual add after a folded LinearNorm quantizes its identity input, as after a conv
    residual = [q for q in quantizers(folded).values() if q.kind == "act" and q.spec.placement == "residual"]
    assert len(residual) == 1, [q.name for q in residual]


def test_the_folded_export_has_no_batchnorm_left_for_those_layers_and_is_exact(tmp_path):
    model = tokens()
    calib = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    images = torch.randint(0, 256, (16, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    ops = {}
    for rev in (2, 3):
        q = quantize(model, QuantConfig(wbits=8, abits=8, method="rtn", placement=rev), calib, progress=False)
        g = export_qdq(q, tmp_path / f"r{rev}.onnx")
        ops[rev] = Counter(n.op_type for n in onnx.load(g).graph.node)
        rep = report(check_model(g))
        assert rep["ok"] and rep["errors"] == 0, rep["violations"]
        v = verify_onnx(g, q, images)
        assert v.top1_agreement == 100.0 and v.max_abs_diff == 0.0, (rev, v.max_abs_diff)
        if rev == 3:  # the folder rebuilds with its revision and reproduces the model
            save_quantized(q, tmp_path / "q3")
            back = load_quantized(tokens(), tmp_path / "q3")
            set_quant_state(back, True, True)
            x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
            with torch.no_grad():
                assert torch.equal(back(x), q(x))
    assert ops[2]["BatchNormalization"] == 4 and ops[3]["BatchNormalization"] == 2, (ops[2], ops[3])


@pytest.mark.parametrize("rev", [1, 2])
def test_an_older_folder_keeps_its_batchnorms(rev, tmp_path):
    """A folder written before revision 3 records its revision and reloads with the BatchNorms it was made with."""
    model = tokens()
    q = quantize(model, QuantConfig(wbits=8, abits=8, method="rtn", placement=rev), torch.randn(16, 3, 16, 16),
                 progress=False)
    save_quantized(q, tmp_path / "old")
    back = load_quantized(tokens(), tmp_path / "old")
    assert _bns(back) == _bns(q) and "mlp1.bn" in _bns(back)


def test_a_batchnorm_on_batch_statistics_is_kept_not_folded(tmp_path):
    """A BatchNorm with track_running_stats=False normalises by the batch's own statistics even in eval: folding
    read its running_mean, None, and quantize ended in a TypeError traceback."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, track_running_stats=False), nn.ReLU(),
                      nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    setattr(m, ATTR, Preprocessing(input_size=(3, 8, 8)))
    q = quantize(m, QuantConfig(wbits=8, abits=8, method="rtn"), torch.randn(16, 3, 8, 8), progress=False)
    assert any(isinstance(x, nn.BatchNorm2d) for x in q.modules())
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = m(x), q(x)
    assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())
    g = export_qdq(q, tmp_path / "m.onnx")
    rep = report(check_model(g))
    assert rep["ok"] and not [v for v in rep["violations"] if v["rule"] == "unfolded-batchnorm"], rep
    v = verify_onnx(g, q, torch.randint(0, 256, (8, 8, 8, 3), dtype=torch.uint8))
    assert v.top1_agreement == 100.0 and v.max_abs_diff == 0.0


class InputNorms(nn.Module):
    """BatchNorms before layers: two classifier heads that each normalise one tensor (RepViT's and LeViT's
    BatchNorm1d -> Dropout -> Linear), a BatchNorm2d before an unpadded 1x1 conv (folds), one before a padded conv
    and one before a ReLU (neither folds: padding zeros and the ReLU are not linear in what the BN makes)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_pw, self.pw = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)
        self.bn_pad, self.pad = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.bn_act, self.conv = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)
        self.bn_h, self.drop_h, self.head = nn.BatchNorm1d(8), nn.Dropout(0.0), nn.Linear(8, 10)
        self.bn_d, self.drop_d, self.dist = nn.BatchNorm1d(8), nn.Dropout(0.0), nn.Linear(8, 10)
        g = torch.Generator().manual_seed(0)
        for m in self.modules():  # trained statistics: a fold that ignored one would change the output
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.data.copy_(torch.randn(m.num_features, generator=g))
                m.bias.data.copy_(torch.randn(m.num_features, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.pw(self.bn_pw(x)))
        x = torch.relu(self.pad(self.bn_pad(x)))
        x = self.conv(torch.relu(self.bn_act(x)))
        f = x.mean((2, 3))
        return self.head(self.drop_h(self.bn_h(f))) + self.dist(self.drop_d(self.bn_d(f)))


def _input_norms() -> nn.Module:
    torch.manual_seed(0)
    m = InputNorms().eval()
    setattr(m, ATTR, Preprocessing(input_size=(3, 8, 8)))
    return m


def test_a_batchnorm_a_linear_or_unpadded_conv_alone_reads_folds_into_it_from_revision_6(tmp_path):
    """Placement revision 6: the heads' BatchNorm1d and the 1x1 conv's BatchNorm2d fold into the layer after them
    (exactly: the float network is unchanged), the two heads then read one tensor through one quantizer, and the
    export keeps only the padded conv's and the ReLU's BatchNormalization. A revision-5 folder keeps all five."""
    model = _input_norms()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    bns = {}
    for rev in (5, 6):
        gm = prepare(model, QuantConfig(wbits=8, abits=8, first_last_bits=None, placement=rev))
        set_quant_state(gm, weights=False, acts=False)
        with torch.no_grad():
            assert torch.allclose(gm(x), model(x), rtol=1e-4, atol=1e-4)
        bns[rev] = sorted(n for n, m in gm.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert bns[5] == ["bn_act", "bn_d", "bn_h", "bn_pad", "bn_pw"] and bns[6] == ["bn_act", "bn_pad"]
    calib = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images = torch.randint(0, 256, (8, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    for rev in (5, 6):
        q = quantize(model, QuantConfig(wbits=8, abits=8, method="rtn", first_last_bits=None, placement=rev), calib,
                     progress=False)
        heads = q.head.input_quantizer is q.dist.input_quantizer
        assert heads == (rev == 6)
        path = export_qdq(q, tmp_path / f"m{rev}.onnx")
        ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
        assert ops["BatchNormalization"] == (5 if rev == 5 else 2)
        rep = report(check_model(path))
        assert rep["ok"] and not [v for v in rep["violations"] if v["rule"] == "duplicate-qdq"]
        v = verify_onnx(path, q, images)
        assert v.top1_agreement == 100.0 and v.max_abs_diff == 0.0 and v.code_mismatch_fraction == 0.0
        again = load_quantized(_input_norms(), save_quantized(q, tmp_path / f"q{rev}"))
        with torch.no_grad():
            assert torch.equal(again(x), q(x))
        assert again.mixq_config.placement == rev


def test_both_heads_of_a_distilled_network_are_last_layers_from_revision_6():
    """The first/last-layer policy took the last layer called: of two heads whose outputs are summed, one got 8 bits
    and the other the network's 4, so the two could not share the one quantizer of their input. From revision 6
    every layer whose output reaches the model's output through no other layer is a last layer."""
    from mixq_onnx.quant.graph import output_layers

    model = _input_norms()
    cfg = {rev: QuantConfig(wbits=4, abits=4, placement=rev) for rev in (5, 6)}
    gm = {rev: prepare(model, c) for rev, c in cfg.items()}
    assert gm[5].mixq_first_last == ("stem", "dist") and gm[6].mixq_first_last == ("stem", "head", "dist")
    assert gm[5].head.weight_quantizer.bits == 4 and gm[5].head.input_quantizer is not gm[5].dist.input_quantizer
    assert gm[6].head.weight_quantizer.bits == gm[6].dist.weight_quantizer.bits == 8
    assert gm[6].head.input_quantizer is gm[6].dist.input_quantizer and gm[6].head.input_quantizer.bits == 8
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    x = torch.randn(2, 3, 8, 8)
    assert output_layers(model, layers, x) == ["head", "dist"]
    # a layer not asked about is looked through: the conv then reaches the output through head's path
    assert output_layers(model, {k: v for k, v in layers.items() if k != "head"}, x) == ["conv", "dist"]
