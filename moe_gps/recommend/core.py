"""The recommendation sweep end to end: :func:`recommend`.

1. regroup the trace into steps of your point's ``tokens_per_step`` (as ``simulate`` does), cut it to
   ``train_steps + sim_steps`` of those steps and make its skew variants;
2. simulate every candidate at the user's point (the headline study);
3. simulate the decision maps (with the headline's winner and runner-up) and the
   predictor study;
4. analyse: headline, maps, sensitivity, predictor knees (:mod:`moe_gps.recommend.analysis`).

The report is written by :mod:`moe_gps.recommend.report`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from moe_gps.config.loader import check_combination, check_model_matches_trace
from moe_gps.config.schema import ClusterConfig, ModelConfig, WorkloadConfig
from moe_gps.errors import UserError
from moe_gps.recommend import analysis as an
from moe_gps.recommend.plan import TRACE_SKEW, Candidate, SweepPlan, check_gpu_counts, make_plan, workload_label
from moe_gps.recommend.runner import Runner
from moe_gps.recommend.skew import SkewVariant, mean_expert_skew
from moe_gps.recommend.sweep import SweepConfig
from moe_gps.trace.regroup import regroup_or_scale, regrouped_steps, regroups, steps_needed

#: two skew variants closer than this (in achieved skew) are one
SKEW_DEDUP = 0.02


@dataclass
class Recommendation:
    """Everything a report needs."""

    plan: SweepPlan
    records: list[dict[str, Any]]
    df: Any
    headline: an.Headline
    maps: dict[str, an.DecisionMap]
    sensitivities: list[an.Sensitivity]
    predictor: list[an.PredictorStudy]
    map_labels: list[str]
    trace_name: str
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    simulated: int = 0
    from_cache: int = 0
    #: workload label -> why its steps are not what a real step of its size is (the trace's steps scaled, not
    #: regrouped); the sentences that name the workload carry it
    scaled: dict[str, str] = field(default_factory=dict)

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("status") == "error"]


def _trim(trace, sweep: SweepConfig, notes: list[str], scaled: int | None = None):
    """The trace cut to train_steps + sim_steps, and the steps simulated; ``scaled``: the user's
    --tokens-per-step, when it scaled the trace's steps rather than regrouping them."""
    from moe_gps.trace.data import TokensTrace

    n = trace.num_steps
    train, sim = sweep.train_steps, sweep.sim_steps
    if n < train + 1:
        fixes = [f"set train_steps below {n} in a sweep file, given with --sweep"] if n >= 2 else []
        need = steps_needed(train)
        if isinstance(trace, TokensTrace) and trace.num_tokens >= need:
            size, noise = trace.num_tokens // need, trace.meta.num_experts * trace.meta.top_k
            fixes.append(f"give --tokens-per-step {size} or fewer, which regroups its {trace.num_tokens} tokens into "
                         f"at least {need} steps" + ("" if size >= noise else
                                                     f", each fewer than experts x top_k ({noise}), so that its expert "
                                                     "loads are mostly sampling noise (record a longer trace for a "
                                                     "meaningful answer)"))
        why = (f" (--tokens-per-step {scaled} makes fewer than {need} steps, so each step's counts are scaled "
               "instead)" if scaled else "")
        raise UserError(f"the trace has {n} step{'s' if n != 1 else ''}{why}; train_steps={train} leaves none to "
                        f"simulate" + (f": {'; or '.join(fixes)}" if fixes else ""))
    if n < train + sim:
        notes.append(f"the trace has {n} steps: {n - train} simulated per run instead of sim_steps={sim}")
        sim = n - train
    if n > train + sim:
        notes.append(f"each run simulates steps {train}..{train + sim - 1} of the trace's {n} "
                     f"(sim_steps={sim}; the first {train} fit the predictors)")
    keep = list(range(train + sim))
    if hasattr(trace, "select_steps"):
        return trace.select_steps(keep), sim
    from dataclasses import replace

    from moe_gps.trace.data import CountsTrace
    meta = trace.meta
    if meta.tokens_per_step is not None:
        meta = replace(meta, tokens_per_step=list(meta.tokens_per_step[:train + sim]))
    return CountsTrace(meta, trace.counts_range(0, train + sim)), sim


def _regrouping_workloads(plan: SweepPlan, trace) -> list[str]:
    """Notes on the sweep's other workloads whose runs regroup the (cut) trace into steps of their size
    (as simulate does): train_steps and the simulated steps count those larger or smaller steps."""
    out = []
    for w in plan.workloads[1:]:
        n = w.tokens_per_step
        if n and n != plan.trace_tokens and regroups(trace, n, plan.sweep.train_steps):
            out.append(f"workload {workload_label(w, plan.trace_tokens)}: its runs regroup the {trace.num_steps} "
                       f"steps into {regrouped_steps(trace, n)} steps of {n} tokens, of which the first "
                       f"{plan.sweep.train_steps} fit the predictors (runs.csv's sim_steps: the steps each run "
                       f"simulated)")
    return out


def scaled_workloads(plan: SweepPlan, trace, user_scaled: bool = False) -> tuple[list[str], dict[str, str]]:
    """The workloads whose runs scale the trace's steps instead of regrouping them (simulate's rule,
    :func:`moe_gps.trace.regroup.regroups`).

    ``trace``: the trace the runs get (cut to train_steps + sim_steps); ``user_scaled``: the user's own
    workload scales too (its note is the one ``regroup_or_scale`` gave). -> (notes on the swept ones, workload
    label -> a short clause for the sentences that name it)."""
    from moe_gps.trace.data import TokensTrace
    from moe_gps.trace.regroup import MIN_STEPS, describe_tokens_per_step, scaling_noise

    tps = trace.tokens_per_step
    have = describe_tokens_per_step(trace)
    need = steps_needed(plan.sweep.train_steps)
    notes, clauses = [], {}
    for i, w in enumerate(plan.workloads):
        n = w.tokens_per_step
        if i == 0:
            scaled = bool(user_scaled and n)
        else:
            scaled = bool(n) and n != plan.trace_tokens and not regroups(trace, n, plan.sweep.train_steps)
        if not scaled:
            continue
        label = workload_label(w, plan.trace_tokens)
        direction = "up" if int(tps.max()) < n else "down" if int(tps.min()) > n else ""
        clauses[label] = (f"steps scaled {direction} from the trace's {have} tokens, with their sampling noise: "
                          f"see the notes").replace("  ", " ")
        if i == 0:
            continue
        k = regrouped_steps(trace, n)
        few = (f"{k} step{'s' if k != 1 else ''} of {n}, fewer than the {need} that regrouping needs"
               + (f" (one more than train_steps={plan.sweep.train_steps})" if need > MIN_STEPS else ""))
        why = (f"the {trace.num_steps} steps hold {int(tps.sum())} tokens, {few}" if isinstance(trace, TokensTrace)
               else f"the {trace.num_steps} steps make {few}" if k else
               "a counts trace regroups only into whole multiples of its steps")
        notes.append(f"the runs of workload {label} scale each step's expert counts from its {have} tokens to {n}, "
                     f"as simulate does ({why}), {scaling_noise(tps, n)}; the expert and GPU skew of these runs are "
                     f"those of the trace's steps (runs.csv's gpu_skew_before)")
    return notes, clauses


def _skews(runner: Runner, trace, sweep: SweepConfig, notes: list[str]) -> dict[str, SkewVariant]:
    first = sweep.train_steps
    out = {TRACE_SKEW: SkewVariant(TRACE_SKEW, None, 1.0, mean_expert_skew(trace, first))}
    for v in runner.skew_variants(sorted(set(sweep.skew)), first):
        if not v.reachable:
            notes.append(f"skew {v.target:g} is out of reach of the re-weighting on this trace; the nearest "
                         f"reachable variant (skew {v.achieved:.2f}) is used")
        if any(abs(v.achieved - o.achieved) < SKEW_DEDUP for o in out.values()):
            continue
        out[v.key] = v
    return out


def recommend(trace, cluster: ClusterConfig, model: ModelConfig, workload: WorkloadConfig, sweep: SweepConfig,
              out_dir=None, jobs: int = 1, progress: bool | None = None, trace_name: str = "trace",
              backend: str = "local", address: str | None = None, sweep_name: str = "sweep") -> Recommendation:
    """Run the sweep (cached under ``out_dir``/cache when given) and analyse it.

    ``backend`` "local" runs ``jobs`` processes here; "ray" runs Ray tasks on the cluster at
    ``address``, or on a local one of ``jobs`` CPUs started for the sweep. ``sweep_name``: where the
    sweep came from (its file), as its errors name it.
    """
    t_start = time.perf_counter()
    notes: list[str] = []
    m = trace.meta
    check_model_matches_trace(model, m.num_layers, m.num_experts, m.top_k, trace_name)
    notes += [w for w in (m.aggregate_steps_warning(),) if w]
    # the steps of your point, as simulate makes them: train_steps, sim_steps and the skews count these
    trace, regrouped, scaled = regroup_or_scale(trace, workload.tokens_per_step, sweep.train_steps)
    notes += [x for x in (regrouped, scaled) if x]
    n = workload.tokens_per_step
    trace, sim_steps = _trim(trace, sweep, notes, n if scaled and (trace.tokens_per_step != n).any() else None)
    if sim_steps != sweep.sim_steps:
        from dataclasses import replace
        sweep = replace(sweep, sim_steps=sim_steps)
    # the user's own point must be able to run at all (a clear error now, not after the sweep)
    peak = float(workload.tokens_per_step or trace.tokens_per_step.max())
    check_combination(cluster, model, workload, [Candidate("none").config(cluster.num_gpus, m.num_experts)], peak,
                      where=f"cluster {cluster.name}")
    check_gpu_counts(sweep, cluster, sweep_name)
    timings: dict[str, float] = {}
    with Runner(trace, sweep.seed, out_dir, jobs, progress, backend, address) as runner:
        t0 = time.perf_counter()
        skews = _skews(runner, trace, sweep, notes)
        timings["skew_variants_s"] = time.perf_counter() - t0
        plan = make_plan(sweep, trace, cluster, model, workload, skews, sweep_name)
        scaled_notes, scaled_clauses = scaled_workloads(plan, trace, bool(scaled))
        notes += plan.notes + _regrouping_workloads(plan, trace) + scaled_notes
        t0 = time.perf_counter()
        records = runner.run(plan, plan.headline_runs(), "headline")
        timings["headline_s"] = time.perf_counter() - t0
        head = an.headline(an.frame(records), plan)
        by_label = {c.label: c for c in plan.headline_candidates}
        extra = [by_label[r["candidate"]] for r in (head.winner, head.runner_up) if r is not None]
        map_cands = plan.map_candidates(extra)
        specs = [s for runs in plan.map_runs(map_cands).values() for s in runs] + plan.predictor_runs()
        t0 = time.perf_counter()
        records += runner.run(plan, specs, "maps")
        timings["maps_s"] = time.perf_counter() - t0
        simulated, cached = runner.simulated, runner.from_cache
    # one record per key (a run can belong to several studies)
    uniq = {r["key"]: r for r in records}
    records = list(uniq.values())
    t0 = time.perf_counter()
    df = an.frame(records)
    head = an.headline(df, plan)
    labels = {c.label for c in map_cands}
    maps = {name: an.decision_map(df, plan, name, labels) for name in ("map-bw-skew", "map-gpus-bw", "map-tokens-bw")}
    rec = head.winner["candidate"]
    if rec not in labels:     # cannot happen: the winner is added to the maps; kept as a guard
        raise AssertionError(f"headline winner {rec} missing from the map strategies")
    sens = [
        an.sensitivity(maps["map-bw-skew"], df, plan, rec, "cols", "GB/s", "interconnect bandwidth", labels),
        an.sensitivity(maps["map-bw-skew"], df, plan, rec, "rows", "", "expert skew", labels),
        an.sensitivity(maps["map-tokens-bw"], df, plan, rec, "rows", "", "workload", labels, scaled_clauses),
        an.sensitivity(maps["map-gpus-bw"], df, plan, rec, "rows", "GPUs", "GPU count", labels),
    ]
    all_labels = labels | {c.label for c in plan.headline_candidates}
    pred = [an.predictor_study(df, plan, p, all_labels) for p in plan.predictor_points()]
    timings["analysis_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    return Recommendation(plan, records, df, head, maps, sens, pred, sorted(labels), trace_name, notes, timings,
                          simulated, cached, scaled_clauses)
