"""Results of ``moe-gps serve``: terminal tables, CSV/Parquet files, the exact config, plots.

Columns: docs/serving.md, "Outputs".
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from moe_gps.atomic import write_csv_atomic, write_parquet_atomic
from moe_gps.tables import concat_columns, format_table, rows_to_columns
from moe_gps.workers import Warm
from sim.report import write_config_and_summary
from sim.serving.metrics import verdict_line
from sim.serving.run import ServeResult
from sim.serving.server import ITERATION_COLUMNS

TABLE = [("strategy", "strategy", ""), ("ttft_p50_ms", "TTFT p50", ".1f"), ("ttft_p90_ms", "p90", ".1f"),
         ("ttft_p99_ms", "p99 ms", ".1f"), ("tpot_p50_ms", "TPOT p50", ".2f"), ("tpot_p90_ms", "p90", ".2f"),
         ("tpot_p99_ms", "p99 ms", ".2f"), ("e2e_p50_ms", "E2E p50", ".0f"), ("e2e_p99_ms", "p99 ms", ".0f"),
         ("throughput_rps", "req/s", ".2f"), ("output_tokens_per_s", "out tok/s", ",.0f"),
         ("slo_attainment", "SLO met", ".3f"), ("goodput_rps", "goodput", ".2f"),
         ("kv_tokens_per_gpu", "KV tok/GPU", ",d"), ("copied_gb", "copied GB", ".1f")]


def sustainable_rates(result: ServeResult) -> dict[str, float | None]:
    """Per strategy, the highest simulated rate up to which every rate meets the SLO attainment target
    (None: not even the lowest); empty without an SLO."""
    slo = result.config.slo
    if not slo.given:
        return {}
    out: dict[str, float | None] = {}
    rows = sorted(result.rows(), key=lambda r: r["rate_rps"])
    for s in result.config.simulate.strategies:
        best = None
        for r in (r for r in rows if r["strategy"] == s.name):
            if not r["slo_attainment"] >= slo.attainment:
                break
            best = r["rate_rps"]
        out[s.name] = best
    return out


def _slo_text(result: ServeResult) -> str:
    slo = result.config.slo
    if not slo.given:
        return "no SLO (goodput = throughput)"
    parts = [f"TTFT <= {slo.ttft_ms:g} ms" if slo.ttft_ms is not None else "",
             f"TPOT <= {slo.tpot_ms:g} ms" if slo.tpot_ms is not None else ""]
    return "SLO " + " and ".join(p for p in parts if p)


def goodput_note(winner: str, rows: list[dict]) -> str:
    """A line under an SLO-attainment verdict whose winner has not the highest goodput of the rate's runs
    (goodput divides by each run's own span: a run that meets the SLO for more requests, or for as many at
    a lower mean latency, can end later)."""
    good = {r["strategy"]: r["goodput_rps"] for r in rows}
    met = {r["strategy"]: r.get("slo_attainment") for r in rows}
    best = max(good, key=lambda k: good[k])
    if best == winner or good[best] <= good.get(winner, 0.0):
        return ""
    same = met.get(winner) is not None and met.get(best) == met.get(winner)
    why = "meets the SLO for as many requests at a lower mean latency" if same else "meets the SLO for more requests"
    return (f"\n  (goodput: {best} {good[best]:.2f} against {winner}'s {good[winner]:.2f} requests/s: {winner} {why}, "
            f"but its run ends later)")


def format_summary(result: ServeResult) -> str:
    """The terminal report: one table and one verdict per rate, then sustainable rates and notes."""
    cfg = result.config
    sim_cfg, w, sch = cfg.simulate, cfg.workload, cfg.scheduler
    head = (f"{sim_cfg.model.name} on {sim_cfg.cluster.name} ({sim_cfg.cluster.num_gpus} GPUs), workload {w.name}: "
            f"{w.num_requests} requests per rate, {w.arrival.process} arrivals; per GPU: "
            f"{sch.max_num_batched_tokens} tokens per iteration, {sch.max_num_seqs} running requests; copies "
            f"{sim_cfg.copy_policy}, seed {sim_cfg.seed}; {_slo_text(result)}")
    rows = result.rows()
    blocks = [head]
    for rr in result.rates:
        sub = [r for r in rows if r["rate_rps"] == rr.rate]
        text = format_table(sub, TABLE, title=f"rate {rr.rate:g} requests/s")
        if rr.verdict is not None:
            text += "\n" + verdict_line(rr.verdict, rr.on_goodput)
            text += goodput_note(rr.verdict.strategy, sub) if rr.on_goodput else ""
        blocks.append(text)
    sus = sustainable_rates(result)
    if sus and len(result.rates) > 1:
        lines = [f"  {name}: {'below ' + format(min(r.rate for r in result.rates), 'g') if v is None else format(v, 'g')}"
                 f" requests/s" for name, v in sus.items()]
        blocks.append(f"highest rate served with >= {cfg.slo.attainment:.0%} of requests within the SLO:\n"
                      + "\n".join(lines))
    if result.notes:
        blocks.append("\n".join(f"note: {n}" for n in result.notes))
    return "\n\n".join(blocks)


#: requests.csv's times (seconds from the first arrival), written exactly: 6 digits would round them to
#: a millisecond after 100 s of a run, a few percent of a TTFT
REQUEST_TIMES = ("arrival_s", "admitted_s", "first_token_s", "finish_s")


def requests_columns(result: ServeResult) -> dict[str, np.ndarray]:
    """A table (column name -> values), one row per (rate, strategy, request)."""
    parts = []
    for rr in result.rates:
        q = rr.requests
        n = len(q)
        for name, run in rr.runs.items():
            t = rr.times[name]
            parts.append({
                "rate_rps": np.full(n, rr.rate, dtype=np.float64), "strategy": np.full(n, name, dtype=object),
                "request": np.arange(n), "arrival_s": q.arrival_s, "prompt_tokens": q.prompt, "output_tokens": q.output,
                "gpu": run.rank, "admitted_s": run.admitted, "first_token_s": run.first, "finish_s": run.finish,
                "ttft_ms": t.ttft * 1e3, "tpot_ms": t.tpot * 1e3, "e2e_ms": t.e2e * 1e3,
                "met_slo": t.met(result.config.slo)})
    return concat_columns(parts)


def iterations_columns(result: ServeResult) -> dict[str, np.ndarray]:
    """A table (column name -> values), one row per (rate, strategy, iteration)."""
    parts = []
    for rr in result.rates:
        for name, run in rr.runs.items():
            n = len(run.iterations)
            d = {"rate_rps": np.full(n, rr.rate, dtype=np.float64), "strategy": np.full(n, name, dtype=object),
                 "iteration": np.arange(n)}
            for j, col in enumerate(ITERATION_COLUMNS):
                x = run.iterations[:, j]
                d[col] = x if col.endswith("_s") else x.astype(np.int64)
            parts.append(d)
    return concat_columns(parts)


def write_outputs(result: ServeResult, out_dir: str | os.PathLike, plots: bool = True,
                  drawer: Warm | None = None) -> list[Path]:
    """Write the output folder (every file atomically); returns the paths written. The plots are drawn
    by ``drawer`` (a process that imported matplotlib while this one simulated) while this one writes
    the tables, or here without one."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        from sim.serving.plots import write_plots
        drawer = drawer if drawer is not None else Warm(fork=False)
        drawer.submit(write_plots, result, out)
    # without sim_seconds (this machine's wall time, in --json only): the file is the same on every rerun
    rows = [{k: v for k, v in r.items() if k != "sim_seconds"} for r in result.rows()]
    written = [write_csv_atomic(out / "summary.csv", rows_to_columns(rows)),
               write_csv_atomic(out / "requests.csv", requests_columns(result), exact=REQUEST_TIMES),
               write_parquet_atomic(out / "iterations.parquet", iterations_columns(result)),
               *write_config_and_summary(out, "serve", result.config, format_summary(result),
                                         result.config.simulate.trace,
                                         requests_csv=result.config.workload.requests_csv)]
    if plots:
        written += drawer.result()
    return written


def _verdict_dict(v) -> dict | None:
    """A serving verdict as data: its samples are requests (``requests``, not the simulator's ``steps``)."""
    if v is None:
        return None
    d = v.to_dict()
    d["requests"] = d.pop("steps")
    d.pop("distinct_steps", None)           # counted for simulated steps only
    return d


def json_summary(result: ServeResult, out: Path) -> dict:
    """What ``--json`` prints."""
    rows = result.rows()
    return {"output": str(out), "slo": {"ttft_ms": result.config.slo.ttft_ms, "tpot_ms": result.config.slo.tpot_ms},
            "rates": [{"rate_rps": rr.rate, "verdict": _verdict_dict(rr.verdict),
                       "verdict_metric": "slo_attainment" if rr.on_goodput else "mean_e2e_latency",
                       "strategies": [r for r in rows if r["rate_rps"] == rr.rate]} for rr in result.rates],
            "sustainable_rate_rps": sustainable_rates(result), "notes": result.notes}
