"""Acceptance (issue 3, point 3): properties of the samplers, the incremental detokenizer and
stop strings, drawn by hypothesis."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from minillm.errors import MinillmError
from minillm.generate import (IncrementalDecoder, SamplingParams, StopStringFilter, min_p_mask,
                              next_token_distribution, sample_token, stream_generate, top_k_mask, top_p_mask)
from minillm.loading.gguf_import import open_gguf
from minillm.tokenizer import load_tokenizer

probs_strategy = st.lists(st.floats(1e-6, 1.0), min_size=2, max_size=60).map(
    lambda xs: np.array(xs) / np.sum(xs))


@given(probs=probs_strategy, data=st.data())
def test_top_k_keeps_exactly_k_most_likely(probs, data):
    k = data.draw(st.integers(1, probs.size))
    keep = top_k_mask(probs, k)
    kth = np.sort(probs)[::-1][k - 1]  # the k-th largest probability
    # Exactly the k largest, plus any others tied with the k-th (ties aside, exactly k).
    assert keep.sum() == np.sum(probs > kth) + np.sum(probs == kth)
    assert np.sum(probs > kth) < k <= keep.sum()
    assert probs[keep].min() >= probs[~keep].max(initial=0)


@given(probs=probs_strategy, p=st.floats(0.01, 1.0))
def test_top_p_keeps_smallest_set_reaching_p(probs, p):
    keep = top_p_mask(probs, p)
    mass = probs[keep].sum()
    assert mass >= p - 1e-12  # reaches p
    assert probs[keep].min() >= probs[~keep].max(initial=0)  # made of the most likely tokens
    smaller = mass - probs[keep].min()  # dropping any kept token (the least likely) falls short
    assert smaller < p + 1e-12


@given(probs=probs_strategy, min_p=st.floats(0.0, 1.0))
def test_min_p_drops_exactly_tokens_below_threshold(probs, min_p):
    keep = min_p_mask(probs, min_p)
    threshold = min_p * probs.max()
    assert np.all(probs[keep] >= threshold) and np.all(probs[~keep] < threshold)
    assert keep[np.argmax(probs)]


@settings(max_examples=50)
@given(logits=st.lists(st.floats(-10, 10), min_size=2, max_size=40), temperature=st.floats(0.1, 3.0),
       top_k=st.integers(0, 10), top_p=st.floats(0.05, 1.0), min_p=st.floats(0, 0.5), seed=st.integers(0, 2**31))
def test_samples_fall_in_the_filtered_set_and_seed_reproduces(logits, temperature, top_k, top_p, min_p, seed):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p).validate()
    logits = np.array(logits)
    dist = next_token_distribution(logits, params)
    assert abs(dist.sum() - 1) < 1e-9
    draws_a = [sample_token(logits, params, np.random.default_rng(seed + i)) for i in range(20)]
    draws_b = [sample_token(logits, params, np.random.default_rng(seed + i)) for i in range(20)]
    assert draws_a == draws_b
    assert all(dist[t] > 0 for t in draws_a)


def test_sampling_frequencies_follow_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(temperature=1.0).validate()
    rng = np.random.default_rng(0)
    counts = np.bincount([sample_token(logits, params, rng) for _ in range(20000)], minlength=4) / 20000
    # 4 standard deviations of a binomial proportion at n = 20000 is at most 0.0142.
    assert np.abs(counts - [0.5, 0.3, 0.15, 0.05]).max() < 0.0142


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.01), dict(top_k=-1),
                                 dict(min_p=1.5), dict(repetition_penalty=0), dict(max_new_tokens=0)])
def test_out_of_range_flags_are_clear_errors(bad):
    with pytest.raises(MinillmError):
        SamplingParams(**bad).validate()


# ------------------------------------------------------------------------------------------------
# Detokenization and stop strings, on SmolLM2's byte-level tokenizer
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    return load_tokenizer(smollm2_gguf, open_gguf(smollm2_gguf))


TEXT = st.text(alphabet=st.sampled_from(list("ab é東京🙂\n.,'") + ["ü", "ß", "€", "𝔘"]), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(text=TEXT)
def test_incremental_decoding_of_valid_text_never_breaks_a_character(tok, text):
    ids = tok.encode_plain(text)
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, 49151), min_size=1, max_size=30))
def test_incremental_decoding_of_any_token_stream_equals_decoding_at_once(tok, ids):
    dec = IncrementalDecoder(tok)
    assert "".join([dec.push(t) for t in ids] + [dec.flush()]) == tok.decode(ids)


class ScriptedModel:
    """Emits a fixed token sequence (a one-hot logit per step), so the whole loop runs on real text."""

    class Cache:
        def __init__(self, max_len):
            self.max_len, self.length = max_len, 0

        def truncate(self, n):
            self.length = min(n, self.length)

    def __init__(self, script, vocab):
        self.script, self.vocab = list(script), vocab
        self.calls = 0

    def new_cache(self):
        return self.Cache(4096)

    def __call__(self, tokens, cache, last_only=True):
        cache.length += len(tokens)
        logits = np.full((1, self.vocab), -1e9, dtype=np.float32)
        logits[0, self.script[min(self.calls, len(self.script) - 1)]] = 0.0
        self.calls += 1
        return logits


@settings(max_examples=60, deadline=None)
@given(text=TEXT, data=st.data())
def test_stop_strings_are_never_printed(tok, text, data):
    ids = tok.encode_plain(text)
    full = tok.decode(ids)
    start = data.draw(st.integers(0, len(full) - 1))
    stop = full[start : start + data.draw(st.integers(1, 4))]
    assume(stop.strip())
    model = ScriptedModel(ids, tok.vocab_size)
    params = SamplingParams(max_new_tokens=len(ids) + 5, stop=(stop,))
    pieces = list(stream_generate(model, tok, [0], params, eos_ids=()))
    out = "".join(p.text for p in pieces)
    assert out == full[: full.find(stop)]
    assert pieces[-1].finish_reason == "stop"


@given(text=st.text(min_size=0, max_size=30), stops=st.lists(st.text(min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=6))
def test_stop_filter_on_arbitrary_splits(text, stops, cuts):
    """However the text arrives in pieces, the output is the text up to the first stop string."""
    f = StopStringFilter(stops)
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    out = ""
    for a, b in zip(bounds, bounds[1:]):
        out += f.push(text[a:b])
        if f.stopped:
            break
    out += f.flush()
    first = min([i for i in (text.find(s) for s in stops) if i >= 0], default=len(text))
    assert out == text[:first]


def test_eos_ends_generation_and_is_not_printed(tok):
    ids = tok.encode_plain("Paris is the capital.")
    model = ScriptedModel(ids + [2, 5, 6], tok.vocab_size)
    pieces = list(stream_generate(model, tok, [0], SamplingParams(max_new_tokens=50), eos_ids=(2,)))
    assert "".join(p.text for p in pieces) == "Paris is the capital."
    assert pieces[-1].finish_reason == "stop" and pieces[-1].tokens[-1] == 2


def test_seeded_generation_repeats(tok):
    from minillm.config import ModelConfig
    from minillm.loading.names import expected_shapes
    from minillm.model import Model

    cfg = ModelConfig(architecture="llama", vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=16,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, rms_norm_eps=1e-5,
                      max_position_embeddings=128)
    rng = np.random.default_rng(0)
    model = Model(cfg, {n: rng.normal(0, 1, s).astype(np.float32) for n, s in expected_shapes(cfg).items()})
    params = dict(temperature=1.0, top_p=0.95, max_new_tokens=20)

    def run(seed):
        return [p.token for p in stream_generate(model, tok, [1, 2, 3], SamplingParams(**params, seed=seed),
                                                 eos_ids=())]

    assert run(7) == run(7)
    assert run(7) != run(8)
