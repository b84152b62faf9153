"""Results as tables (terminal, CSV), per-step and per-layer frames, and the output folder.

Definitions of every column: docs/simulator.md, "Outputs".
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from moe_gps.atomic import write_csv_atomic, write_parquet_atomic, write_text_atomic
from moe_gps.config.loader import dump_yaml
from moe_gps.provenance import provenance_comment
from moe_gps.tables import concat_columns, rows_to_columns
from moe_gps.workers import Warm
from sim.run import PHASES, SimResult
from sim.verdict import bound_lines


def _pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if len(x) else math.nan


def summary_rows(result: SimResult) -> list[dict[str, Any]]:
    """One dict per strategy (units in the keys)."""
    base = next((r for r in result.strategies if r.config.kind == "none"), None)
    base_mean = float(base.step_latency.mean()) if base is not None else math.nan
    rows = []
    for r in result.strategies:
        lat = r.step_latency
        row: dict[str, Any] = {
            "strategy": r.name, "kind": r.config.kind, "predictor": r.info.predictor,
            "planner": r.config.resolved_planner(), "redundant_slots": r.redundant_slots,
            "latency_mean_ms": float(lat.mean() * 1e3), "latency_p50_ms": _pct(lat, 50) * 1e3,
            "latency_p99_ms": _pct(lat, 99) * 1e3,
            "tokens_per_s": float(result.tokens.sum() / lat.sum()) if lat.sum() > 0 else math.nan,
            "speedup_vs_none": base_mean / float(lat.mean()) if lat.mean() > 0 else math.nan,
        }
        for p in PHASES:
            row[f"layer_{p}_us"] = float(r.phases[p].mean() * 1e6)
        row["layer_total_us"] = float(r.layer_time.mean() * 1e6)
        row.update({
            "expert_skew": float(np.nanmean(result.expert_skew)),
            "gpu_skew_before": float(np.nanmean(result.base_gpu_skew)),
            "gpu_skew_after": float(np.nanmean(r.gpu_skew)),
            "copied_gb": float(r.copy_bytes.sum() / 1e9),
            "extra_memory_gb_per_gpu": float(r.extra_memory / 1e9),
            "replans": r.replans,
            "accuracy": r.info.accuracy,
        })
        rows.append(row)
    return rows


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def assumptions_text(cfg) -> str:
    """``realistic assumptions (copies async, every replica reads its weights, predictors beside attention)``:
    the bundle a run named and the three choices it makes, as the run has them (a field given on its own
    wins over the bundle)."""
    ffn = "every replica reads its weights" if cfg.ffn_weight_reads else "expert FFN in proportion to its tokens"
    pred = "predictors beside attention" if cfg.predictor_overlap else "predictors before attention"
    return f"{cfg.assumptions} assumptions (copies {cfg.copy_policy}, {ffn}, {pred})"


def format_summary(result: SimResult) -> str:
    """The terminal report: a latency table and a MoE-layer breakdown table."""
    rows = summary_rows(result)
    cfg = result.config
    tok = result.tokens
    size = (f"{tok.mean():.0f}" if np.ptp(tok) < 0.5 else
            f"{tok.min():.0f}/{np.median(tok):.0f}/{tok.max():.0f} (min/median/max)")
    head = (f"{cfg.model.name} on {cfg.cluster.name} ({cfg.cluster.num_gpus} GPUs), {cfg.workload.phase}, "
            f"{len(result.steps)} simulated step{'s' if len(result.steps) != 1 else ''} of {size} tokens "
            f"(steps {result.steps[0]}..{result.steps[-1]}; {result.steps[0]} earlier steps fit the predictors), "
            f"{assumptions_text(cfg)}, seed {cfg.seed}")
    t1 = _table(
        ["strategy", "mean ms", "p50 ms", "p99 ms", "tokens/s", "speed-up", "GPU skew", "re-plans", "copied GB",
         "extra GB/GPU", "accuracy"],
        [[r["strategy"], _fmt(r["latency_mean_ms"], ".3f"), _fmt(r["latency_p50_ms"], ".3f"),
          _fmt(r["latency_p99_ms"], ".3f"), _fmt(r["tokens_per_s"], ",.0f"), _fmt(r["speedup_vs_none"], ".3f"),
          f"{r['gpu_skew_before']:.2f}->{r['gpu_skew_after']:.2f}", str(r["replans"]), _fmt(r["copied_gb"], ".1f"),
          _fmt(r["extra_memory_gb_per_gpu"], ".2f"), _fmt(r["accuracy"], ".3f")] for r in rows])
    t2 = _table(
        ["MoE layer, us", *PHASES, "total"],
        [[r["strategy"], *(_fmt(r[f"layer_{p}_us"], ".1f") for p in PHASES), _fmt(r["layer_total_us"], ".1f")]
         for r in rows])
    skew = f"expert skew (max/mean tokens per expert) of the simulated steps: {rows[0]['expert_skew']:.2f}"
    notes = "".join(f"\nnote: {n}" for n in result.notes)
    verdict = f"\n\n{result.verdict.line()}" if result.verdict is not None else ""
    verdict += "".join(f"\n{line}" for line in bound_lines(result))
    warn = "".join(f"\n  {w}" for w in result.inferred) + "".join(f"\nwarning: {w}" for w in result.warnings)
    return f"{head}{warn}\n\n{t1}\n\n{t2}\n\n{skew}{notes}{verdict}"


def per_step_columns(result: SimResult) -> dict[str, np.ndarray]:
    """A table (column name -> values), one row per (strategy, step)."""
    parts = []
    for r in result.strategies:
        lat = r.step_latency
        d = {"strategy": np.full(len(lat), r.name, dtype=object), "step": result.steps, "tokens": result.tokens,
             "latency_s": lat,
             "tokens_per_s": np.divide(result.tokens, lat, out=np.full_like(lat, np.nan), where=lat > 0)}
        for p in PHASES:
            d[f"{p}_s"] = r.phases[p].sum(axis=1)
        d.update(expert_skew=np.nanmean(result.expert_skew, axis=1),
                 gpu_skew_before=np.nanmean(result.base_gpu_skew, axis=1),
                 gpu_skew=np.nanmean(r.gpu_skew, axis=1), copy_bytes=r.copy_bytes.sum(axis=1))
        parts.append(d)
    return concat_columns(parts)


def per_layer_columns(result: SimResult):
    """Tables (column name -> values), one per strategy, of one row per (step, layer) (a generator: a long
    run's rows are written a strategy at a time)."""
    S, L = result.expert_skew.shape
    step = np.repeat(result.steps, L).astype(np.int32)
    layer = np.tile(np.arange(L), S).astype(np.int16)
    for r in result.strategies:
        d = {"strategy": np.full(S * L, r.name, dtype=object), "step": step, "layer": layer,
             "time_s": r.layer_time.ravel()}
        for p in PHASES:
            d[f"{p}_s"] = r.phases[p].ravel()
        d.update(expert_skew=result.expert_skew.ravel(), gpu_skew_before=result.base_gpu_skew.ravel(),
                 gpu_skew=r.gpu_skew.ravel(), copy_bytes=r.copy_bytes.ravel())
        yield d


def write_config_and_summary(out: Path, command: str, config, summary: str, trace: str | None,
                             **inputs: str | None) -> list[Path]:
    """``config.yaml`` (the exact config, with how to rerun it, and the code and trace it ran on:
    :func:`moe_gps.provenance.provenance_comment`) and ``summary.txt`` (the terminal report)."""
    write_text_atomic(out / "config.yaml", f"# moe-gps {command}: the exact config of this run; rerun with "
                                           f"`moe-gps {command} TRACE --config config.yaml`\n"
                      + provenance_comment(trace, **inputs) + dump_yaml(config))
    write_text_atomic(out / "summary.txt", summary + "\n")
    return [out / "config.yaml", out / "summary.txt"]


def write_outputs(result: SimResult, out_dir: str | os.PathLike, plots: bool = True, jobs: int = 1,
                  drawer: Warm | None = None, summary: str | None = None) -> list[Path]:
    """Write the output folder (every file atomically); returns the paths written. The plots are drawn
    in up to ``jobs`` processes at once, by ``drawer`` (a process that imported matplotlib while this
    one simulated) while this one writes the tables, or here without one. ``summary``: the terminal
    report for summary.txt, where the caller has it (default :func:`format_summary`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        from sim.plots import plot_data, write_plots
        drawer = drawer if drawer is not None else Warm(fork=False)
        drawer.submit(write_plots, plot_data(result), out, jobs)
    written = [write_csv_atomic(out / "summary.csv", rows_to_columns(summary_rows(result))),
               write_csv_atomic(out / "steps.csv", per_step_columns(result)),
               write_parquet_atomic(out / "layers.parquet", per_layer_columns(result)),
               *write_config_and_summary(out, "simulate", result.config,
                                         format_summary(result) if summary is None else summary, result.config.trace)]
    if plots:
        written += drawer.result()
    return written
