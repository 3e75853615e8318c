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

    m = load(args.model, device=args.device, progress=not args.quiet, kv_cache=args.kv_cache)
    c = m.config
    weights_bytes = m.model.nbytes if hasattr(m.model, "nbytes") else sum(int(w.nbytes) for w in _model_arrays(m.model))
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
        "kv_cache": args.kv_cache,
        "kv_cache_bytes": m.new_cache(max_len=args.context or m.model.context_length).nbytes,
        "kv_cache_context": args.context or m.model.context_length,
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
    print(f"  KV cache       {args.kv_cache}: {_fmt_bytes(facts['kv_cache_bytes'])} for {facts['kv_cache_context']} tokens")
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


def _load_for_text(args):
    from . import load  # noqa: PLC0415 - keep `minillm --help` fast

    return load(args.model, device=args.device, progress=not getattr(args, "quiet", False),
                kv_cache=getattr(args, "kv_cache", "float"))


def _sampling(args):
    from .generate import SamplingParams  # noqa: PLC0415

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                          seed=args.seed, stop=tuple(args.stop or ())).validate()


def cmd_generate(args) -> int:
    from .chat import read_template  # noqa: PLC0415

    if len(args.words) == 1:
        args.model, prompt = None, args.words[0]
    else:
        args.model, prompt = args.words
    if not prompt.strip():
        raise MinillmError("the prompt is empty: give some text, e.g. minillm generate \"Tell me a joke\"")
    params = _sampling(args)
    template = read_template(args.template)
    m = _load_for_text(args)
    tok = m.require_tokenizer()
    use_chat = not args.raw and (template or tok.chat_template)
    if use_chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]
        ids = tok.encode_chat(messages, template=template)
    else:
        ids = tok.encode(prompt)
    cache = m.new_cache(max_len=args.context) if args.context else None
    text, last = [], None
    try:
        for piece in m.stream(ids, cache=cache, **vars(params)):
            text.append(piece.text)
            last = piece
            if not args.json:
                print(piece.text, end="", flush=True)
    except KeyboardInterrupt:
        if not args.json:
            print()
        raise
    stats = {"prompt_tokens": last.prompt_tokens, "generated_tokens": last.generated_tokens,
             "ttft_s": round(last.ttft_s, 4), "tokens_per_s": round(last.decode_tokens_per_s, 2),
             "finish_reason": last.finish_reason}
    if args.json:
        print(json.dumps({"text": "".join(text), **stats}, ensure_ascii=False))
    else:
        print()
        print(f"[{stats['generated_tokens']} tokens, first token after {stats['ttft_s']:.2f} s, "
              f"{stats['tokens_per_s']:.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .chat import read_template, repl  # noqa: PLC0415

    params = _sampling(args)
    template = read_template(args.template)
    m = _load_for_text(args)
    return repl(m, params, system=args.system, template=template, context=args.context)


def cmd_quantize(args) -> int:
    from .quant import QuantSpec  # noqa: PLC0415
    from .quantize import directory_bytes, quantize_weights, save_quantized  # noqa: PLC0415

    if args.group_size is not None and args.group_size <= 0:
        spec = QuantSpec(args.bits, "channel", sym=args.sym)
    else:
        spec = QuantSpec(args.bits, "group", args.group_size or 64, args.sym)
    out = __import__("pathlib").Path(args.out)
    if out.exists() and not args.force:
        raise MinillmError(f"{out} already exists: choose a new directory (or --force to replace it)")
    skip = tuple(s.strip() for s in args.skip.split(",") if s.strip())
    m = _load_for_text(args)
    if args.method in ("gptq", "awq"):
        from .calibrate import calibration_windows, quantize_calibrated  # noqa: PLC0415

        text = None
        if args.calib:
            try:
                text = __import__("pathlib").Path(args.calib).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise MinillmError(f"cannot read the calibration text {args.calib}: {exc}") from exc
        windows = calibration_windows(m.require_tokenizer(), args.samples, args.seq_len, text)
        weights, report = quantize_calibrated(m, spec, args.method, windows, act_order=args.act_order,
                                              progress=not args.quiet, clip=args.clip)
        _print_report(report)
        if args.report:
            __import__("pathlib").Path(args.report).write_text(json.dumps(report, indent=2))
    else:
        weights = quantize_weights(m, spec, method=args.method, clip=args.clip, skip=skip,
                                   quantize_embeddings=args.quantize_embeddings, progress=not args.quiet)
    save_quantized(out, m, weights, spec, fmt=args.format, skip=skip, force=args.force,
                   act_order=args.act_order, activations="dynamic" if args.method == "w8a8" else None)
    print(f"wrote {out} ({args.method}, {spec.describe()}, format {args.format}): "
          f"{directory_bytes(out) / 2**20:.1f} MiB")
    return 0


def _print_report(report) -> None:
    layers = report["layers"]
    key = f"{report['method']}_error"
    rtn = sum(r["rtn_error"] for r in layers) / len(layers)
    ours = sum(r[key] for r in layers) / len(layers)
    worst = max(layers, key=lambda r: r[key])
    print(f"{report['method']} {report['spec']}: {len(layers)} layers in {report['seconds']:.0f} s; mean relative "
          f"output error {ours:.5f} (RTN {rtn:.5f}); worst {worst['layer']} {worst[key]:.5f}")


def cmd_eval(args) -> int:
    from . import load  # noqa: PLC0415
    from .evaluate import compare, evaluation_text, perplexity  # noqa: PLC0415

    m = load(args.model, device=args.device, progress=not args.quiet, kv_cache=args.kv_cache)
    if args.text:
        try:
            text = __import__("pathlib").Path(args.text).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise MinillmError(f"cannot read {args.text}: {exc}") from exc
    else:
        text = evaluation_text()
    ids = m.require_tokenizer().encode_plain(text)
    if args.reference:
        ref = load(args.reference, device=args.device, progress=not args.quiet)
        result = compare(m, ref, ids, args.window_size, args.windows, progress=not args.quiet)
    else:
        result = {"perplexity": perplexity(m, ids, args.window_size, args.windows, progress=not args.quiet),
                  "windows": args.windows, "window_size": args.window_size}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"perplexity {result['perplexity']:.4f} ({args.windows} windows of {args.window_size} tokens)")
    if args.reference:
        print(f"reference perplexity {result['reference_perplexity']:.4f}")
        print(f"KL(reference || model) {result['kl_divergence']:.5f} nats/token, "
              f"top-1 agreement {100 * result['top1_agreement']:.2f}%")
    return 0


def _add_sampling_flags(p):
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus: smallest set with this mass (1 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--template", default=None, help="chat template: 'chatml' or a Jinja file (for models without one)")
    p.add_argument("--context", type=int, default=None, help="cap the context at this many tokens")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_kv_flag(p)


def _add_kv_flag(p):
    p.add_argument("--kv-cache", default="float", choices=["float", "int8", "int4", "fp8"],
                   help="how the KV cache stores keys and values (default float)")


def cmd_bench(args) -> int:
    """The longest context per KV-cache type for a 7B-shaped W4 model in a GPU memory budget."""
    from .capacity import plan, verify, w4_weight_bytes  # noqa: PLC0415
    from .gpu.synthetic import llama_config  # noqa: PLC0415

    if args.budget_gib <= 0:
        raise MinillmError(f"the budget must be positive, got {args.budget_gib} GiB")
    cfg = llama_config()
    budget = int(args.budget_gib * 2**30)
    rows = plan(cfg, budget)
    check = args.device == "cuda"
    if check:
        from .backend import get_xp  # noqa: PLC0415

        get_xp("cuda")
    print(f"Llama-2-7B shape, W4 g128 weights {w4_weight_bytes(cfg) / 2**30:.2f} GiB, GPU memory budget "
          f"{args.budget_gib:g} GiB (256 MiB kept for working buffers)")
    print("| KV cache | bytes per token | longest context | verified |")
    print("| --- | --- | --- | --- |")
    for kind, (per_token, context) in rows.items():
        note = "not checked (no --device cuda)"
        if check:
            used = verify(cfg, kind, context, budget)
            note = f"allocated: {used / 2**30:.2f} GiB in use"
        print(f"| {kind} | {per_token / 1024:.0f} KiB | {context} | {note} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillm", description="A small LLM inference runtime.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="architecture, parameter count, dtypes and memory of a model")
    p.add_argument("model", nargs="?", default=None,
                   help="model directory, .gguf file, or hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--context", type=int, default=None, help="context to size the KV cache for (default: the model's)")
    _add_kv_flag(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="stream a reply to one prompt (chat template applied if the model has one)")
    p.add_argument("words", nargs="+", metavar="[MODEL] PROMPT",
                   help="model directory / .gguf / hub id (default: SmolLM2-135M-Instruct), then the prompt")
    p.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    p.add_argument("--json", action="store_true", help="print text and statistics as one JSON object")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("quantize", help="quantize a model and write a checkpoint")
    p.add_argument("model", help="model directory, .gguf file, or hub id")
    p.add_argument("out", help="output directory (written to a temporary name, then renamed)")
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq", "awq", "w8a8"])
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=None, help="weights per scale along K (default 64; 0 = per channel)")
    p.add_argument("--sym", action="store_true", help="symmetric (default asymmetric with zero points)")
    p.add_argument("--clip", default="minmax", choices=["minmax", "mse", "percentile"])
    p.add_argument("--format", default="minillm", choices=["minillm", "gptq", "gptq_v2", "awq", "compressed-tensors"])
    p.add_argument("--skip", default="lm_head", help="comma-separated layers left in float (default lm_head)")
    p.add_argument("--quantize-embeddings", action="store_true", help="quantize the embedding too (minillm format)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: columns in order of decreasing activation energy")
    p.add_argument("--calib", default=None, help="calibration text file (default: the calibration slice of pydoc topics)")
    p.add_argument("--samples", type=int, default=32, help="calibration windows (GPTQ/AWQ)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--report", default=None, help="write per-layer errors (RTN vs the method) as JSON")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="perplexity, and KL / top-1 agreement against a reference model")
    p.add_argument("model", nargs="?", default=None, help="model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--reference", default=None, help="a reference model (e.g. the float original)")
    p.add_argument("--text", default=None, help="a text file (default: the evaluation slice of pydoc topics)")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--window-size", type=int, default=512)
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quiet", action="store_true")
    _add_kv_flag(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="longest context per KV-cache type for a 7B W4 model in a GPU memory budget")
    p.add_argument("--budget-gib", type=float, default=16.0, help="GPU memory budget in GiB (default 16)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: verify each figure by allocating the model and cache")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("chat", help="talk to a model (default: SmolLM2-135M-Instruct)")
    p.add_argument("model", nargs="?", default=None, help="model directory, .gguf file, or hub id")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_chat)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate" and len(args.words) > 2:
        build_parser().error("generate takes [MODEL] PROMPT: quote the prompt")
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
