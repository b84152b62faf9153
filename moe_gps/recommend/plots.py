"""Figures of the recommendation report (matplotlib, Agg). Each function returns PNG bytes.

* decision maps (winner per cell, speed-up vs none written in it, your point boxed);
* hypothetical token-to-expert vs best distribution-only on bandwidth x skew;
* speed-up against predictor accuracy per overhead;
* sensitivity lines along bandwidth and skew;
* per-layer time breakdown of every candidate at your point.
"""

from __future__ import annotations

import io
import math

import numpy as np

from moe_gps.recommend.analysis import NEAR_TIE, PHASES, DecisionMap, PredictorStudy

FAMILY_CMAPS = {"none": None, "static": "Oranges", "distribution": "Blues", "token": "Greens",
                "token (hypothetical)": "Purples", "oracle": None}
PHASE_COLORS = {"predictor": "#9467bd", "attention": "#1f77b4", "copy": "#d62728", "dispatch": "#ff7f0e",
                "correction": "#e377c2", "ffn": "#2ca02c", "combine": "#bcbd22"}
DPI = 110


def pyplot():
    """matplotlib.pyplot on the Agg backend, with the report's font sizes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10})
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def family_of(label: str) -> str:
    if label == "none":
        return "none"
    if label.startswith("token:synthetic"):
        return "token (hypothetical)"
    head = label.split(":", 1)[0].split(" ", 1)[0]
    return {"eplb": "static", "static": "static", "dist": "distribution", "token": "token",
            "oracle": "oracle"}.get(head, head)


def colors_for(labels: list[str]) -> dict[str, tuple]:
    """A stable colour per candidate: grey for none, black for the oracle, a shade of the
    family's colour map for the others (orange static, blue distribution, green token,
    purple hypothetical)."""
    import matplotlib

    out: dict[str, tuple] = {}
    fams: dict[str, list[str]] = {}
    for lab in sorted(set(labels)):
        fams.setdefault(family_of(lab), []).append(lab)
    for fam, labs in fams.items():
        cmap = FAMILY_CMAPS.get(fam)
        for i, lab in enumerate(labs):
            if fam == "none":
                out[lab] = (0.72, 0.72, 0.72, 1.0)
            elif fam == "oracle" or cmap is None:
                out[lab] = (0.15, 0.15, 0.15, 1.0)
            else:
                shade = 0.75 if len(labs) == 1 else 0.45 + 0.45 * i / (len(labs) - 1)
                out[lab] = matplotlib.colormaps[cmap](shade)
    return out


def _text_color(rgba) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"


def _map_axes(ax, m: DecisionMap, colors: dict[str, tuple], title: str) -> set[str]:
    from matplotlib.patches import Rectangle

    nr, nc = len(m.rows), len(m.cols)
    used = set()
    for i in range(nr):
        for j in range(nc):
            lab = m.winner[i][j]
            c = colors.get(lab, (1, 1, 1, 1)) if lab else (1, 1, 1, 1)
            ax.add_patch(Rectangle((j, i), 1, 1, facecolor=c, edgecolor="white", linewidth=1.5))
            if lab and m.margin[i, j] < NEAR_TIE:
                # the runner-up is within 1%: a near tie, hatched
                ax.add_patch(Rectangle((j, i), 1, 1, fill=False, hatch="///", edgecolor=(1, 1, 1, 0.4),
                                       linewidth=0))
            if lab:
                used.add(lab)
                s = m.speedup[i, j]
                txt = f"{short_label(lab)}\n{s:.2f}x" if s == s else short_label(lab)
                ax.text(j + 0.5, i + 0.5, txt, ha="center", va="center", fontsize=7.8, color=_text_color(c),
                        linespacing=1.25)
            else:
                ax.text(j + 0.5, i + 0.5, "n/a", ha="center", va="center", fontsize=8, color="grey")
    if m.user_cell is not None:
        ui, uj = m.user_cell
        ax.add_patch(Rectangle((uj, ui), 1, 1, fill=False, edgecolor="red", linewidth=2.8))
    ax.set_xlim(0, nc)
    ax.set_ylim(0, nr)
    ax.set_xticks(np.arange(nc) + 0.5)
    ax.set_xticklabels(m.col_labels)
    ax.set_yticks(np.arange(nr) + 0.5)
    ax.set_yticklabels(m.row_labels)
    ax.set_xlabel(m.col_name)
    ax.set_ylabel(m.row_name)
    ax.set_title(title)
    ax.tick_params(length=0)
    return used


def short_label(label: str) -> str:
    """The text written in a map cell: the strategy without its kind prefix for predictors
    whose family the colour already tells (``dist:profile +1/GPU`` -> ``dist:profile +1``)."""
    return label.replace("/GPU", "").replace("token:synthetic", "synthetic")


def _legend(ax, used: set[str], colors: dict[str, tuple]) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=colors[lab], edgecolor="grey", label=lab) for lab in sorted(used)]
    handles.append(Patch(facecolor=(0.6, 0.6, 0.6), hatch="///", edgecolor="white",
                         label=f"runner-up within {100 * (NEAR_TIE - 1):.0f}%"))
    handles.append(Line2D([], [], color="red", linewidth=2.5, label="your cluster"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9,
              title="fastest strategy", title_fontsize=9, alignment="left")


def decision_map_png(m: DecisionMap, colors: dict[str, tuple], title: str) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(12, 0.7 * len(m.rows) + 1.6))
    used = _map_axes(ax, m, colors, title)
    _legend(ax, used, colors)
    return _png(fig)


def two_maps_png(a: DecisionMap, b: DecisionMap, colors: dict[str, tuple], ta: str, tb: str) -> bytes:
    """Two decision maps, one above the other, one legend."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(12, 0.7 * (len(a.rows) + len(b.rows)) + 3.4),
                             gridspec_kw={"height_ratios": [len(a.rows), len(b.rows)], "hspace": 0.45})
    used = _map_axes(axes[0], a, colors, ta) | _map_axes(axes[1], b, colors, tb)
    _legend(axes[0], used, colors)
    return _png(fig)


def token_vs_dist_png(m: DecisionMap, hypo_label: str) -> bytes | None:
    """Ratio best distribution-only time / hypothetical token-to-expert time per cell, coloured
    on a log scale centred at 1 (purple: token-to-expert faster, orange: slower)."""
    v = m.hypo_vs_dist
    if np.all(np.isnan(v)):
        return None
    plt = pyplot()
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(12, 0.7 * len(m.rows) + 1.6))
    lv = np.log2(v)
    span = max(float(np.nanmax(np.abs(lv))), 0.05)
    im = ax.imshow(lv, cmap="PuOr", vmin=-span, vmax=span, origin="lower", aspect="auto",
                   extent=(0, len(m.cols), 0, len(m.rows)))
    for i in range(len(m.rows)):
        for j in range(len(m.cols)):
            if v[i, j] == v[i, j]:
                ax.text(j + 0.5, i + 0.5, f"{v[i, j]:.3f}", ha="center", va="center", fontsize=8.5,
                        color="white" if abs(lv[i, j]) > 0.6 * span else "black")
    ui, uj = m.user_cell
    ax.add_patch(Rectangle((uj, ui), 1, 1, fill=False, edgecolor="red", linewidth=2.8))
    ax.set_xticks(np.arange(len(m.cols)) + 0.5)
    ax.set_xticklabels(m.col_labels)
    ax.set_yticks(np.arange(len(m.rows)) + 0.5)
    ax.set_yticklabels(m.row_labels)
    ax.set_xlabel(m.col_name)
    ax.set_ylabel(m.row_name)
    ax.set_title(f"Token-to-expert ({hypo_label}) vs best distribution-only prediction")
    cb = fig.colorbar(im, ax=ax, pad=0.02)
    ticks, labels = ratio_ticks(span)
    cb.set_ticks(ticks)
    cb.set_ticklabels(labels)
    cb.set_label("distribution-only time / token-to-expert time\n(> 1, purple: token-to-expert faster)")
    return _png(fig)


def ratio_ticks(span: float) -> tuple[list[float], list[str]]:
    """Colour-bar ticks of a log2 scale from -span to span: (positions in log2, the ratios written at them), at
    least three, 1 among them: powers of 2 on a wide scale, evenly spaced round ratios on a narrow one."""
    from matplotlib.ticker import MaxNLocator

    wide = [t for t in (-6, -4, -3, -2, -1, -0.5, 0, 0.5, 1, 2, 3, 4, 6) if abs(t) <= span]
    if len(wide) >= 3:
        return wide, [f"{2.0 ** t:.3g}" for t in wide]
    lo, hi = 2.0 ** -span, 2.0 ** span
    ratios = [x for x in MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi) if lo <= x <= hi]
    if not any(abs(x - 1) < 1e-12 for x in ratios):
        ratios = sorted(ratios + [1.0])
    gap = min(b - a for a, b in zip(ratios, ratios[1:]))
    digits = max(0, -int(math.floor(math.log10(gap) + 1e-9)))
    return [math.log2(x) for x in ratios], [f"{x:.{digits}f}" for x in ratios]


def predictor_png(studies: list[PredictorStudy], slots_per_gpu: int | None = None) -> bytes:
    """Speed-up of the synthetic token predictor against its accuracy, a line per overhead, at each study's
    point (``slots_per_gpu``: the redundant slots per GPU it ran with, for the title)."""
    plt = pyplot()
    n = len(studies)
    fig, axes = plt.subplots(1, n, figsize=(6.8 * n, 4.6), squeeze=False)
    for ax, st in zip(axes[0], studies):
        order = np.argsort(st.accuracies)
        acc = np.asarray(st.accuracies)[order]
        cmap = pyplot().get_cmap("viridis")
        same = _same_rows(st.speedup)
        for i, c in enumerate(st.overheads):
            col = cmap(i / max(1, len(st.overheads) - 1) * 0.9)
            if same[i] != i:
                continue                  # drawn with the first overhead of the same speed-ups
            group = [st.overheads[k] for k in range(len(st.overheads)) if same[k] == i]
            label = (f"overhead {c / 1e6:g} MFLOP/token" if len(group) == 1 else
                     "overhead " + ", ".join(f"{g / 1e6:g}" for g in group) + " MFLOP/token (the same)")
            ax.plot(acc, st.speedup[i, order], marker="o", color=col, label=label)
            k = st.knee[i]
            if k is not None and st.accuracy_effect(i) == "knee":        # a knee inside the grid, as the text
                y = st.speedup[i, st.accuracies.index(k)]
                ax.plot([k], [y], marker="*", markersize=13, color=col, markeredgecolor="black")
        ax.axhline(1.0, color="grey", linewidth=1, label="none (no duplication)")
        if st.reference is not None:
            ax.axhline(st.reference[1], color="red", linestyle="--", linewidth=1.3,
                       label=f"best deployable: {st.reference[0]}")
        if st.best_distribution is not None and (st.reference is None or st.best_distribution[0] != st.reference[0]):
            ax.axhline(st.best_distribution[1], color="tab:blue", linestyle=":", linewidth=1.3,
                       label=f"best distribution-only: {st.best_distribution[0]}")
        ax.set_xlabel("token predictor accuracy (top-k recall)")
        ax.set_ylabel("speed-up vs no duplication (x)")
        budget = f", +{slots_per_gpu}/GPU" if slots_per_gpu is not None else ""
        ax.set_title(f"Synthetic token-to-expert predictor{budget}\nat {st.label} tokens/step")
        ax.margins(y=0.08)                            # the reference lines off the frame
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.text(0.5, -0.02, "★ = the accuracy beyond which better accuracy gains < 1% (knee)", ha="center",
             fontsize=9, color="dimgrey")
    return _png(fig)


def _same_rows(v: np.ndarray) -> list[int]:
    """Per row of ``v``, the first row with the very same values (itself where none before it is)."""
    out = []
    for i in range(len(v)):
        out.append(next(k for k in range(i + 1) if np.array_equal(v[k], v[i], equal_nan=True)))
    return out


def sensitivity_png(df, plan, labels: list[str], colors: dict[str, tuple], rec: str) -> bytes:
    """Speed-up vs none of each map candidate along bandwidth (your skew) and along skew (your bandwidth)."""
    from moe_gps.recommend.analysis import at_point
    from moe_gps.recommend.plan import Point

    plt = pyplot()
    u = plan.user
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"wspace": 0.25})
    sk = plan.skew_order()
    xs_skew = [plan.skews[k].achieved for k in sk]
    for lab in labels:
        fam = family_of(lab)
        style = dict(color=colors[lab], linestyle="--" if fam == "token (hypothetical)" else "-",
                     linewidth=2.6 if lab == rec else 1.4, marker="o", markersize=4)
        ys = []
        for b in plan.bandwidths:
            sub = at_point(df, plan, Point(u.num_gpus, b, u.workload, u.skew))
            v = sub[sub["candidate"] == lab]["speedup_vs_none"]
            ys.append(float(v.iloc[0]) if len(v) else math.nan)
        axes[0].plot(plan.bandwidths, ys, label=lab, **style)
        ys = []
        for k in sk:
            sub = at_point(df, plan, Point(u.num_gpus, u.bandwidth_gb_s, u.workload, k))
            v = sub[sub["candidate"] == lab]["speedup_vs_none"]
            ys.append(float(v.iloc[0]) if len(v) else math.nan)
        axes[1].plot(xs_skew, ys, label=lab, **style)
    axes[0].set_xscale("log")
    axes[0].set_xticks(plan.bandwidths)
    axes[0].set_xticklabels([f"{b:g}" for b in plan.bandwidths])
    from matplotlib.ticker import NullFormatter
    axes[0].xaxis.set_minor_formatter(NullFormatter())                # only the swept bandwidths labelled
    axes[0].axvline(u.bandwidth_gb_s, color="red", linewidth=1.2)
    axes[0].set_xlabel(f"{plan.fabric_label([u.num_gpus])} bandwidth (GB/s per GPU per direction, log scale)")
    axes[0].set_title(f"Along bandwidth (skew {plan.skews[u.skew].achieved:.2f}, your workload)")
    axes[1].axvline(plan.skews[u.skew].achieved, color="red", linewidth=1.2)
    axes[1].set_xlabel("expert skew (max / mean tokens per expert)")
    axes[1].set_title(f"Along skew ({u.bandwidth_gb_s:g} GB/s, your workload)")
    for ax in axes:
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_ylabel("speed-up vs no duplication (x)")
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=4, frameon=False, fontsize=8.5, bbox_to_anchor=(0.5, -0.12))
    return _png(fig)


def headline_png(ranking: list[dict], extra: list[dict], colors_by_family: bool = True) -> bytes:
    """Stacked per-layer breakdown (µs) of the candidates at your point: the ranking fastest on top, then
    ``extra`` (the bounds and what-ifs not in it)."""
    plt = pyplot()
    rows = ranking + [r for r in extra if r is not None and r["candidate"] not in {x["candidate"] for x in ranking}]
    names = [r["candidate"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.34 * len(rows) + 1.8))
    left = np.zeros(len(rows))
    for p in PHASES:
        v = np.array([float(r.get(f"layer_{p}_us") or 0.0) for r in rows])
        if not v.any():
            continue
        ax.barh(names, v, left=left, color=PHASE_COLORS[p], label=p)
        left += v
    for i, r in enumerate(rows):
        ax.text(left[i], i, f"  {r['latency_mean_ms']:.2f} ms/step", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, left.max() * 1.22)
    ax.set_xlabel("mean MoE-layer time (µs), by phase")
    ax.set_title("Every strategy at your cluster (deployable ones fastest on top, then the bounds); "
                 "text: mean step latency")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, title="phase",
              title_fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)
