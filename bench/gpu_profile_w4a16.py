"""One W4A16 launch at batch 1 (K x N, default 8192x28672), for Nsight Compute:
    ncu --clock-control none -k regex:w4a16 --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        python3 bench/gpu_profile_w4a16.py [ROWS] [K N]"""
import sys
from pathlib import Path

import cupy as cp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minillm.gpu.w4a16 import W4A16Weight, w4a16_matmul  # noqa: E402

rows = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] != "-" else None
k, n = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (8192, 28672)
q = cp.random.randint(0, 2**31 - 1, size=(n, 4 * (k // 32)), dtype=cp.int64).astype(cp.uint32)
s = (cp.random.random((n, k // 128), dtype=cp.float32) * 0.02).astype(cp.float16)
z = cp.random.randint(0, 16, size=(n, k // 128), dtype=cp.int32).astype(cp.uint8)
w = W4A16Weight(q, s, z, None, n, k, 128)
x = cp.random.random((1, k), dtype=cp.float32).astype(cp.float16)
y = cp.empty((1, n), dtype=cp.float16)
for _ in range(5):
    w4a16_matmul(x, w, out=y, rows=rows)
cp.cuda.Device().synchronize()
