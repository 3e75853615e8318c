"""How long a context fits in a GPU memory budget, per KV-cache type (`minillm bench`).

For a Llama-2-7B-shaped model with W4 g128 weights (3.4 GB packed + fp16 embedding and LM head), the
KV cache is what grows with the context:

    bytes per token = 2 (K, V) x layers x kv_heads x (head_dim x bytes per value + scale bytes)
                    = 2 x 32 x 32 x (128 x 2)     = 512 KiB  fp16
                    = 2 x 32 x 32 x (128 x 1 + 4) = 264 KiB  int8 / fp8 (+ a float32 scale per head)
                    = 32 x 32 x 140               = 140 KiB  int4 KIVI (codes 2 x 64 B, fp16 scale and
                                                             zero: two 64-value groups 8 B, key channels
                                                             per 128-token block 4 B)

so the longest context = (budget - weights - working buffers) / bytes per token. On a GPU the figure
is then checked by allocating the model, the cache and one decode step's buffers inside the budget.
"""

from __future__ import annotations

import numpy as np

from .errors import MinillmError

GPU_CACHES = ("float", "int8", "fp8", "int4")


def w4_weight_bytes(cfg, group: int = 128) -> int:
    """Packed 4-bit codes + a 32-bit scale/zero word per group (the GPU layout, minillm/gpu/w4a16.py)
    of every projection; fp16 embedding, LM head."""
    d, f, h, kv, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = [((h + 2 * kv) * hd, d), (d, h * hd), (2 * f, d), (d, f)]  # (N, K) of the fused products
    total = 0
    for n, k in per_layer:
        chunks = -(-k // 32)
        total += n * 16 * chunks + n * -(-k // group) * 4
    total = total * cfg.num_layers + 2 * 2 * cfg.vocab_size * d + 4 * d * (2 * cfg.num_layers + 1)
    return total


def _cache_bytes(cfg, kind: str, length: int) -> int:
    from .gpu.cache import cache_bytes  # noqa: PLC0415 - no CuPy needed for the arithmetic

    return cache_bytes(kind, cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, length)


def cache_bytes_per_token(cfg, kind: str) -> int:
    """What one more token costs (INT4 also has a fixed cost: its fp16 window)."""
    return (_cache_bytes(cfg, kind, 2048) - _cache_bytes(cfg, kind, 1024)) // 1024


def plan(cfg, budget: int, workspace: int = 256 << 20) -> dict:
    """kind -> (bytes per token, longest context, rounded down to 256 tokens)."""
    free = budget - w4_weight_bytes(cfg) - workspace
    if free <= 0:
        raise MinillmError(f"a budget of {budget / 2**30:.1f} GiB does not hold the weights "
                           f"({w4_weight_bytes(cfg) / 2**30:.2f} GiB)")
    out = {}
    for kind in GPU_CACHES:
        per_token = cache_bytes_per_token(cfg, kind)
        fixed = _cache_bytes(cfg, kind, 1024) - 1024 * per_token
        out[kind] = (per_token, int((free - fixed) // per_token) // 256 * 256)
    return out


def verify(cfg, kind: str, context: int, budget: int) -> int:
    """Allocate the W4 model, a cache of `context` tokens and one decode step; -> bytes in use
    (CuPy's pool), or raise MinillmError if that exceeds the budget."""
    import gc  # noqa: PLC0415

    import cupy as cp  # noqa: PLC0415

    from .gpu.synthetic import random_model  # noqa: PLC0415

    pool = cp.get_default_memory_pool()
    gc.collect()  # an earlier model (its buffers refer back to it) is freed only by the collector
    pool.free_all_blocks()
    model = random_model(cfg, weights="w4", group=128, kv_cache=kind)
    cache = model.new_cache(max_len=context)
    model(np.array([1, 2, 3]), cache)
    model.decode_next([4], cache)
    used = pool.used_bytes()
    del model, cache
    gc.collect()
    pool.free_all_blocks()
    if used > budget:
        raise MinillmError(f"{kind}: {context} tokens used {used / 2**30:.2f} GiB, over the budget")
    return used
