"""Attention (Vaswani et al. 2017, eq. 1) with grouped key/value heads (Ainslie et al. 2023).

One formula, shared by the model and the KV caches (a cache decides which stored keys and values
each query reads; this computes the attention over them).
"""

from __future__ import annotations

import math

import numpy as np


def attention(xp, q, k, v, start: int, window, quantized=None):
    """Causal softmax(q k^T / sqrt(hd)) v, where the query at position p sees keys j <= p
    (and j > p - window for a sliding window).

    q: [B, H, T, hd] at positions start..start+T-1;  k, v: [B, KV, S, hd] at positions 0..S-1.
    -> [B, H, T, hd]

    `quantized` = (k_q, v_q, use_q [T, S] bool) makes query t read key/value j from (k_q, v_q)
    where use_q[t, j] and from (k, v) elsewhere: a cache that quantizes blocks of tokens gives each
    query exactly the mix it would see when decoding (kvcache.Int4KVCache.attend).
    """
    b, h, t, hd = q.shape
    kv, s = k.shape[1], k.shape[2]
    g = h // kv
    # Query heads j*G .. j*G+G-1 share key/value head j: fold them into the rows of one matmul.
    qg = q.reshape(b, kv, g * t, hd)
    scores = (qg @ k.swapaxes(-1, -2)) * (1.0 / math.sqrt(hd))  # [B, KV, G*T, S]
    if quantized is not None:
        k_q, v_q, use_q = quantized
        use = xp.asarray(np.tile(use_q, (g, 1)))  # rows ordered (g, t) like qg
        scores = xp.where(use, (qg @ k_q.swapaxes(-1, -2)) * (1.0 / math.sqrt(hd)), scores)
    q_pos = start + np.arange(t)
    k_pos = np.arange(s)
    hidden = k_pos[None, :] > q_pos[:, None]  # [T, S] future keys
    if window is not None:
        hidden |= k_pos[None, :] <= q_pos[:, None] - window
    if hidden.any():
        mask = xp.asarray(np.tile(hidden, (g, 1)))  # rows ordered (g, t) like qg
        scores = xp.where(mask, -xp.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = xp.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    if quantized is None:
        out = p @ v  # [B, KV, G*T, S] @ [B, KV, S, hd] -> [B, KV, G*T, hd]
    else:
        out = xp.where(use, p, 0) @ v_q + xp.where(use, 0, p) @ v
    return out.reshape(b, h, t, hd)


