"""Perplexity on held-out text (more metrics arrive with the quantization work).

The offline text (design.md): CPython's pydoc_data topics, sorted by key, joined by blank lines.
The first 200,000 characters are the evaluation text; calibration uses the characters after them,
so the two never overlap.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from .errors import MinillmError

EVAL_CHARS = 200_000


def _topics_text() -> str:
    from pydoc_data.topics import topics  # noqa: PLC0415 - part of CPython's standard library

    return "\n\n".join(topics[k] for k in sorted(topics))


def evaluation_text() -> str:
    return _topics_text()[:EVAL_CHARS]


def calibration_text() -> str:
    return _topics_text()[EVAL_CHARS:]


def windows(ids, window: int, count: int) -> np.ndarray:
    """The first `count` non-overlapping windows of `window` tokens.  -> [count, window]"""
    ids = np.asarray(ids)
    if len(ids) < window * count:
        raise MinillmError(f"the text has {len(ids)} tokens, fewer than {count} windows of {window}")
    return ids[: window * count].reshape(count, window)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def window_nll(model, window_ids) -> np.ndarray:
    """Negative log-likelihood of tokens 1..n-1 of one window given the ones before.  -> [n-1]"""
    logp = log_softmax(np.asarray(model(window_ids), dtype=np.float64))  # [n, V]
    return -logp[np.arange(len(window_ids) - 1), window_ids[1:]]


def perplexity(model, ids, window: int = 512, count: int = 40, progress: bool = True) -> float:
    """exp(mean NLL) over `count` windows of `window` tokens, no BOS, each window on its own."""
    nll = [window_nll(model, w) for w in tqdm(windows(ids, window, count), desc="perplexity",
                                               unit="window", disable=not progress, leave=False)]
    return float(np.exp(np.mean(np.concatenate(nll))))


def compare(model, reference, ids, window: int = 512, count: int = 40, progress: bool = True) -> dict:
    """Perplexity of `model`, and against `reference` on the same windows: the reference's perplexity,
    the mean KL(reference || model) of next-token distributions, and top-1 agreement."""
    nll, ref_nll, kl, agree = [], [], [], []
    for w in tqdm(windows(ids, window, count), desc="evaluating", unit="window", disable=not progress, leave=False):
        lp = log_softmax(np.asarray(model(w), dtype=np.float64))[:-1]  # [n-1, V]: predictions 1..n-1
        lq = log_softmax(np.asarray(reference(w), dtype=np.float64))[:-1]
        targets = w[1:]
        rows = np.arange(len(targets))
        nll.append(-lp[rows, targets])
        ref_nll.append(-lq[rows, targets])
        kl.append((np.exp(lq) * (lq - lp)).sum(axis=-1))
        agree.append(lp.argmax(-1) == lq.argmax(-1))
    return {
        "perplexity": float(np.exp(np.mean(np.concatenate(nll)))),
        "reference_perplexity": float(np.exp(np.mean(np.concatenate(ref_nll)))),
        "kl_divergence": float(np.mean(np.concatenate(kl))),
        "top1_agreement": float(np.mean(np.concatenate(agree))),
        "windows": count,
        "window_size": window,
    }
