"""Speed of the simulator (not a test): wall time and simulated token-layers per second.

Two cases, as issue 5 asks:

1. the bundled default trace (traces/mixtral_mmlu.parquet: 64 steps x 512 tokens, 32
   layers, 8 experts, top-2) with every default strategy on 4xA100-nvlink (goal: the
   whole run, output files included, in <= 10 s on 2 cores);
2. a DeepSeek-V3-scale run: 58 layers, 256 experts, top-8, 64 GPUs (8 nodes of 8 H100,
   InfiniBand), 100 steps of 4096 tokens (goal: <= 60 s).

The DeepSeek-scale trace is synthetic and made here with a fast generator (a pool of
expert sets per layer drawn by Gumbel top-k from a log-normal popularity, each token
picking a pool row), because the calibrated generator (moe_gps.trace.synth) needs
minutes at that size. Its numbers only serve to time the simulator.

"Token-layers per second" = simulated tokens x MoE layers / seconds spent on that
strategy (predictor fit and rollout + planning + phase costs + event simulation).

Usage:  python benchmarks/bench_sim.py [--out benchmarks/results/sim] [--skip-deepseek] [--with-token]
Writes bench_sim.json (with the command line, the load average at the start, the tree's commit
and the seeds: pool_trace seed 0, SimulateConfig.seed) and bench_sim.png to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import environment, load_average  # noqa: E402

from moe_gps.atomic import atomic_path, write_text_atomic  # noqa: E402
from moe_gps.config import (SimulateConfig, load_cluster, load_model, strategy_from_name)  # noqa: E402
from moe_gps.trace import TokensTrace, TraceMeta, load_trace  # noqa: E402

POOL_SEED = 0


def pool_trace(num_steps: int, tokens: int, layers: int, experts: int, k: int, seed: int = 0,
               sigma: float = 0.6, pool: int = 4096) -> TokensTrace:
    """A fast synthetic tokens trace (see the module docstring). int16 [steps*tokens, layers, k]."""
    rng = np.random.default_rng(seed)
    pop = sigma * rng.standard_normal((layers, experts))
    g = rng.gumbel(size=(layers, pool, experts)).astype(np.float32) + pop[:, None, :].astype(np.float32)
    rows = np.argpartition(-g, k, axis=2)[:, :, :k]                       # [L, pool, k] distinct experts
    order = np.argsort(-np.take_along_axis(g, rows, axis=2), axis=2)
    rows = np.take_along_axis(rows, order, axis=2).astype(np.int16)
    N = num_steps * tokens
    pick = rng.integers(0, pool, size=(N, layers))
    experts_arr = rows[np.arange(layers)[None, :], pick]                   # [N, L, k]
    offsets = np.arange(num_steps + 1, dtype=np.int64) * tokens
    meta = TraceMeta(kind="tokens", num_layers=layers, num_experts=experts, top_k=k, model="deepseek-v3",
                     dataset="synthetic pool (benchmark only)", source="synthetic",
                     provenance={"generator": "benchmarks/bench_sim.py:pool_trace", "seed": seed,
                                 "sigma": sigma, "pool": pool})
    token_id = rng.integers(0, 32000, size=N).astype(np.int32)
    return TokensTrace(meta, experts_arr, offsets, token_id=token_id)


def run_case(label: str, trace, cfg: SimulateConfig, out_dir: Path | None) -> dict:
    from sim.report import write_outputs
    from sim.run import simulate

    t0 = time.perf_counter()
    result = simulate(trace, cfg, progress=False, trace_name=label)
    t_sim = time.perf_counter() - t0
    t_write = 0.0
    if out_dir is not None:
        t1 = time.perf_counter()
        write_outputs(result, out_dir)
        t_write = time.perf_counter() - t1
    L = trace.meta.num_layers
    token_layers = float(result.tokens.sum() * L)
    rows = []
    for r in result.strategies:
        secs = sum(r.seconds.values())
        rows.append({"strategy": r.name, "seconds": secs, **{f"{k}_s": v for k, v in r.seconds.items()},
                     "token_layers_per_s": token_layers / secs if secs > 0 else None,
                     "mean_step_latency_ms": float(r.step_latency.mean() * 1e3)})
    return {"case": label, "simulate_s": t_sim, "write_s": t_write, "token_layers": token_layers,
            "steps": int(len(result.steps)), "gpus": cfg.cluster.num_gpus, "strategies": rows}


def print_case(c: dict) -> None:
    print(f"\n{c['case']}: simulate {c['simulate_s']:.2f} s + write {c['write_s']:.2f} s, "
          f"{c['steps']} steps, {c['gpus']} GPUs, {c['token_layers']:.3g} token-layers")
    print(f"  {'strategy':22s} {'seconds':>8s} {'fit':>6s} {'plan':>6s} {'events':>7s} {'token-layers/s':>15s}")
    for r in c["strategies"]:
        print(f"  {r['strategy']:22s} {r['seconds']:8.2f} {r['prepare_s']:6.2f} {r['plan_s']:6.2f} "
              f"{r['events_s']:7.2f} {r['token_layers_per_s']:15,.0f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sim"))
    ap.add_argument("--skip-deepseek", action="store_true")
    ap.add_argument("--with-token", action="store_true",
                    help="also time token:synthetic at DeepSeek scale (most of its time is the predictor's "
                         "corruption of 190M routing entries, moe_gps.predict)")
    args = ap.parse_args()
    load_at_start = load_average()
    out = Path(args.out)
    cases = []
    seeds = {"pool_trace": POOL_SEED}

    from sim.strategies import default_strategy_names
    t0 = time.perf_counter()
    trace = load_trace(ROOT / "traces" / "mixtral_mmlu.parquet")
    names, _ = default_strategy_names(trace)
    cfg = SimulateConfig(cluster=load_cluster("4xA100-nvlink"), model=load_model("mixtral-8x7b"),
                         strategies=[strategy_from_name(n) for n in names])
    seeds["simulate"] = cfg.seed
    c = run_case("default trace, 4xA100-nvlink, all default strategies", trace, cfg, out / "bench_sim_default")
    c["total_with_load_s"] = time.perf_counter() - t0
    cases.append(c)
    print_case(c)
    print(f"  total (load trace + simulate + write): {c['total_with_load_s']:.2f} s (goal <= 10 s; the CLI adds "
          "about 1 s of imports)")

    if not args.skip_deepseek:
        t0 = time.perf_counter()
        trace = pool_trace(100, 4096, 58, 256, 8, seed=POOL_SEED)
        t_gen = time.perf_counter() - t0
        base = load_cluster("2x8xH100-ib")
        cluster = replace(base, name="8x8xH100-ib", num_gpus=64,
                          description="8 nodes of 8 H100 (2x8xH100-ib preset scaled to 64 GPUs)")
        names = ["none", "eplb", "dist:profile", "dist:ema", "oracle"]
        cfg = SimulateConfig(cluster=cluster, model=load_model("deepseek-v3"), train_steps=20,
                             strategies=[strategy_from_name(n) for n in names])
        c = run_case("DeepSeek-V3 scale: 58 layers, 256 experts, 64 GPUs, 100 x 4096 tokens", trace, cfg, None)
        c["trace_generation_s"] = t_gen
        cases.append(c)
        print_case(c)
        print(f"  (trace generation {t_gen:.1f} s, not counted; goal <= 60 s for the simulation)")
        if args.with_token:
            cfg = dataclasses.replace(cfg, strategies=[strategy_from_name("token:synthetic")])
            c = run_case("DeepSeek-V3 scale, token:synthetic (accuracy 0.9)", trace, cfg, None)
            cases.append(c)
            print_case(c)

    report = {"machine": platform.platform(), "python": platform.python_version(),
              "environment": environment(load_average_at_start=load_at_start), "seeds": seeds, "cases": cases}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "bench_sim.json", json.dumps(report, indent=2) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4.5), squeeze=False)
    for ax, c in zip(axes[0], cases):
        names = [r["strategy"] for r in c["strategies"]]
        ax.barh(names, [r["token_layers_per_s"] for r in c["strategies"]], color="#1f77b4")
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("simulated token-layers per second (log)")
        ax.set_title(f"{c['case'][:48]}\nsimulate {c['simulate_s']:.1f} s", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    with atomic_path(out / "bench_sim.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    print(f"\nwrote {out / 'bench_sim.json'} and {out / 'bench_sim.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
