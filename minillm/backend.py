"""The array module and the dtype policy.

The forward pass is written once over an array module `xp` (NumPy on the CPU, CuPy on the GPU).
This is the only module that imports CuPy, and only when a GPU is asked for, so `import minillm`
never needs CUDA.
"""

from __future__ import annotations

import numpy as np

from .errors import MinillmError

# The CPU reference computes in float32: weights stored as bf16/f16/quantized are widened on load.
CPU_DTYPE = np.float32


def get_xp(device: str = "cpu"):
    """Return the array module for `device` ("cpu" or "cuda")."""
    if device == "cpu":
        return np
    if device == "cuda":
        try:
            import cupy  # noqa: PLC0415 - imported on demand by design
        except ImportError as exc:
            raise MinillmError(
                "device 'cuda' needs CuPy: install it with `pip install 'minillm[cuda]'`"
            ) from exc
        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                raise MinillmError("device 'cuda' was asked for, but no CUDA GPU is visible")
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise MinillmError(f"device 'cuda' was asked for, but CUDA is unusable: {exc}") from exc
        return cupy
    raise MinillmError(f"unknown device {device!r}: choose 'cpu' or 'cuda'")


def to_numpy(a) -> np.ndarray:
    """Bring an array from any backend to the host."""
    if isinstance(a, np.ndarray):
        return a
    return a.get()
