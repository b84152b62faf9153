"""Benchmark: evaluate every predictor on a 1M-row trace (64 steps x 512 tokens x 32 layers).

    python benchmarks/bench_predict.py [--repeats 3] [--steps 64] [--tokens 512] [--layers 32]

Measures, for :func:`moe_gps.predict.evaluate` with every predictor (both kinds, the
MLP when torch is installed, and one synthetic predictor) fitted on half the steps:

* ``total_s``: wall time of the whole evaluation (fit + predict + metrics + the
  placement planning behind the balancedness metric), per repeat;
* per predictor: fit + predict seconds (best repeat);
* ``torch_import_s``: the one-off cost of importing torch (paid by the first evaluation
  in a process, here before the timed repeats);

and compares the median total with the 10 s budget: the script exits 1 when the median is
over it (0 otherwise; 2 with one error line for a bad flag: --repeats, --steps, --tokens and
--layers must be >= 1, --steps >= 2). The trace is synthesized with seed 0. Figures, with the
command line, the 1-minute load average at the start and the tree's commit, go to
``benchmarks/results/bench_predict.json`` and ``.csv`` (git-ignored) and are printed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import environment, load_average, positive_int  # noqa: E402

from moe_gps.atomic import write_text_atomic  # noqa: E402
from moe_gps.errors import UserError  # noqa: E402
from moe_gps.predict import evaluate, torch_available  # noqa: E402
from moe_gps.tables import format_table  # noqa: E402
from moe_gps.trace.synth import synthesize  # noqa: E402

BUDGET_S = 10.0
SEED = 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--steps", type=positive_int, default=64)
    ap.add_argument("--tokens", type=positive_int, default=512)
    ap.add_argument("--layers", type=positive_int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("argument --steps: must be >= 2 (half the steps fit the predictors, the rest are scored)")
    load_at_start = load_average()

    t0 = time.perf_counter()
    try:
        trace = synthesize("mixtral-mmlu", num_steps=args.steps, tokens_per_step=args.tokens,
                           num_layers=args.layers, seed=SEED)
    except UserError as e:
        ap.error(str(e))
    synth_s = time.perf_counter() - t0
    rows = trace.num_tokens * trace.meta.num_layers
    t0 = time.perf_counter()
    has_torch = torch_available()  # imports torch when installed
    torch_s = time.perf_counter() - t0 if has_torch else None

    totals, per_pred = [], {}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ev = evaluate(trace, train_steps=args.steps // 2, synthetic=[0.9])
        totals.append(time.perf_counter() - t0)
        for r in ev.reports:
            key = f"{r.kind}:{r.label}"
            per_pred.setdefault(key, []).append(r.seconds)
    skipped = [f"{r.kind}:{r.name}: {r.skipped}" for r in ev.reports if r.skipped]
    med = statistics.median(totals)
    result = {
        "benchmark": "evaluate every predictor",
        "trace": {"generator": f"moe_gps.trace.synth mixtral-mmlu seed {SEED}", "seed": SEED, "steps": args.steps,
                  "tokens_per_step": args.tokens, "layers": args.layers, "experts": trace.meta.num_experts,
                  "top_k": trace.meta.top_k, "rows": rows, "train_steps": args.steps // 2},
        "machine": environment(load_average_at_start=load_at_start),
        "synthesize_s": synth_s,
        "torch_import_s": torch_s,
        "total_s": totals,
        "total_median_s": med,
        "total_min_s": min(totals),
        "budget_s": BUDGET_S,
        "within_budget": med < BUDGET_S,
        "predictor_best_s": {k: min(v) for k, v in per_pred.items()},
        "metrics_and_planning_s": min(totals) - sum(min(v) for v in per_pred.values()),
        "skipped": skipped,
    }
    out = Path(args.out)
    write_text_atomic(out / "bench_predict.json", json.dumps(result, indent=2) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["item", "seconds"])
    for i, t in enumerate(totals):
        w.writerow([f"total_repeat_{i}", f"{t:.4f}"])
    for k, v in result["predictor_best_s"].items():
        w.writerow([k, f"{v:.4f}"])
    w.writerow(["metrics_and_planning", f"{result['metrics_and_planning_s']:.4f}"])
    if torch_s is not None:
        w.writerow(["torch_import", f"{torch_s:.4f}"])
    write_text_atomic(out / "bench_predict.csv", buf.getvalue())

    print(f"trace: {args.steps} steps x {args.tokens} tokens x {args.layers} layers = {rows} rows "
          f"({trace.meta.num_experts} experts, top-{trace.meta.top_k}); fit on {args.steps // 2} steps; "
          f"{os.cpu_count()} CPUs, load average "
          f"{'unknown' if load_at_start is None else f'{load_at_start:.2f}'} at start")
    print(format_table([{"predictor": k, "s": v} for k, v in result["predictor_best_s"].items()],
                       [("predictor", "predictor", ""), ("s", "fit+predict s (best)", ".3f")]))
    print(f"metrics + placement planning: {result['metrics_and_planning_s']:.3f} s")
    if torch_s is not None:
        print(f"torch import (once per process, not in the totals): {torch_s:.3f} s")
    print("total per evaluation: " + ", ".join(f"{t:.3f}" for t in totals)
          + f" s; median {med:.3f} s (budget {BUDGET_S:.0f} s: {'OK' if med < BUDGET_S else 'OVER'})")
    for s in skipped:
        print(f"skipped {s}")
    print(f"wrote {out / 'bench_predict.json'} and {out / 'bench_predict.csv'}")
    return 0 if med < BUDGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
