"""Per-kernel time of one batch-1 decode step of the 7B-shaped model (W4 or fp16), for Nsight Compute:

    ncu --nvtx --nvtx-include "decode/" --cache-control none --clock-control none \
        --metrics gpu__time_duration.sum --csv python3 bench/gpu_profile_decode.py [w4|fp16] > ncu.csv
    python3 bench/gpu_profile_decode.py --summarize ncu.csv

The step runs eagerly (ncu times each kernel alone); compare the sum with the graph's time per token
from bench/gpu_decode.py to see what the launches between kernels cost.
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def run(weights: str):
    """One eager decode step after 514 cached positions (bench/gpu_step.py's default context)."""
    import cupy as cp

    from gpu_step import prepared_step

    model, cache, tok = prepared_step(weights, 514, 1024, cuda_graph=False)
    cp.cuda.runtime.deviceSynchronize()
    cp.cuda.nvtx.RangePush("decode")
    model.decode_next([tok], cache)
    cp.cuda.nvtx.RangePop()


def summarize(path: str):
    total, count = defaultdict(float), defaultdict(int)
    with open(path) as f:
        lines = [ln for ln in f if ln.startswith('"')]
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = row["Kernel Name"].split("(")[0]
        value = float(row["Metric Value"].replace(",", ""))
        scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}[row["Metric Unit"]]
        total[name] += value * scale
        count[name] += 1
    grand = sum(total.values())
    print(f"{'kernel':40s} {'launches':>8s} {'us total':>10s} {'us each':>8s} {'share':>6s}")
    for name in sorted(total, key=total.get, reverse=True):
        print(f"{name:40s} {count[name]:8d} {total[name]:10.1f} {total[name] / count[name]:8.2f} "
              f"{100 * total[name] / grand:5.1f}%")
    print(f"{'all':40s} {sum(count.values()):8d} {grand:10.1f}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--summarize":
        summarize(sys.argv[2])
    else:
        run(sys.argv[1] if len(sys.argv) > 1 else "w4")
