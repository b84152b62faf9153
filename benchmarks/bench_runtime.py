"""Runtime benchmark: expert-parallel MoE layer on 4 local gloo ranks (CPU).

1. **Overhead.** One 8-expert MoE layer, ``--tokens`` tokens per rank, top-2. Each rank
   times the phases of the EP forward (counts all-gather, dispatch all-to-all, expert
   compute, combine all-to-all); rank 0 also times the single-process reference layer
   (every expert, all ranks' tokens) in the same run. Reported per layer forward
   (median over ``--repeat``): ``overhead = counts + dispatch + combine`` on the rank
   with the most expert work (the one that waits least for the others, so its
   all-to-all times are closest to pure communication), and ``overhead / reference``.
2. **Duplication on a skewed batch.** The same routing (a router bias giving skewness ~2) under
   ``off`` (E/N experts per rank) and under an EPLB plan with 4 redundant slots made
   from the batch's counts. The plan predicts the busiest rank's pairs on the loads it
   was given (``Placement.gpu_loads(loads).max()``); the layer measures them (pairs each
   rank's experts computed). Predicted cut = ``1 - plan_max / off_max`` on the plan's
   loads; measured cut = ``1 - measured_max / measured_off_max`` on the real batch; the
   check is ``|measured - predicted| <= 0.05 * predicted``. A plan from the *previous*
   batch's counts (what dist-only does, with the previous step as predictor) is
   checked the same way.

    python benchmarks/bench_runtime.py [--tokens 1024] [--hidden 512] [--repeat 7]

Writes benchmarks/results/runtime.json and runtime_overhead.png, runtime_duplication.png.
Note: 4 ranks share the machine's cores; on a 2-core machine they time-share, which
inflates every phase (the numbers are for this machine, not for GPUs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import RESULTS, positive_int, save  # noqa: E402

E, K, N = 8, 2, 4


def _setup(ctx, hidden: int, inter: int, tokens: int, seed: int, skew: float):
    import torch

    from runtime.moe_layer import top_k_routing
    g = torch.Generator().manual_seed(seed)
    wgu = torch.randn(E, 2 * inter, hidden, generator=g) / hidden ** 0.5
    wd = torch.randn(E, hidden, inter, generator=g) / inter ** 0.5
    x = torch.randn(ctx.world_size * tokens, hidden, generator=g)
    bias = torch.as_tensor(np.random.default_rng(1000).normal(0, skew, E), dtype=torch.float32)  # fixed router skew
    logits = torch.randn(ctx.world_size * tokens, E, generator=g) + bias
    experts, weights = top_k_routing(logits, K)
    return wgu, wd, x, experts, weights


def _ep_layer(ctx, wgu, wd, phy2log, share):
    from runtime.moe_layer import ExpertParallelMoE
    from runtime.routing import layer_tables
    S = len(phy2log) // ctx.world_size
    ep = ExpertParallelMoE(0, E, wgu.shape[2], wgu.shape[1] // 2, ctx)
    mine = phy2log[ctx.rank * S:(ctx.rank + 1) * S]
    import torch
    ep.set_slots(layer_tables(phy2log, share, E, S), torch.stack([ep.pack_expert(wgu[e], wd[e]) for e in mine]))
    return ep


def worker(ctx, hidden: int, inter: int, tokens: int, repeat: int):
    import torch

    from moe_gps.placement import plan_placement
    from runtime.moe_layer import reference_moe
    T = tokens
    mine = slice(ctx.rank * T, (ctx.rank + 1) * T)
    out: dict = {"rank": ctx.rank}

    # 1. overhead on a mildly skewed batch, placement "off"
    wgu, wd, x, ex, w = _setup(ctx, hidden, inter, T, seed=0, skew=0.3)
    off = plan_placement(np.ones((1, E)), N, 0, algorithm="none")
    ep = _ep_layer(ctx, wgu, wd, off.phy2log[0], off.replica_share[0])
    phases = {p: [] for p in ("counts_s", "dispatch_s", "expert_s", "combine_s", "total_s")}
    ref_s = []
    with torch.inference_mode():
        for i in range(repeat + 1):
            ctx.barrier()
            t0 = time.perf_counter()
            y = ep(x[mine], ex[mine], w[mine])
            total = time.perf_counter() - t0
            if i:                                    # the first forward warms up
                for p in phases:
                    phases[p].append(total if p == "total_s" else ep.stats[p])
            ctx.barrier()
            if ctx.rank == 0:
                t0 = time.perf_counter()
                reference_moe(x, ex, w, wgu, wd)
                if i:
                    ref_s.append(time.perf_counter() - t0)
        err = float((y - reference_moe(x, ex, w, wgu, wd)[mine]).abs().max())
    out["phases"] = {p: statistics.median(v) for p, v in phases.items()}
    out["pairs"] = ep.stats["expert_tokens"]
    out["reference_s"] = statistics.median(ref_s) if ref_s else None
    out["max_abs_error"] = err

    # 2. duplication on a skewed batch
    wgu, wd, x, ex, w = _setup(ctx, hidden, inter, T, seed=1, skew=0.45)
    _, _, _, ex_prev, _ = _setup(ctx, hidden, inter, T, seed=2, skew=0.45)   # the previous batch, same router
    counts = np.bincount(ex.reshape(-1).numpy(), minlength=E)[None].astype(np.float64)
    prev_counts = np.bincount(ex_prev.reshape(-1).numpy(), minlength=E)[None].astype(np.float64)
    plans = {"off": off, "eplb (this batch)": plan_placement(counts, N, 4, algorithm="eplb"),
             "eplb (previous batch)": plan_placement(prev_counts, N, 4, algorithm="eplb")}
    dup = {}
    with torch.inference_mode():
        for name, p in plans.items():
            layer = _ep_layer(ctx, wgu, wd, p.phy2log[0], p.replica_share[0])
            expert_s = []
            for i in range(3):
                ctx.barrier()
                layer(x[mine], ex[mine], w[mine])
                expert_s.append(layer.stats["expert_s"])
            planned_on = prev_counts if "previous" in name else counts          # the loads the plan was made for
            dup[name] = {"measured_pairs": layer.stats["expert_tokens"], "expert_s": statistics.median(expert_s),
                         "predicted_pairs": p.gpu_loads(counts)[0, ctx.rank],
                         "plan_predicted_cut": float(1 - p.gpu_loads(planned_on).max()
                                                     / off.gpu_loads(planned_on).max())}
    out["duplication"] = dup
    out["skewness"] = float(counts.max() / counts.mean())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=positive_int, default=1024, help="tokens per rank (default: %(default)s)")
    ap.add_argument("--hidden", type=positive_int, default=512)
    ap.add_argument("--intermediate", type=positive_int, default=1024)
    ap.add_argument("--repeat", type=positive_int, default=7)
    args = ap.parse_args(argv)
    from runtime.local import run_local
    res = run_local(worker, N, args.hidden, args.intermediate, args.tokens, args.repeat, timeout_s=600,
                    collective_timeout_s=120)

    from moe_gps.tables import format_table
    rows = [{"rank": r["rank"], **{p: v * 1e3 for p, v in r["phases"].items()}, "pairs": r["pairs"]} for r in res]
    print(format_table(rows, [("rank", "rank", ""), ("pairs", "pairs", ""), ("counts_s", "counts ms", ".2f"),
                              ("dispatch_s", "dispatch ms", ".2f"), ("expert_s", "experts ms", ".2f"),
                              ("combine_s", "combine ms", ".2f"), ("total_s", "layer ms", ".2f")],
                       title=f"EP MoE layer on {N} gloo ranks (CPU), {E} experts, top-{K}, hidden {args.hidden}, "
                             f"intermediate {args.intermediate}, {args.tokens} tokens per rank; medians of "
                             f"{args.repeat} forwards"))
    ref = res[0]["reference_s"]
    busiest = max(res, key=lambda r: r["phases"]["expert_s"])        # waits least for the others
    ph = busiest["phases"]
    overhead = ph["counts_s"] + ph["dispatch_s"] + ph["combine_s"]
    latency = max(r["phases"]["total_s"] for r in res)
    print(f"reference layer (1 process, all {N * args.tokens} tokens, every expert): {ref * 1e3:.2f} ms; "
          f"EP layer latency (slowest rank): {latency * 1e3:.2f} ms")
    print(f"dispatch+combine overhead (counts + dispatch + combine on rank {busiest['rank']}, the rank with the most "
          f"expert work): {overhead * 1e3:.2f} ms per layer = {overhead / ref:.2f} x the reference layer; "
          f"max |EP - reference| = {max(r['max_abs_error'] for r in res):.2e}")

    names = list(res[0]["duplication"])
    measured = {n: np.array([r["duplication"][n]["measured_pairs"] for r in res]) for n in names}
    predicted = {n: np.array([r["duplication"][n]["predicted_pairs"] for r in res]) for n in names}
    off_max = measured["off"].max()
    print(f"\nskewed batch (skewness {res[0]['skewness']:.2f}), pairs per rank (measured | the plan's shares on "
          f"the true counts):")
    checks = {}
    for n in names:
        cut_pred = res[0]["duplication"][n]["plan_predicted_cut"]
        cut_meas = 1 - measured[n].max() / off_max
        ok = abs(cut_meas - cut_pred) <= 0.05 * abs(cut_pred) if cut_pred else abs(cut_meas) < 0.01
        checks[n] = {"measured_pairs": measured[n].tolist(), "predicted_pairs": predicted[n].tolist(),
                     "predicted_cut": cut_pred, "measured_cut": cut_meas, "within_5pct": bool(ok),
                     "slowest_expert_ms": 1e3 * max(r["duplication"][n]["expert_s"] for r in res)}
        print(f"  {n:22s} {measured[n].tolist()} | {np.round(predicted[n], 1).tolist()}  max {measured[n].max()}; "
              f"cut predicted {cut_pred:6.1%} measured {cut_meas:6.1%}"
              + (f" -> {'OK' if ok else 'MISS'} (5%)" if n != "off" else "")
              + f"; slowest rank's experts {checks[n]['slowest_expert_ms']:.1f} ms")

    figures = {"config": vars(args) | {"ranks": N, "experts": E, "top_k": K, "backend": "gloo", "device": "cpu"},
               "phases_ms_per_rank": [{p: v * 1e3 for p, v in r["phases"].items()} for r in res],
               "overhead_rank": busiest["rank"], "reference_ms": ref * 1e3, "ep_latency_ms": latency * 1e3,
               "overhead_ms": overhead * 1e3, "overhead_over_reference": overhead / ref,
               "max_abs_error": max(r["max_abs_error"] for r in res),
               "skewness": res[0]["skewness"], "duplication": checks}
    path = save("runtime", figures)
    _plots(ph, ref, names, measured, predicted)
    print(f"\nwrote {path}, {RESULTS / 'runtime_overhead.png'}, {RESULTS / 'runtime_duplication.png'}")
    return 0


def _plots(ph: dict, ref: float, names: list[str], measured: dict, predicted: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moe_gps.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(6, 3.2))
    bottom = 0.0
    for p, c in (("counts_s", "#999"), ("dispatch_s", "#e68a00"), ("expert_s", "#3a7"), ("combine_s", "#c33")):
        ax.barh(["EP layer (busiest rank)"], [ph[p] * 1e3], left=bottom, color=c, label=p[:-2])
        bottom += ph[p] * 1e3
    ax.barh(["reference (1 process)"], [ref * 1e3], color="#36c", label="reference")
    ax.set_xlabel("ms per layer forward")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(RESULTS / "runtime_overhead.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        xs = np.arange(N) + i * width
        ax.bar(xs, measured[n], width, label=f"{n} (measured)")
        ax.scatter(xs, predicted[n], color="k", s=12, zorder=3)
    ax.set_xticks(np.arange(N) + width * (len(names) - 1) / 2, [f"rank {r}" for r in range(N)])
    ax.set_ylabel("(token, expert) pairs computed")
    ax.set_title("skewed batch: pairs per rank (dots: the plan's shares)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(RESULTS / "runtime_duplication.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
