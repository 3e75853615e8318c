"""Reading a quantized checkpoint: any directory whose config.json has a quantization_config in
one of the formats of quant/formats.py (minillm, GPTQ v1/v2, AutoAWQ GEMM, compressed-tensors).

Each quantized layer's tensors (qweight/scales/... or weight_packed/weight_scale/...) become one
QuantizedTensor under the layer's `.weight` name; everything else passes through unchanged.
"""

from __future__ import annotations

from ..config import ModelConfig
from ..errors import MinillmError
from ..quant.formats import from_tensors, layer_names, spec_from_config
from .names import expected_shapes


def checkpoint_linear_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """(N, K) of every layer that may be stored quantized, by its name in the checkpoint."""
    shapes = {name[: -len(".weight")]: shape for name, shape in expected_shapes(cfg).items()
              if len(shape) == 2}
    if cfg.architecture == "phi3":  # stored fused; split after loading (names.py)
        q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            shapes[p + "self_attn.qkv_proj"] = (q + 2 * kv, cfg.hidden_size)
            shapes[p + "mlp.gate_up_proj"] = (2 * inter, cfg.hidden_size)
    return shapes


def collect_quantized(raw: dict, cfg: ModelConfig) -> dict:
    fmt, spec = spec_from_config(cfg.quantization_config)
    markers = layer_names(fmt)
    shapes = checkpoint_linear_shapes(cfg)
    prefixes = sorted({n.rsplit(".", 1)[0] for n in raw if n.rsplit(".", 1)[-1] in markers})
    if not prefixes:
        raise MinillmError(f"config.json declares {fmt} quantization but the weights hold no quantized layers")
    out, used = {}, set()
    for p in prefixes:
        if p not in shapes:
            raise MinillmError(f"quantized tensor group {p!r} matches no layer of a {cfg.architecture} model")
        sub = {name[len(p) + 1 :]: arr for name, arr in raw.items()
               if name.startswith(p + ".") and name[len(p) + 1 :] != "bias" and "." not in name[len(p) + 1 :]}
        n, k = shapes[p]
        out[p + ".weight"] = from_tensors(sub, fmt, spec, n, k, p)
        used |= {f"{p}.{key}" for key in sub}
    out.update({name: arr for name, arr in raw.items() if name not in used})
    return out
