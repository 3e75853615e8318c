"""Acceptance (issue 2, point 2): decoding with the KV cache equals one full forward.

For random models (shapes and architecture switches drawn by hypothesis) and random lengths, the
logits of token t computed after a prefill and t-1 decode steps equal row t of the full-sequence
logits. Both run in float32 through different matmul shapes, so they agree to rounding (~1e-6
relative); the bound 1e-4 relative to max |logit| leaves room for that and nothing else.
"""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.config import ModelConfig, RopeConfig
from minillm.errors import MinillmError
from minillm.loading.names import expected_shapes
from minillm.model import Model


@st.composite
def random_models(draw):
    kv = draw(st.integers(1, 3))
    heads = kv * draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([8, 16]))
    cfg = ModelConfig(
        architecture="llama",
        vocab_size=draw(st.integers(16, 64)),
        hidden_size=draw(st.sampled_from([16, 32, 48])),
        intermediate_size=draw(st.integers(8, 64)),
        num_layers=draw(st.integers(1, 3)),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
        rope=RopeConfig(theta=draw(st.sampled_from([100.0, 10000.0])),
                        partial_rotary_factor=draw(st.sampled_from([1.0, 0.5]))),
        activation=draw(st.sampled_from(["silu", "gelu_tanh"])),
        attention_bias=draw(st.booleans()),
        qk_norm=draw(st.booleans()),
        norm_offset=draw(st.sampled_from([0.0, 1.0])),
        tie_word_embeddings=draw(st.booleans()),
        sliding_windows=(draw(st.sampled_from([None, 3, 6])),) * 3,
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weights = {name: rng.normal(0, 0.3, size=shape).astype(np.float32)
               for name, shape in expected_shapes(cfg).items()}
    return Model(cfg, weights)


@settings(max_examples=25, deadline=None)
@given(model=random_models(), length=st.integers(2, 20), data=st.data())
def test_kv_cache_decoding_equals_full_forward(model, length, data):
    rng = np.random.default_rng(length)
    tokens = rng.integers(0, model.config.vocab_size, size=length)
    full = model(tokens)  # [T, V]
    prefill = data.draw(st.integers(1, length), label="prefill length")
    cache = model.new_cache()
    steps = [model(tokens[:prefill], cache)]
    for t in range(prefill, length):
        steps.append(model(tokens[t : t + 1], cache))
    incremental = np.concatenate(steps, axis=0)
    assert cache.length == length
    scale = np.abs(full).max()
    assert np.abs(incremental - full).max() <= 1e-4 * scale


def test_context_overflow_is_a_clear_error():
    cfg = ModelConfig(architecture="llama", vocab_size=16, hidden_size=16, intermediate_size=16, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=8)
    rng = np.random.default_rng(0)
    model = Model(cfg, {n: rng.normal(size=s).astype(np.float32) for n, s in expected_shapes(cfg).items()})
    cache = model.new_cache()
    model(np.arange(6), cache)
    try:
        model(np.arange(3), cache)
    except MinillmError as exc:
        assert "context" in str(exc)
    else:
        raise AssertionError("a context overflow went unnoticed")
