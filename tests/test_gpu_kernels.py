"""Acceptance (issue 6, point 1, kernels): the W4A16 kernels (GEMV and tensor-core) against the NumPy reference on random
inputs drawn by hypothesis: odd K (not a multiple of 32, nor of the group), N not a multiple of the
rows a warp takes, batches 1..20, symmetric and asymmetric, act-order g_idx. Outputs are poisoned
with NaN before each launch, so an unwritten element fails. Run with `python3 -m pytest -m gpu`."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.gpu.w4a16 import TC1_WARPS
from minillm.quant import QuantSpec, quantize_rtn

pytestmark = pytest.mark.gpu
KERNELS = __import__("pathlib").Path(__file__).resolve().parents[1] / "cuda_kernels" / "w4a16_gemv.cu"


def reference(x16, qt):
    """float64 product of the fp16 input with the dequantized weight."""
    return x16.astype(np.float64) @ qt.dequantize().astype(np.float64).T


def check(out, ref, x16, qt):
    """The kernel accumulates in fp32 and rounds each output to fp16 once (2^-11 relative); the
    batch > 16 path multiplies fp16-rounded weights (2^-11 relative each) in cuBLAS. Both stay
    within 2^-10 of sum_k |x_k| |w_k| plus fp32 accumulation noise."""
    assert np.isfinite(out).all(), "an output was never written (still NaN)"
    err = np.abs(out.astype(np.float64) - ref)
    scale = np.abs(x16.astype(np.float64)) @ np.abs(qt.dequantize().astype(np.float64)).T
    assert np.all(err <= 2.0**-10 * scale + 1e-6)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(8, 700), m=st.integers(1, 20),
       group=st.sampled_from([32, 64, 96, 128]), sym=st.booleans(), act_order=st.booleans(),
       variant=st.sampled_from([None, "rows1", "rows2", "rows4", "tiles1", "tiles2", "tc4", "tc8", "tc16"]),
       seed=st.integers(0, 2**31))
def test_w4a16_matches_numpy(n, k, m, group, sym, act_order, variant, seed):
    import cupy as cp

    from minillm.gpu.w4a16 import W4A16Weight, w4a16_matmul

    rng = np.random.default_rng(seed)
    qt = quantize_rtn(rng.normal(size=(n, k)).astype(np.float32), QuantSpec(4, "group", group, sym))
    if act_order:  # a GPTQ-style act-order: groups of `group` consecutive positions in a random order
        order = rng.permutation(k)
        g_idx = np.empty(k, dtype=np.int32)
        g_idx[order] = np.arange(k) // group
        qt.g_idx = g_idx
    x = rng.normal(size=(m, k)).astype(np.float16)
    w = W4A16Weight.upload(qt)
    out = cp.full((m, n), cp.nan, dtype=cp.float16)
    # A forced variant: the GEMV kernel with 1/2/4 rows per warp (where compiled), the tensor-core
    # kernel with 1/2 tiles per block (any batch), or at one row the batch-1 tensor-core kernel with
    # 4/8/16 warps per block; None lets the launcher pick.
    rows = tiles = tc = None
    if variant and variant.startswith("rows") and f"w4a16_gemv_m{m}_r{variant[4:]}" in open(KERNELS).read():
        rows = int(variant[4:])
    if variant and variant.startswith("tiles"):
        tiles = int(variant[5:])
    if variant and variant.startswith("tc") and m == 1:
        tc = int(variant[2:])
    res = w4a16_matmul(cp.asarray(x), w, out=out if m in (1, 2, 4, 8, 16) else None, rows=rows, tiles=tiles, tc=tc)
    check(cp.asnumpy(res), reference(x, qt), x, qt)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(8, 2000), group=st.sampled_from([32, 96, 128]), sym=st.booleans(),
       rows=st.sampled_from([1, 2]), ksplit=st.sampled_from([2, 4]), seed=st.integers(0, 2**31))
def test_w4a16_split_k_matches_numpy(n, k, group, sym, rows, ksplit, seed):
    """Batch 1 with each row's K split among 2 or 4 warps (their sums meet in shared memory)."""
    import cupy as cp

    from minillm.gpu.w4a16 import W4A16Weight, w4a16_matmul

    rng = np.random.default_rng(seed)
    qt = quantize_rtn(rng.normal(size=(n, k)).astype(np.float32), QuantSpec(4, "group", group, sym))
    x = rng.normal(size=(1, k)).astype(np.float16)
    out = cp.full((1, n), cp.nan, dtype=cp.float16)
    res = w4a16_matmul(cp.asarray(x), W4A16Weight.upload(qt), out=out, rows=rows, ksplit=ksplit)
    check(cp.asnumpy(res), reference(x, qt), x, qt)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(8, 3000), group=st.sampled_from([32, 64, 96, 128, 256]),
       sym=st.booleans(), warps=st.sampled_from(sorted(TC1_WARPS)), act=st.booleans(), seed=st.integers(0, 2**31))
def test_w4a16_tc1_matches_numpy(n, k, group, sym, warps, act, seed):
    """Batch 1 on the tensor cores: the scale on the fp32 sum (groups of 128, 256) or on the fp16
    codes (32, 64, 96), K split among the warps of every compiled instance (4 to 16), and the fused
    gated activation (rows are (gate, up) pairs: y[i] = silu(gate_i) * up_i, checked against the
    reference's pairs)."""
    import cupy as cp

    from minillm.gpu.w4a16 import W4A16Weight, _launch

    rng = np.random.default_rng(seed)
    n += n % 2 if act else 0
    qt = quantize_rtn(rng.normal(size=(n, k)).astype(np.float32), QuantSpec(4, "group", group, sym))
    w = W4A16Weight.upload(qt)
    x = rng.normal(size=(1, k)).astype(np.float16)
    x_pad = cp.zeros((1, 32 * w.chunks), dtype=cp.float16)
    x_pad[:, :k] = cp.asarray(x)
    out = cp.full((1, n // 2 if act else n), cp.nan, dtype=cp.float16)
    _launch(x_pad, w, out, 1, act=0 if act else -1, tc=warps)
    ref = reference(x, qt)
    if not act:
        check(cp.asnumpy(out), ref, x, qt)
        return
    # silu(g) * u: |d(silu)/dg| <= 1.1, so the bound on g carries over scaled by |u|, plus |silu(g)|
    # times the bound on u; the product is rounded to fp16 once more.
    scale = np.abs(x.astype(np.float64)) @ np.abs(qt.dequantize().astype(np.float64)).T
    g, u, bg, bu = ref[:, 0::2], ref[:, 1::2], 2.0**-10 * scale[:, 0::2] + 1e-6, 2.0**-10 * scale[:, 1::2] + 1e-6
    silu = g / (1 + np.exp(-g))
    want = silu * u
    bound = 1.1 * bg * (np.abs(u) + bu) + np.abs(silu) * bu + 2.0**-11 * np.abs(want) + 1e-6
    got = cp.asnumpy(out).astype(np.float64)
    assert np.isfinite(got).all(), "an output was never written (still NaN)"
    assert np.all(np.abs(got - want) <= bound)


@pytest.mark.parametrize("n, k, group, tc", [(50, 9000, 32, 0), (50, 9000, 32, 8), (40, 30000, 128, 4),
                                              (40, 30000, 128, 16)])
def test_w4a16_long_rows(n, k, group, tc):
    """Long rows through the GEMV (tc 0) and the batch-1 tensor-core kernel: many small groups (282 of
    32), and rows long enough that x, which the tensor-core kernel stages in shared memory, needs more
    than the 48 KB a launch gets by default (30000 values, 60 KB)."""
    import cupy as cp

    from minillm.gpu.w4a16 import W4A16Weight, w4a16_matmul

    rng = np.random.default_rng(k + tc)
    qt = quantize_rtn(rng.normal(size=(n, k)).astype(np.float32), QuantSpec(4, "group", group, False))
    x = rng.normal(size=(1, k)).astype(np.float16)
    out = cp.full((1, n), cp.nan, dtype=cp.float16)
    res = w4a16_matmul(cp.asarray(x), W4A16Weight.upload(qt), out=out, tc=tc)
    check(cp.asnumpy(res), reference(x, qt), x, qt)


@pytest.mark.parametrize("k, n", [(4096, 4096), (11008, 4096), (576, 1536)])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_w4a16_real_shapes(k, n, m):
    import cupy as cp

    from minillm.gpu.w4a16 import W4A16Weight, w4a16_matmul

    rng = np.random.default_rng(k + n + m)
    qt = quantize_rtn(rng.normal(size=(n, k)).astype(np.float32), QuantSpec(4, "group", 128 if k % 128 == 0 else 64))
    x = rng.normal(size=(m, k)).astype(np.float16)
    out = cp.full((m, n), cp.nan, dtype=cp.float16)
    res = w4a16_matmul(cp.asarray(x), W4A16Weight.upload(qt), out=out)
    check(cp.asnumpy(res), reference(x, qt), x, qt)
