"""Load and inspect a 1M-row tokens trace. Goal: load in under 1 s on 2 cores.

    python benchmarks/bench_trace_io.py [--steps 64 --tokens 512]

Rows = steps x tokens x layers (32 for the mixtral-mmlu profile): 64 x 512 x 32 = 1,048,576.
The trace is synthesized with seed 0. --steps, --tokens and --repeat must be >= 1 (else one
error line, exit 2). Prints the figures and saves benchmarks/results/trace_io.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, positive_int, save, time_it  # noqa: E402

from moe_gps.errors import UserError  # noqa: E402
from moe_gps.trace import iter_steps, load_trace, write_trace  # noqa: E402
from moe_gps.trace.stats import summarize  # noqa: E402
from moe_gps.trace.synth import synthesize  # noqa: E402

SEED = 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=positive_int, default=64)
    ap.add_argument("--tokens", type=positive_int, default=512)
    ap.add_argument("--repeat", type=positive_int, default=5)
    args = ap.parse_args()
    load_at_start = load_average()
    try:
        trace = synthesize("mixtral-mmlu", num_steps=args.steps, tokens_per_step=args.tokens, seed=SEED,
                           with_weights=True)
    except UserError as e:
        ap.error(str(e))
    layers, top_k = trace.meta.num_layers, trace.meta.top_k
    rows = trace.num_tokens * trace.meta.num_layers
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.parquet"
        write = time_it(lambda: write_trace(path, trace), repeat=1)
        size = path.stat().st_size
        load = time_it(lambda: load_trace(path), repeat=args.repeat)
        loaded = load_trace(path)
        inspect = time_it(lambda: summarize(loaded), repeat=args.repeat)
        stream = time_it(lambda: sum(1 for _ in iter_steps(path)), repeat=args.repeat)
    figures = {
        "rows": rows, "steps": args.steps, "tokens_per_step": args.tokens, "layers": layers, "top_k": top_k,
        "synth": {"profile": "mixtral-mmlu", "seed": SEED}, "file_bytes": size,
        "write": write, "load": load, "inspect_stats": inspect, "stream_all_steps": stream,
        "load_rows_per_s": rows / load["median_s"], "goal_load_s": 1.0,
        "goal_met": load["median_s"] < 1.0,
    }
    out = save("trace_io", figures, load_average_at_start=load_at_start)
    print(f"trace: {rows:,} rows ({args.steps} steps x {args.tokens} tokens x {layers} layers, top-{top_k}, "
          f"with weights), {size / 1e6:.1f} MB")
    for name in ("write", "load", "inspect_stats", "stream_all_steps"):
        f = figures[name]
        print(f"  {name:17s} median {f['median_s'] * 1e3:8.1f} ms  (min {f['min_s'] * 1e3:.1f}, max {f['max_s'] * 1e3:.1f})")
    print(f"  load throughput   {figures['load_rows_per_s'] / 1e6:.1f} M rows/s; goal < 1 s: "
          f"{'met' if figures['goal_met'] else 'NOT met'}")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
