"""When and from what the runtime plans expert duplication (numpy only; rank 0 plans).

Modes (``--duplication``), all using :func:`moe_gps.placement.plan_placement` and the
predictors of :mod:`moe_gps.predict`:

* ``off``: every expert once, ``E / N`` contiguous experts per rank (algorithm ``none``,
  no redundant slots); never re-planned.
* ``static``: the placement in ``duplication.placement`` (a ``moe-gps plan`` file) for
  the whole run; without one, the warm-up steps' mean measured counts are planned once
  at the end of the warm-up and kept.
* ``dist-only``: after the warm-up, every ``replan_every`` steps the distribution
  predictor (fitted on the warm-up steps, then online) forecasts the next step's load
  shares ``p [L, E]``; the plan is made from ``loads = p * tokens_in_step * top_k``.
* ``token-to-expert``: on the same schedule, the token predictor (fitted on the
  warm-up steps, then online) guesses every token of the coming step's top-k experts
  from what is known before routing (its token id, its position); the plan is made
  from the bincount of those guesses.

Before the first plan, the modes with duplication run the algorithm's plan for uniform
loads with ``num_redundant`` extra slots, so the slot count per rank never changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from moe_gps.errors import UserError
from moe_gps.placement import Placement, plan_placement
from moe_gps.trace.data import StepRouting, TokensTrace, expert_counts
from moe_gps.trace.meta import TraceMeta
from runtime.config import DUPLICATION_MODES, DuplicationSection

#: token predictors that read only what is known before routing (token id, position, history)
PRE_ROUTING_TOKEN_PREDICTORS = ("most-frequent", "token-id", "position")


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


class DuplicationPolicy:
    """Owns the placement schedule. Every rank builds one; only rank 0 calls :meth:`plan`/:meth:`observe`."""

    def __init__(self, mode: str, cfg: DuplicationSection, num_ranks: int, num_layers: int, num_experts: int,
                 top_k: int, tokens_per_step: int) -> None:
        if mode not in DUPLICATION_MODES:
            raise UserError(f"--duplication {mode!r} is not one of {', '.join(DUPLICATION_MODES)}")
        self.mode, self.cfg = mode, cfg
        self.N, self.L, self.E, self.k = num_ranks, num_layers, num_experts, top_k
        self.tokens_per_step = tokens_per_step
        self.R = 0 if mode == "off" else cfg.num_redundant
        self.fixed: Placement | None = None
        if mode == "static" and cfg.placement:
            self.fixed = Placement.load(cfg.placement)
            p = self.fixed
            if (p.num_layers, p.num_experts, p.num_gpus) != (self.L, self.E, self.N):
                raise UserError(f"{cfg.placement}: the plan is for {p.num_layers} layers, {p.num_experts} experts, "
                                f"{p.num_gpus} GPUs; this run has {self.L} MoE layers, {self.E} experts, "
                                f"{self.N} ranks")
            self.R = p.num_redundant
        if (self.E + self.R) % self.N:
            raise UserError(f"{self.E} experts + {self.R} redundant slots do not divide over {self.N} ranks; "
                            f"set duplication.num_redundant so that experts + num_redundant is a multiple of "
                            f"{self.N}" + ("" if mode != "off" else " (with --duplication off, use a number of "
                                                                   "ranks that divides the experts)"))
        self.dist_predictor = None
        self.token_predictor = None
        if mode == "dist-only":
            from moe_gps.predict import make_distribution_predictor
            self.dist_predictor = make_distribution_predictor(cfg.distribution_predictor, **cfg.distribution_params)
        if mode == "token-to-expert":
            if cfg.token_predictor not in PRE_ROUTING_TOKEN_PREDICTORS:
                raise UserError(f"token predictor {cfg.token_predictor!r} reads routing of the step itself, which "
                                f"the runtime does not have before the step; use one of "
                                f"{', '.join(PRE_ROUTING_TOKEN_PREDICTORS)}")
            from moe_gps.predict import make_token_predictor
            self.token_predictor = make_token_predictor(cfg.token_predictor, **cfg.token_params)
        self._fitted = False
        self.history: list[StepRouting] = []
        self.current: Placement | None = None

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

    def wants_plan(self, step: int) -> bool:
        """Whether a new placement is planned before ``step`` (the same answer on every rank)."""
        w, K = self.cfg.warmup_steps, self.cfg.replan_every
        if self.mode == "off" or self.fixed is not None:
            return False
        if self.mode == "static":
            return step == w
        return step >= w and (step - w) % K == 0

    # ------------------------------------------------------------- rank 0 only
    def observe(self, routing: StepRouting) -> None:
        """The routing of the step just run (all ranks' tokens)."""
        if not self._fitted:
            self.history.append(routing)
            return
        if self.dist_predictor is not None:
            self.dist_predictor.observe(routing.counts(self.E), routing)
        if self.token_predictor is not None:
            self.token_predictor.observe(routing)

    def _history_trace(self) -> TokensTrace:
        sizes = [h.num_tokens for h in self.history]
        meta = TraceMeta("tokens", self.L, self.E, self.k, source="collected")
        cat = lambda name: (None if any(getattr(h, name) is None for h in self.history)  # noqa: E731
                            else np.concatenate([getattr(h, name) for h in self.history]))
        return TokensTrace(meta, np.concatenate([h.experts for h in self.history]),
                           np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), None,
                           token_id=cat("token_id"), seq=cat("seq"), pos=cat("pos"))

    def _fit(self) -> None:
        train = self._history_trace()
        if self.dist_predictor is not None:
            self.dist_predictor.fit(train.counts(), train)
        if self.token_predictor is not None:
            self.token_predictor.fit(train)
        self._fitted = True
        self.history = []

    def plan(self, step: int, token_id: np.ndarray, seq: np.ndarray, pos: np.ndarray) -> tuple[Placement, PlanInfo]:
        """Plan before ``step``; token_id/seq/pos [T] are the coming step's tokens (all ranks)."""
        t0 = time.perf_counter()
        T = len(token_id)
        if self.mode == "static":
            train = self._history_trace()
            loads = train.counts().mean(axis=0).astype(np.float64)
            note = f"mean counts of warm-up steps 0..{step - 1}"
            self._fitted, self.history = True, []     # planned once; nothing more to learn
        else:
            if not self._fitted:
                self._fit()
            upcoming = StepRouting(step, np.zeros((T, self.L, self.k), dtype=np.int16), None,
                                   token_id=token_id, seq=seq, pos=pos)
            if self.dist_predictor is not None:
                loads = self.dist_predictor.predict(upcoming) * (T * self.k)
                note = f"distribution predictor {self.dist_predictor.describe()}"
            else:
                guess = self.token_predictor.predict(upcoming)
                loads = expert_counts(guess, np.array([0, T]), self.E)[0].astype(np.float64)
                note = f"token predictor {self.token_predictor.describe()}"
        t1 = time.perf_counter()
        p = plan_placement(loads, self.N, self.R, algorithm=self.cfg.algorithm, previous=self.current,
                           **self.cfg.algorithm_options)
        t2 = time.perf_counter()
        self.current = p
        info = PlanInfo(step, t1 - t0, t2 - t1, loads, p.gpu_loads(loads), note)
        return p, info

    def adopt(self, p: Placement) -> None:
        """Ranks other than 0 learn the placement that rank 0 broadcast."""
        self.current = p
