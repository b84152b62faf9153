"""``moe-gps recommend``: which duplication strategy and predictor to run on a cluster, and why.

Exit codes: 0 the report was written; 1 the report was written but some runs failed with
an internal error (listed in it; they are not cached, so a rerun retries them); 2 bad
input (trace, cluster, model, workload, sweep file or flag: one line on stderr);
130 interrupted, 143 / 129 terminated by SIGTERM / SIGHUP (finished runs are cached: the same
command resumes).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from moe_gps.cli.common_args import (DEPLOYMENT_DESTS, add_assumptions_arg, add_deployment_args, add_jobs_arg,
                                     deployment_from_args, input_paths, jobs_from_args, output_folder, print_removed)
from moe_gps.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "recommend", help="sweep clusters, workloads, skews and predictors; recommend a strategy with evidence",
        description=(
            "Sweep the axes that decide whether and how to duplicate experts (interconnect bandwidth, GPU count, "
            "tokens per step and phase, skew, predictor accuracy and overhead, redundant slots) around your "
            "cluster with the simulator, then write a report folder: report.html (self-contained), report.md, "
            "runs.csv, recommendation.json and the exact sweep. The recommendation is the fastest deployable "
            "strategy at your point. Runs go in parallel and are cached in DIR/cache, so an interrupted sweep "
            "resumes. Sweep keys and formulas: docs/recommend.md."),
        epilog="exit codes: 0 report written; 1 some runs failed (report written); 2 bad input; 130 interrupted; "
               "143 / 129 terminated by SIGTERM / SIGHUP")
    p.add_argument("trace", help="trace file (.parquet), e.g. traces/mixtral_mmlu.parquet")
    add_deployment_args(p)
    p.add_argument("--sweep", metavar="FILE", help="sweep YAML (default: the built-in sweep; docs/recommend.md)")
    p.add_argument("--seed", type=int, help="override the sweep's seed (default: the sweep's, 0 unless it sets one)")
    add_assumptions_arg(p)
    add_jobs_arg(p, "parallel worker processes (default: the number of CPU cores available); with "
                    "--backend ray and no --address, the CPUs of the local Ray cluster")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local: worker processes on this machine (default); ray: one Ray task per run, on the "
                        "cluster at --address or on a local one started for the sweep (pip install "
                        "'moe-gps[distributed]'; docs/recommend.md)")
    p.add_argument("--address", metavar="ADDR",
                   help="with --backend ray: the Ray cluster to use (host:port as `ray start --head` prints it, "
                        "or 'auto' for one started on this machine)")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="report folder (default: moe-gps-out/recommend-<trace name>); its cache/ makes reruns resume")
    p.add_argument("--json", action="store_true", help="print the recommendation as JSON (for automation)")
    p.set_defaults(func=cmd_recommend)


def _command(args: argparse.Namespace, out: Path) -> str:
    """The command line that reruns this report (the cache makes it instant)."""
    parts = ["moe-gps", "recommend", args.trace]
    for flag in (*DEPLOYMENT_DESTS, "sweep", "seed", "assumptions", "address"):
        v = getattr(args, flag)
        if v is not None:
            parts += [f"--{flag.replace('_', '-')}", str(v)]
    if args.backend != "local":
        parts += ["--backend", args.backend]
    parts += ["-o", str(out)]
    return " ".join(shlex.quote(p) for p in parts)


def cmd_recommend(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from moe_gps import signals
    from moe_gps.recommend.core import recommend
    from moe_gps.recommend.report import jsonable, summary, terminal, write_report
    from moe_gps.recommend.sweep import load_sweep
    from moe_gps.trace import load_trace

    jobs = jobs_from_args(args)
    if args.seed is not None and args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.address and args.backend != "ray":
        raise UserError("--address names a Ray cluster: use it with --backend ray")
    if args.backend == "ray":
        from moe_gps.recommend.ray_pool import import_ray
        import_ray()                       # a missing Ray is one line now, not after loading the trace
    out = output_folder(args, "recommend")
    sweep = load_sweep(args.sweep)
    if args.seed is not None:
        sweep = replace(sweep, seed=args.seed)
    if args.assumptions:
        sweep = replace(sweep, assumptions=args.assumptions)
    trace = load_trace(args.trace)
    cluster, model, workload, phase_note = deployment_from_args(args, trace)
    try:
        result = recommend(trace, cluster, model, workload, sweep, out_dir=out, jobs=jobs, trace_name=str(args.trace),
                           backend=args.backend, address=args.address, sweep_name=args.sweep or "the built-in sweep")
        if phase_note:
            result.notes.insert(0, phase_note)
    except KeyboardInterrupt as err:
        print(f"moe-gps: {signals.describe(err)}; finished runs are cached in {out / 'cache'}: run the same "
              "command to resume", file=sys.stderr)
        return signals.exit_code(err)
    # the figures in forked processes, but not from a process that has had Ray's threads; the report written
    # aside and moved in together (a run cut short leaves an earlier report whole), an earlier report's figure
    # that this one has nothing for removed
    from moe_gps.outputs import staged_outputs
    from moe_gps.recommend.report import CAPTIONS

    with staged_outputs(out, tuple(f"plots/{name}.png" for name in CAPTIONS), inputs=input_paths(args)) as stage:
        written = write_report(result, stage.path, command=_command(args, out),
                               jobs=1 if args.backend == "ray" else jobs)
    written = stage.final(written)
    if args.json:
        data = summary(result)
        data["output"] = str(out)
        data["files"] = [str(p) for p in written]
        print(json.dumps(jsonable(data), indent=2))
    else:
        print(terminal(result))
        print(f"\nwrote the report to {out}/: " + ", ".join(str(p.relative_to(out)) for p in written))
        print_removed(stage)
    errors = result.errors
    if errors:
        print(f"moe-gps: {len(errors)} run(s) failed with an internal error (see runs.csv, status 'error'); "
              f"first: {errors[0]['candidate']} at {errors[0]['num_gpus']} GPUs, {errors[0]['bandwidth_gb_s']:g} "
              f"GB/s: {errors[0]['reason']}", file=sys.stderr)
        return 1
    return 0
