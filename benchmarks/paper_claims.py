"""The MoE-GPS paper's claims under `--assumptions paper` and `realistic` (not a test).

Runs, in this process, the `moe-gps simulate` commands behind docs/simulator.md ("The
paper's claims, side by side") and writes every number to benchmarks/results/paper_claims.json
and a readable summary to paper_claims.md. The 16384-token cases use synthetic traces with
enough tokens to regroup into real 16384-token steps (`moe-gps trace synth --steps 1536`,
786,432 tokens: 48 steps of 16384); they are written first, into --work.

Usage:  python benchmarks/paper_claims.py [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import RESULTS, save  # noqa: E402
from moe_gps.atomic import write_text_atomic  # noqa: E402
from moe_gps.cli.main import main as cli  # noqa: E402

WHAT_IF = ["token:synthetic(accuracy=0.9,cost=paper-mlp)", "token:synthetic(accuracy=0.9,cost=lstm)",
           "token:curve(accuracy=0.9)", "token:curve(accuracy=0.99)"]


def moe_gps(*args: str) -> dict | None:
    """One command through the CLI; its --json output (None for commands without)."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()) as out:
        code = cli([*args, *(["-o", tmp] if args[0] == "simulate" else [])])
    if code != 0:
        raise SystemExit(f"moe-gps {' '.join(args)} failed ({code})")
    return json.loads(out.getvalue()) if "--json" in args else None


def case(trace: str, cluster: str, tokens: int | None, assumptions: str) -> dict:
    args = ["simulate", trace, "--cluster", cluster, "--assumptions", assumptions, "--strategies", "all", *WHAT_IF,
            "--no-plots", "--json"]
    if tokens:
        args += ["--tokens-per-step", str(tokens)]
    d = moe_gps(*args)
    rows = {r["strategy"]: r for r in d["strategies"]}
    real = [r for r in d["strategies"] if r["strategy"] not in WHAT_IF]

    def best(kind):
        r = max((x for x in real if x["kind"] == kind), key=lambda x: x["speedup_vs_none"])
        return {"strategy": r["strategy"], "speedup": r["speedup_vs_none"], "latency_ms": r["latency_mean_ms"],
                "accuracy": r["accuracy"]}

    return {"command": "moe-gps " + " ".join(a if "(" not in a else f"'{a}'" for a in args),
            "none_ms": rows["none"]["latency_mean_ms"], "eplb": rows["eplb"]["speedup_vs_none"],
            "best_distribution": best("distribution"), "best_token": best("token"),
            "what_if": {n: rows[n]["speedup_vs_none"] for n in WHAT_IF},
            "predictor_us": {n: rows[n]["layer_predictor_us"] for n in WHAT_IF},
            "oracle": rows["oracle"]["speedup_vs_none"], "verdict": d["verdict"], "inferred": d["inferred"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(RESULTS / "paper_claims_traces"))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    big = {}
    for profile in ("mixtral-mmlu", "sst2"):
        path = work / f"{profile}_1536x512.parquet"
        if not path.exists():
            moe_gps("trace", "synth", "--profile", profile, "--steps", "1536", "--tokens-per-step", "512", "-o", str(path))
        big[profile] = str(path)
    sst2 = work / "sst2_64x512.parquet"
    if not sst2.exists():
        moe_gps("trace", "synth", "--profile", "sst2", "-o", str(sst2))
    bundled = str(ROOT / "traces" / "mixtral_mmlu.parquet")
    cases = {
        "mmlu-nvlink-512": (bundled, "4xA100-nvlink", None),
        "mmlu-nvlink-16384": (big["mixtral-mmlu"], "4xA100-nvlink", 16384),
        "sst2-pcie-512": (str(sst2), "4xA100-pcie", None),
        "sst2-pcie-16384": (big["sst2"], "4xA100-pcie", 16384),
    }
    results = {}
    lines = []
    for name, (trace, cluster, tokens) in cases.items():
        for assumptions in ("paper", "realistic"):
            r = case(trace, cluster, tokens, assumptions)
            results[f"{name}/{assumptions}"] = r
            d, t = r["best_distribution"], r["best_token"]
            gap = t["latency_ms"] / d["latency_ms"] - 1
            line = (f"{name} {assumptions}: none {r['none_ms']:.1f} ms; eplb {r['eplb']:.3f}; best dist "
                    f"{d['strategy']} {d['speedup']:.3f}; best token {t['strategy']} {t['speedup']:.3f} "
                    f"(dist faster by {gap:+.1%}); what-if " + ", ".join(f"{k} {v:.3f}" for k, v in r["what_if"].items())
                    + f"; oracle {r['oracle']:.3f}; verdict {r['verdict']['strategy']} {r['verdict']['speedup']:.3f}")
            print(line, flush=True)
            lines.append(line)
    evals = {}
    for profile, path in big.items():
        for tokens in (None, 16384):
            args = ["predict", "evaluate", path, "--predictors", "profile", "--json"]
            if tokens:
                args += ["--tokens-per-step", str(tokens)]
            ev = moe_gps(*args)
            eps = next(p for p in ev["predictors"] if p["name"] == "profile")["overall"]["eps_mean"]
            evals[f"{profile}/{tokens or 512}"] = eps
            line = f"profile predictor per-step error, {profile}, {tokens or 512} tokens per step: {eps:.4f}"
            print(line, flush=True)
            lines.append(line)
    path = save("paper_claims", {"cases": results, "profile_error": evals})
    write_text_atomic(RESULTS / "paper_claims.md", "\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
