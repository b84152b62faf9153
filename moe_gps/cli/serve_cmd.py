"""``moe-gps serve``: what each duplication strategy does to TTFT, TPOT and goodput under request traffic."""

from __future__ import annotations

import argparse
import math
import sys

from moe_gps.cli.common_args import (DEFAULT_CLUSTER, add_assumptions_arg, add_cluster_model_args, add_jobs_arg,
                                     input_paths, jobs_from_args, model_from_args, named_by, no_verdict_note,
                                     note_repeated, output_folder, plot_drawer, print_written, strategies_named)
from moe_gps.cli.simulate_cmd import add_strategy_args, strategies_from_args
from moe_gps.config.serving import MAX_OVERHEAD_US, MIN_RATE
from moe_gps.errors import UserError

DEFAULT_WORKLOAD = "chat"
DEFAULT_STRATEGIES = ["none", "eplb", "dist:ema"]

#: flag -> (where it goes in the ServeConfig, integer, lower bound, strict, upper bound)
NUMBERS = {
    "max_num_batched_tokens": ("scheduler", True, 1, False, None),
    "max_num_seqs": ("scheduler", True, 1, False, None),
    "kv_cache_gb": ("scheduler", False, 0, True, None),
    "vocab_size": ("iteration", True, 1, False, None),
    "iteration_overhead_us": ("iteration", False, 0, False, MAX_OVERHEAD_US),
    "slo_ttft_ms": ("slo", False, 0, True, None),
    "slo_tpot_ms": ("slo", False, 0, True, None),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a request workload: TTFT, TPOT and goodput of each duplication strategy",
        description=(
            "Simulate a server that takes requests (a workload: arrivals, prompt and output lengths) and runs "
            "them with continuous batching and chunked prefill on the cluster, each iteration's tokens routed "
            "as the trace's tokens are, in trace order, and its MoE layers timed by the simulator under each "
            "duplication strategy. Reports TTFT, TPOT and end-to-end latency (p50/p90/p99), throughput, "
            "goodput at an SLO and a verdict per rate; --rates sweeps the rate and draws the latency-throughput "
            "curve. Formulas, scheduler and workload format: docs/serving.md."),
    )
    p.add_argument("trace", help="tokens trace file (.parquet), e.g. traces/mixtral_mmlu.parquet")
    add_cluster_model_args(p)
    from moe_gps.config.loader import preset_names

    p.add_argument("--workload", metavar="PRESET|FILE",
                   help=f"request workload: bundled preset ({', '.join(preset_names('workloads'))}) or workload YAML "
                        f"(docs/serving.md; default: {DEFAULT_WORKLOAD})")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=float, metavar="R",
                      help=f"requests per second, at least {MIN_RATE:g} (default: the workload's rate)")
    rate.add_argument("--rates", type=float, nargs="+", metavar="R",
                      help="several request rates: one run each (a rate named twice runs once, with a note), and the "
                           "latency-throughput figure")
    p.add_argument("--requests", type=int, metavar="N", help="requests per rate (default: the workload's)")
    # re-plan checks count iterations; a window, the trace steps the iterations' tokens came from
    add_strategy_args(p, "iterations", f"'all' for every default strategy the trace supports (default: "
                                       f"{' '.join(DEFAULT_STRATEGIES)})", window="trace steps")
    add_assumptions_arg(p)
    p.add_argument("--train-steps", type=int, metavar="N",
                   help="trace steps used to fit predictors and profile the static plan; the rest route the "
                        "requests' tokens (default: a quarter of the trace's steps, at least 1)")
    p.add_argument("--max-num-batched-tokens", type=int, metavar="N",
                   help="token budget of an iteration on one GPU (default: 2048, vLLM's on A100-class GPUs)")
    p.add_argument("--max-num-seqs", type=int, metavar="N",
                   help="requests running at once on one GPU (default: 256)")
    p.add_argument("--kv-cache-gb", type=float, metavar="GB",
                   help="KV-cache capacity per GPU (default: what the HBM leaves after weights)")
    p.add_argument("--vocab-size", type=int, metavar="V",
                   help="the model's vocabulary (needed for models other than the bundled presets)")
    p.add_argument("--iteration-overhead-us", type=float, metavar="US",
                   help="fixed time per iteration for scheduling and sampling (default: 500)")
    p.add_argument("--slo-ttft-ms", type=float, metavar="MS",
                   help="SLO on time to first token, for goodput (default: no SLO; goodput = throughput)")
    p.add_argument("--slo-tpot-ms", type=float, metavar="MS",
                   help="SLO on time per output token, for goodput (default: no SLO; goodput = throughput)")
    p.add_argument("--seed", type=int, default=None, help="seed for requests, predictors and planners (default: 0)")
    add_jobs_arg(p, "(rate, strategy) runs simulated at once in worker processes, and with more than one the "
                    "plots are drawn by a process that imports matplotlib while the runs go on (default: the CPU "
                    "cores available); the results do not depend on it")
    p.add_argument("--config", metavar="FILE",
                   help="a whole serve config (e.g. the config.yaml of an earlier run) instead of the flags above "
                        "(--rate/--rates, --requests, --slo-*, --seed and -j/--jobs still apply)")
    p.add_argument("-o", "--output", metavar="DIR", help="output folder (default: moe-gps-out/serve-<trace name>)")
    p.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    p.set_defaults(func=cmd_serve)


def _number(flag: str, value, integer: bool, bound: float, strict: bool, upper: float | None = None):
    ok = math.isfinite(value) and (value > bound if strict else value >= bound)
    if not ok or (upper is not None and value > upper):
        between = f" and <= {upper:g}" if upper is not None else ""
        raise UserError(f"--{flag.replace('_', '-')} must be {'an integer' if integer else 'a finite number'} "
                        f"{'>' if strict else '>='} {bound:g}{between}, got {value}")
    return value


def build_config(args: argparse.Namespace, trace):
    """The ServeConfig the flags describe, and notes for the user."""
    from dataclasses import replace

    from moe_gps.config import SimulateConfig, load_cluster
    from moe_gps.config.serving import IterationParts, SchedulerConfig, ServeConfig, SLOConfig, load_request_workload
    from moe_gps.config.serving import load_serve_config

    notes: list[str] = []
    if args.config:
        flags = [f for f in ("cluster", "model", "workload", "strategies", "redundant_slots", "train_steps",
                             "copy_policy", "replan_interval", "window", "min_gain", "assumptions", "max_num_batched_tokens",
                             "max_num_seqs", "kv_cache_gb", "vocab_size", "iteration_overhead_us")
                 if getattr(args, f) is not None]
        if flags:
            raise UserError(f"--config already holds the whole config; drop --{flags[0].replace('_', '-')}")
        cfg = load_serve_config(args.config)
    else:
        if args.train_steps is not None and args.train_steps < 1:
            raise UserError(f"--train-steps must be >= 1, got {args.train_steps}")
        if args.train_steps is not None and trace.num_steps >= 2 and args.train_steps >= trace.num_steps:
            raise UserError(f"--train-steps {args.train_steps} leaves no trace step to route the requests' tokens: "
                            f"the trace has {trace.num_steps} steps; use at most {trace.num_steps - 1}")
        strategies, notes = strategies_from_args(args, trace, DEFAULT_STRATEGIES)
        with named_by("--cluster", args.cluster):
            cluster = load_cluster(args.cluster or DEFAULT_CLUSTER)
        sim_cfg = SimulateConfig(cluster=cluster, model=model_from_args(args, trace),
                                 strategies=strategies, train_steps=args.train_steps)
        if args.copy_policy:
            sim_cfg = replace(sim_cfg, copy_policy=args.copy_policy)
        if args.assumptions:
            sim_cfg = replace(sim_cfg, assumptions=args.assumptions)
        with named_by("--workload", args.workload):
            workload = load_request_workload(args.workload or DEFAULT_WORKLOAD)
        cfg = ServeConfig(simulate=sim_cfg, workload=workload,
                          scheduler=SchedulerConfig(), iteration=IterationParts(), slo=SLOConfig())
    parts = {"scheduler": {}, "iteration": {}, "slo": {}}
    field = {"iteration_overhead_us": "overhead_us", "slo_ttft_ms": "ttft_ms", "slo_tpot_ms": "tpot_ms"}
    for flag, (where, integer, bound, strict, upper) in NUMBERS.items():
        v = getattr(args, flag)
        if v is not None:
            parts[where][field.get(flag, flag)] = _number(flag, v, integer, bound, strict, upper)
    cfg = replace(cfg, scheduler=replace(cfg.scheduler, **parts["scheduler"]),
                  iteration=replace(cfg.iteration, **parts["iteration"]), slo=replace(cfg.slo, **parts["slo"]))
    if args.rate is not None or args.rates is not None:
        rates = [args.rate] if args.rate is not None else list(args.rates)
        for r in rates:
            _number("rate" if args.rate is not None else "rates", r, False, MIN_RATE, False)
        note_repeated("--rates", rates, "each rate runs once")
        cfg = replace(cfg, rates=sorted(set(rates)))
    elif len(set(cfg.rates)) < len(cfg.rates):          # a config file's rates, as --rates
        note_repeated(f"{args.config}: rates", cfg.rates, "each rate runs once")
        cfg = replace(cfg, rates=sorted(set(cfg.rates)))
    if args.requests is not None:
        if args.requests < 1:
            raise UserError(f"--requests must be >= 1, got {args.requests}")
        cfg = replace(cfg, workload=replace(cfg.workload, num_requests=args.requests))
    if args.seed is not None:
        if args.seed < 0:
            raise UserError(f"--seed must be >= 0, got {args.seed}")
        cfg = replace(cfg, simulate=replace(cfg.simulate, seed=args.seed))
    cfg = replace(cfg, simulate=replace(cfg.simulate, trace=str(args.trace)))
    return cfg, notes


def cmd_serve(args: argparse.Namespace) -> int:
    jobs = jobs_from_args(args)
    with plot_drawer(args, jobs) as drawer:
        return _serve(args, jobs, drawer)


def _serve(args: argparse.Namespace, jobs: int, drawer) -> int:
    from moe_gps.jsonsafe import dumps_json
    from moe_gps.trace import load_trace
    from sim.serving.report import format_summary, json_summary, write_outputs
    from sim.serving.run import serve

    trace = load_trace(args.trace)
    cfg, notes = build_config(args, trace)
    out = output_folder(args, "serve")
    try:
        with strategies_named(args):          # a strategy's predictor or planner option: where it was given
            result = serve(trace, cfg, trace_name=str(args.trace), jobs=jobs)
    except MemoryError as err:
        from moe_gps.errors import environment_error
        raise environment_error(err, flag=f"{cfg.workload.num_requests} requests per rate (--requests, "
                                          "workload.num_requests)") from None
    result.notes += notes
    result.notes += no_verdict_note(cfg.simulate.strategies)
    from moe_gps.outputs import staged_outputs
    from sim.serving.plots import FIGURE_FILES

    # moved in together: a run cut short changes nothing
    with staged_outputs(out, FIGURE_FILES, stop=drawer.stop, inputs=input_paths(args)) as stage:
        written = write_outputs(result, stage.path, plots=not args.no_plots, drawer=drawer)
    written = stage.final(written)
    if args.json:
        print(dumps_json(json_summary(result, out), indent=2))
    else:
        print(format_summary(result))
        print_written(written, stage)
    sys.stdout.flush()
    return 0
