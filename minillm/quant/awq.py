"""AWQ (Lin et al. 2023): protect the weights that meet large activations by scaling them up before
quantization and dividing the activations by the same factor, which leaves the float product
unchanged:
                  W x  =  (W diag(s)) (diag(s)^-1 x)

Rounding error on a weight column is relative to its group's step, so scaling input channel j by
s_j > 1 shrinks the error of the products that matter most (large |x_j|) — the "salient channel"
argument of sec. 3.1. The scales come from the average activation magnitude, s = s_x^alpha, with
alpha found by a grid search on the layer's real output error (sec. 3.2, eq. 4-5):

    alpha* = argmin_alpha || Q(W diag(s)) diag(s)^-1 X^T - W X^T ||^2,   s = s_x^alpha

alpha = 0 gives s = 1 (plain round-to-nearest), so the search never does worse than RTN on its
objective. diag(s)^-1 is folded into whatever produced x (an RMSNorm weight, or the rows of the
previous linear layer), so inference pays nothing. A second search then shrinks each group's
range where clipping lowers the output error (the released code's auto_clip).

Everything here is math on arrays; minillm/quantize.py decides which layers share an input and
where each scale is folded.
"""

from __future__ import annotations

import numpy as np

from .rtn import QuantizedTensor, minmax_range, quantize_groups, quantize_rtn, scale_zero, to_groups
from .spec import QuantSpec


def activation_magnitude(x: np.ndarray) -> np.ndarray:
    """s_x: mean |x| of each input channel over the calibration tokens.  [..., K] -> [K]"""
    return np.abs(x.reshape(-1, x.shape[-1])).mean(axis=0)


def normalised_scales(s_x: np.ndarray, alpha: float) -> np.ndarray:
    """s = s_x^alpha, divided by sqrt(max * min) so the scales centre on 1 (as the released code)."""
    s = np.maximum(s_x, 1e-8) ** alpha
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def fake_quant(w: np.ndarray, spec: QuantSpec) -> np.ndarray:
    return quantize_rtn(w, spec).dequantize()


def search_scales(x: np.ndarray, weights: list, spec: QuantSpec, grid: int = 20):
    """The alpha in [0, 1) (grid steps) whose scales give the least output error summed over the
    layers that read x.  x [T, K], weights: [N_i, K] arrays.  -> (scales [K], best alpha, losses)"""
    x = x.reshape(-1, x.shape[-1]).astype(np.float32)
    s_x = activation_magnitude(x)
    ref = [x @ w.T for w in weights]
    losses = []
    for alpha in np.arange(grid) / grid:
        s = normalised_scales(s_x, alpha)
        loss = 0.0
        for w, r in zip(weights, ref):
            wq = fake_quant(w * s, spec) / s  # Q(W diag(s)) diag(s)^-1
            loss += float(((x @ wq.T - r) ** 2).mean())
        losses.append(loss)
    best = int(np.argmin(losses))
    return normalised_scales(s_x, best / grid), best / grid, losses


def search_clip(x: np.ndarray, w: np.ndarray, spec: QuantSpec, grid: int = 20, max_shrink: float = 0.5):
    """Per (row, group), the shrink of the min/max range that minimises that group's contribution
    to the output error on tokens x [T, K].  -> (lo, hi) [N, G] for quantize_with_range."""
    groups = to_groups(w, spec)  # [N, G, L]
    n, g, length = groups.shape
    # Per group, as a batched matmul (BLAS): [G, T, L] @ [G, L, N] -> each group's partial outputs.
    xg = to_groups(np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32), spec).transpose(1, 0, 2)
    ref = xg @ groups.transpose(1, 2, 0)  # [G, T, N]
    lo0, hi0 = minmax_range(groups)
    best_lo, best_hi = lo0, hi0
    best = np.full((n, g), np.inf)
    for shrink in np.linspace(1.0, max_shrink, grid):
        lo, hi = (lo0 * shrink).astype(np.float32), (hi0 * shrink).astype(np.float32)
        scale, zero = scale_zero(lo, hi, spec)
        dq = (quantize_groups(groups, scale, zero, spec) - zero[..., None]) * scale[..., None]
        err = ((xg @ dq.astype(np.float32).transpose(1, 2, 0) - ref) ** 2).mean(axis=1).T  # [N, G]
        better = err < best
        best = np.where(better, err, best)
        best_lo, best_hi = np.where(better, lo, best_lo), np.where(better, hi, best_hi)
    return best_lo, best_hi


def quantize_with_range(w: np.ndarray, lo: np.ndarray, hi: np.ndarray, spec: QuantSpec) -> QuantizedTensor:
    """Round-to-nearest with given per-(row, group) ranges (from search_clip)."""
    groups = to_groups(np.asarray(w, dtype=np.float32), spec)
    scale, zero = scale_zero(lo, hi, spec)
    q = quantize_groups(groups, scale, zero, spec).astype(np.uint8)
    n, k = w.shape
    return QuantizedTensor(np.ascontiguousarray(q.reshape(n, -1)[:, :k]), scale, zero.astype(np.uint8), spec)
