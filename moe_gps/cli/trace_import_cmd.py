"""``moe-gps trace import``: convert router traces from other systems into MoE-GPS traces.

The ``trace`` command group (moe_gps/cli/trace_cmd.py) calls :func:`register_import`
with its sub-parsers. The formats and what each one infers are documented in
``docs/importers.md``.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from moe_gps.errors import UserError

# The import formats (kept here too so that --help does not import the importers).
FORMATS = ("vllm-jsonl", "gate-csv", "popularity-json", "hf-router-logits", "sglang-dump")

# Format-specific flags: attribute -> (flag, formats it applies to).
_FLAG_FORMATS = {
    "num_layers": ("--num-layers", ("vllm-jsonl",)),
    "num_experts": ("--num-experts", ("vllm-jsonl",)),
    "min_tokens": ("--min-tokens", ("vllm-jsonl",)),
    "passes": ("--passes", ("vllm-jsonl",)),
    "top_k": ("--top-k", ("gate-csv", "popularity-json", "hf-router-logits", "sglang-dump")),
    "no_normalize": ("--no-normalize", ("hf-router-logits",)),
}
_NEEDS_TOP_K = ("popularity-json", "hf-router-logits", "sglang-dump")

_EPILOG = """\
formats:
  vllm-jsonl        JSON lines, one MoE layer call per line ({"topk_ids": [[k ids] x T]}); L lines
                    = one forward pass = one step (L inferred, or --num-layers); select passes
                    with --min-tokens / --passes
  gate-csv          CSV gate-score matrices (layer_id,token_id,expert_0..); one file per layer;
                    each folder SRC (or run of files from one folder) = one step, in order
  popularity-json   {"expert_popularity": [[E counts] x L]} -> counts; one step per file; --top-k
  hf-router-logits  HF transformers router_logits saved as .npz or .pt; one step per file;
                    softmax + top-k (+ renormalise unless --no-normalize); --top-k
  sglang-dump       SGLang expert-distribution recorder dump (.pt with logical_count) -> counts;
                    one step per non-empty buffer row; --top-k

examples:
  moe-gps trace import --from vllm-jsonl token_distri_8.jsonl --min-tokens 100 -o qwen3.parquet
  moe-gps trace import --from gate-csv flame/prefill -o flame_prefill.parquet
  moe-gps trace import --from popularity-json mixtral/*.json --top-k 2 -o mixtral.parquet
See docs/importers.md for every field and what is inferred."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be at least 0")
    return value


def register_import(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``import`` parser to the ``trace`` group's sub-parsers."""
    p = subparsers.add_parser(
        "import",
        help="convert router traces from vLLM, SGLang, HF transformers, CSV/JSON dumps",
        description="Convert router traces that other systems emit into a MoE-GPS Parquet trace "
                    "(written atomically; metadata source='imported' with provenance).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help="input files (or folders, for gate-csv)")
    p.add_argument("--from", dest="fmt", required=True, choices=FORMATS, metavar="FORMAT",
                   help=f"source format: {', '.join(FORMATS)}")
    p.add_argument("-o", "--output", required=True, metavar="OUT.parquet", help="trace file to write")
    p.add_argument("--model", default="unknown", help="model name for the metadata (default: unknown)")
    p.add_argument("--dataset", default="unknown", help="dataset name for the metadata (default: unknown)")
    p.add_argument("--top-k", type=_positive_int, help="experts per token (required for popularity-json, "
                   "hf-router-logits, sglang-dump; checked against the data for gate-csv)")
    p.add_argument("--num-layers", type=_positive_int, help="vllm-jsonl: MoE layers per forward pass "
                   "(default: inferred from the line pattern)")
    p.add_argument("--num-experts", type=_positive_int, help="vllm-jsonl: experts per layer "
                   "(default: largest expert id + 1)")
    p.add_argument("--min-tokens", type=_nonnegative_int, help="vllm-jsonl: keep only passes with at "
                   "least this many tokens (drops dummy/padding passes)")
    p.add_argument("--passes", metavar="LIST", help="vllm-jsonl: keep only these passes of each file, "
                   "0-based, e.g. 2,5-7")
    p.add_argument("--no-normalize", action="store_true", help="hf-router-logits: keep the softmax "
                   "probabilities of the top-k as they are (Qwen2-MoE, OLMoE) instead of dividing by "
                   "their sum (Mixtral, Qwen3-MoE)")
    p.set_defaults(func=run_import)
    return p


def _command_line(args: argparse.Namespace) -> str:
    words = ["moe-gps", "trace", "import", "--from", args.fmt, *args.sources, "-o", args.output]
    for attr, (flag, _) in _FLAG_FORMATS.items():
        value = getattr(args, attr, None)
        if value is True:
            words.append(flag)
        elif value not in (None, False):
            words += [flag, str(value)]
    for attr in ("model", "dataset"):
        if getattr(args, attr) != "unknown":
            words += [f"--{attr}", getattr(args, attr)]
    return shlex.join(words)


def import_options(args: argparse.Namespace) -> dict:
    """The keyword options of the chosen importer; UserError for a flag that does not apply."""
    for attr, (flag, formats) in _FLAG_FORMATS.items():
        value = getattr(args, attr, None)
        if value not in (None, False) and args.fmt not in formats:
            raise UserError(f"{flag} does not apply to --from {args.fmt} (it applies to {', '.join(formats)})")
    if args.fmt in _NEEDS_TOP_K and args.top_k is None:
        raise UserError(f"--from {args.fmt} needs --top-k (experts per token), which the source does not record")
    options: dict = {"model": args.model, "dataset": args.dataset}
    if args.fmt == "vllm-jsonl":
        options.update(num_layers=args.num_layers, num_experts=args.num_experts,
                       min_tokens=args.min_tokens or 0, passes=args.passes)
    else:
        options["top_k"] = args.top_k
    if args.fmt == "hf-router-logits":
        options["normalize"] = not args.no_normalize
    return options


def run_import(args: argparse.Namespace) -> int:
    from moe_gps.outputs import check_output_file
    from moe_gps.trace.importers import import_trace

    out = check_output_file(args.output)
    resolved = out.resolve()
    for src in args.sources:
        if Path(src).resolve() == resolved:
            raise UserError(f"{args.output}: the output would overwrite the source {src}")
    options = import_options(args)
    result = import_trace(args.fmt, args.sources, out, command=_command_line(args), **options)
    for line in result.summary:
        print(line)
    trace, meta = result.trace, result.trace.meta
    tokens = trace.tokens_per_step
    print(f"wrote {args.output}: {meta.kind} trace, {trace.num_steps} step(s), {int(tokens.sum())} tokens "
          f"({int(tokens.min())}..{int(tokens.max())} per step), {meta.num_layers} layers, "
          f"{meta.num_experts} experts, top-{meta.top_k}; model={meta.model!r}, dataset={meta.dataset!r}")
    return 0
