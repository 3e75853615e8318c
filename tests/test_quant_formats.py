"""Acceptance (issue 4, points 2 and 3): packed layouts round-trip bit-exactly, every pair of formats
converts with identical dequantized weights, and checkpoints interoperate with the real tools:
compressed-tensors (its own packer; transformers decompressing minillm's files; llm-compressor's
files loading in minillm), GPTQ and AWQ against their reference packing loops."""

from pathlib import Path

import numpy as np
import pytest
from conftest import assert_logits_close, hf_logits, make_tiny_model, save_tiny
from hypothesis import given, settings
from hypothesis import strategies as st

import minillm
from minillm.errors import MinillmError
from minillm.quant import QuantSpec, quantize_rtn
from minillm.quant.formats import from_tensors, to_tensors
from minillm.quant.packing import awq_pack, pack_bits, unpack_bits
from minillm.quantize import quantize_weights, save_quantized

FIXTURES = Path(__file__).parent / "fixtures"


@settings(max_examples=80, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 5), n=st.integers(1, 130), axis=st.sampled_from([0, 1]),
       seed=st.integers(0, 2**31))
def test_pack_unpack_is_identity(bits, rows, n, axis, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, size=(rows, n) if axis == 1 else (n, rows))
    codes = codes.astype(np.uint8)
    assert np.array_equal(unpack_bits(pack_bits(codes, bits, axis), bits, n, axis), codes)


def _formats_for(spec, n, k):
    fmts = ["minillm"]
    if spec.granularity != "tensor":
        fmts += ["gptq_v2", "compressed-tensors"]
    if spec.bits == 4 and not spec.sym and spec.granularity == "group" and n % 8 == 0 and k % spec.group_size == 0:
        fmts.append("awq")
    return fmts


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), gran=st.sampled_from(["tensor", "channel", "group"]),
       g=st.sampled_from([32, 64, 128]), sym=st.booleans(), n8=st.integers(1, 6), k=st.integers(8, 300),
       seed=st.integers(0, 2**31))
def test_every_pair_of_formats_converts_exactly(bits, gran, g, sym, n8, k, seed):
    n = 8 * n8
    spec = QuantSpec(bits, gran, g, sym)
    rng = np.random.default_rng(seed)
    qt = quantize_rtn(rng.normal(size=(n, k)).astype(np.float32), spec)
    qt.zeros[qt.zeros == 0] = 1  # GPTQ v1 cannot store a zero point of 0 (tested separately)
    ref = qt.dequantize()
    fmts = _formats_for(spec, n, k) + (["gptq"] if spec.granularity != "tensor" else [])
    for a in fmts:
        via_a = from_tensors(to_tensors(qt, a), a, spec, n, k, "layer")
        for b in fmts:
            via_b = from_tensors(to_tensors(via_a, b), b, spec, n, k, "layer")
            assert np.array_equal(via_b.dequantize(), ref), (a, b)
            assert np.array_equal(via_b.codes, qt.codes)


def test_gptq_v1_refuses_a_zero_point_of_zero():
    qt = quantize_rtn(np.abs(np.random.default_rng(0).normal(size=(8, 64))).astype(np.float32), QuantSpec(4, "group", 32))
    assert (qt.zeros == 0).any()  # all-positive groups put the zero point at 0
    with pytest.raises(MinillmError, match="gptq_v2"):
        to_tensors(qt, "gptq")


# ------------------------------------------------------------------------------------------------
# The reference packers, as their projects write them (loops over columns and bit positions)
# ------------------------------------------------------------------------------------------------

def autogptq_pack_qweight(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's QuantLinear.pack loop: intweight [K, N] -> qweight [K * bits / 32, N]."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # bits == 3: 32 values in 3 words
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_qweight_equals_autogptq_packing(bits):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(32, 128)).astype(np.float32)  # AutoGPTQ's loops need N, K % 32 == 0
    qt = quantize_rtn(w, QuantSpec(bits, "group", 32))
    qt.zeros[qt.zeros == 0] = 1
    t = to_tensors(qt, "gptq")
    assert np.array_equal(t["qweight"].view(np.uint32), autogptq_pack_qweight(qt.codes.T, bits))
    # qzeros: AutoGPTQ packs (zero - 1) along N with the same loop on the transposed matrix.
    assert np.array_equal(t["qzeros"].view(np.uint32),
                          autogptq_pack_qweight((qt.zeros.astype(np.int64) - 1).astype(np.uint32), bits).T)
    # Sizes as vLLM expects them when N is only a multiple of 32 / bits: N * bits / 32 words.
    small = quantize_rtn(rng.normal(size=(24, 64)).astype(np.float32), QuantSpec(4, "group", 32))
    small.zeros[small.zeros == 0] = 1
    assert to_tensors(small, "gptq")["qzeros"].shape == (2, 3)


def test_gptq_fixture_bytes_from_the_documented_layout():
    """Codes 0..7 down the first 8 input rows of output 0 make the word 0x76543210; the v1 zero
    point 8 is stored as 7 in every nibble."""
    codes = np.zeros((8, 32), dtype=np.uint8)
    codes[0, :8] = np.arange(8)
    spec = QuantSpec(4, "group", 32, sym=True)
    qt = minillm.quant.QuantizedTensor(codes, np.ones((8, 1), np.float32), np.full((8, 1), 8, np.uint8), spec)
    t = to_tensors(qt, "gptq")
    assert t["qweight"].view(np.uint32)[0, 0] == 0x76543210 and t["qweight"].view(np.uint32)[1:, 0].sum() == 0
    assert t["qzeros"].view(np.uint32)[0, 0] == 0x77777777


def test_awq_qweight_equals_autoawq_packing():
    rng = np.random.default_rng(1)
    intweight = rng.integers(0, 16, size=(32, 24)).astype(np.uint32)  # [K, N]
    expected = np.zeros((32, 3), dtype=np.uint32)
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's pack: column col*8 + order_map[i] -> nibble i
    for col in range(3):
        for i in range(8):
            expected[:, col] |= intweight[:, col * 8 + order_map[i]] << (i * 4)
    assert np.array_equal(awq_pack(intweight), expected)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_compressed_tensors_packing_equals_the_library(bits):
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    qt = quantize_rtn(np.random.default_rng(bits).normal(size=(16, 100)).astype(np.float32), QuantSpec(bits, "group", 32))
    t = to_tensors(qt, "compressed-tensors")
    signed = torch.from_numpy(qt.codes.astype(np.int16) - (1 << (bits - 1))).to(torch.int8)
    assert np.array_equal(t["weight_packed"], pack_to_int32(signed, bits).numpy())
    zp_signed = torch.from_numpy(qt.zeros.astype(np.int16) - (1 << (bits - 1))).to(torch.int8)
    assert np.array_equal(t["weight_zero_point"], pack_to_int32(zp_signed, bits, packed_dim=0).numpy())


# ------------------------------------------------------------------------------------------------
# Whole checkpoints against transformers + compressed-tensors
# ------------------------------------------------------------------------------------------------

def _hf_compressed(path):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()


TOKENS = np.random.default_rng(7).integers(0, 128, size=20)


@pytest.mark.parametrize("bits, group, sym, scale_dtype", [
    (4, 32, False, "float32"), (4, 64, True, "float32"), (8, 0, True, "float32"), (3, 32, False, "float32"),
    (4, 32, False, "float16"),
])
def test_minillm_compressed_tensors_checkpoint_loads_in_transformers(tmp_path, bits, group, sym, scale_dtype):
    src = save_tiny(make_tiny_model("llama", intermediate_size=128), tmp_path / "float")
    m = minillm.load(src, progress=False)
    spec = QuantSpec(bits, "group" if group else "channel", group or 64, sym, scale_dtype)
    weights = quantize_weights(m, spec, progress=False)
    ours = minillm.Model(m.config, weights)
    out = save_quantized(tmp_path / "ct", m, weights, spec, fmt="compressed-tensors")
    hf = _hf_compressed(out)
    # compressed-tensors multiplies in the scales' dtype: exact with float32 scales, and within one
    # float16 rounding of s * (q - z) (relative 2^-11) with float16 scales.
    tol = 0.0 if scale_dtype == "float32" else 2.0**-11
    for i, blk in enumerate(ours.blocks):
        theirs = hf.model.layers[i].mlp.down_proj.weight.detach().numpy()
        assert np.all(np.abs(theirs - blk.down.weight) <= tol * np.abs(blk.down.weight))
    # Weights off by up to 2^-11 relative move the logits of this 2-layer model by a few times that.
    assert_logits_close(ours(TOKENS), hf_logits(hf, TOKENS), rel=1e-5 if tol == 0 else 8 * tol)
    assert_logits_close(minillm.load(out, progress=False)(TOKENS), ours(TOKENS), rel=1e-6)


@pytest.mark.parametrize("name", ["llmc-w4-g32-asym", "llmc-w4-g32-sym", "llmc-w8-channel-sym"])
def test_llm_compressor_checkpoint_loads_in_minillm(name):
    """Checkpoints written by llm-compressor 0.14 (tests/fixtures/make_llmcompressor_fixture.py)."""
    path = FIXTURES / name
    ours = minillm.load(path, progress=False)
    hf = _hf_compressed(path)
    for i, blk in enumerate(ours.model.blocks):
        for ours_lin, theirs in [(blk.q, hf.model.layers[i].self_attn.q_proj), (blk.up, hf.model.layers[i].mlp.up_proj)]:
            assert np.array_equal(ours_lin.weight, theirs.weight.detach().numpy())
    assert_logits_close(ours(TOKENS), hf_logits(hf, TOKENS), rel=1e-5)


@pytest.mark.parametrize("fmt", ["minillm", "gptq", "gptq_v2", "awq"])
def test_saved_checkpoints_reload_to_the_same_model(tmp_path, fmt):
    src = save_tiny(make_tiny_model("qwen2", intermediate_size=128), tmp_path / "float")  # with q/k/v biases
    m = minillm.load(src, progress=False)
    spec = QuantSpec(4, "group", 32, sym=False)
    weights = quantize_weights(m, spec, progress=False)
    for w in weights.values():
        if hasattr(w, "zeros"):
            w.zeros[w.zeros == 0] = 1  # keep GPTQ v1 storable
    out = save_quantized(tmp_path / fmt, m, weights, spec, fmt=fmt)
    reloaded = minillm.load(out, progress=False)
    assert_logits_close(reloaded(TOKENS), minillm.Model(m.config, weights)(TOKENS), rel=1e-6)
