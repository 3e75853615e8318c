"""Kernels that load before they wait for the kernel before them, checked in the machine code ptxas
makes, since the source order is not what runs: ptxas may move griddepcontrol.wait (SASS ACQBULK)
above loads written before it (waiting earlier is always correct). In the batch-1 W4 kernel it did,
in every instance and silently, until session 15 (cuda_kernels/common.cuh pdl_begin_after_loads);
the fp16 cluster attention's preload of cached positions is checked too. Needs nvcc (the CI machine
has it; no GPU) and nvdisasm (the `nvidia-cuda-nvdisasm` wheel of the test extras)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "cuda_kernels"


def _nvdisasm():
    found = shutil.which("nvdisasm")
    if found:
        return found
    try:
        import nvidia  # noqa: PLC0415  (the wheel's namespace package)
    except ImportError:
        return None
    for root in getattr(nvidia, "__path__", []):
        for path in sorted(Path(root).glob("cu*/bin/nvdisasm")):
            return str(path)
    return None


@pytest.fixture(scope="module")
def sass(tmp_path_factory):
    """name of a .cu file in cuda_kernels/ -> {kernel: its SASS lines}, compiled for sm_90 once."""
    nvdisasm = _nvdisasm()
    if shutil.which("nvcc") is None or nvdisasm is None:
        pytest.skip("needs nvcc and nvdisasm")
    out, done = tmp_path_factory.mktemp("sass"), {}

    def functions(cu: str) -> dict:
        if cu not in done:
            cubin = out / f"{cu}.cubin"
            subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", f"-I{KERNELS}", "-cubin", "-o", str(cubin),
                            str(KERNELS / f"{cu}.cu")], check=True, capture_output=True)
            text = subprocess.run([nvdisasm, "-c", str(cubin)], check=True, capture_output=True, text=True).stdout
            found, name = {}, None
            for line in text.splitlines():
                label = re.match(r"^(\w+):$", line)
                if label:
                    name = label.group(1)
                    found[name] = []
                elif name and "/*" in line:
                    found[name].append(line)
            done[cu] = found
        return done[cu]

    return functions


def _before_wait(lines):
    """The instructions a kernel issues before its first griddepcontrol.wait (SASS ACQBULK)."""
    return lines[: next(i for i, line in enumerate(lines) if "ACQBULK" in line)]


def test_tc1_loads_its_first_weights_before_the_wait(sass):
    tc1 = {k: v for k, v in sass("w4a16_mma").items() if k.startswith("w4a16_tc1_")}
    assert len(tc1) == 36  # 6 warp counts x 2 scale forms x (plain, _n, _nr)
    late = []
    for name, lines in tc1.items():
        before = _before_wait(lines)
        codes = sum("LDG" in line and ".128" in line for line in before)  # the two rows' 16-byte codes
        words = sum("LDG" in line and ".128" not in line for line in before)  # their scale words
        if codes < 2 or words < 2:
            late.append(f"{name}: {codes} code and {words} scale loads before ACQBULK")
    assert not late, late


def test_cluster_attention_loads_its_first_positions_before_the_wait(sass):
    """attention.cu's fp16 cluster kernel (the 7B step's attention) reads the positions earlier steps
    cached, U = 2 of each group, before its wait: a key and a value row each, ITERS 16-byte loads a row."""
    kernels = sass("attention")
    for iters in (1, 2):
        before = _before_wait(kernels[f"attn_cluster_fp16_{iters}"])
        assert sum("LDG" in line and ".128" in line for line in before) >= 4 * iters
