"""``moe-gps simulate``: compare duplication strategies on a trace for a described cluster."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_gps.cli.common_args import (add_assumptions_arg, add_deployment_args, add_jobs_arg, deployment_from_args,
                                     input_paths, jobs_from_args, named_by, no_verdict_note, note_repeated,
                                     output_folder, plot_drawer, print_written, strategies_named, workload_from_args)
from moe_gps.config.schema import COPY_POLICIES, PREDICTING_INTERVAL, VLLM_STEP_INTERVAL, VLLM_WINDOW_SIZE
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
    add_strategy_args(p, "steps", "'all' for every default strategy the trace supports (the default)")
    add_assumptions_arg(p)
    p.add_argument("--train-steps", type=int, metavar="N",
                   help="steps used to fit predictors and profile the static plan (default: a quarter of the "
                        "trace's steps, at least 1)")
    p.add_argument("--seed", type=int, default=None, help="seed for predictors and planners (default: 0)")
    add_jobs_arg(p, "worker processes: the strategies are split over them in groups of about equal work, and "
                    "the plots are drawn in them, by a process that imports matplotlib while the trace loads (default: "
                    "the CPU cores available); the results do not depend on it")
    p.add_argument("--config", metavar="FILE",
                   help="a whole simulate config (e.g. the config.yaml of an earlier run) instead of the "
                        "flags above (--phase, --seq-len, --tokens-per-step, --seed and -j/--jobs still apply)")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="output folder (default: moe-gps-out/simulate-<trace name>)")
    p.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    p.add_argument("--timeline", metavar="STEP[:END]",
                   help="also write timeline.json: the simulated schedule of trace steps STEP..END-1 (default: one "
                        "step; steps of the trace as simulated, after any --tokens-per-step regrouping) as a "
                        "Chrome/Perfetto trace, one track per GPU and per GPU's copies (open it in "
                        "https://ui.perfetto.dev)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    p.set_defaults(func=cmd_simulate)


def add_strategy_args(p: argparse.ArgumentParser, unit: str, default: str, window: str = "steps") -> None:
    """Add --strategies, --redundant-slots, --copy-policy, --replan-interval, --window and --min-gain to
    ``p``; ``unit``: what a re-plan interval counts (steps, iterations); ``window``: what a window counts;
    ``default``: the default strategies."""
    p.add_argument("--strategies", nargs="+", metavar="NAME",
                   help="strategies to compare (space or comma separated): none, eplb, static:PLANNER, "
                        f"dist:PREDICTOR, token:PREDICTOR, oracle, and {default}. Predictor options go in "
                        "parentheses, e.g. 'token:synthetic(accuracy=0.95,overhead=8.4e6)'")
    p.add_argument("--redundant-slots", type=int, metavar="R",
                   help="extra expert slots per layer over all GPUs for every duplicating strategy that does not "
                        "set its own, as eplb(num_redundant_experts=8) does (default: one per GPU, beyond the "
                        "spares that make the experts divide over the GPUs)")
    p.add_argument("--copy-policy", choices=COPY_POLICIES,
                   help="when copied expert weights arrive, for every strategy: critical (the layer waits), "
                        "overlap (during the layer's attention, sharing links with the dispatch), async (in the "
                        "background at a share of the link; a new placement serves once its copies landed, as "
                        "vLLM's EPLB with use_async), hidden (free, as the MoE-GPS paper assumes). Default: async; "
                        "hidden with --assumptions paper")
    p.add_argument("--replan-interval", type=int, metavar="K",
                   help=f"{unit} between re-plan checks, for every duplicating strategy that does not set its "
                        "own, as eplb(step_interval=N) does (default: for eplb vLLM's step_interval "
                        f"{VLLM_STEP_INTERVAL}, scaled with the window ({VLLM_STEP_INTERVAL // VLLM_WINDOW_SIZE}x it) "
                        f"when the training steps are fewer than its {VLLM_WINDOW_SIZE}; {PREDICTING_INTERVAL} for "
                        "the predicting strategies and the oracle, 1 for them with --assumptions paper)")
    p.add_argument("--window", type=int, metavar="W",
                   help=f"{window} of history a plan is made from, for every duplicating strategy that does not "
                        f"set its own (default: for eplb vLLM's window_size {VLLM_WINDOW_SIZE}, cut to the training "
                        "steps (--train-steps) when they are fewer; the re-plan interval for the predicting "
                        "strategies, 1 with --assumptions paper; 1 for the oracle)")
    p.add_argument("--min-gain", type=float, metavar="X",
                   help="re-plan only when the predicted saving until the next check exceeds X times the "
                        "predicted copy cost; 0 re-plans at every check (default: 0 for eplb, 1 otherwise; 0 for "
                        "the distribution and token strategies with --assumptions paper, the oracle keeping 1)")


def check_train_steps(n: int, trace, tokens_per_step: int | None, name: str = "--train-steps") -> None:
    """``--train-steps n`` leaves a step to simulate, in the steps the simulation has (the trace's, or those
    ``--tokens-per-step`` regroups it into); else a UserError naming the flag (or ``name``: where else
    train_steps was given)."""
    from moe_gps.trace.regroup import regrouped_steps, regroups

    if n < 1:
        raise UserError(f"--train-steps must be >= 1, got {n}")
    steps = trace.num_steps
    if tokens_per_step is not None and regroups(trace, tokens_per_step, n):
        steps = regrouped_steps(trace, tokens_per_step)
    if n >= steps:
        raise UserError(f"{name} {n} leaves no step to simulate: the trace has {steps} steps"
                        + (f" (as --tokens-per-step {tokens_per_step} gives them)" if tokens_per_step else "")
                        + f"; use at most {steps - 1}")


def build_config(args: argparse.Namespace, trace) -> tuple["object", list[str], list[str]]:
    """The SimulateConfig the flags describe, notes for the user, and what was inferred from the trace."""
    from dataclasses import replace

    from moe_gps.config import SimulateConfig, load_simulate_config
    from moe_gps.outputs import same_file

    notes: list[str] = []
    inferred: list[str] = []
    if args.config:
        flags = [f for f in ("cluster", "model", "workload", "strategies", "redundant_slots", "train_steps",
                             "copy_policy", "replan_interval", "window", "min_gain", "assumptions")
                 if getattr(args, f) is not None]
        if flags:
            raise UserError(f"--config already holds the whole config; drop --{flags[0].replace('_', '-')}")
        cfg = load_simulate_config(args.config)
        cfg = replace(cfg, workload=workload_from_args(args, cfg.workload))
        if cfg.train_steps is not None:
            check_train_steps(cfg.train_steps, trace, cfg.workload.tokens_per_step, f"{args.config}: train_steps")
        if cfg.trace and not same_file(cfg.trace, args.trace):
            notes.append(f"{args.config} was written for the trace {cfg.trace}; this run simulates {args.trace}")
    else:
        cluster, model, workload, phase_note = deployment_from_args(args, trace)
        inferred += [phase_note] if phase_note else []
        strategies, notes = strategies_from_args(args, trace, ["all"])
        cfg = SimulateConfig(cluster=cluster, model=model, workload=workload, strategies=strategies,
                             train_steps=args.train_steps)
        if args.copy_policy:
            cfg = replace(cfg, copy_policy=args.copy_policy)
        if args.assumptions:
            cfg = replace(cfg, assumptions=args.assumptions)
        if args.train_steps is not None:
            check_train_steps(args.train_steps, trace, workload.tokens_per_step)
    if args.seed is not None:
        if args.seed < 0:
            raise UserError(f"--seed must be >= 0, got {args.seed}")
        cfg = replace(cfg, seed=args.seed)
    cfg = replace(cfg, trace=str(args.trace))
    return cfg, notes, inferred


def strategies_from_args(args: argparse.Namespace, trace, default: list[str]) -> tuple[list, list[str]]:
    """The StrategyConfigs that --strategies (or ``default``), --redundant-slots, --replan-interval, --window
    and --min-gain describe, and notes for the user."""
    from dataclasses import replace

    from moe_gps.config import strategy_from_name
    from moe_gps.config.loader import split_strategy_names
    from sim.strategies import expand_strategies

    with named_by("--strategies", args.strategies, quote=False):
        requested = split_strategy_names(args.strategies) if args.strategies else default
        note_repeated("--strategies", requested)
        names, notes = expand_strategies(requested, trace)
        strategies = [strategy_from_name(n) for n in names]
    overrides = policy_overrides(args)          # checked whether or not a strategy takes them
    if args.redundant_slots is not None:
        if args.redundant_slots < 0:
            raise UserError(f"--redundant-slots must be >= 0, got {args.redundant_slots}")
        overrides = {"redundant_slots": args.redundant_slots, **overrides}
    flag = {"redundant_slots": "--redundant-slots", "replan_interval": "--replan-interval", "window": "--window",
            "min_gain": "--min-gain"}
    out = []
    for s in strategies:
        if s.kind == "none":
            out.append(s)
            continue
        own = [k for k in overrides if getattr(s, k) is not None]     # set by the strategy's own options
        for k in own:
            notes.append(f"{flag[k]} {overrides[k]:g} does not apply to {s.resolved_name()}, which sets its own "
                         f"{k} ({getattr(s, k):g})")
        out.append(replace(s, **{k: v for k, v in overrides.items() if k not in own}))
    return out, notes


def policy_overrides(args: argparse.Namespace) -> dict:
    """The re-plan policy fields that --replan-interval, --window and --min-gain set."""
    out = {}
    for flag, key, low in (("--replan-interval", "replan_interval", 1), ("--window", "window", 1),
                           ("--min-gain", "min_gain", 0)):
        v = getattr(args, key)
        if v is None:
            continue
        if not v >= low or v != v or v == float("inf"):
            raise UserError(f"{flag} must be a finite number >= {low}, got {v}")
        out[key] = v
    return out


def cmd_simulate(args: argparse.Namespace) -> int:
    jobs = jobs_from_args(args)
    # the plots' process, forked before the output folder is locked (so that it does not hold the lock)
    with plot_drawer(args, jobs) as drawer:
        return _simulate(args, jobs, output_folder(args, "simulate"), drawer)


def _simulate(args: argparse.Namespace, jobs: int, out: Path, drawer) -> int:
    from moe_gps.jsonsafe import dumps_json
    from moe_gps.trace import load_trace
    from sim.report import format_summary, summary_rows, write_outputs
    from sim.run import simulate

    trace = load_trace(args.trace)
    cfg, notes, inferred = build_config(args, trace)
    steps = None
    if args.timeline:
        from sim.timeline import parse_steps

        steps = parse_steps(args.timeline)
    try:
        with strategies_named(args):          # a strategy's predictor or planner option: where it was given
            result = simulate(trace, cfg, trace_name=str(args.trace), timeline_steps=steps, jobs=jobs)
    except UserError as err:
        if args.timeline and str(err).startswith("timeline step"):
            raise UserError(f"--timeline {args.timeline}: {err}") from None
        raise
    result.notes += notes + no_verdict_note(cfg.strategies)
    result.inferred[:0] = inferred
    from moe_gps.outputs import staged_outputs
    from sim.plots import FIGURE_FILES

    # written aside and moved in together: a run cut short leaves the folder as it was
    with staged_outputs(out, (*FIGURE_FILES, "timeline.json"), stop=drawer.stop, inputs=input_paths(args)) as stage:
        summary = format_summary(result)
        written = write_outputs(result, stage.path, plots=not args.no_plots, jobs=jobs, drawer=drawer,
                                summary=summary)
        if steps is not None:
            from sim.timeline import write_timeline
            written.append(write_timeline(stage.path / "timeline.json", result.timeline, cfg.cluster.num_gpus))
    written = stage.final(written)
    if args.json:
        verdict = result.verdict.to_dict() if result.verdict is not None else None
        print(dumps_json({"output": str(out), "assumptions": result.config.assumptions, "verdict": verdict,
                          "strategies": summary_rows(result),
                          "inferred": result.inferred, "notes": result.notes, "warnings": result.warnings},
                         indent=2))
    else:
        print(summary)
        print_written(written, stage)
    sys.stdout.flush()
    return 0
