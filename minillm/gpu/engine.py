"""The decoder on the GPU: the forward pass of model.py with every step a CUDA kernel of our own, and the
batch-1 decode step captured once as a CUDA graph.

    h        = E[tok] * embedding_scale;  x = RMSNorm(h)                      add_rmsnorm (embed=)
    per layer:
      qkv    = x [Wq; Wk; Wv]^T                                               one fused product
      q, K, V= RoPE(q), RoPE(k) -> cache, v -> cache (quantized on append)    rope_append
      a      = Attention(q, K[:len], V[:len])                                 decode_attention (split-K)
      delta  = a Wo^T;   x = RMSNorm(h += delta)                              o, add_rmsnorm (fused residual)
      delta  = (act(x Wg^T) * x Wu^T) Wd^T;  x = RMSNorm(h += delta)          gate/up + act fused, down, add_rmsnorm
    logits   = x Wlm^T;  next token = argmax / sample                         next_token

The batch-1 decode step launches no add_rmsnorm after the first: RMSNorm multiplies a row by one
number, so o and down add their output into h and write h * w, and the next product multiplies its
sums by 1 / rms(h) (cuda_kernels/common.cuh, EpilogueIO).

It reads the same ModelConfig as the NumPy reference (model.py) and the same checkpoints; its
activations are fp16 with fp32 accumulation and an fp32 residual stream, so it matches the reference
within fp16 rounding (tests/test_gpu_engine.py).

Why a graph: one decode step launches ~10 kernels per layer; from Python each launch costs ~15 us of
CPU time (../shared/gpu.md), more than the whole step's memory traffic for a 7B model. Captured once
(`Stream.begin_capture`) and replayed, the step costs one launch; every kernel reads the cache length
from device memory (cache.pos) and the sampler advances it, so the same graph serves every position.
"""

from __future__ import annotations

import math
import os

import numpy as np

from ..backend import get_xp
from ..config import ModelConfig
from ..errors import MinillmError
from ..kvcache import calibrated_offsets
from ..model import rope_inv_freq, token_batch
from . import kernels as K
from .cache import GpuKVCache, check_fits
from .linear import GpuLinear


class Layer:
    def __init__(self, attn_norm, qkv, q_norm, k_norm, o, mlp_norm, gate_up, down, window):
        self.attn_norm, self.qkv, self.q_norm, self.k_norm, self.o = attn_norm, qkv, q_norm, k_norm, o
        self.mlp_norm, self.gate_up, self.down, self.window = mlp_norm, gate_up, down, window
        # The exponents the carried norm scales by (GpuLinear norm=; kernels.norm_exponent)
        self.attn_norm_k, self.mlp_norm_k = K.norm_exponent(attn_norm), K.norm_exponent(mlp_norm)


class Buffers:
    """The activations of one forward over `rows` rows (padded to a compiled GEMV batch size)."""

    def __init__(self, cfg: ModelConfig, rows: int, engine):
        cp = get_xp("cuda")
        self.engine = engine
        rp = K.padded_batch(rows) if rows <= 16 else rows
        d, h, kv, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        z16 = lambda *shape: cp.zeros(shape, cp.float16)  # noqa: E731 - padded columns must stay zero
        self.tok = cp.zeros(rp, cp.int32)
        self.h = cp.zeros((rp, d), cp.float32)
        self.x = z16(rp, K.round_up(d, 32))
        self.x_perm = z16(rp, K.round_up(max(d, f, h * hd), 32))
        self.qkv = z16(rp, (h + 2 * kv) * hd)
        self.q = z16(rp, h, hd)
        self.attn = z16(rp, K.round_up(h * hd, 32))
        self.delta = z16(rp, d)
        self.gu = z16(rp, 2 * f)
        self.act = z16(rp, K.round_up(f, 32))
        self.logits = z16(rp, cfg.vocab_size)
        self.norm_partials = cp.zeros(2 * d, cp.float32)  # a block's sum of h^2 each (GpuLinear norm=)
        self._parts = {}

    def parts(self, plan, rows, cfg):
        if plan not in self._parts:
            self._parts[plan] = K.attention_parts(rows, cfg, plan)
        return self._parts[plan]

    def weight(self, n, k):
        return self.engine.dense_scratch(n, k)


class GpuModel:
    """A Llama-family decoder on one NVIDIA GPU. Same call as model.Model: `logits = m(tokens, cache)`
    (logits come back to the host as float32); `decode_next` runs one step and returns token ids
    chosen on the GPU."""

    def __init__(self, config: ModelConfig, embed, layers, final_norm, lm_head, kv_cache: str = "float",
                 cuda_graph: bool | None = None):
        if kv_cache not in K.KV_FORMATS:
            raise MinillmError(f"the {kv_cache} KV cache has no GPU kernels yet: choose float, int8 or fp8 "
                               "with --device cuda")
        self.config, self.embed, self.layers = config, embed, layers
        self.final_norm, self.lm_head, self.kv_cache = final_norm, lm_head, kv_cache
        self.kv_cache_options = {}  # as Model's: that type's own settings (INT4's block and group)
        self.final_norm_k = K.norm_exponent(final_norm)
        self.kv_calibration = None  # as Model's: the FP8 cache's offsets (kvcache.calibrated_offsets)
        self.xp = get_xp("cuda")
        self.dtype = np.float16
        if cuda_graph is None:
            cuda_graph = os.environ.get("MINILLM_CUDA_GRAPH", "1") != "0"
        self.cuda_graph = cuda_graph  # False: every step launched eagerly (for debugging)
        self._buffers, self._dense, self._rope = {}, None, None
        self._stream = self.xp.cuda.Stream(non_blocking=True)

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_weights(cls, config: ModelConfig, weights: dict, kv_cache: str = "float", cuda_graph=None):
        """Upload a checkpoint's tensors (float arrays or QuantizedTensors, canonical names)."""
        cp = get_xp("cuda")
        check_fits(f"the model ({config.num_layers} layers, stored as on disk)", estimate_bytes(config, weights))
        c = config

        def host(name):
            w = weights[name]
            return np.asarray(w.dequantize() if hasattr(w, "dequantize") else w, np.float32)

        def norm(name):
            return cp.asarray(host(name) + np.float32(c.norm_offset))

        def lin(prefix, parts, interleave=False, order=None):
            ws = [weights[f"{prefix}{p}.weight"] for p in parts]
            bs = [weights.get(f"{prefix}{p}.bias") for p in parts]
            return GpuLinear.from_host(ws, bs, interleave, order)

        qkv_order = K.qkv_row_order(c)  # query and key heads' rows in rotation pairs (rope_append paired=)

        layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            layers.append(Layer(
                attn_norm=norm(p + "input_layernorm.weight"),
                qkv=lin(p + "self_attn.", ["q_proj", "k_proj", "v_proj"], order=qkv_order),
                q_norm=norm(p + "self_attn.q_norm.weight") if c.qk_norm else None,
                k_norm=norm(p + "self_attn.k_norm.weight") if c.qk_norm else None,
                o=lin(p + "self_attn.", ["o_proj"]),
                mlp_norm=norm(p + "post_attention_layernorm.weight"),
                gate_up=lin(p + "mlp.", ["gate_proj", "up_proj"], interleave=True),
                down=lin(p + "mlp.", ["down_proj"]),
                window=c.sliding_windows[i] if c.sliding_windows else None))
        embed = cp.asarray(host("model.embed_tokens.weight").astype(np.float16))
        if c.tie_word_embeddings:
            lm_head = GpuLinear.fp16(embed)
        else:
            lm_head = GpuLinear.from_host([weights["lm_head.weight"]])
        return cls(c, embed, layers, norm("model.norm.weight"), lm_head, kv_cache, cuda_graph)

    @property
    def context_length(self) -> int:
        c = self.config
        return int(c.max_position_embeddings * (c.rope.factor if c.rope.type == "dynamic" else 1))

    @property
    def num_parameters(self) -> int:
        from ..loading.names import expected_shapes  # noqa: PLC0415

        return sum(int(np.prod(shape)) for shape in expected_shapes(self.config).values())

    @property
    def nbytes(self) -> int:
        total = self.embed.nbytes + self.final_norm.nbytes
        if self.lm_head.w is not self.embed:
            total += self.lm_head.nbytes
        for layer in self.layers:
            total += sum(lin.nbytes for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))
            total += sum(a.nbytes for a in (layer.attn_norm, layer.mlp_norm, layer.q_norm, layer.k_norm) if a is not None)
        return int(total)

    def new_cache(self, batch: int = 1, max_len: int | None = None, kind: str | None = None) -> GpuKVCache:
        kind = kind or self.kv_cache
        return GpuKVCache(self.config, kind, batch, max_len or self.context_length,
                          offsets=calibrated_offsets(self) if kind == "fp8" else None,
                          options=self.kv_cache_options if kind == self.kv_cache else None)

    # -- scratch ----------------------------------------------------------------------------------

    def buffers(self, rows: int) -> Buffers:
        if rows not in self._buffers:
            if len(self._buffers) > 8:  # a long evaluation with many shapes: keep memory bounded
                self._buffers.clear()
            self._buffers[rows] = Buffers(self.config, rows, self)
        return self._buffers[rows]

    def dense_scratch(self, n, k):
        cp = self.xp
        if self._dense is None or self._dense.size < n * k:
            self._dense = cp.empty(n * k, cp.float16)
        return self._dense[: n * k].reshape(n, k)

    def rope_tables(self, length: int):
        """cos, sin [length, rotary_dim/2] float32 on the device, position p at row p. (Dynamic NTK
        rows past the trained context use the base for a sequence of p + 1 tokens, as decoding
        one token at a time does in the reference.)"""
        if self._rope is None or self._rope[0].shape[0] < length:
            c = self.config
            length = max(length, 256)
            inv = rope_inv_freq(c.rope, c.rotary_dim, c.max_position_embeddings, 1)
            angles = np.arange(length, dtype=np.float64)[:, None] * inv[None, :]
            if c.rope.type == "dynamic":
                for p in range(c.max_position_embeddings, length):
                    angles[p] = p * rope_inv_freq(c.rope, c.rotary_dim, c.max_position_embeddings, p + 1)
            self._rope = (self.xp.asarray(np.cos(angles).astype(np.float32)),
                          self.xp.asarray(np.sin(angles).astype(np.float32)))
        return self._rope

    # -- forward ----------------------------------------------------------------------------------

    def _layers(self, buf: Buffers, cache: GpuKVCache, rows: int, t: int, prefill_attention: bool,
                carry_norm: bool = False):
        """Every layer over `rows` rows (t new tokens per batch row), leaving RMSNorm(h) in buf.x.
        carry_norm (one row: the batch-1 decode step): each residual branch's product does the
        residual add and leaves h * w in buf.x, and the next product scales its sums by 1 / rms(h)
        (GpuLinear norm=, carry=); the return value is then what the LM head must be called with
        (epilogue=), else None.

        One row and one token over an fp16 cache (the batch-1 decode step): the qkv product rotates q
        and k and appends k and v itself (kernels.rope_epilogue) unless q/k norms, a partial rotation
        or a bias need rope_append's pass over whole heads."""
        c = self.config
        carry = carry_norm and rows == 1 and os.environ.get("MINILLM_CARRY_NORM", "1") != "0"
        eps = c.rms_norm_eps
        cos, sin = self.rope_tables(cache.max_len)
        plan = K.attention_plan(c, cache.max_len, rows)
        parts = buf.parts(plan, buf.q.shape[0], c)
        K.add_rmsnorm(buf.h, None, self.layers[0].attn_norm, buf.x, rows, eps,
                      embed=(buf.tok, self.embed, c.embedding_scale))
        rope_in_qkv = (rows == 1 and t == 1 and cache.kind == "float" and not c.qk_norm and c.rotary_dim == c.head_dim
                       and os.environ.get("MINILLM_ROPE_IN_QKV", "1") != "0")
        normed = None  # with carry: the scale record for the product that reads buf.x next
        for i, layer in enumerate(self.layers):
            if rope_in_qkv and layer.qkv.bias is None:
                layer.qkv(buf.x, buf.qkv, rows, buf, epilogue=K.rope_epilogue(
                    normed, cache.pos, cos, sin, buf.q, cache.keys[i], cache.values[i], c, cache.max_len))
            else:
                layer.qkv(buf.x, buf.qkv, rows, buf, epilogue=normed)
                K.rope_append(buf.qkv, buf.q, layer.q_norm, layer.k_norm, eps, cos, sin, cache.pos, rows, t, c,
                              cache.layer(i), paired=True)
            if cache.kind == "int4":
                K.kivi_flush(cache.kivi(i), cache.pos, cache.batch, t, c)
                K.decode_attention_int4(buf.q, cache.kivi(i), cache.pos, rows, t, c, layer.window, parts, buf.attn,
                                        plan)
            elif prefill_attention:
                self._prefill_attention(buf, cache, i, rows, t, layer.window)
            else:
                K.decode_attention(buf.q, cache.layer(i), cache.pos, rows, t, c, layer.window, parts, buf.attn, plan)
            # Each residual branch's product ends with h += delta and the next sublayer's norm.
            mlp_norm = (buf.h, layer.mlp_norm, buf.x, eps, layer.mlp_norm_k)
            normed = layer.o(buf.attn, buf.delta, rows, buf, norm=mlp_norm, carry=carry)
            layer.gate_up(buf.x, buf.act, rows, buf, act=c.activation, gu=buf.gu, epilogue=normed)
            nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
            w, k = (nxt.attn_norm, nxt.attn_norm_k) if nxt else (self.final_norm, self.final_norm_k)
            normed = layer.down(buf.act, buf.delta, rows, buf, norm=(buf.h, w, buf.x, eps, k), carry=carry)
        return normed

    def _prefill_attention(self, buf: Buffers, cache: GpuKVCache, layer: int, rows: int, t: int, window):
        """Causal attention of a long prompt with cuBLAS: scores for a group of heads at a time in
        float32, masked, softmaxed and applied to V (the fp16 cache is read as written)."""
        cp, c = self.xp, self.config
        h, kv, hd = c.num_heads, c.num_kv_heads, c.head_dim
        g = h // kv
        start, end = cache.length, cache.length + t
        q_pos, k_pos = cp.arange(start, end)[:, None], cp.arange(end)[None, :]
        hidden = k_pos > q_pos
        if window:
            hidden |= k_pos <= q_pos - window
        step = max(1, (256 << 20) // (4 * g * t * end))  # key/value heads per product: ~256 MB of scores
        for b in range(rows // t):
            q = buf.q[b * t : (b + 1) * t].reshape(t, kv, g, hd).transpose(1, 2, 0, 3)  # [KV, G, T, hd]
            out = buf.attn[b * t : (b + 1) * t, : h * hd].reshape(t, kv, g, hd)
            for j0 in range(0, kv, step):
                j1 = min(kv, j0 + step)
                keys = cache.keys[layer][b, j0:j1, :end].astype(cp.float32)  # [n, S, hd]
                vals = cache.values[layer][b, j0:j1, :end].astype(cp.float32)
                qs = q[j0:j1].astype(cp.float32).reshape(j1 - j0, g * t, hd)
                s = (qs @ keys.transpose(0, 2, 1)) * np.float32(1.0 / math.sqrt(hd))  # [n, G*T, S]
                s = cp.where(cp.tile(hidden, (g, 1))[None], -cp.inf, s)
                s -= s.max(axis=-1, keepdims=True)
                cp.exp(s, out=s)
                s /= s.sum(axis=-1, keepdims=True)
                o = (s @ vals).reshape(j1 - j0, g, t, hd).transpose(2, 0, 1, 3)  # [T, n, G, hd]
                out[:, j0:j1] = o.astype(cp.float16)

    def __call__(self, tokens, cache: GpuKVCache | None = None, last_only: bool = False):
        """tokens [T] or [B, T] -> logits (host float32) [T, V] / [B, T, V], or the last position's."""
        cp, c = self.xp, self.config
        tok, squeeze = token_batch(np.asarray(tokens), c.vocab_size)
        b, t = tok.shape
        cache = cache if cache is not None else self.new_cache(batch=b, max_len=t)
        if cache.batch != b:
            raise MinillmError(f"the cache holds {cache.batch} sequences but {b} were given")
        cache.check_room(t)
        if cache.kind == "int4" and t > 1 and cache.length // cache.block != (cache.length + t - 1) // cache.block:
            return self._by_blocks(tok, cache, last_only, squeeze)  # the tokens span a block boundary
        cache.sync_pos()
        rows = b * t
        buf = self.buffers(rows)
        buf.tok[:rows].set(tok.reshape(-1).astype(np.int32))
        # Long prompts over an fp16 cache: attention by cuBLAS. Short ones, and every quantized cache
        # (whose keys and values attention must read through the quantization): the split kernel.
        prefill = cache.kind == "float" and t > 16
        self._layers(buf, cache, rows, t, prefill)
        cache.advance(t)
        sel = np.arange(rows).reshape(b, t)
        if last_only:
            sel = sel[:, -1:]
        logits = self._logits(buf.x[cp.asarray(sel.reshape(-1))])
        out = cp.asnumpy(logits.astype(cp.float32)).reshape(b, sel.shape[1], -1)
        return out[0] if squeeze else out

    def _by_blocks(self, tok, cache, last_only: bool, squeeze: bool):
        """An INT4 cache takes a prompt in pieces that end at its block boundaries: at most one block
        completes per step, and the window holds the block's positions until then."""
        outs, i, t = [], 0, tok.shape[1]
        while i < t:
            n = min(t - i, cache.block - (cache.length % cache.block))
            outs.append(self(tok[:, i : i + n], cache, last_only=last_only))
            i += n
        out = outs[-1] if last_only else np.concatenate(outs, axis=1)
        return out[0] if squeeze else out

    def _logits(self, x):
        """lm_head over rows of normed hidden states x [n, ld] fp16 -> [n, V] fp16."""
        n = x.shape[0]
        buf = self.buffers(n)
        buf.x[:n] = x
        self.lm_head(buf.x, buf.logits, n, buf)
        return buf.logits[:n]

    # -- decoding on the device -------------------------------------------------------------------

    def _decode_body(self, buf: Buffers, cache: GpuKVCache, temperature: float, seed: int):
        b = cache.batch
        normed = self._layers(buf, cache, b, 1, False, carry_norm=True)
        self.lm_head(buf.x, buf.logits, b, buf, epilogue=normed)
        K.next_token(buf.logits, b, self.config.vocab_size, buf.tok, cache.pos, temperature, seed,
                     mailbox=cache.mailbox)

    def _feed(self, tokens, cache: GpuKVCache) -> Buffers:
        """The decode step's input: one token per sequence into buf.tok, and the cache's length into
        cache.pos where the device's copy is stale (on self._stream, before the step)."""
        cache.check_room(1)
        b = cache.batch
        buf = self.buffers(b)
        with self._stream:
            buf.tok[:b].set(np.asarray(tokens, np.int32).reshape(b), stream=self._stream)
            if cache.dev_length != cache.length:
                cache.pos.set(np.full(b, cache.length, np.int32), stream=self._stream)
        return buf

    def decode_next(self, tokens, cache: GpuKVCache, temperature: float = 0.0, seed: int = 0):
        """Feed one token per sequence at the cache's end and return the next token of each, chosen on
        the GPU (argmax, or a temperature sample). Only the ids cross to the host."""
        self._feed(tokens, cache)
        stream = self._stream
        with stream:
            self.replay(cache, temperature, seed)
        stream.synchronize()
        out = cache.mailbox.tokens(cache.length)  # (the step fed at this position wrote them there)
        cache.advance(1)
        cache.dev_length = cache.length
        return out

    def decode_stream(self, tokens, cache: GpuKVCache, temperature: float = 0.0, seed: int = 0):
        """Like calling decode_next over and over, each step fed the token the last one chose: yields
        the next token of each sequence, step after step, until closed. One step is always queued
        ahead: step n + 1 is launched (it reads step n's token on the device) before the host waits for
        step n's token, so the GPU does not idle while the host hands a token to its caller and comes
        back (H100, 7B W4: 30-190 us a token, bench/NOTES.md). A step launched but never consumed wrote
        one position past the cache's length; that position is stale, as after truncate(), and the
        next step overwrites it. The tokens come back through cache.mailbox (pinned host memory the
        step writes itself), so nothing but the steps is queued on the stream."""
        cp = self.xp
        self._feed(tokens, cache)
        stream = self._stream
        done = [cp.cuda.Event(disable_timing=True) for _ in range(2)]
        start, launched, consumed = cache.length, 0, 0

        def launch():
            nonlocal launched
            with stream:
                self.replay(cache, temperature, seed)
                done[launched % 2].record(stream)
            launched += 1

        try:
            launch()
            while True:
                if start + launched < cache.max_len:  # room for one more position: queue it
                    launch()
                elif launched == consumed:
                    cache.check_room(1)  # raises: the context is full
                done[consumed % 2].synchronize()
                out = cache.mailbox.tokens(start + consumed)
                consumed += 1
                cache.advance(1)
                cache.dev_length = start + launched
                yield out
        finally:
            stream.synchronize()  # the step in flight finishes before its buffers are reused
            cache.dev_length = start + launched  # != length when a step ran ahead: rewritten next time

    def replay(self, cache: GpuKVCache, temperature: float = 0.0, seed: int = 0):
        """Launch one decode step on self._stream (captured as a graph after its first, eager run).
        The step reads buf.tok and cache.pos and leaves the next token in buf.tok, pos advanced."""
        buf = self.buffers(cache.batch)
        key = (temperature, seed)
        if not self.cuda_graph:
            self._decode_body(buf, cache, temperature, seed)
        elif cache.graph is not None and cache.graph[0] == key:
            cache.graph[1].launch(self._stream)
        elif cache.warm:
            self._stream.begin_capture()
            try:
                self._decode_body(buf, cache, temperature, seed)
            finally:
                graph = self._stream.end_capture()
            cache.graph = (key, graph)
            graph.launch(self._stream)
        else:  # first step: compiles the kernels and allocates what the step needs, outside a capture
            self._decode_body(buf, cache, temperature, seed)
            cache.warm = True


def estimate_bytes(config: ModelConfig, weights: dict) -> int:
    """GPU bytes for the weights: packed 4/8-bit as stored, everything else in fp16."""
    total = 0
    for name, w in weights.items():
        size = int(np.prod(w.shape))
        bits = getattr(getattr(w, "spec", None), "bits", 16)
        total += size * (bits if bits in (4, 8) else 16) // 8
    return total  # (a tied LM head is the embedding itself)

