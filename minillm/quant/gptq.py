"""GPTQ (Frantar et al. 2022): quantize a layer's weights one input column at a time, and after each
column push its rounding error onto the columns not yet quantized, weighted by how the layer's
inputs correlate, so that the layer's *output* on real inputs changes as little as possible.

For a linear layer y = W x with calibration inputs X [n, K], GPTQ minimises, row by row,

    || W X^T - Q X^T ||^2  =  sum_rows (w - q) H (w - q)^T,      H = 2 X^T X / n      (sec. 2)

Quantizing column i to q_i leaves an error that the Optimal Brain Surgeon update (OBS, sec. 3.1)
compensates on the remaining columns F:

    delta_F = - (w_i - q_i) / [H^-1]_ii * [H^-1]_{i, F}                                  (eq. 3)

GPTQ's insights (sec. 3.2-3.4): (1) the order of columns barely matters, so every row uses the same
order and the inverse Hessian is shared; (2) updates are applied lazily in blocks of B columns
(B = 128) so most of the work is a matrix product; (3) the rows of H^-1 needed are exactly the rows of
the upper Cholesky factor of H^-1, computed once, which is also numerically stable.

`GPTQ` accumulates H (`add_batch`) and runs Algorithm 1 (`quantize`), as the reference code does.
"""

from __future__ import annotations

import numpy as np

from ..errors import MinillmError
from .rtn import QuantizedTensor, mse_range, quantize_rtn, scale_zero
from .spec import QuantSpec


class GPTQ:
    def __init__(self, k: int):
        self.H = np.zeros((k, k), dtype=np.float64)
        self.n = 0
        self._prepared = {}

    def add_batch(self, x: np.ndarray) -> None:
        """Accumulate H = 2 X^T X / n over calibration inputs x [..., K] (a running mean). The
        product runs in float32 (as the reference code does on the GPU); the sum is kept in float64."""
        x = np.asarray(x, dtype=np.float32).reshape(-1, self.H.shape[0])
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        self.H += (2.0 / self.n) * (x.T @ x).astype(np.float64)
        self._prepared.clear()

    def quantize(self, w: np.ndarray, spec: QuantSpec, damp: float = 0.01, block: int = 128,
                 act_order: bool = False, static_groups: bool | None = None, clip: str = "minmax") -> QuantizedTensor:
        # Layers reading the same input (q, k, v; gate, up) share H, its order and its inverse.
        key = (damp, act_order)
        if key not in self._prepared:
            self._prepared[key] = prepare_hessian(self.H, damp, act_order)
        return gptq_quantize(w, self.H, spec, damp, block, act_order, static_groups, self._prepared[key], clip)


def prepare_hessian(H: np.ndarray, damp: float, act_order: bool):
    """(dead inputs, column order, upper Cholesky factor of the damped H^-1 in that order)."""
    H = np.array(H, dtype=np.float64)
    k = H.shape[0]
    # Dead inputs (never active in calibration): H_ii = 0. As the reference code: set H_ii = 1 (and,
    # in gptq_quantize, their weights to 0, which they may as well be for these inputs).
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(k)
    H = H[np.ix_(perm, perm)]
    # Dampening (sec. 4): add damp * mean(diag H) to the diagonal for a stable inverse.
    H[np.diag_indices(k)] += damp * np.mean(np.diag(H))
    # Upper Cholesky factor of H^-1 (sec. 3.4): its row i holds [H^-1]_{i, i:} / sqrt([H^-1]_ii) for
    # the Hessian of the not-yet-quantized columns i..K-1, all at once.
    linv = np.linalg.inv(np.linalg.cholesky(H))  # H = L L^T  ->  H^-1 = L^-T L^-1
    hinv = np.linalg.cholesky(linv.T @ linv).T
    return dead, perm, hinv.astype(np.float32)


def _params(cols: np.ndarray, spec: QuantSpec, clip: str = "minmax"):
    """Per-row scale and zero of a group of columns [N, L]: the min/max range containing 0, or with
    clip="mse" that range shrunk to minimise the group's squared rounding error (the reference
    code's Quantizer(mse=True), App. A)."""
    if clip == "mse":
        lo, hi = mse_range(cols[:, None, :], spec)
        return scale_zero(lo[:, 0], hi[:, 0], spec)
    lo = np.minimum(cols.min(axis=1), 0.0)
    hi = np.maximum(cols.max(axis=1), 0.0)
    return scale_zero(lo, hi, spec)  # [N] each


def gptq_quantize(w: np.ndarray, H: np.ndarray, spec: QuantSpec, damp: float = 0.01, block: int = 128,
                  act_order: bool = False, static_groups: bool | None = None, prepared=None,
                  clip: str = "minmax") -> QuantizedTensor:
    """Algorithm 1 of the paper. w [N, K], H [K, K] -> QuantizedTensor.

    act_order: quantize columns in order of decreasing H_ii (the inputs with the most energy first,
    sec. 4 "act-order"). With static_groups, every group's scale is fixed from the original weights
    before the loop (so group g is still columns gG..gG+G-1 and g_idx stays trivial, the layout
    kernels like); without, a group's scale is computed when its first column in the processing
    order is reached, and g_idx records each column's group. The default (None) is static groups
    with act-order and, in the natural order, ranges from the updated weights as the reference code
    computes them (the error pushed onto a group before it is reached then sets its range, instead
    of being clamped by a range fixed beforehand).
    clip: "minmax" or "mse", how a group's range is chosen (see _params).
    """
    if static_groups is None:
        static_groups = act_order
    if spec.granularity == "tensor":
        raise MinillmError("GPTQ needs per-channel or grouped scales")
    W = np.array(w, dtype=np.float32)
    n, k = W.shape
    if not np.isfinite(W).all():
        raise MinillmError("the weights hold NaN or infinite values")
    G = spec.group_size if spec.granularity == "group" else k
    dead, perm, Hinv = prepared if prepared is not None else prepare_hessian(H, damp, act_order)
    W[:, dead] = 0.0
    if static_groups:
        groups = [_params(W[:, g0 : g0 + G], spec, clip) for g0 in range(0, k, G)]
    W = W[:, perm]
    Q = np.zeros_like(W)
    scales = np.zeros((n, -(-k // G)), dtype=np.float32)
    zeros = np.zeros((n, -(-k // G)), dtype=np.float32)
    g_idx = np.zeros(k, dtype=np.int32)  # group of each column, in processing order
    scale = zero = None

    for i1 in range(0, k, block):  # lazy batch updates (sec. 3.3)
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static_groups:
                g = perm[col] // G
                scale, zero = groups[g]
            elif col % G == 0:  # a new group starts: its range from the current (updated) weights
                g = col // G
                scale, zero = _params(W1[:, i : i + G] if i + G <= i2 - i1 else
                                      np.concatenate([W1[:, i:], W[:, i2 : col + G]], axis=1), spec, clip)
            scales[:, g], zeros[:, g] = scale, zero
            g_idx[col] = g
            q = np.clip(np.round(W1[:, i] / scale) + zero, 0, spec.qmax)
            Q[:, col] = q
            dq = (q - zero) * scale
            err = (W1[:, i] - dq) / Hinv1[i, i]  # eq. 3, scaled by the Cholesky row
            W1[:, i:] -= err[:, None] * Hinv1[i, i:]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the block's accumulated updates, as one product

    inv = np.argsort(perm)
    codes = Q[:, inv].astype(np.uint8)
    g_idx = g_idx[inv]
    trivial = np.arange(k) // G
    result = QuantizedTensor(np.ascontiguousarray(codes), scales, zeros.astype(np.uint8), spec,
                             None if np.array_equal(g_idx, trivial) else g_idx)
    return _no_worse_than_rtn(result, w, H, spec)


def _no_worse_than_rtn(q: QuantizedTensor, w: np.ndarray, H: np.ndarray, spec: QuantSpec) -> QuantizedTensor:
    """Keep, row by row, whichever of GPTQ and plain rounding has the lower calibration error.

    GPTQ is greedy: compensating earlier columns can push later ones outside their group's fixed
    range, where they are clamped, and a row can end up worse than plain rounding (seen on random
    problems, mostly at 8 bits per channel). The objective sum_rows (w - q) H (w - q)^T splits by
    row, so choosing per row never raises it. (With dynamic act-order the rows share a g_idx that
    plain rounding does not, so the whole layer is chosen instead.)
    """
    rtn = quantize_rtn(w, spec)
    w64 = np.asarray(w, dtype=np.float64)

    def row_error(qt):
        d = w64 - qt.dequantize().astype(np.float64)
        return ((d @ H) * d).sum(axis=1)  # diag(D H D^T), as one BLAS product

    e_gptq, e_rtn = row_error(q), row_error(rtn)
    if q.g_idx is not None:
        return q if e_gptq.sum() <= e_rtn.sum() else rtn
    worse = e_rtn < e_gptq
    if not worse.any():
        return q
    return QuantizedTensor(np.where(worse[:, None], rtn.codes, q.codes), np.where(worse[:, None], rtn.scales, q.scales),
                           np.where(worse[:, None], rtn.zeros, q.zeros), spec, None)
