"""Speed of the serving simulation (not a test): 10^4 requests of the bundled `chat` workload
on 4xA100-nvlink, Mixtral 8x7B (traces/mixtral_mmlu.parquet), strategies none, eplb and
dist:ema (goal: at most 60 s on the 2-core development machine).

Times the whole `serve` call (strategy preparation, every iteration, metrics and verdict),
in one process and with --jobs processes, and each strategy's own run; also the CPU time
(which other jobs on a shared machine do not inflate as much as the wall time) and the
load average; writes benchmarks/results/serve.json.

Usage:  python benchmarks/bench_serve.py [--requests 10000] [--rate R] [--jobs N]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import save  # noqa: E402

from moe_gps.config import SimulateConfig, load_cluster, load_model, strategy_from_name  # noqa: E402
from moe_gps.config.serving import ServeConfig, load_request_workload  # noqa: E402
from moe_gps.trace import load_trace  # noqa: E402

STRATEGIES = ("none", "eplb", "dist:ema")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=None, help="requests/s (default: the workload's)")
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()
    from sim.serving.run import serve

    trace = load_trace(ROOT / "traces" / "mixtral_mmlu.parquet")
    w = load_request_workload("chat")
    w = dataclasses.replace(w, num_requests=args.requests)
    rate = args.rate or w.rate
    sim = SimulateConfig(cluster=load_cluster("4xA100-nvlink"), model=load_model("mixtral-8x7b"),
                         strategies=[strategy_from_name(s) for s in STRATEGIES])
    cfg = ServeConfig(simulate=sim, workload=w, rates=[rate])
    figures = {"case": {"requests": args.requests, "rate_rps": rate, "strategies": list(STRATEGIES),
                        "trace": "traces/mixtral_mmlu.parquet", "cluster": "4xA100-nvlink"}}
    for jobs in sorted({1, args.jobs}):
        t0, c0, k0 = time.perf_counter(), time.process_time(), os.times()
        result = serve(trace, cfg, progress=False, jobs=jobs)
        wall = time.perf_counter() - t0
        k1 = os.times()
        cpu = time.process_time() - c0 + (k1.children_user + k1.children_system - k0.children_user - k0.children_system)
        rr = result.rates[0]
        figures[f"jobs_{jobs}"] = {
            "wall_s": wall, "cpu_s": cpu, "load_average": os.getloadavg()[0],
            "per_strategy": {name: {"seconds": rr.seconds[name], "iterations": len(run.iterations),
                                    "event_iterations": run.event_iterations}
                             for name, run in rr.runs.items()}}
        print(f"jobs={jobs}: {wall:.1f} s wall ({cpu:.1f} s CPU, load average {os.getloadavg()[0]:.1f}) for {args.requests} requests x {len(STRATEGIES)} strategies at {rate:g} "
              f"req/s; " + ", ".join(f"{n} {rr.seconds[n]:.1f} s ({len(r.iterations)} iterations)"
                                     for n, r in rr.runs.items()))
    print(f"wrote {save('serve', figures)}")


if __name__ == "__main__":
    main()
