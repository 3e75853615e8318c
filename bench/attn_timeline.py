"""Where the time of one decode-attention call goes: the tensor-core kernels (attention_mma.cu for 8-bit
caches with grouped heads, attention_int4.cu) compiled with -DMINILLM_TIMELINE record %globaltimer in
thread 0 of every block at the points attention_merge.cuh lists; this prints, per shape, when blocks
start, get their first key block, finish their loop and end (percentiles over blocks, us from the
first block's start), and the chain of the merge that ended last (its block's loop done, partials
written, counted, weights, end), next to the call's time in CUDA-graph replays of the same build (bench/gpu_kv.py's).

    python3 bench/attn_timeline.py [--shapes 8,1,32768,int8;32,1,32768,int4] [--calls 5]

shape: kv heads, batch, context, cache format (int8, fp8 or int4; 32 query heads x head_dim 128).
The marks cost a store each; the figures to quote for speed are bench/gpu_kv.py's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DEFAULT_SHAPES = "8,1,32768,int8;8,1,32768,fp8;8,1,32768,int4;32,1,32768,int4;32,8,32768,int4"
START, FIRST, LOOP, PARTIALS, COUNTED, WEIGHTS, END, WHO = range(8)


def timeline(kvh: int, batch: int, context: int, fmt: str, calls: int):
    """Per-block marks (ns) of the last of `calls` back-to-back calls, and the graph-replay time (us)."""
    import cupy as cp

    from gpu_kv import LayerShape, measure
    from minillm.gpu import kernels as K
    from minillm.gpu.cache import GpuKVCache

    shape = LayerShape(32, kvh)
    us, _ = measure(shape, fmt, context, batch)  # fills a cache of its own with random codes
    cache = GpuKVCache(shape, fmt, batch, context)
    cache.pos.set(np.full(batch, context - 1, np.int32))
    q = cp.random.default_rng(0).standard_normal((batch, 32, 128), dtype=cp.float32).astype(cp.float16)
    plan = K.attention_plan(shape, context, batch)
    parts = K.attention_parts(batch, shape, plan)
    out = cp.empty((batch, 32 * 128), cp.float16)
    marks = cp.ndarray((16384, 8), cp.uint64,
                       memptr=(K.module("attention_int4", K.int4_layout(cache.block, cache.group)) if fmt == "int4"
                               else K.module("attention_mma")).get_global("attn_timeline"))
    marks[...] = 0
    for _ in range(calls):
        if fmt == "int4":
            K.decode_attention_int4(q, cache.kivi(0), cache.pos, batch, 1, shape, None, parts, out, plan)
        else:
            K.decode_attention(q, cache.layer(0), cache.pos, batch, 1, shape, None, parts, out, plan)
    cp.cuda.Device().synchronize()
    m = marks.get().astype(np.int64)
    m = m[m[:, START] > 0]
    return m, us


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    from minillm.gpu import kernels as K

    K.EXTRA_OPTIONS = ("-DMINILLM_TIMELINE",)
    import cupy as cp

    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"device: {name}; us from the first block's start; blocks: p0 / p50 / p90 / max\n")
    print("| kv heads | batch | context | cache | graph us | blocks | start | first block in | loop done "
          "| end | last merge: loop -> partials -> counted -> weights -> end |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for spec in args.shapes.split(";"):
        kvh, batch, context, fmt = spec.split(",")
        m, us = timeline(int(kvh), int(batch), int(context), fmt, args.calls)
        if not len(m):  # 8-bit caches with one query head per kv head: attention.cu, no marks
            print(f"| {kvh} | {batch} | {context} | {fmt} | {us:.1f} | (not a tensor-core kernel) |")
            continue
        t = (m[:, :WHO] - m[:, START].min()) / 1e3
        pct = lambda a: " / ".join(f"{np.percentile(a, p):.1f}" for p in (0, 50, 90, 100))  # noqa: E731
        # the merge that ended last: the call's critical path once its loop was done
        merged = np.flatnonzero((m[:, WHO] >> 32) == 1)
        lt = t[merged[np.argmax(t[merged, END])]]
        chain = " -> ".join(f"{lt[k]:.1f}" for k in (LOOP, PARTIALS, COUNTED, WEIGHTS, END))
        print(f"| {kvh} | {batch} | {context} | {fmt} | {us:.1f} | {len(m)} | {pct(t[:, START])} | {pct(t[:, FIRST])} "
              f"| {pct(t[:, LOOP])} | {pct(t[:, END])} | {chain} |", flush=True)
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
