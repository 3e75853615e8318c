"""llama.cpp's block formats, dequantized in NumPy.

Each GGUF tensor row is a run of fixed-size blocks. Within a block the weights share a scale `d`
(and for the "_1" / K formats a minimum `m`), stored as float16. Formulas follow ggml-quants.c
(dequantize_row_*). Shapes: `raw` is uint8 [rows, row_bytes]; the result is float32 [rows, cols].

Q8_0   34 bytes / 32 weights   [d: f16][q: 32 x int8]                 w = d * q
Q4_0   18 bytes / 32 weights   [d: f16][qs: 16 bytes]                 w = d * (nibble - 8)
Q4_1   20 bytes / 32 weights   [d: f16][m: f16][qs: 16 bytes]         w = d * nibble + m
         nibble order (Q4_0, Q4_1): byte j holds weight j in its low nibble and weight j+16 in its high
Q4_K  144 bytes / 256 weights  [d: f16][dmin: f16][scales: 12 bytes][qs: 128 bytes]
         8 sub-blocks of 32, each with a 6-bit scale sc and 6-bit min mn packed in `scales`:
         w = d * sc * nibble - dmin * mn; bytes qs[32c:32c+32] hold sub-block 2c (low nibbles) and
         sub-block 2c+1 (high nibbles)
Q6_K  210 bytes / 256 weights  [ql: 128][qh: 64][scales: 16 x int8][d: f16]
         6-bit q = 4 low bits from ql | 2 high bits from qh, w = d * scale[16-weight group] * (q - 32)
"""

from __future__ import annotations

import numpy as np

from ..errors import MinillmError


def _f16(raw: np.ndarray, start: int) -> np.ndarray:
    """The float16 stored at byte `start` of each block, as float32 of shape [..., 1]."""
    return raw[..., start : start + 2].copy().view(np.float16).astype(np.float32)


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    rows, row_bytes = raw.shape
    if row_bytes % block_bytes:
        raise MinillmError(f"GGUF tensor rows of {row_bytes} bytes are not whole blocks of {block_bytes}")
    return raw.reshape(rows, row_bytes // block_bytes, block_bytes)


def dequant_q8_0(raw):
    b = _blocks(raw, 34)
    q = b[..., 2:].view(np.int8).astype(np.float32)  # [rows, nblocks, 32]
    return (_f16(b, 0) * q).reshape(raw.shape[0], -1)


def _nibbles_32(qs):
    """16 bytes -> 32 values: low nibbles are weights 0..15, high nibbles weights 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)


def dequant_q4_0(raw):
    b = _blocks(raw, 18)
    return (_f16(b, 0) * (_nibbles_32(b[..., 2:]) - 8.0)).reshape(raw.shape[0], -1)


def dequant_q4_1(raw):
    b = _blocks(raw, 20)
    return (_f16(b, 0) * _nibbles_32(b[..., 4:]) + _f16(b, 2)).reshape(raw.shape[0], -1)


def _k4_scales_mins(s):
    """Unpack the 12 `scales` bytes of a Q4_K block into 8 six-bit scales and 8 six-bit mins.

    Sub-blocks 0..3: scale = s[j] & 63, min = s[j+4] & 63.
    Sub-blocks 4..7: the low 4 bits sit in s[j+4] (scale: low nibble, min: high nibble) and the top
    2 bits in the spare top bits of s[j-4] (scale) and s[j] (min)  (ggml's get_scale_min_k4).
    """
    s = s.astype(np.uint8)
    lo_sc, lo_mn = s[..., 0:4] & 63, s[..., 4:8] & 63
    hi_sc = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    hi_mn = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    sc = np.concatenate([lo_sc, hi_sc], axis=-1).astype(np.float32)
    mn = np.concatenate([lo_mn, hi_mn], axis=-1).astype(np.float32)
    return sc, mn  # [..., 8] each


def dequant_q4_k(raw):
    b = _blocks(raw, 144)
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k4_scales_mins(b[..., 4:16])
    qs = b[..., 16:].reshape(*b.shape[:2], 4, 32)  # four 32-byte chunks, each holds two sub-blocks
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(*b.shape[:2], 8, 32).astype(np.float32)
    w = (d * sc)[..., None] * q - (dmin * mn)[..., None]
    return w.reshape(raw.shape[0], -1)


def dequant_q6_k(raw):
    b = _blocks(raw, 210)
    ql, qh = b[..., 0:128], b[..., 128:192]
    scales = b[..., 192:208].view(np.int8).astype(np.float32)  # [rows, nb, 16]
    d = _f16(b, 208)
    out = []
    for half in range(2):  # each half of the block: 128 weights from 64 ql bytes and 32 qh bytes
        l, h = ql[..., 64 * half : 64 * half + 64], qh[..., 32 * half : 32 * half + 32]
        q1 = (l[..., :32] & 0x0F) | (((h >> 0) & 3) << 4)
        q2 = (l[..., 32:] & 0x0F) | (((h >> 2) & 3) << 4)
        q3 = (l[..., :32] >> 4) | (((h >> 4) & 3) << 4)
        q4 = (l[..., 32:] >> 4) | (((h >> 6) & 3) << 4)
        out += [q1, q2, q3, q4]
    q = np.stack(out, axis=2).astype(np.float32) - 32.0  # [rows, nb, 8, 32]: 8 runs of 32 weights
    # Each run of 32 has two 16-weight groups, each with its own int8 scale (16 scales per block).
    sc = scales.reshape(*b.shape[:2], 8, 2)
    w = d[..., None, None] * sc[..., None] * q.reshape(*b.shape[:2], 8, 2, 16)
    return w.reshape(raw.shape[0], -1)


DEQUANTIZERS = {
    "Q8_0": dequant_q8_0,
    "Q4_0": dequant_q4_0,
    "Q4_1": dequant_q4_1,
    "Q4_K": dequant_q4_k,
    "Q6_K": dequant_q6_k,
}
