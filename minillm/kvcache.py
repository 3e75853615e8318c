"""KV caches: the keys and values of every past token, per layer, in float or quantized form.

Layout per layer: [batch, kv_heads, positions, head_dim]; positions 0..length-1 hold data. A forward
pass over T new tokens calls `update(layer, k, v)` once per layer, which stores the new rows at
[length, length+T) and returns K and V for [0, length+T) *as attention reads them*; after the last
layer the model calls `advance(T)`. A quantized cache therefore returns dequantized values, and
prefill quantizes K and V before attention reads them, exactly as decoding does.

    float  the compute dtype (float32 on the CPU)
    int8   symmetric, one scale per (token, head):             k = s * q,  s = max|k| / 127
    fp8    E4M3 codes, one scale per (token, head):            k = mu + s * e4m3(q), s = max|k - mu| / 448
           (mu: a fixed mean per layer, head and channel, from calibration text; see FP8KVCache)
    int4   KIVI (Liu et al. 2024, sec. 3): keys per channel over blocks of R tokens, values per token
           in groups along head_dim, both asymmetric; the newest tokens (less than a block) stay in a
           float window, quantized together when the block fills. Keys have outlier *channels*
           (fixed across tokens), so a channel's scale should not be shared with other channels;
           values have no such structure and are mixed per token by attention, so per-token groups
           keep each token's error small.

Storage is allocated for the whole context up front (`np.zeros` maps zero pages lazily on the CPU);
`nbytes` is the bytes the format needs for that context.
"""

from __future__ import annotations

import numbers

import numpy as np

from .attention import attention
from .errors import MinillmError
from .quant.fp8 import E4M3_MAX, decode_e4m3, encode_e4m3

KV_CACHE_TYPES = ("float", "int8", "int4", "fp8")


class KVCache:
    """Bookkeeping shared by every cache type; subclasses store and read one layer's rows."""

    def __init__(self, num_layers, batch, num_kv_heads, head_dim, max_len, xp=np, dtype=np.float32):
        self.xp, self.dtype, self.max_len = xp, dtype, max_len
        self.num_layers, self.batch, self.heads, self.head_dim = num_layers, batch, num_kv_heads, head_dim
        self.length = 0

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_len:
            raise MinillmError(
                f"context overflow: {self.length} cached + {new_tokens} new tokens exceed the "
                f"context of {self.max_len} tokens; start a new conversation or shorten the prompt"
            )

    def advance(self, t: int) -> None:
        self.length += t

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (a chat reuses the prefix it shares with the new
        prompt; stale rows are overwritten by the next update)."""
        self.length = max(0, min(length, self.length))

    def _zeros(self, last, dtype):
        return np.zeros((self.num_layers, self.batch, self.heads, self.max_len, last), dtype=dtype)

    def attend(self, layer: int, q, k, v, start: int, window):
        """Store the new k, v and return attention of q over everything cached.
        q: [B, H, T, hd], k, v: [B, KV, T, hd] -> [B, H, T, hd]"""
        keys, values = self.update(layer, k, v)
        return attention(self.xp, q, keys, values, start, window)


class FloatKVCache(KVCache):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        shape = (self.batch, self.heads, self.max_len, self.head_dim)
        self.keys = [self.xp.zeros(shape, dtype=self.dtype) for _ in range(self.num_layers)]
        self.values = [self.xp.zeros(shape, dtype=self.dtype) for _ in range(self.num_layers)]

    def update(self, layer: int, k, v):
        """k, v: [batch, kv_heads, T, head_dim] -> K, V: [batch, kv_heads, length+T, head_dim]."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.keys + self.values))


class _PerTokenCache(KVCache):
    """Codes with one scale per (token, head), for INT8 and FP8; optionally of x - mu, for a fixed
    offset mu per (layer, head, channel) (offsets: keys' and values' [layers, kv_heads, head_dim])."""

    code_dtype = np.int8

    def __init__(self, *args, offsets=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.codes = {kind: self._zeros(self.head_dim, self.code_dtype) for kind in "kv"}
        self.scales = {kind: self._zeros(1, np.float32) for kind in "kv"}
        self.offsets = None if offsets is None else dict(zip("kv", (np.asarray(o, np.float32) for o in offsets)))

    def _offset(self, kind: str, layer: int):
        return 0.0 if self.offsets is None else self.offsets[kind][layer][None, :, None, :]  # [1, KV, 1, hd]

    def update(self, layer: int, k, v):
        start, end = self.length, self.length + k.shape[2]
        out = []
        for kind, x in (("k", k), ("v", v)):
            mu = self._offset(kind, layer)
            codes, scale = self.encode(np.asarray(x, dtype=np.float32) - mu)
            self.codes[kind][layer, :, :, start:end] = codes
            self.scales[kind][layer, :, :, start:end] = scale
            out.append(self.decode(self.codes[kind][layer, :, :, :end], self.scales[kind][layer, :, :, :end]) + mu)
        return out[0].astype(self.dtype), out[1].astype(self.dtype)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (*self.codes.values(), *self.scales.values())))


class Int8KVCache(_PerTokenCache):
    @staticmethod
    def encode(x):
        amax = np.abs(x).max(axis=-1, keepdims=True)
        s = (np.where(amax > 0, amax, 1.0) / 127.0).astype(np.float32)
        return np.clip(np.round(x / s), -127, 127).astype(np.int8), s

    @staticmethod
    def decode(codes, scales):
        return codes.astype(np.float32) * scales


class FP8KVCache(_PerTokenCache):
    """E4M3 has 3 mantissa bits: every code is within 2^-4 of its value *relative to the value*. Keys
    have channels that are large and nearly constant across tokens (the outliers KIVI quantizes per
    channel for); coding k - mu, with mu a fixed per-channel mean, spends the bits on the deviations.
    It changes nothing for attention in exact arithmetic: q . (k - mu) shifts all scores of a query
    by the same q . mu, which softmax ignores, and sum_j p_j (v_j - mu) + mu = sum_j p_j v_j since the
    weights sum to 1. SmolLM2, five 2048-token windows: KL to the float cache 0.0083 -> 0.0072
    (docs/kv-cache.md sec. 4; bench/kv_fp8_offsets.py). The offsets come from `calibrated_offsets`."""

    code_dtype = np.uint8

    @staticmethod
    def encode(x):
        amax = np.abs(x).max(axis=-1, keepdims=True)
        s = (np.where(amax > 0, amax, 1.0) / E4M3_MAX).astype(np.float32)
        return encode_e4m3(x / s), s

    @staticmethod
    def decode(codes, scales):
        return decode_e4m3(codes) * scales


def _asym4(x, axis):
    """4-bit asymmetric quantization along `axis`: (codes uint8, scale, zero), x = scale * (q - zero).
    The scale is rounded *up* to fp16 before the codes are chosen (KIVI keeps scales and zero points
    in fp16; zero points are small integers, exact in fp16): 15 steps still span [lo, hi], so every
    element stays within half a step, and fp16 storage loses nothing further."""
    lo = np.minimum(x.min(axis=axis, keepdims=True), 0.0)
    hi = np.maximum(x.max(axis=axis, keepdims=True), 0.0)
    scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(np.float32)
    near = scale.astype(np.float16)
    up = np.where(near.astype(np.float32) < scale, np.nextafter(near, np.float16(np.inf)), near)
    scale = np.where(up > 0, up.astype(np.float32), 1.0).astype(np.float32)  # > 0: a range below fp16's step
    zero = np.clip(np.round(-lo / scale), 0, 15)
    q = np.clip(np.round(x / scale) + zero, 0, 15).astype(np.uint8)
    return q, scale, zero.astype(np.float32)


KIVI_BLOCK = 128  # INT4: tokens per key block (each channel's scale and zero), and the float window's
KIVI_GROUP = 64   # INT4: channels per value group (each token's scale and zero), where head_dim allows


def int4_group(head_dim: int, group: int | None = None) -> int:
    """The INT4 cache's value group for a head_dim: `group` (at most head_dim); by default KIVI_GROUP,
    or 32 where KIVI_GROUP does not divide head_dim (96)."""
    if group is None:
        group = KIVI_GROUP if head_dim % KIVI_GROUP == 0 else 32
    return min(group, head_dim)


class Int4KVCache(KVCache):
    """KIVI-style INT4: keys per channel over blocks of `block` tokens, values per token in groups of
    `group` along head_dim; tokens after the last full block stay in a float window."""

    def __init__(self, *args, block: int = KIVI_BLOCK, group: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.block, self.group = block, int4_group(self.head_dim, group)
        if self.head_dim % self.group:
            raise MinillmError(f"the int4 cache needs head_dim ({self.head_dim}) divisible by {self.group}")
        nblocks, ngroups = -(-self.max_len // block), self.head_dim // self.group
        L, B, H, D = self.num_layers, self.batch, self.heads, self.head_dim
        self.k_codes, self.v_codes = self._zeros(D, np.uint8), self._zeros(D, np.uint8)
        self.k_scale = np.zeros((L, B, H, nblocks, D), np.float16)  # per (block, channel)
        self.k_zero = np.zeros((L, B, H, nblocks, D), np.float16)
        self.v_scale = self._zeros(ngroups, np.float16)  # per (token, group)
        self.v_zero = self._zeros(ngroups, np.float16)
        self.window_k = np.zeros((L, B, H, block, D), np.float32)  # the newest tokens, in float
        self.window_v = np.zeros((L, B, H, block, D), np.float32)

    def quantized_length(self, length: int | None = None) -> int:
        """Positions [0, this) are quantized; the rest of the sequence is in the float window."""
        return ((self.length if length is None else length) // self.block) * self.block

    def _flush_blocks(self, layer, k, v, start):
        """Quantize whole blocks of k, v [B, H, n*block, D] that begin at position `start`."""
        for b0 in range(0, k.shape[2], self.block):
            blk = b0 // self.block + start // self.block
            pos = slice(start + b0, start + b0 + self.block)
            kq, ks, kz = _asym4(k[:, :, b0 : b0 + self.block], axis=2)  # per channel over the block
            self.k_codes[layer, :, :, pos] = kq
            self.k_scale[layer, :, :, blk], self.k_zero[layer, :, :, blk] = ks[:, :, 0], kz[:, :, 0]
            vg = v[:, :, b0 : b0 + self.block].reshape(*v.shape[:2], self.block, -1, self.group)
            vq, vs, vz = _asym4(vg, axis=-1)  # per token, per group of head_dim
            self.v_codes[layer, :, :, pos] = vq.reshape(*v.shape[:2], self.block, -1)
            self.v_scale[layer, :, :, pos], self.v_zero[layer, :, :, pos] = vs[..., 0], vz[..., 0]

    def update(self, layer: int, k, v):
        k, v = np.asarray(k, dtype=np.float32), np.asarray(v, dtype=np.float32)
        qlen = self.quantized_length()
        held = self.length - qlen  # tokens already in the float window
        k_all = np.concatenate([self.window_k[layer, :, :, :held], k], axis=2)
        v_all = np.concatenate([self.window_v[layer, :, :, :held], v], axis=2)
        full = (k_all.shape[2] // self.block) * self.block
        if full:  # the window filled: quantize whole blocks, exactly at block boundaries
            self._flush_blocks(layer, k_all[:, :, :full], v_all[:, :, :full], qlen)
        rest = k_all.shape[2] - full
        self.window_k[layer, :, :, :rest] = k_all[:, :, full:]
        self.window_v[layer, :, :, :rest] = v_all[:, :, full:]
        return self.read(layer, qlen + full, rest)

    def attend(self, layer: int, q, k, v, start: int, window):
        """As decoding sees it: query p reads the blocks completed by position p quantized and the
        rest of its own block in float. (Quantizing a whole prompt's blocks before attention would
        let a key's per-channel scale, computed over its block, carry later tokens into earlier
        positions' predictions.)"""
        q_before = self.quantized_length()
        held = self.length - q_before
        k_float = np.concatenate([self.window_k[layer, :, :, :held], np.asarray(k, np.float32)], axis=2)
        v_float = np.concatenate([self.window_v[layer, :, :, :held], np.asarray(v, np.float32)], axis=2)
        keys, values = self.update(layer, k, v)  # quantized blocks + window, after this update
        t, s = q.shape[2], keys.shape[2]
        # Quantized by the time query p is decoded: keys j < floor((p + 1) / R) * R.
        done = ((start + np.arange(t) + 1) // self.block) * self.block
        use_q = np.arange(s)[None, :] < done[:, None]
        k_mix = np.concatenate([keys[:, :, :q_before], k_float.astype(self.dtype)], axis=2)
        v_mix = np.concatenate([values[:, :, :q_before], v_float.astype(self.dtype)], axis=2)
        return attention(self.xp, q, k_mix, v_mix, start, window, quantized=(keys, values, use_q))

    def read(self, layer, qlen, rest):
        """Dequantized [0, qlen) followed by the float window's `rest` tokens."""
        nb = qlen // self.block
        b, h, d = self.batch, self.heads, self.head_dim
        kq = self.k_codes[layer, :, :, :qlen].astype(np.float32).reshape(b, h, nb, self.block, d)
        kd = (kq - self.k_zero[layer, :, :, :nb, None]) * self.k_scale[layer, :, :, :nb, None]
        vq = self.v_codes[layer, :, :, :qlen].astype(np.float32).reshape(b, h, qlen, d // self.group, self.group)
        vd = (vq - self.v_zero[layer, :, :, :qlen, :, None]) * self.v_scale[layer, :, :, :qlen, :, None]
        keys = np.concatenate([kd.reshape(b, h, qlen, d), self.window_k[layer, :, :, :rest]], axis=2)
        values = np.concatenate([vd.reshape(b, h, qlen, d), self.window_v[layer, :, :, :rest]], axis=2)
        return keys.astype(self.dtype), values.astype(self.dtype)

    def truncate(self, length: int) -> None:
        # Positions past `length` are dropped; if that cuts into a quantized block, the block's kept
        # tokens move back into the float window (as their dequantized values).
        length = max(0, min(length, self.length))
        qlen = self.quantized_length(length)
        if qlen < self.quantized_length():
            for layer in range(self.num_layers):
                keys, values = self.read(layer, self.quantized_length(), 0)
                self.window_k[layer, :, :, : length - qlen] = keys[:, :, qlen:length]
                self.window_v[layer, :, :, : length - qlen] = values[:, :, qlen:length]
        self.length = length

    @property
    def nbytes(self) -> int:
        """True bytes: 4-bit codes (two per byte), fp32 scales and zeros, the float window."""
        codes = (self.k_codes.size + self.v_codes.size) // 2
        meta = sum(a.nbytes for a in (self.k_scale, self.k_zero, self.v_scale, self.v_zero))
        return int(codes + meta + self.window_k.nbytes + self.window_v.nbytes)


KV_CACHE_OPTIONS = {"int4": ("block", "group")}  # what a kind takes beyond its shape (Int4KVCache)


def new_kv_cache(kind: str, num_layers, batch, num_kv_heads, head_dim, max_len, xp=np, dtype=np.float32,
                 offsets=None, options=None):
    """A cache of `kind`; offsets (keys', values' [layers, kv_heads, head_dim]) are used by fp8;
    options: the kind's own settings (KV_CACHE_OPTIONS: the INT4 cache's key block and value group)."""
    classes = {"float": FloatKVCache, "int8": Int8KVCache, "int4": Int4KVCache, "fp8": FP8KVCache}
    if kind not in classes:
        raise MinillmError(f"unknown KV cache type {kind!r}: choose from {', '.join(KV_CACHE_TYPES)}")
    if kind != "float" and xp is not np:
        raise MinillmError(f"the {kind} KV cache has no GPU kernels yet: use --kv-cache float with --device cuda")
    extra = {"offsets": offsets} if kind == "fp8" else {}
    options = checked_options(kind, options)
    return classes[kind](num_layers, batch, num_kv_heads, head_dim, max_len, xp=xp, dtype=dtype, **extra, **options)


def checked_options(kind: str, options) -> dict:
    """A kind's own settings (KV_CACHE_OPTIONS) as ints, or a clear error (the GPU cache takes the same)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(KV_CACHE_OPTIONS.get(kind, ())))
    if unknown:
        takes = ", ".join(KV_CACHE_OPTIONS.get(kind, ())) or "none"
        raise MinillmError(f"the {kind} KV cache has no option {', '.join(unknown)} (it takes: {takes})")
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in options.values()):
        raise MinillmError(f"KV cache options must be positive integers, not {options}")
    return {k: int(v) for k, v in options.items()}  # (numpy integers too)


CALIBRATION_TOKENS = 512  # tokens whose mean keys and values centre the FP8 cache


def mean_offsets(model, ids):
    """Per (layer, kv head, channel) means of the keys and values of `ids` as a float cache holds
    them (after rotary), over positions and batch. Works for any engine whose float cache keeps
    per-layer [batch, kv_heads, positions, head_dim] arrays.  -> (k_mu, v_mu) [layers, kv, hd] float32"""
    ids = np.asarray(ids)
    cache = model.new_cache(max_len=len(ids), kind="float")
    model(ids[None], cache)

    def mean(a):
        m = a[:, :, : len(ids)].astype(np.float32).mean(axis=(0, 2))
        return np.asarray(m.get() if hasattr(m, "get") else m, np.float32)  # cupy -> numpy

    return np.stack([mean(a) for a in cache.keys]), np.stack([mean(a) for a in cache.values])


def calibrated_offsets(model):
    """The model's FP8 offsets, computed once from its calibration tokens (`model.kv_calibration`, a
    callable the loader sets when the model has a tokenizer); None without them."""
    if getattr(model, "_fp8_offsets", None) is None and getattr(model, "kv_calibration", None) is not None:
        ids = model.kv_calibration()[: min(CALIBRATION_TOKENS, model.context_length)]
        model._fp8_offsets = mean_offsets(model, ids) if len(ids) else None
    return getattr(model, "_fp8_offsets", None)
