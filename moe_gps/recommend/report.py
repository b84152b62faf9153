"""The report folder of ``moe-gps recommend``: report.html, report.md, runs.csv, the exact sweep.

Every file is written atomically (temporary name, then rename). report.html is
self-contained: its plots are PNG embedded as base64, its style inline, no external asset.
Definitions of every number: docs/recommend.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from moe_gps.atomic import atomic_path, write_csv_atomic, write_text_atomic
from moe_gps.config.loader import dump_yaml
from moe_gps.jsonsafe import jsonable  # noqa: F401  (part of this module's interface)
from moe_gps.provenance import provenance_comment
from moe_gps.recommend import plots
from moe_gps.recommend.analysis import NEAR_TIE, at_point
from moe_gps.recommend.core import Recommendation
from moe_gps.recommend.plan import workload_label
from moe_gps.recommend.render import RANK_COLUMNS, dump_yaml_plain, render_html, render_markdown, too_big_here
from moe_gps.recommend.sweep import sweep_to_dict
from moe_gps.tables import format_table
from sim.run import PHASES
from sim.verdict import THIN_STEPS, and_list

CSV_COLUMNS = [
    "num_gpus", "fabric", "bandwidth_gb_s", "workload", "phase", "tokens_per_step", "seq_len", "skew_variant",
    "skew", "candidate", "strategy", "family", "deployable", "redundant_slots", "status", "latency_mean_ms",
    "latency_p50_ms", "latency_p99_ms", "tokens_per_s", "speedup_vs_none", "gpu_skew_before", "gpu_skew_after",
    "copied_gb", "extra_memory_gb_per_gpu", "accuracy", "synthetic_accuracy", "synthetic_overhead_flops",
    *(f"layer_{p}_us" for p in (*PHASES, "total")),
    "replans", "predictor", "planner", "sim_steps", "skew_gamma", "reason", "wall_s", "key",
]
# ---------------------------------------------------------------------------- content

def summary(r: Recommendation) -> dict[str, Any]:
    """The recommendation as plain data (what --json prints and recommendation.json holds)."""
    h, plan = r.headline, r.plan
    w = h.winner
    c = plan.cluster
    vs_run = h.vs_runner_up
    hyp = hypothetical_lines(r)
    return {
        "trace": r.trace_name, "model": plan.model.name, "assumptions": plan.sweep.assumptions,
        "cluster": {"name": c.name, "num_gpus": c.num_gpus, "fabric": plan.fabric,
                    "bandwidth_gb_s": plan.user.bandwidth_gb_s},
        "workload": workload_label(plan.workloads[0], plan.trace_tokens),
        "trace_skew": plan.skews["trace"].achieved,
        "recommendation": {
            "strategy": w["strategy"], "candidate": w["candidate"], "family": w["family"],
            "duplicate": h.duplicates, "predictor": w.get("predictor") or None,
            "planner": w.get("planner"), "redundant_slots": w.get("redundant_slots"),
            "latency_mean_ms": w["latency_mean_ms"], "tokens_per_s": w["tokens_per_s"],
            "speedup_vs_none": (h.none["latency_mean_ms"] / w["latency_mean_ms"]) if h.none else None,
            "speedup_ci_vs_none": [h.vs_none.ci_low, h.vs_none.ci_high] if h.vs_none else None,
            "fastest_not_separated": ({"candidate": h.not_separated[0]["candidate"],
                                       "speedup_vs_none": h.not_separated[1].speedup,
                                       "ci": [h.not_separated[1].ci_low, h.not_separated[1].ci_high]}
                                      if h.not_separated else None),
            "thin_evidence": h.thin,
            "runner_up": h.runner_up["candidate"] if h.runner_up else None,
            "speedup_vs_runner_up": vs_run.speedup if vs_run else None,
            "speedup_ci_vs_runner_up": [vs_run.ci_low, vs_run.ci_high] if vs_run else None,
            "steps_won_vs_runner_up": f"{vs_run.steps_won}/{vs_run.steps}" if vs_run else None,
            "near_tie_with_runner_up": near_tie(vs_run),
            "more_slots_not_separated": ({"candidate": h.more_slots[0]["candidate"],
                                          "speedup_over_recommendation": h.more_slots[1].speedup,
                                          "ci": [h.more_slots[1].ci_low, h.more_slots[1].ci_high]}
                                         if h.more_slots else None),
            "oracle_speedup_vs_none": (h.none["latency_mean_ms"] / h.oracle["latency_mean_ms"])
            if h.none and h.oracle else None,
            "oracle": h.oracle["candidate"] if h.oracle else None,
        },
        "reasons": h.reasons,
        "sensitivity": [s.sentence(w["candidate"]) for s in r.sensitivities],
        "hypothetical": hyp,
        "ranking": [{"candidate": x["candidate"], "latency_mean_ms": x["latency_mean_ms"],
                     "speedup_vs_none": x["speedup_vs_none"]} for x in h.ranking],
        "infeasible_at_your_point": h.infeasible,
        "runs": {"total": len(r.records), "simulated": r.simulated, "from_cache": r.from_cache,
                 "infeasible": sum(x["status"] == "infeasible" for x in r.records),
                 "too_big_here": sum(x["status"] == "too big here" for x in r.records), "errors": len(r.errors)},
        "timings_s": r.timings, "notes": r.notes, "seed": plan.sweep.seed,
    }


def hypothetical_lines(r: Recommendation) -> list[str]:
    """What a token-to-expert predictor would need, from the predictor study at your point."""
    out = []
    h = r.headline
    for st in r.predictor:
        where = "at your point" if st.point == r.plan.user else f"at {st.label} tokens/step"
        if st.reference is None:
            continue
        # the first line on a workload whose steps are scaled, not regrouped, says so
        first = where + (f" ({r.scaled[st.label]})" if st.label in r.scaled else "")
        if all(v != v for v in st.speedup.ravel()):
            why = next((x["reason"] for x in r.records if x["family"] == "token (hypothetical)"
                        and x["status"] != "ok"), "no run")
            out.append(f"{first.capitalize()}, the token-to-expert what-if could not run: {why}")
            continue
        slots = f"+{r.plan.sweep.map_redundant_slots_per_gpu}/GPU"      # the synthetic predictors' slot budget
        wins = [(o, a) for o, a in zip(st.overheads, st.break_even) if a is not None]
        best = float(max(v for v in st.speedup.ravel() if v == v))
        if wins:
            out.append(f"{first.capitalize()}, a token-to-expert predictor ({slots}) would beat {st.reference[0]} "
                       f"({st.reference[1]:.3f}x vs none) with {_break_even_text(st)} ({_best_text(st, best)}).")
        else:
            top = (f"not even a perfect, free one ({best:.3f}x)"
                   if max(st.accuracies) >= 1.0 and min(st.overheads) == 0 else
                   f"not even the most accurate and cheapest swept, accuracy {max(st.accuracies):g} at "
                   f"{min(st.overheads) / 1e6:g} MFLOP/token (best: {best:.3f}x)")
            out.append(f"{first.capitalize()}, no token-to-expert predictor in the sweep ({slots}) beats "
                       f"{st.reference[0]} ({st.reference[1]:.3f}x vs none), {top}.")
        hidden = _hidden_text(st)
        if hidden:
            out.append(f"{where.capitalize()}, {hidden}")
        knees, flat, rising = [], [], []
        for i, (o, a) in enumerate(zip(st.overheads, st.knee)):
            if a is None:
                continue
            effect = st.accuracy_effect(i)
            if effect == "flat":
                flat.append(f"{o / 1e6:g} MFLOP")
            elif effect == "rising":
                rising.append(f"{o / 1e6:g} MFLOP")
            else:
                knees.append(f"{a:g} at {o / 1e6:g} MFLOP")
        if knees:
            out.append(f"{where.capitalize()}, better accuracy stops paying (within 1% of the best) at: "
                       + "; ".join(knees) + ".")
        if flat:
            out.append(f"{where.capitalize()}, the predictor's accuracy makes no difference (every accuracy swept "
                       f"within 1%) at: " + "; ".join(flat) + ".")
        if rising:
            out.append(f"{where.capitalize()}, better accuracy still pays at the highest swept "
                       f"({max(st.accuracies):g}) at: " + "; ".join(rising) + ".")
    if h.oracle is not None and h.none is not None:
        from sim.verdict import oracle_gain_text

        o, n = h.oracle, h.none
        us = lambda x: {"total": x["layer_total_us"], "ffn": x["layer_ffn_us"]}  # noqa: E731
        gain = oracle_gain_text(us(n), us(o), r.plan.cluster, r.plan.model)
        out.append(f"The oracle ({o['candidate']}: true loads known in advance, no predictor cost, the same copy "
                   f"policy) runs at {n['latency_mean_ms'] / o['latency_mean_ms']:.3f}x vs none at your point, the "
                   f"bound for prediction with that slot budget; {gain}.")
    return out


def _break_even_text(st) -> str:
    """The break-even accuracy of every overhead (overheads with the same break-even, speed-up there and
    accuracy that wins clearly are named together), each with its margin over the reference there, a near tie
    when under NEAR_TIE: 'accuracy >= 0.9 at 0 and 8.4 MFLOP/token, by only 0.06% there (1.1124x against
    1.1118x): a near tie, by 1% or more from accuracy 0.99'."""
    ref = st.reference[1]
    groups: dict[tuple, list[float]] = {}
    for i, (o, a) in enumerate(zip(st.overheads, st.break_even)):
        if a is not None:
            groups.setdefault((a, st.at(i, a), st.clear_win(i)), []).append(o)
    parts = []
    for (a, v, clear), os_ in groups.items():
        m = v / ref
        txt = f"accuracy >= {a:g} at {and_list([f'{o / 1e6:g}' for o in os_])} MFLOP/token"
        if m < NEAR_TIE:
            txt += f", by only {100 * (m - 1):.2f}% there ({v:.4f}x against {ref:.4f}x): a near tie"
            if clear is not None:
                txt += f", by {100 * (NEAR_TIE - 1):.0f}% or more from accuracy {clear:g}"
        else:
            txt += f", by {100 * (m - 1):.2f}% there ({v:.4f}x)"
        parts.append(txt)
    return "; ".join(parts)


def _best_text(st, best: float) -> str:
    margin = best / st.reference[1]
    return f"best: {best:.3f}x, {100 * (margin - 1):.2f}% faster: a near tie" if margin < NEAR_TIE else \
        f"best: {best:.3f}x"


def _hidden_text(st) -> str | None:
    """Why some overheads give the same speed-ups: a token predictor runs beside the attention
    (predictor_overlap), so its time is hidden while it fits beside it (the two share the GPU's compute,
    :func:`sim.cost.beside_attention`); None where no overhead above 0 is hidden."""
    hid = st.hidden()
    if not any(st.overheads[i] > 0 for i in hid):
        return None
    names = and_list([f"{st.overheads[i] / 1e6:g}" for i in hid])
    what = (f"overheads {names} MFLOP/token give the same speed-ups" if len(hid) > 1 else
            f"an overhead of {names} MFLOP/token costs no time")
    top = max(st.overheads[i] for i in hid)
    shown = [i for i in range(len(st.overheads)) if i not in hid and not np.all(np.isnan(st.predictor_us[i]))]
    tail = ""
    if shown:
        j = min(shown, key=lambda i: st.overheads[i])
        tail = (f"; at {st.overheads[j] / 1e6:g} MFLOP/token it no longer fits and adds "
                f"{np.nanmax(st.predictor_us[j]):.0f} µs a layer")
    return (f"{what}: a token predictor runs beside the attention ({st.attention_us:.0f} µs per MoE layer here), so "
            f"its time is hidden while it fits beside it, the two sharing the GPU's compute (runs.csv's "
            f"layer_predictor_us: 0 up to {top / 1e6:g} MFLOP/token{tail}).")


def _title_line(r: Recommendation) -> str:
    plan = r.plan
    c = plan.cluster
    w = plan.workloads[0]
    lo, hi = plan.trace_token_range
    tok = (f"{w.tokens_per_step} tokens/step" if w.tokens_per_step else
           f"{plan.trace_tokens:.0f} tokens/step (as in the trace)" if lo == hi else
           f"{lo}-{hi} tokens/step (as in the trace; mean {plan.trace_tokens:.0f}, at which the reasons are priced)")
    ctx = f", context {w.seq_len}" if w.phase == "decode" else f", prompts of {w.seq_len}"
    return (f"{plan.model.name} on {c.name}: {c.num_gpus} GPUs, {plan.fabric} {plan.user.bandwidth_gb_s:g} GB/s; "
            f"{w.phase}, {tok}{ctx}; trace skew {plan.skews['trace'].achieved:.2f} (max/mean tokens per expert, "
            f"mean over the simulated steps); "
            f"{plan.sweep.assumptions} assumptions")


def near_tie(c) -> bool:
    """The recommendation's lead over the runner-up is a near tie: under NEAR_TIE, or within its 95% interval."""
    return c is not None and (c.speedup < NEAR_TIE or c.ci_low <= 1.0)


def tie_kind(c) -> str | None:
    """What kind of near tie (:func:`near_tie`) the lead ``c`` is: "same" (the same time on every step),
    "near" (under NEAR_TIE either way), "interval" (within its 95% interval), or None (none)."""
    if not near_tie(c):
        return None
    if c.same_every_step:
        return "same"
    return "near" if 1 / NEAR_TIE < c.speedup < NEAR_TIE else "interval"


def _verdict(r: Recommendation) -> str:
    h = r.headline
    w = h.winner
    if not h.duplicates:
        text = "no duplication (strategy none)"
    else:
        fam = {"static": "static duplication", "distribution": "distribution-only prediction",
               "token": "token-to-expert prediction"}.get(w["family"], w["family"])
        extra = w.get("slots_per_gpu_extra")
        text = (f"{fam}: {w['strategy']} with {int(w['redundant_slots'])} redundant slots "
                f"({extra} extra per GPU)")
    c = h.vs_runner_up
    kind = tie_kind(c)
    if kind is None:
        return text
    # the rule still picks one; what is said is that the runner-up is as good
    lead = (f"{100 * (c.speedup - 1):.2f}% faster than {c.b}" if c.speedup >= 1 else
            f"{c.b} {100 * (1 / c.speedup - 1):.2f}% faster")
    tie = {"same": f"a tie (the same time as {c.b} on every step)", "near": f"a near tie ({lead})",
           "interval": f"not separated from {c.b} ({lead}, within the 95% interval)"}[kind]
    either = ("either is as fast, and no duplication needs no redundant slots" if not h.duplicates else
              "either is as good")
    return f"{text}; {tie}: {either}"


def key_numbers(r: Recommendation) -> list[tuple[str, str]]:
    h = r.headline
    w = h.winner
    rows = [("strategy", w["candidate"]), ("predictor", w.get("predictor") or "none"),
            ("redundant slots", f"{int(w.get('redundant_slots', 0))} over {r.plan.cluster.num_gpus} GPUs"),
            ("mean step latency", f"{w['latency_mean_ms']:.3f} ms (p99 {w['latency_p99_ms']:.3f} ms), "
                                  f"{w['tokens_per_s']:,.0f} tokens/s")]
    if h.vs_none is not None:
        rows.append(("speed-up vs no duplication", _versus(h.vs_none)))
    elif h.none is not None:
        rows.append(("speed-up vs no duplication", "1.000x (it is no duplication)"))
    if h.not_separated is not None:
        fast, c = h.not_separated
        rows.append(("fastest, not separated", f"{fast['candidate']}: {_versus(c)}"))
    if h.vs_runner_up is not None:
        c = h.vs_runner_up
        tie = {None: "", "same": ": a tie, either is as fast", "near": ": a near tie, either is as good",
               "interval": ": not separated (within the 95% interval), either is as good"}[tie_kind(c)]
        rows.append(("speed-up vs runner-up", f"{_versus(h.vs_runner_up)} over {h.vs_runner_up.b}{tie}"))
    if h.thin:
        rows.append(("evidence", f"thin: {len(w['step_latency_ms'])} simulated steps (fewer than {THIN_STEPS}); "
                                 f"a longer trace or a larger sim_steps gives a firmer answer"))
    if h.oracle is not None and h.none is not None:
        rows.append(("bound (oracle)", f"{h.none['latency_mean_ms'] / h.oracle['latency_mean_ms']:.3f}x vs none"))
    return rows


def _versus(c) -> str:
    """'1.101x (95% CI 1.097-1.104; faster on 40/48 steps)'."""
    if c.same_every_step:
        return f"1.000x (the same time on every one of {c.steps} steps)"
    return (f"{c.speedup:.3f}x (95% CI {c.ci_low:.3f}-{c.ci_high:.3f}; faster on {c.steps_won}/{c.steps} steps)")


# ---------------------------------------------------------------------------- figures

#: the report's figures, in report order: name -> caption
CAPTIONS = {
    "headline": "Mean MoE-layer time of every strategy at your cluster, split by phase (µs): the deployable ones "
                "fastest on top, then the bound (the oracle at each slot budget; the synthetic predictors are in "
                "the predictor study's figure); the text is the mean step latency (all MoE layers of a step).",
    "decision_bw_skew": "Which deployable strategy is fastest for each interconnect bandwidth and expert skew (your "
                        "GPU count and workload); the text is its speed-up over no duplication; your cluster is "
                        "boxed in red.",
    "token_vs_distribution": "Where token-to-expert prediction would beat distribution-only prediction: best "
                             "distribution-only time / time of the hypothetical token predictor (> 1, purple: "
                             "token-to-expert faster; < 1, orange: slower); your GPU count and workload.",
    "decision_gpus_tokens": "The same for GPU count (top; your workload and the trace's skew) and for the workload "
                            "(bottom; your GPU count and the trace's skew).",
    "predictor": "Speed-up over no duplication of a synthetic token-to-expert predictor against its accuracy "
                 "(top-k recall), one line per overhead (FLOPs per token per MoE layer); overheads with the very "
                 "same speed-ups share one line.",
    "sensitivity": "Speed-up over no duplication of each map strategy along the bandwidth (left) and skew (right) "
                   "axes through your point (red line); the thick line is the recommendation.",
}


def figures(r: Recommendation, jobs: int = 1) -> dict[str, tuple[bytes, str]]:
    """name -> (PNG bytes, caption), in report order, drawn in up to ``jobs`` forked processes at once (a
    figure with nothing to show is left out)."""
    from moe_gps.workers import fork_map, forking

    plots.pyplot()                      # matplotlib imported once, before the workers fork
    with forking(jobs) as workers:
        drawn = dict(fork_map(_figure, list(CAPTIONS), workers, context=r))
    return {name: (drawn[name], caption(name, r)) for name in CAPTIONS if drawn[name] is not None}


def caption(name: str, r: Recommendation) -> str:
    """The caption of figure ``name``: :data:`CAPTIONS`, and for the predictor study why overheads whose
    predictor is hidden beside the attention give the same speed-ups."""
    text = CAPTIONS[name]
    if name == "predictor":
        why = [f"at {'your point' if st.point == r.plan.user else st.label + ' tokens/step'}, "
               + and_list([f"{st.overheads[i] / 1e6:g}" for i in st.hidden()]) + " MFLOP/token"
               for st in r.predictor if any(st.overheads[i] > 0 for i in st.hidden())]
        if why:
            text += (" A token predictor runs beside the attention, so its time is hidden while it fits beside it: "
                     "the same speed-ups " + "; ".join(why) + ".")
    return text


def _figure(name: str, r: Recommendation) -> tuple[str, bytes | None]:
    """(name, PNG bytes of the figure ``name`` of :data:`CAPTIONS`, or None where it has nothing to show)."""
    h, maps = r.headline, r.maps
    labels = sorted(set(r.map_labels) | {x["candidate"] for x in h.ranking}
                    | ({h.oracle["candidate"]} if h.oracle else set()))
    colors = plots.colors_for(labels)
    if name == "headline":
        here = at_point(r.df, r.plan, r.plan.user)
        labels_here = {c.label for c in r.plan.headline_candidates}
        bounds = here[(here["family"] == "oracle") & here["candidate"].isin(labels_here)]
        return name, plots.headline_png(h.ranking, bounds.sort_values(["latency_mean_ms", "candidate"])
                                        .to_dict("records"))
    if name == "decision_bw_skew":
        return name, plots.decision_map_png(maps["map-bw-skew"], colors, "Decision map: bandwidth x skew")
    if name == "token_vs_distribution":
        return name, plots.token_vs_dist_png(maps["map-bw-skew"], _hypo_label(r))
    if name == "decision_gpus_tokens":
        return name, plots.two_maps_png(maps["map-gpus-bw"], maps["map-tokens-bw"], colors,
                                        "Decision map: GPU count x bandwidth",
                                        "Decision map: tokens per step x bandwidth")
    if name == "predictor":
        return name, plots.predictor_png(r.predictor, r.plan.sweep.map_redundant_slots_per_gpu)
    return name, plots.sensitivity_png(r.df, r.plan, list(r.map_labels), colors, h.winner["candidate"])


def _hypo_label(r: Recommendation) -> str:
    m = r.plan.sweep.map_token_predictor
    return "none" if m is None else f"accuracy {m.accuracy:g}, {m.overhead_flops / 1e6:g} MFLOP/token"


# ---------------------------------------------------------------------------- writers


def _sections(r: Recommendation) -> dict[str, Any]:
    s = summary(r)
    return {"summary": s, "verdict": _verdict(r), "title": _title_line(r), "keys": key_numbers(r)}


def write_report(r: Recommendation, out_dir: str | os.PathLike, command: str = "", jobs: int = 1) -> list[Path]:
    """Write the report folder; returns the files written (the cache folder is not listed). The figures are
    drawn in up to ``jobs`` forked processes at once."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sec = _sections(r)
    figs = figures(r, jobs)
    for name, (png, _) in figs.items():
        with atomic_path(out / "plots" / f"{name}.png") as tmp:
            tmp.write_bytes(png)
        written.append(out / "plots" / f"{name}.png")
    # runs.csv
    df = r.df.copy()
    cols = [c for c in CSV_COLUMNS if c in df.columns]
    df = df.sort_values(["num_gpus", "bandwidth_gb_s", "workload", "skew", "latency_mean_ms"], na_position="last")
    write_csv_atomic(out / "runs.csv", df[cols])
    written.append(out / "runs.csv")
    # the exact sweep, and a simulate config of the headline comparison
    rerun = command or "moe-gps recommend TRACE --sweep sweep.yaml"
    write_text_atomic(out / "sweep.yaml", f"# moe-gps recommend: the exact sweep of this report (seed "
                                          f"{r.plan.sweep.seed}). Your point (cluster, model, workload) is "
                                          f"not in it:\n# it is the command's flags (resolved in "
                                          f"simulate_config.yaml). The command: {rerun}\n"
                      + provenance_comment(r.trace_name) + dump_yaml_plain(sweep_to_dict(r.plan.sweep)))
    written.append(out / "sweep.yaml")
    write_text_atomic(out / "simulate_config.yaml", _simulate_config_text(r))
    written.append(out / "simulate_config.yaml")
    write_text_atomic(out / "recommendation.json", json.dumps(jsonable(sec["summary"]), indent=2) + "\n")
    written.append(out / "recommendation.json")
    write_text_atomic(out / "report.md", render_markdown(r, sec, figs, command))
    written.append(out / "report.md")
    write_text_atomic(out / "report.html", render_html(r, sec, figs, command))
    written.append(out / "report.html")
    return written


def _simulate_config_text(r: Recommendation) -> str:
    from dataclasses import replace

    from moe_gps.config.schema import SimulateConfig
    from sim.run import resolve_config

    h, plan = r.headline, r.plan
    by_label = {c.label: c for c in plan.headline_candidates}
    rows = [x for x in (h.none, h.winner, h.runner_up) if x is not None]
    names, strategies = set(), []
    for x in rows:
        if x["candidate"] in names:
            continue
        names.add(x["candidate"])
        c = by_label[x["candidate"]]
        cfg = c.config(plan.cluster.num_gpus, plan.model.num_experts, plan.sweep.predictor_placement)
        strategies.append(replace(cfg, name=c.label))
    cfg = SimulateConfig(cluster=plan.cluster, model=plan.model, workload=plan.workloads[0], strategies=strategies,
                         seed=plan.sweep.seed, train_steps=plan.sweep.train_steps, trace=r.trace_name,
                         assumptions=plan.sweep.assumptions)
    cfg = resolve_config(cfg, plan.sweep.train_steps, r.trace_name)[0]      # every default explicit, as simulate's
    return ("# The headline comparison (none, the recommendation, the runner-up) as a simulate config.\n"
            "# `moe-gps simulate TRACE --config simulate_config.yaml` runs it on every step after train_steps\n"
            f"# (the sweep simulated {plan.sweep.sim_steps} steps per run).\n" + provenance_comment(r.trace_name)
            + dump_yaml(cfg))


#: rows of the ranking the terminal shows
TERMINAL_ROWS = 15


def terminal(r: Recommendation) -> str:
    """The terminal summary: verdict, key numbers, reasons, sensitivity, the ranking."""
    sec = _sections(r)
    s = sec["summary"]
    lines = [sec["title"], "", f"RECOMMENDATION: {sec['verdict']}"]
    lines += [f"  {k}: {v}" for k, v in sec["keys"]]
    lines += ["", "why:"] + [f"  - {x}" for x in r.headline.reasons]
    lines += ["", "how far it holds:"] + [f"  - {x}" for x in s["sensitivity"]]
    lines += ["", "token-to-expert prediction:"] + [f"  - {x}" for x in s["hypothetical"]]
    rank = r.headline.ranking
    shown = f"; {TERMINAL_ROWS} of {len(rank)}, every one in runs.csv and report.html" if len(rank) > TERMINAL_ROWS \
        else ""
    lines += ["", format_table(rank[:TERMINAL_ROWS], [(k, h, f) for k, h, f in RANK_COLUMNS[:8]],
                               title=f"strategies at your cluster (fastest first{shown}):")]
    lines += [f"note: {x}" for x in r.notes]
    n = s["runs"]
    ok = n["total"] - n["infeasible"] - n["too_big_here"] - n["errors"]
    lines += [f"runs: {n['total']} ({ok} ok, {n['infeasible']} infeasible{too_big_here(n)}, {n['errors']} errors; "
              f"{r.simulated} simulated now, {r.from_cache} read from the cache) in {r.timings['total_s']:.1f} s"]
    return "\n".join(lines)
