"""Acceptance (issue 3, points 2 and 5): greedy generation on SmolLM2-135M-Instruct gives the same
tokens as transformers' greedy `generate`; the default model knows the capital of France."""

import numpy as np
import pytest

import minillm

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three fruits that are red.",
    "How do I reverse a list in Python?",
]


@pytest.fixture(scope="module")
def both(smollm2_gguf):
    import torch
    from transformers import AutoModelForCausalLM

    ours = minillm.load(smollm2_gguf, progress=False)
    ref = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                               dtype=torch.float32).eval()
    return ours, ref


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_transformers(both, prompt):
    import torch

    ours, ref = both
    ids = ours.tokenizer.encode_chat([{"role": "user", "content": prompt}])
    pieces = list(ours.stream(ids, temperature=0.0, max_new_tokens=64))
    mine = pieces[-1].tokens
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                           eos_token_id=list(ours.tokenizer.eos_ids), pad_token_id=0)
    theirs = out[0, len(ids):].tolist()
    assert mine == theirs


def test_default_model_answers_paris(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path))  # exercise the first-use conversion too
    m = minillm.load(progress=False)
    assert (next(tmp_path.iterdir()) / "model.safetensors").exists()
    reply = "".join(m.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0))
    assert "Paris" in reply
    # The converted directory gives the same logits as the GGUF it came from.
    from conftest import smollm2_gguf_path

    direct = minillm.load(smollm2_gguf_path(), progress=False)
    toks = np.arange(100, 140)
    np.testing.assert_array_equal(m(toks), direct(toks))
