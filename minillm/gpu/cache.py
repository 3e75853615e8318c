"""The KV cache on the GPU: per layer [batch, kv_heads, max_len, head_dim] in fp16, or int8 / fp8 E4M3
codes with one float scale per (batch, head, position) (the layouts of minillm/kvcache.py's Int8 and
FP8 caches, which are the reference). Allocated whole for the requested context, after checking
that it fits. The length lives twice: `length` on the host for bookkeeping, `pos` in device memory
for the kernels, so a captured decode step replays with the current length.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_xp
from ..errors import MinillmError
from ..kvcache import KV_CACHE_TYPES
from .kernels import KV_FORMATS

CODE_BYTES = {"float": 2, "int8": 1, "fp8": 1}


def cache_bytes(kind: str, num_layers, batch, kv_heads, head_dim, max_len) -> int:
    """Bytes of a cache: codes, plus a float32 scale per (token, head) for the 8-bit formats."""
    per_pos = head_dim * CODE_BYTES[kind] + (4 if kind != "float" else 0)
    return 2 * num_layers * batch * kv_heads * max_len * per_pos


def check_fits(what: str, need: int) -> None:
    cp = get_xp("cuda")
    free, total = cp.cuda.runtime.memGetInfo()
    pool = cp.get_default_memory_pool()
    free += pool.free_bytes()  # held by CuPy's pool but reusable
    if need > free:
        raise MinillmError(f"{what} needs {need / 2**30:.2f} GiB of GPU memory, but only {free / 2**30:.2f} GiB "
                           f"of the {total / 2**30:.1f} GiB are free")


class GpuKVCache:
    def __init__(self, cfg, kind: str, batch: int, max_len: int):
        cp = get_xp("cuda")
        if kind not in KV_CACHE_TYPES:
            raise MinillmError(f"unknown KV cache type {kind!r}: choose from {', '.join(KV_CACHE_TYPES)}")
        if kind not in KV_FORMATS:
            raise MinillmError(f"the {kind} KV cache has no GPU kernels yet: use float, int8 or fp8 with --device cuda")
        layers, kv, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        if kind != "float" and hd % 16:
            raise MinillmError(f"the {kind} KV cache on the GPU needs a head_dim that is a multiple of 16, not {hd}")
        check_fits(f"a {kind} KV cache of {max_len} tokens x batch {batch}",
                   cache_bytes(kind, layers, batch, kv, hd, max_len))
        self.kind, self.fmt, self.batch, self.max_len = kind, KV_FORMATS[kind], batch, max_len
        self.length = 0
        dtype = {"float": cp.float16, "int8": cp.int8, "fp8": cp.uint8}[kind]
        shape = (batch, kv, max_len, hd)
        self.keys = [cp.zeros(shape, dtype) for _ in range(layers)]
        self.values = [cp.zeros(shape, dtype) for _ in range(layers)]
        if kind == "float":
            self.k_scale = self.v_scale = [None] * layers
        else:
            self.k_scale = [cp.zeros(shape[:3], cp.float32) for _ in range(layers)]
            self.v_scale = [cp.zeros(shape[:3], cp.float32) for _ in range(layers)]
        self.pos = cp.zeros(batch, cp.int32)  # device copy of `length`, one per batch row
        self.graph = None  # (sampling key, the captured decode step for this cache): engine.py
        self.warm = False  # a decode step has run eagerly (kernels compiled, scratch allocated)
        self.dev_length = None  # the length cache.pos holds

    def layer(self, i: int):
        """(keys, values, key scales, value scales, format code, max_len): what the kernels take."""
        return self.keys[i], self.values[i], self.k_scale[i], self.v_scale[i], self.fmt, self.max_len

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_len:
            raise MinillmError(
                f"context overflow: {self.length} cached + {new_tokens} new tokens exceed the "
                f"context of {self.max_len} tokens; start a new conversation or shorten the prompt")

    def sync_pos(self) -> None:
        """Write the host's length to the device (after anything but a graph step moved it)."""
        self.pos.set(np.full(self.batch, self.length, np.int32))
        self.dev_length = self.length

    def advance(self, t: int) -> None:
        self.length += t

    def truncate(self, length: int) -> None:
        # Rows past `length` are stale and overwritten by the next append; attention never reads them.
        self.length = max(0, min(length, self.length))

    def dequantized(self, layer: int, end: int):
        """K, V of positions [0, end) as float32 [B, KV, end, hd] (for tests and the prefill path)."""
        cp = get_xp("cuda")
        out = []
        for codes, scale in ((self.keys[layer], self.k_scale[layer]), (self.values[layer], self.v_scale[layer])):
            c = codes[:, :, :end]
            if self.kind == "float":
                out.append(c.astype(cp.float32))
            elif self.kind == "int8":
                out.append(c.astype(cp.float32) * scale[:, :, :end, None])
            else:
                out.append(_e4m3_table()[c] * scale[:, :, :end, None])
        return out

    @property
    def nbytes(self) -> int:
        arrays = self.keys + self.values + [a for a in self.k_scale + self.v_scale if a is not None]
        return int(sum(a.nbytes for a in arrays))


def _e4m3_table():
    from ..quant.fp8 import decode_e4m3  # noqa: PLC0415

    cp = get_xp("cuda")
    return cp.asarray(decode_e4m3(np.arange(256, dtype=np.uint8)).astype(np.float32))
