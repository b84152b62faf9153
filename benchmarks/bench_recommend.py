"""Speed of ``moe-gps recommend`` (not a test): the default sweep on the default trace.

Issue 6 asks for a sweep of 200 or more configs on the default trace in at most 2 minutes
on 2 cores. This runs the built-in sweep (docs/recommend.md) on
traces/mixtral_mmlu.parquet for 4xA100-nvlink with ``--jobs`` worker processes (default
2) from an empty cache, then again on the filled cache (the resume path), and writes the
report once.

A "config" is one run: one strategy simulated at one point (cluster, workload, skew
variant), i.e. one ``sim.run.simulate`` call, cached under its own hash.

Usage:  python benchmarks/bench_recommend.py [--jobs 2] [--out benchmarks/results/recommend]
Writes bench_recommend.json and bench_recommend.png to --out; prints the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_gps.atomic import atomic_path, write_text_atomic  # noqa: E402
from moe_gps.cli.common_args import positive_int  # noqa: E402
from moe_gps.config import WorkloadConfig, load_cluster, load_model  # noqa: E402
from moe_gps.recommend.core import recommend  # noqa: E402
from moe_gps.recommend.report import write_report  # noqa: E402
from moe_gps.recommend.sweep import load_sweep  # noqa: E402
from moe_gps.trace import load_trace  # noqa: E402

GOAL_RUNS, GOAL_S = 200, 120.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=positive_int, default=2)
    ap.add_argument("--trace", default=str(ROOT / "traces" / "mixtral_mmlu.parquet"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recommend"))
    args = ap.parse_args()
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="bench-recommend-"))
    try:
        t0 = time.perf_counter()
        trace = load_trace(args.trace)
        t_load = time.perf_counter() - t0
        cluster, model, sweep = load_cluster("4xA100-nvlink"), load_model("mixtral-8x7b"), load_sweep()

        t0 = time.perf_counter()
        cold = recommend(trace, cluster, model, WorkloadConfig(), sweep, out_dir=work, jobs=args.jobs,
                         progress=False, trace_name=args.trace)
        t_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        files = write_report(cold, work, command="python benchmarks/bench_recommend.py")
        t_report = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = recommend(trace, cluster, model, WorkloadConfig(), sweep, out_dir=work, jobs=args.jobs,
                         progress=False, trace_name=args.trace)
        t_warm = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)

    recs = cold.records
    wall = np.array([r["wall_s"] for r in recs])
    fam: dict[str, list[float]] = {}
    for r in recs:
        fam.setdefault(r["family"], []).append(r["wall_s"])
    figures = {
        "machine": {"python": platform.python_version(), "processor": platform.processor(),
                    "system": platform.platform()},
        "trace": args.trace, "jobs": args.jobs, "runs": len(recs), "simulated": cold.simulated,
        "sim_steps": cold.plan.sweep.sim_steps, "train_steps": cold.plan.sweep.train_steps,
        "load_trace_s": t_load, "sweep_s": t_cold, "report_s": t_report, "sweep_plus_report_s": t_cold + t_report,
        "resume_s": t_warm, "resume_simulated": warm.simulated, "resume_from_cache": warm.from_cache,
        "phases_s": cold.timings, "run_wall_s": {"mean": float(wall.mean()), "median": float(np.median(wall)),
                                                 "p95": float(np.percentile(wall, 95)), "sum": float(wall.sum())},
        "run_wall_s_by_family": {k: {"n": len(v), "mean": float(np.mean(v))} for k, v in sorted(fam.items())},
        "runs_per_s": len(recs) / t_cold, "report_files": len(files),
        "goal": f">= {GOAL_RUNS} configs in <= {GOAL_S:.0f} s on 2 cores",
        "goal_met": bool(len(recs) >= GOAL_RUNS and t_cold <= GOAL_S),
        "headline": cold.headline.winner["candidate"],
    }
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "bench_recommend.json", json.dumps(figures, indent=2) + "\n")
    _plot(figures, fam, out / "bench_recommend.png")
    print(f"default sweep on {Path(args.trace).name}, {args.jobs} jobs: {len(recs)} runs "
          f"({cold.plan.sweep.sim_steps} simulated steps each) in {t_cold:.1f} s "
          f"({len(recs) / t_cold:.1f} runs/s; skew variants {cold.timings['skew_variants_s']:.1f} s, headline "
          f"{cold.timings['headline_s']:.1f} s, maps+predictor {cold.timings['maps_s']:.1f} s, analysis "
          f"{cold.timings['analysis_s']:.1f} s); report {t_report:.1f} s; resume from cache {t_warm:.1f} s "
          f"({warm.simulated} simulated)")
    print(f"per run: mean {wall.mean():.3f} s, median {np.median(wall):.3f} s, p95 {np.percentile(wall, 95):.3f} s")
    print(f"goal {figures['goal']}: {'met' if figures['goal_met'] else 'NOT met'}; headline: {figures['headline']}")
    print(f"wrote {out / 'bench_recommend.json'} and {out / 'bench_recommend.png'}")
    return 0


def _plot(fig_data: dict, fam: dict[str, list[float]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"wspace": 0.35})
    t = fig_data["phases_s"]
    names = ["skew variants", "headline runs", "map + predictor runs", "analysis", "report", "resume (cached)"]
    vals = [t["skew_variants_s"], t["headline_s"], t["maps_s"], t["analysis_s"], fig_data["report_s"],
            fig_data["resume_s"]]
    axes[0].barh(names, vals, color=["#bbb", "#4a8", "#48a", "#aa4", "#a84", "#888"])
    axes[0].axvline(GOAL_S, color="red", linestyle="--", label=f"goal {GOAL_S:.0f} s (sweep)")
    axes[0].invert_yaxis()
    axes[0].set_xlabel("wall time (s)")
    axes[0].set_title(f"Default sweep: {fig_data['runs']} runs, {fig_data['jobs']} jobs, "
                      f"{fig_data['sweep_s']:.1f} s")
    axes[0].legend(fontsize=8)
    labels = sorted(fam)
    axes[1].boxplot([np.array(fam[k]) * 1e3 for k in labels], orientation="horizontal")
    axes[1].set_yticks(np.arange(1, len(labels) + 1))
    axes[1].set_yticklabels(labels)
    axes[1].set_xlabel("wall time per run (ms, one simulate call, in a worker)")
    axes[1].set_title("Time per run by strategy family")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
