"""Plots of a simulation (matplotlib, Agg backend, PNG written atomically).

* ``breakdown.png``: mean MoE-layer time per strategy, stacked by phase;
* ``skew_per_layer.png``: max/mean tokens per GPU per layer for each strategy, with the
  experts' own skew;
* ``latency_cdf.png``: the distribution of step latency per strategy;
* ``timeline.png`` (with ``--timeline``): the simulated schedule of the chosen steps, one row
  per GPU and per GPU's incoming copies, one panel per strategy (the same slices as
  ``timeline.json``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe_gps.atomic import atomic_path
from moe_gps.workers import fork_map, forking
from sim.run import PHASES, SimResult

COLORS = {"predictor": "#9467bd", "attention": "#1f77b4", "copy": "#d62728", "dispatch": "#ff7f0e",
          "correction": "#e377c2", "ffn": "#2ca02c", "combine": "#bcbd22", "sync": "#7f7f7f"}


LINESTYLES = {"none": "-", "static": "--", "distribution": "-", "token": ":", "oracle": "-."}


def _styles(result: SimResult) -> list[dict]:
    """A distinct colour per strategy (tab20) and a line style per kind."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return [{"color": "black" if r.config.kind == "none" else cmap(i % 20),
             "linestyle": LINESTYLES.get(r.config.kind, "-")} for i, r in enumerate(result.strategies)]


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def write_plots(result: SimResult, out: Path, jobs: int = 1) -> list[Path]:
    """The PNG figures of ``result`` in ``out``, drawn in up to ``jobs`` forked processes at once."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (imported once, before the workers fork)

    figures = [(_breakdown, out / "breakdown.png"), (_skew, out / "skew_per_layer.png"),
               (_latency_cdf, out / "latency_cdf.png")]
    if result.timeline:
        figures.append((_timeline, out / "timeline.png"))
    with forking(jobs) as workers:
        return [path for _, path in sorted(fork_map(_draw, range(len(figures)), workers, (result, figures)))]


def _draw(i: int, context: tuple) -> tuple[int, Path]:
    result, figures = context
    draw, path = figures[i]
    return i, draw(result, path)


def _title(result: SimResult) -> str:
    cfg = result.config
    return f"{cfg.model.name}, {cfg.cluster.name}, {result.tokens.mean():.0f} tokens/step"


def _breakdown(result: SimResult, path: Path) -> Path:
    """Mean MoE-layer time per strategy, stacked by phase."""
    import matplotlib.pyplot as plt

    names = [r.name for r in result.strategies]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.6))
    left = np.zeros(len(names))
    for p in PHASES:
        v = np.array([r.phases[p].mean() * 1e6 for r in result.strategies])
        if not v.any():
            continue
        ax.barh(names, v, left=left, color=COLORS[p], label=p)
        left += v
    ax.invert_yaxis()
    ax.set_xlabel("mean MoE-layer time (µs)")
    ax.set_title(f"Time breakdown per MoE layer — {_title(result)}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8, ncol=7, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return path


def _skew(result: SimResult, path: Path) -> Path:
    """Max / mean tokens per GPU per layer for each strategy, with the experts' own skew."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    layers = np.arange(result.expert_skew.shape[1])
    ax.plot(layers, np.nanmean(result.expert_skew, axis=0), "k--", label="experts (trace)")
    for r, st in zip(result.strategies, _styles(result)):
        ax.plot(layers, np.nanmean(r.gpu_skew, axis=0), marker=".", label=r.name, **st)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("skew: max / mean tokens (mean over steps)")
    ax.set_title(f"Load skew per layer across GPUs — {_title(result)}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return path


def _latency_cdf(result: SimResult, path: Path) -> Path:
    """The distribution of step latency per strategy."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r, st in zip(result.strategies, _styles(result)):
        lat = np.sort(r.step_latency * 1e3)
        ax.step(lat, np.arange(1, len(lat) + 1) / len(lat), where="post", label=r.name, **st)
    ax.set_xlabel("step latency (ms, simulated MoE layers)")
    ax.set_ylabel("fraction of steps")
    ax.set_title(f"Step latency CDF — {_title(result)}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return path


#: colours of the timeline's slices
SLICE_COLORS = {"predictor + attention": COLORS["attention"], "dispatch": COLORS["dispatch"],
                "correction": COLORS["correction"], "expert FFN": COLORS["ffn"], "combine": COLORS["combine"],
                "applying the placement": COLORS["copy"]}


def _timeline(result: SimResult, path: Path) -> Path:
    """Gantt chart of ``result.timeline``: per strategy, rows GPU g and GPU g's copies in."""
    import matplotlib.pyplot as plt

    G = result.config.cluster.num_gpus
    names = list(result.timeline)
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 0.5 * 2 * G * len(names) + 1.2), squeeze=False)
    seen = set()
    for ax, name in zip(axes[:, 0], names):
        rows = result.timeline[name]
        t0 = min(r[3] for r in rows)
        for track, g, what, start, end, _layer, _step in rows:
            y = 2 * g + (1 if track == "link" else 0)
            kind = "weight copies" if track == "link" else what
            color = COLORS["copy"] if track == "link" else SLICE_COLORS.get(what, "#999999")
            ax.barh(y, (end - start) * 1e3, left=(start - t0) * 1e3, color=color, edgecolor="white",
                    linewidth=0.3, label=None if kind in seen else kind)
            seen.add(kind)
        ax.set_yticks(range(2 * G), [f"GPU {g}" if k == 0 else f"GPU {g} copies" for g in range(G) for k in (0, 1)],
                      fontsize=7)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("simulated time from the first chosen step (ms)")
    fig.legend(loc="lower center", ncol=7, fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"Simulated schedule, {result.config.model.name} on {result.config.cluster.name}", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    out = _save(fig, path)
    plt.close(fig)
    return out
