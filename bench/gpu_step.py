"""GPU time of one batch-1 decode step of the Llama-2-7B-shaped model (random weights, W4 g128 or fp16):
graph replays launched back to back on one stream and timed with CUDA events, from one cache position,
so the host never enters the figure. This is how the step's changes are compared (docs/kernels.md
section 7): run each variant in its own process, with a baseline in the same device session (two
H100 machines have differed by ~1.7% on one build).

--without attention replaces decode attention by nothing (the rest of the step unchanged; the output
is wrong, the timing is what the other kernels cost): the difference is what attention costs in the
step, beyond its bytes at that context.

    python3 bench/gpu_step.py [--weights w4|fp16] [--context 514] [--rounds 5] [--without attention]
                              [--kv-cache float|int8|fp8|int4] [--kv-heads 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def prepared_step(weights: str, context: int, max_len: int, cuda_graph: bool = True, kv_cache: str = "float",
                  kv_heads: int = 32):
    """The 7B-shaped random model and a cache holding `context` positions, the last two fed by decode
    steps (the first compiles every kernel and, with the graph on, captures the step): (model, cache,
    the last token chosen). bench/gpu_profile_decode.py profiles the next step from here."""
    import numpy as np

    from minillm.gpu.synthetic import llama_config, random_model

    model = random_model(llama_config(kv_heads=kv_heads), weights=weights, kv_cache=kv_cache)
    model.cuda_graph = cuda_graph
    cache = model.new_cache(max_len=max_len)
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, size=context - 2)
    model(prompt, cache, last_only=True)
    tok = model.decode_next([1], cache)[0]
    return model, cache, model.decode_next([tok], cache)[0]


def step_times(weights: str, context: int, rounds: int, replays: int = 128, without: str | None = None,
               kv_cache: str = "float", kv_heads: int = 32):
    """GPU microseconds per step, one figure per round: `replays` graph replays with `context` positions
    cached before the first (each round starts there again, so every round reads the same lengths)."""
    import cupy as cp
    import numpy as np

    from minillm.gpu import kernels as K

    if without == "attention":
        K.decode_attention = lambda *args, **kwargs: None
    model, cache, _ = prepared_step(weights, context, context + replays + 8, kv_cache=kv_cache, kv_heads=kv_heads)
    start, stream = cache.length, model._stream
    times = []
    for _ in range(rounds):
        cache.pos.set(np.array([start], np.int32), stream=stream)
        begin, end = cp.cuda.Event(), cp.cuda.Event()
        with stream:
            begin.record(stream)
            for _ in range(replays):
                model.replay(cache)
            end.record(stream)
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(begin, end) * 1e3 / replays)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", choices=("w4", "fp16"), default="w4")
    ap.add_argument("--context", type=int, default=514, help="positions cached before the first replay")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--without", choices=("attention",), default=None)
    ap.add_argument("--kv-cache", choices=("float", "int8", "fp8", "int4"), default="float")
    ap.add_argument("--kv-heads", type=int, default=32, help="8: grouped query heads (Llama-3-8B's 32 / 8)")
    args = ap.parse_args()
    import cupy as cp

    times = step_times(args.weights, args.context, args.rounds, without=args.without, kv_cache=args.kv_cache,
                       kv_heads=args.kv_heads)
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    notes = ([f"without {args.without}"] if args.without else []) + (
        [f"{args.kv_heads} kv heads"] if args.kv_heads != 32 else []) + (
        [f"{args.kv_cache} cache"] if args.kv_cache != "float" else [])
    what = "".join(", " + n for n in notes)
    print(f"{name}: 7B-shaped {args.weights} decode step after {args.context} cached positions{what}: "
          f"{statistics.median(times):.1f} us a token (median of {args.rounds} rounds of 128 graph replays: "
          f"{' '.join(f'{t:.0f}' for t in times)})")


if __name__ == "__main__":
    main()
