"""Round-to-nearest (RTN) integer quantization, and the QuantizedTensor every integer format shares.

For one group of weights x (a row, or G consecutive columns of a row) with a chosen range [lo, hi]
that contains 0:

    asymmetric   scale = (hi - lo) / (2^b - 1)        zero = round(-lo / scale)      (an integer)
    symmetric    scale = 2 * max(|lo|, hi) / (2^b - 1) zero = 2^(b-1)
    quantize     q = clamp(round(x / scale) + zero, 0, 2^b - 1)
    dequantize   x' = scale * (q - zero)

Inside the range every |x - x'| <= scale / 2: rounding moves x by at most half a step. Keeping 0 in
the range makes 0 exact (zero is an integer), which padding and dead channels rely on. The range is
the min/max of the group, or clipped: at percentiles, or by a search for the shrink factor that
minimises the squared error (GPTQ's Quantizer, Frantar et al. 2022, App. A, does the same search).
Scales are rounded *up* to their storage dtype before the codes are computed, so the bound holds
for the stored scale and the whole chosen range stays representable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .spec import QuantSpec, round_scales_up

_TINY = {"float16": 2.0**-24, "bfloat16": 2.0**-133, "float32": 2.0**-149}  # smallest positive scale
# The largest finite scale: a range too wide for the storage dtype saturates there (its extremes clip)
# instead of storing an infinite scale that would dequantize to NaN.
_HUGE = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float32": float(np.finfo(np.float32).max)}


@dataclass
class QuantizedTensor:
    """W [N, K] as integer codes with per-group scales and zero points (all integer formats).

    codes   uint8 [N, K] in [0, 2^b - 1]
    scales  float32 [N, G] (or [1, 1] per-tensor), each exactly representable in spec.scale_dtype
    zeros   uint8   [N, G] (or [1, 1]); for symmetric specs all equal 2^(b-1)
    g_idx   int32 [K]: the group of each input column; None means column k is in group k // G.
            Act-order (GPTQ) quantizes columns in another order and records their groups here.
    """

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    spec: QuantSpec
    g_idx: np.ndarray | None = None

    @property
    def shape(self) -> tuple:
        return self.codes.shape

    def __getitem__(self, rows: slice) -> "QuantizedTensor":
        """A block of output rows (phi3's fused q/k/v and gate/up projections split this way)."""
        per_row = self.scales.shape[0] > 1
        return QuantizedTensor(self.codes[rows], self.scales[rows] if per_row else self.scales,
                               self.zeros[rows] if per_row else self.zeros, self.spec, self.g_idx)

    def group_index(self) -> np.ndarray:
        return self.g_idx if self.g_idx is not None else self.spec.group_index(self.codes.shape[1])

    def dequantize(self) -> np.ndarray:
        """x' = scale * (q - zero), per element, in float32.  -> [N, K]"""
        gi = self.group_index()
        s = self.scales[:, gi]  # [N or 1, K]
        z = self.zeros[:, gi].astype(np.float32)
        return ((self.codes.astype(np.float32) - z) * s).astype(np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes of the information itself: b-bit codes, scales in their dtype, b-bit zero points."""
        n_scale = self.scales.size
        scale_bytes = {"float16": 2, "bfloat16": 2, "float32": 4}[self.spec.scale_dtype]
        zero_bits = 0 if self.spec.sym else n_scale * self.spec.bits
        return (self.codes.size * self.spec.bits + zero_bits) // 8 + n_scale * scale_bytes


# ------------------------------------------------------------------------------------------------
# Grouping: W [N, K] <-> groups [N, G, group_len]
# ------------------------------------------------------------------------------------------------

def to_groups(w: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """[N, K] -> [N, G, L] (or [1, 1, N*K] per-tensor). A short last group is padded with zeros,
    which changes no range (ranges always contain 0) and quantizes exactly to 0."""
    n, k = w.shape
    if spec.granularity == "tensor":
        return w.reshape(1, 1, n * k)
    if spec.granularity == "channel":
        return w.reshape(n, 1, k)
    g = spec.num_groups(k)
    pad = g * spec.group_size - k
    if pad:
        w = np.concatenate([w, np.zeros((n, pad), dtype=w.dtype)], axis=1)
    return w.reshape(n, g, spec.group_size)


# ------------------------------------------------------------------------------------------------
# Ranges
# ------------------------------------------------------------------------------------------------

def minmax_range(groups: np.ndarray):
    """lo, hi [N, G]: the extremes of each group, widened to contain 0."""
    return np.minimum(groups.min(axis=-1), 0.0), np.maximum(groups.max(axis=-1), 0.0)


def percentile_range(groups: np.ndarray, pct: float):
    """Clip each group to its [100 - pct, pct] percentiles (an outlier no longer sets the step)."""
    lo = np.percentile(groups, 100.0 - pct, axis=-1)
    hi = np.percentile(groups, pct, axis=-1)
    return np.minimum(lo, 0.0), np.maximum(hi, 0.0)


def scale_zero(lo, hi, spec: QuantSpec):
    """Scales (rounded to the storage dtype) and integer zero points for ranges [lo, hi]."""
    if spec.sym:
        amax = np.maximum(-lo, hi)
        scale = 2.0 * amax / spec.qmax
    else:
        scale = (hi - lo) / spec.qmax
    scale = np.where(scale > 0, scale, 1.0)  # an all-zero group: any scale reconstructs it exactly
    scale = np.clip(round_scales_up(scale, spec.scale_dtype), _TINY[spec.scale_dtype], _HUGE[spec.scale_dtype])
    if spec.sym:
        zero = np.full(scale.shape, spec.sym_zero, dtype=np.float32)
    else:
        zero = np.clip(np.round(-lo / scale), 0, spec.qmax)
    return scale.astype(np.float32), zero.astype(np.float32)


def quantize_groups(groups, scale, zero, spec: QuantSpec):
    """q = clamp(round(x / scale) + zero, 0, qmax) for [N, G, L] groups with [N, G] scales."""
    q = np.round(groups / scale[..., None]) + zero[..., None]
    return np.clip(q, 0, spec.qmax)


def mse_range(groups: np.ndarray, spec: QuantSpec, grid: int = 40, max_shrink: float = 0.6):
    """For each group, shrink [lo, hi] by the factor in {1, ..., max_shrink} (`grid` steps) with the
    least squared reconstruction error. Factor 1 is min/max, so this is never worse than min/max."""
    lo0, hi0 = minmax_range(groups)
    best_lo, best_hi = lo0, hi0
    best_err = np.full(lo0.shape, np.inf)
    for factor in np.linspace(1.0, max_shrink, grid):
        lo, hi = (lo0 * factor).astype(groups.dtype), (hi0 * factor).astype(groups.dtype)
        scale, zero = scale_zero(lo, hi, spec)
        dq = (quantize_groups(groups, scale, zero, spec) - zero[..., None]) * scale[..., None]
        err = ((groups - dq) ** 2).sum(axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_lo, best_hi = np.where(better, lo, best_lo), np.where(better, hi, best_hi)
    return best_lo, best_hi


def quantize_rtn(w: np.ndarray, spec: QuantSpec, clip: str = "minmax", percentile: float = 99.9) -> QuantizedTensor:
    """Round-to-nearest quantization of W [N, K] with the range chosen by `clip`:
    "minmax", "percentile" (at `percentile`) or "mse"."""
    w = np.asarray(w, dtype=np.float32)
    groups = to_groups(w, spec)
    if clip == "minmax":
        lo, hi = minmax_range(groups)
    elif clip == "percentile":
        lo, hi = percentile_range(groups, percentile)
    elif clip == "mse":
        lo, hi = mse_range(groups, spec)
    else:
        raise ValueError(f"unknown clip method {clip!r}")
    scale, zero = scale_zero(lo, hi, spec)
    q = quantize_groups(groups, scale, zero, spec).astype(np.uint8)
    n, k = w.shape
    if spec.granularity == "tensor":
        codes = q.reshape(-1)[: n * k].reshape(n, k)
    else:
        codes = q.reshape(n, -1)[:, :k]
    return QuantizedTensor(np.ascontiguousarray(codes), scale, zero.astype(np.uint8), spec)
