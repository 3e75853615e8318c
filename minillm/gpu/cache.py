"""The KV cache on the GPU: per layer [batch, kv_heads, max_len, head_dim] in fp16, or int8 / fp8 E4M3
codes with one float scale per (batch, head, position) (the layouts of minillm/kvcache.py's Int8 and
FP8 caches, which are the reference). Allocated whole for the requested context, after checking
that it fits. The length lives twice: `length` on the host for bookkeeping, `pos` in device memory
for the kernels, so a captured decode step replays with the current length. A cache also carries
the decode step's state that is tied to it: the captured graph, and the TokenMailbox the step leaves
its tokens in for the host (engine.py).
"""

from __future__ import annotations

import ctypes
import weakref
from functools import cached_property

import numpy as np

from ..backend import get_xp
from ..errors import MinillmError
from ..kvcache import KIVI_BLOCK, KV_CACHE_TYPES, checked_options, int4_group
from .kernels import KV_FORMATS

CODE_BYTES = {"float": 2, "int8": 1, "fp8": 1}
INT4_HEAD_DIMS = (16, 32, 64, 96, 128)  # cuda_kernels/attention_int4.cu's instances


def cache_bytes(kind: str, num_layers, batch, kv_heads, head_dim, max_len, block=None, group=None) -> int:
    """Bytes of a cache: codes, plus a float32 scale per (token, head) for the 8-bit formats; for INT4,
    packed codes, fp16 (scale, zero) per key channel and block and per value group and position, and
    the fp16 window (block, group: the INT4 layout, kvcache.Int4KVCache's; None: the default)."""
    heads = num_layers * batch * kv_heads
    if kind == "int4":
        block = block or KIVI_BLOCK
        blocks = -(-max_len // block)
        rows = blocks * block  # (whole blocks: see GpuKVCache._init_int4)
        per_head = (2 * rows * head_dim // 2 + blocks * head_dim * 4
                    + rows * (head_dim // int4_group(head_dim, group)) * 4 + 2 * block * head_dim * 2)
        return heads * per_head
    per_pos = head_dim * CODE_BYTES[kind] + (4 if kind != "float" else 0)
    return 2 * heads * max_len * per_pos


def check_fits(what: str, need: int) -> None:
    cp = get_xp("cuda")
    free, total = cp.cuda.runtime.memGetInfo()
    pool = cp.get_default_memory_pool()
    free += pool.free_bytes()  # held by CuPy's pool but reusable
    if need > free:
        raise MinillmError(f"{what} needs {need / 2**30:.2f} GiB of GPU memory, but only {free / 2**30:.2f} GiB "
                           f"of the {total / 2**30:.1f} GiB are free")


class TokenMailbox:
    """Where the decode step leaves its chosen tokens for the host: pinned host memory [slots, batch]
    int32, allocated mapped (cudaHostAllocMapped), so that under unified addressing the device writes
    it at the host pointer itself. next_token stores each token there at slot position % slots (the
    position the step was fed at) as well as in device memory, and the host reads a step's tokens once
    the step's event has completed: no device-to-host copy is queued between two steps (H100, the 7B
    W4 decode: it cost ~10-16 us a token, bench/NOTES.md session 11). slots must exceed the steps in
    flight (decode_stream keeps two)."""

    def __init__(self, batch: int, slots: int = 4):
        cp = get_xp("cuda")
        self.slots, self.batch = slots, batch
        self.ptr = cp.cuda.runtime.hostAlloc(4 * slots * batch, cp.cuda.runtime.hostAllocMapped)
        # Freed with the mailbox; not at interpreter exit, where the process's end returns it anyway and
        # CUDA may already be shutting down.
        weakref.finalize(self, cp.cuda.runtime.freeHost, self.ptr).atexit = False
        words = (ctypes.c_int32 * (slots * batch)).from_address(self.ptr)
        self.view = np.frombuffer(words, np.int32).reshape(slots, batch)

    def tokens(self, position: int) -> list[int]:
        """The tokens of the step fed at `position`, once that step has completed."""
        return [int(x) for x in self.view[position % self.slots]]


class GpuKVCache:
    def __init__(self, cfg, kind: str, batch: int, max_len: int, offsets=None, options=None):
        """offsets (fp8 only): keys' and values' [layers, kv_heads, head_dim] means, subtracted before
        coding and added back on reading, as kvcache.FP8KVCache (None: plain codes). options: the
        kind's own settings, as the reference cache's (kvcache.KV_CACHE_OPTIONS: INT4's block, group)."""
        cp = get_xp("cuda")
        if kind not in KV_CACHE_TYPES:
            raise MinillmError(f"unknown KV cache type {kind!r}: choose from {', '.join(KV_CACHE_TYPES)}")
        if kind not in KV_FORMATS:
            raise MinillmError(f"the {kind} KV cache has no GPU kernels: use float, int8, fp8 or int4 with --device cuda")
        layers, kv, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        if kind in ("int8", "fp8") and hd % 16:
            raise MinillmError(f"the {kind} KV cache on the GPU needs a head_dim that is a multiple of 16, not {hd}")
        options = checked_options(kind, options)
        # INT4's layout (kvcache.Int4KVCache's block and group; None for the other kinds)
        self.block = self.group = None
        if kind == "int4":
            if hd not in INT4_HEAD_DIMS:
                raise MinillmError(f"the int4 KV cache on the GPU needs a head_dim that is a multiple of 16 and of "
                                   f"its value group, at most 128 (16, 32, 64, 96 or 128), not {hd}")
            self.block, self.group = options.get("block", KIVI_BLOCK), int4_group(hd, options.get("group"))
            if self.block % 32 or hd % self.group or self.group < hd // 4:
                # attention_int4.cu: a warp takes 32 positions at a time; a head's groups fill at most
                # half of an MMA's eight columns
                raise MinillmError(f"the int4 KV cache on the GPU needs a key block that is a multiple of 32 and a "
                                   f"value group that divides head_dim {hd} into at most 4 groups, not block "
                                   f"{self.block}, group {self.group}")
        check_fits(f"a {kind} KV cache of {max_len} tokens x batch {batch}",
                   cache_bytes(kind, layers, batch, kv, hd, max_len, self.block, self.group))
        self.kind, self.fmt, self.batch, self.max_len = kind, KV_FORMATS[kind], batch, max_len
        self.length = 0
        if kind == "int4":
            self._init_int4(layers, batch, kv, hd, max_len)
        else:
            dtype = {"float": cp.float16, "int8": cp.int8, "fp8": cp.uint8}[kind]
            shape = (batch, kv, max_len, hd)
            self.keys = [cp.zeros(shape, dtype) for _ in range(layers)]
            self.values = [cp.zeros(shape, dtype) for _ in range(layers)]
            if kind == "float":
                self.k_scale = self.v_scale = [None] * layers
            else:
                self.k_scale = [cp.zeros(shape[:3], cp.float32) for _ in range(layers)]
                self.v_scale = [cp.zeros(shape[:3], cp.float32) for _ in range(layers)]
        self.k_off = self.v_off = [None] * layers
        if offsets is not None and kind == "fp8":
            self.k_off, self.v_off = ([cp.asarray(np.ascontiguousarray(o[i], np.float32)) for i in range(layers)]
                                      for o in offsets)
        self.pos = cp.zeros(batch, cp.int32)  # device copy of `length`, one per batch row
        self.graph = None  # (sampling key, the captured decode step for this cache): engine.py
        self.warm = False  # a decode step has run eagerly (kernels compiled, scratch allocated)
        self.dev_length = None  # the length cache.pos holds

    @cached_property
    def mailbox(self) -> TokenMailbox:
        """The decode step's tokens for the host, allocated when the first decode step asks for it (a
        cache that only ever sees prefill, as in evaluation, never does); the graph captured then keeps
        its address."""
        return TokenMailbox(self.batch)

    def _init_int4(self, layers, batch, kv, hd, max_len):
        """KIVI: packed codes for every position, (scale, zero) per key channel and block and per value
        group and position, and the fp16 window where new positions wait for their block to fill."""
        cp = get_xp("cuda")
        r = self.block
        blocks, groups = -(-max_len // r), hd // self.group
        # Rows for whole blocks, so that every block's codes and value scales start 16-byte aligned
        # (attention_int4.cu copies them in 16-byte pieces with cp.async).
        self.int4_rows = rows = blocks * r

        def z(*shape, dtype=cp.float32):
            return [cp.zeros(shape, dtype) for _ in range(layers)]

        self.kq, self.vq = z(batch, kv, rows, hd // 2, dtype=cp.uint8), z(batch, kv, rows, hd // 2, dtype=cp.uint8)
        half = cp.float16  # scales and zero points in fp16, as kvcache.Int4KVCache
        self.ks, self.kz = z(batch, kv, blocks, hd, dtype=half), z(batch, kv, blocks, hd, dtype=half)
        self.vs, self.vz = z(batch, kv, rows, groups, dtype=half), z(batch, kv, rows, groups, dtype=half)
        self.wk, self.wv = z(batch, kv, r, hd, dtype=cp.float16), z(batch, kv, r, hd, dtype=cp.float16)

    def layer(self, i: int):
        """(keys, values, key scales, value scales, format code, rows, key offsets, value offsets): what
        the append and attention kernels take. For INT4 the append writes the fp16 window (rows = its
        slots)."""
        if self.kind == "int4":
            return self.wk[i], self.wv[i], None, None, self.fmt, self.block, None, None
        return (self.keys[i], self.values[i], self.k_scale[i], self.v_scale[i], self.fmt, self.max_len,
                self.k_off[i], self.v_off[i])

    def kivi(self, i: int):
        """INT4 layer i: (kq, vq, ks, kz, vs, vz, wk, wv, rows, block, group); rows: max_len rounded up
        to whole blocks, the arrays' stride."""
        return (self.kq[i], self.vq[i], self.ks[i], self.kz[i], self.vs[i], self.vz[i], self.wk[i], self.wv[i],
                self.int4_rows, self.block, self.group)

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
        length = max(0, min(length, self.length))
        if self.kind == "int4":
            r = self.block
            start = length // r * r
            if start < self.length // r * r and start < length:  # cut into a quantized block: reopen it
                self._reopen(start, length)
        self.length = length

    def _reopen(self, start: int, end: int) -> None:
        """INT4: positions [start, end) of a quantized block go back to the fp16 window (dequantized),
        as the reference cache does, so appending continues the block."""
        cp = get_xp("cuda")
        shifts = cp.asarray([0, 4], dtype=cp.uint8)
        blk, slots = start // self.block, cp.arange(start, end) % self.block
        for i in range(len(self.kq)):
            for codes, dest in ((self.kq[i], self.wk[i]), (self.vq[i], self.wv[i])):
                q = ((codes[:, :, start:end, :, None] >> shifts) & 15).reshape(*codes.shape[:2], end - start, -1)
                q = q.astype(cp.float32)  # (scales and zero points promote from fp16)
                if dest is self.wk[i]:
                    x = (q - self.kz[i][:, :, blk, None, :]) * self.ks[i][:, :, blk, None, :]
                else:
                    g = self.group
                    qg = q.reshape(*q.shape[:3], -1, g)
                    x = ((qg - self.vz[i][:, :, start:end, :, None]) * self.vs[i][:, :, start:end, :, None]).reshape(q.shape)
                dest[:, :, slots] = x.astype(cp.float16)

    def dequantized(self, layer: int, end: int):
        """K, V of positions [0, end) as float32 [B, KV, end, hd] (for tests and the prefill path)."""
        cp = get_xp("cuda")
        out = []
        for codes, scale, off in ((self.keys[layer], self.k_scale[layer], self.k_off[layer]),
                                  (self.values[layer], self.v_scale[layer], self.v_off[layer])):
            c = codes[:, :, :end]
            if self.kind == "float":
                out.append(c.astype(cp.float32))
            elif self.kind == "int8":
                out.append(c.astype(cp.float32) * scale[:, :, :end, None])
            else:
                out.append(_e4m3_table()[c] * scale[:, :, :end, None] + (0 if off is None else off[None, :, None, :]))
        return out

    @property
    def nbytes(self) -> int:
        if self.kind == "int4":
            arrays = self.kq + self.vq + self.ks + self.kz + self.vs + self.vz + self.wk + self.wv
        else:
            arrays = self.keys + self.values + [a for a in self.k_scale + self.v_scale if a is not None]
        return int(sum(a.nbytes for a in arrays))


def _e4m3_table():
    from ..quant.fp8 import decode_e4m3  # noqa: PLC0415

    cp = get_xp("cuda")
    return cp.asarray(decode_e4m3(np.arange(256, dtype=np.uint8)).astype(np.float32))
