"""How much each part of the calibrated cost model matters: re-simulate a `moe-gps validate` folder.

    python benchmarks/fidelity_ablation.py DIR [--out FILE.csv]

For every (ranks, strategy) of the validation in DIR (its runs, its round clusters), the runs'
placements are replayed and simulated again with the calibrated cluster files stripped of
some fields (docs/fidelity.md, "What the cost model gained for this"):

* ``full``: the cluster files as calibrated (the validation's own numbers);
* ``constant skew``: the collective skew of ranks arriving together at every collective, whatever
  the gap between the last two ranks to arrive (no ``collective_skew_floor`` / ``collective_skew_gap_us``);
* ``no collective skew``: without the time ranks lose leaving collectives at different times;
* ``combine at any gap``: the combine's host cost of ranks arriving together charged whatever the gap
  (``combine_together_us`` added to ``combine_overhead_us``: one constant, as fitted on every repeat);
* ``no combine return rows``: the combine without its cost per row a GPU sends back
  (``combine_return_row_us``, fitted from the imbalance and balanced model benchmarks);
* ``no copy latency``: weight copies at bandwidth only (no fixed time per expert transferred);
* ``no host overheads``: without the dispatch/combine overheads and the permutation term;
* ``roofline only``: only peak, HBM bandwidth, link bandwidth and latency, one kernel
  overhead (the attention overhead) for every compute phase: the datasheet-style model.

Prints the error of the mean per-step MoE time, and of the phases the new terms model (combine,
sync, copy), per variant and writes a CSV. No new runs: it reads DIR/runs and DIR/cluster-*.yaml; every
run is replayed from its own trace and steps.csv, as `moe-gps validate` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path


def variants(cluster):
    g, link = cluster.gpu, cluster.intra_node
    yield "full", cluster
    yield "constant skew", dataclasses.replace(cluster, collective_skew_floor=None, collective_skew_gap_us=None)
    yield "no collective skew", dataclasses.replace(cluster, collective_skew_us=0.0)
    yield "combine at any gap", dataclasses.replace(cluster, gpu=dataclasses.replace(
        g, combine_overhead_us=g.combine_overhead_us + g.combine_together_us, combine_together_us=0.0))
    yield "no combine return rows", dataclasses.replace(cluster, gpu=dataclasses.replace(g, combine_return_row_us=0.0))
    yield "no copy latency", dataclasses.replace(cluster, intra_node=dataclasses.replace(link, copy_latency_us=0.0))
    yield "no host overheads", dataclasses.replace(cluster, gpu=dataclasses.replace(
        g, dispatch_overhead_us=0.0, combine_overhead_us=0.0, combine_together_us=0.0, combine_return_row_us=0.0,
        permute_bandwidth_gb_s=None))
    plain = dataclasses.replace(g, attention_efficiency=None, attention_overhead_us=None, expert_overhead_us=0.0,
                                dispatch_overhead_us=0.0, combine_overhead_us=0.0, combine_together_us=0.0,
                                combine_return_row_us=0.0, permute_bandwidth_gb_s=None, replan_overhead_us=0.0,
                                kernel_overhead_us=g.attention_overhead_us or g.kernel_overhead_us)
    yield "roofline only", dataclasses.replace(cluster, gpu=plain, compute_units_per_node=None, collective_skew_us=0.0,
                                               intra_node=dataclasses.replace(link, copy_bandwidth_gb_s=None,
                                                                              copy_latency_us=None))


def main(argv=None) -> int:
    import pandas as pd

    from moe_gps.atomic import write_csv_atomic
    from moe_gps.config.loader import load_cluster
    from moe_gps.fidelity.compare import compare_run
    from moe_gps.fidelity.measured import measured_phases, read_run
    from moe_gps.tables import rows_to_columns
    from moe_gps.trace import load_trace
    from runtime.config import load_run_config
    from runtime.replay import replay_run, simulate_run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--out", help="CSV to write (default: DIR/ablation.csv)")
    args = p.parse_args(argv)
    root = Path(args.folder)
    run_cfg = load_run_config(root / "runs" / "run.yaml")
    first = max(2, run_cfg.duplication.warmup_steps)
    rows = []
    pooled = pd.read_csv(root / "fidelity.csv")
    for (n, mode), _ in pooled[pooled.phase == "total"].groupby(["nproc", "strategy"], sort=False):
        runs = sorted((root / "runs").glob(f"N{n}-{mode}*"))
        runs = [d for d in runs if re.fullmatch(rf"N{n}-{re.escape(mode)}(-\d+)?", d.name)]
        clusters = {}
        for d in runs:
            r = int(d.name.rsplit("-", 1)[1]) if re.search(r"-\d+$", d.name) else None
            f = root / (f"cluster-{n}-{r}.yaml" if r is not None else f"cluster-{n}.yaml")
            clusters[d] = load_cluster(str(f))
        replayed, measured = {}, {}
        for d in runs:
            timings, steps = read_run(d)
            trace = load_trace(d / "trace.parquet")
            replayed[d] = (trace, replay_run(trace, run_cfg, mode, n, steps))
            measured[d] = measured_phases(timings, steps)
        for name, _ in variants(clusters[runs[0]]):
            pairs = []
            for d in runs:
                cluster = dict(variants(clusters[d]))[name]
                trace, replay = replayed[d]
                result, res = simulate_run(trace, run_cfg, mode, cluster, replay, first)
                pairs.append((res, result.steps, measured[d]))
            c = compare_run(n, mode, pairs, first)
            rows.append({"nproc": n, "strategy": mode, "variant": name, "runs": len(runs),
                         "predicted_ms": c.mean("predicted", "total") * 1e3,
                         "measured_ms": c.mean("measured", "total") * 1e3, "error": c.error("total"),
                         "sync_error": c.error("sync"), "copy_error": c.error("copy"),
                         "combine_error": c.error("combine")})
            print(f"{n} ranks {mode:16s} {name:20s} error {c.error('total') * 100:+6.1f}%  combine "
                  f"{c.error('combine') * 100:+7.1f}%  sync {c.error('sync') * 100:+7.1f}%  copy "
                  f"{c.error('copy') * 100:+7.1f}%", flush=True)
    out = Path(args.out) if args.out else root / "ablation.csv"
    write_csv_atomic(out, rows_to_columns(rows))
    print(f"wrote {out} (every run of the folder pooled, also those the validation left out as busy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
