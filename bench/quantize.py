"""Quantizing the default model (SmolLM2-135M-Instruct): wall time and peak memory per method, then
perplexity, KL to float and top-1 agreement of every result, evaluated side by side.

Each method runs as its own `minillm quantize` process (so its time and peak resident memory are
its own), writing a checkpoint; then one pass over the evaluation windows compares all of them with
the float model. Calibration: 32 windows of 512 tokens of the calibration text (disjoint from the
evaluation text); evaluation: 40 windows of 512.

    python3 bench/quantize.py [--windows 40] [--only gptq-w4-g64,awq-w4-g64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import minillm  # noqa: E402
from minillm.evaluate import compare_many, evaluation_text  # noqa: E402

RUNS = {  # name: flags for `minillm quantize`
    "rtn-w4-g64": ["--method", "rtn", "--bits", "4", "--group-size", "64"],
    "gptq-w4-g64": ["--method", "gptq", "--bits", "4", "--group-size", "64"],
    "gptq-act-w4-g64": ["--method", "gptq", "--bits", "4", "--group-size", "64", "--act-order"],
    "gptq-act-mse-w4-g64": ["--method", "gptq", "--bits", "4", "--group-size", "64", "--act-order", "--clip", "mse"],
    "awq-w4-g64": ["--method", "awq", "--bits", "4", "--group-size", "64"],
    "rtn-w4-g128": ["--method", "rtn", "--bits", "4", "--group-size", "128"],
    "gptq-w4-g128": ["--method", "gptq", "--bits", "4", "--group-size", "128"],
    "gptq-act-mse-w4-g128": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--act-order", "--clip", "mse"],
    "awq-w4-g128": ["--method", "awq", "--bits", "4", "--group-size", "128"],
    "rtn-w3-g64": ["--method", "rtn", "--bits", "3", "--group-size", "64"],
    "gptq-w3-g64": ["--method", "gptq", "--bits", "3", "--group-size", "64"],
    "gptq-act-w3-g64": ["--method", "gptq", "--bits", "3", "--group-size", "64", "--act-order"],
    "gptq-act-mse-w3-g64": ["--method", "gptq", "--bits", "3", "--group-size", "64", "--act-order", "--clip", "mse"],
    "awq-w3-g64": ["--method", "awq", "--bits", "3", "--group-size", "64"],
}

CHILD = """
import resource, sys, time
from minillm.cli import main
t = time.perf_counter()
rc = main(sys.argv[1:])
print(f"BENCH {time.perf_counter() - t:.1f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
sys.exit(rc)
"""


def run_method(name, flags, out: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", CHILD, "quantize", str(m_default()), str(out), "--quiet", *flags],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{name} failed:\n{r.stderr}")
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("BENCH")][-1].split()
    summary = [ln for ln in r.stdout.splitlines() if "mean relative output error" in ln]
    return float(line[1]), int(line[2]) / 1024, (summary[0] if summary else "")


_DEFAULT = None


def m_default() -> Path:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = minillm.load(progress=False).checkpoint.path
    return _DEFAULT


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--only", default=None)
    ap.add_argument("--keep", default=None, help="directory to keep the quantized checkpoints in")
    ap.add_argument("--reuse", action="store_true", help="keep results already in --keep (with their timings)")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(RUNS)
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="minillm-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)

    stats = {}
    for name in names:
        out = workdir / name
        record = workdir / f"{name}.json"
        if args.reuse and out.exists() and record.exists():  # measured in an earlier run of this script
            stats[name] = json.loads(record.read_text())
            print(f"{name}: reused ({stats[name]['seconds']:.0f} s, peak {stats[name]['peak_mb']:.0f} MB)", flush=True)
            continue
        if out.exists():
            import shutil

            shutil.rmtree(out)
        seconds, peak_mb, summary = run_method(name, RUNS[name], out)
        stats[name] = {"seconds": seconds, "peak_mb": peak_mb}
        record.write_text(json.dumps(stats[name]))
        print(f"{name}: {seconds:.0f} s, peak {peak_mb:.0f} MB  {summary}", flush=True)

    base = minillm.load(progress=False)
    models = {name: minillm.load(workdir / name, progress=False) for name in names}
    ids = base.require_tokenizer().encode_plain(evaluation_text())
    scores = compare_many(base, models, ids, 512, args.windows)

    print(f"\nSmolLM2-135M-Instruct, {os.cpu_count()}-core CPU; calibration 32 x 512 tokens, evaluation "
          f"{args.windows} x 512 tokens; asymmetric; time and peak RSS of each `minillm quantize` process\n")
    print("| method | perplexity | KL to float | top-1 agreement | time (s) | peak memory (MB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| float32 | {scores['reference']['perplexity']:.3f} | 0 | 100% | | |")
    results = {}
    for name in names:
        r = scores[name]
        results[name] = {**r, **stats[name]}
        print(f"| {name} | {r['perplexity']:.3f} | {r['kl_divergence']:.4f} | {100 * r['top1_agreement']:.2f}% | "
              f"{stats[name]['seconds']:.0f} | {stats[name]['peak_mb']:.0f} |")
    (workdir / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
