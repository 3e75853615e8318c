"""Where the time of a decode-attention call goes: the tensor-core kernels (attention_mma.cu for 8-bit
caches with grouped heads, attention_int4.cu) compiled with -DMINILLM_TIMELINE record %globaltimer in
thread 0 of every block at the points attention_merge.cuh lists; this prints, per shape, when blocks
start, get their first key block, finish their loop and end (percentiles over blocks, us from the
first block's start), and the chain of the merge that ended last (its block's loop done, partials
written, counted, weights, end), next to the call's time in CUDA-graph replays of the same build (bench/gpu_kv.py's).
With --graph N, N calls captured in a CUDA graph and replayed once, launched as the decode step
launches them (PDL): per call, when its blocks start, pass the PDL wait, get their first key block,
finish their loop and end, and how long after the previous call's end its wait let go.

    python3 bench/attn_timeline.py [--shapes 8,1,32768,int8;32,1,32768,int4] [--calls 5] [--graph 4]

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
START, FIRST, LOOP, PARTIALS, COUNTED, WEIGHTS, END, WHO, WAITED = range(9)


def timeline(kvh: int, batch: int, context: int, fmt: str, calls: int, graph: bool = False):
    """Per-block marks (ns) of the last of `calls` back-to-back calls, or with `graph` of each of them
    (replayed from a CUDA graph; one row a block in the order blocks started, calls one after another),
    and the graph-replay time of one call (us)."""
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
    if fmt == "int4":  # the build decode_attention_int4 picks for this grid
        grid, _ = K.int4_grid(shape, context, batch, plan)
        mod = K.module("attention_int4", K.int4_defines(cache.block, cache.group, int(np.prod(grid))))
    else:
        mod = K.module("attention_mma")
    marks = cp.ndarray((16384, 9), cp.uint64, memptr=mod.get_global("attn_timeline"))
    rows = cp.ndarray((1,), cp.uint32, memptr=mod.get_global("attn_timeline_rows"))

    def call():
        if fmt == "int4":
            K.decode_attention_int4(q, cache.kivi(0), cache.pos, batch, 1, shape, None, parts, out, plan)
        else:
            K.decode_attention(q, cache.layer(0), cache.pos, batch, 1, shape, None, parts, out, plan)

    if not graph:
        marks[...] = 0
        for _ in range(calls):
            call()
        cp.cuda.Device().synchronize()
        m = marks.get().astype(np.int64)
        return m[m[:, START] > 0], us
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:  # (launch.py launches with PDL only into a graph being captured)
        stream.begin_capture()
        for _ in range(calls):
            call()
        run = stream.end_capture()
        run.launch(stream)
        marks[...] = 0
        rows[...] = 0
        run.launch(stream)
        stream.synchronize()
    return marks.get().astype(np.int64)[: int(rows.get()[0])], us


def _spread(a: np.ndarray) -> str:
    return f"{np.nanmin(a):.1f} / {np.nanmedian(a):.1f} / {np.nanmax(a):.1f}"


def graph_rows(m: np.ndarray, calls: int) -> list:
    """Per call of a graph replay: when its blocks start, pass the wait, have their first block, end
    their loop and end (us from the first block's start: min / median / max), and how long after the
    previous call's last block ended its first block passed the wait."""
    t = np.where(m > 0, (m - m[:, START].min()) / 1e3, np.nan)  # (a split with no key block has no mark 1)
    per = len(m) // calls
    out, prev_end = [], None
    for c in range(calls):
        x = t[c * per:(c + 1) * per]
        gap = f"{np.nanmin(x[:, WAITED]) - prev_end:.2f}" if prev_end is not None else ""
        out.append((c, *(_spread(x[:, k]) for k in (START, WAITED, FIRST, LOOP, END)), gap))
        prev_end = np.nanmax(x[:, END])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--graph", type=int, default=0, metavar="N",
                    help="N calls replayed from a CUDA graph (PDL), each call's marks")
    args = ap.parse_args()
    from minillm.gpu import kernels as K

    K.EXTRA_OPTIONS = ("-DMINILLM_TIMELINE",) + (("-DMINILLM_TIMELINE_RING",) if args.graph else ())
    import cupy as cp

    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    spread = "min / median / max" if args.graph else "p0 / p50 / p90 / max"
    print(f"device: {name}; us from the first block's start; blocks: {spread}\n")
    if args.graph:
        print("| kv heads | batch | context | cache | call | start | past the wait | first block in | loop done | end "
              "| wait let go after the previous end |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for spec in args.shapes.split(";"):
            kvh, batch, context, fmt = spec.split(",")
            m, _ = timeline(int(kvh), int(batch), int(context), fmt, args.graph, graph=True)
            for row in graph_rows(m, args.graph):
                print(f"| {kvh} | {batch} | {context} | {fmt} | " + " | ".join(str(v) for v in row) + " |", flush=True)
            cp.get_default_memory_pool().free_all_blocks()
        return
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
