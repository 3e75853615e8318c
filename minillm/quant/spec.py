"""QuantSpec: how a weight matrix W [N out, K in] is turned into integers.

    bits         b in {2, 3, 4, 8}: codes q in [0, 2^b - 1]
    granularity  "tensor":  one scale for all of W
                 "channel": one scale per output row n           scales [N, 1]
                 "group":   one scale per row and per run of G consecutive input columns
                            scales [N, ceil(K / G)]; when K % G != 0 the last group is shorter
    sym          symmetric: zero point fixed at 2^(b-1), range [-amax, amax]
                 asymmetric: an integer zero point per scale, range [min, max]
    scale_dtype  how scales are stored (float16 as GPTQ/AWQ do; bfloat16 or float32 possible)

A weight is reconstructed as  w = scale * (q - zero)  (docs/quantization.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MinillmError

SUPPORTED_BITS = (2, 3, 4, 8)
GRANULARITIES = ("tensor", "channel", "group")
SCALE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    granularity: str = "group"
    group_size: int = 64
    sym: bool = False
    scale_dtype: str = "float16"

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise MinillmError(f"{self.bits}-bit quantization is not supported: choose from {SUPPORTED_BITS}")
        if self.granularity not in GRANULARITIES:
            raise MinillmError(f"granularity {self.granularity!r} is unknown: choose from {GRANULARITIES}")
        if self.granularity == "group" and (self.group_size < 8 or self.group_size % 8):
            raise MinillmError(f"group size {self.group_size} is not supported: use a multiple of 8 "
                               "(32, 64 and 128 are the usual ones)")
        if self.scale_dtype not in SCALE_DTYPES:
            raise MinillmError(f"scale dtype {self.scale_dtype!r} is unknown: choose from {SCALE_DTYPES}")

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        return 1 << (self.bits - 1)

    def num_groups(self, k: int) -> int:
        if self.granularity == "group":
            return -(-k // self.group_size)
        return 1

    def group_index(self, k: int) -> np.ndarray:
        """The group of each input column.  -> [K] int32"""
        if self.granularity == "group":
            return (np.arange(k) // self.group_size).astype(np.int32)
        return np.zeros(k, dtype=np.int32)

    def describe(self) -> str:
        g = {"tensor": "per-tensor", "channel": "per-channel"}.get(self.granularity, f"g{self.group_size}")
        return f"W{self.bits} {g} {'sym' if self.sym else 'asym'}"


def round_scales_up(x: np.ndarray, dtype: str) -> np.ndarray:
    """The smallest value of the storage dtype >= x: a scale rounded up keeps the whole chosen range
    representable (rounded down, the group's extreme could fall just outside the grid)."""
    r = round_scales(x, dtype)
    low = r < x
    if not low.any():
        return r
    if dtype == "float16":
        up = np.nextafter(r.astype(np.float16), np.float16(np.inf)).astype(np.float32)
    elif dtype == "bfloat16":
        up = (r.view(np.uint32) + np.uint32(0x10000)).view(np.float32)
    else:
        up = np.nextafter(r, np.float32(np.inf))
    return np.where(low, up, r).astype(np.float32)


def round_scales(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 scales to the storage dtype (and back to float32 for arithmetic)."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        # Round to nearest even on the top 16 bits of the float32 pattern.
        bits = x.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.astype(np.uint32).view(np.float32)
    return x
