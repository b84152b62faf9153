"""Run every strategy of a :class:`SimulateConfig` on one trace: :func:`simulate`.

1. check the model against the trace and the configs against each other;
2. prepare each strategy (fit and roll out its predictor on the training steps);
3. for every test step, compute its true loads once and each strategy's plan and phase
   durations (:mod:`sim.work`);
4. run the SimPy event model per strategy (:mod:`sim.engine`);
5. turn the timelines into :class:`StrategyResult` (breakdown, skew, bytes copied).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from moe_gps.config.loader import check_combination, check_model_matches_trace
from moe_gps.config.schema import SimulateConfig, StrategyConfig
from moe_gps.errors import UserError
from moe_gps.placement import plan_placement
from moe_gps.trace.data import CountsTrace, TokensTrace
from sim.cost import Hardware
from sim.engine import run_events
from sim.loads import as_counts_trace, step_loads, trace_counts
from sim.strategies import StrategyInfo, make_strategy
from sim.work import StepWork, build_step_work

#: the MoE-layer time breakdown, in the order of a layer; the parts add up to the layer time
PHASES = ("predictor", "attention", "copy", "dispatch", "correction", "ffn", "combine", "sync")


@dataclass
class StrategyResult:
    """One strategy over the simulated steps (S steps, L layers); times in seconds.

    layer_time:   [S, L] wall time of each MoE layer
    phases:       name -> [S, L], the breakdown of layer_time (see PHASES)
    gpu_skew:     [S, L] max / mean tokens per GPU in the expert FFN under this placement
    copy_bytes:   [S, L] expert weights copied for the layer before it could run
    extra_memory: bytes per GPU of redundant expert slots (over all layers)
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
    """

    config: SimulateConfig
    steps: np.ndarray
    tokens: np.ndarray
    expert_skew: np.ndarray
    base_gpu_skew: np.ndarray
    strategies: list[StrategyResult]
    notes: list[str] = field(default_factory=list)

    def get(self, name: str) -> StrategyResult:
        for r in self.strategies:
            if r.name == name:
                return r
        raise KeyError(name)


def _skew(x: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, x.max(axis=-1) / np.where(mean > 0, mean, 1), np.nan)


def _breakdown(works: list[StepWork], marks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Split each layer's wall time into PHASES: nominal times on the critical GPU, ``copy`` = what
    the copies added on top (waiting for them, or contention on links), and ``sync`` = the
    collective skew of the layer's collectives (taken out of dispatch, correction and combine)."""
    start, ready, disp, corr, comp, end = (marks[..., i] for i in range(6))
    pa = np.stack([w.predictor + w.attention for w in works])          # [S, L, G]
    crit = np.argmax(pa, axis=2)[..., None]
    pred = np.take_along_axis(np.stack([w.predictor for w in works]), crit, axis=2)[..., 0]
    attn = np.take_along_axis(pa, crit, axis=2)[..., 0] - pred
    d = np.stack([w.dispatch.max(axis=1) for w in works])
    x = np.stack([w.correction.max(axis=1) for w in works])
    f = np.stack([w.ffn.max(axis=1) for w in works])
    copy = (ready - start - pred - attn) + (disp - ready - d) + (corr - disp - x) + (comp - corr - f)
    copy = np.where(np.abs(copy) < 1e-12, 0.0, copy)
    skew = np.array([w.skew for w in works])[:, None]                  # [S, 1]
    x_skew = np.where(x > 0, skew, 0.0)
    phases = {"predictor": pred, "attention": attn, "copy": copy, "dispatch": d - skew, "correction": x - x_skew,
              "ffn": f, "combine": end - comp - skew, "sync": 2 * skew + x_skew}
    return end - start, phases


def default_train_steps(config: SimulateConfig, num_steps: int) -> int:
    train = config.resolved_train_steps(num_steps)
    if num_steps < 2:
        raise UserError(f"the trace has {num_steps} step; the simulator needs at least 2 (one to fit "
                        "predictors and profile, one to simulate)")
    if train >= num_steps:
        raise UserError(f"train_steps={train} leaves no step to simulate in a trace of {num_steps} steps "
                        f"(use at most {num_steps - 1})")
    return train


def resolve_config(config: SimulateConfig, train_steps: int, trace_name: str) -> SimulateConfig:
    """A copy with every default made explicit (names, planners, slots, intervals, train steps),
    so that the YAML written beside the results reruns exactly the same simulation."""
    G, E = config.cluster.num_gpus, config.model.num_experts
    strategies = []
    for s in config.strategies:
        s = dataclasses.replace(s, name=s.resolved_name(), planner=s.resolved_planner(),
                                redundant_slots=s.resolved_redundant(G, E),
                                predictor_options=dict(s.predictor_options),
                                planner_options=dict(s.planner_options))
        if s.kind != "none":
            s.replan_interval = s.resolved_replan_interval()
        strategies.append(s)
    return dataclasses.replace(config, strategies=strategies, train_steps=train_steps,
                               trace=config.trace or trace_name)


def simulate(trace: TokensTrace | CountsTrace, config: SimulateConfig, progress: bool | None = None,
             trace_name: str = "trace", strategy_factory=None) -> SimResult:
    """Simulate every strategy of ``config`` on ``trace``; deterministic for ``config.seed``.

    ``strategy_factory(cfg, num_gpus, num_experts, hw, seed) -> Strategy`` replaces
    :func:`sim.strategies.make_strategy` (e.g. to replay placements a real run chose;
    moe_gps.fidelity)."""
    from tqdm import tqdm

    cluster, model, workload = config.cluster, config.model, config.workload
    m = trace.meta
    check_model_matches_trace(model, m.num_layers, m.num_experts, m.top_k, trace_name)
    G, L, E = cluster.num_gpus, m.num_layers, m.num_experts
    tps = trace.tokens_per_step
    peak_tokens = float(workload.tokens_per_step or tps.max())
    if not config.strategies:
        raise UserError("no strategies to simulate")
    check_combination(cluster, model, workload, config.strategies, peak_tokens)
    train = default_train_steps(config, trace.num_steps)
    test_steps = np.arange(train, trace.num_steps)
    S = len(test_steps)
    hw = Hardware.from_config(cluster, model)

    config = resolve_config(config, train, trace_name)
    factory = strategy_factory or make_strategy
    strategies = [factory(cfg, G, E, hw, config.seed) for cfg in config.strategies]
    K = len(strategies)
    bar = tqdm(total=K * (1 + 2 * S), desc="simulate", unit="step", 
               disable=(not sys.stderr.isatty()) if progress is None else not progress, file=sys.stderr)
    seconds = [dict(prepare=0.0, plan=0.0, events=0.0) for _ in strategies]
    counts = as_counts_trace(trace, trace_counts(trace))
    for k, st in enumerate(strategies):
        bar.set_postfix_str(f"fit {st.name}")
        t0 = time.perf_counter()
        st.prepare(trace, train, counts)
        seconds[k]["prepare"] = time.perf_counter() - t0
        bar.update(1)

    works: list[list[StepWork]] = [[] for _ in strategies]
    previous = [None] * K
    replans = [0] * K
    tokens = np.zeros(S)
    expert_skew = np.zeros((S, L))
    base_skew = np.zeros((S, L))
    base = plan_placement(np.ones((L, E)), G, (-E) % G, "none")
    bar.set_postfix_str("plan")
    for i, s in enumerate(test_steps):
        loads = step_loads(trace, int(s), G, workload.tokens_per_step)
        tokens[i] = loads.tokens
        expert_skew[i] = _skew(loads.counts)
        base_skew[i] = _skew(base.gpu_loads(loads.counts))
        for k, st in enumerate(strategies):
            t0 = time.perf_counter()
            plan = st.plan(i, loads)
            if plan.placement is not previous[k]:
                replans[k] += 1
            # the oracle's weights are in place when it needs them (it is the bound; docs/simulator.md)
            before = None if st.cfg.kind == "oracle" else previous[k]
            works[k].append(build_step_work(plan, before, loads, model, workload, hw))
            previous[k] = plan.placement
            seconds[k]["plan"] += time.perf_counter() - t0
            bar.update(1)

    results = []
    for k, st in enumerate(strategies):
        bar.set_postfix_str(f"events {st.name}")
        t0 = time.perf_counter()
        timeline = run_events(works[k], G, st.cfg.overlap_copies, on_step=lambda _s: bar.update(1))
        seconds[k]["events"] = time.perf_counter() - t0
        layer_time, phases = _breakdown(works[k], timeline.marks)
        gpu_skew = np.stack([_skew(w.gpu_tokens) for w in works[k]])
        copy_bytes = np.stack([w.copy_bytes for w in works[k]])
        R = st.redundant
        extra = R / G * L * model.expert_bytes  # redundant slots per GPU x layers x expert bytes
        results.append(StrategyResult(st.name, st.cfg, st.info, layer_time, phases, gpu_skew, copy_bytes,
                                      extra, R, replans[k], seconds[k]))
    bar.close()
    return SimResult(config, test_steps, tokens, expert_skew, base_skew, results)
