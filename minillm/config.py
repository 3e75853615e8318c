"""ModelConfig: every architectural switch of a Llama-family decoder, in one place.

Built from a Hugging Face config.json (or from GGUF metadata, via the same dict shape). The forward
pass in model.py only reads these fields; it never asks which architecture it is running.

Architectures and their quirks (each turned into a field here, not an if-chain in the model):
    llama    rotary scaling variants: linear, dynamic NTK, llama3
    mistral  a sliding attention window
    qwen2    biases on q/k/v, usually tied embeddings, optional sliding layers
    qwen3    RMSNorm over each head of q and k (before rotary), an explicit head_dim
    gemma    GeGLU (tanh-approximated GELU), embeddings scaled by sqrt(hidden), RMSNorm scaling by (1 + w)
    phi3     fused qkv and gate_up projections (split at load time), partial rotary factor
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MinillmError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")

# Activation names as Hugging Face spells them -> the function model.py applies.
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}

_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding (Su et al. 2021) and its context-extension variants."""

    theta: float = 10000.0
    type: str = "default"  # default | linear | dynamic | llama3
    factor: float = 1.0
    # llama3 (Meta's Llama 3.1 release): frequency-dependent interpolation between these wavelengths.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # Rotate only the first partial_rotary_factor * head_dim dimensions of each head (phi3 family).
    partial_rotary_factor: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    activation: str = "silu"  # silu (SwiGLU) | gelu_tanh (GeGLU)
    attention_bias: bool = False  # bias on q, k, v (qwen2; llama with attention_bias)
    o_bias: bool = False  # bias on o_proj too (llama with attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # qwen3: RMSNorm over head_dim of each q and k head
    norm_offset: float = 0.0  # gemma: RMSNorm multiplies by (offset + w), offset 1
    embedding_scale: float = 1.0  # gemma: sqrt(hidden_size)
    tie_word_embeddings: bool = False
    # One entry per layer: None for full causal attention, or a window W (key j is visible to
    # query i when i - W < j <= i, as transformers' sliding_window_overlay).
    sliding_windows: tuple = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    quantization_config: dict | None = None

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_rotary_factor)

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """Parse a Hugging Face config.json dict."""
        arch = cfg.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise MinillmError(
                f"unsupported model_type {arch!r}: minillm runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            return _parse(arch, cfg)
        except KeyError as exc:
            raise MinillmError(f"config.json for {arch} lacks the field {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise MinillmError(f"config.json for {arch} has a malformed field: {exc}") from exc

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise MinillmError(f"{path.parent} has no config.json: is it a Hugging Face model directory?") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MinillmError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(cfg, dict):
            raise MinillmError(f"{path} does not hold a JSON object")
        return cls.from_hf(cfg)


def _rope(cfg: dict) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files have `rope_theta` at the
    # top level and `rope_scaling` for the variants. Read both.
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise MinillmError(f"rope type {rope_type!r} is not supported: minillm knows {', '.join(_ROPE_TYPES)}")
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    return RopeConfig(
        theta=float(params.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
        partial_rotary_factor=float(partial),
    )


def _sliding_windows(arch: str, cfg: dict, num_layers: int) -> tuple:
    window = cfg.get("sliding_window")
    if arch == "mistral" or arch == "phi3":
        return (window,) * num_layers
    if arch in ("qwen2", "qwen3"):
        layer_types = cfg.get("layer_types")
        if layer_types is None:
            use = cfg.get("use_sliding_window", False)
            first = cfg.get("max_window_layers", num_layers)
            layer_types = ["sliding_attention" if use and i >= first else "full_attention" for i in range(num_layers)]
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (None,) * num_layers


def _parse(arch: str, cfg: dict) -> ModelConfig:
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    layers = int(cfg["num_hidden_layers"])
    # transformers' own defaults when config.json omits head_dim: qwen3 128, gemma 256.
    head_dim = cfg.get("head_dim") or {"qwen3": 128, "gemma": 256}.get(arch, hidden // heads)
    act_name = cfg.get("hidden_act", "silu")
    if arch == "gemma":
        # Gemma's released configs say "gelu" but mean the tanh approximation (as transformers does).
        act_name = cfg.get("hidden_activation") or act_name
        act_name = "gelu_pytorch_tanh" if act_name == "gelu" else act_name
    if act_name not in _ACTIVATIONS:
        raise MinillmError(f"activation {act_name!r} is not supported: minillm knows {', '.join(_ACTIVATIONS)}")
    # Which projections carry biases: qwen2 always has them on q/k/v (none on o); llama, qwen3 and
    # gemma put them on all four when attention_bias is set; mistral and phi3 have none.
    attention_bias = bool(cfg.get("attention_bias", False)) and arch in ("llama", "qwen3", "gemma")
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return ModelConfig(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        rope=_rope(cfg),
        activation=_ACTIVATIONS[act_name],
        attention_bias=True if arch == "qwen2" else attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)) and arch == "llama",
        qk_norm=arch == "qwen3",
        norm_offset=1.0 if arch == "gemma" else 0.0,
        embedding_scale=math.sqrt(hidden) if arch == "gemma" else 1.0,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", arch == "gemma")),
        sliding_windows=_sliding_windows(arch, cfg, layers),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        quantization_config=cfg.get("quantization_config"),
    )
