"""Models with random weights built directly on the GPU, in a real model's shapes: what the decode
benchmarks run (a 7B model's weights need no download to measure how fast they stream).
"""

from __future__ import annotations

import numpy as np

from ..backend import get_xp
from ..config import ModelConfig, RopeConfig
from .engine import GpuModel, Layer
from .linear import GpuLinear
from .w4a16 import W4A16Weight


def llama_config(layers=32, hidden=4096, mlp=11008, heads=32, kv_heads=32, vocab=32000) -> ModelConfig:
    """Llama-2-7B's shape by default."""
    return ModelConfig(architecture="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0))


def _linear(n, k, weights: str, group: int, rng):
    cp = get_xp("cuda")
    if weights == "fp16":
        w = (rng.standard_normal((n, k), dtype=cp.float32) * (1.0 / np.sqrt(k))).astype(cp.float16)
        return GpuLinear.fp16(w)
    chunks = -(-k // 32)
    qweight = rng.integers(0, 2**32, size=(n, 4 * chunks), dtype=cp.uint64).astype(cp.uint32)
    ng = -(-k // group)
    scales = (rng.random((n, ng), dtype=cp.float32) * (0.3 / np.sqrt(k))).astype(cp.float16)
    zeros = rng.integers(6, 10, size=(n, ng), dtype=cp.int32).astype(cp.uint8)
    return GpuLinear("w4", n, k, w4=W4A16Weight(qweight, scales, zeros, None, n, k, group))


def random_model(cfg: ModelConfig, weights: str = "w4", group: int = 128, seed: int = 0, **kw) -> GpuModel:
    """weights: "fp16" or "w4" (4-bit codes, fp16 scales and uint8 zeros per group of `group`).
    The LM head and embedding stay fp16, as quantized checkpoints keep them."""
    cp = get_xp("cuda")
    rng = cp.random.default_rng(seed)
    d, f, h, kv, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    ones = cp.ones(d, cp.float32)
    layers = [Layer(ones, _linear((h + 2 * kv) * hd, d, weights, group, rng), None, None,
                    _linear(d, h * hd, weights, group, rng), ones, _linear(2 * f, d, weights, group, rng),
                    _linear(d, f, weights, group, rng), None) for _ in range(cfg.num_layers)]
    embed = (rng.standard_normal((cfg.vocab_size, d), dtype=cp.float32)).astype(cp.float16)
    lm_head = GpuLinear.fp16((rng.standard_normal((cfg.vocab_size, d), dtype=cp.float32) * (1 / np.sqrt(d))).astype(cp.float16))
    return GpuModel(cfg, embed, layers, ones, lm_head, **kw)
