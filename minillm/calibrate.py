"""Calibrated quantization (GPTQ, AWQ): run the model block by block on calibration text.

"True sequential" order: block l is calibrated on the outputs of blocks 0..l-1 *as quantized*, and
inside a block each projection on the inputs produced by the projections already quantized before
it (q, k, v -> o -> gate, up -> down). Only one block's activations are held at a time, and GPTQ keeps
one K x K Hessian per input, so memory stays bounded by (windows x tokens x width).

    weights, report = quantize_calibrated(m, spec, "gptq", windows)     # canonical name -> tensor
"""

from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from .errors import MinillmError
from .evaluate import calibration_text
from .model import Model, rms_norm
from .quant import QuantLinear, QuantSpec, quantize_rtn
from .quant.awq import quantize_with_range, search_clip, search_scales
from .quant.gptq import GPTQ

_CHUNK = 4  # windows per attention call (bounds the [chunk, heads, L, L] score tensor)


def calibration_windows(tokenizer, samples: int = 32, seq_len: int = 512, text: str | None = None) -> np.ndarray:
    """The first `samples` windows of `seq_len` tokens of the calibration text.  -> [samples, seq_len]"""
    ids = np.asarray(tokenizer.encode_plain(text if text is not None else calibration_text()))
    if len(ids) < samples * seq_len:
        raise MinillmError(f"the calibration text has {len(ids)} tokens; {samples} windows of {seq_len} need "
                           f"{samples * seq_len}. Give a longer text (--calib FILE) or fewer --samples")
    return ids[: samples * seq_len].reshape(samples, seq_len)


def _rel_error(x, w, wq) -> float:
    """||X W^T - X Q^T||^2 / ||X W^T||^2 on (a sample of) the calibration inputs."""
    ref = x @ w.T
    return float(((x @ wq.T - ref) ** 2).sum() / max((ref**2).sum(), 1e-30))


def quantize_calibrated(m, spec: QuantSpec, method: str, windows: np.ndarray, act_order: bool = False,
                        damp: float = 0.01, progress: bool = True, clip: str = "minmax"):
    """-> (canonical name -> QuantizedTensor | float16-rounded float32 array, per-layer report)."""
    if method not in ("gptq", "awq"):
        raise MinillmError(f"unknown calibrated method {method!r}")
    if spec.granularity == "tensor":
        raise MinillmError(f"{method} needs per-channel or grouped scales")
    if method == "gptq" and clip not in ("minmax", "mse"):
        raise MinillmError(f"GPTQ chooses group ranges by minmax or mse, not {clip!r}")
    cfg = m.config
    if method == "awq" and cfg.norm_offset:
        raise MinillmError("AWQ scale folding into gemma's (1 + w) norms is not implemented yet")
    weights = {n: np.array(w, dtype=np.float32) for n, w in m.checkpoint.weights.items()}
    for name, w in weights.items():
        if not np.isfinite(w).all():
            raise MinillmError(f"tensor {name} holds NaN or infinite values: the checkpoint is broken")
    work = Model(cfg, weights)  # a float copy whose layers are swapped for quantized ones as we go
    h = work.embed[windows] * np.float32(cfg.embedding_scale)  # [S, L, D]
    s, length = windows.shape
    cos, sin = work._cos_sin(0, length)
    rng = np.random.default_rng(0)
    sample = rng.choice(s * length, size=min(2048, s * length), replace=False)  # tokens for searches/report
    report = []
    folded = {}  # (prefix, projection, "col" | "row") -> the AWQ scale folded into it so far
    t0 = time.perf_counter()

    for i, blk in enumerate(tqdm(work.blocks, desc=f"{method} blocks", unit="block", disable=not progress, leave=False)):
        p = f"model.layers.{i}."

        def attention_in(hidden):
            return rms_norm(np, hidden, blk.attn_norm, cfg.rms_norm_eps)

        def attention_heads(n):
            out = []
            for c0 in range(0, s, _CHUNK):
                cache = work.new_cache(batch=min(_CHUNK, s - c0), max_len=length)
                out.append(work.attention_heads(blk, i, n[c0 : c0 + _CHUNK], cache, 0, cos, sin))
            return np.concatenate(out)

        def quantize(names, x, scales=None):
            """Quantize the named projections (which all read x [S, L, K]) and swap them in."""
            flat = x.reshape(-1, x.shape[-1])
            xs = flat[sample]  # tokens for the error report and the AWQ searches
            if method == "gptq":
                g = GPTQ(flat.shape[1])
                g.add_batch(flat)
            for short in names:
                full = f"{p}{short}.weight"
                lin = getattr(blk, _ATTR[short])
                w = lin.weight
                if method == "gptq":
                    qt = g.quantize(w, spec, damp=damp, act_order=act_order, clip=clip)
                else:
                    qt = quantize_with_range(w, *search_clip(xs[:512], w, spec), spec)
                dq = qt.dequantize()
                # The baseline is plain RTN of the layer as it came (AWQ's scales undone: its input
                # columns were multiplied by `col`, its output rows by `row`), on the same tokens.
                col, row = folded.pop((p, short, "col"), 1.0), folded.pop((p, short, "row"), 1.0)
                w0 = w / np.asarray(col, np.float32)[None] / np.asarray(row, np.float32).reshape(-1, 1)
                x0 = xs[:512] * np.asarray(col, np.float32)
                report.append({"layer": full, "rtn_error": _rel_error(x0, w0, quantize_rtn(w0, spec).dequantize()),
                               f"{method}_error": _rel_error(xs[:512], w, dq)})
                weights[full] = qt
                setattr(blk, _ATTR[short], QuantLinear(qt, lin.bias))

        # q, k, v read RMSNorm(h)
        n = attention_in(h)
        if method == "awq":
            sc, _, _ = search_scales(n.reshape(-1, n.shape[-1])[sample], [blk.q.weight, blk.k.weight, blk.v.weight], spec)
            _fold_norm(blk, "attn_norm", weights, p + "input_layernorm.weight", sc)
            for short in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                _scale_columns(blk, short, weights, p, sc, folded)
            n = attention_in(h)
            if cfg.num_heads == cfg.num_kv_heads:
                # v -> o: scale v's output rows down and o's input columns up. Only when each v
                # channel feeds exactly one o channel (grouped-query attention shares them).
                attn = attention_heads(n)
                sc, _, _ = search_scales(attn.reshape(-1, attn.shape[-1])[sample], [blk.o.weight], spec)
                _scale_rows(blk, "self_attn.v_proj", weights, p, 1.0 / sc, folded)
                _scale_columns(blk, "self_attn.o_proj", weights, p, sc, folded)
        quantize(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], n)

        # o reads the attention heads (computed with the quantized q, k, v)
        attn = attention_heads(n)
        quantize(["self_attn.o_proj"], attn)
        a = h + blk.o(attn)

        # gate, up read RMSNorm(a)
        mnorm = rms_norm(np, a, blk.mlp_norm, cfg.rms_norm_eps)
        if method == "awq":
            sc, _, _ = search_scales(mnorm.reshape(-1, mnorm.shape[-1])[sample], [blk.gate.weight, blk.up.weight], spec)
            _fold_norm(blk, "mlp_norm", weights, p + "post_attention_layernorm.weight", sc)
            for short in ("mlp.gate_proj", "mlp.up_proj"):
                _scale_columns(blk, short, weights, p, sc, folded)
            mnorm = rms_norm(np, a, blk.mlp_norm, cfg.rms_norm_eps)
        if method == "awq":
            # up -> down: scale up's rows down and down's columns up, before up is quantized.
            hid = work.mlp_hidden(blk, mnorm)
            sc, _, _ = search_scales(hid.reshape(-1, hid.shape[-1])[sample], [blk.down.weight], spec)
            _scale_rows(blk, "mlp.up_proj", weights, p, 1.0 / sc, folded)
            _scale_columns(blk, "mlp.down_proj", weights, p, sc, folded)
        quantize(["mlp.gate_proj", "mlp.up_proj"], mnorm)

        # down reads act(gate) * up (computed with the quantized gate and up)
        hid = work.mlp_hidden(blk, mnorm)
        quantize(["mlp.down_proj"], hid)
        h = a + blk.down(hid)

    out = {}
    for name, w in weights.items():
        out[name] = w if hasattr(w, "dequantize") else w.astype(np.float16).astype(np.float32)
    return out, {"method": method, "spec": spec.describe(), "seconds": time.perf_counter() - t0, "layers": report}


_ATTR = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
         "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}


# ------------------------------------------------------------------------------------------------
# Folding AWQ scales (exact in float: W x = (W diag(s)) (diag(s)^-1 x))
# ------------------------------------------------------------------------------------------------

def _fold_norm(blk, attr, weights, name, s):
    """RMSNorm(x) * w / s: the norm now emits diag(s)^-1 x."""
    new = getattr(blk, attr) / s
    setattr(blk, attr, new)
    weights[name] = new


def _scale_columns(blk, short, weights, p, s, folded=None):
    lin = getattr(blk, _ATTR[short])
    lin.weight = lin.weight * s[None, :]
    weights[f"{p}{short}.weight"] = lin.weight
    if folded is not None:  # remembered for the report's RTN baseline
        folded[(p, short, "col")] = folded.get((p, short, "col"), 1.0) * s


def _scale_rows(blk, short, weights, p, s, folded=None):
    lin = getattr(blk, _ATTR[short])
    lin.weight = lin.weight * s[:, None]
    weights[f"{p}{short}.weight"] = lin.weight
    if lin.bias is not None:
        lin.bias = lin.bias * s
        weights[f"{p}{short}.bias"] = lin.bias
    if folded is not None:
        folded[(p, short, "row")] = folded.get((p, short, "row"), 1.0) * s
