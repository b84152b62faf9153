"""Plots of a serving run (matplotlib, Agg backend, PNG written atomically).

* ``latency_cdf.png``: TTFT, TPOT and end-to-end latency distributions per strategy at the
  highest simulated rate, with the SLO lines;
* ``latency_throughput.png`` (two rates or more): p50 and p90 of TTFT and TPOT against the
  throughput each strategy reached, with the SLO lines, and goodput against the offered rate.
"""

from __future__ import annotations

from pathlib import Path

from sim.plots import cdf_step, line_style, save_png, strategy_colors
from sim.serving.run import ServeResult

#: the figures :func:`write_plots` draws
FIGURE_FILES = ("latency_cdf.png", "latency_throughput.png")


def _styles(result: ServeResult) -> dict[str, dict]:
    strategies = result.config.simulate.strategies
    return {s.name: line_style(s.kind, c) for s, c in zip(strategies, strategy_colors([s.name for s in strategies]))}


def _slo_line(ax, value_ms: float | None, label: str) -> None:
    if value_ms is not None:
        ax.axhline(value_ms, color="red", linewidth=1, linestyle=":", label=label)


def write_plots(result: ServeResult, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result.config
    slo = cfg.slo
    styles = _styles(result)
    title = f"{cfg.simulate.model.name}, {cfg.simulate.cluster.name}, workload {cfg.workload.name}"
    paths = []

    rr = max(result.rates, key=lambda r: r.rate)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, (key, label, limit) in zip(axes, (("ttft", "TTFT (ms)", slo.ttft_ms), ("tpot", "TPOT (ms)", slo.tpot_ms),
                                              ("e2e", "end-to-end latency (ms)", None))):
        for name, t in rr.times.items():
            cdf_step(ax, getattr(t, key) * 1e3, label=name, **styles[name])
        if limit is not None:
            ax.axvline(limit, color="red", linewidth=1, linestyle=":", label="SLO")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    for ax, limit in zip(axes, (slo.ttft_ms, slo.tpot_ms, None)):
        if ax is axes[0] or limit is not None:           # a panel with an SLO line names it in its legend
            ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Request latency at {rr.rate:g} requests/s — {title}")
    fig.tight_layout()
    paths.append(save_png(fig, out / FIGURE_FILES[0]))
    plt.close(fig)

    if len(result.rates) < 2:
        return paths
    rows = sorted(result.rows(), key=lambda r: r["rate_rps"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for name in styles:
        mine = [r for r in rows if r["strategy"] == name]
        thr = [r["throughput_rps"] for r in mine]
        for ax, key in zip(axes[:2], ("ttft", "tpot")):
            ax.plot(thr, [r[f"{key}_p90_ms"] for r in mine], marker="o", label=f"{name} p90", **styles[name])
            ax.plot(thr, [r[f"{key}_p50_ms"] for r in mine], marker=".", alpha=0.5, label=f"{name} p50",
                    color=styles[name]["color"], linestyle=":")
        axes[2].plot([r["rate_rps"] for r in mine], [r["goodput_rps"] for r in mine], marker="o", label=name,
                     **styles[name])
    _slo_line(axes[0], slo.ttft_ms, "SLO")
    _slo_line(axes[1], slo.tpot_ms, "SLO")
    for ax, label in zip(axes[:2], ("TTFT (ms)", "TPOT (ms)")):
        ax.set_xlabel("throughput (requests/s served)")
        ax.set_ylabel(label)
        lines = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
        if lines and max(lines) > 20 * min(lines):
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    rates = [rr.rate for rr in result.rates]
    axes[2].plot([0, max(rates)], [0, max(rates)], color="grey", linewidth=0.8, linestyle="--", label="offered")
    axes[2].set_xlabel("offered rate (requests/s)")
    axes[2].set_ylabel("goodput (requests/s within the SLO)" if slo.given else "goodput = throughput (no SLO)")
    axes[2].grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    axes[2].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Latency against throughput — {title}")
    fig.tight_layout()
    paths.append(save_png(fig, out / FIGURE_FILES[1]))
    plt.close(fig)
    return paths
