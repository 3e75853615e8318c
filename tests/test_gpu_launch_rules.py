"""The batch-1 W4 launcher's choice of warps a block (minillm/gpu/w4a16.py `_tc1_warps`), checked on
the CPU against the kernel source and the rule's promise: every count it can return is compiled in
cuda_kernels/w4a16_mma.cu, each warp has a step of work, and the blocks fit one wave whenever some
compiled count lets them (the kernel is latency-bound, so a part-empty last wave costs a whole one)."""

import re
from pathlib import Path
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

SOURCE = Path(__file__).resolve().parents[1] / "cuda_kernels" / "w4a16_mma.cu"


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
