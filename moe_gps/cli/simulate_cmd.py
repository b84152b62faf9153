"""``moe-gps simulate``: compare duplication strategies on a trace for a described cluster."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_gps.cli.common_args import add_deployment_args, deployment_from_args, workload_from_args
from moe_gps.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate", help="compare expert-duplication strategies on a trace with the SimPy cluster model",
        description=(
            "Simulate every MoE layer of every step of TRACE on a cluster, under each strategy: no "
            "duplication (none), static EPLB (eplb, or static:PLANNER), distribution-only prediction "
            "(dist:PREDICTOR), token-to-expert prediction (token:PREDICTOR) and the oracle bound (oracle). "
            "The first --train-steps steps fit the predictors and the static plan; the rest are simulated. "
            "Prints a table per strategy and writes per-step and per-layer results, the exact config and "
            "plots to the output folder. Formulas: docs/simulator.md; config fields: docs/configs.md."),
    )
    p.add_argument("trace", help="trace file (.parquet), e.g. traces/mixtral_mmlu.parquet")
    add_deployment_args(p)
    p.add_argument("--strategies", nargs="+", metavar="NAME",
                   help="strategies to compare (space or comma separated): none, eplb, static:PLANNER, "
                        "dist:PREDICTOR, token:PREDICTOR, oracle, and 'all' for every default strategy the trace supports (the "
                        "default). Predictor options go in parentheses, e.g. "
                        "'token:synthetic(accuracy=0.95,overhead=8.4e6)'")
    p.add_argument("--redundant-slots", type=int, metavar="R",
                   help="extra expert slots per layer over all GPUs for every duplicating strategy "
                        "(default: one per GPU)")
    p.add_argument("--train-steps", type=int, metavar="N",
                   help="steps used to fit predictors and profile the static plan (default: a quarter)")
    p.add_argument("--seed", type=int, default=None, help="seed for predictors and planners (default: 0)")
    p.add_argument("--config", metavar="FILE",
                   help="a whole simulate config (e.g. the config.yaml of an earlier run) instead of the "
                        "flags above")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="output folder (default: moe-gps-out/simulate-<trace name>)")
    p.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    p.set_defaults(func=cmd_simulate)


def build_config(args: argparse.Namespace, trace) -> tuple["object", list[str]]:
    """The SimulateConfig the flags describe, and notes for the user."""
    from dataclasses import replace

    from moe_gps.config import SimulateConfig, load_simulate_config, strategy_from_name
    from moe_gps.config.loader import split_strategy_names
    from sim.strategies import expand_strategies

    notes: list[str] = []
    if args.config:
        flags = [f for f in ("cluster", "model", "workload", "strategies", "redundant_slots", "train_steps")
                 if getattr(args, f) is not None]
        if flags:
            raise UserError(f"--config already holds the whole config; drop --{flags[0].replace('_', '-')}")
        cfg = load_simulate_config(args.config)
        cfg = replace(cfg, workload=workload_from_args(args, cfg.workload))
    else:
        cluster, model, workload = deployment_from_args(args, trace)
        requested = split_strategy_names(args.strategies) if args.strategies else ["all"]
        names, notes = expand_strategies(requested, trace)
        strategies = [strategy_from_name(n) for n in names]
        if args.redundant_slots is not None:
            if args.redundant_slots < 0:
                raise UserError(f"--redundant-slots must be >= 0, got {args.redundant_slots}")
            strategies = [s if s.kind == "none" else replace(s, redundant_slots=args.redundant_slots)
                          for s in strategies]
        cfg = SimulateConfig(cluster=cluster, model=model, workload=workload, strategies=strategies,
                             train_steps=args.train_steps)
        if args.train_steps is not None and args.train_steps < 1:
            raise UserError(f"--train-steps must be >= 1, got {args.train_steps}")
    if args.seed is not None:
        if args.seed < 0:
            raise UserError(f"--seed must be >= 0, got {args.seed}")
        cfg = replace(cfg, seed=args.seed)
    cfg = replace(cfg, trace=str(args.trace))
    return cfg, notes


def cmd_simulate(args: argparse.Namespace) -> int:
    from moe_gps.outputs import hold_output_dir
    from moe_gps.trace import load_trace
    from sim.report import format_summary, summary_rows, write_outputs
    from sim.run import simulate

    out = Path(args.output) if args.output else Path("moe-gps-out") / f"simulate-{Path(args.trace).stem}"
    hold_output_dir(out)
    trace = load_trace(args.trace)
    cfg, notes = build_config(args, trace)
    result = simulate(trace, cfg, trace_name=str(args.trace))
    result.notes += notes
    written = write_outputs(result, out, plots=not args.no_plots)
    if args.json:
        print(json.dumps({"output": str(out), "strategies": summary_rows(result), "notes": result.notes},
                         indent=2, default=float))
    else:
        print(format_summary(result))
        print(f"\nwrote {len(written)} files to {out}/: " + ", ".join(p.name for p in written))
    sys.stdout.flush()
    return 0
