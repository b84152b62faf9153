"""When and from what the runtime plans expert duplication (numpy only; rank 0 plans).

Modes (``--duplication``), all using :func:`moe_gps.placement.plan_placement` and the
predictors of :mod:`moe_gps.predict`:

* ``off``: every expert once, ``E / N`` contiguous experts per rank (algorithm ``none``,
  no redundant slots); never re-planned.
* ``static``: the placement in ``duplication.placement`` (a ``moe-gps plan`` file) for
  the whole run (the other modes refuse the key); without one, planned at the end of the warm-up and then at every check
  from the mean measured counts of the last ``window`` steps (all steps so far when
  ``window`` is absent).
* ``dist-only``: at every check (the end of the warm-up, then every ``replan_interval``
  steps) the distribution predictor (fitted on the warm-up steps, then online) forecasts
  the step's load shares ``p [L, E]``; the belief is ``p * tokens_in_step * top_k``.
* ``token-to-expert``: on the same schedule, the token predictor (fitted on the
  warm-up steps, then online) guesses every token of the coming step's top-k experts
  from what is known before routing (its token id, its position); the belief is the
  bincount of those guesses.

The predicting modes make their first plan (at the end of the warm-up) from the profile of the
last ``window`` warm-up steps, as the simulator's predicting strategies load theirs, and later
plans from the mean of their last ``window`` beliefs (default 1); with
``window`` > 1 or ``min_gain`` > 0 they form a belief every step after the warm-up, as the
simulator does. A check whose plan moves weights is kept only if it passes ``min_gain``
(:mod:`runtime.gain`); the first plan always is. Under ``copy_policy: async`` an adopted
plan is *pending* until its weights have landed (:meth:`DuplicationPolicy.landed`), and a
check that falls while one is pending is skipped.

Before the first plan, the modes with duplication run the algorithm's plan for uniform
loads with ``num_redundant`` extra slots, so the slot count per rank never changes.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from moe_gps.errors import UserError
from moe_gps.placement import Placement, load_placement, plan_placement
from moe_gps.placement.planner import check_redundant_slots
from moe_gps.predict.base import shares
from moe_gps.trace.data import StepRouting, TokensTrace, expert_counts
from moe_gps.trace.meta import TraceMeta
from runtime.config import DUPLICATION_MODES, DuplicationSection

#: token predictors that read only what is known before routing (token id, position, history)
PRE_ROUTING_TOKEN_PREDICTORS = ("most-frequent", "token-id", "position")
#: distribution predictors that read the step's own routing (a reference and a what-if), which the runtime
#: does not have before the step
ROUTING_DISTRIBUTION_PREDICTORS = ("oracle", "synthetic")


def _runnable_predictor(kind: str, name: str, known, usable: list[str], make, params: dict):
    """The predictor ``name`` of ``duplication.<kind>_predictor`` made with ``duplication.<kind>_params``;
    ``usable``: those of ``known`` that read nothing the runtime lacks before the step. A UserError naming
    the key otherwise."""
    key = f"duplication.{kind}_predictor"
    if name not in known:
        raise UserError(f"{key}: unknown predictor {name!r} (choose from {', '.join(usable)})")
    if name not in usable:
        raise UserError(f"{key}: {name!r} reads the routing of the step itself, which the runtime does not have "
                        f"before the step; use one of {', '.join(usable)}")
    try:
        return make(name, **params)
    except UserError as err:
        raise UserError(f"duplication.{kind}_params: {err}") from None


@dataclass
class PlanInfo:
    """One planning event: what was predicted and what the plan expects.

    predicted_loads [L, E]: tokens per expert the plan was made for;
    predicted_rank_tokens [L, N]: the plan's pairs per rank under those loads.
    """

    step: int
    seconds_predict: float
    seconds_plan: float
    predicted_loads: np.ndarray
    predicted_rank_tokens: np.ndarray
    note: str = ""
    extra: dict = field(default_factory=dict)
    declined: bool = False          # min_gain kept the placement in force


class DuplicationPolicy:
    """Owns the placement schedule. Every rank builds one; only rank 0 calls :meth:`plan`/:meth:`observe`."""

    def __init__(self, mode: str, cfg: DuplicationSection, num_ranks: int, num_layers: int, num_experts: int,
                 top_k: int, tokens_per_step: int, gain=None) -> None:
        """``gain``: a :class:`runtime.gain.GainModel` (needed on rank 0 when ``cfg.min_gain`` > 0)."""
        if mode not in DUPLICATION_MODES:
            raise UserError(f"--duplication {mode!r} is not one of {', '.join(DUPLICATION_MODES)}")
        self.mode, self.cfg = mode, cfg
        self.N, self.L, self.E, self.k = num_ranks, num_layers, num_experts, top_k
        self.tokens_per_step = tokens_per_step
        self.R = 0 if mode == "off" else cfg.num_redundant
        self.fixed: Placement | None = None
        if mode == "static" and cfg.placement:
            self.fixed = load_placement(cfg.placement)
            p = self.fixed
            if (p.num_layers, p.num_experts, p.num_gpus) != (self.L, self.E, self.N):
                raise UserError(f"duplication.placement: {cfg.placement}: the plan is for {p.num_layers} layers, "
                                f"{p.num_experts} experts, {p.num_gpus} GPUs; this run has {self.L} MoE layers, "
                                f"{self.E} experts, {self.N} ranks")
            self.R = p.num_redundant
        check_redundant_slots(self.E, self.N, self.R, "duplication.num_redundant", gpu="rank")
        if (self.E + self.R) % self.N:
            raise UserError(f"{self.E} experts + {self.R} redundant slots do not divide over {self.N} ranks; "
                            f"set duplication.num_redundant so that experts + num_redundant is a multiple of "
                            f"{self.N}" + ("" if mode != "off" else " (with --duplication off, use a number of "
                                                                   "ranks that divides the experts)"))
        self.dist_predictor = None
        self.token_predictor = None
        if mode == "dist-only":
            from moe_gps.predict import DISTRIBUTION_PREDICTORS, make_distribution_predictor
            usable = [n for n in DISTRIBUTION_PREDICTORS if n not in ROUTING_DISTRIBUTION_PREDICTORS]
            self.dist_predictor = _runnable_predictor("distribution", cfg.distribution_predictor,
                                                      DISTRIBUTION_PREDICTORS, usable, make_distribution_predictor,
                                                      cfg.distribution_params)
        if mode == "token-to-expert":
            from moe_gps.predict import TOKEN_PREDICTORS, make_token_predictor
            self.token_predictor = _runnable_predictor("token", cfg.token_predictor, TOKEN_PREDICTORS,
                                                       list(PRE_ROUTING_TOKEN_PREDICTORS), make_token_predictor,
                                                       cfg.token_params)
        if mode != "static" and cfg.placement:
            raise UserError(f"duplication.placement {cfg.placement} is a plan for --duplication static, which "
                            f"--duplication {mode} would not use; remove the key, or run --duplication static")
        self._fitted = False
        self.warmup: list[StepRouting] = []           # the warm-up steps, until the predictor is fitted
        self.current: Placement | None = None         # the placement in force
        self.pending: Placement | None = None         # async: adopted, its weights not landed yet
        self.planned = False                          # a plan has been adopted (the first always is)
        self.gain = gain
        from sim.strategies import RECENT_STEPS

        window = cfg.window or (None if mode == "static" else 1)
        self.every_step = (window or 1) > 1 or cfg.min_gain > 0     # predicting modes believe every step
        self.beliefs: deque = deque(maxlen=window)    # predicting modes: float [L, E] per step
        self.counts: deque = deque(maxlen=window)     # static: true counts [L, E] of recent steps
        self.history: deque = deque(maxlen=RECENT_STEPS)    # plan loads [L, E] of recent steps (min_gain)
        self.observed: deque = deque(maxlen=RECENT_STEPS)   # true shares [L, E] of recent steps (min_gain)
        self._loads: np.ndarray | None = None         # this step's plan loads (min_gain history)
        self._predict_s = 0.0                         # seconds fitting and predicting before this step
        self._profile: np.ndarray | None = None       # predicting modes: shares [L, E] of the last warm-up steps
        self._profiled_steps = 0                      # how many warm-up steps that profile sums
        self._tokens = 0                              # tokens of the coming step

    # ------------------------------------------------------------- schedule
    def initial(self) -> Placement:
        """The placement of step 0 (computed identically on every rank, from no data)."""
        if self.fixed is not None:
            p = self.fixed
        elif self.mode == "off":
            p = plan_placement(np.ones((self.L, self.E)), self.N, 0, algorithm="none")
        else:
            p = plan_placement(np.ones((self.L, self.E)), self.N, self.R, algorithm=self.cfg.algorithm,
                               **self.cfg.algorithm_options)
        self.current = p
        return p

    def due(self, step: int) -> bool:
        """Whether a re-plan check falls before ``step``: the end of the warm-up, then every
        ``replan_interval`` steps (the same answer on every rank)."""
        w, K = self.cfg.warmup_steps, self.cfg.replan_interval
        if self.mode == "off" or self.fixed is not None:
            return False
        return step >= w and (step - w) % K == 0

    def due_ever(self) -> bool:
        """Whether this run has re-plan checks at all."""
        return self.mode != "off" and self.fixed is None

    def wants_plan(self, step: int) -> bool:
        """Whether a new placement is planned before ``step``: a check is due and no move is in flight."""
        return self.due(step) and self.pending is None

    def skips_check(self, step: int) -> bool:
        """A check is due before ``step`` but a move is in flight (async), so it is skipped."""
        return self.due(step) and self.pending is not None

    # ------------------------------------------------------------- all ranks
    def adopt(self, p: Placement, background: bool = False) -> None:
        """The placement planned by rank 0 (and broadcast): in force now, or, with ``background``,
        pending until :meth:`landed`."""
        self.planned = True
        if background:
            self.pending = p
        else:
            self.current = p

    def landed(self) -> Placement:
        """The pending placement's weights have landed on every rank: it comes into force."""
        if self.pending is None:
            raise RuntimeError("no placement is pending")
        self.current, self.pending = self.pending, None
        return self.current

    # ------------------------------------------------------------- rank 0 only
    def observe(self, routing: StepRouting) -> None:
        """The routing of the step just run (all ranks' tokens)."""
        if self.mode == "off" or self.fixed is not None:
            return
        counts = routing.counts(self.E)                                       # [L, E]
        if self.min_gain_on:
            self.observed.append(shares(counts))
            if self._loads is not None:
                self.history.append(self._loads)
                self._loads = None
        if self.mode == "static":
            self.counts.append(counts.astype(np.float64))
            return
        if not self._fitted:
            self.warmup.append(routing)
            return
        if self.dist_predictor is not None:
            self.dist_predictor.observe(counts, routing)
        if self.token_predictor is not None:
            self.token_predictor.observe(routing)

    @property
    def min_gain_on(self) -> bool:
        return self.cfg.min_gain > 0 and self.mode in ("static", "dist-only", "token-to-expert") \
            and self.fixed is None

    def _history_trace(self) -> TokensTrace:
        sizes = [h.num_tokens for h in self.warmup]
        meta = TraceMeta("tokens", self.L, self.E, self.k, source="collected")
        cat = lambda name: (None if any(getattr(h, name) is None for h in self.warmup)  # noqa: E731
                            else np.concatenate([getattr(h, name) for h in self.warmup]))
        return TokensTrace(meta, np.concatenate([h.experts for h in self.warmup]),
                           np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), None,
                           token_id=cat("token_id"), seq=cat("seq"), pos=cat("pos"))

    def _fit(self) -> None:
        # the profile a first plan is made from, as the simulator's predicting strategies load theirs: the
        # true loads of the last `window` warm-up steps, counts summed (a bigger step weighs more)
        last = self.warmup[-self.beliefs.maxlen:]
        self._profile = shares(sum(r.counts(self.E) for r in last).astype(np.float64))
        self._profiled_steps = len(last)
        train = self._history_trace()
        if self.dist_predictor is not None:
            self.dist_predictor.fit(train.counts(), train)
        if self.token_predictor is not None:
            self.token_predictor.fit(train)
        self._fitted = True
        self.warmup = []

    def _belief(self, token_id: np.ndarray, seq: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """float [L, E]: the loads the predictor expects for the step of tokens ``token_id`` [T]."""
        T = len(token_id)
        upcoming = StepRouting(-1, np.zeros((T, self.L, self.k), dtype=np.int16), None,
                               token_id=token_id, seq=seq, pos=pos)
        if self.dist_predictor is not None:
            return self.dist_predictor.predict(upcoming) * (T * self.k)
        guess = self.token_predictor.predict(upcoming)
        return expert_counts(guess, np.array([0, T]), self.E)[0].astype(np.float64)

    def before(self, step: int, token_id: np.ndarray, seq: np.ndarray, pos: np.ndarray) -> None:
        """Before ``step`` (its tokens ``token_id, seq, pos`` [T], all ranks'): fit the predictor at the
        end of the warm-up, and form the step's belief when a plan or the min_gain rule needs it."""
        t0 = time.perf_counter()
        w = self.cfg.warmup_steps
        if self.mode in ("off", "static") or self.fixed is not None or step < w:
            if self.mode == "static" and self.min_gain_on and step >= w:
                self._loads = self.plan_loads()
            return
        if not self._fitted:
            self._fit()
        self._tokens = len(token_id)
        if self.every_step or (self.wants_plan(step) and self.planned):     # the first plan needs no belief
            self.beliefs.append(self._belief(token_id, seq, pos))
            if self.min_gain_on:
                self._loads = self.plan_loads()
        self._predict_s = time.perf_counter() - t0

    def plan_loads(self) -> np.ndarray:
        """float [L, E]: what a plan is made from: the mean true counts of the last ``window`` steps
        (static), else the mean of the last ``window`` beliefs."""
        if self.mode == "static":
            return np.mean(np.stack(list(self.counts)), axis=0)
        return np.mean(np.stack(list(self.beliefs)), axis=0)

    def _profiled(self) -> np.ndarray:
        """float [L, E]: the predicting modes' first plan loads: the warm-up profile's shares x the coming
        step's (token, expert) assignments."""
        return self._profile * float(self._tokens * self.k)

    def _place(self, loads: np.ndarray) -> Placement:
        return plan_placement(loads, self.N, self.R, algorithm=self.cfg.algorithm, previous=self.current,
                              **self.cfg.algorithm_options)

    def plan(self, step: int) -> tuple[Placement | None, PlanInfo]:
        """Plan before ``step`` (after :meth:`before`); the new placement, or None when ``min_gain``
        keeps the one in force (the first plan is always kept)."""
        t1 = time.perf_counter()
        first = not self.planned and self.mode != "static"
        loads = self._profiled() if first else self.plan_loads()
        if self.mode == "static":
            n = len(self.counts)
            note = f"mean counts of steps {step - n}..{step - 1}"
        elif first:
            n = self._profiled_steps
            which = f"warm-up step, {step - 1}" if n == 1 else f"{n} warm-up steps, {step - n}..{step - 1}"
            note = f"profile of the last {which} (window {self.beliefs.maxlen}; the first plan)"
        elif self.dist_predictor is not None:
            note = f"distribution predictor {self.dist_predictor.describe()}"
        else:
            note = f"token predictor {self.token_predictor.describe()}"
        if len(self.beliefs) > 1 and not first:
            note += f", mean of the last {len(self.beliefs)} beliefs"
        p = self._place(loads)
        declined = self.planned and self.min_gain_on and not self._worth(p, loads)
        t2 = time.perf_counter()
        info = PlanInfo(step, self._predict_s, t2 - t1, loads, (self.current if declined else p).gpu_loads(loads),
                        note + ("; min_gain keeps the placement in force" if declined else ""), declined=declined)
        return (None if declined else p), info

    def _worth(self, cand: Placement, loads: np.ndarray) -> bool:
        """The simulator's ``min_gain`` rule (:class:`runtime.gain.GainModel`) for moving to ``cand``."""
        from sim.strategies import gain_samples, scenario_count
        from sim.work import moves_weights

        if not moves_weights(self.current, cand):
            return True                               # new shares only: a routing-table change
        if self.gain is None:
            raise UserError("duplication.min_gain > 0 needs the cost model of duplication.cluster")
        fit, seen = gain_samples(self.history, self.observed, self.cfg.replan_interval,
                                 scenario_count(self.L, self.N, self.E), loads.sum(axis=1))
        earlier = cand if fit is None else self._place(fit)
        believed = loads if self.mode == "static" else self.beliefs[-1]
        return self.gain.worth(self.current, earlier, cand, seen, believed)
