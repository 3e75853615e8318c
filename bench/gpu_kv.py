"""Decode attention over the KV cache on the GPU: fp16 vs int8 vs fp8 vs int4 caches (cuda_kernels/attention.cu,
attention_mma.cu and attention_int4.cu), one Llama-2-7B-shaped layer (32 query heads, head_dim 128;
32 key/value heads, and the GQA variant with 8), contexts 4k..64k, batch 1 and 8, one run.

Time per call = split kernel + combine, the median of CUDA-graph replays (bench/gpu_kernels.py's
method); GB/s counts the cache bytes read (codes and scales of every position); % is of the copy
bandwidth measured in the same run. The cache is filled with random codes, so its contents do not
matter to the timing; the correctness of each format is tests/test_gpu_ops.py's job.

    python3 bench/gpu_kv.py [--contexts 4096,16384,32768,65536] [--batches 1,8] [--max-len 65536]
                            [--int4-layouts 32x32,64x64]

With --max-len, each context is measured inside a cache of that capacity (as a chat fills the cache
it allocated for the model's whole context); the bytes counted are those of the positions in use.
--int4-layouts adds INT4 caches of other key blocks x value groups (kvcache.Int4KVCache's options)
to the table, after the default layout's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_kernels import copy_bandwidth, time_cupy  # noqa: E402

FORMATS = ("float", "int8", "fp8", "int4")


class LayerShape:
    def __init__(self, heads, kv_heads, head_dim=128):
        self.num_heads, self.num_kv_heads, self.head_dim, self.rotary_dim = heads, kv_heads, head_dim, head_dim
        self.num_layers = 1


def measure(shape, fmt, context, batch, max_len=None, options=None):
    """(us per call, bytes of the cache's positions [0, max_len) as attention reads them)."""
    import cupy as cp
    import numpy as np

    from minillm.gpu import kernels as K
    from minillm.gpu.cache import GpuKVCache

    cache = GpuKVCache(shape, fmt, batch, max_len or context, options=options)
    rng = cp.random.default_rng(0)
    if fmt == "int4":
        for arr in (cache.kq[0], cache.vq[0]):
            arr[...] = rng.integers(0, 256, size=arr.shape, dtype=cp.int32).astype(cp.uint8)
        for arr in (cache.ks[0], cache.vs[0]):
            arr[...] = 0.01
        for arr in (cache.kz[0], cache.vz[0]):
            arr[...] = 8.0
        for arr in (cache.wk[0], cache.wv[0]):
            arr[...] = rng.standard_normal(arr.shape, dtype=cp.float32).astype(cp.float16)
    for arr in () if fmt == "int4" else (cache.keys[0], cache.values[0]):
        if fmt == "float":
            arr[...] = rng.standard_normal(arr.shape, dtype=cp.float32).astype(cp.float16)
        else:
            arr[...] = rng.integers(0, 120, size=arr.shape, dtype=cp.int32).astype(arr.dtype)
    for sc in () if fmt == "int4" else (cache.k_scale[0], cache.v_scale[0]):
        if sc is not None:
            sc[...] = 0.01
    cache.pos.set(np.full(batch, context - 1, np.int32))  # the step's query sees all `context` positions
    h, hd = shape.num_heads, shape.head_dim
    q = rng.standard_normal((batch, h, hd), dtype=cp.float32).astype(cp.float16)
    plan = K.attention_plan(shape, max_len or context, batch)
    parts = K.attention_parts(batch, shape, plan)
    out = cp.empty((batch, h * hd), cp.float16)

    def step():
        if fmt == "int4":
            K.decode_attention_int4(q, cache.kivi(0), cache.pos, batch, 1, shape, None, parts, out, plan)
        else:
            K.decode_attention(q, cache.layer(0), cache.pos, batch, 1, shape, None, parts, out, plan)

    us = time_cupy(step, [()], reps=20, warmup=2)
    read = cache.nbytes  # every position of the cache is read once (codes and scales) ...
    if fmt == "int4":  # ... and INT4's fp16 window only for the positions it holds
        slots, window = cache.block, cache.wk[0].nbytes + cache.wv[0].nbytes
        read -= window * (slots - context % slots) // slots
    return us, read


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,16384,32768,65536")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--max-len", type=int, default=None,
                    help="cache capacity (positions), if larger than the context: a chat's cache is "
                         "allocated for the model's whole context and filled gradually")
    ap.add_argument("--int4-layouts", default="", help="more INT4 key block x value group layouts, e.g. 32x32")
    ap.add_argument("--sweep", action="store_true", help="try the attention plans (streams x waves) at 32k first")
    ap.add_argument("--sweep-short", action="store_true",
                    help="the plans at a decode step's short context (600 of 904 positions, as bench/gpu_decode.py)")
    args = ap.parse_args()
    import os

    import cupy as cp

    if args.sweep_short:
        for streams in (1, 2, 4, 8):
            line = []
            for waves in (1, 2, 4, 8):
                os.environ["MINILLM_ATTN_STREAMS"], os.environ["MINILLM_ATTN_WAVES"] = str(streams), str(waves)
                us, _ = measure(LayerShape(32, 32), "float", 600, 1, max_len=904)
                line.append(f"s{streams}w{waves} {us:.1f}")
            print("sweep short (600 of 904, kv 32, batch 1, fp16): " + ", ".join(line), flush=True)
        return
    if args.sweep:
        for kvh in (32, 8):
            for batch in (1, 8):
                for fmt in FORMATS[:3]:  # the INT4 kernel makes its own plan (one wave; kernels.py)
                    line = []
                    for streams in (1, 2, 4, 8):
                        if (32 // kvh) * streams > 16:
                            continue
                        for waves in (4, 8, 16):
                            os.environ["MINILLM_ATTN_STREAMS"], os.environ["MINILLM_ATTN_WAVES"] = str(streams), str(waves)
                            us, _ = measure(LayerShape(32, kvh), fmt, 32768, batch)
                            cp.get_default_memory_pool().free_all_blocks()
                            line.append(f"s{streams}w{waves} {us:.0f}")
                    print(f"sweep kv {kvh} batch {batch} {fmt}: " + ", ".join(line), flush=True)
        os.environ.pop("MINILLM_ATTN_STREAMS")
        os.environ.pop("MINILLM_ATTN_WAVES")

    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    bw = copy_bandwidth()
    print(f"device: {name}; copy bandwidth {bw:.0f} GB/s", flush=True)
    layouts = {f"int4 {lay}": dict(zip(("block", "group"), map(int, lay.split("x"))))
               for lay in args.int4_layouts.split(",") if lay}
    kinds = {fmt: (fmt, None) for fmt in FORMATS} | {name: ("int4", opt) for name, opt in layouts.items()}
    results = []
    for kvh in (32, 8):
        shape = LayerShape(32, kvh)
        for batch in [int(b) for b in args.batches.split(",")]:
            for ctx in [int(c) for c in args.contexts.split(",")]:
                row = {}
                for kind, (fmt, options) in kinds.items():
                    us, read = measure(shape, fmt, ctx, batch, max_len=max(ctx, args.max_len or ctx), options=options)
                    read = read * ctx // max(ctx, args.max_len or ctx)  # the positions in use
                    cp.get_default_memory_pool().free_all_blocks()
                    row[kind] = (us, read)
                    print(f"kv_heads {kvh} batch {batch} context {ctx} {kind}: {us:.1f} us, "
                          f"{read / us / 1e3:.0f} GB/s", flush=True)
                results.append((kvh, batch, ctx, row))

    if args.max_len:
        print(f"\n(each context inside a cache of {args.max_len} positions)")
    print(f"\nDecode attention, one layer, 32 query heads x head_dim 128; {name}, copy bandwidth {bw:.0f} GB/s;"
          " us per call (split + combine), GB/s of cache bytes read, % of copy bandwidth\n")
    head = ["kv heads", "batch", "context", "fp16 us", "fp16 GB/s (%)"]
    for kind in list(kinds)[1:]:
        head += [f"{kind} us", f"{kind} GB/s (%)", f"{kind} speedup"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for kvh, batch, ctx, row in results:
        cells = []
        base = row["float"][0]
        for fmt in kinds:
            us, read = row[fmt]
            gbs = read / us / 1e3
            cells.append(f"{us:.1f} | {gbs:.0f} ({100 * gbs / bw:.0f}%)")
            if fmt != "float":
                cells[-1] += f" | {base / us:.2f}x"
        print(f"| {kvh} | {batch} | {ctx} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
