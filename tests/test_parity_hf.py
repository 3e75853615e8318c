"""Acceptance (issue 2, point 1): logits equal transformers' for a tiny random checkpoint of every
supported architecture and rotary variant, saved by transformers and loaded by minillm."""

import numpy as np
import pytest
from conftest import ARCH_CASES, assert_logits_close, hf_logits, make_tiny_model, save_tiny

import minillm

# 24 tokens: longer than mistral's window (7), the dynamic-NTK case's trained context (16) and the
# llama3 case's original context (8), so each of those code paths is taken.
TOKENS = np.random.default_rng(1234).integers(0, 128, size=24)


@pytest.mark.parametrize("case", sorted(ARCH_CASES))
def test_logits_match_transformers(case, tmp_path):
    model_type, overrides = ARCH_CASES[case]
    hf = make_tiny_model(model_type, **overrides)
    ours = minillm.load(save_tiny(hf, tmp_path / case), progress=False)
    assert ours.config.architecture == model_type
    assert_logits_close(ours(TOKENS), hf_logits(hf, TOKENS))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints(dtype, tmp_path):
    """BF16/F16 files: minillm widens to float32 exactly as torch does, so logits match transformers
    loading the same file in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    d = save_tiny(make_tiny_model("llama"), tmp_path / dtype, dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ours = minillm.load(d, progress=False)
    assert set(ours.checkpoint.source_dtypes) == {{"bfloat16": "BF16", "float16": "F16"}[dtype]}
    assert_logits_close(ours(TOKENS), hf_logits(ref, TOKENS))


def test_sharded_checkpoint(tmp_path):
    hf = make_tiny_model("qwen3", head_dim=24)
    d = save_tiny(hf, tmp_path / "sharded", max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").exists() and len(list(d.glob("*.safetensors"))) > 1
    assert_logits_close(minillm.load(d, progress=False)(TOKENS), hf_logits(hf, TOKENS))


def test_batched_forward_equals_rows(tmp_path):
    hf = make_tiny_model("llama")
    m = minillm.load(save_tiny(hf, tmp_path / "b"), progress=False)
    batch = np.random.default_rng(5).integers(0, 128, size=(3, 11))
    out = m(batch)
    for row in range(3):
        assert_logits_close(out[row], hf_logits(hf, batch[row]))
