"""Property tests of the quantizers: grids, AdaRound initialisation, hard rounding, zero points, reload."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixq_onnx.quant.quantizer import (
    ActQuantizer,
    WeightQuantizer,
    search_act_scale,
    search_weight_scale,
    weight_round,
)

SETTINGS = settings(max_examples=40, deadline=None)


def _weights(seed: int, cout: int, cin: int, scale: float) -> torch.Tensor:
    return torch.randn(cout, cin, 3, 3, generator=torch.Generator().manual_seed(seed)) * scale


@SETTINGS
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 8), cout=st.integers(1, 16), cin=st.integers(1, 8),
       mag=st.floats(1e-3, 10.0), symmetric=st.booleans())
def test_fake_quantized_weights_lie_on_their_grid(seed, bits, cout, cin, mag, symmetric):
    w = _weights(seed, cout, cin, mag)
    q = WeightQuantizer("w", bits, symmetric=symmetric)
    search_weight_scale(w, q)
    wq = q(w)
    s = q.scale.view(-1, 1, 1, 1)
    zp = q.zero_point.view(-1, 1, 1, 1)
    codes = wq / s + zp
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    lo, hi = q.qrange
    assert codes.round().min() >= lo and codes.round().max() <= hi
    if symmetric:
        assert (lo, hi) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)  # narrow range, TensorRT-legal
        assert torch.count_nonzero(q.zero_point) == 0


def _lp_reference(w: torch.Tensor, bits: int, symmetric: bool, p: float = 2.4,
                  grid: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping search spelt out one channel and one candidate at a time (first minimum wins)."""
    q = WeightQuantizer("ref", bits, symmetric=symmetric)
    lo, hi = q.qrange
    scales, zps = [], []
    for row in w.flatten(1):
        best = (float("inf"), 1.0, 0.0)
        for i in range(grid):
            r = 1.0 - i / grid * 0.85
            if symmetric:
                s = (row.abs().amax().clamp(min=1e-8) * r / hi).clamp(min=1e-10)
                zp = torch.zeros(())
            else:
                wmin, wmax = row.amin().clamp(max=0), row.amax().clamp(min=0)
                s = ((wmax - wmin) * r / (hi - lo)).clamp(min=1e-10)
                zp = torch.round(-wmin * r / s).clamp(lo, hi)
            deq = (torch.clamp(weight_round(row / s) + zp, lo, hi) - zp) * s
            err = float((row - deq).abs().pow(p).mean())
            if err < best[0]:
                best = (err, float(s), float(zp))
        scales.append(best[1])
        zps.append(best[2])
    return torch.tensor(scales), torch.tensor(zps)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 8), cout=st.integers(1, 12), cin=st.integers(1, 6),
       symmetric=st.booleans(), chunk=st.sampled_from([1, 9, 64, 1 << 18]))
def test_chunked_scale_search_matches_the_per_channel_search(seed, bits, cout, cin, symmetric, chunk):
    """search_weight_scale walks the rows a chunk at a time in reused buffers (speed on large layers); whatever
    the chunk, each channel gets the scale a one-channel-at-a-time search picks."""
    w = _weights(seed, cout, cin, 0.3)
    q = WeightQuantizer("w", bits, symmetric=symmetric)
    search_weight_scale(w, q, chunk=chunk)
    s, zp = _lp_reference(w, bits, symmetric)
    assert torch.equal(q.scale, s) and torch.equal(q.zero_point, zp)


@SETTINGS
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 8), relu=st.booleans(), mag=st.floats(1e-2, 50.0),
       symmetric=st.booleans())
def test_fake_quantized_activations_lie_on_their_grid(seed, bits, relu, mag, symmetric):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 8, 6, 6, generator=g) * mag
    if relu:
        x = x.clamp(min=0)
    q = ActQuantizer("a", bits, symmetric=symmetric)
    q.observing = True
    q(x)
    q.observing = False
    search_act_scale(q)
    y = q(x * 1.3)  # include values beyond the calibrated range
    codes = y / q.scale.detach() + q.zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    lo, hi = q.qrange
    assert codes.round().min() >= lo and codes.round().max() <= hi
    if symmetric:
        assert float(q.zero_point) == 0.0
        assert -128 <= lo and hi <= 127  # every symmetric grid maps onto INT8
        if relu and bits <= 7:
            assert (lo, hi) == (0, 2**bits - 1)


@SETTINGS
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 8), mag=st.floats(1e-3, 10.0))
def test_adaround_init_reproduces_round_to_nearest(seed, bits, mag):
    w = _weights(seed, 8, 4, mag)
    q = WeightQuantizer("w", bits)
    search_weight_scale(w, q)
    nearest = q.integers(w, "nearest")
    q.init_adaround(w)
    assert torch.equal(q.integers(w, "hard"), nearest)
    # the soft value at init is the unrounded w/s (inside the clipping range)
    s = q.scale.view(-1, 1, 1, 1)
    lo, hi = q.qrange
    inside = ((w / s) > lo) & ((w / s) < hi)
    assert torch.allclose(q.integers(w, "soft")[inside], (w / s)[inside], atol=1e-4)


@SETTINGS
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 8))
def test_hard_rounding_equals_learned_decisions(seed, bits):
    w = _weights(seed, 6, 3, 0.5)
    q = WeightQuantizer("w", bits)
    search_weight_scale(w, q)
    q.init_adaround(w)
    with torch.no_grad():  # pretend learning moved V anywhere
        q.alpha.copy_(torch.randn(q.alpha.shape, generator=torch.Generator().manual_seed(seed + 1)) * 3)
    decisions = (q.alpha >= 0).float()
    floor = q.w_floor.clone()
    q.finalize(w)
    lo, hi = q.qrange
    assert torch.equal(q.int_weight.float(), torch.clamp(floor + decisions, lo, hi))
    assert q.mode == "int" and q.int_weight.dtype == torch.int8


@SETTINGS
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 4), cout=st.integers(1, 8), nblocks=st.integers(1, 4),
       block=st.sampled_from([32, 64, 128]), mag=st.floats(1e-3, 10.0))
def test_block_scaled_weights_lie_on_their_block_grid(seed, bits, cout, nblocks, block, mag):
    """INT4 weight-only: each (row, block) has its own scale and every value is an integer of it."""
    w = torch.randn(cout, nblocks * block, generator=torch.Generator().manual_seed(seed)) * mag
    w[:, :block] *= 100.0  # one block far larger: per-block scales must not share it
    q = WeightQuantizer("w", bits, symmetric=True, block_size=block)
    search_weight_scale(w, q)
    assert tuple(q.scale.shape) == (cout, nblocks)
    q.finalize(w)
    wq = q(w)
    s = q.scale.repeat_interleave(block, dim=1)
    codes = wq / s
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert torch.equal(codes.round().to(torch.int8), q.int_weight)
    lo, hi = q.qrange
    assert q.int_weight.min() >= lo and q.int_weight.max() <= hi
    if nblocks > 1:  # the small blocks use their range, not the large block's
        assert (q.int_weight[:, block:].abs().amax(1) >= hi // 2).all()


@SETTINGS
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 8), symmetric=st.booleans())
def test_an_active_activation_quantizer_that_is_not_learning_passes_the_straight_through_gradient(seed, bits,
                                                                                                  symmetric):
    """A quantizer that is on but not learning (a method that learns only rounding with the activations
    quantized) sits inside the unit's trained path: its input gets gradient 1 inside the grid, 0 where the grid
    clamps, its output stays on the grid, and its step learns nothing."""
    g = torch.Generator().manual_seed(seed)
    q = ActQuantizer("a", bits, symmetric=symmetric)
    q.observing = True
    q(torch.randn(2, 4, 5, 5, generator=g))
    q.observing = False
    search_act_scale(q)
    q.scale.requires_grad_(True)  # even so: not learning, so no step gradient
    x = (torch.randn(2, 4, 5, 5, generator=g) * 2).requires_grad_(True)
    y = q(x)
    (y * torch.arange(y.numel()).view_as(y)).sum().backward()
    lo, hi = q.qrange
    r = torch.round(x.detach() / q.scale.detach()) + q.zero_point
    inside = (r >= lo) & (r <= hi)
    assert inside.any()
    weights = torch.arange(y.numel(), dtype=x.dtype).view_as(y)
    assert torch.equal(x.grad, torch.where(inside, weights, torch.zeros_like(weights)))
    assert q.scale.grad is None
    assert torch.equal(y.detach(), (torch.clamp(r, lo, hi) - q.zero_point) * q.scale.detach())
    assert not q(x.detach()).requires_grad  # nor through the plain form, on an input that wants no gradient
