"""Run every strategy of a :class:`SimulateConfig` on one trace: :func:`simulate`.

1. check the model against the trace and the configs against each other;
2. prepare each strategy (fit and roll out its predictor on the training steps);
3. for every test step, in order, compute its true loads once (once per worker process when
   ``jobs`` splits the strategies over processes); each strategy decides (re-plan,
   copies, re-split of tokens; :mod:`sim.strategies`), its phase durations follow
   (:mod:`sim.work`), and its SimPy event model runs the step (:mod:`sim.engine`);
4. turn the timelines into :class:`StrategyResult` (breakdown, skew, bytes copied) and the
   verdict (:mod:`sim.verdict`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from moe_gps.config.loader import check_combination, check_model_matches_trace, memory_use
from moe_gps.config.schema import ClusterConfig, ModelConfig, SimulateConfig, StrategyConfig, WorkloadConfig
from moe_gps.errors import HostLimit, StrategyError, UserError
from moe_gps.placement import plan_placement
from moe_gps.placement.placement import row_max
from moe_gps.trace.data import CountsTrace, TokensTrace
from moe_gps.trace.regroup import regroup_or_scale
from moe_gps.workers import fork_map, forking
from moe_gps.workers import progress as report_progress
from sim.cost import Hardware, attention_compute_time, attention_time
from sim.engine import EventModel
from sim.loads import StepFeed, counts_view, unused_rank_note
from sim.strategies import SimContext, StrategyInfo, make_strategy
from sim.verdict import Verdict, verdict_of
from sim.work import StepWork

#: the MoE-layer time breakdown, in the order of a layer; the parts add up to the layer time
PHASES = ("predictor", "attention", "copy", "dispatch", "correction", "ffn", "combine", "sync")


@dataclass
class StrategyResult:
    """One strategy over the simulated steps (S steps, L layers); times in seconds.

    layer_time:   [S, L] wall time of each MoE layer
    phases:       name -> [S, L], the breakdown of layer_time (see PHASES)
    gpu_skew:     [S, L] max / mean tokens per GPU in the expert FFN under this placement
    copy_bytes:   [S, L] expert weights copied for the layer by a re-plan made at the step
    extra_memory: bytes per GPU of redundant expert slots (over all layers)
    replans:      re-plans that moved weights (the placement loaded before serving not counted)
    """

    name: str
    config: StrategyConfig
    info: StrategyInfo
    layer_time: np.ndarray
    phases: dict[str, np.ndarray]
    gpu_skew: np.ndarray
    copy_bytes: np.ndarray
    extra_memory: float
    redundant_slots: int
    replans: int
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def step_latency(self) -> np.ndarray:
        """[S] seconds: the sum of the step's MoE-layer times."""
        return self.layer_time.sum(axis=1)


@dataclass
class SimResult:
    """Everything one ``simulate`` call produced.

    steps:       int [S] trace step index of each simulated step
    tokens:      float [S] tokens per simulated step (after workload scaling)
    expert_skew: float [S, L] max / mean tokens per expert (the trace's skewness)
    base_gpu_skew: float [S, L] max / mean tokens per GPU with no duplication
    routing_key: float [S] a 52-bit digest of each step's tokens and expert loads (:func:`routing_key`):
                 steps with equal keys are copies of one another (sim.verdict's distinct steps)
    warnings:    what makes the numbers less trustworthy (printed under the header)
    inferred:    what was read from the trace rather than given (regrouping, the phase), and a rank column
                 it could not use
    timeline:    strategy -> the event model's slices of the chosen steps, (track, GPU, name, start_s,
                 end_s, layer, step) (sim.timeline)
    """

    config: SimulateConfig
    steps: np.ndarray
    tokens: np.ndarray
    expert_skew: np.ndarray
    base_gpu_skew: np.ndarray
    routing_key: np.ndarray
    strategies: list[StrategyResult]
    notes: list[str] = field(default_factory=list)
    verdict: Verdict | None = None
    warnings: list[str] = field(default_factory=list)
    inferred: list[str] = field(default_factory=list)
    timeline: dict[str, list[tuple]] = field(default_factory=dict)

    def get(self, name: str) -> StrategyResult:
        for r in self.strategies:
            if r.name == name:
                return r
        raise KeyError(name)


def routing_key(tokens: float, home_tokens: np.ndarray, counts: np.ndarray) -> float:
    """A 52-bit digest (exact in a float64) of one step's tokens, tokens per GPU [G] and expert loads
    [L, E]: equal for steps that route alike, and unequal otherwise but with a chance of about S^2 / 2^53."""
    h = hashlib.blake2b(digest_size=8)
    for part in (np.float64(tokens), home_tokens, counts):
        h.update(np.ascontiguousarray(part, dtype=np.float64).tobytes())
    return float(int.from_bytes(h.digest(), "little") & ((1 << 52) - 1))


def _skew(x: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, row_max(x) / np.where(mean > 0, mean, 1), np.nan)


def breakdown(work: StepWork, marks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Split each layer's wall time [L] of one step into PHASES: nominal times on the critical GPU
    (predictor and attention of the GPU that was ready last, the maxima over GPUs of the others),
    ``sync`` = the collective skew of the layer's collectives (``work.skew``, taken out of dispatch,
    correction and combine), and ``copy`` = what the copies added on top (waiting for them, contention on links,
    the host time of applying a placement): the rest of the layer's time."""
    pa = work.predictor + work.attention                               # [L, G]
    layer, crit = np.arange(len(pa)), np.argmax(pa, axis=1)
    pred = work.predictor[layer, crit]
    attn = pa[layer, crit] - pred
    d, x = row_max(work.dispatch), row_max(work.correction)
    f, c = row_max(work.ffn), row_max(work.combine)
    total = marks[:, -1] - marks[:, 0]
    copy = total - (pred + attn + d + x + f + c)
    copy = np.where(np.abs(copy) < 1e-12 * np.maximum(1.0, total), 0.0, copy)     # rounding, also of long layers
    d_skew, x_skew, c_skew = work.skew.T if work.skew is not None else np.zeros((3, len(total)))
    return total, {"predictor": pred, "attention": attn, "copy": copy, "dispatch": d - d_skew,
                   "correction": x - x_skew, "ffn": f, "combine": c - c_skew, "sync": d_skew + x_skew + c_skew}


#: float64 [L, G, G] arrays of GPU-to-GPU traffic a process simulating a step holds at once (measured: 0.54 GB
#: above the process's own at 1024 GPUs and 32 layers, 2.0 such arrays)
TRAFFIC_ARRAYS = 2


def check_traffic_memory(num_gpus: int, num_layers: int, processes: int, cluster: str) -> None:
    """HostLimit before any work when the GPU-to-GPU traffic of a step (TRAFFIC_ARRAYS x 8 x L x G^2 bytes
    in each of ``processes``) needs more memory than the machine has available (a cluster of thousands
    of GPUs would otherwise grow until the out-of-memory killer ends it)."""
    from moe_gps.trace.synth import available_memory

    need = TRAFFIC_ARRAYS * 8 * num_layers * num_gpus ** 2 * processes
    have = available_memory()
    if have is not None and need > have:
        raise HostLimit(f"cluster {cluster}: {num_gpus} GPUs need about {need / 2**30:.1f} GiB for the GPU-to-GPU "
                        f"traffic of {num_layers} layers ({processes} process(es)), {have / 2**30:.1f} GiB "
                        f"available; simulate fewer GPUs (or fewer --jobs)")


def default_train_steps(config: SimulateConfig, num_steps: int, num_tokens: int = 0) -> int:
    train = config.resolved_train_steps(num_steps)
    if num_steps < 2:
        hint = ""
        if num_tokens >= 2:
            n = max(1, num_tokens // 16)
            how = (f"--tokens-per-step {n} ({num_tokens // n} steps) or `moe-gps trace rechunk TRACE "
                   f"--tokens-per-step {n} -o OUT`")
            need = config.model.num_experts * config.model.top_k
            hint = (f"; regroup its {num_tokens} tokens into several steps, e.g. {how}" if n >= need else
                    f"; its {num_tokens} tokens are too few for several steps of at least experts x top_k "
                    f"({config.model.num_experts} x {config.model.top_k}) tokens, below which a step's expert loads "
                    f"are mostly sampling noise: record a longer trace, or regroup it anyway ({how}) and read the "
                    f"answer as noise")
        raise UserError(f"the trace has {num_steps} step; the simulator needs at least 2 (one to fit "
                        f"predictors and profile, one to simulate){hint}")
    if train >= num_steps:
        raise UserError(f"train_steps={train} leaves no step to simulate in a trace of {num_steps} steps "
                        f"(use at most {num_steps - 1})")
    return train


def resolve_config(config: SimulateConfig, train_steps: int, trace_name: str) -> tuple[SimulateConfig, list[str]]:
    """A copy with every default made explicit (names, planners, slots, re-plan policies, train
    steps), so that the YAML written beside the results reruns exactly the same simulation;
    and notes on how defaults were chosen for this trace."""
    G, E = config.cluster.num_gpus, config.model.num_experts
    config = config.with_assumptions()
    strategies, notes = [], []
    for s in config.strategies:
        s = dataclasses.replace(s, name=s.resolved_name(), planner=s.resolved_planner(),
                                redundant_slots=s.resolved_redundant(G, E),
                                predictor_options=_resolved_predictor_options(s),
                                planner_options=dict(s.planner_options))
        if s.kind != "none":
            pol = s.resolved_policy(train_steps)
            s.replan_interval, s.window, s.min_gain = pol.interval, pol.window, pol.min_gain
            notes += pol.notes
        strategies.append(s)
    return dataclasses.replace(config, strategies=strategies, train_steps=train_steps,
                               trace=config.trace or trace_name), notes


def _resolved_predictor_options(s: StrategyConfig) -> dict:
    """The strategy's predictor options with the predictor's own defaults written out (its ``params()``:
    plain numbers, flags and names; the seed is the config's): what config.yaml records."""
    given = dict(s.predictor_options)
    if s.kind not in ("distribution", "token") or "cost" in given or "overhead" in given:
        return given
    from moe_gps.predict import make_distribution_predictor, make_token_predictor
    make = make_distribution_predictor if s.kind == "distribution" else make_token_predictor
    try:
        params = make(s.predictor, **given).params()
    except (UserError, ImportError):          # a bad option is reported when the strategy is built
        return given
    return {**{k: v for k, v in params.items() if k != "seed" and isinstance(v, (bool, int, float, str))}, **given}


#: relative work per step of a strategy kind, to share strategies out over worker processes
STRATEGY_WORK = {"oracle": 8, "token": 3, "distribution": 2, "static": 1, "none": 1}


def simulate(trace: TokensTrace | CountsTrace, config: SimulateConfig, progress: bool | None = None,
             trace_name: str = "trace", strategy_factory=None, timeline_steps: range | None = None,
             jobs: int = 1) -> SimResult:
    """Simulate every strategy of ``config`` on ``trace``; deterministic for ``config.seed``.

    ``strategy_factory(cfg, ctx, seed) -> Strategy`` replaces :func:`sim.strategies.make_strategy`
    (e.g. to replay placements a real run chose; moe_gps.fidelity). ``timeline_steps``: trace steps
    whose schedule is kept in ``SimResult.timeline`` (sim.timeline; simulated steps of the trace after
    regrouping, else a UserError). ``jobs`` > 1 splits the
    strategies into up to that many groups of about equal work, each served in a forked process
    (the same results: a strategy never sees another's state; one process where the platform does
    not fork, or inside another parallel section: :func:`moe_gps.workers.forking`)."""
    from tqdm import tqdm

    cluster, model, workload = config.cluster, config.model, config.workload
    m = trace.meta
    check_model_matches_trace(model, m.num_layers, m.num_experts, m.top_k, trace_name)
    trace, regrouped, warning = regroup_or_scale(trace, workload.tokens_per_step, config.train_steps)
    warnings = [w for w in (m.aggregate_steps_warning(), warning) if w]
    if len(trace.tokens_per_step) and int(trace.tokens_per_step.min()) < m.num_experts * m.top_k and not warning:
        warnings.append(f"some steps hold fewer tokens ({int(np.min(trace.tokens_per_step))}) than experts x top_k "
                        f"({m.num_experts} x {m.top_k}): their expert loads are mostly sampling noise; regroup "
                        f"them into larger steps with --tokens-per-step")
    G = cluster.num_gpus
    tps = trace.tokens_per_step
    peak_tokens = float(workload.tokens_per_step or tps.max())
    if not config.strategies:
        raise UserError("no strategies to simulate")
    check_combination(cluster, model, workload, config.strategies, peak_tokens)
    check_traffic_memory(G, model.num_layers, min(max(1, jobs), len(config.strategies)), cluster.name)
    train = default_train_steps(config, trace.num_steps, int(trace.tokens_per_step.sum()))
    test_steps = np.arange(train, trace.num_steps)
    if timeline_steps is not None and not train <= timeline_steps.start < timeline_steps.stop <= trace.num_steps:
        a, b = timeline_steps.start, timeline_steps.stop - 1
        asked = (f"timeline step {a} is" if a == b else f"timeline steps {a}..{b} are") + \
            (" not all" if a != b and a < trace.num_steps and b >= train else " not")
        raise UserError(f"{asked} among the simulated steps, {train}..{trace.num_steps - 1}"
                        + (f" ({regrouped})" if regrouped else ""))
    hw = Hardware.from_config(cluster, model)

    config, notes = resolve_config(config, train, trace_name)

    hw = dataclasses.replace(hw, weight_reads=config.ffn_weight_reads, predictor_overlap=config.predictor_overlap)
    feed = StepFeed(trace, train, G, workload.tokens_per_step)
    ctx = SimContext(G, m.num_experts, m.top_k, hw, model, workload, config.copy_policy, config.copy_bandwidth_share,
                     feed)
    factory = strategy_factory or (lambda cfg, c, seed: make_strategy(cfg, c, seed, cfg.resolved_policy(train)))
    strategies = [factory(cfg, ctx, config.seed) for cfg in config.strategies]
    K, S = len(strategies), len(test_steps)
    bar = tqdm(total=K * (1 + S), desc="simulate", unit="step",
               disable=(not sys.stderr.isatty()) if progress is None else not progress, file=sys.stderr)
    state = dict(trace=trace, train=train, counts=counts_view(trace), strategies=strategies, ctx=ctx,
                 test_steps=test_steps, timeline_steps=timeline_steps)
    served: dict[int, tuple] = {}
    try:
        with forking(jobs if K > 1 else 1) as workers:
            groups = _groups([cfg.kind for cfg in config.strategies], workers)
            state.update(arrays=_Arrays.zeros(K, S, m.num_layers, shared=len(groups) > 1),
                         bar=bar if len(groups) == 1 else None)      # forked workers send their progress here
            if len(groups) > 1:
                bar.set_postfix_str(f"{len(groups)} processes")
            for part in fork_map(_serve, groups, len(groups), context=state, on_progress=bar.update):
                served.update(part)
    finally:
        bar.close()
    arrays = state["arrays"]
    results, timeline = [], {}
    for k, st in enumerate(strategies):
        info, replans, seconds, rows = served[k]
        R = st.redundant
        extra = R / G * m.num_layers * model.expert_bytes  # redundant slots per GPU x layers x expert bytes
        results.append(StrategyResult(st.name, st.cfg, info, arrays.layer_time[k],
                                      {p: arrays.phases[p][k] for p in PHASES}, arrays.gpu_skew[k],
                                      arrays.copy_bytes[k], extra, R, replans, seconds))
        if rows:
            timeline[st.name] = rows
    notes += staging_notes(results, cluster, model, workload, peak_tokens)
    inferred = [line for line in (regrouped, unused_rank_note(trace, G, test_steps)) if line]
    result = SimResult(config, test_steps, arrays.tokens, arrays.expert_skew, arrays.base_skew, arrays.routing_key,
                       results, notes,
                       warnings=warnings, inferred=inferred, timeline=timeline)
    result.verdict = verdict_of(result)
    return result


def staging_notes(results: list[StrategyResult], cluster: ClusterConfig, model: ModelConfig,
                  workload: WorkloadConfig, peak_tokens: float) -> list[str]:
    """A note for each strategy whose background (async) re-plans staged more expert bytes on one GPU than
    its memory has free beside its weights and KV cache (:func:`moe_gps.config.loader.memory_use`): the
    simulator switches a placement in once all its weights have landed, holding them meanwhile."""
    out = []
    G, gb = cluster.num_gpus, 1e9
    for r in results:
        if r.info.staged_bytes <= 0:
            continue
        mem = memory_use(cluster, model, workload, (model.num_experts + r.redundant_slots) // G, peak_tokens)
        free = mem.available - mem.total
        if r.info.staged_bytes > free:
            out.append(f"{r.name}: its background re-plans stage up to {r.info.staged_bytes / gb:.1f} GB of received "
                       f"experts on one GPU until the switch, more than the {max(free, 0.0) / gb:.1f} GB its memory "
                       f"has free beside its weights and KV cache; a deployment has to stage fewer at once (a layer "
                       f"at a time, say) or runs out of memory")
    return out


def _groups(kinds: list[str], jobs: int) -> list[list[int]]:
    """Strategy indices in at most ``jobs`` groups of about equal work (:data:`STRATEGY_WORK`): the heaviest
    first, each onto the lightest group so far; each group in config order."""
    n = max(1, min(int(jobs), len(kinds)))
    groups: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    for k in sorted(range(len(kinds)), key=lambda k: -STRATEGY_WORK.get(kinds[k], 1)):
        g = load.index(min(load))
        groups[g].append(k)
        load[g] += STRATEGY_WORK.get(kinds[k], 1)
    return [sorted(g) for g in groups if g]


@dataclass
class _Arrays:
    """The per-step results of every strategy (K strategies, S steps, L layers), float64. Where
    ``shared``, in memory that forked workers write into and this process reads: no copies of them
    are sent back, so the results take the memory of one set whatever the number of workers (each
    worker still has its own working set: the steps' loads, its strategies' state)."""

    layer_time: np.ndarray                 # [K, S, L]
    phases: dict[str, np.ndarray]          # PHASES -> [K, S, L]
    gpu_skew: np.ndarray                   # [K, S, L]
    copy_bytes: np.ndarray                 # [K, S, L]
    tokens: np.ndarray                     # [S]
    expert_skew: np.ndarray                # [S, L]
    base_skew: np.ndarray                  # [S, L]
    routing_key: np.ndarray                # [S]

    @classmethod
    def zeros(cls, K: int, S: int, L: int, shared: bool) -> "_Arrays":
        def z(*shape: int) -> np.ndarray:
            if not shared:
                return np.zeros(shape)
            n = int(np.prod(shape))
            return np.frombuffer(mmap.mmap(-1, max(8 * n, 1)), dtype=np.float64, count=n).reshape(shape)

        return cls(z(K, S, L), {p: z(K, S, L) for p in PHASES}, z(K, S, L), z(K, S, L), z(S), z(S, L), z(S, L),
                   z(S))


def _serve(index: list[int], sh: dict) -> dict[int, tuple]:
    """Prepare the strategies at ``index`` and run every test step under each (``sh``: what
    :func:`simulate` set up), writing their rows of ``sh["arrays"]`` (:class:`_Arrays`; and the steps'
    own, by the group of strategy 0). Progress goes to ``sh["bar"]``, or to the parent in a forked
    worker (no bar). -> strategy index -> (its StrategyInfo, re-plans, seconds spent, timeline rows)."""
    trace, train, ctx, test_steps = sh["trace"], sh["train"], sh["ctx"], sh["test_steps"]
    timeline_steps, bar, out = sh["timeline_steps"], sh["bar"], sh["arrays"]
    tick = bar.update if bar is not None else report_progress
    strategies = [sh["strategies"][k] for k in index]
    feed, model = ctx.steps, ctx.model
    G, L, E = ctx.num_gpus, model.num_layers, ctx.num_experts
    K = len(strategies)
    seconds = [dict(prepare=0.0, plan=0.0, events=0.0) for _ in strategies]
    for k, st in enumerate(strategies):
        if bar is not None:
            bar.set_postfix_str(f"fit {st.name}")
        t0 = time.perf_counter()
        try:
            st.prepare(trace, train, sh["counts"])
        except UserError as err:            # a predictor's or planner's option: say whose
            raise StrategyError(index[k], st.name, str(err)) from None
        seconds[k]["prepare"] = time.perf_counter() - t0
        tick(1)

    engines = [EventModel(G, ctx.copy_policy, ctx.bandwidth_share) for _ in strategies]
    own = 0 in index
    base = plan_placement(np.ones((L, E)), G, (-E) % G, "none")
    timeline: list[list[tuple]] = [[] for _ in strategies]
    if bar is not None:
        bar.set_postfix_str("steps")
    for i, s in enumerate(test_steps):
        loads = feed.take(i)
        if own:
            counts = loads.counts
            out.tokens[i] = loads.tokens
            out.expert_skew[i] = _skew(counts)
            out.routing_key[i] = routing_key(loads.tokens, loads.home_tokens, counts)
            out.base_skew[i] = _skew(base.gpu_loads(counts))
        keep = timeline_steps is not None and int(s) in timeline_steps
        attention = attention_time(loads.home_tokens, model, ctx.workload, ctx.hw)     # the same for every strategy
        attention_compute = attention_compute_time(loads.home_tokens, model, ctx.workload, ctx.hw)
        for j, (k, st) in enumerate(zip(index, strategies)):
            t0 = time.perf_counter()
            decision = st.step(i, loads, engines[j].job_pending())
            work = decision.work(loads, ctx, attention, attention_compute)
            t1 = time.perf_counter()
            engines[j].log = [] if keep else None
            marks = engines[j].run_step(work, decision.background)
            if keep:
                timeline[j].extend((*row, int(s)) for row in engines[j].log)
            seconds[j]["plan"] += t1 - t0
            seconds[j]["events"] += time.perf_counter() - t1
            out.layer_time[k, i], parts = breakdown(work, marks)
            for p in PHASES:
                out.phases[p][k, i] = parts[p]
            out.gpu_skew[k, i] = _skew(work.gpu_tokens)
            out.copy_bytes[k, i] = work.copy_bytes
        tick(K)
    return {k: (st.info, st.replans, seconds[j], timeline[j]) for j, (k, st) in enumerate(zip(index, strategies))}
