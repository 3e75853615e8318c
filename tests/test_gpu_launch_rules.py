"""The launchers' rules checked on the CPU against the kernel source. The batch-1 W4 launcher's choice
of warps a block (minillm/gpu/w4a16.py `_tc1_warps`) and the rule's promise: every count it can
return is compiled in cuda_kernels/w4a16_mma.cu, each warp has a step of work, and the blocks fit one
wave whenever some compiled count lets them (the kernel is latency-bound, so a part-empty last wave
costs a whole one). And the attention kernels' sizes that minillm/gpu/kernels.py repeats to size
shared memory, splits and grids: each the same number as in the source it describes."""

import re
from pathlib import Path
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

KERNELS = Path(__file__).resolve().parents[1] / "cuda_kernels"
SOURCE = KERNELS / "w4a16_mma.cu"


def compiled_warps() -> set[int]:
    """The S of every W4A16_TC1_KERNEL line inside the W4A16_TC1_WARPS macro."""
    macro = SOURCE.read_text().split("#define W4A16_TC1_WARPS", 1)[1].split("\n\n", 1)[0]
    return {int(s) for s in re.findall(r"W4A16_TC1_KERNEL\((\d+),", macro)}


class Shape:  # what _tc1_warps reads of a W4A16Weight
    def __init__(self, n, k):
        self.n, self.chunks = n, -(-k // 32)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 60000), k=st.integers(32, 30000), sms=st.integers(1, 200), in_step=st.booleans())
def test_tc1_warps_are_compiled_and_fill_one_wave(n, k, sms, in_step):
    from minillm.gpu import w4a16

    compiled = compiled_warps()
    assert set(w4a16.TC1_WARPS) == compiled
    with mock.patch("minillm.gpu.kernels.sm_count", lambda: sms):
        s = w4a16._tc1_warps(Shape(n, k), in_step=in_step)
    tiles, steps = -(-n // 16), -(-k // 128)
    fits = [c for c in compiled if steps >= c and tiles <= (32 // c) * sms]  # one wave at 64 registers
    assert s == 0 or (s in compiled and steps >= s)
    if fits and not (in_step and max(fits) == 4):
        assert s == max(fits)
    if not fits:
        assert s == (8 if steps >= 8 else 0)  # past one wave: 8 warps, or the GEMV for short rows


def source_number(file: str, pattern: str) -> int:
    """The one number `pattern` (a regex with one group) finds in cuda_kernels/`file`."""
    found = re.findall(pattern, (KERNELS / file).read_text())
    assert len(found) == 1, (file, pattern, found)
    return int(found[0])


def test_attention_sizes_match_the_kernel_source():
    from minillm.gpu import kernels as K

    assert K.CLUSTER == source_number("attention.cu", r"#define CLUSTER (\d+)")
    assert K.MAX_CLUSTER_OUT == source_number("attention.cu", r"#define MAX_CLUSTER_OUT (\d+)")
    assert K.MAX_MERGE == source_number("attention_merge.cuh", r"#define MAX_MERGE (\d+)")
    assert K.ACC_PAD == source_number("attention_merge.cuh", r"constexpr int ACC_PAD = (\d+);")
    for file in ("attention_int4.cu", "attention_mma.cu"):
        assert K.MMA_WARPS == source_number(file, r"constexpr int NW = (\d+);")
    assert K.MMA_STAGES == source_number("attention_mma.cu", r"constexpr int MMA_STAGES = (\d+);")
    assert K.INT4_BLOCKS_PER_SM == source_number("attention_int4.cu", r"#define KIVI_MIN_BLOCKS (\d+)")
    assert "__launch_bounds__(32 * kivi::NW, KIVI_MIN_BLOCKS)" in (KERNELS / "attention_int4.cu").read_text()


class Layer:  # what int4_grid reads of a model config
    def __init__(self, heads, kv_heads):
        self.num_heads, self.num_kv_heads = heads, kv_heads


@settings(max_examples=300, deadline=None)
@given(kv=st.sampled_from([1, 2, 3, 4, 8, 16, 32]), g=st.sampled_from([1, 2, 3, 4, 8, 16]), rows=st.integers(1, 64),
       max_len=st.integers(1, 1 << 17), sms=st.integers(1, 200))
def test_int4_build_promises_only_the_blocks_a_sm_it_gets(kv, g, rows, max_len, sms):
    """The INT4 attention build with launch bounds of two blocks a SM (more registers) is picked only
    for grids that no SM holds more than two blocks of, and always for those (one wave at most)."""
    from minillm.gpu import kernels as K

    with mock.patch("minillm.gpu.kernels.sm_count", lambda: sms):
        grid, chunk = K.int4_grid(Layer(kv * g, kv), max_len, rows, (None, 1 << 20))
        blocks = grid[0] * grid[1] * grid[2]
        few = f"-DKIVI_MIN_BLOCKS={K.INT4_FEW_BLOCKS_PER_SM}" in K.int4_defines(128, 64, blocks)
    assert grid[1] * chunk >= max_len > (grid[1] - 1) * chunk  # every position in one split
    assert few == (blocks <= K.INT4_FEW_BLOCKS_PER_SM * sms)
