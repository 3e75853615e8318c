"""Acceptance (issue 6 point 1, issue 7 point 1, GPU kernels): each kernel of the decode step against a
NumPy reference on random inputs drawn by hypothesis, outputs poisoned with NaN before each launch.
Run with `python3 -m pytest -m gpu`; skipped without CUDA."""

import math
import os
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from minillm.attention import attention
from minillm.errors import MinillmError
from minillm.kvcache import FP8KVCache, Int8KVCache
from minillm.model import apply_rope
from minillm.quant import QuantSpec, quantize_rtn

pytestmark = pytest.mark.gpu
# MINILLM_GPU_EXAMPLES=N runs N examples per test (e.g. under compute-sanitizer, which is slow).
EXAMPLES = int(os.environ.get("MINILLM_GPU_EXAMPLES", "0"))


class Cfg:  # the fields the kernels read
    def __init__(self, h, kv, hd, rot=None):
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.rotary_dim = rot or hd


def poisoned(cp, shape, dtype):
    a = cp.empty(shape, dtype)
    a[...] = cp.nan if np.dtype(dtype).kind == "f" else 0x7F
    return a


class LinearScratch:
    """What GpuLinear asks of the engine's buffers: an input-gather buffer and dense weight room."""

    def __init__(self, rows, ld):
        import cupy as cp

        self.x_perm = cp.zeros((rows, ld), cp.float16)
        self.norm_partials = cp.zeros(2 * ld, cp.float32)

    @staticmethod
    def weight(n, k):
        import cupy as cp

        return cp.empty((n, k), cp.float16)


@contextmanager
def forced_w4_kernel(choice: str):
    """MINILLM_W4_TC1 set to `choice` ("0": the W4 GEMV, "4" / "5" / "16": the batch-1 tensor-core kernel with
    that many warps a block) for the products launched inside, restored after."""
    before = os.environ.get("MINILLM_W4_TC1")
    os.environ["MINILLM_W4_TC1"] = choice
    try:
        yield
    finally:
        if before is None:
            del os.environ["MINILLM_W4_TC1"]
        else:
            os.environ["MINILLM_W4_TC1"] = before


def fp16_bound(x):
    """fp16 rounding of a result of magnitude |x| (plus a floor for values near zero)."""
    return 2.0**-10 * np.abs(x) + 1e-3


@settings(max_examples=EXAMPLES or 25, deadline=None)
@given(rows=st.integers(1, 9), d=st.integers(1, 700), source=st.sampled_from(["h", "delta", "embed"]),
       seed=st.integers(0, 2**31))
def test_add_rmsnorm(rows, d, source, seed):
    """out = RMSNorm(h') * w with h' = h, h + delta, or an embedding row E[tok] * scale (the step's
    first kernel); h' written back to h when it is new."""
    import cupy as cp

    from minillm.gpu import kernels as K

    rng = np.random.default_rng(seed)
    h = rng.normal(size=(rows, d)).astype(np.float32) * 3
    delta = rng.normal(size=(rows, d)).astype(np.float16)
    table = rng.normal(size=(50, d)).astype(np.float16)
    tok, scale = rng.integers(0, 50, size=rows).astype(np.int32), float(rng.uniform(0.5, 8))
    w = rng.normal(size=d).astype(np.float32)
    hd, out = cp.asarray(h), poisoned(cp, (rows, K.round_up(d, 32)), cp.float16)
    embed = (cp.asarray(tok), cp.asarray(table), scale) if source == "embed" else None
    K.add_rmsnorm(hd, cp.asarray(delta) if source == "delta" else None, cp.asarray(w), out, rows, 1e-5, embed=embed)
    href = {"h": h, "delta": h + delta.astype(np.float32), "embed": table[tok].astype(np.float32) * np.float32(scale)}[source]
    ref = href / np.sqrt((href**2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(cp.asnumpy(hd), href, rtol=1e-6, atol=1e-6)
    got = cp.asnumpy(out[:, :d]).astype(np.float64)
    assert np.all(np.abs(got - ref) <= fp16_bound(ref) + 1e-5 * np.abs(ref).max())


def _spec(kind, w4_group=32):
    return {"w8": QuantSpec(8, "group", 16), "w4": QuantSpec(4, "group", w4_group)}.get(kind)


def _linear(kind, w, w4_group=32):
    from minillm.gpu.linear import GpuLinear

    return GpuLinear.from_host([quantize_rtn(w, _spec(kind, w4_group)) if kind in ("w8", "w4") else w])


@settings(max_examples=EXAMPLES or 30, deadline=None)
@given(producer=st.sampled_from(["fp16", "w8", "w4"]), consumer=st.sampled_from(["fp16", "w8", "w4"]),
       d=st.integers(1, 600), k=st.integers(1, 300), n=st.integers(1, 300), big_w=st.booleans(),
       act=st.booleans(), w4_group=st.sampled_from([32, 128]), w4_kernel=st.sampled_from(["0", "4", "5", "16"]),
       seed=st.integers(0, 2**31))
def test_norm_carried_between_products(producer, consumer, d, k, n, big_w, act, w4_group, w4_kernel, seed):
    """Batch 1: a product adds its output into h and leaves h * w (common.cuh EpilogueIO), the next one
    scales its sums by 1 / rms(h): the same as add_rmsnorm between them, within the fp16 rounding
    of the input either way. W4 products run the GEMV ("0") or the batch-1 tensor-core kernel with 4,
    5 or 16 warps a block (MINILLM_W4_TC1), with groups of 32 (scale on the codes) or 128 (on the sums)."""
    import cupy as cp

    from minillm.gpu import kernels as K

    rng = np.random.default_rng(seed)
    wp = rng.normal(size=(d, k)).astype(np.float32)
    n = 2 * n if act else n  # a gate/up pair per output
    wc = rng.normal(size=(n, d)).astype(np.float32)
    lp, lc = _linear(producer, wp, w4_group), _linear(consumer, wc, w4_group)
    with forced_w4_kernel(w4_kernel):
        _carry_and_check(cp, K, rng, lp, lc, consumer, wc, d, k, n, big_w, act, w4_group)


def _carry_and_check(cp, K, rng, lp, lc, consumer, wc, d, k, n, big_w, act, w4_group):
    scratch = LinearScratch(1, K.round_up(max(d, k), 32))
    x = cp.zeros((1, K.round_up(k, 32)), cp.float16)
    x[0, :k] = cp.asarray(rng.normal(size=k).astype(np.float16))
    h0 = (rng.normal(size=(1, d)) * 3).astype(np.float32)
    w = (rng.normal(size=d) * (8 if big_w else 1)).astype(np.float32)  # big: u = h w 2^-k, k > 0
    h, wd = cp.asarray(h0), cp.asarray(w)
    y = poisoned(cp, (1, d), cp.float16)
    u = cp.zeros((1, K.round_up(d, 32)), cp.float16)
    z = poisoned(cp, (1, n // 2 if act else n), cp.float16)
    rec = lp(x, y, 1, scratch, norm=(h, wd, u, 1e-5, K.norm_exponent(wd)), carry=True)
    assert rec is not None
    lc(u, z, 1, scratch, act="silu" if act else None, gu=cp.zeros((1, n), cp.float16), epilogue=rec)

    href = h0 + cp.asnumpy(y).astype(np.float32)
    np.testing.assert_allclose(cp.asnumpy(h), href, rtol=1e-6, atol=1e-6)
    xn = (href / np.sqrt((href.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w)[0]
    wq = np.asarray(quantize_rtn(wc, _spec(consumer, w4_group)).dequantize() if consumer != "fp16"
                    else wc.astype(np.float16), np.float64)
    pre = wq @ xn
    # Relative 2^-11 each: u (fp16 of h w 2^-k) against xn, the weights' fp16 scales on the GPU
    # against the reference's float ones, and the output's own rounding (below): |W| |xn| 2^-9.
    slack = np.abs(wq) @ np.abs(xn) * 2.0**-9 + 1e-3
    if act:
        g, up = pre[0::2], pre[1::2]
        ref = g / (1 + np.exp(-np.clip(g, -80, 80))) * up
        # d(silu(g) up) = (silu'(g) up) dg + silu(g) dup, with |silu'| <= 1.1
        bound = 1.1 * np.abs(up) * slack[0::2] + np.abs(g) * slack[1::2] + slack[0::2] * slack[1::2]
    else:
        ref, bound = pre, slack
    assume(np.abs(ref).max() < 6e4)  # beyond fp16's range either path overflows
    got = cp.asnumpy(z[0]).astype(np.float64)
    err = np.abs(got - ref) - bound - fp16_bound(ref)
    assert np.all(err <= 0), (err.max(), got[err.argmax()], ref[err.argmax()], bound[err.argmax()])


def rope_tables(length, rot, base=10000.0):
    inv = 1.0 / base ** (np.arange(0, rot, 2) / rot)
    ang = np.arange(length)[:, None] * inv[None]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


@settings(max_examples=EXAMPLES or 30, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 5), kv=st.integers(1, 3), g=st.integers(1, 3),
       hd=st.sampled_from([16, 24, 64, 128, 256]), partial=st.booleans(), qk_norm=st.booleans(),
       fmt=st.sampled_from(["float", "int8", "fp8", "fp8-offsets"]), paired=st.booleans(), seed=st.integers(0, 2**31))
def test_rope_append(b, t, kv, g, hd, partial, qk_norm, fmt, paired, seed):
    """q rotated into q_out; k (rotated) and v written at positions pos[b] + t in the cache's format
    (int8/fp8 codes and scales as kvcache.py's reference encodes them; fp8 also centred by offsets).
    paired: qkv in the GPU's row order (kernels.qkv_row_order), the reference reads it in the
    checkpoint's."""
    import cupy as cp

    from minillm.gpu import kernels as K
    from minillm.gpu.cache import GpuKVCache

    rng = np.random.default_rng(seed)
    if fmt != "float" and hd % 16:  # the 8-bit caches read rows in 16-byte pieces
        hd = 32
    h, length = kv * g, 40
    rot = hd // 2 if partial and hd % 4 == 0 else hd
    cfg = Cfg(h, kv, hd, rot)
    cfg.num_layers = 1
    offsets = None
    if fmt == "fp8-offsets":
        fmt, offsets = "fp8", (rng.normal(size=(2, 1, kv, hd)) * 3).astype(np.float32)
    cache = GpuKVCache(cfg, fmt, b, length, offsets=offsets)
    pos = rng.integers(0, length - t, size=b).astype(np.int32)
    cache.pos.set(pos)
    qkv = (rng.normal(size=(b * t, (h + 2 * kv) * hd)) * 2).astype(np.float16)
    qn = rng.normal(size=hd).astype(np.float32) if qk_norm else None
    kn = rng.normal(size=hd).astype(np.float32) if qk_norm else None
    cos, sin = rope_tables(length, rot)
    q_out = poisoned(cp, (b * t, h, hd), cp.float16)
    given_qkv = np.ascontiguousarray(qkv[:, K.qkv_row_order(cfg)]) if paired else qkv
    K.rope_append(cp.asarray(given_qkv), q_out, None if qn is None else cp.asarray(qn), None if kn is None else cp.asarray(kn),
                  1e-6, cp.asarray(cos), cp.asarray(sin), cache.pos, b * t, t, cfg, cache.layer(0), paired=paired)

    x = qkv.astype(np.float32).reshape(b, t, h + 2 * kv, hd)
    q, k, v = x[:, :, :h], x[:, :, h : h + kv], x[:, :, h + kv :]
    if qk_norm:
        q = q / np.sqrt((q**2).mean(-1, keepdims=True) + 1e-6) * qn
        k = k / np.sqrt((k**2).mean(-1, keepdims=True) + 1e-6) * kn
    positions = pos[:, None] + np.arange(t)[None]  # [b, t]
    c, s = cos[positions][:, None], sin[positions][:, None]  # [b, 1, t, rot/2]
    q = apply_rope(np, q.transpose(0, 2, 1, 3), c, s, rot)  # [b, h, t, hd]
    k = apply_rope(np, k.transpose(0, 2, 1, 3), c, s, rot)
    v = v.transpose(0, 2, 1, 3)
    got_q = cp.asnumpy(q_out).astype(np.float32).reshape(b, t, h, hd).transpose(0, 2, 1, 3)
    assert np.all(np.abs(got_q - q) <= fp16_bound(q) + 1e-3)
    keys, vals = cache.dequantized(0, length)
    for bi in range(b):
        for name, ref, got in (("k", k, keys), ("v", v, vals)):
            want = ref[bi]  # [kv, t, hd]
            have = cp.asnumpy(got[bi][:, pos[bi] : pos[bi] + t])
            if fmt == "float":
                bound = fp16_bound(want) + 1e-3
            else:  # the reference format applied to the same fp32 values: the codes' own step
                cls = Int8KVCache if fmt == "int8" else FP8KVCache
                mu = 0.0 if offsets is None else offsets["kv".index(name)][0][:, None, :]  # [kv, 1, hd]
                codes, scale = cls.encode(want - mu)
                want = cls.decode(codes, scale) + mu
                bound = 0.02 * np.abs(want).max(-1, keepdims=True) + 1e-3  # fp16 input vs fp32: rare flips
            assert np.all(np.abs(have - want) <= bound), name


@settings(max_examples=EXAMPLES or 30, deadline=None)
@given(kind=st.sampled_from(["fp16", "w8", "w4"]), w4_kernel=st.sampled_from(["0", "4", "5", "16"]),
       w4_group=st.sampled_from([32, 128]), kv=st.integers(1, 3), g=st.integers(1, 3),
       hd=st.sampled_from([16, 24, 64, 128]), d=st.integers(1, 300), length=st.integers(1, 50),
       normed=st.booleans(), seed=st.integers(0, 2**31))
def test_rope_in_qkv_product(kind, w4_kernel, w4_group, kv, g, hd, d, length, normed, seed):
    """Batch 1, one token: the qkv product with the rotary epilogue (rows in kernels.qkv_row_order)
    writes RoPE(q), RoPE(k) and v where rope_append would, from the float reference of x W^T scaled
    by a carried norm's factor, and writes nothing else (q and the caches poisoned before). Every
    batch-1 kernel: fp16 and W8 GEMVs, W4 GEMV ("0") or tensor-core kernel with 4 / 5 / 16 warps."""
    import cupy as cp

    from minillm.gpu import kernels as K
    from minillm.gpu.linear import GpuLinear

    rng = np.random.default_rng(seed)
    h = kv * g
    cfg = Cfg(h, kv, hd)
    n = (h + 2 * kv) * hd
    w = rng.normal(size=(n, d)).astype(np.float32)
    parts = [quantize_rtn(w, _spec(kind, w4_group))] if kind != "fp16" else [w]
    lin = GpuLinear.from_host(parts, order=K.qkv_row_order(cfg))
    x = cp.zeros((1, K.round_up(d, 32)), cp.float16)
    x[0, :d] = cp.asarray(rng.normal(size=d).astype(np.float16))
    pos_h = int(rng.integers(0, length))
    pos = cp.asarray(np.array([pos_h], np.int32))
    cos, sin = rope_tables(length, hd)
    q = poisoned(cp, (h, hd), cp.float16)
    keys, vals = poisoned(cp, (1, kv, length, hd), cp.float16), poisoned(cp, (1, kv, length, hd), cp.float16)
    rec, factor = None, 1.0
    if normed:  # a consumer's record: its sums scaled by 2^k / sqrt(sum of partials / D + eps)
        partials = cp.asarray(rng.random(7).astype(np.float32) * 50)
        rec = K.norm_consumer(partials, 7, 40, 1e-5, 2)
        factor = 4.0 / math.sqrt(float(partials.sum()) / 40 + 1e-5)
    with forced_w4_kernel(w4_kernel):
        lin(x, cp.zeros((1, n), cp.float16), 1, LinearScratch(1, K.round_up(d, 32)),
            epilogue=K.rope_epilogue(rec, pos, cp.asarray(cos), cp.asarray(sin), q, keys, vals, cfg, length))

    wq = np.asarray(parts[0].dequantize() if kind != "fp16" else w.astype(np.float16), np.float64)
    xf = cp.asnumpy(x[0, :d]).astype(np.float64)
    y = factor * (wq @ xf)
    # The product's own error (fp16 weights and scales, fp32 sums: |W| |x| 2^-9 as in the carried-norm
    # test), then qkv's rounding to fp16 before the rotation, then the output's rounding.
    slack = factor * (np.abs(wq) @ np.abs(xf)) * 2.0**-9 + 1e-3 + fp16_bound(y)
    assume(np.abs(y).max() < 3e4)
    c, s = cos[pos_h], sin[pos_h]
    half = hd // 2

    def rotated(v, err):  # [heads, hd]: (a c - b s, b c + a s), error <= err_a + err_b
        a, b = v[:, :half], v[:, half:]
        out = np.concatenate([a * c - b * s, b * c + a * s], 1)
        e = err[:, :half] + err[:, half:]
        return out, np.concatenate([e, e], 1) + fp16_bound(out)

    yq, yk, yv = y[: h * hd].reshape(h, hd), y[h * hd : (h + kv) * hd].reshape(kv, hd), y[(h + kv) * hd :].reshape(kv, hd)
    eq, ek, ev = (slack[: h * hd].reshape(h, hd), slack[h * hd : (h + kv) * hd].reshape(kv, hd),
                  slack[(h + kv) * hd :].reshape(kv, hd))
    got_k, got_v = cp.asnumpy(keys[0]).astype(np.float64), cp.asnumpy(vals[0]).astype(np.float64)
    for name, (want, bound), got in (("q", rotated(yq, eq), cp.asnumpy(q).astype(np.float64)),
                                     ("k", rotated(yk, ek), got_k[:, pos_h]), ("v", (yv, ev + fp16_bound(yv)), got_v[:, pos_h])):
        err = np.abs(got - want) - bound
        assert np.all(err <= 0), (name, err.max())
    others = np.arange(length) != pos_h
    assert np.isnan(got_k[:, others]).all() and np.isnan(got_v[:, others]).all()


@settings(max_examples=EXAMPLES or 40, deadline=None)
@given(b=st.integers(1, 2), t=st.integers(1, 4), kv=st.integers(1, 4), g=st.sampled_from([1, 2, 3, 4, 8]),
       hd=st.sampled_from([16, 64, 128, 256]), fmt=st.sampled_from(["float", "int8", "fp8", "fp8-offsets"]),
       max_len=st.integers(8, 3000), window=st.sampled_from([0, 0, 5, 300]), outliers=st.booleans(),
       kernel=st.sampled_from(["plain", "pipe", "gqa", "mma", "mma-bulk", "cluster"]), seed=st.integers(0, 2**31))
@example(b=2, t=1, kv=4, g=1, hd=128, fmt="float", max_len=700, window=0, outliers=False, kernel="cluster", seed=1)
@example(b=1, t=3, kv=2, g=3, hd=64, fmt="float", max_len=900, window=300, outliers=True, kernel="cluster", seed=2)
# long splits: each warp of the tensor-core kernel (attention_mma.cu) takes many key blocks
@example(b=2, t=4, kv=4, g=4, hd=128, fmt="int8", max_len=20000, window=0, outliers=True, kernel="mma", seed=3)
@example(b=2, t=4, kv=4, g=8, hd=64, fmt="fp8-offsets", max_len=12345, window=300, outliers=False, kernel="mma", seed=4)
# the same with bulk copies: whole blocks with their scales by the engine (max_len % 32 == 0), the
# scales by the lanes (max_len % 4 != 0), and a last block of fewer than 32 rows (both cases)
@example(b=2, t=4, kv=4, g=4, hd=128, fmt="int8", max_len=20000, window=0, outliers=True, kernel="mma-bulk", seed=5)
@example(b=2, t=4, kv=4, g=8, hd=64, fmt="fp8-offsets", max_len=12345, window=300, outliers=False, kernel="mma-bulk", seed=6)
@example(b=1, t=1, kv=2, g=4, hd=16, fmt="fp8", max_len=1000, window=0, outliers=False, kernel="mma-bulk", seed=7)
def test_decode_attention(b, t, kv, g, hd, fmt, max_len, window, outliers, kernel, seed):
    """Split-K attention equals softmax(q K^T / sqrt(hd)) V over the dequantized cache (causal for
    every row, sliding window where given), for any context length and GQA grouping."""
    import cupy as cp

    from minillm.gpu import kernels as K
    from minillm.gpu.cache import GpuKVCache

    rng = np.random.default_rng(seed)
    h = kv * g
    cfg = Cfg(h, kv, hd)
    cfg.num_layers = 1
    offsets = None
    if fmt == "fp8-offsets":  # values' offsets come back at the merge; keys' change no softmax
        fmt, offsets = "fp8", (rng.normal(size=(2, 1, kv, hd)) * 3).astype(np.float32)
    cache = GpuKVCache(cfg, fmt, b, max_len, offsets=offsets)
    pos = rng.integers(0, max_len - t + 1, size=b).astype(np.int32)
    cache.pos.set(pos)
    kvals = rng.normal(size=(b, kv, max_len, hd)).astype(np.float32)
    if outliers:  # KIVI's case: a few key channels far larger than the rest
        kvals[..., rng.integers(0, hd, 3)] *= 20
    vvals = rng.normal(size=(b, kv, max_len, hd)).astype(np.float32)
    if fmt == "float":
        cache.keys[0][...] = cp.asarray(kvals.astype(np.float16))
        cache.values[0][...] = cp.asarray(vvals.astype(np.float16))
    else:
        cls = Int8KVCache if fmt == "int8" else FP8KVCache
        for arr, sc, x in ((cache.keys[0], cache.k_scale[0], kvals), (cache.values[0], cache.v_scale[0], vvals)):
            codes, scale = cls.encode(x)
            arr[...] = cp.asarray(codes.view(np.int8) if fmt == "int8" else codes)
            sc[...] = cp.asarray(scale[..., 0])
    keys, vals = (cp.asnumpy(a).astype(np.float64) for a in cache.dequantized(0, max_len))
    q = rng.normal(size=(b * t, h, hd)).astype(np.float16)
    plan = K.attention_plan(cfg, max_len, b * t)
    parts = K.attention_parts(b * t, cfg, plan)
    out = poisoned(cp, (b * t, K.round_up(h * hd, 32)), cp.float16)
    # Each kernel where the format has it: attention.cu's plain and pipelined loops, grouped-heads
    # kernel and cluster-merged splits; attention_mma.cu (8-bit codes, head_dim <= 128), its codes
    # loaded into registers or copied into shared memory by the bulk-copy engine.
    flags = {"MINILLM_ATTN_PIPE": kernel == "pipe", "MINILLM_ATTN_GQA": kernel == "gqa",
             "MINILLM_ATTN_MMA": kernel in ("mma", "mma-bulk"), "MINILLM_ATTN_BULK": kernel == "mma-bulk",
             "MINILLM_ATTN_CLUSTER": kernel == "cluster"}
    os.environ.update({k: "1" if v else "0" for k, v in flags.items()})
    try:
        K.decode_attention(cp.asarray(q), cache.layer(0), cache.pos, b * t, t, cfg, window or None, parts, out, plan)
    finally:
        for k in flags:
            del os.environ[k]
    got = cp.asnumpy(out[:, : h * hd]).astype(np.float64).reshape(b, t, h, hd)
    for bi in range(b):
        end = pos[bi] + t
        qb = q[bi * t : (bi + 1) * t].astype(np.float64).transpose(1, 0, 2)[None]  # [1, h, t, hd]
        ref = attention(np, qb, keys[bi : bi + 1, :, :end], vals[bi : bi + 1, :, :end], int(pos[bi]), window or None)
        ref = ref[0].transpose(1, 0, 2)  # [t, h, hd]
        # fp32 accumulation and one fp16 rounding of outputs bounded by max |v|.
        bound = 2.0**-10 * np.abs(vals[bi]).max() + 1e-4 * np.abs(vals[bi]).max()
        assert np.abs(got[bi] - ref).max() <= bound, (np.abs(got[bi] - ref).max(), bound)


@settings(max_examples=EXAMPLES or 40, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 700), m=st.integers(1, 20), bits=st.sampled_from([16, 8, 4]),
       group=st.sampled_from([32, 64, 128, 0]), sym=st.booleans(), seed=st.integers(0, 2**31))
def test_gpu_linear(n, k, m, bits, group, sym, seed):
    """GpuLinear (fp16 GEMV, W8A16 GEMV, W4A16, and the dequantize + cuBLAS path past 16 rows) against
    the float64 product with the dequantized weights; odd K and N, per-channel and grouped."""
    import cupy as cp

    from minillm.gpu import kernels as K
    from minillm.gpu.linear import GpuLinear

    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n, k)).astype(np.float32)
    if bits == 16:
        dense = w.astype(np.float16).astype(np.float64)
        lin = GpuLinear.from_host([w])
    else:
        spec = QuantSpec(bits, "group", group, sym) if group else QuantSpec(bits, "channel", sym=sym)
        qt = quantize_rtn(w, spec)
        dense = qt.dequantize().astype(np.float64)
        lin = GpuLinear.from_host([qt])
        if group:
            assert lin.kind == {4: "w4", 8: "w8"}[bits]
    ld = K.round_up(k, 32)
    rp = K.padded_batch(m) if m <= 16 else m
    x = np.zeros((rp, ld), np.float16)
    x[:m, :k] = rng.normal(size=(m, k))

    scratch = LinearScratch(rp, ld)

    y = poisoned(cp, (rp, n), cp.float16)
    lin(cp.asarray(x), y, m, scratch)
    got = cp.asnumpy(y[:m]).astype(np.float64)
    xs = x[:m, :k].astype(np.float64)
    ref = xs @ dense.T
    bound = 2.0**-10 * (np.abs(xs) @ np.abs(dense).T) + 1e-5
    assert np.all(np.abs(got - ref) <= bound)


@settings(max_examples=EXAMPLES or 25, deadline=None)
@given(rows=st.integers(1, 4), vocab=st.integers(1, 70000), pad=st.integers(0, 40), levels=st.integers(2, 1000),
       seed=st.integers(0, 2**31))
def test_next_token_argmax(rows, vocab, pad, levels, seed):
    """Greedy next token = the first maximum of each row (np.argmax), over vocabularies of one and of
    more than one round of loads (32768), with ties (logits drawn from `levels` values) and padded
    rows whose columns past the vocabulary must be ignored; pos advances by one; the host's mailbox
    (pinned memory the kernel writes itself) holds each row's token at slot pos % slots."""
    import cupy as cp

    from minillm.gpu import kernels as K
    from minillm.gpu.cache import TokenMailbox

    rng = np.random.default_rng(seed)
    logits = rng.integers(0, levels, size=(rows, vocab + pad)).astype(np.float16)
    logits[:, vocab:] = 60000  # padding, larger than any logit: must not be chosen
    tok, pos = cp.full(rows, -1, cp.int32), cp.asarray(np.arange(rows, dtype=np.int32) + 5)
    box = TokenMailbox(rows, slots=3)
    box.view[...] = -1
    K.next_token(cp.asarray(logits), rows, vocab, tok, pos, mailbox=box)
    cp.cuda.runtime.deviceSynchronize()
    want = np.argmax(logits[:, :vocab].astype(np.float32), axis=1).tolist()
    assert cp.asnumpy(tok).tolist() == want
    assert cp.asnumpy(pos).tolist() == (np.arange(rows) + 6).tolist()
    assert [int(box.view[(5 + b) % 3, b]) for b in range(rows)] == want
    assert int((box.view == -1).sum()) == 3 * rows - rows  # nothing else written


def test_next_token_sampling():
    import cupy as cp

    from minillm.gpu import kernels as K

    # Gumbel-max sampling follows softmax(logits / T): frequencies over many draws (a fresh
    # position each draw) against the exact probabilities of a 4-word vocabulary.
    small = np.log(np.array([[0.1, 0.2, 0.3, 0.4]], np.float32)).astype(np.float16)
    draws = 20000
    counts = np.zeros(4)
    p = cp.zeros(1, cp.int32)
    t = cp.zeros(1, cp.int32)
    sm = cp.asarray(small)
    for _ in range(draws):
        K.next_token(sm, 1, 4, t, p, temperature=1.0, seed=1234)
        counts[int(t.get()[0])] += 1
    probs = np.exp(small.astype(np.float64))[0]
    probs /= probs.sum()
    sd = np.sqrt(probs * (1 - probs) / draws)
    assert np.all(np.abs(counts / draws - probs) <= 5 * sd)


def test_e4m3_encoder_matches_reference():
    """float_to_e4m3 / e4m3_to_float (common.cuh) against quant/fp8.py on every code and on random
    values incl. ties, subnormals and saturation, through the fp8 cache append."""
    import cupy as cp

    from minillm.gpu import kernels as K
    from minillm.gpu.cache import GpuKVCache
    from minillm.quant.fp8 import decode_e4m3, encode_e4m3

    cfg = Cfg(1, 1, 128)
    cfg.num_layers = 1
    vals = decode_e4m3(np.arange(256, dtype=np.uint8))
    vals = vals[np.isfinite(vals)]
    mids = (np.sort(vals)[1:] + np.sort(vals)[:-1]) / 2  # exact ties
    rng = np.random.default_rng(0)
    pool = np.concatenate([vals, mids, rng.normal(size=2000) * 100, rng.normal(size=500) * 0.01, [448, -448]])
    pool = pool[np.abs(pool) <= 448]
    n_rows = -(-pool.size // 127)
    x = np.zeros(n_rows * 127, np.float32)
    x[: pool.size] = pool
    x = x.reshape(n_rows, 127)
    # Each head: 127 values plus one 448 that fixes the scale at exactly 1 (so codes are of x itself).
    heads = np.concatenate([x, np.full((n_rows, 1), 448.0, np.float32)], axis=1)
    cache = GpuKVCache(cfg, "fp8", 1, n_rows)
    qkv = np.zeros((n_rows, 3 * 128), np.float32)
    qkv[:, 256:] = heads  # the value head (no rotation)
    cos, sin = rope_tables(n_rows, 128)
    K.rope_append(cp.asarray(qkv.astype(np.float16)), cp.zeros((n_rows, 1, 128), cp.float16), None, None, 1e-6, cp.asarray(cos), cp.asarray(sin),
                  cp.zeros(1, cp.int32), n_rows, n_rows, cfg, cache.layer(0))

    fp16_heads = heads.astype(np.float16).astype(np.float32)
    want = encode_e4m3(fp16_heads / (np.abs(fp16_heads).max(-1, keepdims=True) / 448.0).astype(np.float32))
    got = cp.asnumpy(cache.values[0][0, 0]).reshape(n_rows, 128)
    np.testing.assert_array_equal(got, want)
    assert math.isclose(float(cache.v_scale[0][0, 0, 0]), 1.0)


@settings(max_examples=EXAMPLES or 30, deadline=None)
@given(f=st.integers(1, 200), k=st.integers(1, 300), m=st.integers(1, 20), bits=st.sampled_from([16, 8, 4]),
       act=st.sampled_from(["silu", "gelu_tanh"]), bias=st.booleans(), seed=st.integers(0, 2**31))
def test_gate_up_with_fused_activation(f, k, m, bits, act, bias, seed):
    """A gate/up pair fused into one interleaved product, with the gated activation applied in the
    GEMV's epilogue (or, with biases or > 16 rows, by gated_act): act(x Wg^T + bg) * (x Wu^T + bu)."""
    import cupy as cp

    from minillm.gpu import kernels as K
    from minillm.gpu.linear import GpuLinear
    from minillm.model import ACTIVATIONS

    rng = np.random.default_rng(seed)
    gate, up = (rng.normal(size=(f, k)).astype(np.float32) for _ in range(2))
    bg, bu = (rng.normal(size=f).astype(np.float32) if bias else None for _ in range(2))
    if bits == 16:
        parts = [gate, up]
        dense = [p.astype(np.float16).astype(np.float64) for p in parts]
    else:
        parts = [quantize_rtn(p, QuantSpec(bits, "group", 32)) for p in (gate, up)]
        dense = [p.dequantize().astype(np.float64) for p in parts]
    lin = GpuLinear.from_host(parts, [bg, bu], interleave=True)
    ld = K.round_up(k, 32)
    rp = K.padded_batch(m) if m <= 16 else m
    x = np.zeros((rp, ld), np.float16)
    x[:m, :k] = rng.normal(size=(m, k))

    scratch = LinearScratch(rp, ld)

    y = poisoned(cp, (rp, K.round_up(f, 32)), cp.float16)
    gu = poisoned(cp, (rp, 2 * f), cp.float16)
    lin(cp.asarray(x), y, m, scratch, act=act, gu=gu)
    xs = x[:m, :k].astype(np.float64)
    g = xs @ dense[0].T + (0 if bg is None else bg.astype(np.float16).astype(np.float64))
    u = xs @ dense[1].T + (0 if bu is None else bu.astype(np.float16).astype(np.float64))
    ref = ACTIVATIONS[act](np, g) * u
    got = cp.asnumpy(y[:m, :f]).astype(np.float64)
    # g and u may each be rounded to fp16 before the activation (2^-11 relative, and the weights'
    # fp16 rounding on the > 16-row path); |act'| <= 1.13 for both activations.
    sg = np.abs(xs) @ np.abs(dense[0]).T + np.abs(g)
    su = np.abs(xs) @ np.abs(dense[1]).T + np.abs(u)
    bound = 2.0**-9 * (1.13 * sg * np.abs(u) + su * np.abs(ACTIVATIONS[act](np, g))) + 2.0**-10 * np.abs(ref) + 1e-4
    assert np.all(np.abs(got - ref) <= bound)


@pytest.mark.parametrize("kind, options", [("float", None), ("int8", None), ("fp8", None), ("int4", None),
                                           ("int4", {"block": 32, "group": 32}), ("int4", {"block": 64, "group": 16})])
@pytest.mark.parametrize("max_len", [64, 70, 200])
def test_cache_bytes_are_what_is_allocated(kind, options, max_len):
    """cache.cache_bytes (what `minillm info` and the capacity check count) is what GpuKVCache allocates;
    the INT4 arrays hold whole key blocks, a max_len of 70 or 200 included."""
    from minillm.gpu.cache import GpuKVCache, cache_bytes

    cfg = Cfg(8, 2, 64)
    cfg.num_layers = 3
    layout = () if options is None else (options["block"], options["group"])
    assert GpuKVCache(cfg, kind, 2, max_len, options=options).nbytes == cache_bytes(kind, 3, 2, 2, 64, max_len, *layout)


def test_int4_layouts_the_kernels_cannot_read_are_errors():
    from minillm.gpu.cache import GpuKVCache

    cfg = Cfg(8, 2, 128)
    cfg.num_layers = 1
    for options in ({"block": 48}, {"group": 16}, {"group": 48}, {"block": 64, "group": 0}):
        with pytest.raises(MinillmError, match="key block that is a multiple of 32|positive integers"):
            GpuKVCache(cfg, "int4", 1, 64, options=options)
    with pytest.raises(MinillmError, match="has no option window"):
        GpuKVCache(cfg, "int4", 1, 64, options={"window": 8})


@settings(max_examples=EXAMPLES or 20, deadline=None)
@given(kv=st.integers(1, 3), g=st.sampled_from([1, 2, 3, 4, 8, 9]), hd=st.sampled_from([16, 32, 64, 96, 128]),
       length=st.integers(0, 300), t=st.integers(1, 8), outliers=st.booleans(), seed=st.integers(0, 2**31),
       layout=st.sampled_from([None, (32, 32), (64, 64), (128, 128), (96, 32)]))
# attention_int4.cu's two value paths, every time: one query head per kv head (MHA) and grouped
@example(kv=2, g=1, hd=128, length=140, t=3, outliers=True, seed=1, layout=None)
@example(kv=1, g=1, hd=64, length=64, t=1, outliers=False, seed=2, layout=(32, 32))
@example(kv=2, g=4, hd=128, length=100, t=2, outliers=True, seed=3, layout=(32, 32))
# a window of more than one tile of 32 positions (the default key block is 128)
@example(kv=2, g=4, hd=128, length=230, t=5, outliers=True, seed=6, layout=None)
@example(kv=1, g=1, hd=96, length=250, t=4, outliers=False, seed=7, layout=None)
# long enough that a warp takes several key blocks of its split (its two cp.async stages in turn),
# and a window that split boundaries cross
@example(kv=3, g=1, hd=128, length=5000, t=8, outliers=True, seed=4, layout=(32, 32))
@example(kv=3, g=4, hd=64, length=5000, t=8, outliers=False, seed=5, layout=None)
@example(kv=2, g=4, hd=128, length=5100, t=8, outliers=True, seed=8, layout=None)
def test_int4_cache_kernels(kv, g, hd, length, t, outliers, seed, layout):
    """The INT4 (KIVI) kernels — window append (rope_append), block flush (kivi_flush) and attention
    (attention_int4.cu) — against kvcache.Int4KVCache fed the same keys and values in the same pieces
    (ending at block boundaries, as the engine feeds a prompt): the last piece's attention output.
    layout: the caches' key block and value group (None: the default, kvcache.KIVI_BLOCK x KIVI_GROUP)."""
    import cupy as cp

    from minillm.gpu import kernels as K
    from minillm.gpu.cache import GpuKVCache
    from minillm.kvcache import Int4KVCache

    options = {} if layout is None else {"block": layout[0], "group": min(layout[1], hd)}
    if hd % options.get("group", 1) or options.get("group", hd) < hd // 4:
        options["group"] = min(32, hd)  # (a group the GPU cannot take for this head_dim)
    rng = np.random.default_rng(seed)
    h = kv * g
    cfg = Cfg(h, kv, hd)
    cfg.num_layers = 1
    ref = Int4KVCache(1, 1, kv, hd, 1, **options)
    r = ref.block
    t = min(t, r - length % r)  # the last piece stays inside one block
    total = length + t
    cache = GpuKVCache(cfg, "int4", 1, total + r, options=options)
    ref = Int4KVCache(1, 1, kv, hd, total + r, **options)
    assert (cache.block, cache.group) == (ref.block, ref.group)
    keys = rng.normal(size=(1, kv, total, hd)).astype(np.float16).astype(np.float32)
    if outliers:
        keys[..., rng.integers(0, hd, 2)] *= 20
    keys = keys.astype(np.float16).astype(np.float32)
    values = rng.normal(size=(1, kv, total, hd)).astype(np.float16).astype(np.float32)
    q = rng.normal(size=(1, h, t, hd)).astype(np.float16).astype(np.float32)
    cos, sin = cp.ones((total + r, hd // 2), cp.float32), cp.zeros((total + r, hd // 2), cp.float32)
    pieces, p = [], 0
    while p < length:
        n = min(length - p, r - p % r)
        pieces.append((p, n))
        p += n
    pieces.append((length, t))
    for p0, n in pieces:
        last = p0 == length
        qkv = np.zeros((n, (h + 2 * kv) * hd), np.float32)
        if last:
            qkv[:, : h * hd] = q[0].transpose(1, 0, 2).reshape(n, h * hd)
        qkv[:, h * hd : (h + kv) * hd] = keys[0, :, p0 : p0 + n].transpose(1, 0, 2).reshape(n, kv * hd)
        qkv[:, (h + kv) * hd :] = values[0, :, p0 : p0 + n].transpose(1, 0, 2).reshape(n, kv * hd)
        cache.pos.set(np.array([p0], np.int32))
        q_out = cp.zeros((n, h, hd), cp.float16)
        K.rope_append(cp.asarray(qkv.astype(np.float16)), q_out, None, None, 1e-6, cos, sin, cache.pos, n, n, cfg,
                      cache.layer(0))
        K.kivi_flush(cache.kivi(0), cache.pos, 1, n, cfg)
        out_ref = ref.attend(0, q if last else np.zeros((1, h, n, hd), np.float32), keys[:, :, p0 : p0 + n],
                             values[:, :, p0 : p0 + n], p0, None)
        ref.advance(n)
    plan = K.attention_plan(cfg, total + r, t)
    out = poisoned(cp, (t, K.round_up(h * hd, 32)), cp.float16)
    K.decode_attention_int4(q_out, cache.kivi(0), cache.pos, t, t, cfg, None, K.attention_parts(t, cfg, plan), out, plan)
    got = cp.asnumpy(out[:, : h * hd]).astype(np.float64).reshape(t, h, hd)
    want = out_ref[0].transpose(1, 0, 2)  # [t, h, hd]
    # Same codes on both sides (the inputs are fp16-exact). The kernel's tensor-core products round
    # three things to fp16 (2^-11 relative each): the query times a key block's scales, so a score
    # (log2 units) moves by at most delta = 2^-11 log2(e)/sqrt(hd) sum_d |q_d| max |k^_d|, which
    # moves each softmax weight by a factor within 2^(+-2 delta); a dequantized value; a softmax
    # weight; and the output is rounded once more. Dequantized values lie within a 15th of the
    # range of the float ones (|k^| <= 1.07 max |k|).
    vmax = 1.07 * np.abs(values).max()
    kmax = 1.07 * np.abs(keys).max(axis=2)  # [1, kv, hd]
    qk = np.einsum("hd,hd->h", np.abs(q[0]).max(axis=1), np.repeat(kmax[0], g, axis=0))
    delta = 2.0**-11 * np.log2(np.e) / np.sqrt(hd) * qk.max()
    bound = (2.0 ** (2 * delta) - 1 + 4 * 2.0**-11 + 1e-4) * vmax
    assert np.abs(got - want).max() <= bound, (np.abs(got - want).max(), bound)
