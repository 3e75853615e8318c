"""The `minillm` command: argparse subcommands over the library.

Errors a user can cause arrive as MinillmError and are printed as one line, exit status 1;
argparse's own usage errors exit 2. No traceback reaches the user for either.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import MinillmError


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def cmd_info(args) -> int:
    from . import load  # noqa: PLC0415 - keep `minillm --help` fast

    m = load(args.model, device=args.device, progress=not args.quiet)
    c = m.config
    weights_bytes = sum(int(w.nbytes) for w in _model_arrays(m.model))
    facts = {
        "path": str(m.checkpoint.path),
        "architecture": c.architecture,
        "parameters": m.model.num_parameters,
        "layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "heads": c.num_heads,
        "kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "context_length": c.max_position_embeddings,
        "rope": f"{c.rope.type}, theta={c.rope.theta:g}" + (f", factor={c.rope.factor:g}" if c.rope.type != "default" else ""),
        "tied_embeddings": c.tie_word_embeddings,
        "stored_dtypes": m.checkpoint.source_dtypes,
        "file_bytes": m.checkpoint.file_bytes,
        "memory_bytes": weights_bytes,
        "compute_dtype": str(m.model.dtype.__name__),
        "device": args.device,
    }
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    print(f"{facts['path']}")
    print(f"  architecture   {c.architecture}: {c.num_layers} layers, hidden {c.hidden_size}, MLP {c.intermediate_size}")
    print(f"  attention      {c.num_heads} heads, {c.num_kv_heads} key/value heads, head_dim {c.head_dim}")
    print(f"  parameters     {facts['parameters']:,} ({facts['parameters'] / 1e6:.1f} M)")
    print(f"  vocabulary     {c.vocab_size}, tied embeddings: {c.tie_word_embeddings}")
    print(f"  context        {c.max_position_embeddings} tokens, rope {facts['rope']}")
    stored = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in sorted(facts["stored_dtypes"].items()))
    print(f"  stored as      {stored} (file {_fmt_bytes(facts['file_bytes'])})")
    print(f"  in memory      {_fmt_bytes(weights_bytes)} as {facts['compute_dtype']} on {args.device}")
    return 0


def _model_arrays(model):
    """Each weight array once (tied embeddings share one array)."""
    seen = {}
    arrays = [model.embed, model.final_norm]
    for blk in model.blocks:
        arrays += [blk.attn_norm, blk.mlp_norm, blk.q_norm, blk.k_norm]
        for lin in (blk.q, blk.k, blk.v, blk.o, blk.gate, blk.up, blk.down):
            arrays += [lin.weight, lin.bias]
    arrays.append(model.lm_head.weight)
    for a in arrays:
        if a is not None:
            seen[id(a)] = a
    return list(seen.values())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillm", description="A small LLM inference runtime.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="architecture, parameter count, dtypes and memory of a model")
    p.add_argument("model", help="model directory, .gguf file, or hub id (org/name)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MinillmError as exc:
        print(f"minillm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("minillm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
