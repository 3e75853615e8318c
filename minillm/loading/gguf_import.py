"""Importing a GGUF file (llama.cpp's format) as a Hugging Face-shaped model.

The `gguf` package parses the container (header, metadata, tensor directory); what its contents
mean is written out here: the metadata keys become a config.json dict, block-quantized tensors are
dequantized by the formulas in gguf_dequant.py, tensor names are mapped to the Hugging Face names,
and llama.cpp's Q/K row permutation is undone so the weights equal the original checkpoint's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import MinillmError
from .gguf_dequant import DEQUANTIZERS
from .safetensors_io import bf16_to_f32

# GGUF architectures minillm imports, and the model_type they become. llama.cpp stores Mistral
# models as "llama".
_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")  # blk.{i}.{kind}.{weight|bias}
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise MinillmError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart minillm knows")


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation of q_proj/k_proj rows.

    Hugging Face's rotary embedding pairs dimension i with i + head_dim/2 ("rotate_half"); llama.cpp
    rotates adjacent pairs (2i, 2i+1), so its converter reorders each head's rows from
    [x_0..x_{d/2-1}, y_0..y_{d/2-1}] to [x_0, y_0, x_1, y_1, ...]. Reverse: view the rows of each head
    as (d/2, 2), swap the two axes back.
    """
    rest = w.shape[1:]
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _config_dict(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise MinillmError(f"GGUF architecture {arch!r} is not supported: minillm imports {', '.join(_ARCHS)}")

    def get(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    cfg = {
        "model_type": _ARCHS[arch],
        "vocab_size": get("vocab_size") or len(tokens),
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length") or get("rope.dimension_count") or hidden // heads,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "max_position_embeddings": get("context_length", 2048),
        "rope_theta": get("rope.freq_base", 10000.0),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    scaling = get("rope.scaling.type")
    if scaling and scaling != "none":
        cfg["rope_scaling"] = {
            "rope_type": scaling,
            "factor": get("rope.scaling.factor", 1.0),
            "original_max_position_embeddings": get("rope.scaling.original_context_length"),
        }
    if cfg["num_hidden_layers"] is None or hidden is None:
        raise MinillmError("GGUF metadata lacks block_count/embedding_length: the file is corrupted")
    return cfg


def _tensor_f32(t) -> np.ndarray:
    kind = t.tensor_type.name
    data = np.asarray(t.data)
    if kind in ("F32", "F16"):
        return data.astype(np.float32)
    if kind == "BF16":
        return bf16_to_f32(data.view(np.uint16))
    if kind in DEQUANTIZERS:
        return DEQUANTIZERS[kind](data.reshape(data.shape[0], -1))
    raise MinillmError(f"GGUF tensor {t.name!r} has type {kind}, which minillm cannot dequantize yet")


def open_gguf(path: Path):
    from gguf import GGUFReader  # noqa: PLC0415 - parsing library, only needed for GGUF

    try:
        return GGUFReader(str(path))
    except (ValueError, IndexError, OSError, KeyError, TypeError) as exc:
        raise MinillmError(f"{path} is not a readable GGUF file (truncated or corrupted?): {exc}") from exc


def read_gguf(path: Path, progress: bool = True) -> tuple[dict, dict[str, np.ndarray], object]:
    """(config.json-style dict, float32 weights under Hugging Face names, GGUFReader) of a GGUF file."""
    reader = open_gguf(path)
    cfg = _config_dict(reader)
    weights = {}
    for t in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress, leave=False):
        name = hf_name(t.name)
        w = _tensor_f32(t)
        expect = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims innermost first
        if w.size != int(np.prod(expect)):
            raise MinillmError(f"{path}: tensor {t.name} holds {w.size} values, its shape says {expect}")
        w = w.reshape(expect) if len(expect) > 1 else w.reshape(-1)
        if cfg["model_type"] == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rows(w, cfg["num_attention_heads"])
        elif cfg["model_type"] == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rows(w, cfg["num_key_value_heads"])
        weights[name] = w
    return cfg, weights, reader
