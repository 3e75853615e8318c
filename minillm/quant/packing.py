"""Packing b-bit codes into 32-bit words.

Every layout here (minillm's, GPTQ's, compressed-tensors') is one dense little-endian bit stream
along one axis: code i occupies bits [i*b, i*b + b) of the stream, and word j holds stream bits
[32j, 32j + 32). For b = 4 that is 8 codes per word, code 0 in the lowest nibble:

    word = c0 | c1 << 4 | c2 << 8 | ... | c7 << 28

For b = 3 codes cross word boundaries (32 codes fill 3 words exactly; code 10 has its low 2 bits at
the top of word 0 and its high bit at the bottom of word 1), which is AutoGPTQ's 3-bit layout. The
axis is padded with zero codes to a multiple of 32 codes, so a row of K codes takes
ceil(K / 32) * b words.

AutoAWQ's GEMM layout differs only in the order of the 8 nibbles inside each word (awq_pack).
"""

from __future__ import annotations

import numpy as np

_ALIGN = 32  # codes per padding unit: a whole number of words for every b


def packed_length(n: int, bits: int) -> int:
    return -(-n // _ALIGN) * bits


def pack_bits(codes: np.ndarray, bits: int, axis: int = -1) -> np.ndarray:
    """uint codes (< 2^bits) -> uint32 words, packed along `axis`."""
    c = np.moveaxis(np.asarray(codes), axis, -1).astype(np.uint32)
    lead, n = c.shape[:-1], c.shape[-1]
    pad = -n % _ALIGN
    if pad:
        c = np.concatenate([c, np.zeros((*lead, pad), dtype=np.uint32)], axis=-1)
    # The stream, one bit per entry: [..., n_padded * bits], code-major, low bit first.
    stream = ((c[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).reshape(*lead, -1, 32)
    words = (stream.astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(axis=-1).astype(np.uint32)
    return np.moveaxis(words, -1, axis)


def unpack_bits(words: np.ndarray, bits: int, n: int, axis: int = -1) -> np.ndarray:
    """uint32 words -> the first `n` uint8 codes along `axis`."""
    w = np.moveaxis(np.asarray(words).view(np.uint32) if np.asarray(words).dtype == np.int32
                    else np.asarray(words, dtype=np.uint32), axis, -1)
    lead = w.shape[:-1]
    stream = ((w[..., None] >> np.arange(32, dtype=np.uint32)) & 1).reshape(*lead, -1)
    stream = stream[..., : n * bits].reshape(*lead, n, bits)
    codes = (stream << np.arange(bits, dtype=np.uint32)).sum(axis=-1).astype(np.uint8)
    return np.moveaxis(codes, -1, axis)


# AutoAWQ GEMM: nibble slot i of each word holds column 8c + AWQ_ORDER[i] (an interleave that suits
# its CUDA kernel's dequantization), packed along the output dimension.
AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])


def awq_pack(codes: np.ndarray) -> np.ndarray:
    """[R, C] 4-bit codes, C % 8 == 0 -> [R, C / 8] uint32 in AutoAWQ's nibble order."""
    r, c = codes.shape
    grouped = codes.reshape(r, c // 8, 8)[:, :, AWQ_ORDER].astype(np.uint32)
    return (grouped << (4 * np.arange(8, dtype=np.uint32))).sum(axis=-1, dtype=np.uint64).astype(np.uint32)


def awq_unpack(words: np.ndarray, cols: int) -> np.ndarray:
    w = np.asarray(words).view(np.uint32) if np.asarray(words).dtype == np.int32 else np.asarray(words, np.uint32)
    slots = (w[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF  # [R, C/8, slot]
    out = np.empty_like(slots)
    out[..., AWQ_ORDER] = slots  # slot i holds column AWQ_ORDER[i]
    return out.reshape(w.shape[0], -1)[:, :cols].astype(np.uint8)
