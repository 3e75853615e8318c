"""KV caches: the keys and values of every past token, per layer.

Layout per layer: K and V of shape [batch, kv_heads, capacity, head_dim]; positions 0..length-1
hold data. A forward pass over T new tokens calls `update(layer, k, v)` once per layer, which writes
the new rows at [length, length+T) and returns K and V for [0, length+T) as attention reads them;
after the last layer the model calls `advance(T)`.

Every cache type (float here; quantized ones later) keeps this one interface: what attention gets
back from `update` is exactly what it reads, so a quantized cache returns dequantized values.
"""

from __future__ import annotations

import numpy as np

from .errors import MinillmError


class FloatKVCache:
    """Keys and values stored in the compute dtype (float32 on the CPU)."""

    def __init__(self, num_layers, batch, num_kv_heads, head_dim, max_len, xp=np, dtype=np.float32,
                 initial_capacity=256):
        self.xp, self.dtype, self.max_len = xp, dtype, max_len
        self.shape = (batch, num_kv_heads, 0, head_dim)
        self.capacity = 0
        self.keys = [None] * num_layers
        self.values = [None] * num_layers
        self.length = 0
        self._initial_capacity = initial_capacity

    def _grow(self, needed: int) -> None:
        # Doubling keeps appends amortised O(1) without preallocating the whole context up front.
        new_cap = min(max(needed, 2 * self.capacity, self._initial_capacity), max(needed, self.max_len))
        b, h, _, d = self.shape
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = self.xp.zeros((b, h, new_cap, d), dtype=self.dtype)
                if old is not None:
                    new[:, :, : self.length] = old[:, :, : self.length]
                store[i] = new
        self.capacity = new_cap

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_len:
            raise MinillmError(
                f"context overflow: {self.length} cached + {new_tokens} new tokens exceed the "
                f"context of {self.max_len} tokens; start a new conversation or shorten the prompt"
            )

    def update(self, layer: int, k, v):
        """k, v: [batch, kv_heads, T, head_dim] -> K, V: [batch, kv_heads, length+T, head_dim]."""
        t = k.shape[2]
        end = self.length + t
        if end > self.capacity:
            self._grow(end)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, t: int) -> None:
        self.length += t

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (a chat reuses the prefix it shares with the
        new prompt; the stale rows are simply overwritten by the next update)."""
        self.length = max(0, min(length, self.length))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys + self.values if a is not None)
