"""Speed of the serving simulation (not a test): 10^4 requests of the bundled `chat` workload
on 4xA100-nvlink, Mixtral 8x7B (traces/mixtral_mmlu.parquet), strategies none, eplb and
dist:ema (goal: at most 60 s on the 2-core development machine).

Times the whole `serve` call (strategy preparation, every iteration, metrics and verdict),
in one process and with --jobs processes, and each strategy's own run; also the CPU time
(which other jobs on a shared machine do not inflate as much as the wall time), the
1-minute load average at the start of each timed call, and whether the 60 s goal was met
(printed and recorded; the script does not fail on it). Requests and iterations are drawn
with SimulateConfig's seed (0). Writes benchmarks/results/serve.json.

Usage:  python benchmarks/bench_serve.py [--requests 10000] [--rate R] [--jobs N]
(--requests and --jobs >= 1, --rate >= 0.001 requests/s; a bad value is one error line, exit 2)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import load_average, positive_int, save  # noqa: E402

from moe_gps.config import SimulateConfig, load_cluster, load_model, strategy_from_name  # noqa: E402
from moe_gps.config.loader import build, to_dict  # noqa: E402
from moe_gps.config.serving import RequestWorkload, ServeConfig, load_request_workload  # noqa: E402
from moe_gps.errors import UserError  # noqa: E402
from moe_gps.trace import load_trace  # noqa: E402

STRATEGIES = ("none", "eplb", "dist:ema")
GOAL_S = 60.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000, help="requests to simulate (>= 1)")
    ap.add_argument("--rate", type=float, default=None, help="requests/s (default: the workload's)")
    ap.add_argument("--jobs", type=positive_int, default=len(os.sched_getaffinity(0)),
                    help="processes for the parallel timing (>= 1; default: the usable CPUs)")
    args = ap.parse_args()
    load_at_start = load_average()
    w = load_request_workload("chat")
    rate = args.rate if args.rate is not None else w.rate
    sim = SimulateConfig(cluster=load_cluster("4xA100-nvlink"), model=load_model("mixtral-8x7b"),
                         strategies=[strategy_from_name(s) for s in STRATEGIES])
    try:    # the library's own checks of --requests and --rate (ranges, then ServeConfig.check)
        w = build(RequestWorkload, {**to_dict(w), "num_requests": args.requests}, "--requests")
        w = build(RequestWorkload, {**to_dict(w), "rate": rate}, "--rate")
        cfg = ServeConfig(simulate=sim, workload=w, rates=[rate])
        cfg.check("--rate")
    except UserError as e:
        ap.error(str(e))
    from sim.serving.run import serve

    trace = load_trace(ROOT / "traces" / "mixtral_mmlu.parquet")
    figures = {"case": {"requests": args.requests, "rate_rps": rate, "strategies": list(STRATEGIES),
                        "trace": "traces/mixtral_mmlu.parquet", "cluster": "4xA100-nvlink",
                        "seed": sim.seed, "seed_use": "SimulateConfig.seed: request stream, predictors, "
                                                      "planners and the verdict's resampling"},
               "goal_s": GOAL_S}
    for jobs in sorted({1, args.jobs}):
        load_before = load_average()
        t0, c0, k0 = time.perf_counter(), time.process_time(), os.times()
        result = serve(trace, cfg, progress=False, jobs=jobs)
        wall = time.perf_counter() - t0
        k1 = os.times()
        cpu = time.process_time() - c0 + (k1.children_user + k1.children_system - k0.children_user - k0.children_system)
        rr = result.rates[0]
        figures[f"jobs_{jobs}"] = {
            "wall_s": wall, "cpu_s": cpu, "load_average_1m_at_start": load_before,
            "goal_met": wall <= GOAL_S,
            "per_strategy": {name: {"seconds": rr.seconds[name], "iterations": len(run.iterations),
                                    "event_iterations": run.event_iterations}
                             for name, run in rr.runs.items()}}
        load_text = "unknown" if load_before is None else f"{load_before:.2f}"
        print(f"jobs={jobs}: {wall:.1f} s wall ({cpu:.1f} s CPU, load average {load_text} at start) for "
              f"{args.requests} requests x {len(STRATEGIES)} strategies at {rate:g} req/s; "
              + ", ".join(f"{n} {rr.seconds[n]:.1f} s ({len(r.iterations)} iterations, "
                          f"{r.event_iterations} event-simulated)" for n, r in rr.runs.items())
              + f"; goal <= {GOAL_S:.0f} s: {'met' if wall <= GOAL_S else 'NOT met'}")
    print(f"wrote {save('serve', figures, load_average_at_start=load_at_start)}")


if __name__ == "__main__":
    main()
