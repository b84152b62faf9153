"""Placement planner benchmark: planning time and balance, DeepSeek-V3 scale and real traces.

    python benchmarks/bench_placement.py                  # full run, writes results and prints tables
    python benchmarks/bench_placement.py --repeats 3      # quicker, noisier timings
    python benchmarks/bench_placement.py --out DIR        # results folder (default benchmarks/results/placement)

What it measures (formulas in docs/placement.md):

1. *Planning time and balancedness* at DeepSeek-V3 scale (58 MoE layers, 256 experts;
   32 or 64 GPUs; 288 or 320 slots per layer), with loads drawn from two seeded skewed
   distributions, for: the plain loop-by-loop EPLB in ``moe_gps.placement.reference``
   (our yardstick, written from DeepSeek's description), our vectorised ``eplb`` (its
   phy2log must equal the reference's), ``waterfill``, ``greedy`` and ``none``. Times
   are the median and the minimum of ``--repeats`` runs of ``plan_placement``
   (validation of the result included).
2. The same on real router traces from ../shared/traces/real when present: Qwen3-30B-A3B
   served by vLLM (48 layers x 128 experts, the real 2050-token prefill pass), FLAME-MoE
   (8 x 64) and Mixtral 8x7B popularity on MMLU (32 x 8). There is no real trace with 256
   experts, so the DeepSeek-V3-scale rows use synthetic loads only.
3. *Fewer slots*: balancedness of EPLB and waterfill for each redundant-slot budget.
4. *Bytes moved*: a sequence of re-plans on drifting loads (6 windows; each window's
   loads = the previous window's x lognormal(0, sigma) noise, sigma 0.05 and 0.25) and
   the two real Qwen3 prefill passes; experts that must arrive on a GPU per re-plan and
   the mean balancedness of the re-plans, for EPLB and waterfill (which ignore the
   placement in force) and waterfill given ``previous`` at several
   ``migration_tolerance`` values.

Loads are seeded: zipf seed 0, lognormal seed 1, drift noise seed 2 (recorded in
``results.json`` with the command line, the load average at the start and the tree's commit).
``--repeats`` and ``--ref-repeats`` must be >= 1 (else one error line, exit 2).

Results: ``results.json`` (every number) and ``tables.md`` (the tables printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import environment, positive_int  # noqa: E402

from moe_gps.atomic import write_text_atomic  # noqa: E402
from moe_gps.placement import balancedness, bytes_moved, placement_metrics, plan_placement  # noqa: E402
from moe_gps.placement.reference import eplb_reference  # noqa: E402

REAL = ROOT.parent / "shared" / "traces" / "real"
ALGOS = ("reference-eplb", "eplb", "waterfill", "greedy", "none")
SEEDS = {"zipf_loads": 0, "lognormal_loads": 1, "drift_noise": 2}


# ------------------------------------------------------------------------------ loads
def zipf_loads(layers: int, experts: int, s: float, seed: int) -> np.ndarray:
    """Per layer: expert popularity 1/rank^s in a random order, times lognormal(0, 0.3) noise."""
    rng = np.random.default_rng(seed)
    base = 1.0 / np.arange(1, experts + 1) ** s
    pop = np.stack([rng.permutation(base) for _ in range(layers)]) * rng.lognormal(0, 0.3, (layers, experts))
    return np.round(pop / pop.sum(axis=1, keepdims=True) * 8 * 4096)     # 4096 tokens x top-8


def lognormal_loads(layers: int, experts: int, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pop = rng.lognormal(0, sigma, (layers, experts))
    return np.round(pop / pop.sum(axis=1, keepdims=True) * 8 * 4096)


def real_cases() -> list[tuple[str, np.ndarray, list[tuple[int, int]]]]:
    """(name, loads [L, E], [(gpus, redundant), ...]) for the real traces that are present."""
    cases = []
    try:
        from moe_gps.trace.importers import import_gate_csv, import_vllm_jsonl
    except ImportError:                                       # importers not available
        return cases
    qwen = REAL / "qwen3-30b-a3b-vllm-sharegpt"
    if qwen.is_dir():
        t = import_vllm_jsonl([qwen / "token_distri_8.jsonl", qwen / "token_distri_16.jsonl"], min_tokens=1000,
                              num_layers=48, num_experts=128).trace
        c = t.counts().astype(float)                          # [2 prefill passes, 48, 128]
        cases.append(("qwen3-30b-a3b vLLM prefill (real)", c[0], [(8, 8), (8, 16), (16, 16), (32, 32)]))
        cases.append(("qwen3 drift: pass 0 -> pass 1", c, []))
    flame = REAL / "flame-moe-290m" / "prefill"
    if flame.is_dir():
        c = import_gate_csv([flame]).trace.counts().astype(float)
        cases.append(("flame-moe-290m prefill (real)", c[0], [(8, 8), (16, 16)]))
    mix = REAL / "mixtral-8x7b-mmlu-popularity" / "mixtral_8x7b_instruct"
    if mix.is_dir():
        files = sorted(mix.glob("*.json"))
        loads = np.sum([np.asarray(json.loads(f.read_text())["expert_popularity"], float) for f in files], axis=0)
        cases.append(("mixtral-8x7b MMLU popularity (real)", loads, [(4, 4), (8, 8), (8, 16)]))
    return cases


# ---------------------------------------------------------------------------- running
def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, 1e3 * float(np.median(times)), 1e3 * float(np.min(times))


def run_case(loads: np.ndarray, gpus: int, redundant: int, repeats: int, ref_repeats: int) -> list[dict]:
    E = loads.shape[1]
    rows = []
    ref, ref_med, ref_min = timed(lambda: eplb_reference(loads.tolist(), E + redundant, gpus), ref_repeats)
    for algo in ALGOS:
        if algo == "reference-eplb":
            from moe_gps.placement import Placement
            p = Placement(np.asarray(ref), gpus, E, allow_colocated=True)
            med, mn = ref_med, ref_min
        else:
            p, med, mn = timed(lambda: plan_placement(loads, gpus, redundant, algo), repeats)
        m = placement_metrics(p, loads)
        row = {"algorithm": algo, "gpus": gpus, "redundant": redundant, "slots": E + redundant,
               "time_ms_median": med, "time_ms_min": mn,
               "balancedness": float(m.balancedness.mean()), "balancedness_min": float(m.balancedness.min()),
               "redundant_used": float(m.redundant_used.mean())}
        if algo == "eplb":
            row["equals_reference"] = bool(np.array_equal(p.phy2log, np.asarray(ref)))
        rows.append(row)
    return rows


def drift_sequence(loads: np.ndarray, windows: int, sigma: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    seq = [loads]
    for _ in range(windows - 1):
        seq.append(np.round(seq[-1] * rng.lognormal(0, sigma, loads.shape)))
    return seq


def migration(seq: list[np.ndarray], gpus: int, redundant: int, tolerances=(0.002, 0.005, 0.01)) -> dict:
    """Re-plan on every window; experts that must arrive on a GPU per re-plan, and balancedness."""
    runs = [("eplb", None), ("waterfill", None)] + [("waterfill", t) for t in tolerances]
    out = {}
    for algo, tol in runs:
        prev, moved, bal = None, [], []
        for i, loads in enumerate(seq):
            opts = {} if tol is None else {"migration_tolerance": tol}
            p = plan_placement(loads, gpus, redundant, algo, previous=prev if tol is not None else None, **opts)
            if prev is not None:
                moved.append(int(bytes_moved(p, prev)[0].sum()))
            if i > 0:
                bal.append(float(balancedness(p.gpu_loads(loads)).mean()))
            prev = p
        key = algo if tol is None else f"{algo} +previous, tolerance {tol}"
        out[key] = {"experts_moved_per_replan": float(np.mean(moved)), "balancedness": float(np.mean(bal))}
    L, E = seq[0].shape
    out["slots_total"] = L * (E + redundant)
    return out


# ----------------------------------------------------------------------------- output
def table(rows: list[dict], title: str) -> str:
    head = ("| GPUs | slots | algorithm | time median (ms) | time min (ms) | balancedness | worst layer | "
            "redundant used |\n|---:|---:|---|---:|---:|---:|---:|---:|")
    lines = [f"**{title}**", "", head]
    for r in rows:
        eq = " (= reference)" if r.get("equals_reference") else (" (differs!)" if "equals_reference" in r else "")
        lines.append(f"| {r['gpus']} | {r['slots']} | {r['algorithm']}{eq} | {r['time_ms_median']:.1f} | "
                     f"{r['time_ms_min']:.1f} | {r['balancedness']:.4f} | {r['balancedness_min']:.4f} | "
                     f"{r['redundant_used']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=positive_int, default=7, help="timed runs per planner (>= 1; default 7)")
    ap.add_argument("--ref-repeats", type=positive_int, default=3,
                    help="timed runs of the reference EPLB (>= 1; default 3)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "placement"))
    args = ap.parse_args(argv)

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    env = {**environment(load_average_at_start=load[0] if load else None), "machine": platform.machine(),
           "load_average": load, "repeats": args.repeats, "ref_repeats": args.ref_repeats}
    results: dict = {"environment": env, "seeds": SEEDS, "deepseek_scale": {}, "real": {}, "migration": {}}
    md = [f"Environment: Python {env['python']}, numpy {env['numpy']}, {env['cpus']} CPUs, "
          f"load average at start {env['load_average']}", ""]

    ds = {"zipf s=1.0": zipf_loads(58, 256, 1.0, seed=SEEDS["zipf_loads"]),
          "lognormal sigma=1.0": lognormal_loads(58, 256, 1.0, seed=SEEDS["lognormal_loads"])}
    for name, loads in ds.items():
        rows = []
        for gpus, slots in ((32, 288), (32, 320), (64, 320)):
            rows += run_case(loads, gpus, slots - 256, args.repeats, args.ref_repeats)
            print(f"  done: {name}, {gpus} GPUs, {slots} slots", file=sys.stderr)
        skew = float((loads.max(axis=1) / loads.mean(axis=1)).mean())
        results["deepseek_scale"][name] = {"expert_skew_mean": skew, "rows": rows}
        md += [table(rows, f"DeepSeek-V3 scale, 58 layers x 256 experts, loads {name} "
                           f"(mean max/mean expert load {skew:.2f})"), ""]

    for name, loads, configs in real_cases():
        if not configs:
            results["migration"][f"{name}, 8 GPUs, 136 slots"] = migration([loads[0], loads[1]], 8, 8)
            continue
        rows = []
        for gpus, redundant in configs:
            if (loads.shape[1] + redundant) % gpus:
                continue
            rows += run_case(loads, gpus, redundant, args.repeats, args.ref_repeats)
        skew = float((loads.max(axis=1) / loads.mean(axis=1)).mean())
        results["real"][name] = {"shape": list(loads.shape), "expert_skew_mean": skew, "rows": rows}
        md += [table(rows, f"{name}, {loads.shape[0]} layers x {loads.shape[1]} experts "
                           f"(mean max/mean expert load {skew:.2f})"), ""]
        print(f"  done: {name}", file=sys.stderr)

    for sigma in (0.05, 0.25):
        seq = drift_sequence(lognormal_loads(58, 256, 1.0, seed=SEEDS["lognormal_loads"]), windows=6, sigma=sigma,
                             seed=SEEDS["drift_noise"])
        results["migration"][f"DeepSeek-V3 scale, 32 GPUs, 288 slots, drift sigma {sigma}"] = migration(seq, 32, 32)
        print(f"  done: migration, drift {sigma}", file=sys.stderr)
    mig = ["**Re-planning on drifting loads: experts that must arrive on a GPU per re-plan**", "",
           "| loads | algorithm | experts moved per re-plan | of slots | balancedness |", "|---|---|---:|---:|---:|"]
    for name, res in results["migration"].items():
        total = res["slots_total"]
        for algo, r in res.items():
            if algo == "slots_total":
                continue
            mig.append(f"| {name} | {algo} | {r['experts_moved_per_replan']:.0f} | "
                       f"{r['experts_moved_per_replan'] / total:.1%} | {r['balancedness']:.4f} |")
    md += mig + [""]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(out / "tables.md", "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out / 'results.json'} and {out / 'tables.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
