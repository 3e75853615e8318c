"""Acceptance (issue 7, points 1 and 5, CPU reference): quantized KV caches.

- Attention through each quantized cache stays within a bound derived from the format's scales of
  the float attention output, for random q, K, V with outlier channels in K (the case KIVI targets).
- Appending token by token stores the same contents as quantizing the whole sequence at once.
- The INT4 cache's float window is flushed exactly when a block fills.
- A plain forward with kv_cache="int8" reads K and V through the quantized cache, and incremental
  decoding agrees with the full forward (within quantization noise) for every cache type.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.config import ModelConfig
from minillm.errors import MinillmError
from minillm.kvcache import Int4KVCache, new_kv_cache
from minillm.loading.names import expected_shapes
from minillm.attention import attention
from minillm.model import Model


def element_error_bound(kind, x, cache=None):
    """Per-element |x - dequant(quant(x))| bound implied by the format's scales.  x: [B, H, S, D]"""
    if kind == "int8":
        return np.abs(x).max(axis=-1, keepdims=True) / 127 / 2 * np.ones_like(x)
    if kind == "fp8":  # 3 mantissa bits: half a step is 2^-4 relative, plus the subnormal step
        s = np.abs(x).max(axis=-1, keepdims=True) / 448
        return np.abs(x) * 2.0**-4 + s * 2.0**-10
    raise AssertionError(kind)


def int4_bounds(cache: Int4KVCache, layer, length):
    """Half a step of each quantized element (0 in the float window)."""
    b, h, d, r = cache.batch, cache.heads, cache.head_dim, cache.block
    q = cache.quantized_length(length)
    nb = q // r
    ek = np.zeros((b, h, length, d), np.float32)
    ev = np.zeros((b, h, length, d), np.float32)
    ek[:, :, :q] = np.repeat(cache.k_scale[layer, :, :, :nb], r, axis=2) / 2
    ev[:, :, :q] = np.repeat(cache.v_scale[layer, :, :, :q], cache.group, axis=-1) / 2
    return ek, ev


@st.composite
def qkv(draw):
    b, kv, g = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    s, d = draw(st.integers(1, 300)), draw(st.sampled_from([32, 64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    k = rng.normal(size=(b, kv, s, d)).astype(np.float32)
    outliers = rng.choice(d, size=draw(st.integers(0, 4)), replace=False)
    k[..., outliers] *= draw(st.floats(5, 50))  # outlier channels, fixed across tokens
    v = rng.normal(size=(b, kv, s, d)).astype(np.float32)
    q = rng.normal(size=(b, kv * g, 1, d)).astype(np.float32)
    return q, k, v


# INT4 layouts: the default (kvcache.KIVI_BLOCK x KIVI_GROUP) and smaller blocks, so that short
# sequences have quantized blocks too
INT4_LAYOUTS = st.sampled_from([{}, {"block": 32, "group": 32}, {"block": 8, "group": 16}])


@settings(max_examples=60, deadline=None)
@given(data=qkv(), kind=st.sampled_from(["int8", "fp8", "fp8-offsets", "int4"]), seed=st.integers(0, 2**31),
       layout=INT4_LAYOUTS)
def test_attention_error_within_format_bound(data, kind, seed, layout):
    q, k, v = data
    b, h, s, d = k.shape
    mu_k = mu_v = 0.0
    offsets = None
    if kind == "fp8-offsets":  # any fixed offsets: the bound is that of the centred values
        rng = np.random.default_rng(seed)
        offsets = (rng.normal(size=(1, h, d)) * np.abs(k).mean(axis=(0, 2)), rng.normal(size=(1, h, d)))
        mu_k, mu_v = (o[0][None, :, None, :].astype(np.float32) for o in offsets)
    cache = new_kv_cache(kind.split("-")[0], 1, b, h, d, max_len=s, offsets=offsets,
                         options=layout if kind == "int4" else None)
    kq, vq = cache.update(0, k, v)
    if kind == "int4":
        ek, ev = int4_bounds(cache, 0, s)
    else:
        ek, ev = element_error_bound(kind.split("-")[0], k - mu_k), element_error_bound(kind.split("-")[0], v - mu_v)
    assert np.all(np.abs(kq - k) <= ek * (1 + 1e-5) + 1e-6) and np.all(np.abs(vq - v) <= ev * (1 + 1e-5) + 1e-6)
    ref = attention(np, q, k, v, start=s - 1, window=None)
    out = attention(np, q, kq, vq, start=s - 1, window=None)
    # Scores move by at most eps_j = sum_c |q_c| ek_jc / sqrt(d), so each probability by a factor in
    # [e^-2eps, e^2eps]; hence |out - ref| <= max_j ev_j + (e^(2 eps) - 1) max_j |v_j| per channel.
    g = q.shape[1] // h
    qg = np.abs(q).reshape(b, h, g, d)
    eps = (np.einsum("bhgd,bhsd->bhgs", qg, ek) / np.sqrt(d)).max(axis=-1)  # [B, H, G]
    bound = ev.max(axis=2)[:, :, None] + (np.exp(2 * eps) - 1)[..., None] * np.abs(vq).max(axis=2)[:, :, None]
    err = np.abs(out - ref).reshape(b, h, g, d)
    assert np.all(err <= bound * (1 + 1e-4) + 1e-5)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["int8", "fp8", "fp8-offsets", "int4"]), s=st.integers(1, 300), chunk=st.integers(1, 140),
       seed=st.integers(0, 2**31), layout=INT4_LAYOUTS)
def test_appending_in_pieces_equals_quantizing_at_once(kind, s, chunk, seed, layout):
    rng = np.random.default_rng(seed)
    k, v = rng.normal(size=(2, 1, 2, s, 32)).astype(np.float32)
    offsets = tuple(rng.normal(size=(2, 1, 2, 32))) if kind == "fp8-offsets" else None
    options = layout if kind == "int4" else None
    whole = new_kv_cache(kind.split("-")[0], 1, 1, 2, 32, max_len=s, offsets=offsets, options=options)
    k_all, v_all = whole.update(0, k, v)
    pieces = new_kv_cache(kind.split("-")[0], 1, 1, 2, 32, max_len=s, offsets=offsets, options=options)
    for t0 in range(0, s, chunk):
        k_p, v_p = pieces.update(0, k[:, :, t0 : t0 + chunk], v[:, :, t0 : t0 + chunk])
        pieces.advance(k[:, :, t0 : t0 + chunk].shape[2])
    np.testing.assert_array_equal(k_p, k_all)
    np.testing.assert_array_equal(v_p, v_all)


@settings(max_examples=30, deadline=None)
@given(s=st.integers(8, 80), level=st.floats(5, 50), seed=st.integers(0, 2**31))
def test_fp8_offsets_shrink_the_error_of_constant_channels(s, level, seed):
    """Keys whose channels sit at large, nearly constant values (the outlier pattern): centred by
    their mean, FP8's relative rounding applies to the small deviations, and attention's error
    drops — though the offset is invisible to attention in exact arithmetic. The error is averaged
    over 8 queries: for one query its maximum is a noisy statistic, and hypothesis found a case
    (s=40, level 5, seed 0) where centring left it 1% higher; averaged, centring at least halves it
    over 2700 checked draws."""
    rng = np.random.default_rng(seed)
    k = (rng.normal(size=(1, 2, 1, 32)) * level + rng.normal(size=(1, 2, s, 32))).astype(np.float32)
    v = rng.normal(size=(1, 2, s, 32)).astype(np.float32)
    queries = rng.normal(size=(8, 1, 2, 1, 32)).astype(np.float32)
    refs = [attention(np, q, k, v, start=s - 1, window=None) for q in queries]
    errs = []
    for offsets in (None, (k.mean(axis=2), v.mean(axis=2))):  # [1, KV, hd]: one layer
        kq, vq = new_kv_cache("fp8", 1, 1, 2, 32, max_len=s, offsets=offsets).update(0, k, v)
        errs.append(np.mean([np.abs(attention(np, q, kq, vq, start=s - 1, window=None) - ref).mean()
                             for q, ref in zip(queries, refs)]))
        assert np.abs(kq - k).max() <= (np.abs(k - (0 if offsets is None else offsets[0][:, :, None])).max()
                                        * 2.0**-4 * (1 + 1e-5) + 1e-6)
    assert errs[1] < errs[0]


def test_fp8_cache_is_centred_on_the_calibration_tokens():
    """With calibration tokens (minillm.load sets them from the calibration text when the model has
    a tokenizer), the FP8 cache's offsets are the mean keys and values of those tokens as a float
    cache holds them; without, and for the other formats, there are none."""
    model = tiny_model("fp8")
    assert model.new_cache(max_len=8).offsets is None
    ids = np.random.default_rng(3).integers(0, 64, size=30)
    model.kv_calibration = lambda: ids
    float_cache = model.new_cache(max_len=len(ids), kind="float")
    model(ids[None], float_cache)
    cache = model.new_cache(max_len=8)
    for kind, arrays in (("k", float_cache.keys), ("v", float_cache.values)):
        want = np.stack([a[0, :, : len(ids)].mean(axis=1) for a in arrays])  # [layers, kv, hd]
        np.testing.assert_allclose(cache.offsets[kind], want, rtol=1e-5, atol=1e-6)
    assert model.new_cache(max_len=8, kind="int8").offsets is None


def test_int4_window_flushes_exactly_when_a_block_fills():
    rng = np.random.default_rng(0)
    cache = Int4KVCache(1, 1, 1, 64, max_len=100, block=32)
    k, v = rng.normal(size=(2, 1, 1, 100, 64)).astype(np.float32)
    for t in range(100):
        keys, values = cache.update(0, k[:, :, t : t + 1], v[:, :, t : t + 1])
        cache.advance(1)
        quantized = cache.quantized_length()
        assert quantized == ((t + 1) // 32) * 32
        # The window holds the newest tokens exactly (float); everything before it is quantized.
        np.testing.assert_array_equal(keys[:, :, quantized:], k[:, :, quantized : t + 1])
        if quantized:
            assert not np.array_equal(keys[:, :, :quantized], k[:, :, :quantized])


def tiny_model(kv_cache, seed=0, **cfg):
    c = ModelConfig(architecture="llama", vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5, max_position_embeddings=128, **cfg)
    rng = np.random.default_rng(seed)
    return Model(c, {n: rng.normal(0, 0.3, s).astype(np.float32) for n, s in expected_shapes(c).items()}, kv_cache=kv_cache)


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(["int8", "fp8", "int4"]), length=st.integers(2, 80), data=st.data())
def test_incremental_decoding_equals_full_forward_through_quantized_cache(kind, length, data):
    model = tiny_model(kind)
    tokens = np.random.default_rng(length).integers(0, 64, size=length)
    full = model(tokens)
    prefill = data.draw(st.integers(1, length))
    cache = model.new_cache()
    steps = [model(tokens[:prefill], cache)] + [model(tokens[t : t + 1], cache) for t in range(prefill, length)]
    # Prefill and decode compute K and V with different matmul shapes, so float32 rounding can move
    # an element across a rounding boundary: one quantization step (about 1% of its row's range
    # at 8 bits, 7% at 4) on rare elements. Exact equality for equal inputs is tested above.
    np.testing.assert_allclose(np.concatenate(steps), full, atol=0.05 * np.abs(full).max())


def test_plain_forward_reads_through_the_quantized_cache():
    tokens = np.random.default_rng(1).integers(0, 64, size=40)
    float_logits = tiny_model("float")(tokens)
    int8 = tiny_model("int8")
    int8_logits = int8(tokens)
    explicit = int8(tokens, int8.new_cache(kind="int8"))
    np.testing.assert_array_equal(int8_logits, explicit)
    assert not np.allclose(int8_logits, float_logits, atol=0, rtol=0)  # the quantization is really there
    np.testing.assert_allclose(int8_logits, float_logits, atol=0.05 * np.abs(float_logits).max())


def test_bad_cache_requests_are_clear_errors():
    with pytest.raises(MinillmError, match="unknown KV cache type"):
        new_kv_cache("int3", 1, 1, 1, 32, 16)
    model = tiny_model("int4")
    cache = model.new_cache(max_len=16)
    model(np.arange(10), cache)
    with pytest.raises(MinillmError, match="context overflow"):
        model(np.arange(10), cache)


@settings(max_examples=15, deadline=None)
@given(block=st.sampled_from([4, 8, 16, 32, 64]), group=st.sampled_from([8, 16, 32]), length=st.integers(5, 100))
def test_int4_options_reach_the_cache_a_forward_makes(block, group, length):
    """Model.kv_cache_options (the INT4 cache's key block and value group) reach the cache a plain
    forward makes for itself: its logits equal those of an explicitly built Int4KVCache of those
    sizes, and the window holds what the block size says."""
    model = tiny_model("int4")
    model.kv_cache_options = {"block": block, "group": group}
    tokens = np.random.default_rng(length).integers(0, 64, size=length)
    c = model.config
    explicit = Int4KVCache(c.num_layers, 1, c.num_kv_heads, c.head_dim, length, block=block, group=group)
    np.testing.assert_array_equal(model(tokens), model(tokens, explicit))
    made = model.new_cache(max_len=length)
    assert (made.block, made.group) == (block, group)
    model(tokens, made)
    assert made.quantized_length() == (length // block) * block


def test_kv_cache_options_a_kind_does_not_take_are_errors():
    model = tiny_model("int8")
    model.kv_cache_options = {"block": 64}
    with pytest.raises(MinillmError, match="the int8 KV cache has no option block"):
        model(np.arange(4))
    model.kv_cache_options = {}
    model(np.arange(4))  # and another type than the model's own ignores them:
    model.kv_cache, model.kv_cache_options = "int4", {"block": 8}
    assert model.new_cache(max_len=8, kind="float").length == 0
    for bad in (0, True, 8.0):
        with pytest.raises(MinillmError, match="positive integers"):
            new_kv_cache("int4", 1, 1, 1, 32, 16, options={"block": bad})
    assert new_kv_cache("int4", 1, 1, 1, 32, 16, options={"block": np.int64(8)}).block == 8  # numpy ints


def test_bench_capacity_arithmetic():
    """`minillm bench`: the W4 weight bytes equal the arrays a packed upload would hold (built here
    with pack_bits and pack_sz on a shrunken copy of the shape), each context fits the budget and
    256 more tokens would not."""
    from minillm.capacity import cache_bytes_per_token, plan, w4_weight_bytes
    from minillm.gpu.synthetic import llama_config
    from minillm.gpu.w4a16 import pack_sz
    from minillm.quant.packing import pack_bits

    small = llama_config(layers=2, hidden=96, mlp=160, heads=3, kv_heads=1, vocab=50)
    expect = 0
    for n, k in [(5 * 32, 96), (96, 96), (320, 96), (96, 160)]:  # fused qkv, o, gate_up, down
        codes = np.zeros((n, k), np.uint8)
        expect += pack_bits(np.pad(codes, ((0, 0), (0, -k % 32))), 4, axis=1).nbytes
        groups = (n, -(-k // 128))
        expect += pack_sz(np.zeros(groups, np.float16), np.zeros(groups, np.uint8)).nbytes  # scale | zero words
    expect = 2 * expect + 2 * 2 * 50 * 96 + 4 * 96 * 5
    assert w4_weight_bytes(small) == expect

    cfg = llama_config()
    assert cache_bytes_per_token(cfg, "float") == 2 * 32 * 32 * 128 * 2
    assert cache_bytes_per_token(cfg, "int8") == 2 * 32 * 32 * (128 + 4)
    # INT4 (KIVI): half a byte a value, fp16 (scale, zero) per position and 64-value group of V, and
    # per channel of K amortised over a 128-position block; plus a fixed fp16 window of 128 positions.
    per_head = 2 * 128 // 2 + 2 * 2 * (128 // 64) + 2 * 2 * 128 // 128
    assert cache_bytes_per_token(cfg, "int4") == 32 * 32 * per_head
    window = 32 * 32 * 2 * 128 * 128 * 2
    budget = 16 * 2**30
    for kind, (per_token, context) in plan(cfg, budget).items():
        room = budget - w4_weight_bytes(cfg) - (256 << 20) - (window if kind == "int4" else 0)
        assert context * per_token <= room < (context + 256) * per_token, kind
