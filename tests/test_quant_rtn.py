"""Acceptance (issue 4, point 1): round-to-nearest properties on random shapes (K % G != 0 included),
scales of magnitude 1e-4..1e2, constant rows, rows with one huge outlier, all-zero groups; and
NF4, FP8 and INT8 activations against independent references."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from minillm.errors import MinillmError
from minillm.quant import QuantSpec, quantize_fp8, quantize_nf4, quantize_rtn
from minillm.quant.activations import quantize_per_token
from minillm.quant.fp8 import decode_e4m3, encode_e4m3
from minillm.quant.nf4 import NF4_LEVELS
from minillm.quant.qlinear import QuantLinear
from minillm.quant.rtn import mse_range, minmax_range, scale_zero, quantize_groups, to_groups

LARGEST = {"float16": float(np.finfo(np.float16).max), "bfloat16": float(np.uint32(0x7F7F0000).view(np.float32)),
           "float32": float(np.finfo(np.float32).max)}  # each storage dtype's largest finite value

specs = st.builds(
    QuantSpec,
    bits=st.sampled_from([2, 3, 4, 8]),
    granularity=st.sampled_from(["tensor", "channel", "group"]),
    group_size=st.sampled_from([8, 32, 64, 128]),
    sym=st.booleans(),
    scale_dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
)


@st.composite
def weights(draw):
    n, k = draw(st.integers(1, 12)), draw(st.integers(1, 300))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    magnitude = 10.0 ** draw(st.floats(-4, 2))
    w = rng.normal(0, magnitude, size=(n, k)).astype(np.float32)
    kind = draw(st.sampled_from(["normal", "constant-row", "outlier", "zero-row", "zero-group", "one-sided"]))
    if kind == "constant-row":
        w[0] = magnitude * draw(st.floats(-3, 3))
    elif kind == "outlier":
        w[0, draw(st.integers(0, k - 1))] = magnitude * 1e3
    elif kind == "zero-row":
        w[-1] = 0
    elif kind == "zero-group":
        w[:, : min(k, 32)] = 0
    elif kind == "one-sided":
        w = np.abs(w)
    return w


@settings(max_examples=200, deadline=None)
@given(w=weights(), spec=specs)
def test_rtn_properties(w, spec):
    qt = quantize_rtn(w, spec)
    n, k = w.shape
    g = spec.num_groups(k)
    expected = (1, 1) if spec.granularity == "tensor" else (n, g if spec.granularity == "group" else 1)
    assert qt.scales.shape == expected and qt.zeros.shape == expected
    assert qt.codes.shape == (n, k)
    assert qt.codes.min() >= 0 and qt.codes.max() <= spec.qmax
    assert qt.zeros.max() <= spec.qmax
    if spec.sym:
        assert np.all(qt.zeros == spec.sym_zero)
    dq = qt.dequantize()
    assert np.isfinite(dq).all() and np.isfinite(qt.scales).all() and (qt.scales > 0).all()
    # The scales are exactly representable in their storage dtype.
    if spec.scale_dtype == "float16":
        assert np.array_equal(qt.scales.astype(np.float16).astype(np.float32), qt.scales)
    # Inside the clip range [scale*(0 - z), scale*(qmax - z)], rounding moves a weight by <= scale/2.
    gi = qt.group_index()
    s = np.broadcast_to(qt.scales[:, gi], w.shape)
    z = np.broadcast_to(qt.zeros[:, gi].astype(np.float64), w.shape)
    t = w / s + z  # position on the integer grid
    inside = (t >= -0.5 - 1e-4) & (t <= spec.qmax + 0.5 + 1e-4)  # float32 resolution at t ~ 255
    err = np.abs(w.astype(np.float64) - dq)
    # (+ a few float32 ulps of w: dequantization itself rounds once)
    assert np.all(err[inside] <= s[inside] / 2 * (1 + 1e-6) + 4 * 2.0**-23 * np.abs(w[inside]))
    # With min/max ranges (scales rounded up) every weight is inside, unless its group's range is too
    # wide for the storage dtype: the scale then saturates at the largest finite value and the
    # extremes clip (a 2-bit group holding 1e5 needs a scale above fp16's 65504).
    assert inside[s < LARGEST[spec.scale_dtype]].all()
    # All-zero rows stay exactly zero.
    zero_rows = ~w.any(axis=1)
    assert np.all(dq[zero_rows] == 0)


@settings(max_examples=60, deadline=None)
@given(w=weights(), spec=specs)
@example(w=np.array([[1e5]], np.float32), spec=QuantSpec(bits=2, granularity="tensor", sym=True, scale_dtype="float16"))
def test_mse_clipping_never_worse_than_minmax(w, spec):
    groups = to_groups(w, spec)

    def sq_err(lo, hi):
        scale, zero = scale_zero(lo, hi, spec)
        dq = (quantize_groups(groups, scale, zero, spec) - zero[..., None]) * scale[..., None]
        return ((groups - dq) ** 2).sum(axis=-1)

    assert np.all(sq_err(*mse_range(groups, spec)) <= sq_err(*minmax_range(groups)) * (1 + 1e-9))


@pytest.mark.parametrize("sym", [True, False])
def test_a_range_beyond_the_scale_dtype_saturates(sym):
    """2-bit, fp16 scales, a 1e5 outlier (hypothesis found it): the scale (2e5 / 3 symmetric, 1e5 / 3
    asymmetric with a -1e5 partner) would be inf in fp16 and dequantize to NaN. It saturates at
    65504, the outlier clips to the grid's end, and everything else stays within half a step."""
    w = np.array([[1e5, 1.0, -3.0, 0.5], [1e5 if sym else -1e5, 1e5, 2.0, -1.0]], np.float32)
    spec = QuantSpec(bits=2, granularity="channel", sym=sym, scale_dtype="float16")
    qt = quantize_rtn(w, spec)
    dq = qt.dequantize()
    assert np.isfinite(dq).all() and np.isfinite(qt.scales).all()
    s = qt.scales[:, 0]
    assert np.all(s <= 65504.0) and np.any(s == 65504.0)
    grid = (np.arange(spec.qmax + 1)[None, :] - qt.zeros[:, :1].astype(np.float64)) * s[:, None]
    nearest = grid[np.arange(2)[:, None], np.abs(w[:, :, None] - grid[:, None, :]).argmin(-1)]
    np.testing.assert_allclose(dq, nearest, rtol=1e-6)  # each weight at its nearest grid point


@pytest.mark.parametrize("bad", [dict(bits=5), dict(bits=1), dict(group_size=0), dict(group_size=100),
                                 dict(granularity="row"), dict(scale_dtype="float8")])
def test_unsupported_specs_are_clear_errors(bad):
    with pytest.raises(MinillmError):
        QuantSpec(**bad)


# ------------------------------------------------------------------------------------------------
# NF4, FP8, INT8 activations
# ------------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(w=weights())
def test_nf4_picks_the_nearest_level(w):
    t = quantize_nf4(w)
    dq = t.dequantize()
    assert np.isfinite(dq).all()
    scale = np.repeat(t.absmax, t.block, axis=1)[:, : w.shape[1]]
    normed = w / scale
    # No other level is nearer than the chosen one (brute force over all 16).
    dist_all = np.abs(normed[..., None] - NF4_LEVELS)
    chosen = np.take_along_axis(dist_all, t.codes[..., None].astype(np.int64), -1)[..., 0]
    assert np.all(chosen <= dist_all.min(axis=-1) + 1e-6)
    assert np.all(np.abs(normed) <= 1 + 1e-6)


def test_fp8_matches_torch_cast():
    import torch

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 50, 50000), np.linspace(-448, 448, 9001), [0.0, -0.0, 2.0**-9, 2.0**-10]])
    ref = torch.from_numpy(x).to(torch.float8_e4m3fn)
    assert np.array_equal(encode_e4m3(x), ref.view(torch.uint8).numpy())
    codes = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(decode_e4m3(codes), torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy())


@settings(max_examples=40, deadline=None)
@given(w=weights(), per_channel=st.booleans())
def test_fp8_weight_error_within_half_a_step(w, per_channel):
    t = quantize_fp8(w, per_channel)
    dq = t.dequantize()
    # E4M3 has 3 mantissa bits: relative step 2^-3 for normals, so |error| <= 2^-4 |w| + half the
    # subnormal step (2^-10 of the scale).
    bound = np.abs(w) * 2.0**-4 + t.scale * 2.0**-10
    assert np.all(np.abs(dq - w) <= bound * (1 + 1e-6))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), t=st.integers(1, 6), k=st.integers(1, 200), n=st.integers(1, 20))
def test_w8a8_dynamic_matches_float_within_rounding(seed, t, k, n):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(t, k)).astype(np.float32)
    w = rng.normal(size=(n, k)).astype(np.float32)
    qt = quantize_rtn(w, QuantSpec(8, "channel", sym=True, scale_dtype="float32"))
    layer = QuantLinear(qt, act="dynamic")
    y = layer(x)
    # Independent: dequantize both operands and multiply in float64.
    xq, xs = quantize_per_token(x)
    ref = (xq.astype(np.float64) * xs) @ qt.dequantize().astype(np.float64).T
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # And the quantization error against the float product is what the step sizes allow:
    # |x_q s - x| <= s/2 per element, so |y - x W^T| <= sum_k (|x| dw + |w| dx + dx dw).
    dx = np.broadcast_to(xs / 2, x.shape)
    dw = np.broadcast_to(qt.scales / 2, w.shape)
    bound = np.abs(x) @ dw.T + dx @ np.abs(w).T + dx @ dw.T
    assert np.all(np.abs(y - x @ w.T) <= bound * 1.001 + 1e-5)
