"""``moe-gps trace import``: convert router traces from other systems into MoE-GPS traces.

The ``trace`` command group (moe_gps/cli/trace_cmd.py) calls :func:`register_import`
with its sub-parsers. The formats and what each one infers are documented in
``docs/importers.md``.
"""

from __future__ import annotations

import argparse
import shlex
import textwrap
import sys
from pathlib import Path

from moe_gps.cli.common_args import nonnegative_int, positive_int
from moe_gps.errors import UserError

# The import formats (kept here too so that --help does not import the importers).
FORMATS = ("vllm-routed", "sglang-routed", "vllm-jsonl", "gate-csv", "popularity-json", "hf-router-logits",
           "sglang-dump")

# Format-specific flags: attribute -> (flag, formats it applies to).
_FLAG_FORMATS = {
    "num_layers": ("--num-layers", ("vllm-jsonl", "sglang-routed")),
    "num_experts": ("--num-experts", ("vllm-jsonl", "vllm-routed", "sglang-routed")),
    "min_tokens": ("--min-tokens", ("vllm-jsonl",)),
    "passes": ("--passes", ("vllm-jsonl",)),
    "part": ("--part", ("vllm-routed", "sglang-routed")),
    "requests_per_step": ("--requests-per-step", ("vllm-routed", "sglang-routed")),
    "top_k": ("--top-k", ("gate-csv", "popularity-json", "hf-router-logits", "sglang-dump", "sglang-routed")),
    "no_normalize": ("--no-normalize", ("hf-router-logits",)),
}
_NEEDS_TOP_K = ("popularity-json", "hf-router-logits")

_EPILOG = """\
formats (what you get from the server: docs/importers.md):
  vllm-routed       saved vLLM responses (JSON lines or an array) with prompt_routed_experts /
                    choices[].routed_experts (vllm serve --enable-return-routed-experts);
                    --num-experts; one step = --requests-per-step responses (default 1), --part
  sglang-routed     saved SGLang /generate responses with meta_info.routed_experts (base64 int32;
                    --enable-return-routed-experts); --num-experts and --top-k (or --num-layers)
  sglang-dump       SGLang expert-distribution recorder dumps (.pt): stat -> counts, one step per
                    buffer row; per_pass -> counts and per_token -> tokens, one step per forward
                    pass in forward_pass_id order (give every rank's file); --top-k (not per_token)
  vllm-jsonl        a PATCHED vLLM's JSON lines (not upstream vLLM), one MoE layer call per line
                    ({"topk_ids": [[k ids] x T]}); --num-layers lines = one forward pass = one
                    step; --num-experts; select passes with --min-tokens / --passes
  gate-csv          CSV gate-score matrices (layer_id,token_id,expert_0..); one file per layer;
                    each folder SRC (or run of files from one folder) = one step, in order
  popularity-json   {"expert_popularity": [[E counts] x L]} -> counts; one step per file; --top-k
  hf-router-logits  HF transformers router_logits saved as .npz or .pt; one step per file;
                    softmax + top-k (+ renormalise unless --no-normalize); --top-k

examples:
  moe-gps trace import --from vllm-routed responses.jsonl --num-experts 128 -o qwen3.parquet
  moe-gps trace import --from sglang-routed responses.jsonl --num-experts 256 --top-k 8 -o dsv3.parquet
  moe-gps trace import --from sglang-dump expert_distribution_recorder_*.pt --top-k 8 -o load.parquet
  moe-gps trace import --from vllm-jsonl token_distri_8.jsonl --num-layers 48 --num-experts 128 \\
      --min-tokens 100 -o qwen3.parquet
  moe-gps trace import --from gate-csv flame/prefill -o flame_prefill.parquet
See docs/importers.md for every field and what is read from where."""


def register_import(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``import`` parser to the ``trace`` group's sub-parsers."""
    p = subparsers.add_parser(
        "import",
        help="convert router traces from vLLM, SGLang, HF transformers, CSV/JSON dumps",
        description=textwrap.fill("Convert router traces that other systems emit into a MoE-GPS Parquet trace "
                                  "(written atomically; metadata source='imported' with provenance).", 88),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help="input files (or folders, for gate-csv)")
    p.add_argument("--from", dest="fmt", required=True, choices=FORMATS, metavar="FORMAT",
                   help=f"source format: {', '.join(FORMATS)}")
    p.add_argument("-o", "--output", required=True, metavar="OUT.parquet", help="trace file to write")
    p.add_argument("--model-name", "--model", dest="model", default="unknown", metavar="NAME",
                   help="model name for the metadata (default: unknown)")
    p.add_argument("--dataset", default="unknown", help="dataset name for the metadata (default: unknown)")
    p.add_argument("--phase", choices=("prefill", "decode"), help="what the steps are, when the source does not "
                   "say: decode (one new token per sequence a step) or prefill; recorded as the provenance's "
                   "phase, which simulate and recommend then time the steps as (default: not recorded: they "
                   "tell decode by its shape where the trace has sequence ids, else take prefill)")
    p.add_argument("--top-k", type=positive_int, help="experts per token (required for popularity-json, "
                   "hf-router-logits, sglang-dump stat/per_pass; sglang-routed: this or --num-layers; gate-csv: "
                   "optional; checked against the data where it shows, e.g. gate-csv's non-zero scores per row)")
    p.add_argument("--num-layers", type=positive_int, help="vllm-jsonl: MoE layers per forward pass (required); "
                   "sglang-routed: layers of the flat array (the model's num_hidden_layers)")
    p.add_argument("--num-experts", type=positive_int, help="vllm-jsonl, vllm-routed, sglang-routed: routed "
                   "experts per layer (required; the files do not say)")
    p.add_argument("--min-tokens", type=nonnegative_int, help="vllm-jsonl: keep only passes with at "
                   "least this many tokens (drops dummy/padding passes; default: every pass that has a token)")
    p.add_argument("--passes", metavar="LIST", help="vllm-jsonl: keep only these passes of each file, "
                   "0-based, e.g. 2,5-7 (default: all)")
    p.add_argument("--part", choices=("all", "prompt", "output"), help="vllm-routed, sglang-routed: which tokens "
                   "of each response (default: all)")
    p.add_argument("--requests-per-step", type=positive_int, metavar="N", help="vllm-routed, sglang-routed: "
                   "consecutive responses per step (default 1; the responses do not say which shared a forward "
                   "pass)")
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
    if args.phase:
        words += ["--phase", args.phase]
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
    elif args.fmt in ("vllm-routed", "sglang-routed"):
        options.update(num_experts=args.num_experts, part=args.part or "all",
                       requests_per_step=args.requests_per_step or 1)
        if args.fmt == "sglang-routed":
            options.update(top_k=args.top_k, num_layers=args.num_layers)
    else:
        options["top_k"] = args.top_k
    if args.fmt == "hf-router-logits":
        options["normalize"] = not args.no_normalize
    return options


def _other_format(fmt: str, sources: list[str]) -> str:
    """' (X looks like ...: did you mean --from F?)' when a source file looks like another format, else ''."""
    from moe_gps.trace.sniff import likely_format

    for src in sources:
        p = Path(src)
        if p.is_file():
            other, what = likely_format(p)
            if other is not None and other != fmt:
                return f" ({p.name} looks like {what}: did you mean --from {other}?)"
    return ""


def run_import(args: argparse.Namespace) -> int:
    from moe_gps.outputs import check_trace_output, same_file
    from moe_gps.trace.importers import import_trace

    out = check_trace_output(args.output)
    for i, src in enumerate(args.sources):
        if same_file(src, out):
            raise UserError(f"{args.output}: the output would overwrite the source {src}")
        twin = next((s for s in args.sources[:i] if same_file(s, src)), None)
        if twin is not None:              # it would count its steps twice
            raise UserError(f"{src}: the same source as {twin}, named twice")
    options = import_options(args)
    try:
        result = import_trace(args.fmt, args.sources, out, command=_command_line(args), phase=args.phase, **options)
    except UserError as err:
        raise UserError(f"{err}{_other_format(args.fmt, args.sources)}") from None
    for line in result.summary:
        if line.lstrip().startswith("warning: "):        # on stderr, as every other warning
            print(f"moe-gps: {line.strip()}", file=sys.stderr)
        else:
            print(line)
    trace, meta = result.trace, result.trace.meta
    tokens = trace.tokens_per_step
    print(f"wrote {args.output}: {meta.kind} trace, {trace.num_steps} step(s), {int(tokens.sum())} tokens "
          f"({int(tokens.min())}..{int(tokens.max())} per step), {meta.num_layers} layers, "
          f"{meta.num_experts} experts, top-{meta.top_k}; model={meta.model!r}, dataset={meta.dataset!r}")
    return 0
