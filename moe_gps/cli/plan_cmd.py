"""``moe-gps plan``: plan expert placement from a trace's expert loads."""

from __future__ import annotations

import argparse
import math
import sys

from moe_gps.errors import UserError
from moe_gps.outputs import same_file

ALGORITHM_HELP = ("none: no copies, vLLM's linear (E/N contiguous experts per GPU) or round_robin layout "
                  "(--layout); greedy: MoE-GPS paper Algorithm 1; "
                  "eplb: DeepSeek EPLB (hierarchical with --nodes > 1 and --groups); waterfill: ours, uneven "
                  "replica shares, migration-aware with --previous")

#: the line under plan's table: what balancedness does not say
BALANCEDNESS_CAVEAT = ("balancedness is how evenly tokens spread, not speed: moe-gps simulate also prices each "
                       "replica's weight read and the copies (docs/simulator.md)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="plan which experts to duplicate and where (writes the placement YAML named by -o)",
        description=("Sum the expert loads of the chosen steps of a trace, plan a placement for all layers "
                     "and write it as YAML for the simulator and runtime; optionally export the map for "
                     "SGLang or vLLM and print the server flags that go with it. Prints balancedness (mean/max GPU "
                     "load: per layer, then averaged; and vLLM's sum over layers of mean / sum of max) against the "
                     "static layout. "
                     "Definitions: docs/placement.md."))
    p.add_argument("trace", help="trace file (.parquet), tokens or counts kind")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the expert-parallel group (at least 1)")
    p.add_argument("--redundant", "--redundant-slots", dest="redundant", type=int, default=0, metavar="R",
                   help="extra slots per layer in total, >= 0; experts + redundant must divide by --gpus (default 0: "
                        "the plan holds only the slots asked for, as the server it is for is started with them; "
                        "simulate adds one per GPU by default)")
    from moe_gps.placement.planner import ALGORITHMS
    p.add_argument("--algorithm", default="eplb", choices=ALGORITHMS, help=ALGORITHM_HELP + " (default: eplb)")
    p.add_argument("--steps", default="all",
                   help="steps whose loads are summed: 'all', 'A:B' (half-open, like Python), or a comma list "
                        "such as '0,4,8' or '0:16,32:48'; a step named twice counts once, and a range past the "
                        "last step is cut to it, each with a note; a value that starts with '-' goes after '=', "
                        "as --steps=-16: (default: all)")
    p.add_argument("--nodes", type=int, default=1,
                   help="eplb: nodes; more than 1 runs DeepSeek's hierarchical variant (expert groups packed onto "
                        "nodes, then replicas placed within each node), which needs --groups a multiple of --nodes "
                        "and --gpus a multiple of --nodes (default 1: the global variant)")
    p.add_argument("--groups", type=int, default=1,
                   help="eplb with --nodes > 1: expert groups, a multiple of --nodes that divides the experts "
                        "(default 1)")
    p.add_argument("--threshold", type=float, default=None,
                   help="greedy/waterfill: stop copying when hottest - coldest GPU <= threshold x mean "
                        "(defaults: greedy 0.05, waterfill 0)")
    p.add_argument("--max-copies", type=int, default=None,
                   help="greedy/waterfill: copies per layer at most (>= 0; default: --redundant)")
    p.add_argument("--previous", metavar="PLAN", help="placement in force (YAML): bytes moved, and migration-"
                                                      "aware planning for waterfill; -o may name it, and the new "
                                                      "plan then replaces it")
    p.add_argument("--expert-mib", type=float, default=None,
                   help="MiB of one expert's weights in one layer, for memory and bytes moved "
                        "(e.g. Mixtral 8x7B bf16: 336; default: none, and memory and bytes moved are not reported)")
    p.add_argument("--max-slots-per-gpu", type=int, default=None,
                   help="capacity: slots per GPU at most (at least 1; default: no limit)")
    p.add_argument("-o", "--output", required=True, help="placement file to write (.yaml or .yml)")
    p.add_argument("--layout", choices=("linear", "round_robin"), default=None,
                   help="--algorithm none: vLLM's --expert-placement-strategy layout (default: linear)")
    p.add_argument("--sglang", metavar="FILE", help="also write SGLang --init-expert-location JSON "
                   "(physical_to_logical_map, one row per decoder layer)")
    p.add_argument("--sglang-logical-count", metavar="FILE", help="also write SGLang --init-expert-location JSON "
                   "holding the loads (logical_count); SGLang then plans with its own EPLB")
    p.add_argument("--vllm", metavar="FILE", help="also write a vLLM physical_to_logical_map JSON (MoE layers) in "
                   "the format of vLLM pull request #49572 (eplb_config.initial_expert_map_path, not in a vLLM "
                   "release yet)")
    p.add_argument("--vllm-ascend", metavar="FILE", help="also write a vLLM Ascend expert_map_path JSON")
    p.add_argument("--num-hidden-layers", type=int, default=None,
                   help="sglang exports: decoder layers of the model (config num_hidden_layers; default: from the "
                        "trace's provenance, else refused)")
    p.add_argument("--first-moe-layer", type=int, default=None,
                   help="sglang exports: decoder layer of the trace's first MoE layer, the others following it "
                        "(e.g. 3 for DeepSeek-V3; default: from the trace's provenance)")
    p.add_argument("--ep-num-redundant-experts", type=int, default=None, metavar="R",
                   help="sglang exports: the value the server will run with; refused unless it equals --redundant")
    p.add_argument("--per-layer", action="store_true", help="also print balancedness per layer")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    p.set_defaults(func=cmd_plan)


def parse_steps(spec: str, num_steps: int, repeated: list[int] | None = None,
                cut: list[str] | None = None) -> list[int]:
    """'all' | 'A:B' | 'a,b,c' | mixes such as '0:4,9' -> sorted unique step indices. A step named more than
    once (also by overlapping pieces) counts once; ``repeated``, when given, receives those steps, and
    ``cut`` the 'A:B' pieces that run past the trace's last step (cut to it, as Python slices are)."""
    spec = spec.strip()
    if spec in ("all", ""):
        return list(range(num_steps))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if ":" in part:
                a, b = part.split(":", 1)
                sl = slice(int(a) if a.strip() else None, int(b) if b.strip() else None)
                picked = list(range(num_steps)[sl])
                if len(picked) == 0:
                    raise UserError(f"--steps: '{part}' selects no step (the trace has {num_steps} steps)")
                if cut is not None and sl.stop is not None and sl.stop > num_steps:
                    cut.append(part)
            else:
                s = int(part)
                if not -num_steps <= s < num_steps:
                    raise UserError(f"--steps: step {s} is out of range (the trace has {num_steps} steps, 0.."
                                    f"{num_steps - 1})")
                picked = [s % num_steps]
        except ValueError:
            raise UserError(f"--steps: cannot read '{part}'; use 'all', 'A:B' or a comma list of steps") from None
        if repeated is not None:
            repeated += sorted(set(picked) & out - set(repeated))
        out.update(picked)
    return sorted(out)


def check_distinct_outputs(outputs: list[tuple[str, str]], trace: str, previous: str | None) -> None:
    """Every output file (flag, path) is its own file: not the input trace, not another output of the
    command, and, for the exports, not the ``--previous`` placement."""
    for i, (flag, path) in enumerate(outputs):
        if same_file(path, trace):
            raise UserError(f"{flag} {path}: the output would overwrite the input trace {trace}")
        if previous and flag != "-o" and same_file(path, previous):
            raise UserError(f"{flag} {path}: the export would overwrite the --previous placement {previous}")
        for other_flag, other in outputs[:i]:
            if same_file(path, other):
                raise UserError(f"{flag} {path}: the output would overwrite the {other_flag} output {other}; "
                                "give each output its own file")


def check_threshold(threshold: float | None) -> None:
    """The greedy/waterfill threshold (hottest - coldest GPU, in units of the mean GPU load): finite and >= 0."""
    if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
        raise UserError(f"--threshold must be >= 0 and finite, got {threshold}")


def expert_mib_bytes(mib: float | None) -> int | None:
    """Bytes of one expert's weights in one layer, from --expert-mib (finite, > 0, at least one byte)."""
    if mib is None:
        return None
    if not (math.isfinite(mib) and mib > 0):
        raise UserError(f"--expert-mib must be > 0 and finite, got {mib}")
    size = mib * 2**20
    if not math.isfinite(size):
        raise UserError(f"--expert-mib {mib} is too large for the MiB of one expert's weights in one layer")
    if round(size) <= 0:
        raise UserError(f"--expert-mib {mib} is less than one byte; give the MiB of one expert's weights in one layer")
    return int(round(size))


def check_plan_flags(args: argparse.Namespace) -> None:
    """The numbers of ``moe-gps plan`` that need no trace, each named by its flag."""
    if args.gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {args.gpus}")
    if args.redundant < 0:
        raise UserError(f"--redundant must be >= 0, got {args.redundant}")
    for flag, value in (("--nodes", args.nodes), ("--groups", args.groups), ("--max-slots-per-gpu",
                                                                              args.max_slots_per_gpu)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    for flag, value in (("--max-copies", args.max_copies), ("--ep-num-redundant-experts",
                                                            args.ep_num_redundant_experts)):
        if value is not None and value < 0:
            raise UserError(f"{flag} must be >= 0, got {value}")
    if args.algorithm == "eplb":
        if args.nodes == 1 and args.groups != 1:
            raise UserError(f"--groups {args.groups}: expert groups apply to the hierarchical EPLB only, with "
                            "--nodes > 1 (with one node EPLB runs its global variant, which has no groups)")
        if args.nodes > 1 and args.groups % args.nodes:
            raise UserError(f"--nodes {args.nodes} --groups {args.groups}: the hierarchical EPLB packs whole "
                            f"expert groups onto nodes, so --groups must be a multiple of --nodes (DeepSeek's EPLB "
                            "would silently fall back to its global variant)")
        if args.gpus % args.nodes:
            raise UserError(f"--gpus {args.gpus}: {args.gpus} GPUs do not divide over --nodes {args.nodes}")


def check_plan_shape(args: argparse.Namespace, num_experts: int) -> None:
    """The numbers of ``moe-gps plan`` checked against the trace's experts, each named by its flag."""
    from moe_gps.placement.planner import check_redundant_slots

    E, N, R = num_experts, args.gpus, args.redundant
    if N == 1 and R:
        raise UserError(f"--redundant {R}: with one GPU a redundant slot moves no load between GPUs; use 0")
    check_redundant_slots(E, N, R, "--redundant")
    if (E + R) % N == 0 and args.max_slots_per_gpu is not None and (E + R) // N > args.max_slots_per_gpu:
        raise UserError(f"--max-slots-per-gpu {args.max_slots_per_gpu}: {E} experts + {R} redundant = {E + R} "
                        f"slots over {N} GPUs is {(E + R) // N} slots per GPU, more than the capacity of "
                        f"{args.max_slots_per_gpu}; allow more, or use fewer redundant slots or more GPUs")
    if args.algorithm == "eplb" and args.nodes > 1:
        if E % args.groups:
            raise UserError(f"--groups {args.groups}: the trace's {E} experts do not divide into {args.groups} "
                            "groups")


def cmd_plan(args: argparse.Namespace) -> int:
    from moe_gps.placement import Capacity, load_placement, placement_metrics, plan_placement, save_placement
    from moe_gps.atomic import write_text_atomic
    from moe_gps.jsonsafe import dumps_json
    from moe_gps.outputs import check_output_file
    from moe_gps.placement.export import even_share_balancedness, server_flags, sglang_static_balancedness
    from moe_gps.tables import format_indices, format_table
    from moe_gps.trace import load_trace

    outputs = [("-o" if flag == "output" else "--" + flag.replace("_", "-"), getattr(args, flag))
               for flag in ("output", "sglang", "sglang_logical_count", "vllm", "vllm_ascend") if getattr(args, flag)]
    check_plan_flags(args)
    for flag, path in outputs:
        check_output_file(path, flag)
    check_distinct_outputs(outputs, args.trace, args.previous)
    if not args.output.lower().endswith((".yaml", ".yml")):
        raise UserError(f"-o {args.output}: the placement is written as YAML; give a file name ending in .yaml "
                        "or .yml")
    for flag, path in outputs:
        if flag in ("--sglang", "--sglang-logical-count", "--vllm-ascend") and not path.endswith(".json"):
            raise UserError(f"{flag} {path}: the server reads this file as JSON only when its name ends in .json "
                            "(SGLang parses any other name as inline JSON text; vLLM Ascend refuses it)")
    check_threshold(args.threshold)
    expert_bytes = expert_mib_bytes(args.expert_mib)
    trace = load_trace(args.trace)
    check_plan_shape(args, trace.meta.num_experts)
    counts = trace.counts()                                   # [steps, layers, experts]
    repeated: list[int] = []
    cut: list[str] = []
    steps = parse_steps(args.steps, counts.shape[0], repeated, cut)
    if cut:
        print(f"moe-gps: note: --steps {', '.join(cut)} runs past the trace's {counts.shape[0]} steps; "
              f"its steps up to {counts.shape[0] - 1} are used", file=sys.stderr)
    if repeated:
        print(f"moe-gps: note: --steps names step{'s' if len(repeated) > 1 else ''} {format_indices(repeated)} more "
              "than once; the loads of every step are summed once", file=sys.stderr)
    loads = counts[steps].sum(axis=0)
    if loads.sum() == 0:
        raise UserError(f"{args.trace}: the selected steps route no tokens; nothing to balance")

    options: dict = {}
    if args.layout is not None:
        if args.algorithm != "none":
            raise UserError("--layout applies to --algorithm none only")
        options["layout"] = args.layout
    if args.algorithm == "eplb":
        options.update(num_nodes=args.nodes, num_groups=args.groups)
    elif args.nodes != 1 or args.groups != 1:
        raise UserError("--nodes and --groups apply to --algorithm eplb only")
    if args.algorithm in ("greedy", "waterfill"):
        if args.threshold is not None:
            options["threshold"] = args.threshold
        if args.max_copies is not None:
            options["max_copies"] = args.max_copies
    elif args.threshold is not None or args.max_copies is not None:
        raise UserError("--threshold and --max-copies apply to --algorithm greedy and waterfill only")
    capacity = Capacity(max_slots_per_gpu=args.max_slots_per_gpu, expert_bytes=expert_bytes)
    previous = load_placement(args.previous) if args.previous else None

    try:
        plan = plan_placement(loads, args.gpus, args.redundant, args.algorithm, previous=previous,
                              capacity=capacity, **options)
    except UserError as err:                  # the placement in force does not fit these loads: say which file
        if previous is not None and str(err).startswith("previous placement"):
            raise UserError(f"--previous {args.previous}: {err}") from None
        raise
    static = plan_placement(loads, args.gpus, args.redundant, "none", capacity=capacity)
    m = placement_metrics(plan, loads, previous, expert_bytes)
    m0 = placement_metrics(static, loads, previous, expert_bytes)
    meta = trace.meta
    from moe_gps import __version__
    from moe_gps.provenance import file_sha256

    plan.meta.update({
        "trace": str(args.trace), "trace_sha256": file_sha256(args.trace), "moe_gps_version": __version__,
        "model": meta.model, "dataset": meta.dataset, "trace_source": meta.source,
        "steps": args.steps, "num_steps_used": len(steps), "tokens_per_layer": float(loads.sum(axis=1).mean()),
        "previous": args.previous, "command": "moe-gps " + " ".join(sys.argv[1:]),
        "predicted": {k: v for k, v in m.summary().items() if v is not None},
    })
    exports = [(fmt, path) for fmt, path in (("sglang", args.sglang), ("sglang-logical-count", args.sglang_logical_count),
                                             ("vllm", args.vllm), ("vllm-ascend", args.vllm_ascend)) if path]
    # render every export first, so that a bad export flag fails before any file is written
    texts, layers = _export_texts(plan, loads, exports, meta, args)
    save_placement(plan, args.output)
    for (_, path), text in zip(exports, texts):
        write_text_atomic(path, text)
    flags = [(fmt, path, server_flags(plan, fmt, path)) for fmt, path in exports]

    if args.json:
        out = {"output": args.output, "plan": m.summary(), "static": m0.summary(),
               "planning_seconds": plan.meta["planning_seconds"],
               "balancedness_per_layer": m.balancedness.round(6).tolist(),
               "exports": [{"format": fmt, "path": path, "server_flags": f} for fmt, path, f in flags]}
        if layers is not None:
            out["decoder_layers"] = {"moe_layer_ids": layers.ids, "num_hidden_layers": layers.total,
                                     "source": layers.source}
        print(dumps_json(out, indent=2))
    else:
        print(f"trace: {meta.model}, {meta.dataset}, source {meta.source}; {plan.num_layers} layers x "
              f"{plan.num_experts} experts; loads summed over {len(steps)} of {counts.shape[0]} steps")
        print(f"{plan.num_gpus} GPUs x {plan.slots_per_gpu} slots ({plan.num_redundant} redundant per layer); "
              f"algorithm {plan.algorithm} {_options_text(plan.meta['options'])}")
        print()
        print(format_table(_comparison(m0, m, args.algorithm, plan.meta["planning_seconds"]),
                           [("metric", "metric", ""), ("static", "static (none)", ""), ("plan", args.algorithm, "")]))
        if args.per_layer:
            print()
            rows = [{"layer": i, "before": float(m0.balancedness[i]), "after": float(m.balancedness[i]),
                     "skew": float(m.skewness_before[i]), "used": int(m.redundant_used[i])}
                    for i in range(plan.num_layers)]
            print(format_table(rows, [("layer", "layer", ""), ("skew", "expert skew", ".2f"),
                                      ("before", "bal. static", ".4f"), ("after", "bal. plan", ".4f"),
                                      ("used", "copies used", "")]))
        print()
        print(BALANCEDNESS_CAVEAT)
        print()
        print(f"wrote {args.output}" + "".join(f", {path} ({fmt})" for fmt, path in exports))
        if layers is not None:
            print(f"sglang rows: {layers.total} decoder layers, the plan's {plan.num_layers} MoE layers on "
                  f"{format_indices(layers.ids)} ({layers.source})")
        for fmt, path, f in flags:
            server = {"sglang": "SGLang", "sglang-logical-count": "SGLang (runs its own EPLB on the counts)",
                      "vllm": "vLLM with pull request #49572 (in no vLLM release yet)",
                      "vllm-ascend": "vLLM Ascend"}[fmt]
            print(f"run {server} with: {f}")
            if fmt == "vllm":
                print(f"  (EP size = --tensor-parallel-size x --data-parallel-size (x the prefill context parallel "
                      f"size, where used) must be {plan.num_gpus}; vLLM re-plans every step_interval steps, default "
                      "3000, from its own load window)")
            if fmt.startswith("sglang"):
                print(f"  (the world size, --tp-size x --pp-size, must be {plan.num_gpus} too: the file puts slot s "
                      f"on rank s // {plan.slots_per_gpu}; only for a model class that describes its expert layout "
                      "to SGLang, as DeepSeek-V2/V3's and Qwen-MoE's do; with any other SGLang assumes one expert "
                      "per layer and fails on the file at start-up)")
                if "mixtral" in str(meta.model).lower():
                    print(f"moe-gps: warning: {meta.model}: SGLang's Mixtral class did not describe its expert "
                          "layout in the versions read (docs/placement.md); check yours before using the file",
                          file=sys.stderr)
    planned = float(m.balancedness.mean())
    if any(fmt.startswith("vllm") for fmt, _ in exports) and not plan.shares_are_even:
        sys.stdout.flush()
        even = float(even_share_balancedness(plan, loads).mean())
        print(f"moe-gps: note: vLLM splits an expert's tokens evenly over its replicas; this plan's uneven shares "
              f"are not in the exported map, which gives balancedness {even:.4f} with an even split (plan: "
              f"{planned:.4f})", file=sys.stderr)
    if any(fmt == "sglang" for fmt, _ in exports):
        sys.stdout.flush()
        static = float(sglang_static_balancedness(plan, loads).mean())
        print(f"moe-gps: note: SGLang's static dispatch (on with --init-expert-location) sends a rank's tokens of "
              f"an expert to its own replica when it holds one, else to one replica, the ranks without one spread "
              f"evenly over them: this layout gives balancedness {static:.4f} there, tokens starting evenly over "
              f"the ranks (plan: {planned:.4f}; docs/placement.md)",
              file=sys.stderr)
    return 0


def _export_texts(plan, loads, exports: list[tuple[str, str]], meta, args) -> tuple[list[str], object]:
    """The text of every export, and the decoder layers when an SGLang file needs them (else None)."""
    from moe_gps.placement.export import export_text, sglang_logical_count
    from moe_gps.trace.layer_ids import decoder_layers

    layers = None
    if any(fmt.startswith("sglang") for fmt, _ in exports):
        layers = decoder_layers(plan.num_layers, meta.provenance, args.num_hidden_layers, args.first_moe_layer)
        r = args.ep_num_redundant_experts
        if r is not None and r != plan.num_redundant:
            raise UserError(f"--ep-num-redundant-experts {r} differs from the plan's {plan.num_redundant} redundant "
                            f"slots per layer: SGLang would expect {plan.num_experts + r} physical experts per layer "
                            f"and the map has {plan.num_slots}; plan with --redundant {r} or run SGLang with "
                            f"--ep-num-redundant-experts {plan.num_redundant}")
    elif args.num_hidden_layers is not None or args.first_moe_layer is not None \
            or args.ep_num_redundant_experts is not None:
        raise UserError("--num-hidden-layers, --first-moe-layer and --ep-num-redundant-experts apply to the "
                        "--sglang and --sglang-logical-count exports only")
    texts = [sglang_logical_count(loads, layers) if fmt == "sglang-logical-count" else export_text(plan, fmt, layers)
             for fmt, _ in exports]
    return texts, layers


def _options_text(options: dict) -> str:
    shown = {k: v for k, v in options.items() if v is not None}
    return "(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")" if shown else ""


def _comparison(m0, m, name: str, seconds: float) -> list[dict]:
    from moe_gps.tables import format_bytes

    a, b = m0.summary(), m.summary()
    rows = [
        ("balancedness (mean over layers)", f"{a['balancedness']:.4f}", f"{b['balancedness']:.4f}"),
        ("balancedness (worst layer)", f"{a['balancedness_min']:.4f}", f"{b['balancedness_min']:.4f}"),
        ("balancedness (vLLM: sum mean / sum max)", f"{a['balancedness_vllm']:.4f}", f"{b['balancedness_vllm']:.4f}"),
        ("GPU skew (max/mean GPU load)", f"{a['gpu_skewness']:.3f}", f"{b['gpu_skewness']:.3f}"),
        ("expert skew (max/mean expert load)", f"{a['skewness_before']:.3f}", f"{b['skewness_before']:.3f}"),
        ("replica skew (max/mean replica load)", f"{a['replica_skewness']:.3f}", f"{b['replica_skewness']:.3f}"),
        ("redundant replicas used (mean/layer)", f"{a['redundant_used']:.1f}", f"{b['redundant_used']:.1f}"),
        ("extra slots per GPU", f"{a['extra_slots_per_gpu']:.2f}", f"{b['extra_slots_per_gpu']:.2f}"),
        ("extra expert memory per GPU", format_bytes(a["extra_memory_per_gpu"]),
         format_bytes(b["extra_memory_per_gpu"])),
    ]
    if b["experts_moved"] is not None:
        rows.append(("experts moved vs --previous", str(a["experts_moved"]), str(b["experts_moved"])))
        rows.append(("bytes moved vs --previous", format_bytes(a["bytes_moved"]), format_bytes(b["bytes_moved"])))
    rows.append(("planning time", "-", f"{seconds * 1e3:.1f} ms"))
    return [{"metric": r[0], "static": r[1], "plan": r[2]} for r in rows]
