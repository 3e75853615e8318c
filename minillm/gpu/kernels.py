"""The CUDA sources in cuda_kernels/, compiled once per process with cupy.RawModule (NVRTC), and thin
launch wrappers with the grid arithmetic. Every wrapper writes into arrays it is given, so a
sequence of them can be captured in a CUDA graph (no allocation inside).
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..backend import get_xp
from .launch import Kernel

KERNEL_DIR = Path(__file__).resolve().parents[2] / "cuda_kernels"
KV_FORMATS = {"float": 0, "int8": 1, "fp8": 2, "int4": 3}  # the cache formats the kernels read
GEMV_BATCHES = (1, 2, 4, 8, 16)  # batch sizes compiled into gemv.cu / w4a16_gemv.cu
_GEMV_ROWS = {1: 2, 2: 2, 4: 2, 8: 2, 16: 2}  # rows per warp of gemv.cu's instances (even: see act)


# Extra NVRTC options for every module, set before the first kernel is compiled (bench/attn_timeline.py
# adds -DMINILLM_TIMELINE).
EXTRA_OPTIONS: tuple = ()


@lru_cache(maxsize=None)
def module(name: str, defines: tuple = ()):
    """cuda_kernels/`name`.cu compiled (defines: -D options of a variant, e.g. the INT4 cache's layout)."""
    cp = get_xp("cuda")
    src = (KERNEL_DIR / f"{name}.cu").read_text()
    return cp.RawModule(code=src, options=("-std=c++17", f"-I{KERNEL_DIR}") + EXTRA_OPTIONS + defines)


@lru_cache(maxsize=None)
def fn(file: str, name: str, defines: tuple = ()) -> Kernel:
    """Kernel `name` of cuda_kernels/`file`.cu; launched with programmatic dependent launch when it is
    captured into a graph on a GPU that has it (launch.py), through CuPy otherwise."""
    return Kernel(module(file, defines).get_function(name), name)


@lru_cache(maxsize=None)
def _device_properties() -> dict:
    """cudaDeviceProp of the current device, as CuPy gives it (asked once: it is a driver call)."""
    cp = get_xp("cuda")
    return cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)


def sm_count() -> int:
    """Streaming multiprocessors of the current device (grid sizes aim at a few blocks per SM)."""
    return int(_device_properties()["multiProcessorCount"])


def i32(v) -> np.int32:
    return np.int32(v)


def padded_batch(m: int) -> int:
    """The compiled batch size that serves m rows (the GEMV kernels are unrolled over the batch)."""
    return next(b for b in GEMV_BATCHES if b >= m)


def round_up(n: int, k: int) -> int:
    return -(-n // k) * k


# -- row-wise and element-wise kernels (decode_ops.cu) -----------------------------------------------

def add_rmsnorm(h, delta, weight, out, rows: int, eps: float, embed=None):
    """h += delta (if not None); out = RMSNorm(h) * weight (fp16). embed = (tok, E, scale): h = E[tok] *
    scale instead (the step's embedding and first norm in one kernel)."""
    d = h.shape[1]
    tok, table, scale = embed if embed is not None else (0, 0, 0.0)
    threads = min(1024, max(128, round_up(-(-d // 4), 32)))  # ~4 values a thread, kept in registers
    fn("decode_ops", "add_rmsnorm")((rows,), (threads,), (
        h, delta if delta is not None else 0, i32(delta.shape[1] if delta is not None else 0),
        weight, out, i32(out.shape[1]), i32(d), np.float32(eps), tok, table, np.float32(scale)))


# common.cuh's EpilogueIO, field by field in its layout (five pointers, two ints, three floats; then
# six pointers and four ints for the rotary epilogue), 8-byte aligned as the C struct is: passed to
# the batch-1 product kernels by value (CuPy sends a numpy record's bytes).
_EPILOGUE_IO = np.dtype({"names": ["in_ss", "h", "w", "u", "out_ss", "in_blocks", "D", "eps", "in_scale", "out_scale",
                                   "pos", "cos", "sin", "q", "k", "v", "H", "KV", "hd", "L"],
                         "formats": [np.uint64] * 5 + [np.int32] * 2 + [np.float32] * 3 + [np.uint64] * 6 + [np.int32] * 4,
                         "offsets": [0, 8, 16, 24, 32, 40, 44, 48, 52, 56, 64, 72, 80, 88, 96, 104, 112, 116, 120, 124],
                         "itemsize": 128, "aligned": True})


def _record(base=None, **fields):
    """An EpilogueIO as a numpy record (a scalar CuPy passes by value; a captured graph keeps the
    bytes): `base`'s fields (a record) with `fields` set."""
    rec = np.zeros(1, _EPILOGUE_IO)
    if base is not None:
        rec[0] = base
    for name, value in fields.items():
        rec[name] = value
    return rec[0]


NO_EPILOGUE = _record()  # the plain instances' argument: every pointer null


def epilogue_suffix(rec) -> str:
    """The kernel instance a record needs: "" (none), "_n" (a carried norm) or "_nr" (the norm and the
    rotary epilogue: the qkv product); compiled apart so the other products keep their registers."""
    if rec is None:
        return ""
    if rec["pos"]:
        return "_nr"
    return "_n" if rec["h"] or rec["in_ss"] else ""


def norm_exponent(weight) -> int:
    """k >= 0 with 2^k >= max |w| for an RMSNorm weight: u = h * w * 2^-k is then no larger than h in
    fp16. Any k gives the same result (k only keeps u in fp16's range), but it belongs to the weight:
    computed once when the weight is loaded (one device read), and carried with it."""
    top = float(get_xp("cuda").abs(weight).max()) if weight.size else 0.0
    return max(0, math.ceil(math.log2(top))) if top > 0 else 0


def norm_producer(h, weight, u, partials, k: int):
    """For a product whose output is a residual branch, at batch 1: it adds its output into h, writes
    u = h * weight * 2^-k (k = norm_exponent(weight)) and per-block sums of h^2 into partials
    (common.cuh, EpilogueIO). Returns the record."""
    return _record(h=h.data.ptr, w=weight.data.ptr, u=u.data.ptr, out_ss=partials.data.ptr, out_scale=2.0**-k)


def norm_consumer(partials, blocks: int, d: int, eps: float, k: int):
    """For the product that reads u: scale its sums by 2^k / sqrt(sum of the partials / d + eps)."""
    return _record(in_ss=partials.data.ptr, in_blocks=blocks, D=d, eps=float(eps), in_scale=2.0**k)


def rope_epilogue(normed, pos, cos, sin, q, keys, values, cfg, max_len: int):
    """The qkv product's record (`normed`'s norm fields, if any) with the rotary epilogue: at batch 1
    and one new token, q rotated into q [H, hd] and the new key and value written into the layer's
    fp16 caches [1, KV, max_len, hd] at pos[0] (common.cuh store_rope), as rope_append would."""
    return _record(normed, pos=pos.data.ptr, cos=cos.data.ptr, sin=sin.data.ptr, q=q.data.ptr, k=keys.data.ptr,
                   v=values.data.ptr, H=cfg.num_heads, KV=cfg.num_kv_heads, hd=cfg.head_dim, L=max_len)


def add_bias(y, bias, rows: int):
    n = bias.shape[0]
    fn("decode_ops", "add_bias")((min(-(-n // 256), 1024), rows), (256,), (y, i32(y.shape[1]), bias, i32(n)))


def gated_act(gu, out, rows: int, f: int, act: str):
    """out[:, i] = act(gu[:, 2i]) * gu[:, 2i + 1] (gate and up interleaved, as linear.py fuses them)."""
    fn("decode_ops", "gated_act")((min(-(-f // 256), 1024), rows), (256,), (
        gu, i32(gu.shape[1]), out, i32(out.shape[1]), i32(f), i32(ACT_CODES[act])))


def gather_cols(x, perm, out, rows: int):
    k = perm.shape[0]
    fn("decode_ops", "gather_cols")((min(-(-k // 256), 1024), rows), (256,), (
        x, i32(x.shape[1]), perm, out, i32(out.shape[1]), i32(k)))


def rope_append(qkv, q_out, q_norm, k_norm, eps, cos, sin, pos, rows, t, cfg, layer_cache, paired: bool = False):
    """Rotate q and k of `rows` rows (t new tokens per batch row), write q to q_out and k, v into the
    cache at positions pos[b] + t (encoded in the cache's format). paired: qkv's query and key heads
    come in the GPU's row order (qkv_row_order), else in the checkpoint's."""
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kc, vc, ks, vs, fmt, max_len, k_off, v_off = layer_cache
    fn("decode_ops", "rope_append")((rows, h + 2 * kv), (128,), (
        qkv, i32(qkv.shape[1]), q_out, q_norm if q_norm is not None else 0, k_norm if k_norm is not None else 0,
        np.float32(eps), cos, sin, pos, i32(t), i32(h), i32(kv), i32(hd), i32(cfg.rotary_dim), i32(max_len),
        i32(fmt), kc, vc, _ptr(ks), _ptr(vs), _ptr(k_off), _ptr(v_off), i32(int(paired))))


def qkv_row_order(cfg) -> np.ndarray:
    """The fused qkv weight's rows as the GPU keeps them: in every query and key head the rotated
    dims in pairs (j, j + rot/2), then the unrotated rest; value heads as they are. Rows n, n + 1 of
    a product are then the two values a rotation mixes, so the product can rotate them itself
    (common.cuh store_rope); the dot products of attention do not see the order."""
    hd, rot = cfg.head_dim, cfg.rotary_dim
    half = rot // 2
    within = np.concatenate([np.stack([np.arange(half), np.arange(half) + half], 1).reshape(-1), np.arange(rot, hd)])
    heads = cfg.num_heads + cfg.num_kv_heads
    paired = (np.arange(heads)[:, None] * hd + within[None, :]).reshape(-1)
    return np.concatenate([paired, np.arange(heads * hd, (heads + cfg.num_kv_heads) * hd)])


def _ptr(a):
    """An optional array argument: None becomes the null pointer."""
    return 0 if a is None else a


def next_token(logits, rows: int, vocab: int, tok, pos, temperature: float = 0.0, seed: int = 0,
               advance: bool = True, mailbox=None):
    """tok[:rows] = argmax (or a temperature sample) of each row of logits; pos advanced by one.
    mailbox: a TokenMailbox (pinned host memory) that also receives the tokens, at slot pos % slots;
    the kernel's rows are its row stride, so it must hold exactly `rows` (else it would write past it)."""
    if mailbox is not None and mailbox.batch != rows:
        raise ValueError(f"a token mailbox of {mailbox.batch} rows for {rows} rows of logits")
    inv_t = 0.0 if temperature <= 0 else 1.0 / temperature
    fn("decode_ops", "next_token")((rows,), (1024,), (
        logits, i32(logits.shape[1]), i32(vocab), np.float32(inv_t), np.uint64(seed), tok, pos, i32(int(advance)),
        np.uint64(mailbox.ptr if mailbox is not None else 0), i32(mailbox.slots if mailbox is not None else 1)))


# -- attention (attention.cu) ----------------------------------------------------------------------

def attention_plan(cfg, max_len: int, rows: int, sms: int = 132):
    """(chunk, splits, warps per block) for decode attention over a cache of max_len positions.
    A block holds the G query heads of one key/value head x W token streams; splits give enough
    (kv head, split, row) blocks to fill the GPU several times over, in chunks of at least 64
    positions. MINILLM_ATTN_STREAMS / MINILLM_ATTN_WAVES override the two choices (bench/gpu_kv.py
    --sweep measures them). The INT4 kernel takes only its splits bound from here."""
    g = cfg.num_heads // cfg.num_kv_heads
    # Measured on an H100 at 32k positions (bench/gpu_kv.py --sweep): 4 warps for one query head per
    # key/value head, 2 streams of G warps for grouped heads, 4 x SMs blocks.
    default_streams = 4 if g == 1 else (2 if g <= 4 else 1)
    streams = int(os.environ.get("MINILLM_ATTN_STREAMS", default_streams))
    target = int(os.environ.get("MINILLM_ATTN_WAVES", 4)) * sms  # blocks
    splits = max(1, min(-(-max_len // 64), -(-target // (cfg.num_kv_heads * rows)), MAX_MERGE // g))
    chunk = round_up(-(-max_len // splits), 64)
    return chunk, -(-max_len // chunk), g * streams


# The attention kernels' sizes, as their source has them (tests/test_gpu_launch_rules.py compares):
CLUSTER, MAX_CLUSTER_OUT = 8, 512  # attention.cu: blocks of a cluster, a block's result in floats
MAX_MERGE = 4352  # attention_merge.cuh: G x splits weights of a merge
ACC_PAD = 4  # attention_merge.cuh: floats added to each row of the warps' sums (no bank conflicts)


def decode_attention(q, layer_cache, pos, rows, t, cfg, window, parts, out, plan):
    """Attention of `rows` query rows over the cache (row r sees positions up to pos[b] + r % t),
    split along the sequence and merged into out [rows, ld] (fp16). parts: (acc, m, l, counter)
    scratch, the counter zeroed once (the kernel leaves it zero)."""
    kc, vc, ks, vs, fmt, max_len, _, v_off = layer_cache  # key offsets: no effect on softmax
    chunk, splits, warps = plan
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    acc, m, l, counter = parts
    name = {0: "fp16", 1: "int8", 2: "fp8"}[fmt]
    iters = 1 if hd <= 128 else 2
    g = h // kv
    # 8-bit codes with grouped query heads and splits of >= 8 key blocks: the tensor-core kernel,
    # whose warps hold all G heads and dequantize each code once for them (attention_mma.cu). H100,
    # 8 kv heads at 32k: 1.61x fp16 at batch 1, 2.13x at batch 8, against 1.11x / 0.96x; with short
    # splits (4k, batch 1: 64 positions) its warps idle (0.70x vs 1.02x), and with one query head
    # per kv head attention.cu's kernels read faster (1.60x vs 1.97x; bench/NOTES.md).
    want_mma = os.environ.get("MINILLM_ATTN_MMA")  # "1" / "0" force the choice (tests, benchmarks)
    use_mma = g > 1 and chunk >= 256 if want_mma is None else want_mma == "1"
    if fmt != 0 and hd <= 128 and use_mma:
        _attention_mma(name, q, kc, vc, ks, vs, pos, rows, t, cfg, max_len, window, parts, out, plan, v_off)
        return
    # Grouped heads with many (kv head, row) pairs: one warp per key/value head serves all G queries
    # (attention.cu, attn_decode_gqa): 1.2-1.3x faster at batch 8 x 8 kv heads from 16k positions,
    # slower with few blocks (batch 1), where one warp per query head is kept (bench/NOTES.md).
    want_gqa = os.environ.get("MINILLM_ATTN_GQA")  # "1" / "0" force it (tests)
    gqa = kv * rows >= 64 if want_gqa is None else want_gqa == "1"
    if g in (2, 4, 8) and hd <= 128 and gqa:
        fn("attention", f"attn_gqa_{name}_g{g}")((kv, splits, rows), (128,), (
            q, kc, vc, ks if ks is not None else 0, vs if vs is not None else 0, pos, i32(t), i32(h), i32(kv),
            i32(hd), i32(max_len), i32(chunk), i32(window or 0), np.float32(math.log2(math.e) / math.sqrt(hd)),
            acc, m, l, counter, out, i32(out.shape[1]), _ptr(v_off)))
        return
    # 8-bit caches with many (kv head, row) pairs: the software-pipelined loop (attention.cu, PIPE).
    want = os.environ.get("MINILLM_ATTN_PIPE")  # "1" / "0" force the choice (tests, benchmarks)
    many = kv * rows >= 128 and h == kv if want is None else want == "1"
    pipe = "_pipe" if fmt != 0 and iters == 1 and many else ""
    # fp16 with enough (kv head, row) pairs that CLUSTER splits each fill the GPU: the splits of a
    # pair as one thread-block cluster, merged in shared memory (attention.cu, cluster_merge).
    want = os.environ.get("MINILLM_ATTN_CLUSTER")  # "1" / "0" force the choice (tests, benchmarks)
    cluster = kv * rows >= 32 if want is None else want == "1"
    if fmt == 0 and cluster and g * hd <= MAX_CLUSTER_OUT and g <= 32:  # (its shared-memory inbox)
        kernel, grid, warps = f"attn_cluster_{name}_{iters}", (kv, CLUSTER, rows), g * max(1, 8 // g)  # 8 warps
    else:
        kernel, grid = f"attn_decode_{name}_{iters}{pipe}", (kv, splits, rows)
    fn("attention", kernel)(grid, (32 * warps,), (
        q, kc, vc, ks if ks is not None else 0, vs if vs is not None else 0, pos, i32(t), i32(h), i32(kv), i32(hd),
        i32(max_len), i32(chunk), i32(window or 0), np.float32(math.log2(math.e) / math.sqrt(hd)), acc, m, l,
        counter, out, i32(out.shape[1]), _ptr(v_off)))


def attention_parts(rows: int, cfg, plan):
    """Scratch for decode_attention: partial sums, maxima, normalisers, and the split counters."""
    cp = get_xp("cuda")
    h, hd, splits = cfg.num_heads, cfg.head_dim, plan[1]
    return (cp.zeros((rows, h, splits, hd), cp.float32), cp.zeros((rows, h, splits), cp.float32),
            cp.zeros((rows, h, splits), cp.float32), cp.zeros(rows * cfg.num_kv_heads, cp.int32))


def kivi_flush(kivi, pos, batch: int, t: int, cfg):
    """INT4 cache: quantize the block the step's last position completed (if it did) out of the window."""
    kq, vq, ks, kz, vs, vz, wk, wv, max_len, block, group = kivi
    kv, hd = cfg.num_kv_heads, cfg.head_dim
    fn("decode_ops", "kivi_flush")((batch * kv,), (128,), (
        wk, wv, kq, vq, ks, kz, vs, vz, pos, i32(t), i32(kv), i32(hd), i32(max_len), i32(block), i32(group)))


@lru_cache(maxsize=None)
def int4_layout(block: int, group: int) -> tuple:
    """attention_int4.cu's defines for an INT4 cache's key block and value group."""
    return (f"-DKIVI_BLOCK={block}", f"-DKIVI_GROUP={group}")


def int4_defines(block: int, group: int, blocks: int) -> tuple:
    """attention_int4.cu's defines for a launch of `blocks` blocks over an INT4 cache of this layout:
    with at most INT4_FEW_BLOCKS_PER_SM of them a SM, the build whose launch bounds promise only
    that many (more registers, no spills: attention_int4.cu KIVI_MIN_BLOCKS)."""
    few = blocks <= INT4_FEW_BLOCKS_PER_SM * sm_count()
    return int4_layout(block, group) + ((f"-DKIVI_MIN_BLOCKS={INT4_FEW_BLOCKS_PER_SM}",) if few else ())


def int4_grid(cfg, max_len: int, rows: int, plan) -> tuple:
    """(grid, chunk) of attention_int4.cu over a cache of max_len positions: blocks of (kv head,
    8 query heads) x splits x rows."""
    g = cfg.num_heads // cfg.num_kv_heads
    qtiles = -(-g // 8)
    # One wave: as many splits as keep every (kv head, query tile, row) at most INT4_BLOCKS_PER_SM
    # blocks a SM together; a second, partial wave would leave the GPU to its stragglers (H100,
    # 32k positions, 32 kv heads x batch 8: 2 splits 494 us, 3 splits 591; bench/NOTES.md).
    pairs = cfg.num_kv_heads * qtiles * rows
    # At least a key block for each warp of a split (4k positions, 8 kv heads, batch 1: 13.3 us
    # against 20.7 with 64-position splits). And at most 128 // G splits: the last block of a kv head
    # merges G x splits partial results alone while the GPU idles (attention_merge.cuh), and since
    # each warp streams its next key block during the current one (attention_int4.cu), fewer blocks
    # keep the memory busy (H100, 8 kv heads, batch 1, 32k: 64 / 32 / 16 splits 29.4 / 23.7 / 32.0 us).
    splits = max(1, min(-(-max_len // (32 * MMA_WARPS)), INT4_BLOCKS_PER_SM * sm_count() // pairs, plan[1],
                        max(1, 128 // g)))
    chunk = round_up(-(-max_len // splits), 64)
    return (cfg.num_kv_heads * qtiles, -(-max_len // chunk), rows), chunk


def decode_attention_int4(q, kivi, pos, rows, t, cfg, window, parts, out, plan):
    """Attention over an INT4 (KIVI) cache, quantized blocks and the fp16 window, on tensor cores
    (attention_int4.cu): blocks of (kv head, 8 query heads) x splits x rows."""
    kq, vq, ks, kz, vs, vz, wk, wv, max_len, block, group = kivi
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    grid, chunk = int4_grid(cfg, max_len, rows, plan)
    acc, m, l, counter = parts
    f = fn("attention_int4", f"attn_int4_hd{hd}" + ("_mha" if h == kv else ""),
           int4_defines(block, group, math.prod(grid)))
    f(grid, (32 * MMA_WARPS,), (
        q, kq, vq, ks, kz, vs, vz, wk, wv, pos, i32(t), i32(h), i32(kv), i32(max_len), i32(chunk), i32(window or 0),
        np.float32(math.log2(math.e) / math.sqrt(hd)), acc, m, l, counter, out, i32(out.shape[1])),
      shared_mem=spread_shared_memory(f, math.prod(grid), 0))


def spread_shared_memory(kernel, blocks: int, dynamic: int) -> int:
    """Dynamic shared memory for a launch of `blocks` blocks that asks for `dynamic`: enough more that
    no SM can hold more than its share, ceil(blocks / SMs), of them.
    The tensor-core attention kernels let the next kernel launch once their loops are done (PDL,
    common.cuh pdl_trigger). A grid of fewer blocks than the SMs' slots leaves slots free, and the
    next call's blocks, launched while this one merges, then pile onto some SMs: H100, 8 kv heads,
    batch 1, 32k (256 blocks), in a run of calls, INT4 21.2 -> 25.7 us, int8 33.6 -> 34.7. Held to
    two a SM they cannot, and the early launch pays there too: INT4 20.5, int8 32.0 (bench/NOTES.md
    session 19). A full grid (INT4, 32 kv heads: 512 blocks, 4 a SM) needs nothing more."""
    share = -(-blocks // sm_count())
    per_sm, reserved = _shared_memory_per_sm()
    static = kernel.static_shared_bytes
    # A block (with the driver's reserve) must take more than 1 / (share + 1) of the SM's memory, in
    # the 128-byte units it is allocated in; past what the share itself leaves room for, nothing.
    padded = max(dynamic, round_up(per_sm // (share + 1) + 1 - reserved - static, 128))
    return padded if share * (static + padded + reserved) <= per_sm else dynamic


def _shared_memory_per_sm() -> tuple:
    """(shared memory a SM holds, what the driver reserves for each block), bytes."""
    props = _device_properties()
    return props["sharedMemPerMultiprocessor"], props.get("reservedSharedMemPerBlock", 1024)


MMA_WARPS = 4  # NW in attention_mma.cu and attention_int4.cu
MMA_STAGES = 2  # attention_mma.cu's stages a warp (the _bulk instances)
INT4_BLOCKS_PER_SM = 4  # attention_int4.cu's launch bounds (128 registers, 43 KB of shared memory)
INT4_FEW_BLOCKS_PER_SM = 2  # ... its build for grids of at most two blocks a SM (176 registers)


def _attention_mma(fmt: str, q, kc, vc, ks, vs, pos, rows, t, cfg, max_len, window, parts, out, plan, v_off):
    """attention_mma.cu (8-bit codes, grouped heads): blocks of (kv head, 8 query heads) x splits x rows."""
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    # Half the plan's splits (about 2 blocks per SM), so each warp takes more key blocks (H100, 8 kv
    # heads: 32k batch 1 49 us vs 72 at the plan's 4 waves, 4k batch 8 2.30x fp16 vs 1.75x;
    # bench/NOTES.md, waves sweep).
    chunk = 2 * plan[0]
    splits = -(-max_len // chunk)
    qtiles = -(-(h // kv) // 8)
    acc, m, l, counter = parts
    # With few blocks (8 kv heads at batch 1 or 2), each warp's next block copied by the bulk-copy
    # engine into shared memory (the _bulk instances): H100, 32k, batch 1, int8 35.0 -> 33.0 us (66% ->
    # 70% of copy), 64k 60.6 -> 56.2; with batch 8 the loads into registers are faster (204.7 vs
    # 214.3 us at 32k; bench/NOTES.md session 17).
    want = os.environ.get("MINILLM_ATTN_BULK")  # "1" / "0" force the choice (tests, benchmarks)
    bulk = kv * qtiles * rows <= 16 if want is None else want == "1"
    hdp = 64 if hd <= 64 else 128
    f = fn("attention_mma", f"attn_mma_{fmt}_hd{hdp}" + ("_bulk" if bulk else ""))
    grid = (kv * qtiles, splits, rows)
    f(grid, (32 * MMA_WARPS,), (
        q, kc, vc, ks, vs, pos, i32(t), i32(h), i32(kv), i32(hd), i32(max_len), i32(chunk), i32(window or 0),
        np.float32(math.log2(math.e) / math.sqrt(hd)), acc, m, l, counter, out, i32(out.shape[1]), _ptr(v_off)),
      shared_mem=spread_shared_memory(f, math.prod(grid), mma_smem_bytes(hd, bulk)))


def mma_smem_bytes(hd: int, bulk: bool) -> int:
    """attention_mma.cu's dynamic shared memory: the warps' sums (sm_acc) and the merge's weights
    (MAX_MERGE floats), and with bulk copies each warp's two stages (32 key and 32 value rows of hd
    bytes and their 64 scales), which those alias once the loop is done."""
    hdp = 64 if hd <= 64 else 128
    end = 4 * MMA_WARPS * 8 * (hdp + ACC_PAD) + 4 * MAX_MERGE
    return max(end, MMA_STAGES * MMA_WARPS * (2 * 32 * hd + 2 * 4 * 32)) if bulk else end


# -- matrix products (gemv.cu, w4a16_gemv.cu, dequant.cu) ------------------------------------------

ACT_CODES = {"silu": 0, "gelu_tanh": 1}


def gemv_f16(w, x, y, m: int, n: int, act: int = -1, nio=None) -> int:
    """y[:m, :n] = x[:m] @ w.T for fp16 w [n, 8C] (m a compiled batch size); act >= 0: w's rows are
    (gate, up) pairs and y[:m, :n/2] = act(gate) * up; nio: an EpilogueIO record (m = 1). Returns the
    number of blocks launched."""
    rows = _GEMV_ROWS[m]
    warps = -(-n // rows)
    blocks = -(-warps // 4)
    c = w.shape[1] // 8
    fn("gemv", f"gemv_f16_m{m}_r{rows}" + epilogue_suffix(nio))((blocks,), (128,), (
        w, x, i32(x.shape[1]), y, i32(y.shape[1]), i32(n), i32(c), i32(act), NO_EPILOGUE if nio is None else nio))
    return blocks


def gemv_i8(codes, scales, zeros, group, x, y, m: int, n: int, act: int = -1, nio=None) -> int:
    rows = _GEMV_ROWS[m]
    warps = -(-n // rows)
    blocks = -(-warps // 4)
    c = codes.shape[1] // 16
    fn("gemv", f"gemv_i8_m{m}_r{rows}" + epilogue_suffix(nio))((blocks,), (128,), (
        codes, scales, zeros if zeros is not None else 0, x, i32(x.shape[1]), y, i32(y.shape[1]), i32(n), i32(c),
        i32(scales.shape[1]), i32(max(1, group // 16)), i32(act), NO_EPILOGUE if nio is None else nio))
    return blocks


def dequant_w4(qweight, sz, out, group: int):
    n, words = qweight.shape
    total = n * words
    fn("dequant", "dequant_w4")((-(-total // 256),), (256,), (
        qweight, sz, out, i32(n), i32(words), i32(out.shape[1]), i32(sz.shape[1]), i32(group)))


def dequant_i8(codes, scales, zeros, out, group: int):
    n = codes.shape[0]
    total = n * (out.shape[1] // 8)
    fn("dequant", "dequant_i8")((-(-total // 256),), (256,), (
        codes, i32(codes.shape[1]), scales, zeros if zeros is not None else 0, out, i32(n), i32(out.shape[1]),
        i32(scales.shape[1]), i32(group)))
