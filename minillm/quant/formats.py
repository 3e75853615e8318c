"""Quantized checkpoint formats: minillm's own, GPTQ, AutoAWQ (GEMM) and compressed-tensors.

All four store the same information: b-bit codes q, scales s and integer zero points z per group,
with w = s * (q - z). They differ in axes, packing and the zero-point convention. For one linear
layer "P" with W [N out, K in] and G groups:

minillm (quant_method "minillm")
    P.qweight  int32 [N, ceil(K/32)*b]   codes packed along K per output row (packing.py stream)
    P.scales   f16   [N, G]              P.qzeros uint8 [N, G] (asymmetric only)   P.g_idx int32 [K]
    Rows are contiguous in K: a GPU warp streams one output's weights with wide loads.
GPTQ (AutoGPTQ / GPTQModel, checkpoint_format "gptq" = v1 or "gptq_v2")
    P.qweight  int32 [ceil(K*b/32), N]   codes packed along K (dimension 0)
    P.qzeros   int32 [G, ceil(N*b/32)]   zero points packed along N; v1 stores z - 1, v2 stores z
    P.scales   f16   [G, N]              P.g_idx int32 [K] (the group of each input column)
AutoAWQ GEMM (quant_method "awq", version "gemm"; 4-bit, asymmetric)
    P.qweight  int32 [K, N/8]            8 codes of 8 consecutive outputs per word, nibble order
    P.qzeros   int32 [G, N/8]            [0,2,4,6,1,3,5,7] (packing.awq_pack); z stored as is
    P.scales   f16   [G, N]
compressed-tensors "pack-quantized" (llm-compressor's format)
    P.weight_packed      int32 [N, ceil(K*b/32)]   signed codes v = q - 2^(b-1), stored v + 2^(b-1)
    P.weight_scale       [N, G]                    P.weight_shape int64 [2] = (N, K)
    P.weight_zero_point  int32 [ceil(N*b/32), G]   asymmetric only: zp = z - 2^(b-1), packed along N
    P.weight_g_idx       int32 [K]                 optional (activation order)
    With the signed convention w = s * (v - zp) = s * (q - z): the same numbers.
"""

from __future__ import annotations

import numpy as np

from ..errors import MinillmError
from .packing import awq_pack, awq_unpack, pack_bits, packed_length, unpack_bits
from .rtn import QuantizedTensor
from .spec import QuantSpec

FORMATS = ("minillm", "gptq", "awq", "compressed-tensors")
_SCALE_NP = {"float16": np.float16, "float32": np.float32}


def _store_scales(s: np.ndarray, spec: QuantSpec):
    if spec.scale_dtype == "bfloat16":  # stored as raw bf16 bits, read back by safetensors_io
        return (s.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16), "BF16"
    return s.astype(_SCALE_NP[spec.scale_dtype]), None


def _i32(words):
    return np.ascontiguousarray(words, dtype=np.uint32).view(np.int32)


def _tight(n: int, bits: int) -> int:
    """Words for n codes with no padding beyond the last code (GPTQ and compressed-tensors size their
    tensors so; minillm's own layout pads rows to whole 32-code units instead)."""
    return -(-n * bits // 32)


def _trivial_gidx(qt: QuantizedTensor) -> bool:
    return qt.g_idx is None or np.array_equal(qt.g_idx, qt.spec.group_index(qt.shape[1]))


# ------------------------------------------------------------------------------------------------
# quantization_config <-> QuantSpec
# ------------------------------------------------------------------------------------------------

def quantization_config(spec: QuantSpec, fmt: str, skipped: list[str], act_order: bool = False) -> dict:
    g = spec.group_size if spec.granularity == "group" else -1
    if fmt == "minillm":
        return {"quant_method": "minillm", "layout": "minillm-v1", "bits": spec.bits,
                "granularity": spec.granularity, "group_size": g, "sym": spec.sym,
                "scale_dtype": spec.scale_dtype, "modules_not_quantized": skipped}
    if fmt in ("gptq", "gptq_v2"):
        return {"quant_method": "gptq", "bits": spec.bits, "group_size": g, "desc_act": act_order,
                "sym": spec.sym, "checkpoint_format": fmt, "true_sequential": True}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": skipped or None}
    if fmt == "compressed-tensors":
        weights = {"num_bits": spec.bits, "type": "int", "symmetric": spec.sym, "dynamic": False,
                   "strategy": spec.granularity, "group_size": spec.group_size if spec.granularity == "group" else None,
                   "actorder": "static" if act_order else None, "observer": "minmax"}
        return {"quant_method": "compressed-tensors", "format": "pack-quantized",
                "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                              "input_activations": None, "output_activations": None}},
                "ignore": skipped}
    raise MinillmError(f"unknown format {fmt!r}: choose from {', '.join(FORMATS)}")


def spec_from_config(q: dict) -> tuple[str, QuantSpec]:
    """(format name, QuantSpec) of a config.json quantization_config."""
    try:
        method = q["quant_method"]
        if method == "minillm":
            return "minillm", QuantSpec(int(q["bits"]), q["granularity"], int(q["group_size"]) if q["group_size"] > 0
                                        else 64, bool(q["sym"]), q.get("scale_dtype", "float16"))
        if method == "gptq":
            g = int(q.get("group_size", -1))
            spec = QuantSpec(int(q["bits"]), "group" if g > 0 else "channel", g if g > 0 else 64, bool(q.get("sym", True)))
            return q.get("checkpoint_format", "gptq"), spec
        if method == "awq":
            if int(q.get("bits", 4)) != 4 or str(q.get("version", "gemm")).lower() != "gemm":
                raise MinillmError("minillm reads AutoAWQ's 4-bit GEMM layout only")
            g = int(q.get("group_size", 128))
            return "awq", QuantSpec(4, "group" if g > 0 else "channel", g if g > 0 else 64, not q.get("zero_point", True))
        if method == "compressed-tensors":
            if q.get("format") != "pack-quantized":
                raise MinillmError(f"compressed-tensors format {q.get('format')!r} is not supported: minillm reads "
                                   "pack-quantized")
            groups = list(q["config_groups"].values())
            w = groups[0]["weights"]
            if len(groups) != 1 or w.get("type", "int") != "int":
                raise MinillmError("minillm reads compressed-tensors checkpoints with one integer weight scheme")
            return "compressed-tensors", QuantSpec(int(w["num_bits"]), w["strategy"], int(w.get("group_size") or 64),
                                                   bool(w["symmetric"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise MinillmError(f"config.json has a corrupted quantization_config: {exc!r}") from exc
    raise MinillmError(f"quantization_config: quant_method {q.get('quant_method')!r} is not supported: minillm reads "
                       "minillm, gptq, awq and compressed-tensors checkpoints")


# ------------------------------------------------------------------------------------------------
# One layer: QuantizedTensor <-> tensors
# ------------------------------------------------------------------------------------------------

def to_tensors(qt: QuantizedTensor, fmt: str) -> dict[str, np.ndarray]:
    """The tensors of one layer (names relative to the layer: "qweight", ...)."""
    spec, (n, k) = qt.spec, qt.shape
    if fmt == "minillm":
        out = {"qweight": _i32(pack_bits(qt.codes, spec.bits, axis=1)), "scales": _store_scales(qt.scales, spec)[0]}
        if not spec.sym:
            out["qzeros"] = qt.zeros.astype(np.uint8)
        if not _trivial_gidx(qt):
            out["g_idx"] = qt.g_idx.astype(np.int32)
        return out
    if spec.granularity == "tensor":
        raise MinillmError(f"the {fmt} format has no per-tensor scales: use per-channel or groups")
    if fmt in ("gptq", "gptq_v2"):
        stored = qt.zeros.astype(np.int64) - (1 if fmt == "gptq" else 0)
        if stored.min() < 0:
            raise MinillmError("a zero point of 0 cannot be stored in GPTQ v1 (it keeps zero - 1): "
                               "use --format gptq_v2 or compressed-tensors")
        return {"qweight": _i32(pack_bits(qt.codes.T, spec.bits, axis=0)[: _tight(k, spec.bits)]),
                "qzeros": _i32(pack_bits(stored.T.astype(np.uint8), spec.bits, axis=1)[:, : _tight(n, spec.bits)]),
                "scales": qt.scales.T.astype(np.float16), "g_idx": qt.group_index().astype(np.int32)}
    if fmt == "awq":
        if spec.bits != 4 or spec.sym:
            raise MinillmError("the AWQ format holds 4-bit asymmetric weights: use --format gptq or compressed-tensors")
        if n % 8 or (spec.granularity == "group" and k % spec.group_size) or not _trivial_gidx(qt):
            raise MinillmError(f"the AWQ format needs N % 8 == 0, K % group == 0 and no act-order (layer {n}x{k})")
        return {"qweight": _i32(awq_pack(qt.codes.T)), "qzeros": _i32(awq_pack(qt.zeros.T)),
                "scales": qt.scales.T.astype(np.float16)}
    if fmt == "compressed-tensors":
        out = {"weight_packed": _i32(pack_bits(qt.codes, spec.bits, axis=1)[:, : _tight(k, spec.bits)]),
               "weight_scale": _store_scales(qt.scales, spec)[0], "weight_shape": np.array([n, k], dtype=np.int64)}
        if not spec.sym:
            out["weight_zero_point"] = _i32(pack_bits(qt.zeros, spec.bits, axis=0)[: _tight(qt.zeros.shape[0], spec.bits)])
        if not _trivial_gidx(qt):
            out["weight_g_idx"] = qt.g_idx.astype(np.int32)
        return out
    raise MinillmError(f"unknown format {fmt!r}: choose from {', '.join(FORMATS)}")


def _need(t: dict, name: str, shape: tuple, prefix: str):
    if name not in t:
        raise MinillmError(f"the checkpoint lacks {prefix}.{name}")
    a = t[name]
    if tuple(a.shape) != tuple(shape):
        raise MinillmError(f"{prefix}.{name} has shape {tuple(a.shape)} but the quantization_config and the "
                           f"model shape imply {tuple(shape)}: the packed tensors do not match the config")
    return a


def from_tensors(t: dict, fmt: str, spec: QuantSpec, n: int, k: int, prefix: str) -> QuantizedTensor:
    """Rebuild one layer's QuantizedTensor from its tensors, checking every shape."""
    b, g = spec.bits, spec.num_groups(k)
    if fmt == "minillm":
        gs = (1, 1) if spec.granularity == "tensor" else (n, g)
        codes = unpack_bits(_need(t, "qweight", (n, packed_length(k, b)), prefix), b, k, axis=1)
        scales = np.asarray(_need(t, "scales", gs, prefix), dtype=np.float32)
        zeros = (np.asarray(_need(t, "qzeros", gs, prefix), dtype=np.uint8) if not spec.sym
                 else np.full(gs, spec.sym_zero, dtype=np.uint8))
        g_idx = np.asarray(t["g_idx"]) if "g_idx" in t else None
    elif fmt in ("gptq", "gptq_v2"):
        codes = unpack_bits(_need(t, "qweight", (_tight(k, b), n), prefix), b, k, axis=0).T
        zeros = unpack_bits(_need(t, "qzeros", (g, _tight(n, b)), prefix), b, n, axis=1).T
        if fmt == "gptq":  # v1 keeps z - 1 in b bits
            zeros = ((zeros.astype(np.int64) + 1) % (1 << b)).astype(np.uint8)
        scales = np.asarray(_need(t, "scales", (g, n), prefix), dtype=np.float32).T
        g_idx = np.asarray(t["g_idx"]).astype(np.int32) if "g_idx" in t else None
    elif fmt == "awq":
        codes = awq_unpack(_need(t, "qweight", (k, n // 8), prefix), n).T
        zeros = awq_unpack(_need(t, "qzeros", (g, n // 8), prefix), n).T
        scales = np.asarray(_need(t, "scales", (g, n), prefix), dtype=np.float32).T
        g_idx = None
    elif fmt == "compressed-tensors":
        gs = (1,) if spec.granularity == "tensor" else (n, g)
        codes = unpack_bits(_need(t, "weight_packed", (n, _tight(k, b)), prefix), b, k, axis=1)
        scales = np.asarray(_need(t, "weight_scale", gs, prefix), dtype=np.float32).reshape(-1, gs[-1])
        if spec.sym:
            zeros = np.full(scales.shape, spec.sym_zero, dtype=np.uint8)
        else:
            zp = _need(t, "weight_zero_point", (_tight(scales.shape[0], b), scales.shape[1]) if len(gs) > 1
                       else (1,), prefix)
            zeros = unpack_bits(np.asarray(zp).reshape(-1, scales.shape[1]), b, scales.shape[0], axis=0)
        g_idx = np.asarray(t["weight_g_idx"]).astype(np.int32) if "weight_g_idx" in t else None
    else:
        raise MinillmError(f"unknown format {fmt!r}")
    if g_idx is not None and (g_idx.shape != (k,) or g_idx.min() < 0 or g_idx.max() >= scales.shape[1]):
        raise MinillmError(f"{prefix}: g_idx does not fit the layer ({k} columns, {scales.shape[1]} groups)")
    if g_idx is not None and np.array_equal(g_idx, spec.group_index(k)):
        g_idx = None
    return QuantizedTensor(np.ascontiguousarray(codes), scales, np.ascontiguousarray(zeros), spec, g_idx)


def layer_names(fmt: str) -> tuple:
    """The tensor names (relative to a layer) that mark it as quantized in this format."""
    return ("weight_packed",) if fmt == "compressed-tensors" else ("qweight",)
