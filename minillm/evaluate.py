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


def compare_many(reference, models: dict, ids, window: int = 512, count: int = 40, progress: bool = True,
                 before_each=None) -> dict:
    """Score every model in `models` (name -> callable: tokens -> logits) against `reference` on the
    same windows, computing the reference's logits once per window. -> {"reference": {...}, name: {...}}
    with perplexity, mean KL(reference || model) per token, and top-1 agreement.
    `before_each(name)` runs before each model's forward (e.g. to switch a cache type)."""
    acc = {name: {"nll": [], "kl": [], "agree": []} for name in ["reference", *models]}
    for w in tqdm(windows(ids, window, count), desc="evaluating", unit="window", disable=not progress, leave=False):
        targets, rows = w[1:], np.arange(len(w) - 1)
        if before_each:
            before_each("reference")
        ref = log_softmax(np.asarray(reference(w), dtype=np.float64))[:-1]  # predictions 1..n-1
        acc["reference"]["nll"].append(-ref[rows, targets])
        p_ref = np.exp(ref)
        for name, model in models.items():
            if before_each:
                before_each(name)
            lp = log_softmax(np.asarray(model(w), dtype=np.float64))[:-1]
            acc[name]["nll"].append(-lp[rows, targets])
            acc[name]["kl"].append((p_ref * (ref - lp)).sum(axis=-1))
            acc[name]["agree"].append(lp.argmax(-1) == ref.argmax(-1))
    out = {}
    for name, a in acc.items():
        out[name] = {"perplexity": float(np.exp(np.mean(np.concatenate(a["nll"]))))}
        if name != "reference":
            out[name]["kl_divergence"] = float(np.mean(np.concatenate(a["kl"])))
            out[name]["top1_agreement"] = float(np.mean(np.concatenate(a["agree"])))
    return out


def compare(model, reference, ids, window: int = 512, count: int = 40, progress: bool = True) -> dict:
    """Perplexity of `model`, and against `reference` on the same windows: the reference's perplexity,
    the mean KL(reference || model) of next-token distributions, and top-1 agreement."""
    r = compare_many(reference, {"model": model}, ids, window, count, progress)
    return {**r["model"], "reference_perplexity": r["reference"]["perplexity"], "windows": count,
            "window_size": window}
