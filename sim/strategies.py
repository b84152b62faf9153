"""Duplication strategies: each turns what it knows before a step into the placement in force.

A strategy is four choices (docs/simulator.md, "Strategies" and "How strategies re-plan and
copy"): what it predicts the step's loads from (its *kind*), the planner, the re-plan
policy (``replan_interval``, ``window``, ``min_gain``) and the copy policy (one for the
whole simulation). It is prepared once on the trace (it fits its predictor on the training
steps and rolls it out over the test steps), then asked, step by step in order, what to do
(:meth:`Strategy.step` -> :class:`StepDecision`). Kinds:

* ``none``: E/N contiguous experts per GPU, never changes;
* ``static``: planned from the true loads of the last ``window`` steps it has seen,
  re-planned every ``replan_interval`` steps (DeepSeek's EPLB, as vLLM and SGLang run it);
* ``distribution``: planned from a distribution-only predictor's shares x the step's tokens;
* ``token``: planned from the counts of a token-to-expert predictor's guesses for the
  step's own tokens, which it also routes directly; its accuracy is measured on the trace;
* ``oracle``: knows every step's routing in advance: plans from the true loads, routes
  directly at no predictor cost, re-plans only when the copies pay for themselves over the
  steps to come (it sees them), under the same copy policy: never slower than ``none``.

Between re-plans, a strategy whose planner is ``timeaware`` re-splits each step's tokens
over the replicas in place from what it predicts for that step (a routing-table change; no
weights move). A re-plan moves weights: under copy policies ``critical``, ``overlap`` and
``hidden`` the new placement serves the step it is made at; under ``async`` its copies run
in the background and it takes effect at the first step after they have landed.
"""

from __future__ import annotations

import functools
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from moe_gps.config.schema import (COPY_BANDWIDTH_SHARE, ModelConfig, ReplanPolicy, StrategyConfig,
                                    WorkloadConfig)
from moe_gps.errors import UserError
from moe_gps.placement import Placement, plan_placement
from moe_gps.predict.base import shares
from moe_gps.trace.data import CountsTrace, TokensTrace
from sim.cost import Hardware, attention_time, predictor_compute_time, predictor_time
from sim.engine import EventModel
from sim.loads import StepFeed, StepLoads, source_counts, step_loads
from sim.planning import (CopyCost, copy_cost, home_routing, phases_time, pick_layers, static_layers,
                          static_layout, time_model)
from sim.work import (Copies, StepPlan, StepWork, background_share, build_step_work, closed_form_layer_times,
                      install_time, moves_weights, placement_phases, weight_copies)


@dataclass
class SimContext:
    """What every strategy of one simulation shares: sizes, rates, the copy policy."""

    num_gpus: int
    num_experts: int
    top_k: int
    hw: Hardware
    model: ModelConfig
    workload: WorkloadConfig
    copy_policy: str = "async"
    bandwidth_share: float = COPY_BANDWIDTH_SHARE
    steps: StepFeed | None = None       # the test steps' loads, shared with the run loop (None: made here)

    @property
    def background_share(self) -> float | None:
        """:func:`sim.work.background_share` of this run's copy policy."""
        return background_share(self.copy_policy, self.bandwidth_share)


@dataclass
class StrategyInfo:
    """Facts about a strategy for the results table."""

    predictor: str = ""
    accuracy: float | None = None          # token kind: top-k recall over the simulated steps
    predictor_cost: dict[str, Any] = field(default_factory=dict)
    staged_bytes: float = 0.0              # async: the most expert bytes one GPU held in staging for a switch


@dataclass
class StepDecision:
    """What a strategy does at one step.

    plan: the placement in force (and predictor time, direct routing)
    copies: weight copies to run inside the step's layers (copy policies critical and overlap)
    background: a job of background copies to start with the step (copy policy async)
    copy_bytes: float [L] weights a re-plan made at this step copies, per layer
    replan_host: seconds of host work applying a new placement before the step's first layer
    replanned: a re-plan (that moves weights) was made at this step
    """

    plan: StepPlan
    copies: Copies | None
    background: Copies | None
    copy_bytes: np.ndarray
    replan_host: float = 0.0
    replanned: bool = False

    def work(self, loads: StepLoads, ctx: SimContext, attention: np.ndarray | None = None,
             attention_compute: np.ndarray | None = None) -> StepWork:
        """The step's phase durations under this decision (``attention``: float [G] seconds per layer, and
        ``attention_compute`` its compute part, when the caller knows better than the workload;
        :func:`sim.work.build_step_work`)."""
        return build_step_work(self.plan, self.copies, loads, ctx.model, ctx.workload, ctx.hw, self.copy_bytes,
                               self.replan_host, attention, attention_compute)


#: recent steps whose deviation from their mean a distribution-only plan is checked against
NOISE_STEPS = 8
#: at most this many (scenario x layer x GPU x expert) numbers per evaluation of a plan: on large
#: models and clusters fewer scenarios are weighed (at least 2), so that planning stays quick
SCENARIO_BUDGET = 2_000_000
#: recent steps the min_gain rule judges a re-plan on (and the plan loads and true shares kept for it)
RECENT_STEPS = 2 * NOISE_STEPS
#: steps ahead the oracle looks when it plans and when it weighs a re-plan
ORACLE_LOOKAHEAD = 16
#: future steps the oracle's planner balances over (evenly spaced within the lookahead)
ORACLE_SCENARIOS = 4
#: a token strategy re-splits at most this many steps ahead in one planner call, holding at most this many
#: bytes of their guessed assignments
RESPLIT_STEPS = 64
RESPLIT_BYTES = 32 * 2**20


class Strategy:
    """Base: the re-plan and copy policies; kinds say what they believe the loads are."""

    #: the strategy re-splits tokens over its replicas every step (with a timeaware planner)
    reshares = False
    #: tokens go straight to their (predicted) replica without a layout exchange
    direct = False

    def __init__(self, cfg: StrategyConfig, ctx: SimContext, seed: int, policy: ReplanPolicy | None = None) -> None:
        self.cfg, self.ctx, self.seed = cfg, ctx, seed
        self.name = cfg.resolved_name()
        self.num_gpus = ctx.num_gpus
        self.hw = ctx.hw
        self.redundant = cfg.resolved_redundant(ctx.num_gpus, ctx.num_experts)
        self.policy = policy or cfg.resolved_policy(1)
        self.planner = cfg.resolved_planner()
        self.reshares = self.reshares and self.planner == "timeaware"
        self.info = StrategyInfo()
        self.current: Placement | None = None         # weights in place
        self.pending: Placement | None = None         # async: waiting for its copies
        self.pending_moves = Copies.empty()            # async: the copies it waits for
        self.switch_at = 0                            # async: not before this step
        self.since = 0                                # steps since the last re-plan or check
        self.replans = 0
        self.beliefs: deque = deque(maxlen=self.policy.window)
        # load scenarios a plan is weighed on
        self.scenarios = scenario_count(ctx.model.num_layers, ctx.num_gpus, ctx.num_experts)
        self.history: deque = deque(maxlen=RECENT_STEPS)   # the plan loads of recent steps, as predicted
        self.observed: deque = deque(maxlen=RECENT_STEPS)   # true shares [L, E] of recent steps
        # facts about recent load arrays, by identity (a weak reference: a dead array's id may be reused)
        self._static_times: dict[int, tuple[weakref.ref, np.ndarray]] = {}   # id(src) -> (src, times [L])
        self._mixes: dict[int, tuple[weakref.ref, np.ndarray]] = {}          # id(src) -> (src, home_frac [G])

    # -- lifecycle
    def prepare(self, trace: TokensTrace | CountsTrace, train_steps: int, counts: CountsTrace) -> None:
        """Fit on steps < train_steps; called once before the first :meth:`step`.

        ``counts`` is the same trace as per-expert counts (computed once for all strategies).
        """
        self.trace, self.train_steps, self.counts_trace = trace, train_steps, counts
        c = counts.counts_range(train_steps - RECENT_STEPS, train_steps).astype(np.float64)
        self.observed.extend(shares(c))

    def step(self, i: int, loads: StepLoads, job_pending: bool) -> StepDecision:
        """The decision for test step ``i`` (trace step ``train_steps + i``), asked in order;
        ``job_pending``: this strategy's background copies are still in flight."""
        ctx = self.ctx
        L = loads.counts.shape[0]
        belief = self._belief(i, loads)
        self.beliefs.append(belief)
        checks = (self.current is not None and self.pending is None and self.since >= self.policy.interval
                  and self._may_replan(i))
        src = self._src(loads, belief) if checks or self.reshares else None      # what the strategy believes
        copies = background = None
        copy_bytes = np.zeros(L)
        host = 0.0
        replanned = False
        if self.current is None:                     # loaded before serving: no copies
            self.current = self._initial(i, loads)
        elif self.pending is not None:
            if not job_pending and i >= self.switch_at:      # its copies have landed: switch
                self.current, self.pending = self.pending, None
                host = install_time(self.pending_moves, self.num_gpus, self.hw)
                self.since = 0
        elif checks:
            cost = self._copy_cost(loads, src)
            cand = self._candidate(i, loads, self._copy_penalty(cost))
            if not moves_weights(self.current, cand):
                self.current = cand                  # new shares only: a routing-table change, free
            else:
                current = self.current
                moves_of = functools.cache(lambda: weight_copies(current, cand, ctx.model.expert_bytes, self.hw,
                                                                 ctx.background_share))
                if self._worth(i, loads, src, cand, moves_of, cost):
                    moves = moves_of()
                    replanned = True
                    self.replans += 1
                    copy_bytes = np.bincount(moves.layer, weights=moves.bytes, minlength=L)
                    if ctx.copy_policy == "async":
                        # the transfers run in the background; the copies between slots come with the install
                        self.pending, self.pending_moves, background = cand, moves, moves.between_gpus()
                        staged = np.bincount(background.dst, weights=background.bytes, minlength=self.num_gpus)
                        self.info.staged_bytes = max(self.info.staged_bytes, float(staged.max(initial=0.0)))
                    else:
                        copies = moves if ctx.copy_policy != "hidden" else None
                        self.current = cand
                        host = self.hw.replan_overhead
            self.since = 0
        placement = self._reshared(i, loads, src) if self.reshares else self.current
        self.since += 1
        self.history.append(self._plan_loads())
        self._observe(loads)
        plan = StepPlan(placement, self._predictor_time(loads), self._predicted_src(i, loads),
                        self._predictor_compute(loads))
        return StepDecision(plan, copies, background, copy_bytes, host, replanned)

    # -- what the kind believes
    def _belief(self, i: int, loads: StepLoads) -> np.ndarray | None:
        """float [L, E]: the loads the strategy expects at this step (None: it does not predict)."""
        return None

    def _src(self, loads: StepLoads, belief: np.ndarray | None) -> np.ndarray:
        """float [L, G, E]: the believed assignments by home GPU (each GPU's tokens with the
        believed expert mix)."""
        b = belief if belief is not None else self._plan_loads()
        return self._same_mix(b, _home_frac(loads))

    def _same_mix(self, counts: np.ndarray, home_frac: np.ndarray) -> np.ndarray:
        """float [(K,) L, G, E]: ``counts`` [(K,) L, E] spread over the GPUs by ``home_frac`` [G] (the
        same expert mix on every GPU), remembered as such so that its traffic is computed as an
        outer product (:func:`sim.work.route`)."""
        return self._remember_mix(counts[..., None, :] * home_frac[:, None], home_frac)

    def _remember_mix(self, src: np.ndarray, home_frac: np.ndarray | None) -> np.ndarray:
        """``src``, noted as made of one expert mix spread by ``home_frac`` (None: nothing noted)."""
        if home_frac is not None:
            _note(self._mixes, src, home_frac)
        return src

    def _mix(self, src: np.ndarray) -> np.ndarray | None:
        """The home_frac [G] ``src`` was made with by :meth:`_same_mix` (None: any other array)."""
        return _noted(self._mixes, src)

    def _plan_loads(self) -> np.ndarray:
        """float [L, E]: the loads a (re-)plan is made from: the mean of the last ``window`` beliefs."""
        return np.mean(np.stack(list(self.beliefs)), axis=0)

    def _scenarios(self, loads: StepLoads, plan_loads: np.ndarray) -> np.ndarray:
        """float [L, G, E] (or [K, L, G, E]: K scenarios) that a plan for ``plan_loads`` is judged on."""
        return self._same_mix(plan_loads, _home_frac(loads))

    def _observe(self, loads: StepLoads) -> None:
        """The step's true routing, known once it has run."""
        self.observed.append(shares(loads.counts))

    def _predictor_time(self, loads: StepLoads) -> np.ndarray:
        return np.zeros(self.num_gpus)

    def _predictor_compute(self, loads: StepLoads) -> np.ndarray:
        """float [G]: the compute part of :meth:`_predictor_time` (for a predictor run beside the
        attention, :func:`sim.cost.beside_attention`)."""
        return np.zeros(self.num_gpus)

    def _predicted_src(self, i: int, loads: StepLoads) -> np.ndarray | None:
        return None

    # -- planning
    def _initial(self, i: int, loads: StepLoads) -> Placement:
        """The placement loaded before serving (no copies), planned from the profile a deployment
        has then: the true loads of the last ``window`` steps before the first served one."""
        profile = self._profiled(loads)
        return self._plan(profile, self._scenarios(loads, profile), None, 0.0)

    def _profiled(self, loads: StepLoads) -> np.ndarray:
        """float [L, E]: the expert shares of the last ``window`` steps before serving (their counts
        summed, so a bigger step weighs more, as in EPLB), x the step's (token, expert) assignments."""
        c = self.counts_trace.counts_range(self.train_steps - self.policy.window, self.train_steps)
        return shares(c.sum(axis=0)) * (loads.tokens * self.ctx.top_k)

    def _candidate(self, i: int, loads: StepLoads, copy_penalty_s: float) -> Placement:
        """A re-plan from the current placement (``copy_penalty_s``: timeaware's charge per copy)."""
        plan_loads = self._plan_loads()
        return self._plan(plan_loads, self._scenarios(loads, plan_loads), self.current, copy_penalty_s)

    def _plan(self, plan_loads: np.ndarray, src: np.ndarray, previous: Placement | None,
              copy_penalty_s: float, balanced: bool = True) -> Placement:
        """A placement for ``plan_loads``; the timeaware planner judges it on ``src`` [(K,) L, G, E]
        (``balanced`` False: it keeps every layer in the static layout)."""
        opts = dict(self.cfg.planner_options)
        if self.planner != "timeaware":
            return plan_placement(plan_loads, self.num_gpus, self.redundant, self.planner, previous=previous, **opts)
        ctx = self.ctx
        S = (ctx.num_experts + self.redundant) // self.num_gpus
        opts.setdefault("copy_penalty_s", copy_penalty_s)
        if not balanced:
            opts["balanced"] = False
        p = plan_placement(plan_loads, self.num_gpus, self.redundant, "timeaware", previous=previous,
                           cost=time_model(src, S, ctx.model, self.hw, self.direct, plan_loads, self._mix(src)),
                           **opts)
        return self._no_worse_than_home(p, src)

    def _reshare(self, p: Placement, belief: np.ndarray, src: np.ndarray) -> Placement:
        """``p``'s replicas with the tokens of ``belief`` re-split by the timeaware planner (no weights
        move; layers out of the static layout stay as they are)."""
        return self._reshare_timed(p, belief, src)[0]

    def _reshare_timed(self, p: Placement, belief: np.ndarray, src: np.ndarray) -> tuple[Placement, np.ndarray]:
        """:meth:`_reshare` and the placement's exact layer times on ``src`` (float [L])."""
        if not static_layers(p).any():
            return self._home_checked(p, src)        # nothing to re-split: no layer keeps the static layout
        ctx = self.ctx
        opts = {k: v for k, v in self.cfg.planner_options.items() if k != "copy_penalty_s"}
        q = plan_placement(belief, self.num_gpus, self.redundant, "timeaware", previous=p,
                           cost=time_model(src, p.slots_per_gpu, ctx.model, self.hw, self.direct, belief,
                                           self._mix(src)),
                           copy_penalty_s=np.inf, **opts)
        return self._home_checked(q, src)

    def _reshared(self, i: int, loads: StepLoads, src: np.ndarray) -> Placement:
        """The placement in force at step ``i``, re-split to what the step is believed to route."""
        return self._reshare(self.current, self.beliefs[-1], src)

    def _no_worse_than_home(self, p: Placement, src: np.ndarray) -> Placement:
        """Per layer in the static layout, the better (exact closed form on ``src``) of ``p`` and its
        home routing (no duplication's)."""
        return self._home_checked(p, src)[0]

    def _home_checked(self, p: Placement, src: np.ndarray) -> tuple[Placement, np.ndarray]:
        """:meth:`_no_worse_than_home` and its exact layer times on ``src`` (float [L])."""
        t_p = phases_time(p, src, self.ctx.model, self.hw, self.direct, self._mix(src))
        at_home = static_layers(p)
        if not at_home.any():
            return p, t_p
        # a layer at home routed as no duplication takes the static layout's time, whatever its replicas hold
        t_h = self._static_time(p.slots_per_gpu, src)
        worse = at_home & (t_p > t_h)
        return (pick_layers(p, home_routing(p), worse), np.where(worse, t_h, t_p)) if worse.any() else (p, t_p)

    def _static_time(self, slots_per_gpu: int, src: np.ndarray) -> np.ndarray:
        """float [L]: the exact layer times on ``src`` of the static layout (no duplication's routing),
        kept for the last few ``src`` arrays (a step's loads are judged many times)."""
        t = _noted(self._static_times, src)
        if t is None:
            ctx = self.ctx
            t = phases_time(static_layout(src.shape[-3], ctx.num_experts, self.num_gpus, slots_per_gpu),
                            src, ctx.model, self.hw, self.direct, self._mix(src))
            _note(self._static_times, src, t)
        return t

    # -- re-plan policy
    def _may_replan(self, i: int) -> bool:
        return True

    def _copy_cost(self, loads: StepLoads, src: np.ndarray) -> CopyCost:
        ctx = self.ctx
        keep = self._reshare(self.current, self.beliefs[-1], src) if self.reshares else self.current
        ph = placement_phases(keep, src, src if self.direct else None, ctx.model, self.hw, self._mix(src))
        return copy_cost(ctx.copy_policy, ctx.bandwidth_share, ph, loads.home_tokens, self._predictor_time(loads),
                         ctx.model, ctx.workload, self.hw, self._predictor_compute(loads))

    def _copy_penalty(self, cost: CopyCost) -> float:
        """Seconds a plan is charged per expert it copies: one copy's predicted cost spread over the
        steps until the next check."""
        return cost.per_expert(self.ctx.model.expert_bytes) / self.policy.interval

    def _worth(self, i: int, loads: StepLoads, src: np.ndarray, cand: Placement, moves_of: Callable[[], Copies],
               cost: CopyCost) -> bool:
        """The ``min_gain`` rule: the saving predicted over the next ``interval`` steps exceeds
        min_gain x the predicted cost of the copies and of applying the placement (``moves_of()``: the
        copies, worked out only when the saving is worth pricing).

        The saving per step is measured out of sample on the steps since the last check (h of them,
        at most twice the strategy's scenarios): a plan made, the same way, from what the strategy predicted for the
        first half of them, against the placement in force, on the true loads of the second half. (A
        plan judged on the steps it was made from looks better than it will be.) The saving must
        also be there beyond its own noise: its mean above 2 standard errors.
        """
        if self.policy.min_gain == 0:
            return True
        ctx = self.ctx
        fit, seen = gain_samples(self.history, self.observed, self.policy.interval, self.scenarios,
                                 self._plan_loads().sum(axis=1))
        earlier = cand if fit is None else self._plan(fit, self._scenarios(loads, fit), self.current,
                                                       self._copy_penalty(cost))
        per_step = saving_per_step(self.current, earlier, seen, _home_frac(loads), ctx.model, self.hw, self.direct)
        if not passes_min_gain(per_step, self.policy.interval, self.policy.min_gain, 0.0):
            return False                             # no saving (or only noise): no price can pass
        price = cost.replan(moves_of())
        return passes_min_gain(per_step, self.policy.interval, self.policy.min_gain, price)

    def _charge(self, cost: Any, loads: StepLoads) -> np.ndarray:
        """Per-GPU seconds of a PredictorCost over each GPU's own tokens (one layer)."""
        return predictor_time(loads.home_tokens, cost, self.hw)


def scenario_count(num_layers: int, num_gpus: int, num_experts: int) -> int:
    """How many recent steps' load scenarios a plan is weighed on: NOISE_STEPS, fewer where a scenario
    ([layers, GPUs, experts] floats) is large, at least 2."""
    return max(2, min(NOISE_STEPS, SCENARIO_BUDGET // (num_layers * num_gpus * num_experts)))


def gain_samples(history, observed, interval: int, scenarios: int,
                 tokens: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """The ``min_gain`` rule's steps: the last ``h`` recent steps (at most ``interval``, the steps known,
    and twice the scenarios), of which the last ``late`` (half, at least 1) judge a plan made from the
    others.

    history: the plan loads [L, E] of recent steps, as believed; observed: their true shares [L, E];
    tokens: float [L] (token, expert) assignments per layer the shares are scaled to
    -> (float [L, E] the mean plan loads to make the out-of-sample plan from, None with fewer than 2
    steps; float [late, L, E] the true loads it is judged on)."""
    h = min(interval, len(observed), len(history), 2 * scenarios)
    late = max(1, h // 2)
    fit = list(history)[-h:-late] if h >= 2 else []
    seen = np.stack(list(observed)[-late:]) * tokens[None, :, None]
    return (np.mean(fit, axis=0) if fit else None), seen


def saving_per_step(current: Placement, planned: Placement, seen: np.ndarray, home_frac: np.ndarray,
                    model: ModelConfig, hw: Hardware, direct: bool) -> np.ndarray:
    """float [K]: seconds per step (all layers) that ``planned`` saves over ``current`` on each of the
    true loads ``seen`` [K, L, E], every GPU's tokens with the same expert mix (``home_frac`` [G])."""
    src = seen[:, :, None, :] * home_frac[None, None, :, None]
    return np.array([phases_time(current, x, model, hw, direct, home_frac).sum()
                     - phases_time(planned, x, model, hw, direct, home_frac).sum() for x in src])


def passes_min_gain(per_step: np.ndarray, interval: int, min_gain: float, price: float) -> bool:
    """The ``min_gain`` rule on the savings ``per_step`` [K] measured out of sample: their mean over the
    next ``interval`` steps exceeds ``min_gain`` x ``price`` (seconds the copies and applying cost), and
    their mean is above 2 standard errors (with 2 or more of them)."""
    late = len(per_step)
    saving = float(per_step.mean()) * interval
    sure = late < 2 or per_step.mean() > 2 * per_step.std(ddof=1) / np.sqrt(late)
    return bool(sure and saving > 0 and saving > min_gain * price)


def _note(facts: dict, array: np.ndarray, value: np.ndarray, keep: int = 64) -> None:
    """Remember ``value`` for ``array`` (by identity, without keeping it alive); the last ``keep``."""
    if len(facts) >= keep:
        facts.pop(next(iter(facts)))
    facts[id(array)] = (weakref.ref(array), value)


def _noted(facts: dict, array: np.ndarray) -> np.ndarray | None:
    """What :func:`_note` remembered for ``array`` (None: nothing, or another array that had its id)."""
    hit = facts.get(id(array))
    return hit[1] if hit is not None and hit[0]() is array else None


def _home_frac(loads: StepLoads) -> np.ndarray:
    """float [G]: the share of the step's tokens that start on each GPU."""
    return loads.home_tokens / max(float(loads.home_tokens.sum()), 1e-300)


class NoDuplication(Strategy):
    def _plan_loads(self) -> np.ndarray:
        return np.ones((self.ctx.model.num_layers, self.ctx.num_experts))

    def _plan(self, plan_loads, src, previous, copy_penalty_s) -> Placement:
        return plan_placement(plan_loads, self.num_gpus, self.redundant, "none")

    def _may_replan(self, i: int) -> bool:
        return False


class StaticPlan(Strategy):
    """EPLB-style: plan from the true loads of the last ``window`` steps, re-plan every ``interval``."""

    def prepare(self, trace, train_steps, counts) -> None:
        super().prepare(trace, train_steps, counts)
        self._window = (0, 0)                         # steps [start, end) summed in _sum
        self._sum = np.zeros((counts.meta.num_layers, counts.meta.num_experts))

    def _belief(self, i: int, loads: StepLoads) -> None:
        self.i = i
        return None

    def _plan_loads(self) -> np.ndarray:
        """The mean true loads of the ``window`` steps before the current one (a running sum: counts
        are integers, so it is exact)."""
        end = self.train_steps + self.i          # steps before the current one are known
        start = max(0, end - self.policy.window)
        s0, e0 = self._window
        steps = self.counts_trace.counts_range
        if start >= e0 or start < s0 or end < e0:
            self._sum = steps(start, end).sum(axis=0, dtype=np.float64)
        else:
            self._sum += steps(e0, end).sum(axis=0, dtype=np.float64)
            self._sum -= steps(s0, start).sum(axis=0, dtype=np.float64)
        self._window = (start, end)
        return self._sum / max(end - start, 1)


class OraclePlan(Strategy):
    """Knows every step's routing in advance (docs/simulator.md, "The oracle").

    Every step it re-splits the true tokens over its replicas, never worse than no duplication's
    routing in a layer that keeps the static layout. It plans from the true loads of the steps
    ahead, and keeps a layer of another layout (EPLB's) only where that is faster than the
    static layout over those steps. At a check it re-plans only if the time saved over the steps
    ahead, on their true loads, exceeds what the copies cost: exactly, for copies inside the step
    (policies critical and overlap), or a bound on what background copies slow down until they
    land (async). So every decision it makes lowers its total time: it is never slower than no
    duplication (over traces up to ORACLE_LOOKAHEAD steps past each decision).
    """

    reshares = True
    direct = True

    def prepare(self, trace, train_steps, counts) -> None:
        super().prepare(trace, train_steps, counts)
        self._loads: dict[int, StepLoads] = {}
        # (id of a placement, step) -> (that placement, kept alive so that its id is not reused; as run)
        self._memo: dict[tuple[int, int], tuple[Placement, Placement, np.ndarray]] = {}

    def _belief(self, i: int, loads: StepLoads) -> np.ndarray:
        self.i = i
        self._loads = {k: v for k, v in self._loads.items() if k >= i}
        # a serving iteration (loads.rows) is not the whole trace step: what was worked out for step i is not its
        keep = (lambda k: k[1] > i) if loads.rows is not None else (lambda k: k[1] >= i)
        self._memo = {k: v for k, v in self._memo.items() if keep(k)}
        self._loads[i] = loads
        self._remember_mix(loads.src_counts, loads.home_frac)         # a counts trace's steps are one mix
        return loads.counts

    def _src(self, loads, belief) -> np.ndarray:
        return loads.src_counts

    def _predicted_src(self, i: int, loads: StepLoads) -> np.ndarray | None:
        return loads.src_counts

    def _future(self, j: int) -> StepLoads | None:
        """The true loads of test step ``j`` (None past the end of the trace)."""
        s = self.train_steps + j
        if s >= self.trace.num_steps:
            return None
        if j not in self._loads:
            feed = self.ctx.steps
            self._loads[j] = (feed.ahead(j) if feed is not None
                              else step_loads(self.trace, s, self.num_gpus, self.ctx.workload.tokens_per_step))
        return self._loads[j]

    def _src_of(self, fut: StepLoads) -> np.ndarray:
        """float [L, G, E]: the assignments of a step ahead, noted as one expert mix where they are one
        (a counts trace's: made again after :meth:`StepLoads.release`)."""
        return self._remember_mix(fut.src_counts, fut.home_frac)

    def _ahead(self, first: int) -> list[int]:
        """Test steps from ``first`` to the end of the lookahead that the trace has."""
        return [j for j in range(first, first + ORACLE_LOOKAHEAD) if self._future(j) is not None]

    def _at(self, p: Placement, j: int) -> Placement:
        """``p`` as the oracle runs it at step ``j``: re-split to the step's true tokens (memoized)."""
        return self._run_at(p, j)[0]

    def _run_at(self, p: Placement, j: int) -> tuple[Placement, np.ndarray]:
        """:meth:`_at` and its placement-decided layer times at step ``j`` (float [L])."""
        key = (id(p), j)
        if key not in self._memo:
            fut = self._future(j)
            self._memo[key] = (p, *self._reshare_timed(p, fut.counts, self._src_of(fut)))
        return self._memo[key][1:]

    def _step_time(self, p: Placement) -> float:
        """The placement-decided time of the current step under ``p``, as the oracle runs it."""
        return float(self._run_at(p, self.i)[1].sum())

    def _layer_totals(self, p: Placement, steps: list[int]) -> np.ndarray:
        """float [L]: the placement-decided time of every layer summed over ``steps``, as run."""
        return sum(self._run_at(p, j)[1] for j in steps)

    def _reshared(self, i: int, loads: StepLoads, src: np.ndarray) -> Placement:
        return self._at(self.current, i)

    def _plan_from_ahead(self, first: int, previous: Placement | None, copy_penalty_s: float) -> Placement:
        """Planned from the mean true loads of the steps ahead, judged on up to ORACLE_SCENARIOS of
        them; a layer out of the static layout is kept only where it is faster over all of them."""
        steps = self._ahead(first)
        plan_loads = np.mean([self._future(j).counts for j in steps], axis=0)
        k = min(ORACLE_SCENARIOS, self.scenarios, len(steps))
        pick = np.unique(np.linspace(0, len(steps) - 1, k).round().astype(int))
        scen = np.stack([self._src_of(self._future(steps[k])) for k in pick])
        p = self._plan(plan_loads, scen, previous, copy_penalty_s)
        at_home = static_layers(p)
        if at_home.all():
            return p
        home = self._plan(plan_loads, scen, previous, copy_penalty_s, balanced=False)
        slower = self._layer_totals(p, steps) > self._layer_totals(home, steps)
        mask = slower & ~at_home
        if not mask.any():
            return p
        picked = pick_layers(p, home, mask)
        for j in steps:      # layers are re-split on their own: the picked plan as run is the same pick
            (a, ta), (b, tb) = self._run_at(p, j), self._run_at(home, j)
            self._memo[(id(picked), j)] = (picked, pick_layers(a, b, mask), np.where(mask, tb, ta))
        return picked

    def _initial(self, i: int, loads: StepLoads) -> Placement:
        return self._plan_from_ahead(i, None, 0.0)

    def _candidate(self, i: int, loads: StepLoads, copy_penalty_s: float) -> Placement:
        if self.ctx.copy_policy != "hidden":
            return self._plan_from_ahead(i, self.current, copy_penalty_s)
        # free copies: the better of keeping and the plan for this step alone serves this step (no copy
        # cost to pay back later, so a choice per step never loses to none)
        step = self._plan(loads.counts, loads.src_counts, self.current, 0.0)
        return min((self.current, step), key=self._step_time)

    def _worth(self, i, loads, src, cand, moves_of, cost) -> bool:
        ctx = self.ctx
        if ctx.copy_policy == "hidden":
            return self._step_time(cand) < self._step_time(self.current)
        moves = moves_of()
        if ctx.copy_policy == "async":
            # a bound on the job's length (its transfers one after another), the steps it spans (they
            # can only be longer than without copies), and what it slows down meanwhile
            length = float(moves.between_gpus().seconds.sum())
            price, elapsed, j = install_time(moves, self.num_gpus, self.hw), 0.0, i
            stretch = ctx.bandwidth_share / (1 - ctx.bandwidth_share)
            while elapsed < length:
                fut = self._future(j)
                if fut is None:
                    return False                     # would land after the end of the trace
                keep = self._at(self.current, j)
                assigned = self._src_of(fut)
                ph = placement_phases(keep, assigned, assigned, ctx.model, self.hw, fut.home_frac)
                attn = attention_time(fut.home_tokens, ctx.model, ctx.workload, self.hw).max(initial=0.0)
                elapsed += float(ph.layer_time().sum() + attn * len(ph.ffn))
                price += float((ph.dispatch_link + ph.combine_link).max(axis=1).sum()) * stretch
                if j >= i + ORACLE_LOOKAHEAD:
                    fut.release()                    # far ahead: made again if walked to again
                j += 1
            first = j                                # landed by then: it serves from this step on
        else:
            price = self.hw.replan_overhead + self._copy_delay(loads, cand, moves)
            first = i
        steps = self._ahead(first)
        if not steps:
            return False
        saving = float((self._layer_totals(self.current, steps) - self._layer_totals(cand, steps)).sum())
        if saving > 0 and saving > self.policy.min_gain * price:
            self.switch_at = first
            return True
        return False

    def _copy_delay(self, loads: StepLoads, cand: Placement, moves: Copies) -> float:
        """Exactly what this step's copies add to it: the event model with and without them."""
        ctx = self.ctx
        plan = StepPlan(self._at(cand, self.i), np.zeros(self.num_gpus), loads.src_counts)
        with_copies = build_step_work(plan, moves, loads, ctx.model, ctx.workload, self.hw)
        marks = EventModel(self.num_gpus, ctx.copy_policy, ctx.bandwidth_share).run_step(with_copies)
        without = build_step_work(plan, None, loads, ctx.model, ctx.workload, self.hw)
        return float(marks[-1, -1] - marks[0, 0] - closed_form_layer_times(without, ctx.copy_policy).sum())


class DistributionPlan(Strategy):
    """Plans at each check from a distribution-only predictor's shares x the step's tokens, judged
    against the recent steps' deviations from their mean (the plan must hold up until the next
    check, whatever sampling noise the steps bring)."""

    def prepare(self, trace, train_steps, counts) -> None:
        from moe_gps.predict import iter_rollout_distribution, make_distribution_predictor
        super().prepare(trace, train_steps, counts)
        self.predictor = _make(make_distribution_predictor, self.cfg, self.seed, self.ctx)
        source = trace if getattr(self.predictor, "needs_tokens", False) else counts
        self._rollout = lambda: iter_rollout_distribution(self.predictor, source, train_steps)
        self._restart()
        self.cost = self.predictor.cost()
        self.info.predictor = self.predictor.describe()
        self.info.predictor_cost = self.cost.to_dict()

    def _restart(self) -> None:
        """Fit the predictor and roll out its first chunk of test steps."""
        self._chunks = self._rollout()
        self._chunk = next(self._chunks)             # float [<= chunk, L, E]: the predicted shares
        self._chunk_first = 0                        # of test steps chunk_first, ...

    def _shares(self, i: int) -> np.ndarray:
        """float [L, E]: the predicted shares of test step ``i``, rolled out a chunk at a time as the
        steps are asked for in order (asked again from an earlier step, as serving's passes over
        the trace do, the rollout starts again: the same predictions)."""
        if i < self._chunk_first:
            self._restart()
        while i >= self._chunk_first + len(self._chunk):
            self._chunk_first += len(self._chunk)
            self._chunk = next(self._chunks)
        return self._chunk[i - self._chunk_first]

    def _belief(self, i: int, loads: StepLoads) -> np.ndarray:
        # the predicted shares of each layer x the step's (token, expert) assignments
        return self._shares(i) * (loads.tokens * self.ctx.top_k)

    def _scenarios(self, loads: StepLoads, plan_loads: np.ndarray) -> np.ndarray:
        """The plan's loads shifted by each recent step's deviation from the recent mean (>= 0)."""
        recent = np.stack(list(self.observed)[-self.scenarios:])                # [K, L, E] shares
        dev = (recent - recent.mean(axis=0)) * plan_loads.sum(axis=1)[None, :, None]
        scen = np.maximum(plan_loads[None] + dev, 0.0)
        return self._same_mix(scen, _home_frac(loads))

    def _predictor_time(self, loads: StepLoads) -> np.ndarray:
        if self.hw.predictor_overlap:
            return np.zeros(self.num_gpus)     # on the host, between steps: no GPU time
        return self._charge(self.cost, loads)


class TokenPlan(Strategy):
    """Guesses every token's experts: plans at checks from the counts of the guesses, re-splits
    each step's tokens over its replicas from that step's guesses, and (with ``direct_routing``)
    sends correctly predicted tokens straight to their replicas."""

    reshares = True

    def __init__(self, cfg, ctx, seed, policy=None) -> None:
        super().__init__(cfg, ctx, seed, policy)
        self.direct = cfg.direct_routing

    def prepare(self, trace, train_steps, counts) -> None:
        from moe_gps.predict import make_token_predictor, rollout_tokens
        if not isinstance(trace, TokensTrace):
            raise UserError(f"strategy {self.name}: token-to-expert prediction needs a tokens trace "
                            "(per-token routing); this trace has counts only")
        super().prepare(trace, train_steps, counts)
        self.predictor = _make(make_token_predictor, self.cfg, self.seed, self.ctx)
        self.guess = rollout_tokens(self.predictor, trace, train_steps)     # int16 [N_test, L, k]
        self.offset0 = int(trace.step_offsets[train_steps])
        self.cost = self.predictor.cost()
        self.info.predictor = self.predictor.describe()
        self.info.predictor_cost = self.cost.to_dict()
        self._hits = 0.0
        self._total = 0.0
        self._resplits: tuple[Placement, dict[int, Placement]] | None = None    # (placement in force, step -> re-split)
        self._ahead_src: dict[int, tuple[StepLoads, np.ndarray]] = {}   # step -> (loads, guessed src) re-split ahead

    def _reshared(self, i: int, loads: StepLoads, src: np.ndarray) -> Placement:
        """The re-splits of the steps up to the next re-plan check are worked out together, at the first of
        them: the placement in force holds until then, and every step's guesses are known (rolled out in
        :meth:`prepare`), so they are one planner call over the steps' layers stacked (the planner treats
        layers one by one: the same placements as one call per step, in fewer, larger array operations)."""
        held = self._resplits
        if held is None or held[0] is not self.current or i not in held[1]:
            held = self._resplits = (self.current, self._resplit_ahead(i, src))
        return held[1].pop(i)

    def _resplit_ahead(self, i: int, src: np.ndarray) -> dict[int, Placement]:
        """Test step -> the current placement re-split to its guesses, for step ``i`` (whose guessed
        assignments are ``src``) and the steps after it before the next check (at most RESPLIT_STEPS, and
        RESPLIT_BYTES of assignments)."""
        n = max(1, min(RESPLIT_STEPS, RESPLIT_BYTES // max(src.nbytes, 1), self.policy.interval - self.since))
        feed = self.ctx.steps
        srcs = [src]
        for j in range(i + 1, i + n):
            fut = feed.ahead(j) if feed is not None else None
            if fut is None:
                break
            srcs.append(self._guessed_src(fut, self._guesses(fut)))
            self._ahead_src[j] = (fut, srcs[-1])                       # its belief when it is served
        if len(srcs) == 1:
            return {i: self._reshare(self.current, self.beliefs[-1], src)}
        L, n = src.shape[0], len(srcs)
        every = np.concatenate(srcs)                                         # [n L, G, E]
        q = self._reshare(self.current.take_layers(np.tile(np.arange(L), n)), every.sum(axis=1), every)
        return {i + b: q.take_layers(np.arange(b * L, (b + 1) * L)) for b in range(n)}

    def _guessed_src(self, loads: StepLoads, guess: np.ndarray) -> np.ndarray:
        """float [L, G, E]: the step's guessed (token, expert) assignments by home GPU."""
        return source_counts(guess, loads.home, self.num_gpus, loads.src_counts.shape[2]) * loads.scale

    def _guesses(self, loads: StepLoads) -> np.ndarray:
        """int16 [T, L, k]: the predictor's guesses for the step's tokens."""
        if loads.rows is not None:
            return self.guess[loads.rows - self.offset0]
        lo = int(self.trace.step_offsets[loads.step]) - self.offset0
        hi = int(self.trace.step_offsets[loads.step + 1]) - self.offset0
        return self.guess[lo:hi]

    def _step_guess(self, loads: StepLoads) -> tuple[np.ndarray, np.ndarray]:
        """(the guesses int16 [T, L, k], bool [T, L, k]: the true expert is among them), compared slot by
        slot ([k, T, L] in memory, so that every comparison runs along whole rows)."""
        guess = self._guesses(loads)
        true = np.ascontiguousarray(loads.experts.transpose(2, 0, 1))     # [k, T, L]
        by_slot = np.ascontiguousarray(guess.transpose(2, 0, 1))
        hit = true == by_slot[0]
        for j in range(1, len(by_slot)):
            hit |= true == by_slot[j]
        return guess, hit.transpose(1, 2, 0)

    def _belief(self, i: int, loads: StepLoads) -> np.ndarray:
        self._cur = self._step_guess(loads)
        guess, hit = self._cur
        self._hits += float(np.count_nonzero(hit))
        self._total += float(hit.size)
        self.info.accuracy = self._hits / self._total if self._total else None
        held = self._ahead_src.pop(i, None)
        for j in [j for j in self._ahead_src if j < i]:
            del self._ahead_src[j]
        self._guess_src = held[1] if held is not None and held[0] is loads else self._guessed_src(loads, guess)
        return self._guess_src.sum(axis=1)

    def _src(self, loads, belief) -> np.ndarray:
        return self._guess_src

    def _predictor_time(self, loads: StepLoads) -> np.ndarray:
        return self._charge(self.cost, loads)

    def _predictor_compute(self, loads: StepLoads) -> np.ndarray:
        return predictor_compute_time(loads.home_tokens, self.cost, self.hw)

    def _predicted_src(self, i: int, loads: StepLoads) -> np.ndarray | None:
        if not self.cfg.direct_routing:
            return None
        G, E = self.num_gpus, loads.src_counts.shape[2]
        return source_counts(loads.experts, loads.home, G, E, mask=self._cur[1]) * loads.scale


def _make(factory, cfg: StrategyConfig, seed: int, ctx: SimContext):
    """The strategy's predictor. A ``cost`` option names a preset (moe_gps.predict.costs) that becomes
    the predictor's ``overhead``, sized to the simulated model and workload."""
    import inspect

    from moe_gps.predict import DISTRIBUTION_PREDICTORS, TOKEN_PREDICTORS
    from moe_gps.predict.costs import cost_preset
    table = DISTRIBUTION_PREDICTORS if cfg.kind == "distribution" else TOKEN_PREDICTORS
    opts = dict(cfg.predictor_options)
    cls = table.get(cfg.predictor)
    if cls is not None and "seed" in inspect.signature(cls.__init__).parameters:
        opts.setdefault("seed", seed)
    if "cost" in opts:
        m, w = ctx.model, ctx.workload
        if "overhead" in opts:
            raise UserError(f"strategy {cfg.resolved_name()}: give cost (a preset) or overhead, not both")
        serial = w.seq_len if w.phase == "prefill" else 1
        opts["overhead"] = cost_preset(str(opts.pop("cost")), m.hidden_size, m.num_experts, serial, ctx.hw.overhead,
                                       m.weight_bytes, m.activation_bytes)
    return factory(cfg.predictor, **opts)


KINDS = {"none": NoDuplication, "static": StaticPlan, "distribution": DistributionPlan, "token": TokenPlan,
         "oracle": OraclePlan}


def make_strategy(cfg: StrategyConfig, ctx: SimContext, seed: int, policy: ReplanPolicy | None = None) -> Strategy:
    return KINDS[cfg.kind](cfg, ctx, seed, policy)


#: predictors left out of the default strategy set, and why
SLOW_BY_DEFAULT = {"mlp": "it trains a torch model, several seconds on CPU, and needs torch"}


def default_strategy_names(trace: TokensTrace | CountsTrace) -> tuple[list[str], list[str]]:
    """Every strategy that can run on ``trace``: none, eplb, dist:<each distribution predictor>,
    token:<each token predictor>, oracle (predictors named "oracle", "synthetic" and "curve" are
    left out: the oracle strategy is the bound, and the what-ifs need parameters).

    -> (names, notes saying what was left out and why)
    """
    from moe_gps.predict import DEFAULT_DISTRIBUTION, DEFAULT_TOKEN, DISTRIBUTION_PREDICTORS, TOKEN_PREDICTORS

    tokens = isinstance(trace, TokensTrace)
    names, notes = ["none", "eplb"], []
    for n in DEFAULT_DISTRIBUTION:
        if n == "oracle":
            continue
        if getattr(DISTRIBUTION_PREDICTORS[n], "needs_tokens", False) and not (tokens and trace.token_id is not None):
            notes.append(f"dist:{n} left out: it needs the trace's token_id column")
            continue
        names.append(f"dist:{n}")
    for n in DEFAULT_TOKEN:
        if n == "oracle":
            continue
        if not tokens:
            notes.append(f"token:{n} left out: a counts trace has no per-token routing")
            continue
        missing = [f for f in getattr(TOKEN_PREDICTORS[n], "needs", ()) if getattr(trace, f) is None]
        if missing:
            notes.append(f"token:{n} left out: it needs the trace's {', '.join(missing)} column")
            continue
        if n in SLOW_BY_DEFAULT:
            notes.append(f"token:{n} left out of the default set ({SLOW_BY_DEFAULT[n]}); name it among the "
                         f"strategies to run it (simulate's --strategies, a sweep file's strategies)")
            continue
        names.append(f"token:{n}")
    names.append("oracle")
    return names, notes


def expand_strategies(names: list[str], trace) -> tuple[list[str], list[str]]:
    """Strategy names in order, without repeats, with 'all' expanded by
    :func:`default_strategy_names` -> (names, notes for the user)."""
    out, notes = [], []
    for n in names:
        if n == "all":
            defaults, notes = default_strategy_names(trace)
            out += [d for d in defaults if d not in out]
        elif n not in out:
            out.append(n)
    return out, notes
