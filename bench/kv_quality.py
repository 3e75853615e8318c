"""KV-cache formats on SmolLM2-135M-Instruct (float weights): perplexity, KL to the float cache, top-1.

Every window is run once per cache type through the same model; attention reads every key and
value through the cache, as decoding does (minillm.kvcache). Windows of 512 (the design.md
evaluation, 40 windows) and of 2048 tokens.

    python3 bench/kv_quality.py [--windows-512 40] [--windows-2048 5] [--kinds int8,fp8,int4]
    python3 bench/kv_quality.py --int4-sizes 32x32,64x64     (the INT4 reference cache's key block x
                                                             value group, in tokens x channels)

The FP8 cache is centred on the calibration text's mean keys and values (kvcache.FP8KVCache).
--int4-sizes scores the NumPy INT4 (KIVI) cache with other blocks and groups than the 32 x 32 that
minillm uses (and that its GPU kernels implement): fewer scale and zero-point bytes per value, at
what cost in quality (bits a value = 4 + (32 / block + 32 / group) / 2 with fp16 scales and zeros).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minillm  # noqa: E402
from minillm.evaluate import compare_many, evaluation_text  # noqa: E402

KINDS = ["int8", "fp8", "int4"]


def run(m, ids, size, count, kinds=KINDS, int4_options=None):
    """Each cache type against the float cache, on the same model (only its cache type changes);
    int4_options: the INT4 cache's key block and value group (Model.kv_cache_options)."""

    def use(kind):
        m.model.kv_cache = "float" if kind == "reference" else kind
        m.model.kv_cache_options = dict(int4_options or {}) if kind == "int4" else {}

    scores = compare_many(m, {kind: m for kind in kinds}, ids, size, count, before_each=use)
    use("reference")
    return scores


def model_and_text():
    """The default model (SmolLM2-135M-Instruct, float32) and the evaluation text's token ids."""
    m = minillm.load(progress=False)
    return m, m.require_tokenizer().encode_plain(evaluation_text())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows-512", type=int, default=40)
    ap.add_argument("--windows-2048", type=int, default=5)
    ap.add_argument("--kinds", default=",".join(KINDS), help="cache types to score (comma-separated)")
    ap.add_argument("--int4-sizes", default=None, help="INT4 key block x value group sizes to compare, e.g. 32x32,64x64")
    args = ap.parse_args()
    if args.int4_sizes:
        return int4_sizes(args)
    kinds = args.kinds.split(",")
    m, ids = model_and_text()
    cache_bytes = {k: m.new_cache(max_len=8192, kind=k).nbytes for k in ["float", *kinds]}
    print("\nSmolLM2-135M-Instruct, float32 weights; KV cache formats (attention reads through the cache)\n")
    print("| cache | windows | perplexity | vs float | KL to float cache | top-1 agreement | bytes for 8192 tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size, count in [(sz, n) for sz, n in ((512, args.windows_512), (2048, args.windows_2048)) if n > 0]:
        scores = run(m, ids, size, count, kinds)
        base = scores["reference"]["perplexity"]
        print(f"| float32 | {count} x {size} | {base:.3f} | | 0 | 100% | {cache_bytes['float'] / 2**20:.1f} MiB |")
        for kind in kinds:
            r = scores[kind]
            print(f"| {kind} | {count} x {size} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.2f}% | "
                  f"{r['kl_divergence']:.5f} | {100 * r['top1_agreement']:.2f}% | {cache_bytes[kind] / 2**20:.1f} MiB |",
                  flush=True)


def int4_sizes(args):
    m, ids = model_and_text()
    print("\nSmolLM2-135M-Instruct, float32 weights; INT4 (KIVI) cache by key block and value group\n")
    print("| key block | value group | bits a value | windows | perplexity | vs float | KL to float cache | top-1 agreement |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for spec in args.int4_sizes.split(","):
        block, group = (int(v) for v in spec.split("x"))
        bits = 4 + (32 / block + 32 / group) / 2
        for size, count in [(sz, n) for sz, n in ((512, args.windows_512), (2048, args.windows_2048)) if n > 0]:
            scores = run(m, ids, size, count, ["int4"], int4_options={"block": block, "group": group})
            base, r = scores["reference"]["perplexity"], scores["int4"]
            print(f"| {block} | {group} | {bits:.3f} | {count} x {size} | {r['perplexity']:.3f} | "
                  f"{100 * (r['perplexity'] / base - 1):+.2f}% | {r['kl_divergence']:.5f} | "
                  f"{100 * r['top1_agreement']:.2f}% |", flush=True)


if __name__ == "__main__":
    main()
