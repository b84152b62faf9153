"""Outputs of ``moe-gps validate``: terminal tables, CSV files and the plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe_gps.fidelity.compare import MIN_PHASE_SHARE, RunComparison
from moe_gps.fidelity.measured import PHASES
from moe_gps.tables import format_table


def _pct(x: float) -> str:
    return "-" if not np.isfinite(x) else f"{x * 100:+.1f}%"


def share_text(share: float) -> str:
    """A phase's share of the step in percent with one decimal, rounded so that it reads on the same side
    of :data:`MIN_PHASE_SHARE` as the share itself (0.04996 is 4.9%, not 5.0%, since it does not count)."""
    if not np.isfinite(share):
        return "-"
    tenths = round(share * 1000)
    if share < MIN_PHASE_SHARE <= tenths / 1000:
        tenths = round(MIN_PHASE_SHARE * 1000) - 1
    return f"{tenths / 10:.1f}%"


def phase_table(comparisons: list[RunComparison]) -> str:
    """Per (ranks, strategy, phase): share of the step, predicted and measured mean with the measurement's
    95% interval, error, and how far the prediction lies outside the interval (fraction of measured)."""
    rows = []
    for c in comparisons:
        for p in PHASES:
            m = c.mean("measured", p)
            if not np.isfinite(m):
                continue
            share = c.share(p)
            rows.append({"nproc": c.nproc, "strategy": c.strategy, "phase": p,
                         "share": share_text(share),
                         "pred": c.mean("predicted", p) * 1e3, "meas": m * 1e3, "ci": c.ci95(p) * 1e3,
                         "err": _pct(c.error(p)),
                         "off": "-" if not np.isfinite(c.beyond(p)) else f"{c.beyond(p) * 100:.1f}%",
                         "counts": "yes" if np.isfinite(share) and share >= MIN_PHASE_SHARE else "no"})
    cols = [("nproc", "ranks", ""), ("strategy", "strategy", ""), ("phase", "phase", ""),
            ("share", "share of step", ""), ("pred", "predicted ms", ".2f"), ("meas", "measured ms", ".2f"),
            ("ci", "+/- 95%", ".2f"), ("err", "error", ""), ("off", "beyond 95% interval", ""),
            ("counts", f">= {MIN_PHASE_SHARE:.0%} of step", "")]
    return format_table(rows, cols, title="per phase, mean over steps (copy: re-plan steps only); beyond = "
                                          "max(0, |predicted - measured| - 95% half-width) / measured")


def format_report(comparisons: list[RunComparison], ranks: dict[int, dict], header: str = "") -> str:
    rows = []
    for c in comparisons:
        r = {"nproc": c.nproc, "strategy": c.strategy, "steps": len(c.steps),
             "pred": c.mean("predicted", "total") * 1e3, "meas": c.mean("measured", "total") * 1e3,
             "err": _pct(c.error("total")), "se": c.stderr * 1e3, "busy": c.interference}
        for p in PHASES:
            r[p] = (f"{c.mean('predicted', p) * 1e3:.2f}/{c.mean('measured', p) * 1e3:.2f} "
                    f"({_pct(c.error(p))})") if np.isfinite(c.mean("measured", p)) else "-"
        rows.append(r)
    cols = [("nproc", "ranks", ""), ("strategy", "strategy", ""), ("steps", "steps", ""),
            ("pred", "predicted ms", ".2f"), ("meas", "measured ms", ".2f"),
            ("se", "+/- (s.e.)", ".2f"), ("err", "error", ""), ("busy", "others' cores", ".2f")]
    cols += [(p, f"{p} ms pred/meas (err)", "") for p in PHASES]
    out = [header] if header else []
    title = "per-step MoE time, mean over steps (error = predicted / measured - 1)"
    out.append(format_table(rows, cols, title=title))
    out.append(phase_table(comparisons))
    for n, r in ranks.items():
        line = (f"ranking, {n} ranks (fastest first): measured {' < '.join(r['measured'])}; "
                f"predicted {' < '.join(r['predicted'])}: {'same order' if r['agrees'] else 'different order'}")
        if not r["agrees"]:
            line += ("; every pair the measurement separates (difference beyond its 95% interval) is in the same "
                     "order" if r["resolved_agrees"] else
                     "; misordered beyond the 95% interval: " + ", ".join(f"{a}/{b}" for a, b in r["misordered"]))
            pairs = len(r["measured"]) * (len(r["measured"]) - 1) // 2
            line += f" ({len(r['unresolved'])} of {pairs} pairs not separated)"
        out.append(line)
    worst = max((abs(c.error("total")) for c in comparisons if np.isfinite(c.error("total"))), default=float("nan"))
    out.append(f"largest |error| of the per-step MoE time: {worst * 100:.1f}%")
    for c in comparisons:
        out += [f"note ({c.nproc} ranks, {c.strategy}): {n}" for n in c.notes]
    return "\n".join(out)


def summary_rows(comparisons: list[RunComparison]) -> list[dict]:
    return [row for c in comparisons for row in c.rows()]


def step_rows(comparisons: list[RunComparison]) -> list[dict]:
    out = []
    for c in comparisons:
        for i, s in enumerate(c.steps):
            row = {"nproc": c.nproc, "strategy": c.strategy, "step": int(s)}
            for p in ("total",) + PHASES:
                row[f"predicted_{p}_ms"] = c.predicted[p][i] * 1e3
                row[f"measured_{p}_ms"] = c.measured[p][i] * 1e3
            out.append(row)
    return out


def plot(comparisons: list[RunComparison], path: Path) -> None:
    """Left: every step, predicted against measured MoE time, with the +/-10% band.
    Middle: mean phase times per step, predicted (left bar) and measured (right bar) per run.
    Right: every phase's error (predicted / measured - 1) per run, with the measurement's 95% interval
    (as a fraction of the measured mean) as the error bar, and the +/-10% band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moe_gps.atomic import atomic_path

    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(19, 5.4), gridspec_kw={"width_ratios": [1, 1.4, 1.4]})
    markers = {n: m for n, m in zip(sorted({c.nproc for c in comparisons}), "os^Dv")}
    names = sorted({c.strategy for c in comparisons}, key=[c.strategy for c in comparisons].index)
    colors = {s: plt.cm.tab10(i) for i, s in enumerate(names)}
    hi = 0.0
    for c in comparisons:
        m, p = c.measured["total"] * 1e3, c.predicted["total"] * 1e3
        hi = max(hi, m.max(initial=0), p.max(initial=0))
        ax.scatter(m, p, s=18, marker=markers[c.nproc], color=colors[c.strategy], alpha=0.6,
                   label=f"{c.nproc} ranks, {c.strategy} ({_pct(c.error('total'))})")
    x = np.array([0, hi * 1.05])
    ax.plot(x, x, color="k", lw=1)
    ax.fill_between(x, 0.9 * x, 1.1 * x, color="k", alpha=0.08, label="within 10%")
    ax.set_xlabel("measured MoE time per step (ms)")
    ax.set_ylabel("predicted MoE time per step (ms)")
    ax.set_title("every compared step (error of the means in the legend)")
    ax.legend(fontsize=7)
    phase_colors = {p: plt.cm.Set2(i) for i, p in enumerate(PHASES)}
    labels, pos = [], 0.0
    for c in comparisons:
        for j, which in enumerate(("predicted", "measured")):
            bottom = 0.0
            for p in PHASES:
                src = c.predicted if which == "predicted" else c.measured
                v = float(np.mean(src[p])) * 1e3        # the stack adds up to the mean step
                bx.bar(pos + j * 0.4, v, 0.38, bottom=bottom, color=phase_colors[p],
                       hatch="" if which == "predicted" else "//", edgecolor="white",
                       label=p if (c is comparisons[0] and j == 0) else None)
                bottom += v
        labels.append((pos + 0.2, f"{c.nproc}r\n{c.strategy}"))
        pos += 1.0
    bx.set_xticks([p for p, _ in labels], [t for _, t in labels], fontsize=7)
    bx.set_ylabel("mean per step (ms)")
    bx.set_title("phases: predicted (plain) | measured (hatched)")
    bx.legend(fontsize=7)
    width = 0.8 / len(PHASES)
    for j, p in enumerate(PHASES):
        xs, err, ci, share_ok = [], [], [], []
        for i, c in enumerate(comparisons):
            m = c.mean("measured", p)
            if not np.isfinite(m) or m == 0:
                continue
            xs.append(i - 0.4 + (j + 0.5) * width)
            err.append(c.error(p) * 100)
            ci.append(c.ci95(p) / abs(m) * 100 if np.isfinite(c.ci95(p)) else 0.0)
            share_ok.append(np.isfinite(c.share(p)) and c.share(p) >= MIN_PHASE_SHARE)
        if not xs:
            continue
        xs_a, err_a, ci_a, ok = np.array(xs), np.clip(err, -100, 100), np.array(ci), np.array(share_ok, bool)
        cx.bar(xs_a, err_a, width * 0.9, color=phase_colors[p], label=p,
               edgecolor=["k" if o else "none" for o in ok])
        cx.errorbar(xs_a, np.zeros_like(xs_a), yerr=np.minimum(ci_a, 100), fmt="none", ecolor="0.3", lw=0.8,
                    capsize=1.5)
    cx.axhspan(-10, 10, color="k", alpha=0.08)
    cx.axhline(0, color="k", lw=0.8)
    cx.set_xticks(range(len(comparisons)), [f"{c.nproc}r\n{c.strategy}" for c in comparisons], fontsize=7)
    cx.set_ylabel("phase error, % of measured (clipped at +/-100)")
    cx.set_title(f"phase errors; bars around 0: measured 95% interval; outlined: >= {MIN_PHASE_SHARE:.0%} of step")
    cx.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
