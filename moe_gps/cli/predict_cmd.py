"""``moe-gps predict``: evaluate load predictors of both kinds on a trace, or list them."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import textwrap

from moe_gps.errors import UserError
from moe_gps.jsonsafe import dumps_json

DIST_COLUMNS = [
    ("label", "predictor", ""),
    ("mode", "mode", ""),
    ("eps_mean", "eps mean", ".4f"),
    ("eps_max", "eps max", ".4f"),
    ("jsd", "JSD bits", ".5f"),
    ("balancedness", "balanced", ".4f"),
    ("balancedness_vllm", "bal. vLLM", ".4f"),
    ("flops_per_token", "flops/tok", ".4g"),
    ("bytes_per_token", "B/tok", ".4g"),
    ("fixed_flops_per_step", "flops/step", ".4g"),
    ("fixed_bytes_per_step", "B/step", ".4g"),
    ("seconds", "time s", ".2f"),
]
TOKEN_COLUMNS = [
    ("label", "predictor", ""),
    ("mode", "mode", ""),
    ("top1", "top-1", ".4f"),
    ("recall", "top-k recall", ".4f"),
    ("exact", "exact set", ".4f"),
    ("eps_mean", "eps mean", ".4f"),
    ("balancedness", "balanced", ".4f"),
    ("balancedness_vllm", "bal. vLLM", ".4f"),
    ("flops_per_token", "flops/tok", ".4g"),
    ("bytes_per_token", "B/tok", ".4g"),
    ("fixed_flops_per_step", "flops/step", ".4g"),
    ("fixed_bytes_per_step", "B/step", ".4g"),
    ("seconds", "time s", ".2f"),
]
LAYER_METRICS = ("eps_mean", "eps_max", "jsd", "balancedness", "top1", "recall", "exact")


def _predictor_help() -> str:
    from moe_gps.predict.registry import DISTRIBUTION_PREDICTORS, TOKEN_PREDICTORS

    lines = ["predictors (what each uses; its cost per token or step, per MoE layer):"]
    for title, table in (("distribution-only", DISTRIBUTION_PREDICTORS), ("token-to-expert", TOKEN_PREDICTORS)):
        lines.append(f"  {title}:")
        for name, cls in table.items():
            lines.append(f"    {name}")
            for part, text in (("uses", cls.uses), ("cost", cls.cost_formula)):
                lines += textwrap.wrap(f"{part}: {text}", width=88, initial_indent=" " * 8,
                                       subsequent_indent=" " * 14)
    lines += [
        "",
        "E = experts, k = experts per token, W = window, H = MLP hidden size. 'oracle' reads the true",
        "routing (a bound, not a predictor); 'synthetic' corrupts it to a chosen accuracy (--synthetic).",
        "Metrics and formulas: docs/predictors.md.",
    ]
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    predict = sub.add_parser("predict", help="evaluate expert-load predictors (token-to-expert and distribution-only)",
                             description="Expert-load predictors: evaluate them on a trace, or list them. "
                                         "Predictors and metrics: docs/predictors.md.")
    psub = predict.add_subparsers(dest="predict_command", metavar="ACTION")
    psub.required = True

    p = psub.add_parser(
        "evaluate", help="fit predictors on the first steps of a trace and measure them on the rest",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Fit every predictor on the first N steps of TRACE, predict the remaining steps one at a time "
            "(online: seeing the true routing of earlier steps; offline: not), and print per predictor: "
            "distribution error (eps = |p_hat - p| / (1/E), mean and max over experts; Jensen-Shannon "
            "divergence), the balancedness left after planning replicas from the prediction and routing the "
            "true tokens, token-to-expert hit rates (top-1, top-k recall, exact set), and the predictor's "
            "cost (FLOPs and bytes per token and per step, per MoE layer), overall and per layer.", 88),
        epilog=_predictor_help(),
    )
    p.add_argument("trace", help="trace file (.parquet); token predictors need a tokens trace")
    p.add_argument("--predictors", metavar="LIST",
                   help="comma-separated names (default: all but synthetic); a name in both kinds (oracle) "
                        "selects both, 'distribution:NAME' or 'token:NAME' one")
    p.add_argument("--train-steps", type=int, metavar="N",
                   help="steps to fit on, at least 1 and fewer than the trace's steps (default: half the steps, "
                        "so that the other half tests the predictors)")
    p.add_argument("--tokens-per-step", type=int, metavar="N",
                   help="regroup the trace's own tokens, in order, into steps of N tokens first (as `moe-gps trace "
                        "rechunk`): errors are then those of N-token steps (default: the trace's steps as they are)")
    p.add_argument("--mode", choices=("default", "online", "offline"), default="default",
                   help="online: predictors learn from each step once routed; offline: never; default: each "
                        "predictor's own (profile offline, the rest online)")
    p.add_argument("--gpus", type=int, default=4, metavar="G", help="GPUs for the balancedness metric (default: 4)")
    p.add_argument("--redundant", "--redundant-slots", dest="redundant", type=int, metavar="R",
                   help="redundant expert slots per layer, >= 0 (default: one per GPU, beyond the spares that make "
                        "the experts divide over the GPUs, as simulate's duplicating strategies have; plan's "
                        "default is 0, the slots a server is started with)")
    from moe_gps.placement import ALGORITHMS
    # the choices are listed, and checked (before the trace loads) by cmd_evaluate: a bad one is a UserError
    p.add_argument("--algorithm", default="eplb", metavar="{" + ",".join(ALGORITHMS) + "}",
                   help="placement algorithm that plans replicas from each prediction (default: eplb; see "
                        "docs/placement.md)")
    p.add_argument("--synthetic", metavar="A[,A...]",
                   help="add synthetic token predictors of these accuracies (top-k recall), e.g. 0.9,0.7")
    p.add_argument("--placement", choices=("optimistic", "typical", "pessimistic"),
                   help="with --synthetic: where the synthetic predictors' errors go (default: typical; "
                        "docs/predictors.md)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--synthetic-flops", type=float, metavar="F",
                   help="with --synthetic: the synthetic predictors' cost in FLOPs per token per layer (default: 0)")
    g.add_argument("--overhead-curve", metavar="SCALE,RATE",
                   help="with --synthetic: the synthetic predictors' cost from the exponential curve "
                        "SCALE * exp(-RATE * (1 - a)) FLOPs per token, a their accuracy")
    p.add_argument("--per-layer", default="eps_mean,recall", metavar="METRICS",
                   help=f"per-layer tables of these metrics ({', '.join(LAYER_METRICS)}), or 'none' "
                        "(default: eps_mean,recall)")
    p.add_argument("--seed", type=int, default=0, help="seed of the MLP and synthetic predictors (default: 0)")
    p.add_argument("--json", action="store_true", help="print all results as JSON instead of tables")
    p.add_argument("-o", "--output", "--out", dest="out", metavar="DIR",
                   help="also write predict_summary.csv, predict_per_layer.csv, predict.json and "
                        "predict_config.yaml there")
    p.set_defaults(func=cmd_evaluate)

    p = psub.add_parser("list", help="list the predictors, what each uses and what it costs",
                        formatter_class=argparse.RawDescriptionHelpFormatter, description=_predictor_help())
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_list)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{what}: expected comma-separated numbers, got {text!r}") from None


def cmd_list(args: argparse.Namespace) -> int:
    from moe_gps.predict.registry import DISTRIBUTION_PREDICTORS, TOKEN_PREDICTORS

    if args.json:
        out = {kind: {n: {"uses": c.uses, "cost": c.cost_formula,
                          "default_mode": "online" if c.default_online else "offline"}
                      for n, c in table.items()}
               for kind, table in (("distribution", DISTRIBUTION_PREDICTORS), ("token", TOKEN_PREDICTORS))}
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        print(_predictor_help())
    return 0


def _rows(ev, kind: str) -> list[dict]:
    rows = []
    for r in ev.reports:
        if r.kind != kind or r.skipped:
            continue
        row = {"label": r.label, "mode": r.mode, "seconds": r.seconds, **r.overall}
        if r.cost is not None:
            row.update({k: v for k, v in r.cost.to_dict().items() if k != "note"})
        rows.append(row)
    return rows


def summary_rows(ev) -> list[dict]:
    """One flat row per evaluated predictor (for CSV)."""
    out = []
    for r in ev.reports:
        row = {"kind": r.kind, "name": r.name, "label": r.label, "mode": r.mode, "skipped": r.skipped or "",
               "seconds": r.seconds, **r.overall}
        if r.cost is not None:
            row.update({f"cost_{k}": v for k, v in r.cost.to_dict().items()})
        out.append(row)
    return out


def per_layer_rows(ev) -> list[dict]:
    """One row per (predictor, layer) with every per-layer metric (for CSV)."""
    out = []
    for r in ev.reports:
        if r.skipped:
            continue
        for layer in range(ev.trace["layers"]):
            out.append({"kind": r.kind, "label": r.label, "layer": layer,
                        **{m: v[layer] for m, v in r.per_layer.items()}})
    return out


def _layer_table(ev, metric: str) -> str | None:
    from moe_gps.tables import format_table

    reps = [r for r in ev.reports if not r.skipped and metric in r.per_layer]
    if not reps:
        return None
    labels = []
    for r in reps:
        lab = r.name if sum(x.name == r.name for x in reps) == 1 else r.label
        if sum(x.name == r.name and x.kind != r.kind for x in reps):
            lab = f"{r.kind[0]}:{lab}"
        labels.append(lab)
    rows = [{"layer": l, **{lab: r.per_layer[metric][l] for lab, r in zip(labels, reps)}}
            for l in range(ev.trace["layers"])]
    cols = [("layer", "layer", "")] + [(lab, lab, ".4f") for lab in labels]
    return format_table(rows, cols, title=f"Per layer: {metric} (mean over test steps)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from moe_gps.cli.common_args import note_repeated
    from moe_gps.predict.evaluate import evaluate, parse_predictor_names
    from moe_gps.predict.synthetic import AccuracyOverheadCurve
    from moe_gps.tables import format_table
    from moe_gps.trace import TokensTrace, load_trace

    dist, tok = parse_predictor_names(args.predictors)
    synthetic = _floats(args.synthetic, "--synthetic") if args.synthetic else []
    if args.synthetic and not synthetic:
        raise UserError(f"--synthetic: no accuracy named, got {args.synthetic!r}")
    for a in synthetic:
        if not 0 <= a <= 1:
            raise UserError(f"--synthetic: accuracy must be in [0, 1], got {a}")
    note_repeated("--synthetic", synthetic)               # two identical rows could not be told apart
    synthetic = list(dict.fromkeys(synthetic))
    per_layer = [] if args.per_layer.strip() == "none" else [m.strip() for m in args.per_layer.split(",") if m.strip()]
    bad = [m for m in per_layer if m not in LAYER_METRICS]
    if bad:
        raise UserError(f"--per-layer: unknown metric(s) {', '.join(bad)} (choose from {', '.join(LAYER_METRICS)})")
    if args.gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {args.gpus}")
    from moe_gps.placement import ALGORITHMS
    if args.algorithm not in ALGORITHMS:
        raise UserError(f"--algorithm: unknown placement algorithm {args.algorithm!r}; choose one of "
                        f"{', '.join(ALGORITHMS)}")
    if args.redundant is not None and args.redundant < 0:
        raise UserError(f"--redundant must be >= 0, got {args.redundant}")
    if args.train_steps is not None and args.train_steps < 1:
        raise UserError(f"--train-steps must be at least 1, got {args.train_steps}")
    if args.tokens_per_step is not None and args.tokens_per_step < 1:
        raise UserError(f"--tokens-per-step must be >= 1, got {args.tokens_per_step}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.placement is not None and not args.synthetic:
        raise UserError("--placement is where the errors of the predictors of --synthetic go; give --synthetic too")
    if args.synthetic:
        args.placement = args.placement or "typical"      # recorded only where it applies (a rerun takes it)
    overhead = None
    if args.synthetic_flops is not None:
        if not args.synthetic:
            raise UserError("--synthetic-flops is the overhead of the predictors of --synthetic; give --synthetic too")
        if not 0 <= args.synthetic_flops < float("inf"):          # NaN too
            raise UserError(f"--synthetic-flops must be a finite number >= 0, got {args.synthetic_flops}")
        overhead = args.synthetic_flops
    curve = None
    if args.overhead_curve:
        if not args.synthetic:
            raise UserError("--overhead-curve is the overhead of the predictors of --synthetic; give --synthetic too")
        vals = _floats(args.overhead_curve, "--overhead-curve")
        if len(vals) != 2:
            raise UserError("--overhead-curve: expected SCALE,RATE")
        curve = AccuracyOverheadCurve(*vals)
    if synthetic and curve is not None:
        from moe_gps.predict.synthetic import SyntheticTokenPredictor
        tok = list(tok) + [SyntheticTokenPredictor.from_curve(a, curve, args.placement, args.seed) for a in synthetic]
        synthetic = []
    online = {"default": None, "online": True, "offline": False}[args.mode]
    if args.out:
        from moe_gps.outputs import hold_output_dir
        hold_output_dir(args.out, "--out")

    trace = load_trace(args.trace)
    warnings = []
    regrouped = None
    if args.tokens_per_step is not None:
        from moe_gps.cli.trace_cmd import regroup_by_flag
        from moe_gps.trace.regroup import regroup_note

        trace, regrouped = regroup_by_flag(trace, args.tokens_per_step), regroup_note(trace, args.tokens_per_step)
    if args.train_steps is not None and trace.num_steps >= 2 and args.train_steps >= trace.num_steps:
        raise UserError(f"--train-steps {args.train_steps}: train steps must be between 1 and {trace.num_steps - 1} "
                        f"for a trace of {trace.num_steps} steps{' (once regrouped)' if regrouped else ''}, so that "
                        "a step is left to test")
    m = trace.meta
    warnings += [w for w in (m.aggregate_steps_warning(),) if w]
    if len(trace.tokens_per_step) and int(trace.tokens_per_step.min()) < m.num_experts * m.top_k:
        warnings.append(f"some steps hold fewer tokens ({int(trace.tokens_per_step.min())}) than experts x top_k "
                        f"({m.num_experts} x {m.top_k}): per-step errors are then mostly the step's sampling "
                        f"noise; regroup the steps with --tokens-per-step N")
    counts_only = ""
    if not isinstance(trace, TokensTrace) and args.predictors is None:
        tok, synthetic = [], []
        counts_only = ("token-to-expert predictors not run: this is a counts trace (they need per-token "
                       "routing)")
    ev = evaluate(trace, dist, tok, train_steps=args.train_steps, online=online, num_gpus=args.gpus,
                  num_redundant=args.redundant, algorithm=args.algorithm, synthetic=synthetic,
                  synthetic_placement=args.placement, synthetic_overhead=overhead, seed=args.seed,
                  progress=sys.stderr.isatty())

    ev.warnings = warnings
    if ev.reports and all(r.skipped for r in ev.reports):
        raise UserError("no predictor could run on this trace: " + "; ".join(f"{r.name}: {r.skipped}"
                                                                           for r in ev.reports))
    run = run_record(args, regrouped)
    if args.out:
        from moe_gps.cli.common_args import input_paths
        from moe_gps.outputs import staged_outputs

        # moved in together: a run cut short changes nothing
        with staged_outputs(args.out, inputs=input_paths(args)) as stage:
            _write_outputs(ev, run, stage.path)
    if args.json:
        print(dumps_json({"run": run, **ev.to_dict()}, indent=2))
        return 0

    t = ev.trace
    print(f"trace: {t['model']} / {t['dataset']} (source: {t['source']}): {t['steps']} steps, {t['tokens']} tokens, "
          f"{t['layers']} layers, {t['experts']} experts, top-{t['top_k']}")
    print(f"fit on steps 0-{ev.train_steps - 1}, tested on steps {ev.train_steps}-{t['steps'] - 1} "
          f"({ev.test_steps} step{'s' if ev.test_steps != 1 else ''})")
    if regrouped:
        print(regrouped)
    if "static_balancedness" in ev.reference:
        print(f"balanced = mean/max GPU load of the true tokens under a '{ev.algorithm}' plan made from the "
              f"prediction ({ev.num_gpus} GPUs, {ev.num_redundant} redundant slots), mean over layers and steps; "
              f"bal. vLLM = sum over layers of mean / sum over layers of max GPU load (vLLM's EPLB log), mean "
              f"over steps; no duplication: {ev.reference['static_balancedness']:.4f} / "
              f"{ev.reference.get('static_balancedness_vllm', float('nan')):.4f}")
    print("costs are per MoE layer; time s = fit + predict wall time here")
    for w in warnings:
        print(f"warning: {w}")
    for kind, cols, title in (("distribution", DIST_COLUMNS, "Distribution-only predictors"),
                              ("token", TOKEN_COLUMNS, "Token-to-expert predictors "
                                                       "(eps and balanced: of the loads the predictions imply)")):
        rows = _rows(ev, kind)
        if rows:
            print()
            print(format_table(rows, cols, title=title))
    for metric in per_layer:
        table = _layer_table(ev, metric)
        if table:
            print()
            print(table)
    skipped = [r for r in ev.reports if r.skipped]
    if skipped or counts_only:
        print()
        for r in skipped:
            print(f"skipped {r.kind} predictor {r.name}: {r.skipped}")
        if counts_only:
            print(counts_only)
    if args.out:
        print(f"\nwrote {args.out}/predict_summary.csv, predict_per_layer.csv, predict.json, predict_config.yaml")
    return 0


#: the options of ``predict evaluate`` that decide its numbers: (flag, attribute)
NUMBER_OPTIONS = (("--predictors", "predictors"), ("--train-steps", "train_steps"),
                  ("--tokens-per-step", "tokens_per_step"), ("--mode", "mode"), ("--gpus", "gpus"),
                  ("--redundant", "redundant"), ("--algorithm", "algorithm"), ("--synthetic", "synthetic"),
                  ("--placement", "placement"), ("--synthetic-flops", "synthetic_flops"),
                  ("--overhead-curve", "overhead_curve"), ("--seed", "seed"))


def command_line(args: argparse.Namespace) -> str:
    """The command that reruns this evaluation: every option that decides the numbers written out."""
    words = ["moe-gps", "predict", "evaluate", str(args.trace)]
    for flag, attr in NUMBER_OPTIONS:
        if getattr(args, attr) is not None:
            words += [flag, str(getattr(args, attr))]
    words += ["--per-layer", args.per_layer] + (["--json"] if args.json else [])
    words += ["-o", args.out] if args.out else []
    return shlex.join(words)


def run_record(args: argparse.Namespace, regrouped: str | None) -> dict:
    """Where the numbers come from: the command, the code, the trace file (its SHA-256), the seed, how the
    steps were regrouped, and every option that decides the numbers (None: the default, resolved in the
    results' ``train_steps``, ``num_redundant`` and ``predictors``)."""
    from moe_gps import __version__
    from moe_gps.provenance import code_digest, file_sha256

    return {"command": command_line(args), "moe_gps_version": __version__, "code_digest": code_digest(),
            "trace": str(args.trace), "trace_sha256": file_sha256(args.trace), "regrouped": regrouped,
            **{attr: getattr(args, attr) for _, attr in NUMBER_OPTIONS}}


def _write_outputs(ev, run: dict, out_dir: str) -> None:
    import csv
    import io
    from pathlib import Path

    import yaml

    from moe_gps.atomic import write_text_atomic
    from moe_gps.provenance import provenance_comment

    out = Path(out_dir)
    for name, rows in (("predict_summary.csv", summary_rows(ev)), ("predict_per_layer.csv", per_layer_rows(ev))):
        buf = io.StringIO()
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
        write_text_atomic(out / name, buf.getvalue())
    write_text_atomic(out / "predict.json", dumps_json({"run": run, **ev.to_dict()}, indent=2) + "\n")
    write_text_atomic(out / "predict_config.yaml",
                      f"# moe-gps predict evaluate: the options of this run; rerun with `{run['command']}`\n"
                      + provenance_comment(run["trace"]) + yaml.safe_dump(run, sort_keys=False, width=100))
