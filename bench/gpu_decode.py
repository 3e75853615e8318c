"""End-to-end decode on the GPU: a Llama-2-7B-shaped model (32 layers, hidden 4096, MLP 11008, 32 heads,
vocabulary 32000) with random weights, in fp16 and in W4 g128, one run.

For each: prefill of a 512-token prompt, then batch-1 decoding, tokens/s delivered to the host with the
step captured as a CUDA graph (a step queued ahead, as the chat decodes; and one step at a time) and
launched eagerly, against the bandwidth limit = copy bandwidth / bytes read per token
(every weight once, the LM head in fp16, and the KV cache at the measured tokens' mean context: each
of the three timed runs starts again from the prompt's end). Then prefill of a 2048-token
prompt, W4 against fp16. With --smollm2 GGUF, SmolLM2-135M decode tokens/s on the GPU and the CPU.

    python3 bench/gpu_decode.py [--smollm2 PATH.gguf] [--tokens 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_kernels import copy_bandwidth  # noqa: E402


def bytes_per_token(model, context: float) -> int:
    """Bytes a decode step must read: all linear weights, norms, one embedding row, the KV cache of
    `context` positions."""
    c = model.config
    weights = model.nbytes - model.embed.nbytes + c.hidden_size * 2
    if model.lm_head.w is model.embed:
        weights += model.embed.nbytes
    kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 2 * context
    return int(weights + kv)


def decode_rate(model, prompt_len: int, steps: int, graph: bool, ahead: bool = True):
    """Tokens/s delivered to the host (graph replay or eager launches), median of 3 runs of `steps`,
    each from the same position (the cache truncated back to it), and the mean context the runs'
    steps read (step i attends to start + i + 1 positions): through decode_stream, which keeps a step
    queued ahead (what stream_generate and the chat use), or with ahead=False decode_next, one step at
    a time (the GPU idles while the host takes each token)."""
    import cupy as cp

    model.cuda_graph = graph
    cache = model.new_cache(max_len=prompt_len + steps + 8)
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, size=prompt_len)
    model(prompt, cache, last_only=True)
    tok = model.decode_next([1], cache)[0]  # warm-up: compiles, captures
    first = tok = model.decode_next([tok], cache)[0]
    start = cache.length
    rates = []
    for _ in range(3):
        cache.truncate(start)  # (the device's copy of the length is rewritten by the next step)
        tok = first
        cp.cuda.runtime.deviceSynchronize()
        t0 = time.perf_counter()
        if ahead:
            it = model.decode_stream([tok], cache)
            for _ in range(steps):
                tok = next(it)[0]
            elapsed = time.perf_counter() - t0
            it.close()  # (the step queued ahead is not counted)
        else:
            for _ in range(steps):
                tok = model.decode_next([tok], cache)[0]
            elapsed = time.perf_counter() - t0
        rates.append(steps / elapsed)
    return statistics.median(rates), start + (steps + 1) / 2


def prefill_time(model, length: int, reps: int = 3) -> float:
    import cupy as cp

    prompt = np.random.default_rng(1).integers(0, model.config.vocab_size, size=length)
    times = []
    for _ in range(reps + 1):
        cache = model.new_cache(max_len=length)
        cp.cuda.runtime.deviceSynchronize()
        t0 = time.perf_counter()
        model(prompt, cache, last_only=True)
        cp.cuda.runtime.deviceSynchronize()
        times.append(time.perf_counter() - t0)
        del cache
    return statistics.median(times[1:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--smollm2", default=None)
    ap.add_argument("--skip-7b", action="store_true", help="only the SmolLM2 comparison")
    args = ap.parse_args()
    import cupy as cp

    from minillm.gpu.synthetic import llama_config, random_model

    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    bw = copy_bandwidth()
    print(f"device: {name}; copy bandwidth {bw:.0f} GB/s (cudaMemcpy, bytes read + written)", flush=True)
    cfg = llama_config()
    rows, prefill = {}, {}
    for weights in () if args.skip_7b else ("fp16", "w4"):
        model = random_model(cfg, weights=weights, group=128)
        graph_rate, ctx = decode_rate(model, args.prompt, args.tokens, graph=True)
        single_rate, _ = decode_rate(model, args.prompt, args.tokens, graph=True, ahead=False)
        eager_rate, _ = decode_rate(model, args.prompt, max(8, args.tokens // 8), graph=False)
        per_token = bytes_per_token(model, ctx)
        limit = bw * 1e9 / per_token
        rows[weights] = (graph_rate, eager_rate, per_token, limit, single_rate)
        prefill[weights] = prefill_time(model, 2048)
        print(f"{weights}: graph {graph_rate:.1f} tok/s (one step at a time {single_rate:.1f}), eager {eager_rate:.1f} tok/s, "
              f"{per_token / 1e9:.2f} GB/token at a mean context of {ctx:.0f}, limit {limit:.0f} tok/s; "
              f"prefill 2048 {prefill[weights] * 1e3:.1f} ms",
              flush=True)
        del model
        cp.get_default_memory_pool().free_all_blocks()

    if rows:
        print_7b(args, name, bw, rows, prefill)
    if args.smollm2:
        smollm2(args.smollm2)


def print_7b(args, name, bw, rows, prefill):
    print(f"\nLlama-2-7B shape, random weights, batch 1, prompt {args.prompt}, {args.tokens} new tokens (3 runs "
          f"from the same position, the median; the limit at their mean context); "
          f"{name}, copy bandwidth {bw:.0f} GB/s\n")
    print("| weights | GB read / token | limit (tok/s) | graph (tok/s) | % of limit | graph, one step at a time | "
          "eager (tok/s) | graph speedup |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for w, (g, e, b, lim, one) in rows.items():
        print(f"| {w} | {b / 1e9:.2f} | {lim:.0f} | {g:.1f} | {100 * g / lim:.0f}% | {one:.1f} | {e:.1f} | {g / e:.1f}x |")
    print(f"\nW4 / fp16 decode (graph): {rows['w4'][0] / rows['fp16'][0]:.2f}x")
    print(f"prefill 2048 tokens: fp16 {prefill['fp16'] * 1e3:.1f} ms ({2048 / prefill['fp16']:.0f} tok/s), "
          f"W4 {prefill['w4'] * 1e3:.1f} ms ({2048 / prefill['w4']:.0f} tok/s): W4 / fp16 time "
          f"{prefill['w4'] / prefill['fp16']:.2f}x")


def smollm2(path):
    import minillm

    prompt = "Explain what a hash table is in two sentences."
    rates = {}
    for device in ("cuda", "cpu"):
        m = minillm.load(path, device=device, progress=False)
        ids = m.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        for _ in range(2):  # the first run compiles and captures
            pieces = list(m.stream(ids, max_new_tokens=64, temperature=0.0))
        rates[device] = pieces[-1].decode_tokens_per_s
    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp16 on GPU, fp32 on CPU), greedy, 64 tokens: "
          f"GPU {rates['cuda']:.0f} tok/s, CPU ({os.cpu_count()} cores) {rates['cpu']:.0f} tok/s: "
          f"{rates['cuda'] / rates['cpu']:.1f}x")

if __name__ == "__main__":
    main()
