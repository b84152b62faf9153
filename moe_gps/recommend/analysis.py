"""From run records to the recommendation: headline, decision maps, sensitivity, predictor study.

Every number is a function of the run records (``runs.csv``) and the cost model's
constants; the formulas are in docs/recommend.md ("How the report is computed").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moe_gps.recommend.plan import TRACE_SKEW, Point, SweepPlan, workload_label
from sim.run import PHASES
from sim.verdict import THIN_STEPS, and_list

POINT_COLS = ["num_gpus", "bandwidth_gb_s", "workload", "skew_variant"]


def frame(records: list[dict[str, Any]]):
    """pandas DataFrame of the records, with ``speedup_vs_none`` = latency of none at the same
    point / latency of the run (NaN where none did not run)."""
    import pandas as pd

    df = pd.DataFrame(records)
    if df.empty:
        return df
    ok = df[(df["status"] == "ok") & (df["candidate"] == "none")]
    base = ok.set_index(POINT_COLS)["latency_mean_ms"]
    idx = pd.MultiIndex.from_frame(df[POINT_COLS])
    none_ms = base.reindex(idx).to_numpy()
    df["none_latency_ms"] = none_ms
    df["speedup_vs_none"] = np.where(df["status"] == "ok", none_ms / df["latency_mean_ms"].astype(float), np.nan)
    return df


def fastest_first(runs):
    """The runs by mean step latency; on equal latency no duplication first (a change must be faster to
    be chosen), then by name."""
    order = runs.assign(_change=runs["candidate"] != "none").sort_values(["latency_mean_ms", "_change", "candidate"])
    return order.drop(columns="_change")


def at_point(df, plan: SweepPlan, p: Point):
    w = workload_label(plan.workloads[p.workload], plan.trace_tokens)
    m = ((df["num_gpus"] == p.num_gpus) & (df["bandwidth_gb_s"] == p.bandwidth_gb_s) & (df["workload"] == w)
         & (df["skew_variant"] == p.skew) & (df["status"] == "ok"))
    return df[m]


# ---------------------------------------------------------------------------- comparisons

#: a runner-up less than this factor slower than the fastest is a near tie (the maps hatch such cells)
NEAR_TIE = 1.01


@dataclass
class Comparison:
    """A (faster) against B, from their per-step latencies on the same steps.

    speedup:   mean latency of B / mean latency of A; ci_low, ci_high: its 95% paired-bootstrap
               interval over the steps (sim.verdict.speedup_interval)
    steps_won: steps where A was faster, out of ``steps``
    diff_ms:   mean of (B - A) per step, ms
    phases_us: per MoE layer, phase -> (A µs, B µs)
    """

    a: str
    b: str
    speedup: float
    ci_low: float
    ci_high: float
    steps_won: int
    steps: int
    diff_ms: float
    phases_us: dict[str, tuple[float, float]]
    gpu_skew: tuple[float, float]
    copied_gb: tuple[float, float]

    @property
    def same_every_step(self) -> bool:
        """A and B took the same time on every step (no step won, no mean difference)."""
        return self.diff_ms == 0 and self.steps_won == 0

    def reasons(self, top: int = 3) -> list[str]:
        """The phases that differ most, as 'ffn 412.0 -> 350.1 µs per layer'."""
        diffs = sorted(self.phases_us.items(), key=lambda kv: -abs(kv[1][1] - kv[1][0]))
        out = []
        for name, (a, b) in diffs[:top]:
            if abs(a - b) < 0.05:
                continue
            out.append(f"{name} {b:.1f} µs ({self.b}) vs {a:.1f} µs ({self.a}) per MoE layer")
        return out

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def compare(a: dict, b: dict, seed: int = 0) -> Comparison:
    from sim.verdict import speedup_interval

    la, lb = np.asarray(a["step_latency_ms"], float), np.asarray(b["step_latency_ms"], float)
    d = lb - la
    point, lo, hi = speedup_interval(lb, la, seed)
    phases = {p: (float(a[f"layer_{p}_us"]), float(b[f"layer_{p}_us"])) for p in PHASES}
    return Comparison(a["candidate"], b["candidate"], point, lo, hi, int((la < lb).sum()), len(d),
                      float(d.mean()), phases,
                      (float(a["gpu_skew_after"]), float(b["gpu_skew_after"])),
                      (float(a["copied_gb"]), float(b["copied_gb"])))


# ---------------------------------------------------------------------------- headline

@dataclass
class Headline:
    """The recommendation for the user's point (docs/recommend.md, "Headline").

    winner / runner_up / none / oracle: records (dicts) of runs at the user's point
    """

    winner: dict
    runner_up: dict | None
    none: dict | None
    oracle: dict | None
    vs_none: Comparison | None
    vs_runner_up: Comparison | None
    ranking: list[dict]
    regime: dict[str, float]
    reasons: list[str] = field(default_factory=list)
    hypothetical: list[str] = field(default_factory=list)
    infeasible: list[str] = field(default_factory=list)
    #: the fastest deployable candidate when it is not faster than none beyond its interval (then
    #: the recommendation is none), with that comparison
    not_separated: tuple[dict, Comparison] | None = None
    #: the fastest candidate when the same strategy with fewer redundant slots (the winner) is not slower
    #: beyond the interval, with that comparison (more slots, more memory, for no separable gain)
    more_slots: tuple[dict, Comparison] | None = None
    #: fewer than sim.verdict.THIN_STEPS simulated steps at the user's point
    thin: bool = False

    @property
    def duplicates(self) -> bool:
        return self.winner["candidate"] != "none"


def regime(plan: SweepPlan) -> dict[str, float]:
    """Roofline facts of the user's point: tokens per expert against the compute-bound threshold.

    tokens_per_expert = tokens_per_step * top_k / experts;  threshold = Π w / (2 β)
    (an expert's GEMM is compute bound above it); weight_read_us = m h f w / β per replica.
    """
    from sim.cost import Hardware

    from moe_gps.config.schema import ASSUMPTION_BUNDLES

    hw = Hardware.from_config(plan.cluster, plan.model)
    m = plan.model
    tokens = plan.workloads[0].tokens_per_step or plan.trace_tokens
    return {"weight_reads": bool(ASSUMPTION_BUNDLES[plan.sweep.assumptions]["ffn_weight_reads"]),
            "tokens_per_step": float(tokens),
            "tokens_per_expert": float(tokens) * m.top_k / m.num_experts,
            "compute_bound_above": hw.flops * m.weight_bytes / (2 * hw.hbm),
            "weight_read_us": m.expert_bytes / hw.hbm * 1e6,
            "expert_gb": m.expert_bytes / 1e9,
            "copy_us_per_expert": m.expert_bytes / (plan.user.bandwidth_gb_s * 1e9) * 1e6}


def headline(df, plan: SweepPlan) -> Headline:
    """Winner = the fastest deployable candidate at the user's point (mean step latency)."""
    from moe_gps.errors import UserError

    here = at_point(df, plan, plan.user)
    labels = {c.label for c in plan.headline_candidates}
    cands = here[here["candidate"].isin(labels) & here["deployable"].astype(bool)]
    infeasible = []
    allhere = df[(df["num_gpus"] == plan.user.num_gpus) & (df["bandwidth_gb_s"] == plan.user.bandwidth_gb_s)
                 & (df["skew_variant"] == TRACE_SKEW) & (df["status"] != "ok")
                 & (df["workload"] == workload_label(plan.workloads[0], plan.trace_tokens))]
    for _, r in allhere.iterrows():
        if r["candidate"] in labels:
            infeasible.append(f"{r['candidate']}: {r['reason']}")
    if cands.empty:
        why = "; ".join(infeasible[:2]) or "no run succeeded"
        raise UserError(f"no strategy could be simulated at your point ({why})")
    rows = fastest_first(cands).to_dict("records")
    seed = plan.sweep.seed
    win = rows[0]
    none = next((r for r in rows if r["candidate"] == "none"), None)
    not_separated = None
    if none is not None and win is not none:
        c = compare(win, none, seed)
        if c.ci_low <= 1.0:
            # a change is recommended only when it is faster beyond its interval
            not_separated, win = (win, c), none
    more_slots = None
    if win is not none:
        # the fewest redundant slots of the winning strategy that the fastest budget does not beat beyond the interval
        for r in sorted((r for r in rows if r["strategy"] == win["strategy"]
                         and r["redundant_slots"] < win["redundant_slots"]), key=lambda r: r["redundant_slots"]):
            c = compare(win, r, seed)
            if c.ci_low <= 1.0 and (none is None or compare(r, none, seed).ci_low > 1.0):
                more_slots, win = (win, c), r
                break
    runner = next((r for r in rows if r is not win and r["strategy"] != win["strategy"]), None)
    orc = here[here["family"] == "oracle"].sort_values("latency_mean_ms").to_dict("records")
    h = Headline(win, runner, none, orc[0] if orc else None,
                 compare(win, none, seed) if none is not None and none is not win else None,
                 compare(win, runner, seed) if runner is not None else None, rows, regime(plan),
                 infeasible=infeasible, not_separated=not_separated, more_slots=more_slots,
                 thin=len(win["step_latency_ms"]) < THIN_STEPS)
    h.reasons = _reasons(h, plan)
    return h


def _reasons(h: Headline, plan: SweepPlan) -> list[str]:
    g = h.regime
    w = h.winner
    out = []
    bound = "below" if g["tokens_per_expert"] < g["compute_bound_above"] else "above"
    kind = "weight-read (memory) bound" if bound == "below" else "compute bound"
    if g["weight_reads"]:
        out.append(f"At {g['tokens_per_step']:.0f} tokens per step each expert gets {g['tokens_per_expert']:.0f} "
                   f"tokens on average, {bound} the {g['compute_bound_above']:.0f} at which its GEMMs turn compute "
                   f"bound: the expert FFN is {kind}. Every replica reads its {g['expert_gb']:.3f} GB of weights once "
                   f"per layer ({g['weight_read_us']:.0f} µs), however few tokens it gets.")
    else:
        out.append("Under the paper's assumptions (--assumptions paper) an expert's FFN takes time in proportion to "
                   "its tokens, with no weight read per replica, and copies are free: a replica costs only the tokens "
                   "it takes, so levelling the tokens per GPU is what counts.")
    best_dup = next((r for r in h.ranking if r["candidate"] != "none"), None)
    if h.not_separated is not None:
        fast, c = h.not_separated
        out.append(f"The fastest strategy, {fast['candidate']}, runs at {c.speedup:.3f}x of no duplication (95% CI "
                   f"{c.ci_low:.3f}-{c.ci_high:.3f} over {c.steps} simulated steps): not faster beyond that "
                   f"interval, so the recommendation stays no duplication.")
    elif not h.duplicates:
        if best_dup is not None:
            c = compare(w, best_dup, plan.sweep.seed)
            what = ("balances the GPUs" if best_dup["gpu_skew_after"] < w["gpu_skew_after"] - 0.005
                    else "leaves its redundant slots without tokens")
            why = c.reasons()
            out.append(f"The best duplicating strategy, {best_dup['candidate']}, {what} (GPU skew "
                       f"{w['gpu_skew_after']:.2f} -> {best_dup['gpu_skew_after']:.2f}) and "
                       + ("takes the same time on every step (no duplication is kept on a tie)" if c.same_every_step else
                          f"is {c.speedup:.3f}x slower")
                       + (": " + "; ".join(why) if why else
                          ": no phase of its MoE layers differs by 0.05 µs or more")
                       + ".")
    else:
        if h.vs_none is not None:
            c = h.vs_none
            out.append(f"{w['candidate']} against none, the phases that change most: " + "; ".join(c.reasons())
                       + f" (GPU skew of the expert FFN {c.gpu_skew[1]:.2f} -> {c.gpu_skew[0]:.2f}).")
        if w["copied_gb"] > 0:
            out.append(f"It copies {w['copied_gb']:.1f} GB of expert weights over the {w['sim_steps']} simulated steps "
                       f"({g['copy_us_per_expert']:.0f} µs per expert at {plan.user.bandwidth_gb_s:g} GB/s); the "
                       f"copies add {w['layer_copy_us']:.1f} µs per layer on the critical path.")
    if h.more_slots is not None:
        big, c = h.more_slots
        out.append(f"{big['candidate']} is {c.speedup:.4f}x of {w['candidate']} (95% CI {c.ci_low:.4f}-{c.ci_high:.4f} "
                   f"over {c.steps} simulated steps): not faster beyond that interval, so the recommendation takes the "
                   f"fewer slots ({big['extra_memory_gb_per_gpu'] - w['extra_memory_gb_per_gpu']:.2f} GB less per "
                   f"GPU).")
    if h.vs_runner_up is not None and (h.duplicates or h.runner_up["candidate"] != best_dup["candidate"]) \
            and not (h.runner_up["candidate"] == "none" and h.vs_none is not None):
        c = h.vs_runner_up
        why = c.reasons()
        out.append(f"Against the runner-up {c.b}: " + ("; ".join(why) if why else
                   ("the same time on every step, " if c.same_every_step else "")
                   + "no phase of their MoE layers differs by 0.05 µs or more") + ".")
    return out


# ---------------------------------------------------------------------------- maps

@dataclass
class DecisionMap:
    """Winner per cell of a 2-D grid (rows x cols), among the deployable map candidates.

    winner:   [rows][cols] candidate label or None (nothing ran)
    speedup:  [rows][cols] winner's speed-up vs none (NaN if none did not run)
    margin:   [rows][cols] runner-up latency / winner latency
    hypo_vs_dist: [rows][cols] best distribution-only latency / hypothetical token predictor latency
    """

    name: str
    row_name: str
    col_name: str
    rows: list[Any]
    cols: list[Any]
    row_labels: list[str]
    col_labels: list[str]
    winner: list[list[str | None]]
    speedup: np.ndarray
    margin: np.ndarray
    hypo_vs_dist: np.ndarray
    user_cell: tuple[int, int] | None


def _cell_stats(sub) -> tuple[str | None, float, float, float]:
    dep = fastest_first(sub[sub["deployable"].astype(bool)])
    if dep.empty:
        return None, math.nan, math.nan, math.nan
    best = dep.iloc[0]
    margin = float(dep.iloc[1]["latency_mean_ms"] / best["latency_mean_ms"]) if len(dep) > 1 else math.nan
    dist = sub[sub["family"] == "distribution"]["latency_mean_ms"]
    hyp = sub[sub["family"] == "token (hypothetical)"]["latency_mean_ms"]
    ratio = float(dist.min() / hyp.min()) if len(dist) and len(hyp) else math.nan
    return str(best["candidate"]), float(best["speedup_vs_none"]), margin, ratio


def decision_map(df, plan: SweepPlan, name: str, labels: set[str]) -> DecisionMap:
    u = plan.user
    wl = [workload_label(w, plan.trace_tokens) for w in plan.workloads]
    sk = plan.skew_order()
    if name == "map-bw-skew":
        rows, row_name = sk, "expert skew (max / mean tokens per expert)"
        row_labels = [f"{plan.skews[k].achieved:.2f}" + (" (trace)" if k == TRACE_SKEW else "") for k in sk]
        point = lambda r, c: Point(u.num_gpus, c, u.workload, r)  # noqa: E731
        user_rc = (sk.index(u.skew), plan.bandwidths.index(u.bandwidth_gb_s))
    elif name == "map-gpus-bw":
        rows, row_name = plan.gpus, "GPUs"
        row_labels = [str(g) for g in plan.gpus]
        point = lambda r, c: Point(r, c, u.workload, TRACE_SKEW)  # noqa: E731
        user_rc = (plan.gpus.index(u.num_gpus), plan.bandwidths.index(u.bandwidth_gb_s))
    else:
        order = plan.workload_order()
        rows, row_name = order, "workload (tokens per step)"
        row_labels = [wl[i] for i in order]
        point = lambda r, c: Point(u.num_gpus, c, r, TRACE_SKEW)  # noqa: E731
        user_rc = (order.index(u.workload), plan.bandwidths.index(u.bandwidth_gb_s))
    cols = plan.bandwidths
    col_labels = [f"{b:g}" for b in cols]
    win = [[None] * len(cols) for _ in rows]
    sp, mg, hv = (np.full((len(rows), len(cols)), np.nan) for _ in range(3))
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            sub = at_point(df, plan, point(r, c))
            sub = sub[sub["candidate"].isin(labels)]
            win[i][j], sp[i, j], mg[i, j], hv[i, j] = _cell_stats(sub)
    fabric = plan.fabric_label(plan.gpus if name == "map-gpus-bw" else [u.num_gpus])
    return DecisionMap(name, row_name, f"{fabric} bandwidth (GB/s per GPU per direction)", list(rows), cols,
                       row_labels, col_labels, win, sp, mg, hv, user_rc)


# ---------------------------------------------------------------------------- sensitivity

@dataclass
class Sensitivity:
    """Along one axis through the user's point: the winner at each value, and the range of
    values around the user's where the recommendation stays the winner among the map set."""

    axis: str
    unit: str
    values: list[str]
    winners: list[str | None]
    user_index: int
    holds_from: str
    holds_to: str
    #: (value, new winner, its speed-up over ours there); winner None where no candidate could be simulated
    change_below: tuple[str, str | None, float] | None
    change_above: tuple[str, str | None, float] | None
    #: value -> a short clause on what its runs are (e.g. a workload whose steps are scaled, not regrouped)
    caveats: dict[str, str] = field(default_factory=dict)

    def sentence(self, rec: str) -> str:
        if len(self.values) == 1:
            v = self.values[0]
            cav = f" ({self.caveats[v]})" if v in self.caveats else ""
            return f"{self.axis}: only {' '.join(x for x in (v, self.unit) if x)} swept{cav}."

        def what(ch: tuple[str, str | None, float]) -> str:
            """What happens at the value of a change: who comes first, by how much."""
            return (" nothing could be simulated (runs.csv says why)" if ch[1] is None else
                    f" {ch[1]} ties it (the same time) and comes first on a tie" if ch[2] == 1.0 else
                    f" {ch[1]} comes first by {100 * (ch[2] - 1):.2f}% (a near tie)" if ch[2] < NEAR_TIE
                    else f" {ch[1]} wins ({ch[2]:.3f}x faster than {rec})")

        ch = self.change_below
        caveat_said = set()                    # values whose caveat is said
        if ch is not None and ch[0] == self.values[self.user_index] and self.winners[self.user_index] != rec:
            # recommended at the user's point without the best mean there (not faster beyond the interval)
            cav = f"; {self.caveats[ch[0]]}" if ch[0] in self.caveats else ""
            s = (f"{self.axis}: at {ch[0]} {self.unit}".rstrip() + f" (yours{cav}) {rec} is recommended though"
                 + what(ch))
            caveat_said.add(ch[0])
        else:
            rng = (f"from {self.holds_from} to {self.holds_to} {self.unit}".strip()
                   if self.holds_from != self.holds_to else f"only at {self.holds_from} {self.unit}".strip())
            s = f"{self.axis}: {rec} stays the fastest {rng}"
            parts = []
            for ch in (self.change_below, self.change_above):
                if ch is not None:
                    cav = f" ({self.caveats[ch[0]]})" if ch[0] in self.caveats else ""    # said where it is named
                    parts.append(f"at {ch[0]} {self.unit}".rstrip() + cav + what(ch))
            s += "; " + "; ".join(parts) if parts else " (the whole swept range)"
        # the values of the range whose runs carry a caveat: one clause for them all
        lo, hi = self.values.index(self.holds_from), self.values.index(self.holds_to)
        named = [v for v in self.values[lo:hi + 1] if v in self.caveats and v not in caveat_said]
        if named:
            s += f"; at {and_list(named)}, {self.caveats[named[0]]}"
        # the values past the first change on each side, by their winner (a workload axis mixes prefill sizes
        # and decode: the recommendation can be the fastest again past a change)
        said = set(range(lo, hi + 1)) | {self.values.index(ch[0]) for ch in (self.change_below, self.change_above)
                                         if ch is not None}
        further: dict[str | None, list[str]] = {}
        for i, (v, w) in enumerate(zip(self.values, self.winners)):
            if i not in said:
                further.setdefault(w, []).append(v)
        for w, vs in further.items():
            at = f"{and_list(vs)} {self.unit}".rstrip()
            cav = next((f" ({self.caveats[v]})" for v in vs if v in self.caveats), "")
            cav = " (likewise)" if cav and cav in s else cav            # a caveat already said in full
            s += f"; nothing could be simulated at {at}{cav}" if w is None else f"; {w} is the fastest at {at}{cav}"
        return s + "."


def sensitivity(m: DecisionMap, df, plan: SweepPlan, rec: str, along: str, unit: str, axis: str,
                labels: set[str], caveats: dict[str, str] | None = None) -> Sensitivity:
    """Walk the user's row (along='cols') or column (along='rows') of a decision map; ``caveats``: value
    label -> a clause the sentence adds where it names that value."""
    i0, j0 = m.user_cell
    if along == "cols":
        winners = m.winner[i0]
        values = m.col_labels
        k0 = j0
        pts = [(m.rows[i0], c) for c in m.cols]
    else:
        winners = [row[j0] for row in m.winner]
        values = m.row_labels
        k0 = i0
        pts = [(r, m.cols[j0]) for r in m.rows]
    lo = k0
    while lo - 1 >= 0 and winners[lo - 1] == rec:
        lo -= 1
    hi = k0
    while hi + 1 < len(winners) and winners[hi + 1] == rec:
        hi += 1

    def change(k: int) -> tuple[str, str | None, float] | None:
        if k < 0 or k >= len(winners):
            return None
        if winners[k] is None:                # every candidate there infeasible: the range ends, and says so
            return values[k], None, math.nan
        sub = _sub_at(df, plan, m.name, *pts[k])
        sub = sub[sub["candidate"].isin(labels)]
        ours = sub[sub["candidate"] == rec]["latency_mean_ms"]
        theirs = sub[sub["candidate"] == winners[k]]["latency_mean_ms"]
        ratio = float(ours.iloc[0] / theirs.iloc[0]) if len(ours) and len(theirs) else math.nan
        return values[k], winners[k], ratio

    cav = {v: c for v, c in (caveats or {}).items() if v in values}
    if winners[k0] != rec:
        return Sensitivity(axis, unit, values, winners, k0, values[k0], values[k0], change(k0), None, cav)
    return Sensitivity(axis, unit, values, winners, k0, values[lo], values[hi], change(lo - 1), change(hi + 1), cav)


def _sub_at(df, plan: SweepPlan, name: str, r, c):
    u = plan.user
    if name == "map-bw-skew":
        p = Point(u.num_gpus, c, u.workload, r)
    elif name == "map-gpus-bw":
        p = Point(r, c, u.workload, TRACE_SKEW)
    else:
        p = Point(u.num_gpus, c, r, TRACE_SKEW)
    return at_point(df, plan, p)


# ---------------------------------------------------------------------------- predictor study

@dataclass
class PredictorStudy:
    """Synthetic token predictor at one point: speed-up vs none per (overhead, accuracy).

    speedup: [overheads, accuracies];  reference: best deployable candidate there (label, speed-up)
    knee: per overhead, the lowest accuracy within 1% of that overhead's best speed-up
    break_even: per overhead, the lowest accuracy that beats the reference (None if none does)
    predictor_us: [overheads, accuracies] the predictor's time per MoE layer on the critical path (runs.csv's
                  layer_predictor_us; 0 where it is hidden beside the attention)
    attention_us: the attention's time per MoE layer there (layer_attention_us)
    """

    point: Point
    label: str
    accuracies: list[float]
    overheads: list[float]
    speedup: np.ndarray
    reference: tuple[str, float] | None
    best_distribution: tuple[str, float] | None
    knee: list[float | None]
    break_even: list[float | None]
    predictor_us: np.ndarray | None = None
    attention_us: float = math.nan

    def clear_win(self, i: int) -> float | None:
        """At overhead ``i``, the lowest accuracy faster than the reference by NEAR_TIE or more (None: none is)."""
        if self.reference is None:
            return None
        return next((a for a in sorted(self.accuracies) if self.at(i, a) >= self.reference[1] * NEAR_TIE), None)

    def at(self, i: int, accuracy: float) -> float:
        """The speed-up vs none at overhead ``i`` and ``accuracy``."""
        return float(self.speedup[i, self.accuracies.index(accuracy)])

    def hidden(self) -> list[int]:
        """The overheads (indices) whose predictor takes no time on the critical path at any accuracy (0: free,
        or hidden beside the attention)."""
        if self.predictor_us is None:
            return []
        return [i for i in range(len(self.overheads)) if not np.any(np.nan_to_num(self.predictor_us[i]) > 0)
                and not np.all(np.isnan(self.predictor_us[i]))]

    def accuracy_effect(self, i: int) -> str:
        """What better accuracy does at overhead ``i``: "flat" (every accuracy within 1% of the best),
        "rising" (the best at the highest accuracy swept) or "knee" (it stops paying at ``knee[i]``)."""
        row = self.speedup[i]
        if np.nanmax(row) - np.nanmin(row) <= 0.01 * np.nanmax(row):
            return "flat"
        return "rising" if self.knee[i] is not None and self.knee[i] >= max(self.accuracies) else "knee"


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return float(np.mean(xs)) if xs else math.nan


def predictor_study(df, plan: SweepPlan, p: Point, labels: set[str]) -> PredictorStudy:
    here = at_point(df, plan, p)
    acc, ovh = list(plan.sweep.predictor_accuracy), list(plan.sweep.predictor_overhead_flops)
    syn = here[here["family"] == "token (hypothetical)"]
    sp = np.full((len(ovh), len(acc)), np.nan)
    pred_us = np.full((len(ovh), len(acc)), np.nan)
    attn = []
    for _, r in syn.iterrows():
        if r["synthetic_accuracy"] in acc and r["synthetic_overhead_flops"] in ovh:
            ij = ovh.index(r["synthetic_overhead_flops"]), acc.index(r["synthetic_accuracy"])
            sp[ij] = r["speedup_vs_none"]
            pred_us[ij] = float(r.get("layer_predictor_us", math.nan))
            attn.append(float(r.get("layer_attention_us", math.nan)))
    dep = fastest_first(here[here["deployable"].astype(bool) & here["candidate"].isin(labels)])
    ref = (str(dep.iloc[0]["candidate"]), float(dep.iloc[0]["speedup_vs_none"])) if len(dep) else None
    dist = dep[dep["family"] == "distribution"]
    bdist = (str(dist.iloc[0]["candidate"]), float(dist.iloc[0]["speedup_vs_none"])) if len(dist) else None
    order = np.argsort(acc)
    knee, be = [], []
    for i in range(len(ovh)):
        row = sp[i, order]
        a_sorted = [acc[k] for k in order]
        if np.all(np.isnan(row)):
            knee.append(None)
            be.append(None)
            continue
        best = np.nanmax(row)
        knee.append(next(a for a, v in zip(a_sorted, row) if v == v and v >= best / 1.01))
        be.append(next((a for a, v in zip(a_sorted, row) if ref is not None and v == v and v > ref[1]), None))
    return PredictorStudy(p, workload_label(plan.workloads[p.workload], plan.trace_tokens), acc, ovh, sp, ref,
                          bdist, knee, be, pred_us, _mean(attn))
