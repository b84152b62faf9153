"""``moe-gps trace``: inspect, validate, synthesise and import router traces."""

from __future__ import annotations

import argparse
import sys

from moe_gps.errors import UserError

LAYER_COLUMNS = [
    ("layer", "layer", ""),
    ("skewness", "skew", ".2f"),
    ("skewness_step_mean", "skew/step", ".2f"),
    ("skewness_step_max", "skew/step max", ".2f"),
    ("gini", "gini", ".3f"),
    ("top_share", "top share", ".3f"),
    ("drift_jsd", "drift JSD", ".4f"),
    ("affinity_next", "l->l+1 hit", ".3f"),
    ("affinity_token_id", "token-id hit", ".3f"),
    ("affinity_baseline", "baseline", ".3f"),
]


def register(sub: argparse._SubParsersAction) -> None:
    trace = sub.add_parser("trace", help="inspect, validate, synthesise or import router traces",
                           description="Work with router traces (Parquet, see docs/trace-format.md).")
    tsub = trace.add_subparsers(dest="trace_command", metavar="ACTION")
    tsub.required = True

    p = tsub.add_parser(
        "inspect", help="model and shape summary, then per-layer skew, drift and layer affinity",
        description=(
            "Print a trace's model and shape, then per layer: skew (max/mean expert load over the whole "
            "trace; per step mean and max), Gini coefficient, top-expert share, drift (Jensen-Shannon "
            "divergence between consecutive steps), and how well a token's top-1 expert at layer l "
            "predicts its top-1 at l+1, and how well its token id does (cross-fitted hit rates, against "
            "the most-frequent baseline). "
            "Definitions: docs/trace-format.md."),
    )
    p.add_argument("file", help="trace file (.parquet)")
    p.add_argument("--json", action="store_true", help="print the same numbers as JSON")
    p.set_defaults(func=cmd_inspect)

    p = tsub.add_parser("validate", help="check a trace against the format; exit 2 with the first problem",
                        description="Fully validate a trace, reading it in chunks of whole steps (memory "
                                    "stays that of one chunk); prints 'ok' with its shape, or the first problem "
                                    "(file, column, row) and exits 2. What is checked: "
                                    "docs/trace-format.md.")
    p.add_argument("file", help="trace file (.parquet)")
    p.set_defaults(func=cmd_validate)

    from moe_gps.trace.synth import PROFILES  # light: numpy only
    p = tsub.add_parser(
        "synth", help="generate a seeded synthetic trace from a profile",
        description=("Generate a synthetic trace: per-token routing (tokens kind), or per-expert loads only "
                     "(--kind counts: fast at any scale, e.g. 10000 steps of DeepSeek-V3, written a block of "
                     "steps at a time). The file says source: synthetic and records every generator parameter. "
                     "Profiles: " + "; ".join(f"{n} ({pr.calibrated_to})" for n, pr in PROFILES.items())
                     + ". The routing model: docs/trace-format.md."),
    )
    p.add_argument("--profile", default="mixtral-mmlu", choices=sorted(PROFILES), help="default: %(default)s")
    p.add_argument("--kind", default="tokens", choices=("tokens", "counts"),
                   help="tokens: every token's experts; counts: tokens per expert per step and layer "
                        "(default: %(default)s)")
    p.add_argument("--steps", type=int, default=64, help="forward passes, at least 1 (default: %(default)s)")
    p.add_argument("--tokens-per-step", "--tokens", dest="tokens", type=int, default=512, metavar="N",
                   help="tokens per step, at least 1 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--weights", action="store_true", help="also write gate weights (larger file)")
    p.add_argument("--set", action="append", default=[], metavar="PARAM=VALUE",
                   help="override a profile parameter, e.g. --set layer_affinity=0 --set drift=0.2 "
                        "(see docs/trace-format.md for the routing model)")
    p.add_argument("-o", "--output", required=True, help="output trace (.parquet)")
    p.set_defaults(func=cmd_synth)

    p = tsub.add_parser(
        "rechunk", help="regroup a trace's own tokens into steps of N tokens",
        description=("Cut the trace's tokens, in trace order, into steps of exactly N tokens: consecutive small "
                     "steps are concatenated and a large step is split, keeping every (token, layer, expert) "
                     "assignment, token id, sequence, position, rank and gate weight. Tokens after the last "
                     "whole step are left out. A counts trace regroups only into whole multiples of its steps. "
                     "The result is validated and written atomically. "
                     "Regrouping: docs/simulator.md; its record in the trace: docs/trace-format.md."))
    p.add_argument("file", help="trace file (.parquet)")
    p.add_argument("--tokens-per-step", type=int, required=True, metavar="N",
                   help="tokens per regrouped step (at least 1, at most the trace's tokens)")
    p.add_argument("-o", "--output", required=True, help="output trace (.parquet)")
    p.set_defaults(func=cmd_rechunk)

    from moe_gps.cli.trace_import_cmd import register_import
    register_import(tsub)


def regroup_by_flag(trace, tokens_per_step: int, flag: str = "--tokens-per-step"):
    """:func:`~moe_gps.trace.regroup.regroup` with the problems of ``flag``'s value named by the flag (a value
    >= 1: the callers check that before the trace loads)."""
    from moe_gps.trace.regroup import regroup, regrouped_steps

    n = tokens_per_step
    total = int(trace.tokens_per_step.sum())
    if regrouped_steps(trace, n) < 1 and total < n:
        raise UserError(f"{flag} {n}: the trace holds {total} tokens, fewer than one step of {n}")
    try:
        return regroup(trace, n)
    except UserError as err:
        raise UserError(f"{flag} {n}: {err}") from None


def cmd_inspect(args: argparse.Namespace) -> int:
    from moe_gps.jsonsafe import dumps_json
    from moe_gps.tables import format_table
    from moe_gps.trace import load_trace
    from moe_gps.trace.stats import summarize

    summary = summarize(load_trace(args.file), progress=sys.stderr.isatty())
    if args.json:
        print(dumps_json(summary.to_dict(), indent=2))
        return 0
    s = summary
    print(f"{args.file}: {s.kind} trace, source: {s.source}")
    print(f"  model {s.model}, dataset {s.dataset}")
    print(f"  {s.num_layers} layers x {s.num_experts} experts, top-{s.top_k}; {s.num_steps} steps, "
          f"{s.num_tokens} tokens ({s.tokens_per_step_min}..{s.tokens_per_step_max} per step)")
    extras = (["gate weights"] if s.has_weights else []) + s.optional_columns
    print(f"  columns beyond the experts: {', '.join(extras) if extras else 'none'}")
    if s.empty_steps:
        n = s.empty_steps
        print(f"  {n} step{'s route' if n != 1 else ' routes'} no token; the per-step skew and the drift (between "
              f"consecutive steps that route tokens) leave {'them' if n != 1 else 'it'} out")
    print()
    rows = [vars(layer) for layer in s.layers]
    overall = {"layer": "mean", **s.overall()}
    print(format_table(rows + [overall], LAYER_COLUMNS))
    print()
    print(f"skewness: mean over layers {overall['skewness']:.2f}, worst layer "
          f"{overall['skewness_worst_layer']:.2f} (max/mean expert load, whole trace)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from moe_gps.trace import validate_trace

    m, num_steps = validate_trace(args.file)
    print(f"{args.file}: ok ({m.kind} trace, {num_steps} steps, {m.num_layers} layers, "
          f"{m.num_experts} experts, top-{m.top_k}, source: {m.source})")
    return 0


#: bytes per (step, layer, expert) count of a counts trace before compression (an int64)
COUNT_BYTES = 8


#: the most a counts trace's Parquet file compresses its int64 counts by (zstd; about 7x measured on
#: DeepSeek-V3-sized synthetic counts): the disk check refuses only what cannot fit even so
COUNTS_COMPRESSION = 16


def check_counts_disk(output: str, steps: int, profile, sizes: str) -> None:
    """A UserError naming the size flags when a counts trace's file cannot fit the free space of the
    output's folder even compressed :data:`COUNTS_COMPRESSION` times (its counts take steps x layers x
    experts x 8 bytes before compression)."""
    import os
    import shutil

    from moe_gps.tables import format_bytes

    raw = steps * profile.num_layers * profile.num_experts * COUNT_BYTES
    least = raw // COUNTS_COMPRESSION
    folder = os.path.dirname(os.path.abspath(output))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return                           # unknown: the writer reports a full disk as one line
    if least > free:
        raise UserError(f"{sizes}: the counts take {format_bytes(raw)} before compression ({steps} steps x "
                        f"{profile.num_layers} layers x {profile.num_experts} experts x {COUNT_BYTES} bytes), at "
                        f"least {format_bytes(least)} compressed, more than the {format_bytes(free)} free in "
                        f"{folder}; make it smaller")


def cmd_synth(args: argparse.Namespace) -> int:
    from moe_gps.errors import environment_error
    from moe_gps.tables import format_bytes
    from moe_gps.trace import CountsWriter, write_trace
    from moe_gps.trace.synth import available_memory, get_profile, memory_needed, parse_setting, synthesize
    from moe_gps.trace.synth_counts import counts_blocks, counts_meta
    from moe_gps.trace.validate import MAX_ASSIGNMENTS

    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    for flag, value in (("--steps", args.steps), ("--tokens-per-step", args.tokens)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.kind == "counts" and args.weights:
        raise UserError("--weights: a counts trace has no gate weights (use --kind tokens)")
    from moe_gps.outputs import check_trace_output
    check_trace_output(args.output)
    overrides = dict(parse_setting(item) for item in args.set)
    profile = get_profile(args.profile, **overrides)
    if args.kind == "counts" and profile.top_k * args.tokens >= MAX_ASSIGNMENTS:
        raise UserError(f"--tokens-per-step {args.tokens}: top_k x tokens = {profile.top_k * args.tokens} assignments per step "
                        f"and layer, more than the 2^40 a counts trace may hold")
    sizes = " ".join([f"--steps {args.steps} --tokens-per-step {args.tokens}"] + [f"--set {s}" for s in args.set])
    if args.kind == "counts":
        check_counts_disk(args.output, args.steps, profile, sizes)
    progress = sys.stderr.isatty()
    try:
        if args.kind == "counts":
            from tqdm import tqdm

            profile, meta = counts_meta(profile, args.steps, args.tokens, args.seed)
            with CountsWriter(args.output, meta) as writer, \
                    tqdm(total=args.steps, desc="synth", unit="step", leave=False, disable=not progress,
                         file=sys.stderr) as bar:
                for block in counts_blocks(profile, args.steps, args.tokens, args.seed):
                    writer.write_steps(block)
                    bar.update(len(block))
        else:
            need, have = memory_needed(profile, args.steps, args.tokens, args.weights), available_memory()
            if have is not None and need > have:
                raise UserError(f"{sizes}: the trace needs about {format_bytes(need)} of memory, "
                                f"{format_bytes(have)} is available; make it smaller")
            write_trace(args.output, synthesize(profile, num_steps=args.steps, tokens_per_step=args.tokens,
                                                seed=args.seed, with_weights=args.weights, progress=progress))
    except MemoryError as err:
        raise environment_error(err, flag=sizes) from None
    print(f"wrote {args.output}: synthetic {args.kind} trace, profile {profile.name}, {args.steps} steps x "
          f"{args.tokens} tokens, {profile.num_layers} layers, {profile.num_experts} experts, top-{profile.top_k}, "
          f"seed {args.seed}")
    return 0


def cmd_rechunk(args: argparse.Namespace) -> int:
    from moe_gps.atomic import atomic_path
    from moe_gps.outputs import check_trace_output, same_file
    from moe_gps.trace import load_trace, write_trace
    from moe_gps.trace.regroup import describe_tokens_per_step

    check_trace_output(args.output)
    if same_file(args.file, args.output):   # regrouping leaves tokens out: the input would be lost
        raise UserError(f"{args.output}: the output would overwrite the trace it regroups, {args.file}; "
                        "write it to another file")
    if args.tokens_per_step < 1:
        raise UserError(f"--tokens-per-step must be >= 1, got {args.tokens_per_step}")
    trace = load_trace(args.file)
    out = regroup_by_flag(trace, args.tokens_per_step)
    with atomic_path(args.output) as tmp:   # in place only once the written file passes the full validation
        write_trace(tmp, out)
        try:
            load_trace(tmp)
        except UserError as err:
            raise UserError(str(err).replace(str(tmp), str(args.output))) from None
    r = out.meta.provenance["regrouped"]
    left = f"; {r['tokens_left_out']} tokens after the last whole step left out" if r["tokens_left_out"] else ""
    steps = lambda n: f"{n} step{'s' if n != 1 else ''}"  # noqa: E731
    print(f"wrote {args.output}: {steps(trace.num_steps)} of {describe_tokens_per_step(trace)} tokens regrouped into "
          f"{steps(out.num_steps)} of {args.tokens_per_step}{left}")
    return 0
