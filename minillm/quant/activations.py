"""INT8 activation quantization for W8A8 linears (as in SmoothQuant's setting, Xiao et al. 2023, sec. 2).

dynamic  each token (row of X) gets its own scale when it arrives:  s_t = max|x_t| / 127
static   one scale for the whole tensor, fixed by calibration:      s = max over calibration |x| / 127
Both quantize symmetrically: x_q = clamp(round(x / s), -127, 127). With an INT8 per-channel weight
W_q (scale s_w[n]), the product is computed in integers and rescaled once:

    y[t, n] = s_t * s_w[n] * sum_k x_q[t, k] * W_q[n, k]
"""

from __future__ import annotations

import numpy as np


def quantize_per_token(x: np.ndarray):
    """x [..., K] -> (int8 codes [..., K], float32 scales [..., 1])."""
    amax = np.abs(x).max(axis=-1, keepdims=True)
    s = (np.where(amax > 0, amax, 1.0) / 127.0).astype(np.float32)
    return np.clip(np.round(x / s), -127, 127).astype(np.int8), s


def quantize_static(x: np.ndarray, scale: float):
    """x with a calibrated per-tensor scale (values beyond the calibrated range saturate)."""
    return np.clip(np.round(x / scale), -127, 127).astype(np.int8), np.float32(scale)


def int8_matmul(xq: np.ndarray, wq: np.ndarray) -> np.ndarray:
    """sum_k xq[..., k] wq[n, k] exactly: float64 holds every int8 x int8 sum up to K = 2^38."""
    return xq.astype(np.float64) @ wq.astype(np.float64).T
