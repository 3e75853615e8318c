"""Checkpoint quirks, handled once at load time.

minillm's canonical tensor names are the Hugging Face Llama names:

    model.embed_tokens.weight                                   [vocab, hidden]
    model.layers.{i}.input_layernorm.weight                     [hidden]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias}     q: [heads*head_dim, hidden], ...
    model.layers.{i}.self_attn.{q,k}_norm.weight                [head_dim]      (qwen3)
    model.layers.{i}.post_attention_layernorm.weight            [hidden]
    model.layers.{i}.mlp.{gate,up,down}_proj.{weight,bias}      gate/up: [inter, hidden]
    model.norm.weight                                           [hidden]
    lm_head.weight                                              [vocab, hidden] (absent when tied)

Each architecture's `sanitize` turns its checkpoint into these names, so the forward pass never
knows where a weight came from (mlx-lm's `sanitize` does the same).
"""

from __future__ import annotations

import re

import numpy as np

from ..config import ModelConfig


def _split_phi3(weights: dict, cfg: ModelConfig) -> dict:
    """phi3 stores q,k,v as one qkv_proj (rows: q, then k, then v) and gate,up as one gate_up_proj."""
    q_rows = cfg.num_heads * cfg.head_dim
    kv_rows = cfg.num_kv_heads * cfg.head_dim
    out = {}
    for name, w in weights.items():
        if name.endswith("self_attn.qkv_proj.weight"):
            base = name[: -len("qkv_proj.weight")]
            out[base + "q_proj.weight"] = w[:q_rows]
            out[base + "k_proj.weight"] = w[q_rows : q_rows + kv_rows]
            out[base + "v_proj.weight"] = w[q_rows + kv_rows :]
        elif name.endswith("mlp.gate_up_proj.weight"):
            base = name[: -len("gate_up_proj.weight")]
            half = w.shape[0] // 2
            out[base + "gate_proj.weight"] = w[:half]
            out[base + "up_proj.weight"] = w[half:]
        else:
            out[name] = w
    return out


_SANITIZERS = {"phi3": _split_phi3}

# Tensors some checkpoints carry that the forward pass does not use.
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def sanitize(weights: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Rename/split a Hugging Face state dict into minillm's canonical names."""
    weights = {k: v for k, v in weights.items() if not _IGNORED.search(k)}
    fix = _SANITIZERS.get(cfg.architecture)
    return fix(weights, cfg) if fix else weights


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """The shape of every canonical tensor the config implies (used to reject mismatched files)."""
    h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
        if cfg.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if cfg.mlp_bias:
            shapes |= {p + "mlp.gate_proj.bias": (inter,), p + "mlp.up_proj.bias": (inter,),
                       p + "mlp.down_proj.bias": (h,)}
        if cfg.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
    return shapes
