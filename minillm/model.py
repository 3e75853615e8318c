"""The transformer forward pass of a Llama-family decoder, written once over an array module `xp`.

    h_0     = E[tokens] * embedding_scale
    for each layer l:
      a     = h   + W_o  Attention(RoPE(W_q n), RoPE(W_k n), W_v n),   n = RMSNorm(h)
      h     = a   + W_down( act(W_gate m) * (W_up m) ),                m = RMSNorm(a)
    logits  = W_lm RMSNorm(h_L)

docs/architecture.md gives each equation with its source. Every architecture difference is a field
of ModelConfig read here (biases, q/k norms, norm offset, embedding scale, sliding windows, rotary
variant); the checkpoint's naming quirks were already handled by loading/names.py.

Shapes: B batch, T new tokens, S cached + new tokens, D hidden, H query heads, KV key/value heads,
G = H / KV query heads per key/value head, hd head_dim, V vocab, F intermediate (MLP) size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig, RopeConfig
from .errors import MinillmError
from .kvcache import calibrated_offsets, new_kv_cache
from .loading.names import expected_shapes
from .quant.qlinear import QuantLinear


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------

class Linear:
    """y = x W^T + b, with W stored [out, in] as Hugging Face stores it.

    Quantized layers (quant/) provide the same call, so swapping a Linear for one changes nothing
    else in the model.
    """

    def __init__(self, weight, bias=None):
        self.weight, self.bias = weight, bias

    def __call__(self, x):
        y = x @ self.weight.T  # [..., in] @ [in, out] -> [..., out]
        if self.bias is not None:
            y += self.bias
        return y

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (0 if self.bias is None else self.bias.nbytes)


def rms_norm(xp, x, weight, eps):
    """RMSNorm (Zhang & Sennrich 2019, eq. 4): x / sqrt(mean(x^2) + eps) * weight.  [..., D] -> [..., D]

    `weight` already includes gemma's +1 offset (folded in at load time by Model.__init__).
    """
    ms = (x * x).mean(axis=-1, keepdims=True)
    return x * (1.0 / xp.sqrt(ms + eps)) * weight


def silu(xp, x):
    return x / (1.0 + xp.exp(-x))


def gelu_tanh(xp, x):
    """GELU, tanh approximation (Hendrycks & Gimpel 2016, sec. 2)."""
    return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}


# ------------------------------------------------------------------------------------------------
# Rotary position embeddings (RoFormer, Su et al. 2021, sec. 3.4)
# ------------------------------------------------------------------------------------------------

def rope_inv_freq(rope: RopeConfig, dim: int, max_pos: int, seq_len: int) -> np.ndarray:
    """theta_i = base^(-2i/dim) for i < dim/2, adjusted by the scaling variant.  -> [dim/2] float64"""
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
    base = rope.theta
    if rope.type == "dynamic" and seq_len > max_pos:
        # Dynamic NTK scaling: raise the base as the sequence outgrows the trained context.
        base = base * ((rope.factor * seq_len / max_pos) - (rope.factor - 1)) ** (dim / (dim - 2))
    inv = 1.0 / base**exponents
    if rope.type == "linear":
        inv = inv / rope.factor  # position interpolation (Chen et al. 2023): positions / factor
    elif rope.type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        old = rope.original_max_position_embeddings
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, blended, scaled)
    return inv


def apply_rope(xp, x, cos, sin, rotary_dim):
    """Rotate pairs (i, i + rotary_dim/2) of each head by angle position * theta_i ("rotate_half").

    x: [B, heads, T, hd], cos/sin: [T, rotary_dim/2] -> [B, heads, T, hd]. Dimensions past
    rotary_dim (partial rotary) pass through unchanged.
    """
    half = rotary_dim // 2
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    rotated = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if rotary_dim < x.shape[-1]:
        rotated.append(x[..., rotary_dim:])
    return xp.concatenate(rotated, axis=-1)


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------

@dataclass
class Block:
    attn_norm: object
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    q_norm: object
    k_norm: object
    mlp_norm: object
    gate: Linear
    up: Linear
    down: Linear
    window: int | None


class Model:
    """A Llama-family decoder. `logits = model(tokens)`; `model(tokens, cache)` continues a sequence."""

    def __init__(self, config: ModelConfig, weights: dict, xp=np, dtype=np.float32, kv_cache: str = "float"):
        self.config, self.xp, self.dtype = config, xp, dtype
        self.kv_cache = kv_cache  # the cache type a forward without an explicit cache uses
        self.kv_cache_options = {}  # that type's own settings (kvcache.KV_CACHE_OPTIONS), e.g. INT4's block
        self.kv_calibration = None  # tokens -> FP8 cache offsets (kvcache.calibrated_offsets); set by load()
        _check_shapes(config, weights)

        def arr(name):
            w = weights[name]
            if hasattr(w, "dequantize"):  # a quantized embedding: looked up in float
                w = w.dequantize()
            return xp.asarray(np.ascontiguousarray(w, dtype=dtype))

        def opt(name):
            return arr(name) if name in weights else None

        def norm(name):  # gemma's (1 + w) folded in once here
            return arr(name) + dtype(config.norm_offset) if config.norm_offset else arr(name)

        def linear(prefix):
            w = weights[prefix + ".weight"]
            if hasattr(w, "dequantize"):  # quantized (quant/): same call, packed storage
                return QuantLinear(w, opt(prefix + ".bias"))
            return Linear(arr(prefix + ".weight"), opt(prefix + ".bias"))

        self.embed = arr("model.embed_tokens.weight")  # [V, D]
        self.blocks = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            self.blocks.append(Block(
                attn_norm=norm(p + "input_layernorm.weight"),
                q=linear(p + "self_attn.q_proj"), k=linear(p + "self_attn.k_proj"),
                v=linear(p + "self_attn.v_proj"), o=linear(p + "self_attn.o_proj"),
                q_norm=norm(p + "self_attn.q_norm.weight") if config.qk_norm else None,
                k_norm=norm(p + "self_attn.k_norm.weight") if config.qk_norm else None,
                mlp_norm=norm(p + "post_attention_layernorm.weight"),
                gate=linear(p + "mlp.gate_proj"), up=linear(p + "mlp.up_proj"), down=linear(p + "mlp.down_proj"),
                window=config.sliding_windows[i] if config.sliding_windows else None,
            ))
        self.final_norm = norm("model.norm.weight")
        self.lm_head = Linear(self.embed) if config.tie_word_embeddings else linear("lm_head")
        self.act = ACTIVATIONS[config.activation]
        self._rope_cache = {}

    # -- caches and positions -------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        c = self.config
        # Dynamic NTK exists to run past the trained context; allow `factor` times as much.
        return int(c.max_position_embeddings * (c.rope.factor if c.rope.type == "dynamic" else 1))

    def new_cache(self, batch: int = 1, max_len: int | None = None, kind: str | None = None):
        """A cache for `max_len` positions (default: the model's context), of type `kind` (default:
        the model's kv_cache: float, int8, int4 or fp8; kvcache.py), with kv_cache_options when it is
        the model's own type."""
        c = self.config
        options = self.kv_cache_options if kind in (None, self.kv_cache) else None
        kind = kind or self.kv_cache
        return new_kv_cache(kind, c.num_layers, batch, c.num_kv_heads, c.head_dim, max_len or self.context_length,
                            xp=self.xp, dtype=self.dtype, offsets=calibrated_offsets(self) if kind == "fp8" else None,
                            options=options)

    def _cos_sin(self, start: int, t: int):
        """cos, sin of position * theta_i for positions start..start+t-1.  -> [T, rotary_dim/2] each"""
        c = self.config
        seq_len = start + t
        key = seq_len if c.rope.type == "dynamic" else None
        inv = self._rope_cache.get(key)
        if inv is None:
            inv = self._rope_cache[key] = rope_inv_freq(c.rope, c.rotary_dim, c.max_position_embeddings, seq_len)
        angles = np.arange(start, seq_len, dtype=np.float64)[:, None] * inv[None, :]
        return (self.xp.asarray(np.cos(angles).astype(self.dtype)),
                self.xp.asarray(np.sin(angles).astype(self.dtype)))

    # -- forward ----------------------------------------------------------------------------------

    def __call__(self, tokens, cache=None, last_only: bool = False):
        """tokens: [T] or [B, T] ints -> logits [T, V] / [B, T, V] (or [1, V] / [B, 1, V] if last_only).

        With a cache, the tokens continue the cached sequence and the cache is extended.
        """
        xp, c = self.xp, self.config
        tok, squeeze = token_batch(tokens, c.vocab_size)
        b, t = tok.shape
        # Without a cache, one sized to this sequence: a plain forward reads K and V through the
        # model's cache type just as decoding does.
        cache = cache if cache is not None else self.new_cache(batch=b, max_len=t)
        cache.check_room(t)
        start = cache.length
        cos, sin = self._cos_sin(start, t)

        x = self.embed[xp.asarray(tok)]  # [B, T] -> [B, T, D]
        if c.embedding_scale != 1.0:
            x = x * self.dtype(c.embedding_scale)
        for i, blk in enumerate(self.blocks):
            x = x + self._attention_block(blk, i, x, cache, start, cos, sin)
            x = x + self._mlp_block(blk, x)
        cache.advance(t)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(rms_norm(xp, x, self.final_norm, c.rms_norm_eps))  # [B, T, V]
        return logits[0] if squeeze else logits

    def _attention_block(self, blk: Block, layer: int, x, cache, start, cos, sin):
        n = rms_norm(self.xp, x, blk.attn_norm, self.config.rms_norm_eps)
        return blk.o(self.attention_heads(blk, layer, n, cache, start, cos, sin))

    def attention_heads(self, blk: Block, layer: int, n, cache, start, cos, sin):
        """Attention of the normed input n, heads concatenated: the input of o_proj.
        [B, T, D] -> [B, T, H*hd]"""
        xp, c = self.xp, self.config
        b, t, _ = n.shape
        # [B, T, D] -> [B, T, heads*hd] -> [B, heads, T, hd]
        q = blk.q(n).reshape(b, t, c.num_heads, c.head_dim).transpose(0, 2, 1, 3)
        k = blk.k(n).reshape(b, t, c.num_kv_heads, c.head_dim).transpose(0, 2, 1, 3)
        v = blk.v(n).reshape(b, t, c.num_kv_heads, c.head_dim).transpose(0, 2, 1, 3)
        if c.qk_norm:  # qwen3: RMSNorm over each head's hd values, before rotary
            q = rms_norm(xp, q, blk.q_norm, c.rms_norm_eps)
            k = rms_norm(xp, k, blk.k_norm, c.rms_norm_eps)
        q = apply_rope(xp, q, cos, sin, c.rotary_dim)
        k = apply_rope(xp, k, cos, sin, c.rotary_dim)
        out = cache.attend(layer, q, k, v, start, blk.window)  # stores k, v; [B, H, T, hd]
        return out.transpose(0, 2, 1, 3).reshape(b, t, c.num_heads * c.head_dim)

    def _mlp_block(self, blk: Block, x):
        m = rms_norm(self.xp, x, blk.mlp_norm, self.config.rms_norm_eps)
        return blk.down(self.mlp_hidden(blk, m))

    def mlp_hidden(self, blk: Block, m):
        """act(W_gate m) * (W_up m): the input of down_proj.  [B, T, D] -> [B, T, F]"""
        return self.act(self.xp, blk.gate(m)) * blk.up(m)

    # -- facts for `minillm info` -----------------------------------------------------------------

    def linears(self):
        """(name, layer) for every projection, in forward order (quantization swaps these)."""
        for i, blk in enumerate(self.blocks):
            for name in ("q", "k", "v", "o", "gate", "up", "down"):
                yield f"layers.{i}.{name}", getattr(blk, name)

    @property
    def num_parameters(self) -> int:
        c = self.config
        shapes = expected_shapes(c)
        return sum(int(np.prod(s)) for s in shapes.values())


def token_batch(tokens, vocab_size: int):
    """tokens [T] or [B, T] -> ([B, T], whether a [T] was given), after checking the ids."""
    tok = np.asarray(tokens) if not hasattr(tokens, "__cuda_array_interface__") else tokens
    squeeze = tok.ndim == 1
    tok = tok[None] if squeeze else tok
    if tok.shape[1] == 0:
        raise MinillmError("the model was given an empty sequence of tokens")
    if int(tok.min()) < 0 or int(tok.max()) >= vocab_size:
        raise MinillmError(f"token ids must lie in [0, {vocab_size}); got {int(tok.min())}..{int(tok.max())}")
    return tok, squeeze


def _check_shapes(config: ModelConfig, weights: dict) -> None:
    for name, shape in expected_shapes(config).items():
        if name not in weights:
            raise MinillmError(f"the checkpoint lacks tensor {name!r}, which a {config.architecture} model needs")
        got = tuple(weights[name].shape)
        if got != shape:
            raise MinillmError(
                f"tensor {name!r} has shape {got} but config.json implies {shape}: "
                "the weights and the config do not belong together"
            )
