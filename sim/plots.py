"""Plots of a simulation (matplotlib, Agg backend, PNG written atomically).

* ``breakdown.png``: mean MoE-layer time per strategy, stacked by phase;
* ``skew_per_layer.png``: max/mean tokens per GPU per layer for each strategy, with the
  experts' own skew;
* ``latency_cdf.png``: the distribution of step latency per strategy;
* ``timeline.png`` (with ``--timeline``): the simulated schedule of the chosen steps, one row
  per GPU and per GPU's incoming copies, one panel per strategy (the same slices as
  ``timeline.json``).

The figures are drawn from :class:`PlotData`, the few numbers per strategy they show, which is
small enough to send to a process that has imported matplotlib ahead of time
(:class:`moe_gps.workers.Warm`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_gps.atomic import atomic_path
from moe_gps.workers import fork_map, forking
from sim.run import PHASES, SimResult

COLORS = {"predictor": "#9467bd", "attention": "#1f77b4", "copy": "#d62728", "dispatch": "#ff7f0e",
          "correction": "#e377c2", "ffn": "#2ca02c", "combine": "#bcbd22", "sync": "#7f7f7f"}


LINESTYLES = {"none": "-", "static": "--", "distribution": "-", "token": ":", "oracle": "-."}


@dataclass(frozen=True)
class PlotData:
    """What the figures of one simulation show (K strategies, S steps, L layers).

    names, kinds:  [K] strategy names and kinds
    phase_means:   PHASES -> float [K] mean seconds of the phase per MoE layer
    gpu_skew:      float [K, L] max / mean tokens per GPU, mean over steps
    expert_skew:   float [L] max / mean tokens per expert (the trace's), mean over steps
    step_latency:  float [K, S] seconds of each step's MoE layers
    title:         model, cluster and tokens per step
    model, cluster, num_gpus: for the timeline
    timeline:      SimResult.timeline
    """

    names: list[str]
    kinds: list[str]
    phase_means: dict[str, np.ndarray]
    gpu_skew: np.ndarray
    expert_skew: np.ndarray
    step_latency: np.ndarray
    title: str
    model: str
    cluster: str
    num_gpus: int
    timeline: dict[str, list[tuple]]


def plot_data(result: SimResult) -> PlotData:
    """The :class:`PlotData` of ``result``."""
    cfg, rs = result.config, result.strategies
    return PlotData(
        names=[r.name for r in rs], kinds=[r.config.kind for r in rs],
        phase_means={p: np.array([r.phases[p].mean() for r in rs]) for p in PHASES},
        gpu_skew=np.array([np.nanmean(r.gpu_skew, axis=0) for r in rs]).reshape(len(rs), -1),
        expert_skew=np.nanmean(result.expert_skew, axis=0),
        step_latency=np.array([r.step_latency for r in rs]).reshape(len(rs), -1),
        title=f"{cfg.model.name}, {cfg.cluster.name}, {result.tokens.mean():.0f} tokens/step",
        model=cfg.model.name, cluster=cfg.cluster.name, num_gpus=cfg.cluster.num_gpus, timeline=result.timeline)


def line_style(kind: str, color) -> dict:
    """The line of a strategy of ``kind``: no duplication thick, black and under the others, so that it
    shows around the strategies that take the same time as it (drawn over it, thin)."""
    if kind == "none":
        return {"color": "black", "linestyle": "-", "linewidth": 3.0, "alpha": 0.55, "zorder": 1.5}
    return {"color": color, "linestyle": LINESTYLES.get(kind, "-"), "linewidth": 1.3, "zorder": 2}


def strategy_colors(names: list[str]) -> list[tuple]:
    """A colour of tab20 per strategy, chosen by its name, so that a strategy keeps its colour from run to run
    and in simulate's and serve's figures alike; two strategies of one run that would share one take the next
    free colour (the same again only past 18 strategies)."""
    import zlib

    import matplotlib

    cmap, used, out = matplotlib.colormaps["tab20"], set(), []
    palette = [i for i in range(20) if i not in (14, 15)]          # not its greys: no duplication is grey
    for name in names:
        i = zlib.crc32(name.encode()) % len(palette)
        for step in range(len(palette)):
            if (i + step) % len(palette) not in used:
                i = (i + step) % len(palette)
                break
        used.add(i)
        out.append(cmap(palette[i]))
    return out


def _styles(data: PlotData) -> list[dict]:
    """A colour per strategy (:func:`strategy_colors`) and a line style per kind (:func:`line_style`)."""
    return [line_style(kind, c) for kind, c in zip(data.kinds, strategy_colors(data.names))]


def cdf_step(ax, values, **style) -> None:
    """The empirical CDF of ``values`` [n] (NaN left out) on ``ax``: a step from 0 at the smallest value up to 1
    (one value draws a single step); the y-axis 0..1."""
    x = np.sort(np.asarray(values, dtype=np.float64)[~np.isnan(values)])
    if len(x):
        ax.step(np.r_[x[0], x], np.r_[0.0, np.arange(1, len(x) + 1) / len(x)], where="post", **style)
    ax.set_ylim(0, 1.02)


def save_png(fig, path: Path) -> Path:
    """``fig`` as a PNG at ``path``, written atomically (120 dpi, cropped to what it draws)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


#: the figures :func:`write_plots` may draw (timeline.png only for a run with a timeline)
FIGURE_FILES = ("breakdown.png", "skew_per_layer.png", "latency_cdf.png", "timeline.png")


def write_plots(data: PlotData, out: Path, jobs: int = 1) -> list[Path]:
    """The PNG figures of ``data`` in ``out``, drawn in up to ``jobs`` forked processes at once."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (imported once, before the workers fork)

    figures = [(draw, out / name) for draw, name in zip((_breakdown, _skew, _latency_cdf, _timeline), FIGURE_FILES)
               if draw is not _timeline or data.timeline]
    with forking(jobs) as workers:
        return [path for _, path in sorted(fork_map(_draw, range(len(figures)), workers, (data, figures)))]


def _draw(i: int, context: tuple) -> tuple[int, Path]:
    data, figures = context
    draw, path = figures[i]
    return i, draw(data, path)


def _breakdown(data: PlotData, path: Path) -> Path:
    """Mean MoE-layer time per strategy, stacked by phase."""
    import matplotlib.pyplot as plt

    names = data.names
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.6))
    left = np.zeros(len(names))
    for p in PHASES:
        v = data.phase_means[p] * 1e6
        if not (v >= 0.05).any():          # under the tables' 0.1 µs everywhere: no bar to see
            continue
        ax.barh(names, v, left=left, color=COLORS[p], label=p)
        left += v
    ax.set_xlim(left=0)
    ax.invert_yaxis()
    ax.set_xlabel("mean MoE-layer time (µs)")
    ax.set_title(f"Time breakdown per MoE layer — {data.title}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8, ncol=7, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    save_png(fig, path)
    plt.close(fig)
    return path


def _skew(data: PlotData, path: Path) -> Path:
    """Max / mean tokens per GPU per layer for each strategy, with the experts' own skew."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    layers = np.arange(len(data.expert_skew))
    ax.plot(layers, data.expert_skew, "k--", label="experts (trace)")
    for name, skew, st in zip(data.names, data.gpu_skew, _styles(data)):
        ax.plot(layers, skew, marker=".", label=name, **st)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("skew: max / mean tokens (mean over steps)")
    ax.set_title(f"Load skew per layer across GPUs — {data.title}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    save_png(fig, path)
    plt.close(fig)
    return path


def _latency_cdf(data: PlotData, path: Path) -> Path:
    """The distribution of step latency per strategy."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, latency, st in zip(data.names, data.step_latency, _styles(data)):
        cdf_step(ax, latency * 1e3, label=name, **st)
    ax.set_xlabel("step latency (ms, simulated MoE layers)")
    ax.set_ylabel("fraction of steps")
    ax.set_title(f"Step latency CDF — {data.title}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    save_png(fig, path)
    plt.close(fig)
    return path


#: colours of the timeline's slices
SLICE_COLORS = {"predictor + attention": COLORS["attention"], "dispatch": COLORS["dispatch"],
                "correction": COLORS["correction"], "expert FFN": COLORS["ffn"], "combine": COLORS["combine"],
                "applying the placement": COLORS["copy"]}


def _timeline(data: PlotData, path: Path) -> Path:
    """Gantt chart of ``data.timeline``: per strategy, rows GPU g and GPU g's copies in."""
    import matplotlib.pyplot as plt

    G = data.num_gpus
    names = list(data.timeline)
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 0.5 * 2 * G * len(names) + 1.2), squeeze=False,
                             sharex=True, layout="constrained")    # one time axis: panels compare by eye
    seen = set()
    for ax, name in zip(axes[:, 0], names):
        rows = data.timeline[name]
        t0 = min(r[3] for r in rows)
        for track, g, what, start, end, _layer, _step in rows:
            y = 2 * g + (1 if track == "link" else 0)
            kind = "weight copies" if track == "link" else what
            color = COLORS["copy"] if track == "link" else SLICE_COLORS.get(what, "#999999")
            # a copy's edge keeps back-to-back transfers apart; a phase has none (it would hide a short one)
            ax.barh(y, (end - start) * 1e3, left=(start - t0) * 1e3, color=color, edgecolor="white",
                    linewidth=0.3 if track == "link" else 0, label=None if kind in seen else kind)
            seen.add(kind)
        ax.set_yticks(range(2 * G), [f"GPU {g}" if k == 0 else f"GPU {g} copies in" for g in range(G) for k in (0, 1)],
                      fontsize=7)
        ax.set_ylim(2 * G - 0.5, -0.5)          # GPU 0 on top, no empty row below the last
        ax.set_title(name, fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("simulated time from the first chosen step (ms)")
    # constrained layout keeps room for the title above the first panel and the legend below the last
    fig.legend(loc="outside lower center", ncol=7, fontsize=8, frameon=False)
    fig.suptitle(f"Simulated schedule, {data.model} on {data.cluster}", fontsize=10)
    out = save_png(fig, path)
    plt.close(fig)
    return out
