"""Duplication strategies: each turns what it knows before a step into a placement.

A strategy is prepared once on the trace (it fits its predictor on the training steps
and rolls it out over the test steps), then asked, step by step in order, for a
:class:`StepPlan`: the placement in force for the step, the predictor's time per GPU,
and, for token-to-expert prediction, which (token, expert) assignments were predicted.
Kinds (docs/simulator.md, "Strategies"):

* ``none``: E/N contiguous experts per GPU, never changes;
* ``static``: planned from the training steps' loads (the profiling window), re-planned
  every K steps from the loads of the last ``train_steps`` steps it has seen;
* ``distribution``: planned from a distribution-only predictor's shares x the step's tokens;
* ``token``: planned from the counts of a token-to-expert predictor's guesses for the
  step's own tokens; its accuracy is measured against the trace;
* ``oracle``: planned from the step's true loads, at no predictor cost and no copy cost:
  the bound on what duplication with this slot budget and planner can gain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moe_gps.config.schema import StrategyConfig
from moe_gps.errors import UserError
from moe_gps.placement import Placement, plan_placement
from moe_gps.trace.data import CountsTrace, TokensTrace
from sim.cost import Hardware, predictor_time
from sim.loads import StepLoads, source_counts


@dataclass
class StepPlan:
    """What a strategy decided for one step.

    placement:      the placement in force during the step
    predictor_s:    float [G] seconds of predictor work per layer on each GPU
    predicted_src:  float [L, G, E] correctly predicted assignments by home GPU (token kind
                    with direct routing), or None
    """

    placement: Placement
    predictor_s: np.ndarray
    predicted_src: np.ndarray | None = None


@dataclass
class StrategyInfo:
    """Facts about a strategy for the results table."""

    predictor: str = ""
    accuracy: float | None = None          # token kind: top-k recall over the simulated steps
    predictor_cost: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Strategy:
    """Base: a placement every ``replan_interval`` steps from :meth:`_loads_for_plan`."""

    def __init__(self, cfg: StrategyConfig, num_gpus: int, num_experts: int, hw: Hardware, seed: int) -> None:
        self.cfg = cfg
        self.name = cfg.resolved_name()
        self.num_gpus = num_gpus
        self.hw = hw
        self.seed = seed
        self.redundant = cfg.resolved_redundant(num_gpus, num_experts)
        self.interval = cfg.resolved_replan_interval() if cfg.kind != "none" else 0
        self.info = StrategyInfo()
        self._placement: Placement | None = None
        self._since_plan = 0

    # -- lifecycle
    def prepare(self, trace: TokensTrace | CountsTrace, train_steps: int, counts: CountsTrace) -> None:
        """Fit on steps < train_steps; called once before the first :meth:`plan`.

        ``counts`` is the same trace as per-expert counts (computed once for all strategies).
        """
        self.trace, self.train_steps, self.counts_trace = trace, train_steps, counts

    def plan(self, i: int, loads: StepLoads) -> StepPlan:
        """The plan for test step ``i`` (trace step ``train_steps + i``), asked in order."""
        if self._placement is None or (self.interval and self._since_plan >= self.interval):
            plan_loads = self._loads_for_plan(i, loads)
            # the planners are deterministic: the same loads give the same plan (no copies)
            if self._placement is None or not np.array_equal(plan_loads, self._plan_loads):
                self._placement = self._plan(plan_loads, self._placement)
                self._plan_loads = plan_loads
            self._since_plan = 0
        self._since_plan += 1
        return StepPlan(self._placement, self._predictor_time(loads), self._predicted_src(i, loads))

    # -- hooks
    def _loads_for_plan(self, i: int, loads: StepLoads) -> np.ndarray:
        raise NotImplementedError

    def _predictor_time(self, loads: StepLoads) -> np.ndarray:
        return np.zeros(self.num_gpus)

    def _predicted_src(self, i: int, loads: StepLoads) -> np.ndarray | None:
        return None

    def _plan(self, plan_loads: np.ndarray, previous: Placement | None) -> Placement:
        opts = dict(self.cfg.planner_options)
        return plan_placement(plan_loads, self.num_gpus, self.redundant, self.cfg.resolved_planner(), previous=previous,
                              **opts)

    def _charge(self, cost: Any, loads: StepLoads) -> np.ndarray:
        """Per-GPU seconds of a PredictorCost over each GPU's own tokens (one layer)."""
        return predictor_time(loads.home_tokens, cost.flops_per_token, cost.bytes_per_token,
                              cost.fixed_bytes_per_step, self.hw, cost.fixed_flops_per_step)


class NoDuplication(Strategy):
    def _loads_for_plan(self, i: int, loads: StepLoads) -> np.ndarray:
        return loads.counts  # ignored by the "none" planner except for spare slots

    def _plan(self, plan_loads: np.ndarray, previous: Placement | None) -> Placement:
        return plan_placement(plan_loads, self.num_gpus, self.redundant, "none")


class StaticPlan(Strategy):
    """EPLB-style: profile, plan, serve K steps, re-plan from the recent window."""

    def prepare(self, trace, train_steps, counts) -> None:
        super().prepare(trace, train_steps, counts)
        self.counts = counts.counts().astype(np.float64)

    def _loads_for_plan(self, i: int, loads: StepLoads) -> np.ndarray:
        end = self.train_steps + i          # steps before the current one are known
        return self.counts[max(0, end - self.train_steps):end].sum(axis=0)


class OraclePlan(Strategy):
    """Knows the step's routing before it happens: plans from the true loads, routes every
    token directly (as a perfect token-to-expert predictor would) at no predictor cost, and
    finds its replicas' weights already in place (the simulator charges it no copies)."""

    def _loads_for_plan(self, i: int, loads: StepLoads) -> np.ndarray:
        return loads.counts

    def _predicted_src(self, i: int, loads: StepLoads) -> np.ndarray | None:
        return loads.src_counts


class DistributionPlan(Strategy):
    def prepare(self, trace, train_steps, counts) -> None:
        from moe_gps.predict import make_distribution_predictor, rollout_distribution
        super().prepare(trace, train_steps, counts)
        self.predictor = _make(make_distribution_predictor, self.cfg, self.seed)
        source = trace if getattr(self.predictor, "needs_tokens", False) else counts
        self.shares = rollout_distribution(self.predictor, source, train_steps)   # [test, L, E]
        self.cost = self.predictor.cost()
        self.info.predictor = self.predictor.describe()
        self.info.predictor_cost = self.cost.to_dict()

    def _loads_for_plan(self, i: int, loads: StepLoads) -> np.ndarray:
        return self.shares[i] * loads.tokens

    def _predictor_time(self, loads: StepLoads) -> np.ndarray:
        return self._charge(self.cost, loads)


class TokenPlan(Strategy):
    def prepare(self, trace, train_steps, counts) -> None:
        from moe_gps.predict import make_token_predictor, rollout_tokens
        if not isinstance(trace, TokensTrace):
            raise UserError(f"strategy {self.name}: token-to-expert prediction needs a tokens trace "
                            "(per-token routing); this trace has counts only")
        super().prepare(trace, train_steps, counts)
        self.predictor = _make(make_token_predictor, self.cfg, self.seed)
        self.guess = rollout_tokens(self.predictor, trace, train_steps)     # int16 [N_test, L, k]
        self.offset0 = int(trace.step_offsets[train_steps])
        self.cost = self.predictor.cost()
        self.info.predictor = self.predictor.describe()
        self.info.predictor_cost = self.cost.to_dict()
        self._hits = 0.0
        self._total = 0.0

    def _step_guess(self, loads: StepLoads) -> tuple[np.ndarray, np.ndarray]:
        lo = int(self.trace.step_offsets[loads.step]) - self.offset0
        hi = int(self.trace.step_offsets[loads.step + 1]) - self.offset0
        guess = self.guess[lo:hi]
        true = loads.experts
        hit = true == guess[:, :, :1]          # [T, L, k]: the true expert is among the guesses
        for j in range(1, guess.shape[2]):
            hit |= true == guess[:, :, j:j + 1]
        return guess, hit

    def plan(self, i: int, loads: StepLoads) -> StepPlan:
        self._cur = self._step_guess(loads)
        hit = self._cur[1]
        self._hits += float(hit.sum())
        self._total += float(hit.size)
        self.info.accuracy = self._hits / self._total if self._total else None
        return super().plan(i, loads)

    def _loads_for_plan(self, i: int, loads: StepLoads) -> np.ndarray:
        guess = self._cur[0]
        L, E = loads.src_counts.shape[0], loads.src_counts.shape[2]
        key = np.arange(L, dtype=np.int64)[None, :, None] * E + guess.astype(np.int64)
        return np.bincount(key.ravel(), minlength=L * E).reshape(L, E) * loads.scale

    def _predictor_time(self, loads: StepLoads) -> np.ndarray:
        return self._charge(self.cost, loads)

    def _predicted_src(self, i: int, loads: StepLoads) -> np.ndarray | None:
        if not self.cfg.direct_routing:
            return None
        G, E = self.num_gpus, loads.src_counts.shape[2]
        return source_counts(loads.experts, loads.home, G, E, mask=self._cur[1]) * loads.scale


def _make(factory, cfg: StrategyConfig, seed: int):
    import inspect

    from moe_gps.predict import DISTRIBUTION_PREDICTORS, TOKEN_PREDICTORS
    table = DISTRIBUTION_PREDICTORS if cfg.kind == "distribution" else TOKEN_PREDICTORS
    opts = dict(cfg.predictor_options)
    cls = table.get(cfg.predictor)
    if cls is not None and "seed" in inspect.signature(cls.__init__).parameters:
        opts.setdefault("seed", seed)
    return factory(cfg.predictor, **opts)


KINDS = {"none": NoDuplication, "static": StaticPlan, "distribution": DistributionPlan, "token": TokenPlan,
         "oracle": OraclePlan}


def make_strategy(cfg: StrategyConfig, num_gpus: int, num_experts: int, hw: Hardware, seed: int) -> Strategy:
    return KINDS[cfg.kind](cfg, num_gpus, num_experts, hw, seed)


#: predictors left out of the default strategy set, and why
SLOW_BY_DEFAULT = {"mlp": "it trains a torch model, several seconds on CPU, and needs torch"}


def default_strategy_names(trace: TokensTrace | CountsTrace) -> tuple[list[str], list[str]]:
    """Every strategy that can run on ``trace``: none, eplb, dist:<each distribution predictor>,
    token:<each token predictor>, oracle (predictors named "oracle" and "synthetic" are left
    out: the oracle strategy is the bound, and synthetic ones need parameters).

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
            notes.append(f"token:{n} left out of the default set ({SLOW_BY_DEFAULT[n]}); ask for it with "
                         f"--strategies ... token:{n}")
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
