"""QuantSpec: the one record of a quantizer's grid, from the quantizer to quant.json and back."""
from __future__ import annotations

import pytest
import torch

from mixq_onnx.quant.quantizer import ActQuantizer, WeightQuantizer
from mixq_onnx.quant.spec import QuantSpec


@pytest.mark.parametrize("bits", range(2, 9))
def test_grids(bits):
    w = QuantSpec("l.weight", "weight", "weight", bits, True, True, axis=0)
    assert w.grid() == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)  # narrow signed
    a = QuantSpec("l.input", "act", "input", bits, True, True)
    assert a.grid() == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    u = QuantSpec("l.input", "act", "input", bits, False, True)
    assert u.grid() == (0, 2**bits - 1)
    asym = QuantSpec("l.input", "act", "input", bits, False, False)
    assert asym.grid() == (0, 2**bits - 1) and asym.container() == (0, 255)
    assert a.needs_clip() == (bits < 8)  # activations only: a weight grid never meets a Clip
    assert u.describe() == f"{bits}-bit unsigned on INT8" and a.describe() == f"{bits}-bit on INT8"


def test_quantizers_own_their_spec_and_records_round_trip():
    a = ActQuantizer("l.input", 4)
    a.signed = False
    a.scale.data.fill_(0.5)
    rec = a.record()
    assert (rec["qmin"], rec["qmax"]) == a.qrange == (0, 15)
    assert QuantSpec.from_record(rec) == a.spec
    w = WeightQuantizer("l.weight", 3, axis=0)
    w.set_scale(torch.full((4,), 0.1))
    rec = w.record()
    assert list(rec) == ["name", "kind", "placement", "bits", "signed", "symmetric", "axis", "qmin", "qmax",
                         "block_size", "scale_shape", "scale", "zero_point"]  # quant.json's key order
    assert QuantSpec.from_record(rec) == w.spec and (rec["qmin"], rec["qmax"]) == (-3, 3)


def test_apply_spec_restores_bits_and_sign_and_refuses_another_quantizer():
    a = ActQuantizer("l.input", 8)
    a.apply_spec(QuantSpec("l.input", "act", "input", 4, False, True))
    assert a.bits == 4 and a.signed is False and a.qrange == (0, 15)
    with pytest.raises(ValueError, match="placement"):
        a.apply_spec(QuantSpec("l.input", "act", "residual", 4, False, True))
    with pytest.raises(ValueError, match="name"):
        a.apply_spec(QuantSpec("other.input", "act", "input", 4, False, True))
