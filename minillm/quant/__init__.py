"""Quantization as pure math over arrays: no model inside (the pipeline is minillm/quantize.py).

    spec.py         QuantSpec: bits, granularity, symmetry, scale dtype
    rtn.py          round-to-nearest with min/max, percentile or MSE clipping; QuantizedTensor
    nf4.py, fp8.py  the NF4 codebook and FP8 E4M3 casting
    activations.py  dynamic (per-token) and static INT8 activation quantization
    packing.py      b-bit codes in 32-bit words
    formats.py      minillm, GPTQ, AWQ and compressed-tensors checkpoint layouts
    gptq.py         GPTQ (Frantar et al. 2022) from a layer's Hessian
    awq.py          AWQ (Lin et al. 2023): the scale and clipping searches
    qlinear.py      QuantLinear, the layer the model calls
"""

from .fp8 import FP8Tensor, quantize_fp8
from .nf4 import NF4Tensor, quantize_nf4
from .qlinear import QuantLinear
from .rtn import QuantizedTensor, quantize_rtn
from .spec import QuantSpec

__all__ = ["QuantSpec", "QuantizedTensor", "quantize_rtn", "NF4Tensor", "quantize_nf4", "FP8Tensor",
           "quantize_fp8", "QuantLinear"]
