"""What the simulator says under each copy policy (not a test): the tables of docs/simulator.md.

For each tokens-per-step (the trace's own, and 16384 by default) and each copy policy
(critical, overlap, async, hidden), runs `moe-gps simulate TRACE --copy-policy P
[--tokens-per-step N] --strategies all` in this process and keeps, per strategy, the
speed-up over none, the re-plans, the GB copied and the verdict line. Prints one markdown
table per tokens-per-step and writes them, with every number, to
benchmarks/results/sim_policies.json and .md.

Usage:  python benchmarks/sim_policies.py [TRACE] [--tokens 512 16384] [--cluster 4xA100-nvlink]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import RESULTS, save  # noqa: E402
from moe_gps.atomic import write_text_atomic  # noqa: E402
from moe_gps.cli.main import main as cli  # noqa: E402
from moe_gps.config.schema import COPY_POLICIES  # noqa: E402

POLICIES = COPY_POLICIES


def run(trace: str, cluster: str, tokens: int | None, policy: str) -> dict:
    """One simulate call through the CLI (JSON output into a temporary folder)."""
    import contextlib
    import io
    import json
    import tempfile

    args = ["simulate", trace, "--cluster", cluster, "--copy-policy", policy, "--no-plots", "--json"]
    if tokens:
        args += ["--tokens-per-step", str(tokens)]
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()) as out:
        t0 = time.perf_counter()
        code = cli(args + ["-o", tmp])
        wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"simulate failed ({code}): {' '.join(args)}")
    doc = json.loads(out.getvalue())
    doc["wall_s"] = wall
    return doc


def table(docs: dict[str, dict]) -> str:
    """Markdown: one row per strategy, per policy its speed-up (re-plans, GB copied)."""
    names = [r["strategy"] for r in docs[POLICIES[0]]["strategies"]]
    head = "| strategy | " + " | ".join(POLICIES) + " |\n|---|" + "---|" * len(POLICIES)
    rows = []
    for n in names:
        cells = []
        for p in POLICIES:
            r = next(x for x in docs[p]["strategies"] if x["strategy"] == n)
            extra = f" ({r['replans']}, {r['copied_gb']:.0f} GB)" if r["copied_gb"] > 0 else ""
            cells.append(f"{r['speedup_vs_none']:.3f}{extra}")
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    verdicts = [f"* {p}: " + _verdict(docs[p]) for p in POLICIES]
    return "\n".join([head, *rows, "", *verdicts])


def _verdict(doc: dict) -> str:
    v = doc["verdict"]
    if v is None:
        return "no verdict"
    ties = f"; ties: {', '.join(v['ties'])}" if v["ties"] else ""
    return f"{v['strategy']} {v['speedup']:.3f}x (95% CI {v['ci_low']:.3f}-{v['ci_high']:.3f}){ties}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", nargs="?", default=str(ROOT / "traces" / "mixtral_mmlu.parquet"))
    ap.add_argument("--tokens", type=int, nargs="+", default=[0, 16384],
                    help="tokens per step (0: as in the trace)")
    ap.add_argument("--cluster", default="4xA100-nvlink")
    a = ap.parse_args()
    figures, md = {}, []
    for tokens in a.tokens:
        docs = {p: run(a.trace, a.cluster, tokens or None, p) for p in POLICIES}
        label = f"{tokens} tokens per step" if tokens else "the trace's own tokens per step"
        text = f"### {label}\n\n{table(docs)}\n"
        print(text)
        md.append(text)
        figures[str(tokens)] = {p: {"verdict": d["verdict"], "wall_s": d["wall_s"],
                                    "strategies": [{k: r[k] for k in ("strategy", "speedup_vs_none", "replans",
                                                                      "copied_gb", "latency_mean_ms")}
                                                   for r in d["strategies"]]} for p, d in docs.items()}
    path = save("sim_policies", {"trace": a.trace, "cluster": a.cluster, "results": figures})
    write_text_atomic(RESULTS / "sim_policies.md", "\n".join(md))
    print(f"wrote {path} and {RESULTS / 'sim_policies.md'}")


if __name__ == "__main__":
    main()
