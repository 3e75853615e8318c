"""QuantLinear: a linear layer whose weight is stored quantized.

It is called like model.Linear (y = x W^T + b), so the model does not change when a layer is
swapped. On the CPU the forward dequantizes the weight once and keeps the float32 copy: measured
on SmolLM2-135M (2-core x86), dequantizing on every call made decode about 4x slower, while the
cached copy costs the float model's memory (the packed bytes are what a checkpoint stores and what
the GPU kernels read). `nbytes` reports the stored size, not the cache.

With `act="dynamic"` or `act="static"` the layer runs as W8A8: activations are quantized to INT8
(activations.py) and multiplied with the INT8 weight codes in integer arithmetic.
"""

from __future__ import annotations

import numpy as np

from ..errors import MinillmError
from .activations import int8_matmul, quantize_per_token, quantize_static


class QuantLinear:
    def __init__(self, qweight, bias=None, act: str | None = None, act_scale: float | None = None):
        self.qweight, self.bias = qweight, bias
        self.act = None
        self._w = None
        if act is not None:
            self.enable_act_quant(act, act_scale)

    def enable_act_quant(self, act: str, act_scale: float | None = None) -> None:
        """Run this layer as W8A8: "dynamic" (per-token scales) or "static" (a calibrated scale)."""
        spec = getattr(self.qweight, "spec", None)
        if spec is None or spec.bits != 8 or not spec.sym or spec.granularity != "channel":
            raise MinillmError("W8A8 needs an INT8 symmetric per-channel weight")
        if act not in ("dynamic", "static") or (act == "static" and act_scale is None):
            raise MinillmError("activation quantization is 'dynamic', or 'static' with a calibrated scale")
        self.act, self.act_scale = act, act_scale
        # Signed weight codes and per-row scales for the integer product.
        self._wq = (self.qweight.codes.astype(np.int16) - spec.sym_zero).astype(np.int8)
        self._ws = self.qweight.scales[:, 0].astype(np.float64)

    @property
    def shape(self):
        return self.qweight.shape

    @property
    def weight(self):
        """The dequantized weight (float32, cached): what the float path multiplies by."""
        if self._w is None:
            self._w = self.qweight.dequantize().astype(np.float32)
        return self._w

    def __call__(self, x):
        if self.act is None:
            y = x @ self.weight.T
        else:
            if self.act == "dynamic":
                xq, xs = quantize_per_token(x)
            else:
                xq, xs = quantize_static(x, self.act_scale)
            y = (int8_matmul(xq, self._wq) * (np.asarray(xs, dtype=np.float64) * self._ws)).astype(np.float32)
        if self.bias is not None:
            y += self.bias
        return y

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + (0 if self.bias is None else self.bias.nbytes)
