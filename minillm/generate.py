"""Sampling and the token loop, as a streaming iterator.

    for piece in stream_generate(model, tokenizer, prompt_ids, SamplingParams(temperature=0.7)):
        print(piece.text, end="")

Each step: logits of the last token -> repetition penalty -> temperature -> top-k -> top-p -> min-p
-> sample (or argmax when temperature is 0). docs/generation.md gives the formulas. The REPL, the CLI
and the library all consume the same iterator (mlx-lm's `stream_generate` has the same shape).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .backend import to_numpy
from .errors import MinillmError


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    max_new_tokens: int = 256
    seed: int | None = None
    stop: tuple = ()  # stop strings

    def validate(self) -> "SamplingParams":
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (self.top_k >= 0, f"top-k must be >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top-p must lie in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min-p must lie in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition penalty must be > 0, got {self.repetition_penalty}"),
            (self.max_new_tokens >= 1, f"max new tokens must be >= 1, got {self.max_new_tokens}"),
        ]
        for ok, message in checks:
            if not ok:
                raise MinillmError(message)
        self.stop = tuple(s for s in self.stop if s)
        return self


# ------------------------------------------------------------------------------------------------
# Logit processing and sampling: each filter returns a boolean mask of the tokens it keeps
# ------------------------------------------------------------------------------------------------

def apply_repetition_penalty(logits: np.ndarray, history, penalty: float) -> np.ndarray:
    """CTRL (Keskar et al. 2019, sec. 4.1): make every token already seen less likely.
    Positive logits are divided by the penalty, negative ones multiplied (as transformers does)."""
    if penalty == 1.0 or len(history) == 0:
        return logits
    out = logits.copy()
    seen = np.unique(np.asarray(history))
    vals = out[seen]
    out[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


def top_k_mask(probs: np.ndarray, k: int) -> np.ndarray:
    """Keep the k most likely tokens (all tokens tied with the k-th are kept too)."""
    if k <= 0 or k >= probs.size:
        return np.ones(probs.size, dtype=bool)
    kth = np.partition(probs, -k)[-k]
    return probs >= kth


def top_p_mask(probs: np.ndarray, p: float) -> np.ndarray:
    """Nucleus sampling (Holtzman et al. 2020, sec. 3.1): the smallest set of most likely tokens
    whose total probability reaches p."""
    if p >= 1.0:
        return np.ones(probs.size, dtype=bool)
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    n_keep = int(np.searchsorted(cum, p * cum[-1], side="left")) + 1  # first index where cum >= p
    keep = np.zeros(probs.size, dtype=bool)
    keep[order[: min(n_keep, probs.size)]] = True
    return keep


def min_p_mask(probs: np.ndarray, min_p: float) -> np.ndarray:
    """min-p (Nguyen et al. 2024): drop tokens less likely than min_p times the most likely one."""
    if min_p <= 0:
        return np.ones(probs.size, dtype=bool)
    return probs >= min_p * probs.max()


def next_token_distribution(logits: np.ndarray, params: SamplingParams, history=()) -> np.ndarray:
    """The probabilities the next token is drawn from, after every filter. -> [V] float64"""
    logits = apply_repetition_penalty(np.asarray(logits, dtype=np.float64), history, params.repetition_penalty)
    probs = softmax(logits / params.temperature)
    keep = top_k_mask(probs, params.top_k)
    probs = np.where(keep, probs, 0.0)
    keep &= top_p_mask(probs, params.top_p)
    probs = np.where(keep, probs, 0.0)
    keep &= min_p_mask(probs, params.min_p)
    probs = np.where(keep, probs, 0.0)
    return probs / probs.sum()


def sample_token(logits, params: SamplingParams, rng: np.random.Generator, history=()) -> int:
    if params.temperature == 0:
        logits = apply_repetition_penalty(np.asarray(logits, dtype=np.float64), history, params.repetition_penalty)
        return int(np.argmax(logits))
    probs = next_token_distribution(logits, params, history)
    # Inverse-CDF draw: one uniform number per token, so a seed fixes the whole sequence.
    cum = np.cumsum(probs)
    return int(min(np.searchsorted(cum, rng.random() * cum[-1], side="right"), probs.size - 1))


# ------------------------------------------------------------------------------------------------
# Text out: incremental detokenization and stop strings
# ------------------------------------------------------------------------------------------------

class IncrementalDecoder:
    """Turns a growing token list into text pieces that never split a UTF-8 character.

    A byte-level token may end in the middle of a multi-byte character, which decodes to U+FFFD
    until the rest arrives; so text is released only when the decoding does not end in U+FFFD.
    Each step decodes a short window (from `prefix` on) rather than the whole sequence, and
    releases what the window adds beyond its already-released part `[prefix, read)` (the scheme
    vLLM uses; decoding from a token boundary keeps tokenizers that strip a leading space right).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character at the very end)."""
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return now[len(before) :]


class StopStringFilter:
    """Holds back text that might be the start of a stop string; cuts the text where one appears.

    Because any tail that could begin a stop string is held back, a stop string can only start in
    the unreleased part, so it is never printed, even when it arrives split across tokens.
    """

    def __init__(self, stops):
        self.stops = tuple(stops)
        self.text = ""
        self.released = 0
        self.stopped = False

    def push(self, piece: str) -> str:
        self.text += piece
        if not self.stops:
            return self._release(len(self.text))
        hits = [i for i in (self.text.find(s, self.released) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits))
        hold = 0
        for s in self.stops:  # longest tail of text that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(self.text) - self.released), hold, -1):
                if self.text.endswith(s[:n]):
                    hold = n
                    break
        return self._release(len(self.text) - hold)

    def flush(self) -> str:
        return "" if self.stopped else self._release(len(self.text))

    def _release(self, end: int) -> str:
        out = self.text[self.released : end]
        self.released = max(self.released, end)
        return out


# ------------------------------------------------------------------------------------------------
# The token loop
# ------------------------------------------------------------------------------------------------

@dataclass
class Piece:
    """One step of generation: new text (possibly empty) and running statistics."""

    text: str
    token: int | None
    finish_reason: str | None = None  # None while running; "stop" (EOS or stop string) or "length"
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0  # time to first token: prompt processing + first sample
    decode_tokens_per_s: float = 0.0
    tokens: list = field(default_factory=list)  # all generated ids (set on the final piece)


def stream_generate(model, tokenizer, prompt_ids, params: SamplingParams, cache=None, eos_ids=None):
    """Yield Pieces while generating from `prompt_ids`. With `cache`, continue the cached sequence
    (the cache holds a prefix of prompt_ids; the rest is fed first)."""
    params.validate()
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise MinillmError("the prompt is empty: give some text to continue")
    cache = cache if cache is not None else model.new_cache()
    context = cache.max_len
    if len(prompt_ids) >= context:
        raise MinillmError(f"the prompt has {len(prompt_ids)} tokens but the model's context holds {context}: "
                           "shorten it")
    eos = set(tokenizer.eos_ids if eos_ids is None else eos_ids)
    max_new = min(params.max_new_tokens, context - len(prompt_ids))
    rng = np.random.default_rng(params.seed)
    decoder = IncrementalDecoder(tokenizer)
    stops = StopStringFilter(params.stop)
    history = list(prompt_ids)

    t0 = time.perf_counter()
    if cache.length >= len(prompt_ids):  # all cached: recompute the last position for its logits
        cache.truncate(len(prompt_ids) - 1)
    fresh = prompt_ids[cache.length :]
    logits = to_numpy(model(np.asarray(fresh), cache, last_only=True))[-1]
    # On a GPU model, greedy and plain temperature sampling run on the device (only the token id
    # comes back each step); the other filters run here on the logits.
    on_device = (hasattr(model, "decode_stream") and params.top_k == 0 and params.top_p >= 1.0
                 and params.min_p == 0.0 and params.repetition_penalty == 1.0)
    device_seed = int(rng.integers(2**62))
    next_id = None
    generated: list[int] = []
    ttft = t_first = 0.0
    finish = None
    device_steps = None  # model.decode_stream, opened at the first step on the device
    try:
        while finish is None:
            token = next_id if next_id is not None else sample_token(logits, params, rng, history)
            now = time.perf_counter()
            if not generated:
                ttft, t_first = now - t0, now
            generated.append(token)
            history.append(token)
            text = "" if token in eos else stops.push(decoder.push(token))
            if stops.stopped:
                finish = "stop"
            elif token in eos or len(generated) >= max_new:
                finish = "stop" if token in eos else "length"
                # Release what was held back: an unfinished character, or text that only looked like
                # the start of a stop string (a stop string completed by it still cuts it).
                text += stops.push(decoder.flush())
                text += stops.flush()
            steps = len(generated) - 1
            rate = steps / (now - t_first) if steps and now > t_first else 0.0
            yield Piece(text, token, finish, len(prompt_ids), len(generated), ttft, rate,
                        generated if finish else [])
            if finish is None and on_device:
                if device_steps is None:  # each step then feeds back the token the last chose
                    device_steps = model.decode_stream([token], cache, params.temperature, device_seed)
                next_id = next(device_steps)[0]
            elif finish is None:
                logits = to_numpy(model(np.asarray([token]), cache, last_only=True))[-1]
    finally:
        if device_steps is not None:
            device_steps.close()  # waits for the step queued ahead (engine.py decode_stream)
