"""Kernel launches with programmatic dependent launch (PDL, Hopper and later).

A stream, and the CUDA graph the decode step is captured into, starts kernel N + 1 only after
kernel N has completed and its writes are flushed; the GPU idles in between. A 7B decode step has
~200 such boundaries, and an empty kernel costs ~1 us inside a graph (bench/NOTES.md).

Launched with CUDA's programmatic stream-serialization attribute (cuLaunchKernelEx; CUDA
Programming Guide, "Programmatic Dependent Launch and Synchronization"), kernel N + 1 is launched
as soon as every block of kernel N has exited, and its blocks run `griddepcontrol.wait`
(cuda_kernels/common.cuh pdl_begin) before they touch memory, which returns once kernel N's writes
are visible: the launch overlaps the completion. Stream capture records the attribute as a
programmatic edge, so the replayed step keeps it; launches outside a capture go through CuPy as
before. H100, 7B decode step (alternating off/on in one process): W4 404-411 -> 417-431 tok/s on
three machines, 407-409 -> 414.5 on a fourth; fp16 176-182 -> 179-186.

Earlier launches (`griddepcontrol.launch_dependents`, common.cuh pdl_trigger): what pays is the two
together, measured in session 9 (bench/NOTES.md): the batch-1 W4 tensor-core kernel and attention
trigger after their main loop, and the tensor-core kernel loads its first weights before it waits,
so the next product's first loads overlap the previous kernel's last work (7B W4 step 2138 -> 2086
us). Each alone did not pay (session 6): a trigger at the start of every block (W4 414 -> 378
tok/s: waiting blocks hold SM slots), a trigger after the main loop with nothing to do before the
wait (+1%), first weights loaded before a wait that no trigger brings forward (no gain), L2
prefetches of the weights (`prefetch.global.L2`; 10-15% slower). The fp16 GEMV with both is slower
(session 9, 7B fp16 step 5263 -> 5436 us: its many waves of blocks trigger late and then crowd the
SMs), so it keeps the plain wait.

CuPy's RawKernel launches through cuLaunchKernel, which takes no attributes, so this module calls
the driver's cuLaunchKernelEx through ctypes with the bytes CuPy would pass. Every kernel in
cuda_kernels/ calls pdl_begin in every block before it touches what an earlier kernel writes, and
before any return (tests/test_gpu_pdl.py checks the sources);
MINILLM_PDL=0 launches plainly.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache

import numpy as np

from ..backend import get_xp

_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID, cuda.h


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_bytes", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)),
                ("num_attrs", ctypes.c_uint)]


@lru_cache(maxsize=None)
def _launch_kernel_ex():
    f = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    return f


@lru_cache(maxsize=None)
def _cupy():
    return get_xp("cuda")  # checked once: get_xp asks the driver for the device count every call


@lru_cache(maxsize=None)
def _device_has_pdl() -> bool:
    """Whether the GPU in use is a Hopper or later (minillm runs on one GPU per process)."""
    return int(_cupy().cuda.Device().compute_capability) >= 90


def enabled() -> bool:
    """PDL on: a Hopper-or-later GPU and MINILLM_PDL not "0" (read at every launch, so benchmarks can
    capture the step both ways in one process)."""
    return os.environ.get("MINILLM_PDL", "1") != "0" and _device_has_pdl()


def _arg_bytes(a) -> bytes:
    """A kernel argument as the bytes CuPy would pass: arrays as device pointers, numpy scalars and
    records as themselves, Python ints (the null pointers of optional arrays) as 64-bit integers."""
    data = getattr(a, "data", None)
    if hasattr(data, "ptr"):
        return np.uint64(data.ptr).tobytes()
    if isinstance(a, np.generic):
        return a.tobytes()
    if isinstance(a, int) and not isinstance(a, bool):
        return np.int64(a).tobytes()
    raise TypeError(f"kernel argument of type {type(a).__name__}: pass a CuPy array or a numpy scalar")


class Kernel:
    """A compiled kernel called as CuPy's are, `kernel(grid, block, args)`, on the current stream;
    with PDL when enabled() and the stream is being captured into a graph."""

    def __init__(self, function, name: str):
        self.function, self.name = function, name  # a cupy.RawKernel
        self._handle = None
        # Dynamic shared memory the function is allowed: its attribute is raised before the first launch
        # that asks for more (with static memory too, less than 48 KB of dynamic may already need it).
        self._smem_allowed = 0
        self._static_smem = None

    @property
    def handle(self) -> int:
        """The CUfunction (RawKernel.kernel is the cupy.cuda.Function under it)."""
        if self._handle is None:
            self._handle = self.function.kernel.ptr
        return self._handle

    @property
    def static_shared_bytes(self) -> int:
        """The function's statically declared shared memory."""
        if self._static_smem is None:
            self._static_smem = self.function.attributes["shared_size_bytes"]
        return self._static_smem

    def __call__(self, grid, block, args, shared_mem: int = 0):
        if shared_mem > self._smem_allowed:
            self.function.max_dynamic_shared_size_bytes = self._smem_allowed = shared_mem
        # Only into a graph being captured: launched one by one from Python, the GPU waits for the
        # host anyway, and building the arguments through ctypes costs more host time than CuPy's
        # own launch (prefill, eager decoding, MINILLM_CUDA_GRAPH=0), which must stay as cheap as it was.
        if enabled():
            stream = _cupy().cuda.get_current_stream()
            if stream.is_capturing():
                return self._launch_pdl(grid, block, args, shared_mem, stream.ptr)
        return self.function(grid, block, args, shared_mem=shared_mem)

    def _launch_pdl(self, grid, block, args, shared_mem: int, stream: int):
        bufs = [ctypes.create_string_buffer(_arg_bytes(a)) for a in args]  # alive until the call returns
        params = (ctypes.c_void_p * max(1, len(bufs)))(*[ctypes.cast(b, ctypes.c_void_p) for b in bufs])
        attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
        attr.value[0] = 1  # programmaticStreamSerializationAllowed
        dims = lambda d: (ctypes.c_uint * 3)(*(tuple(d) + (1, 1, 1))[:3])  # noqa: E731
        cfg = _LaunchConfig(dims(grid), dims(block), shared_mem, stream, ctypes.pointer(attr), 1)
        rc = _launch_kernel_ex()(ctypes.byref(cfg), self.handle, params, None)
        if rc != 0:
            raise RuntimeError(f"cuLaunchKernelEx({self.name}) failed with CUresult {rc}")
