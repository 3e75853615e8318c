"""NF4: the 4-bit NormalFloat of QLoRA (Dettmers et al. 2023, sec. 3 and App. E).

Weights of a trained layer are close to normally distributed, so NF4 places its 16 levels at
quantiles of N(0, 1), rescaled to [-1, 1] with an exact 0; each block of 64 weights is divided by
its absolute maximum, and each weight stored as the index of the nearest level:

    code = argmin_i |w / absmax - NF4[i]|        w' = NF4[code] * absmax

Blocks run along each row's input dimension (the last block of a row may be shorter).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The 16 levels, as bitsandbytes and the QLoRA paper (App. E) list them.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=np.float32)
_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


@dataclass
class NF4Tensor:
    codes: np.ndarray  # uint8 [N, K], indices into NF4_LEVELS
    absmax: np.ndarray  # float32 [N, ceil(K / block)]
    block: int = 64

    @property
    def shape(self):
        return self.codes.shape

    def dequantize(self) -> np.ndarray:
        scale = np.repeat(self.absmax, self.block, axis=1)[:, : self.codes.shape[1]]
        return NF4_LEVELS[self.codes] * scale

    @property
    def nbytes(self) -> int:
        return self.codes.size // 2 + self.absmax.size * 4


def quantize_nf4(w: np.ndarray, block: int = 64) -> NF4Tensor:
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    nb = -(-k // block)
    padded = np.zeros((n, nb * block), dtype=np.float32)
    padded[:, :k] = w
    absmax = np.abs(padded.reshape(n, nb, block)).max(axis=-1)
    absmax = np.where(absmax > 0, absmax, 1.0).astype(np.float32)
    normed = w / np.repeat(absmax, block, axis=1)[:, :k]
    # Nearest level: count the midpoints below the value.
    codes = np.searchsorted(_MIDPOINTS, normed).astype(np.uint8)
    return NF4Tensor(codes, absmax, block)
