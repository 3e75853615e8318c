"""The batch-1 W4 kernel asks for its first step of weights before it waits for the kernel before it
(cuda_kernels/common.cuh pdl_begin_after_loads): checked in the machine code ptxas makes, since the
source order is not what runs. ptxas may move griddepcontrol.wait (SASS ACQBULK) above loads that
precede it, and until session 15 it did in every instance, silently. Needs nvcc (the CI machine has
it; no GPU) and nvdisasm (the `nvidia-cuda-nvdisasm` wheel of the test extras)."""

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
def tc1_sass(tmp_path_factory):
    nvdisasm = _nvdisasm()
    if shutil.which("nvcc") is None or nvdisasm is None:
        pytest.skip("needs nvcc and nvdisasm")
    cubin = tmp_path_factory.mktemp("sass") / "w4a16_mma.cubin"
    subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", f"-I{KERNELS}", "-cubin", "-o", str(cubin),
                    str(KERNELS / "w4a16_mma.cu")], check=True, capture_output=True)
    text = subprocess.run([nvdisasm, "-c", str(cubin)], check=True, capture_output=True, text=True).stdout
    functions, name = {}, None
    for line in text.splitlines():
        label = re.match(r"^(\w+):$", line)
        if label:
            name = label.group(1)
            functions[name] = []
        elif name and "/*" in line:
            functions[name].append(line)
    return {k: v for k, v in functions.items() if k.startswith("w4a16_tc1_")}


def test_tc1_loads_its_first_weights_before_the_wait(tc1_sass):
    assert len(tc1_sass) == 36  # 6 warp counts x 2 scale forms x (plain, _n, _nr)
    late = []
    for name, lines in tc1_sass.items():
        wait = next(i for i, line in enumerate(lines) if "ACQBULK" in line)
        before = lines[:wait]
        codes = sum("LDG" in line and ".128" in line for line in before)  # the two rows' 16-byte codes
        words = sum("LDG" in line and ".128" not in line for line in before)  # their scale words
        if codes < 2 or words < 2:
            late.append(f"{name}: {codes} code and {words} scale loads before ACQBULK")
    assert not late, late
