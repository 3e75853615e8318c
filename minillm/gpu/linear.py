"""Linear layers on the GPU: fp16, packed 4-bit (W4A16) and 8-bit (W8A16) weights.

Projections that read the same input are fused into one (q, k, v -> qkv; gate, up -> gate_up), so a
decode step launches one product per input instead of three or two. Batches of up to 16 rows run
the GEMV kernels, which stream the weights once; larger batches (prefill) dequantize the weights to
fp16 in one pass (cuda_kernels/dequant.cu) and hand the product to cuBLAS's tensor cores.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_xp
from ..quant.rtn import QuantizedTensor
from . import kernels as K
from .w4a16 import W4A16Weight
from .w4a16 import _launch as launch_w4


class GpuLinear:
    """y = x W^T (+ b). kind: "fp16" (w [N, Kp] fp16), "w4" (W4A16Weight) or "w8" (codes, scales,
    zeros, group). x and y are fp16 buffers whose columns past K and N are ignored."""

    def __init__(self, kind, n, k, w=None, w4=None, w8=None, bias=None):
        self.kind, self.n, self.k = kind, n, k
        self.w, self.w4, self.w8, self.bias = w, w4, w8, bias
        self.perm = w4.perm if w4 is not None else None

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_host(cls, parts, biases=None, interleave: bool = False, order=None):
        """Fuse weights that read the same input, stacked along the output dimension. Each part is
        a float array [N_i, K] or a QuantizedTensor; 4-bit and 8-bit ones stay packed when their
        layouts agree and the kernels take them, others are dequantized to fp16. interleave (two
        equal parts: gate, up): rows ordered gate_0, up_0, gate_1, ... so that one warp computes a
        pair and can apply the gated activation itself (act= in __call__). order: the stacked rows
        in this order instead (kernels.qkv_row_order)."""
        cp = get_xp("cuda")
        n = sum(p.shape[0] for p in parts)
        k = parts[0].shape[1]
        if interleave:
            order = np.arange(n).reshape(2, n // 2).T.reshape(-1)
        elif order is None:
            order = slice(None)
        bias = None
        if biases is not None and any(b is not None for b in biases):
            bias = np.concatenate([np.zeros(p.shape[0], np.float32) if b is None else np.asarray(b, np.float32)
                                   for p, b in zip(parts, biases)])
            bias = cp.asarray(bias[order].astype(np.float16))
        fused = _stack_quantized(parts)
        if fused is not None and not isinstance(order, slice):
            fused = QuantizedTensor(fused.codes[order], fused.scales[order], fused.zeros[order], fused.spec, fused.g_idx)
        if fused is not None and fused.spec.bits == 4 and _group(fused) % 32 == 0:
            return cls("w4", n, k, w4=W4A16Weight.upload(fused), bias=bias)
        if fused is not None and fused.spec.bits == 8 and fused.g_idx is None and _group(fused) % 16 == 0:
            kp = K.round_up(k, 16)
            codes = np.zeros((n, kp), np.uint8)
            codes[:, :k] = fused.codes
            scales = np.broadcast_to(fused.scales, (n, fused.scales.shape[1])).astype(np.float16)
            zeros = np.broadcast_to(fused.zeros, (n, fused.zeros.shape[1])).astype(np.uint8)
            w8 = (cp.asarray(codes), cp.asarray(np.ascontiguousarray(scales)),
                  None if fused.spec.sym else cp.asarray(np.ascontiguousarray(zeros)), _group(fused))
            return cls("w8", n, k, w8=w8, bias=bias)
        dense = np.concatenate([np.asarray(p.dequantize() if hasattr(p, "dequantize") else p, np.float32)
                                for p in parts])[order]
        return cls.fp16(cp.asarray(dense.astype(np.float16)), bias)

    @classmethod
    def fp16(cls, w, bias=None):
        """From an fp16 cupy array [N, K] (padded here to a whole number of 16-byte chunks)."""
        cp = get_xp("cuda")
        n, k = w.shape
        kp = K.round_up(k, 8)
        if kp != k:
            padded = cp.zeros((n, kp), cp.float16)
            padded[:, :k] = w
            w = padded
        return cls("fp16", n, k, w=cp.ascontiguousarray(w), bias=bias)

    @property
    def nbytes(self) -> int:
        b = 0 if self.bias is None else self.bias.nbytes
        if self.kind == "fp16":
            return int(self.w.nbytes) + b
        if self.kind == "w4":
            return self.w4.nbytes + (0 if self.perm is None else int(self.perm.nbytes)) + b
        return int(sum(a.nbytes for a in self.w8[:3] if a is not None)) + b

    # -- the product ------------------------------------------------------------------------------

    def __call__(self, x, y, rows: int, scratch, act: str | None = None, gu=None, norm=None, carry: bool = False,
                 epilogue=None):
        """y[:rows, :N] = x[:rows, :K] W^T (+ b). With act ("silu" / "gelu_tanh"; W an interleaved
        gate/up pair), y[:rows, :N/2] = act(gate) * up instead, fused into the GEMV when it can be
        (no bias, <= 16 rows), else through the buffer `gu`. `scratch` provides a gather buffer for
        act-order inputs, the fp16 matrix of the large-batch path and the norm's partial sums
        (x_perm, weight(n, k), norm_partials).

        norm = (h, weight, out, eps, k) when y is a residual branch: then h += y and out = RMSNorm(h) *
        weight. With carry (one row, no bias), the GEMV does it (common.cuh EpilogueIO): out gets h *
        weight * 2^-k unnormalised (k = kernels.norm_exponent(weight), computed when the weight was
        loaded), and the return value is the record the next product must be called with
        (`epilogue=`) to scale its sums; otherwise add_rmsnorm runs and None is returned.

        epilogue: an EpilogueIO record for one row (no bias): a norm to scale by (the return value
        above), and/or the rotary epilogue of the qkv product (kernels.rope_epilogue), which every
        batch-1 kernel takes (rows in pairs: tc1, and the GEMVs at two rows a warp)."""
        if self.perm is not None:
            K.gather_cols(x, self.perm, scratch.x_perm, rows)
            x = scratch.x_perm
        fused = act is not None and rows <= 16 and self.bias is None
        out = y if act is None or fused else gu
        code = K.ACT_CODES[act] if fused else -1
        nio, k = epilogue, None
        if norm is not None and carry and rows == 1 and self.bias is None:
            k = norm[4]
            nio = K.norm_producer(norm[0], norm[1], norm[2], scratch.norm_partials, k)
        if nio is not None and (rows != 1 or (nio["pos"] and self.bias is not None)):
            raise ValueError("an EpilogueIO is for one row (the batch-1 decode step), and a rotary one for no bias")
        if rows <= 16:
            m = K.padded_batch(rows)
            if self.kind == "fp16":
                blocks = K.gemv_f16(self.w, x, out, m, self.n, code, nio=nio)
            elif self.kind == "w4":
                blocks = launch_w4(x, self.w4, out, m, act=code, nio=nio)
            else:
                codes, scales, zeros, group = self.w8
                blocks = K.gemv_i8(codes, scales, zeros, group, x, out, m, self.n, code, nio=nio)
        else:
            out[:rows, : self.n] = x[:rows, : self._ld] @ self._dense(scratch).T
        if self.bias is not None:
            K.add_bias(out, self.bias, rows)
        if act is not None and not fused:
            K.gated_act(out, y, rows, self.n // 2, act)
        if norm is None:
            return None
        if k is not None:
            return K.norm_consumer(scratch.norm_partials, blocks, norm[0].shape[1], norm[3], k)
        K.add_rmsnorm(norm[0], y, norm[1], norm[2], rows, norm[3])
        return None

    @property
    def _ld(self) -> int:
        """Columns of x the product reads (the weight's padded K)."""
        if self.kind == "fp16":
            return self.w.shape[1]
        if self.kind == "w4":
            return 32 * self.w4.chunks
        return self.w8[0].shape[1]

    def _dense(self, scratch):
        if self.kind == "fp16":
            return self.w
        out = scratch.weight(self.n, self._ld)
        if self.kind == "w4":
            K.dequant_w4(self.w4.qweight, self.w4.sz, out, self.w4.group_size)
        else:
            codes, scales, zeros, group = self.w8
            K.dequant_i8(codes, scales, zeros, out, group)
        return out


def _group(qt: QuantizedTensor) -> int:
    spec = qt.spec
    if spec.granularity == "group":
        return spec.group_size
    return K.round_up(qt.shape[1], 32) if spec.granularity == "channel" else 0  # tensor: not packed


def _stack_quantized(parts):
    """One QuantizedTensor from row blocks with the same spec and column order, else None."""
    if not all(isinstance(p, QuantizedTensor) for p in parts):
        return None
    spec, gi = parts[0].spec, parts[0].g_idx
    if spec.granularity == "tensor" or any(p.spec != spec for p in parts):
        return None
    if any((p.g_idx is None) != (gi is None) or (gi is not None and not np.array_equal(p.g_idx, gi)) for p in parts):
        return None
    if len(parts) == 1:
        return parts[0]
    return QuantizedTensor(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                           np.concatenate([p.zeros for p in parts]), spec, gi)

