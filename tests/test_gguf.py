"""GGUF import (issue 2): block formulas, the Q/K permutation, a whole tiny file, and the default model.

Independent references: gguf-py's own dequantizer for the block formats, the rotary-embedding math
for the permutation, transformers for logits, and transformers' GGUF loader for SmolLM2 perplexity.
"""

import numpy as np
import pytest
from conftest import assert_logits_close, hf_logits, make_tiny_model
from gguf import GGMLQuantizationType, GGUFWriter, quants
from hypothesis import given, settings
from hypothesis import strategies as st

import minillm
from minillm.evaluate import evaluation_text, perplexity
from minillm.loading.gguf_dequant import DEQUANTIZERS
from minillm.loading.gguf_import import unpermute_rows
from minillm.model import apply_rope

# (bytes per block, byte offsets of the float16 fields in each block)
BLOCKS = {"Q8_0": (34, [0]), "Q4_0": (18, [0]), "Q4_1": (20, [0, 2]), "Q4_K": (144, [0, 2]), "Q6_K": (210, [208])}


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(sorted(BLOCKS)), rows=st.integers(1, 4), nblocks=st.integers(1, 3),
       seed=st.integers(0, 2**32 - 1))
def test_block_dequantization_matches_gguf_py(kind, rows, nblocks, seed):
    """Random bytes are valid blocks once their float16 scale fields hold finite numbers."""
    size, f16_fields = BLOCKS[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, nblocks, size), dtype=np.uint8)
    for off in f16_fields:
        scales = rng.uniform(-2, 2, size=(rows, nblocks)).astype(np.float16)
        raw[..., off : off + 2] = scales.view(np.uint8).reshape(rows, nblocks, 2)
    raw = raw.reshape(rows, -1)
    ours = DEQUANTIZERS[kind](raw)
    ref = quants.dequantize(raw, getattr(GGMLQuantizationType, kind))
    np.testing.assert_array_equal(ours, ref)


def llamacpp_permute(w, n_heads):
    """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute), as the file was made."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_adjacent_pairs(x, cos, sin):
    """llama.cpp's "normal" rotary: rotate pairs (2i, 2i+1).  x: [heads, T, hd]"""
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
    return out


@settings(max_examples=20, deadline=None)
@given(heads=st.integers(1, 4), half=st.integers(1, 8), seed=st.integers(0, 1000))
def test_unpermute_makes_rotate_half_equal_llamacpp_rope(heads, half, seed):
    """Rotating adjacent pairs of the permuted projection equals rotating (i, i+d/2) pairs of the
    un-permuted one, then permuting: so the un-permuted weights are the Hugging Face weights."""
    rng = np.random.default_rng(seed)
    hd, k, t = 2 * half, 5, 3
    w_hf = rng.normal(size=(heads * hd, k))
    x = rng.normal(size=(t, k))
    angles = rng.uniform(0, 6, size=(t, half))
    cos, sin = np.cos(angles), np.sin(angles)
    w_file = llamacpp_permute(w_hf, heads)
    np.testing.assert_array_equal(unpermute_rows(w_file, heads), w_hf)
    q_file = (x @ w_file.T).reshape(t, heads, hd).transpose(1, 0, 2)
    q_hf = (x @ w_hf.T).reshape(t, heads, hd).transpose(1, 0, 2)
    lhs = rope_adjacent_pairs(q_file, cos, sin)
    rhs = apply_rope(np, q_hf[None], cos, sin, hd)[0]
    np.testing.assert_allclose(unpermute_rows(lhs.transpose(1, 0, 2).reshape(t, -1).T, heads).T,
                               rhs.transpose(1, 0, 2).reshape(t, -1), atol=1e-12)


GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def write_tiny_gguf(hf, path, kinds):
    """Write a transformers llama model as llama.cpp's converter would (names, permutation,
    metadata), storing tensor `i` in kinds[i % len(kinds)]. Returns the state dict as stored
    (quantized tensors replaced by their dequantized values), for the reference model."""
    cfg = hf.config
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    stored = {}
    for i, (name, p) in enumerate(hf.state_dict().items()):
        w = p.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module, leaf = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{GGUF_NAMES[module]}.{leaf}"
        file_w = w
        if name.endswith("q_proj.weight"):
            file_w = llamacpp_permute(w, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            file_w = llamacpp_permute(w, cfg.num_key_value_heads)
        kind = kinds[i % len(kinds)] if w.ndim == 2 else "F32"
        if kind == "F32":
            writer.add_tensor(gname, file_w)
        elif kind == "F16":
            writer.add_tensor(gname, file_w.astype(np.float16))
            w = w.astype(np.float16).astype(np.float32)
        else:
            qtype = getattr(GGMLQuantizationType, kind)
            packed = quants.quantize(file_w, qtype)
            writer.add_tensor(gname, packed, raw_dtype=qtype)
            deq = quants.dequantize(packed, qtype).reshape(file_w.shape)
            if name.endswith("q_proj.weight"):
                deq = unpermute_rows(deq, cfg.num_attention_heads)
            elif name.endswith("k_proj.weight"):
                deq = unpermute_rows(deq, cfg.num_key_value_heads)
            w = deq
        stored[name] = w
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@pytest.mark.parametrize("kinds", [["F32"], ["F16", "Q8_0", "Q4_0", "Q4_1"]])
def test_tiny_gguf_matches_transformers(kinds, tmp_path):
    import torch

    hf = make_tiny_model("llama", hidden_size=64, intermediate_size=128)  # rows are whole 32-blocks
    stored = write_tiny_gguf(hf, tmp_path / "tiny.gguf", kinds)
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in stored.items()})
    ours = minillm.load(tmp_path / "tiny.gguf", progress=False)
    tokens = np.random.default_rng(3).integers(0, 128, size=17)
    assert_logits_close(ours(tokens), hf_logits(hf, tokens))


def _perplexity_pair(path, count):
    import torch
    from transformers import AutoModelForCausalLM

    ours = minillm.load(path, progress=False)
    ids = ours.encode(evaluation_text())
    ppl_ours = perplexity(ours, ids, window=512, count=count, progress=False)
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ppl_ref = perplexity(lambda w: hf_logits(ref, w), ids, window=512, count=count, progress=False)
    print(f"\nSmolLM2-135M-Instruct GGUF, {count} windows of 512: minillm {ppl_ours:.4f}, "
          f"transformers {ppl_ref:.4f}, ratio {ppl_ours / ppl_ref:.6f}")
    return ppl_ours, ppl_ref


def test_smollm2_perplexity_matches_transformers_fast(smollm2_gguf):
    ours, ref = _perplexity_pair(smollm2_gguf, count=2)
    assert abs(ours / ref - 1) <= 0.005


@pytest.mark.slow
def test_smollm2_perplexity_matches_transformers_40_windows(smollm2_gguf):
    """Acceptance (issue 2, point 3), in full: the first 40 windows of 512 tokens."""
    ours, ref = _perplexity_pair(smollm2_gguf, count=40)
    assert abs(ours / ref - 1) <= 0.005
