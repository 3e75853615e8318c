"""W4A16 GEMV/GEMM: minillm's kernel vs cuBLAS fp16 vs torch's int4 tinygemm, in one run.

For each shape (K in x N out) at batch 1 and 16: median time (CUDA events, after warm-up), GB/s of
the bytes each kernel must read (its weights + scale/zero words + x, and y written), and that as a
percentage of the device-to-device copy bandwidth measured at the start of the same run. Weights are
rotated among enough copies to exceed the L2 cache, so every timing reads HBM.

    python3 bench/gpu_kernels.py [--batches 1,2,4,8,16] [--shapes 4096x4096,...]    (CUDA, CuPy and torch)
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672)]  # (K, N)
BATCHES = [1, 16]
GROUP = 128
ROTATE_BYTES = 512 * 2**20  # > 10x the 50-60 MB L2 of an H100/H200


GEMV_SOURCE = (Path(__file__).resolve().parents[1] / "cuda_kernels" / "w4a16_gemv.cu").read_text()
GRAPH_LAUNCHES = 20  # launches per captured graph; the time per launch is the replay time / 20


def time_cupy(fn, args_list, reps=20, warmup=3):
    """Median time of one launch, from CUDA-graph replays of GRAPH_LAUNCHES launches that rotate over
    args_list: the GPU runs them back to back, so host launch latency is not counted (it would be
    for a single launch between two events), and rotation keeps the weights out of L2."""
    import cupy as cp

    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        for i in range(warmup):
            fn(*args_list[i % len(args_list)])
        stream.begin_capture()
        for i in range(GRAPH_LAUNCHES):
            fn(*args_list[i % len(args_list)])
        graph = stream.end_capture()
        graph.launch(stream)
        times = []
        for _ in range(reps):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record(stream)
            graph.launch(stream)
            b.record(stream)
            b.synchronize()
            times.append(cp.cuda.get_elapsed_time(a, b) * 1e3 / GRAPH_LAUNCHES)
    return statistics.median(times)


def time_torch(fn, args_list, reps=20, warmup=3):
    """As time_cupy, with torch's graph capture."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(warmup):
            fn(*args_list[i % len(args_list)])
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(GRAPH_LAUNCHES):
            fn(*args_list[i % len(args_list)])
    g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / GRAPH_LAUNCHES)
    return statistics.median(times)


def copy_bandwidth():
    """Device-to-device cudaMemcpy of 1 GiB, ten back to back between two events."""
    import cupy as cp

    src = cp.random.random(2**28, dtype=cp.float32)
    dst = cp.empty_like(src)
    runtime = cp.cuda.runtime
    for _ in range(3):
        runtime.memcpyAsync(dst.data.ptr, src.data.ptr, src.nbytes, runtime.memcpyDeviceToDevice, 0)
    results = []
    for _ in range(5):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        for _ in range(10):
            runtime.memcpyAsync(dst.data.ptr, src.data.ptr, src.nbytes, runtime.memcpyDeviceToDevice, 0)
        b.record()
        b.synchronize()
        results.append(10 * 2 * src.nbytes / (cp.cuda.get_elapsed_time(a, b) * 1e-3) / 1e9)
    return statistics.median(results)  # bytes read + written per second


def random_packed(k, n, copies, rng):
    """W4A16Weight copies with random codes/scales/zeros (built on the GPU: no host quantization)."""
    import cupy as cp

    from minillm.gpu.w4a16 import W4A16Weight

    chunks = -(-k // 32)
    g = -(-k // GROUP)
    out = []
    for _ in range(copies):
        q = cp.random.randint(0, 2**31 - 1, size=(n, 4 * chunks), dtype=cp.int64).astype(cp.uint32)
        s = (cp.random.random((n, g), dtype=cp.float32) * 0.02 + 0.001).astype(cp.float16)
        z = cp.random.randint(0, 16, size=(n, g), dtype=cp.int32).astype(cp.uint8)
        out.append(W4A16Weight(q, s, z, None, n, k, GROUP))
    return out


def check_against_reference(k, n, m):
    """The benchmarked kernel is checked on this shape first: fresh random input, poisoned output."""
    import cupy as cp

    from minillm.gpu.w4a16 import W4A16Weight, w4a16_matmul
    from minillm.quant import QuantSpec, quantize_rtn

    rng = np.random.default_rng(k + n)
    qt = quantize_rtn(rng.normal(size=(n, k)).astype(np.float32), QuantSpec(4, "group", GROUP))
    x = rng.normal(size=(m, k)).astype(np.float16)
    out = cp.full((m, n), cp.nan, dtype=cp.float16)
    y = cp.asnumpy(w4a16_matmul(cp.asarray(x), W4A16Weight.upload(qt), out=out)).astype(np.float64)
    ref = x.astype(np.float64) @ qt.dequantize().astype(np.float64).T
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def torch_int4(k, n, m, copies):
    """torch's tinygemm int4 path (_weight_int4pack_mm, group 128), as gpt-fast uses it."""
    import torch

    ws = []
    for _ in range(copies):
        w = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
        packed_u8 = ((w[:, ::2] << 4) | w[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
        sz = torch.rand((k // GROUP, n, 2), dtype=torch.bfloat16, device="cuda") * 0.02
        ws.append((packed, sz))
    x = torch.randn((m, k), dtype=torch.bfloat16, device="cuda")
    args = [(x, p, sz) for p, sz in ws]
    return time_torch(lambda x, p, sz: torch.ops.aten._weight_int4pack_mm(x, p, GROUP, sz), args)


def main():
    import argparse

    import cupy as cp
    import torch

    from minillm.gpu.w4a16 import w4a16_matmul

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="comma-separated KxN")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    bw = copy_bandwidth()
    print(f"device: {name}; device-to-device copy {bw:.0f} GB/s (bytes read + written)")
    rng = np.random.default_rng(0)
    rows = []
    for k, n in shapes:
        for m in batches:
            rel = check_against_reference(k, n, m)
            assert rel < 1e-3, f"W4A16 kernel wrong on {k}x{n} at batch {m}: relative error {rel}"
        packed_bytes = n * 16 * -(-k // 32) + n * -(-k // GROUP) * 4  # codes + a scale/zero word per group
        copies = max(2, ROTATE_BYTES // packed_bytes)
        weights = random_packed(k, n, copies, rng)
        fp16_copies = max(2, ROTATE_BYTES // (2 * n * k))
        wt = [torch.randn((n, k), dtype=torch.float16, device="cuda") for _ in range(min(fp16_copies, 8))]
        for m in batches:
            x = cp.asarray(rng.normal(size=(m, k)).astype(np.float16))
            y = cp.empty((m, n), dtype=cp.float16)
            # The alternatives, each timed for NOTES.md as (label, launcher overrides); "minillm" below
            # is the launcher's own choice. GEMV kernel: rows per warp (and at one row, K split among
            # 2 or 4 warps); tensor-core kernel: 16-row tiles per block; at one row, the batch-1
            # tensor-core kernel with 4, 8 or 16 warps per block.
            variants = [(f"rows {r}", {"rows": r}) for r in (1, 2, 4, 8) if f"W4A16_KERNEL({m}, {r})" in GEMV_SOURCE]
            variants += [(f"tiles {t}", {"tiles": t}) for t in (1, 2)]
            if m == 1:
                variants += [(f"rows {r} ksplit {s}", {"rows": r, "ksplit": s}) for r in (1, 2) for s in (2, 4)]
                variants += [(f"tc1 {s}", {"tc": s}) for s in (4, 8, 16)]
            options = {label: time_cupy(lambda w: w4a16_matmul(x, w, out=y, **v), [(w,) for w in weights])
                       for label, v in variants}
            # minillm's own launch uses programmatic dependent launch (minillm/gpu/launch.py): back to
            # back, a launch overlaps the previous one's completion, as in the decode step. The peers
            # below launch as their libraries do; the plain launch is shown beside it.
            with mock.patch.dict(os.environ, {"MINILLM_PDL": "0"}):
                options["PDL off"] = time_cupy(lambda w: w4a16_matmul(x, w, out=y), [(w,) for w in weights])
            print(f"  {k}x{n} m={m}: " + ", ".join(f"{o} {t:.1f} us" for o, t in options.items()))
            ours = time_cupy(lambda w: w4a16_matmul(x, w, out=y), [(w,) for w in weights])
            xt = torch.randn((m, k), dtype=torch.float16, device="cuda")
            cublas = time_torch(lambda w: torch.nn.functional.linear(xt, w), [(w,) for w in wt])
            try:
                tint4 = torch_int4(k, n, m, copies=min(copies, 8))
            except Exception as exc:  # report, don't hide: the peer may be missing on this torch
                print(f"torch int4 failed on {k}x{n} m={m}: {exc}".splitlines()[0])
                tint4 = float("nan")
            io = 2 * m * (k + n)
            ours_gbs = (packed_bytes + io) / ours / 1e3
            rows.append((k, n, m, ours, ours_gbs, 100 * ours_gbs / bw, cublas, (2 * n * k + io) / cublas / 1e3,
                         tint4, cublas / ours, tint4 / ours))
        del weights, wt
        cp.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()

    print(f"\nW4A16 (group {GROUP}, asymmetric) vs cuBLAS fp16 vs torch int4 tinygemm; us per launch, "
          f"median of 20 replays of a CUDA graph of {GRAPH_LAUNCHES} launches rotating over weight copies; "
          "minillm launched as in the decode step, with PDL (its plain launch: 'PDL off' above)")
    print("| K x N | batch | minillm us | GB/s | % of copy | cuBLAS fp16 us | cuBLAS GB/s | torch int4 us |"
          " vs cuBLAS | vs torch int4 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, n, m, t, gbs, pct, tc, cgbs, ti, sc, si in rows:
        print(f"| {k}x{n} | {m} | {t:.1f} | {gbs:.0f} | {pct:.0f}% | {tc:.1f} | {cgbs:.0f} | {ti:.1f} | "
              f"{sc:.2f}x | {si:.2f}x |")


if __name__ == "__main__":
    main()
