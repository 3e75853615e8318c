"""The quantization pipeline: a checkpoint's weights in, quantized weights and a checkpoint out.

    m       = minillm.load(path)
    weights = quantize_weights(m, spec, method="rtn")          # canonical name -> array | quantized
    model   = Model(m.config, weights)                         # the quantized model, in memory
    save_quantized(out_dir, m, weights, spec, fmt="gptq")      # a checkpoint other engines read

Every projection of every block is quantized unless skipped; the embedding (and lm_head when it is
not tied) stays float unless asked for. Float tensors are rounded to float16 both in memory and in
the file, so the saved checkpoint reloads to exactly the model that was evaluated. The calibrated
methods (GPTQ, AWQ) run the model block by block and live in calibrate.py; they return the same
kind of weights dict, saved by the same save_quantized.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import MinillmError
from .loading.files import atomic_directory
from .loading.names import expected_shapes
from .quant import QuantSpec, quantize_fp8, quantize_nf4, quantize_rtn
from .quant.formats import FORMATS, quantization_config, to_tensors

METHODS = ("rtn", "nf4", "fp8", "w8a8")
_PROJ_SUFFIX = "_proj.weight"


def quantizable_names(cfg, skip=("lm_head",), quantize_embeddings: bool = False) -> list[str]:
    """Canonical names of the weights to quantize, in forward order."""
    names = [n for n in expected_shapes(cfg) if n.endswith(_PROJ_SUFFIX) and n.startswith("model.layers.")]
    if "lm_head.weight" in expected_shapes(cfg) and "lm_head" not in skip:
        names.append("lm_head.weight")
    if quantize_embeddings:
        names.append("model.embed_tokens.weight")
    return [n for n in names if not any(s and s != "lm_head" and s in n for s in skip)]


def quantize_weights(m, spec: QuantSpec | None = None, method: str = "rtn", clip: str = "minmax",
                     skip=("lm_head",), quantize_embeddings: bool = False, progress: bool = True) -> dict:
    """Canonical name -> quantized tensor (quantized layers) or float16-rounded float32 array."""
    if method not in METHODS:
        raise MinillmError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    if method == "w8a8":
        spec = QuantSpec(8, "channel", sym=True)
    targets = set(quantizable_names(m.config, skip, quantize_embeddings))
    out = {}
    names = list(m.checkpoint.weights)
    for name in tqdm(names, desc=f"quantizing ({method})", unit="tensor", disable=not progress, leave=False):
        w = np.asarray(m.checkpoint.weights[name], dtype=np.float32)
        if name not in targets:
            out[name] = w.astype(np.float16).astype(np.float32)
        elif not np.isfinite(w).all():
            raise MinillmError(f"tensor {name} holds NaN or infinite values: the checkpoint is broken")
        elif method in ("rtn", "w8a8"):
            out[name] = quantize_rtn(w, spec, clip=clip)
        elif method == "nf4":
            out[name] = quantize_nf4(w)
        else:
            out[name] = quantize_fp8(w)
    return out


def enable_activation_quant(model, mode: str = "dynamic") -> None:
    """Switch every quantized projection of `model` to W8A8 (INT8 activations)."""
    for _, layer in model.linears():
        if hasattr(layer, "enable_act_quant"):
            layer.enable_act_quant(mode)


def save_quantized(out: str | Path, m, weights: dict, spec: QuantSpec, fmt: str = "minillm",
                   skip=("lm_head",), act_order: bool = False, activations: str | None = None,
                   force: bool = False) -> Path:
    """Write a quantized checkpoint directory: config.json (with quantization_config),
    model.safetensors, and the tokenizer files. Written to a temporary directory, then renamed."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    out = Path(out)
    if fmt not in FORMATS and fmt != "gptq_v2":
        raise MinillmError(f"unknown format {fmt!r}: choose from {', '.join(FORMATS)}")
    if out.exists() and not force:
        raise MinillmError(f"{out} already exists: choose a new directory (or --force to replace it)")
    tensors = {}
    skipped = sorted({n.rsplit(".", 1)[0] for n, w in weights.items()
                      if isinstance(w, np.ndarray) and n.endswith(_PROJ_SUFFIX)} | {"lm_head"})
    for name, w in weights.items():
        if isinstance(w, np.ndarray):
            tensors[name] = w.astype(np.float16)
            continue
        if not hasattr(w, "spec"):
            raise MinillmError("NF4 and FP8 weights are evaluated in memory; save integer (rtn) weights")
        if name == "model.embed_tokens.weight" and fmt != "minillm":
            raise MinillmError(f"quantized embeddings exist only in the minillm format, not {fmt}")
        prefix = name[: -len(".weight")]
        for key, arr in to_tensors(w, fmt).items():
            # C order: safetensors writes the raw buffer, and a transposed view would land transposed.
            tensors[f"{prefix}.{key}"] = np.ascontiguousarray(arr)
    cfg = dict(m.checkpoint.raw_config)
    qcfg = quantization_config(spec, fmt, skipped, act_order)
    if activations:
        qcfg["activations"] = activations
    cfg["quantization_config"] = qcfg
    cfg["torch_dtype"] = "float16"

    with atomic_directory(out, replace=force) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "quantized_by": "minillm"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if m.tokenizer is not None:
            m.tokenizer.save_files(tmp)
    return out


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
