"""Ways to choose the FP8 KV cache's offsets: E4M3 codes of keys and values minus a per-(layer,
head, channel) mean mu, added back on reading. The engine uses calibration:512 (kvcache.py). Exact for attention in real
arithmetic: q . (k - mu) shifts every score of a query by the same amount (softmax ignores it), and
sum_j p_j (v_j - mu) + mu = sum_j p_j v_j. What changes is what the 3 mantissa bits are spent on.

    python3 bench/kv_fp8_offsets.py [--windows 5] [--size 2048] [--mu window|calibration:512|first:16]

mu from: the evaluated window itself (the prompt, as a prefill would see it); the first N tokens of
the calibration text through a float cache; or the window's first N tokens, the rest fed in chunks
of 256. Prints perplexity and KL against the float cache for plain FP8 and the centered variant.
docs/kv-cache.md section 6 has the results.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minillm  # noqa: E402
from minillm import kvcache  # noqa: E402
from minillm.evaluate import calibration_text, compare_many, evaluation_text  # noqa: E402

PLAIN = kvcache.FP8KVCache


def centered(fixed_mu):
    """An FP8KVCache subclass subtracting mu: fixed_mu {(layer, "k"|"v"): array} or, if None, the mean
    of each layer's first update."""

    class Centered(PLAIN):
        def update(self, layer, k, v):
            self.mu = getattr(self, "mu", {} if fixed_mu is None else fixed_mu)
            start, end = self.length, self.length + k.shape[2]
            out = []
            for kind, x in (("k", k), ("v", v)):
                x = np.asarray(x, dtype=np.float32)
                mu = self.mu.setdefault((layer, kind), x.mean(axis=2, keepdims=True))
                codes, scale = self.encode(x - mu)
                self.codes[kind][layer, :, :, start:end] = codes
                self.scales[kind][layer, :, :, start:end] = scale
                out.append(self.decode(self.codes[kind][layer, :, :, :end], self.scales[kind][layer, :, :, :end]) + mu)
            return out[0].astype(self.dtype), out[1].astype(self.dtype)

    return Centered


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--mu", default="window")
    args = ap.parse_args()
    m = minillm.load(progress=False)
    m.model.kv_calibration = None  # "fp8" below is plain E4M3; the variants bring their own mu
    tok = m.require_tokenizer()
    ids = tok.encode_plain(evaluation_text())
    how, _, n = args.mu.partition(":")
    fixed, first = None, 0
    if how == "calibration":
        cal = np.array(tok.encode_plain(calibration_text())[: int(n)])
        cache = m.model.new_cache(max_len=len(cal), kind="float")
        m.model(cal[None], cache)
        fixed = {(layer, kind): arr[layer].mean(axis=2, keepdims=True)
                 for layer in range(len(cache.keys)) for kind, arr in (("k", cache.keys), ("v", cache.values))}
    elif how == "first":
        first = int(n)

    def run(cls):
        def forward(w):
            kvcache.FP8KVCache = cls
            try:
                if not first:
                    return m.model(w)
                cache = m.model.new_cache(max_len=len(w))
                cuts = [0, first, *range(first + 256, len(w), 256), len(w)]
                return np.concatenate([np.asarray(m.model(w[a:b][None], cache)).reshape(b - a, -1)
                                       for a, b in zip(cuts, cuts[1:])])
            finally:
                kvcache.FP8KVCache = PLAIN
        return forward

    def use(name):
        m.model.kv_cache = "float" if name == "reference" else "fp8"

    scores = compare_many(m, {"fp8": run(PLAIN), f"fp8 - mu ({args.mu})": run(centered(fixed))}, ids, args.size,
                          args.windows, before_each=use)
    base = scores["reference"]["perplexity"]
    print(f"\nSmolLM2-135M-Instruct, {args.windows} x {args.size} windows; float cache perplexity {base:.4f}")
    for name, r in scores.items():
        if name != "reference":
            print(f"{name}: perplexity {r['perplexity']:.4f} ({100 * (r['perplexity'] / base - 1):+.2f}%), "
                  f"KL {r['kl_divergence']:.5f}, top-1 {100 * r['top1_agreement']:.2f}%")


if __name__ == "__main__":
    main()
