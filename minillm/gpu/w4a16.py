"""W4A16: 4-bit weights, fp16 activations, fp32 accumulation (cuda_kernels/w4a16_gemv.cu).

    w = W4A16Weight.upload(qt)          # a QuantizedTensor (bits 4) -> packed on the GPU
    y = w4a16_matmul(x, w)              # x fp16 [M, K] -> y fp16 [M, N]

Batches of up to 16 rows stream the weights once: one row through the batch-1 tensor-core kernel
(w4a16_mma.cu, w4a16_tc1: x in one column of the MMA) or the GEMV kernel (fp32 FMAs), 2..16 through
the tensor-core kernel (mma.sync on the dequantized weights); larger batches dequantize to fp16 once
and use cuBLAS.
"""

from __future__ import annotations

import os

import numpy as np

from ..backend import get_xp
from ..errors import MinillmError
from ..quant.packing import pack_bits

# Batch sizes M compiled in the .cu file (a batch of m rows uses the smallest M >= m), and the
# rows per warp each is launched with (bench/gpu_kernels.py measures the alternatives).
_INSTANCES = {1: 2, 2: 2, 4: 2, 8: 4, 16: 2}  # m16 with 4 rows spills registers (bench/NOTES.md)
_THREADS = 128  # 4 warps per block
MMA_MIN_ROWS = 2  # from this batch on the tensor-core kernel is faster (bench/gpu_kernels.py)
_MMA_WARPS = 8  # WARPS in w4a16_mma.cu


def kernel(m: int, rows: int, ksplit: int = 1, suffix: str = ""):
    """suffix: kernels.epilogue_suffix (batch 1: "_n" with a carried norm, "_nr" also the rotary epilogue)."""
    from .kernels import fn  # noqa: PLC0415 - the handle is cached there

    return fn("w4a16_gemv", f"w4a16_gemv_m{m}_r{rows}" + (f"_k{ksplit}" if ksplit > 1 else "") + suffix)


def pack_sz(scales, zeros):
    """fp16 scales and uint8 zero points [N, groups] (zeros None: symmetric, 8) -> uint32 words
    scale bits | zero << 16, one per group: the kernels read a group's two numbers in one load."""
    xp = np if isinstance(scales, np.ndarray) else get_xp("cuda")  # on the host for an upload
    bits = xp.ascontiguousarray(scales, dtype=xp.float16).view(xp.uint16).astype(xp.uint32)
    return bits | ((8 if zeros is None else xp.asarray(zeros).astype(xp.uint32)) << 16)


class W4A16Weight:
    """Packed 4-bit weights on the GPU in minillm's layout (see the .cu files' headers): the codes
    qweight uint32 [N, 4C] and one word per group sz uint32 [N, groups] (pack_sz)."""

    def __init__(self, qweight, scales, zeros, perm, n, k, group_size):
        self.qweight, self.perm = qweight, perm
        self.sz = get_xp("cuda").asarray(pack_sz(scales, zeros))
        self.n, self.k, self.group_size = n, k, group_size
        self.chunks = -(-k // 32)
        self.groups = self.sz.shape[1]

    @classmethod
    def upload(cls, qt) -> "W4A16Weight":
        cp = get_xp("cuda")
        spec = qt.spec
        if spec.bits != 4:
            raise MinillmError(f"the W4A16 kernel takes 4-bit weights, not {spec.bits}-bit")
        n, k = qt.shape
        codes, scales, zeros = qt.codes, qt.scales, qt.zeros
        if spec.granularity == "tensor":
            scales, zeros = np.broadcast_to(scales, (n, 1)), np.broadcast_to(zeros, (n, 1))
        group = spec.group_size if spec.granularity == "group" else 32 * -(-k // 32)
        if group % 32:
            raise MinillmError(f"the W4A16 kernel needs a group size that is a multiple of 32, not {group}")
        perm = None
        if qt.g_idx is not None:
            # Act-order: sort the input columns by group, so every group is contiguous again; the
            # kernel then reads a plain layout and x is gathered into the same order per call.
            order = np.argsort(qt.g_idx, kind="stable")
            if not np.array_equal(qt.g_idx[order], spec.group_index(k)):
                raise MinillmError("this g_idx does not give every group exactly group_size columns")
            codes = codes[:, order]
            perm = cp.asarray(order.astype(np.int64))
        words = pack_bits(codes, 4, axis=1)  # [N, 4C] uint32
        return cls(cp.asarray(words), scales, None if spec.sym else zeros, perm, n, k, group)

    @property
    def nbytes(self) -> int:
        return int(self.qweight.nbytes + self.sz.nbytes)


def _launch(x_pad, w: W4A16Weight, y, m_kernel: int, rows: int | None = None, act: int = -1,
            tiles: int | None = None, ksplit: int | None = None, nio=None, tc: int | None = None) -> int:
    """y[:m_kernel] = x_pad W^T (y's rows may be longer than N: its row stride is y.shape[1]); with
    act >= 0 W's rows are (gate, up) pairs and y gets act(gate) * up (cuda_kernels/common.cuh).
    rows: rows per warp of the GEMV kernel; tiles: 16-row tiles per block of the tensor-core kernel
    (0 forces the GEMV kernel); ksplit: warps sharing each row's K at one row of x; None picks.
    tc: warps per 16 rows of the batch-1 tensor-core kernel (0 forces the GEMV kernel).
    nio: an EpilogueIO record (common.cuh; the kernels at one row). Returns the blocks launched."""
    from .kernels import NO_EPILOGUE, epilogue_suffix  # noqa: PLC0415

    if m_kernel == 1 and tc is None and rows is None and tiles is None and ksplit is None:
        forced = os.environ.get("MINILLM_W4_TC1")  # "0" / "4" / "8" / "16" force the choice (benchmarks)
        tc = _tc1_warps(w, in_step=nio is not None) if forced is None else int(forced)
    if m_kernel == 1 and tc and 64 * w.chunks <= TC1_MAX_X_BYTES:  # (else x would not fit: the GEMV)
        return _launch_tc1(x_pad, w, y, tc, act, NO_EPILOGUE if nio is None else nio)
    if tiles is None and rows is None and m_kernel >= MMA_MIN_ROWS:
        tiles = _mma_tiles(w.n, m_kernel)
    if tiles:
        if nio is not None:
            raise MinillmError("the tensor-core kernel carries no norm (one row only)")
        return _launch_mma(x_pad, w, y, m_kernel, tiles, act)
    if ksplit is None:  # split K only for the default instance (the split ones are compiled for it)
        ksplit = _ksplit(w, _INSTANCES[m_kernel]) if m_kernel == 1 and rows is None else 1
    if rows is None:
        rows = _INSTANCES[m_kernel]
    warps = -(-w.n // rows) * ksplit
    blocks = -(-warps // (_THREADS // 32))
    kernel(m_kernel, rows, ksplit, epilogue_suffix(nio))((blocks,), (_THREADS,), (
        w.qweight, w.sz, x_pad, y, np.int32(y.shape[1]),
        np.int32(w.n), np.int32(w.chunks), np.int32(w.groups), *_group_args(w), np.int32(act),
        NO_EPILOGUE if nio is None else nio))
    return blocks


def _group_args(w: W4A16Weight):
    """(chunks per group, its log2 or -1): the kernels find a chunk's group by a shift when they can."""
    cpg = w.group_size // 32
    return np.int32(cpg), np.int32(cpg.bit_length() - 1 if cpg & (cpg - 1) == 0 else -1)


def _ksplit(w: W4A16Weight, rows: int) -> int:
    """Warps sharing a row's K at batch 1: two for long rows (K >= 8192) when there are few warps
    (< 16 per SM): H100, 11008x4096 14.1-14.2 us vs 15.2; 8192x28672 (14336 warps) and K = 4096
    level or slower (bench/gpu_kernels.py --batches 1, bench/NOTES.md)."""
    from .kernels import sm_count  # noqa: PLC0415

    return 2 if w.chunks >= 256 and -(-w.n // rows) < 16 * sm_count() else 1


TC1_MAX_X_BYTES = 200 * 1024  # x staged in shared memory (an H100 SM has 227 KB): K up to 102400
TC1_WARPS = (16, 10, 8, 6, 5, 4)  # compiled in w4a16_mma.cu (W4A16_TC1_WARPS), most first


def _tc1_warps(w: W4A16Weight, in_step: bool = False) -> int:
    """Warps per block (16 rows) of the batch-1 tensor-core kernel, or 0 for the GEMV kernel.

    The kernel is latency-bound, one step of 128 k in flight a warp, so its time is about the steps a
    warp takes in a row: in one wave, steps / S; past it, waves of steps / S each, and a last wave
    that is part-empty streams at part of the rate. The rule: the most warps a block (the fewest
    steps a warp) whose blocks all fit one wave at 64 registers (32 // S blocks an SM; the compiled
    S are 16, 10, 8, 6, 5, 4: every distinct blocks-an-SM count), each warp with at least one step.
    H100, x staged, medians of 2 (bench/NOTES.md session 8): 4096x4096 16 warps 6.09 us vs GEMV 6.45;
    11008x4096 16: 11.67 vs 13.05; 4096x11008 4: 11.92 vs 13.41; 2048x8192, 5120x5120, 8192x8192 8:
    5.85 / 8.31 / 15.75 vs 6.22 / 8.56 / 16.18. The 7B step's qkv product (768 tiles) at 5 warps, 6
    blocks an SM in one wave: 1972 -> 1953 us a step against 8 warps in 1.45 waves (4: 2018; 6, in
    1.16 waves: 2019; session 13). Past one wave: 8 warps, with 8 steps or more (4096x22016: 20.83
    vs 21.79, in the step 5 warps in 1.74 waves +37 us, 4 +26, 16 +190; since session 12's L2 fetch
    also past three waves, session 14: 8192x28672 46.3 vs the GEMV's 49.7, 4096x32000 26.4 vs 29.4,
    5120x27648 29.7 vs 31.4, 4 warps 47.8 / 25.3 / 29.2), else the GEMV. (Balancing the tiles over
    the SMs instead, a block of 32 warps an SM, lost: bench/NOTES.md session 14.)

    in_step (the product carries an epilogue record: it runs in the batch-1 decode step, between
    other kernels under PDL): 8 warps in up to three waves where the rule gives 4, whose 8 steps a
    warp are then two rounds of 4 with the first loaded before the PDL wait, during the previous
    kernel's end (session 10: qkv at 8 took the step from 2084 to 2055 us, alone 4 was faster). That
    preload only really ran from session 15 (ptxas had moved the wait above it: common.cuh
    pdl_begin_after_loads); the 7B step's counts re-swept with it moved nothing (bench/NOTES.md)."""
    from .kernels import sm_count  # noqa: PLC0415

    sms = sm_count()
    tiles, steps = -(-w.n // 16), -(-w.chunks // 4)
    three_waves_of_8 = steps >= 8 and tiles * 8 <= 96 * sms
    for s in TC1_WARPS:
        if steps >= s and tiles <= (32 // s) * sms:
            return 8 if s == 4 and in_step and three_waves_of_8 else s
    return 8 if steps >= 8 else 0


def _launch_tc1(x_pad, w: W4A16Weight, y, warps: int, act: int, nio) -> int:
    from .kernels import epilogue_suffix, fn  # noqa: PLC0415

    # Groups of a multiple of 128 put a warp's 4 chunks in one group: the scale then multiplies the
    # fp32 sum (_g); smaller groups multiply the fp16 codes (_h). w4a16_mma.cu explains both.
    form = "g" if w.group_size % 128 == 0 else "h"
    norm = epilogue_suffix(nio)
    f = fn("w4a16_mma", f"w4a16_tc1_s{warps}_{form}{norm}")
    blocks = -(-w.n // 16)
    smem = 64 * w.chunks + 4 * int(nio["in_blocks"])  # x, and a consumer's norm partials (w4a16_mma.cu)
    f((blocks,), (32 * warps,), (
        w.qweight, w.sz, x_pad, y, np.int32(y.shape[1]),
        np.int32(w.n), np.int32(w.chunks), np.int32(w.groups), *_group_args(w), np.int32(act), nio), shared_mem=smem)
    return blocks


def _mma_tiles(n: int, m: int) -> int:
    """Two 16-row tiles per block halve the x loads per weight: worth it for two x tiles (m > 8) if
    that still leaves >= 2 blocks per SM (H100: 8192x28672 at m=16 76 vs 106 us, 4096x11008 20 vs
    25; 4096x4096 10.6 vs 10.0; at m <= 8 one tile is as fast or faster; bench/NOTES.md)."""
    from .kernels import sm_count  # noqa: PLC0415

    return 2 if m > 8 and n // 32 >= 2 * sm_count() else 1


def _launch_mma(x_pad, w: W4A16Weight, y, m: int, tiles: int, act: int) -> int:
    from .kernels import fn  # noqa: PLC0415

    f = fn("w4a16_mma", f"w4a16_mma_n{tiles}_m{1 if m <= 8 else 2}")
    blocks = -(-w.n // (16 * tiles))
    f((blocks,), (32 * _MMA_WARPS,), (
        w.qweight, w.sz, x_pad, y, np.int32(y.shape[1]), np.int32(m),
        np.int32(w.n), np.int32(w.chunks), np.int32(w.groups), *_group_args(w), np.int32(act)))
    return blocks


def w4a16_matmul(x, w: W4A16Weight, out=None, rows: int | None = None, tiles: int | None = None,
                 ksplit: int | None = None, tc: int | None = None):
    """y = x W^T.  x: fp16 [M, K] (cupy) -> fp16 [M, N]. `rows` / `tiles` / `ksplit` / `tc` override
    the kernel's choice (see _launch)."""
    cp = get_xp("cuda")
    m, k = x.shape
    if k != w.k:
        raise MinillmError(f"x has {k} features but the weight expects {w.k}")
    if w.perm is not None:
        x = cp.take(x, w.perm, axis=1)
    if m > 16:
        return x.astype(cp.float16) @ dequantize_fp16(w).T
    m_kernel = next(mk for mk in sorted(_INSTANCES) if mk >= m)
    kp = 32 * w.chunks
    if m_kernel != m or kp != k or x.dtype != cp.float16 or not x.flags.c_contiguous:
        x_pad = cp.zeros((m_kernel, kp), dtype=cp.float16)
        x_pad[:m, :k] = x
    else:
        x_pad = x
    y = cp.empty((m_kernel, w.n), dtype=cp.float16) if out is None or m_kernel != m else out
    _launch(x_pad, w, y, m_kernel, rows, tiles=tiles, ksplit=ksplit, tc=tc)
    return y[:m] if m_kernel != m else y


def dequantize_fp16(w: W4A16Weight):
    """The fp16 weight matrix [N, K] (in the kernel's column order), for large batches."""
    cp = get_xp("cuda")
    shifts = cp.arange(0, 32, 4, dtype=cp.uint32)
    codes = ((w.qweight[:, :, None] >> shifts) & 0xF).reshape(w.n, -1)[:, : w.k].astype(cp.float16)
    sz = w.sz[:, cp.arange(w.k) // w.group_size]
    scales = (sz & 0xFFFF).astype(cp.uint16).view(cp.float16)
    return (codes - (sz >> 16).astype(cp.float16)) * scales
