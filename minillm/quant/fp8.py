"""FP8 E4M3 (the "fn" variant of Micikevicius et al. 2022, sec. 3): 1 sign, 4 exponent, 3 mantissa bits.

    exponent e in 1..15:  value = (1 + m/8) * 2^(e - 7)      normal
    exponent e = 0:       value = (m/8) * 2^(-6)              subnormal
    e = 15, m = 7 is NaN; there is no infinity, so the largest finite value is 1.75 * 2^8 = 448.

A weight tensor is stored as FP8 codes times a float32 scale (per tensor or per output channel),
scale = amax / 448, so the largest weight lands on the largest code. Encoding rounds to the nearest
representable value, ties to the even code, as hardware casts do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

E4M3_MAX = 448.0


def _positive_values() -> np.ndarray:
    """The values of codes 0..126 (sign bit clear, NaN excluded), in increasing order."""
    codes = np.arange(127)
    e, m = codes >> 3, codes & 7
    return np.where(e == 0, m / 8.0 * 2.0**-6, (1 + m / 8.0) * 2.0 ** (e - 7.0))


E4M3_VALUES = _positive_values()


def decode_e4m3(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes, dtype=np.uint8)
    mag = codes & 0x7F
    out = np.where(mag == 0x7F, np.nan, E4M3_VALUES[np.minimum(mag, 126)])
    return np.where(codes & 0x80, -out, out).astype(np.float32)


def encode_e4m3(x: np.ndarray) -> np.ndarray:
    """float -> E4M3 code (uint8), round to nearest even, saturating at +-448."""
    x = np.asarray(x, dtype=np.float64)
    a = np.minimum(np.abs(x), E4M3_MAX)
    hi = np.clip(np.searchsorted(E4M3_VALUES, a), 0, 126)  # first value >= a
    lo = np.maximum(hi - 1, 0)
    d_lo, d_hi = a - E4M3_VALUES[lo], E4M3_VALUES[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))  # the code's last bit is the mantissa's
    mag = np.where(pick_hi, hi, lo).astype(np.uint8)
    return np.where(np.signbit(x), mag | 0x80, mag).astype(np.uint8)  # -0 keeps its sign, as casts do


@dataclass
class FP8Tensor:
    codes: np.ndarray  # uint8 [N, K]
    scale: np.ndarray  # float32 [N, 1] per channel or [1, 1] per tensor

    @property
    def shape(self):
        return self.codes.shape

    def dequantize(self) -> np.ndarray:
        return decode_e4m3(self.codes) * self.scale

    @property
    def nbytes(self) -> int:
        return self.codes.size + self.scale.size * 4


def quantize_fp8(w: np.ndarray, per_channel: bool = True) -> FP8Tensor:
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=1, keepdims=True) if per_channel else np.abs(w).max(keepdims=True).reshape(1, 1)
    scale = (np.where(amax > 0, amax, 1.0) / E4M3_MAX).astype(np.float32)
    return FP8Tensor(encode_e4m3(w / scale), scale)
