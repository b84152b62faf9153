"""Processor sharing on real gloo ranks (not a test): does the simulator's ``sim.cost.shared_compute``
hold when more ranks than processors compute, then wait in an all-to-all for the last one?

Each rank runs n_r fixed matrix products (one CPU thread), then ``all_to_all_single`` (gloo), over many
rounds after a barrier. The time of one product alone, c, comes from a round where only rank 0
computes. Per rank, the measured compute time (median over rounds) is set against

    processor sharing:  shared_compute(n x c) on the machine's processors (every rank starts together;
                        with m ranks still computing each runs at min(1, processors / m))
    no release:         n_max x c x ranks / processors for the busiest (ranks that wait keep their share)

Cases: ``alone`` (rank 0 only), ``balanced`` (the same n everywhere), ``graded`` (shares 1, 0.76, 0.37,
0.13 of the busiest: the mean per-layer FFN tokens of the 4 ranks of ``off`` in a 4-rank ``validate``
run) and ``reversed`` (the same, the busiest last); each at two time scales: the busiest rank's products
take 15 ms alone (a layer's expert FFN in those runs takes 10-15 ms) or 700 ms.

Usage:  python benchmarks/fidelity_sharing.py [--nproc 4] [--rounds 60]
Writes benchmarks/results/fidelity_sharing.json; prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

#: the busiest rank's share of products per case (the others follow in rank order)
SHAPES = {"graded": [1.0, 0.76, 0.37, 0.13], "reversed": [0.13, 0.37, 0.76, 1.0]}
#: milliseconds the busiest rank's products take alone, at each time scale
SCALES = {"15 ms": 15, "700 ms": 700}


def worker(plan: list[list[int]], rounds: int, out_dir: str) -> None:
    """One rank: per case, ``rounds`` rounds of barrier, n products, all-to-all; writes the median
    compute time per case to ``out_dir``/rank<r>.json."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    r, N = dist.get_rank(), dist.get_world_size()
    a, w = torch.randn(64, 512), torch.randn(512, 1024)
    x, y = torch.zeros(N * 256), torch.zeros(N * 256)
    out = []
    for counts in plan:
        times = []
        for rep in range(rounds + 2):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(counts[r]):
                a @ w
            t1 = time.perf_counter()
            dist.all_to_all_single(y, x)
            if rep >= 2:
                times.append(t1 - t0)
        out.append(float(np.median(times)))
    Path(out_dir, f"rank{r}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def run(plan: list[list[int]], nproc: int, rounds: int) -> np.ndarray:
    """Median compute seconds [cases, ranks] of ``plan`` on ``nproc`` gloo ranks."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               __file__, "--worker", json.dumps(plan), "--rounds", str(rounds), "--out", tmp]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if p.returncode != 0:
            sys.exit(f"fidelity_sharing: the ranks failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
        return np.array([json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(nproc)]).T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=4, help="gloo ranks (default 4)")
    ap.add_argument("--rounds", type=int, default=60, help="rounds per case at the short scale (a tenth of "
                                                           "them at the long one; default 60)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker), args.rounds, args.out)
        return
    from _common import save
    from sim.cost import shared_compute

    N = args.nproc
    units = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # the products one rank does in 1 ms alone
    per_ms = 200 / (run([[200] + [0] * (N - 1)], N, 10)[0, 0] * 1e3)
    cases, results = [], []
    for scale, busiest in SCALES.items():
        n = max(1, round(busiest * per_ms))
        plan = {"alone": [n] + [0] * (N - 1), "balanced": [n] * N}
        for name, shares in SHAPES.items():
            plan[name] = [max(1, round(n * s)) for s in np.resize(shares, N)]
        rounds = args.rounds if busiest < 100 else max(3, args.rounds // 10)
        measured = run(list(plan.values()), N, rounds)
        c = measured[0, 0] / n                                  # one product alone
        hw = SimpleNamespace(node_of_gpu=np.zeros(N, dtype=int), compute_units=float(units))
        for (name, counts), meas in zip(plan.items(), measured):
            own = np.array(counts, dtype=float) * c
            ps = shared_compute(own, hw) if name != "alone" else own
            keep = own.max() * N / units if name != "alone" else own.max()
            b = int(np.argmax(counts))
            results.append({"scale": scale, "case": name, "products": counts, "measured_s": meas.tolist(),
                            "processor_sharing_s": ps.tolist(), "busiest_no_release_s": float(keep),
                            "busiest_error": float(ps[b] / meas[b] - 1)})
            cases.append((scale, name, counts, meas, ps, keep, b))
    print(f"{N} gloo ranks on {units} processors; one product alone {1e3 * c:.3f} ms (last scale)")
    print(f"{'scale':7s} {'case':9s} {'products':22s} {'measured ms':26s} {'processor sharing ms':26s} "
          f"{'busiest: error':15s} {'no release ms':13s}")
    for scale, name, counts, meas, ps, keep, b in cases:
        fmt = lambda v: " ".join(f"{1e3 * x:6.1f}" for x in v)  # noqa: E731
        print(f"{scale:7s} {name:9s} {str(counts):22s} {fmt(meas):26s} {fmt(ps):26s} "
              f"{100 * (ps[b] / meas[b] - 1):+14.1f}% {1e3 * keep:13.1f}")
    path = save("fidelity_sharing", {"ranks": N, "processors": units, "cases": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
