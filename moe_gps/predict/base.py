"""The predictor interface shared by both kinds, the cost record, and the rollouts.

A predictor is *fitted* on a training split (the first ``train_steps`` steps of a trace,
or another trace) and then predicts *online*, one step at a time, in step order:

    predictor.fit(train)                 # learn tables / weights from the training steps
    for each later step s:
        guess = predictor.predict(...)   # before step s is routed
        predictor.observe(...)           # the true routing of step s, once it is known

In **online** mode ``observe`` updates the predictor's state, as a serving system that
records routing would; in **offline** mode ``observe`` does nothing and every test step
is predicted from the fitted state alone. Within a step, what a predictor may read is
its own business and is stated in its ``uses`` line (e.g. the token ids of the step,
or, for layer l, the same token's experts at layer l - 1 of the same step).

Two kinds:

* :class:`DistributionPredictor` guesses each layer's expert load share of the next
  step, ``[layers, experts]``, rows summing to 1.
* :class:`TokenPredictor` guesses every token's top-k experts at every layer,
  ``int16 [tokens, layers, k]``.

Everything is seeded and deterministic: the same trace, split and parameters give the
same predictions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Callable, ClassVar

import numpy as np

from moe_gps.errors import UserError
from moe_gps.trace.data import CountsTrace, StepRouting, TokensTrace

Trace = TokensTrace | CountsTrace


@dataclass(frozen=True)
class PredictorCost:
    """The work one predictor adds to **one MoE layer** of one step.

    The simulator charges it on the GPU before (or beside) that layer's attention, with a roofline
    and a latency term: ``time = max(flops / peak_flops, bytes / hbm_bandwidth) + serial_steps x
    step_latency_s`` (see :meth:`time_s`).

    flops_per_token:      floating-point operations per token (multiply-add = 2)
    bytes_per_token:      bytes read per token (table rows, input features, outputs)
    fixed_flops_per_step: operations per step that do not grow with tokens (updating a
                          load estimate, an online table update is counted per token)
    fixed_bytes_per_step: bytes read once per step (MLP weights, a share vector)
    state_bytes:          resident memory per layer (tables, weights, history)
    serial_steps:         steps that must run one after another per layer (an LSTM over a sequence:
                          its length; a predictor on the host: 1), each taking ``step_latency_s``
    step_latency_s:       seconds of one serial step that no batching hides (a kernel launch, a host
                          round trip)
    note:                 one line saying where the figures come from

    time per layer = roofline(FLOPs, bytes) + serial_steps x step_latency_s
    """

    flops_per_token: float = 0.0
    bytes_per_token: float = 0.0
    fixed_flops_per_step: float = 0.0
    fixed_bytes_per_step: float = 0.0
    state_bytes: float = 0.0
    serial_steps: float = 0.0
    step_latency_s: float = 0.0
    note: str = ""

    @property
    def latency_s(self) -> float:
        """Seconds per layer that the serial steps add: serial_steps x step_latency_s."""
        return self.serial_steps * self.step_latency_s

    def flops(self, tokens: int | float) -> float:
        """FLOPs for one layer of a step with ``tokens`` tokens."""
        return self.fixed_flops_per_step + self.flops_per_token * tokens

    def bytes(self, tokens: int | float) -> float:
        """Bytes read for one layer of a step with ``tokens`` tokens."""
        return self.fixed_bytes_per_step + self.bytes_per_token * tokens

    def time_s(self, tokens: int | float, peak_flops: float, hbm_bytes_per_s: float) -> float:
        """Seconds for one layer: max(FLOPs / peak, bytes / bandwidth) + the serial steps' latency."""
        return max(self.flops(tokens) / peak_flops, self.bytes(tokens) / hbm_bytes_per_s) + self.latency_s

    def to_dict(self) -> dict:
        return asdict(self)


ZERO_COST = PredictorCost(note="reads nothing at serving time")


class MissingFeature(UserError):
    """The trace lacks a column the predictor needs (token_id, pos) or a package (torch)."""


class _Predictor(ABC):
    """What both kinds share: a name, what the predictor uses, online/offline mode."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    #: one line: the information the predictor reads (shown by --help and the docs)
    uses: ClassVar[str] = ""
    #: one line: its cost formula (shown by --help and the docs)
    cost_formula: ClassVar[str] = ""
    #: the mode when ``online`` is not given
    default_online: ClassVar[bool] = True

    def __init__(self, online: bool | None = None) -> None:
        self.online = self.default_online if online is None else bool(online)
        self._fitted = False

    @property
    def mode(self) -> str:
        return "online" if self.online else "offline"

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError(f"predictor {self.name!r}: call fit() first")

    def params(self) -> dict:
        """The constructor parameters, for reports."""
        return {"online": self.online}

    def describe(self) -> str:
        """The name, with the parameters that differ from their defaults, e.g. ``ema(alpha=0.5)``."""
        import inspect

        sig = inspect.signature(type(self).__init__).parameters
        extra = ", ".join(f"{k}={v}" for k, v in self.params().items()
                          if k != "online" and not (k in sig and sig[k].default == v))
        return f"{self.name}({extra})" if extra else self.name


class DistributionPredictor(_Predictor):
    """Guesses the next step's load share per layer: float [layers, experts], rows sum to 1."""

    kind = "distribution"
    #: True if the predictor needs a tokens trace (it reads the step's token ids)
    needs_tokens: ClassVar[bool] = False
    #: False for a reference that reads the step's own routing and learns nothing when fitted
    learns_from_counts: ClassVar[bool] = True

    def fit(self, counts: np.ndarray, tokens: TokensTrace | None = None) -> "DistributionPredictor":
        """Learn from the training steps.

        counts: int [train_steps, layers, experts];  tokens: the same steps as a tokens
        trace, or None (only predictors with ``needs_tokens`` read it).
        """
        counts = np.asarray(counts)
        if counts.ndim != 3 or counts.shape[0] < 1:
            raise UserError(f"predictor {self.name!r}: fit needs counts [steps >= 1, layers, experts], "
                            f"got shape {counts.shape}")
        if self.needs_tokens and (tokens is None or tokens.token_id is None):
            raise MissingFeature(f"predictor {self.name!r} needs a tokens trace with a token_id column")
        self.num_layers, self.num_experts = int(counts.shape[1]), int(counts.shape[2])
        # integer counts as they are (every sum of them is exact either way): no float copy of a long
        # training split
        self._fit(counts if counts.dtype.kind in "iu" else counts.astype(np.float64), tokens)
        self._fitted = True
        return self

    def fit_range(self, part: Callable[[int, int], np.ndarray], num_steps: int,
                  chunk_steps: int = 256) -> "DistributionPredictor":
        """:meth:`fit` on steps 0..num_steps-1 read through ``part(lo, hi)`` (int [hi - lo, layers,
        experts]), for predictors that read no tokens. The same fit; the predictors of
        :mod:`moe_gps.predict.distribution` read them ``chunk_steps`` at a time (Kalman in three
        passes), so a long training split is never held whole; one that learns nothing from them
        (the references) reads one step; any other reads them at once."""
        return self.fit(part(0, num_steps if self.learns_from_counts else 1))

    @abstractmethod
    def _fit(self, counts: np.ndarray, tokens: TokensTrace | None) -> None: ...

    @abstractmethod
    def predict(self, step: StepRouting | None = None) -> np.ndarray:
        """Shares for the next step, float [layers, experts]. ``step`` gives the step's
        token ids to predictors that use them; its experts are not read."""

    def observe(self, counts: np.ndarray, step: StepRouting | None = None) -> None:
        """Learn the true counts [layers, experts] of the step just routed (online mode only)."""
        if self.online:
            self._observe(np.asarray(counts, dtype=np.float64), step)

    def _observe(self, counts: np.ndarray, step: StepRouting | None) -> None:
        pass

    def rollout(self, counts: np.ndarray, tokens: TokensTrace | None = None) -> np.ndarray:
        """Predict every test step in order, observing each after predicting it.

        counts: [test_steps, layers, experts] true counts; tokens: the test steps as a
        tokens trace (or None)  ->  float [test_steps, layers, experts]
        """
        self._check_fitted()
        out = np.empty(counts.shape, dtype=np.float64)
        for s in range(counts.shape[0]):
            step = tokens.step(s) if tokens is not None else None
            out[s] = self.predict(step)
            self.observe(counts[s], step)
        return out

    @abstractmethod
    def cost(self) -> PredictorCost: ...


class TokenPredictor(_Predictor):
    """Guesses each token's top-k experts at each layer: int16 [tokens, layers, k]."""

    kind = "token"
    #: names of the optional token columns the predictor needs ("token_id", "pos")
    needs: ClassVar[tuple[str, ...]] = ()

    def fit(self, trace: TokensTrace) -> "TokenPredictor":
        """Learn from the training steps (a tokens trace)."""
        if not isinstance(trace, TokensTrace):
            raise MissingFeature(f"predictor {self.name!r} needs a tokens trace (per-token routing), "
                                 "not a counts trace")
        self.check_features(trace)
        if trace.num_tokens == 0:
            raise UserError(f"predictor {self.name!r}: the training split has no tokens")
        m = trace.meta
        self.num_layers, self.num_experts, self.top_k = m.num_layers, m.num_experts, m.top_k
        self._fit(trace)
        self._fitted = True
        return self

    def check_features(self, trace: TokensTrace) -> None:
        for f in self.needs:
            if getattr(trace, f) is None:
                raise MissingFeature(f"predictor {self.name!r} needs the trace's {f} column, which it lacks")

    @abstractmethod
    def _fit(self, trace: TokensTrace) -> None: ...

    @abstractmethod
    def predict(self, step: StepRouting) -> np.ndarray:
        """Top-k experts int16 [tokens, layers, k], best first, distinct per (token, layer).

        For layer l a predictor may read the step's features (token ids, positions) and
        ``step.experts[:, :l]`` (earlier layers of the same step); only the oracle and
        the synthetic predictor read layer l itself.
        """

    def observe(self, step: StepRouting) -> None:
        """Learn the true routing of the step just routed (online mode only)."""
        if self.online:
            self._observe(step)

    def _observe(self, step: StepRouting) -> None:
        pass

    def rollout(self, trace: TokensTrace) -> np.ndarray:
        """Predict the test steps in order, observing each after it -> int16 [N_test, layers, k]."""
        self._check_fitted()
        self.check_features(trace)
        out = np.empty(trace.experts.shape, dtype=np.int16)
        for s in range(trace.num_steps):
            lo, hi = int(trace.step_offsets[s]), int(trace.step_offsets[s + 1])
            step = trace.step(s)
            out[lo:hi] = self.predict(step)
            self.observe(step)
        return out

    @abstractmethod
    def cost(self) -> PredictorCost: ...


# ----------------------------------------------------------------------------- splits


def check_train_steps(trace: Trace, train_steps: int) -> int:
    """Validate a training split size: 1 <= train_steps < steps."""
    n = trace.num_steps
    if not isinstance(train_steps, (int, np.integer)) or isinstance(train_steps, bool):
        raise UserError(f"train steps must be an integer, got {train_steps!r}")
    if not 1 <= train_steps < n:
        raise UserError(f"train steps must be between 1 and {n - 1} for a trace of {n} steps, got {train_steps}")
    return int(train_steps)


def default_train_steps(num_steps: int) -> int:
    """Half the steps (at least 1), leaving at least one step to test."""
    if num_steps < 2:
        raise UserError(f"a trace needs at least 2 steps to evaluate predictors (1 to fit, 1 to test); "
                        f"this one has {num_steps} (after any --tokens-per-step): regroup its tokens into "
                        f"several steps with a smaller --tokens-per-step N (or `moe-gps trace rechunk TRACE "
                        f"--tokens-per-step N -o OUT`)")
    return max(1, num_steps // 2)


def split_tokens(trace: TokensTrace, train_steps: int) -> tuple[TokensTrace, TokensTrace]:
    """(first train_steps steps, the rest) as two tokens traces; no copies of the arrays."""
    cut = int(trace.step_offsets[train_steps])

    def part(lo_step: int, hi_step: int, lo: int, hi: int) -> TokensTrace:
        offsets = trace.step_offsets[lo_step:hi_step + 1] - trace.step_offsets[lo_step]
        opt = {f: (None if getattr(trace, f) is None else getattr(trace, f)[lo:hi])
               for f in ("token_id", "seq", "pos", "rank")}
        w = None if trace.weights is None else trace.weights[lo:hi]
        return TokensTrace(trace.meta, trace.experts[lo:hi], offsets.astype(np.int64), w, **opt)

    n = trace.num_steps
    return part(0, train_steps, 0, cut), part(train_steps, n, cut, trace.num_tokens)


def rollout_distribution(predictor: DistributionPredictor, trace: Trace, train_steps: int) -> np.ndarray:
    """Fit on steps < train_steps, then predict each later step online (or offline).

    -> float [steps - train_steps, layers, experts], rows sum to 1; row i predicts step
    ``train_steps + i`` having seen (in online mode) the true routing of all earlier steps.
    """
    chunks = list(iter_rollout_distribution(predictor, trace, train_steps))
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


#: test steps a distribution predictor rolls out at a time in :func:`iter_rollout_distribution`
ROLLOUT_CHUNK = 256


def iter_rollout_distribution(predictor: DistributionPredictor, trace: Trace, train_steps: int,
                              chunk_steps: int | None = None) -> Iterator[np.ndarray]:
    """The rows of :func:`rollout_distribution` in order, ``chunk_steps`` test steps at a time:
    float [<= chunk_steps, layers, experts] each (one chunk of every test step for a predictor that
    reads the steps' token ids).

    The predictor is fitted when the first chunk is asked for, and observes each chunk's steps as
    it rolls them out, so only one chunk of predictions is held whatever the number of steps. On
    integer counts (every trace's) the predictions equal those of one rollout of every step.
    ``chunk_steps``: default :data:`ROLLOUT_CHUNK`.
    """
    chunk_steps = ROLLOUT_CHUNK if chunk_steps is None else chunk_steps
    if int(chunk_steps) != chunk_steps or chunk_steps < 1:
        raise UserError(f"chunk_steps must be a positive integer, got {chunk_steps!r}")
    train_steps = check_train_steps(trace, train_steps)
    tokens = trace if isinstance(trace, TokensTrace) else None
    if predictor.needs_tokens and (tokens is None or tokens.token_id is None):
        raise MissingFeature(f"predictor {predictor.name!r} needs a tokens trace with a token_id column")
    if predictor.needs_tokens:
        counts = trace.counts()
        train_tok, test_tok = split_tokens(tokens, train_steps)
        predictor.fit(counts[:train_steps], train_tok)
        yield predictor.rollout(counts[train_steps:], test_tok)
        return
    if isinstance(trace, CountsTrace):
        part = trace.counts_range                  # read as needed (a long trace may live in a file)
    else:
        counts = trace.counts()
        part = lambda lo, hi: counts[lo:hi]  # noqa: E731
    predictor.fit_range(part, train_steps, chunk_steps)
    for lo in range(train_steps, trace.num_steps, chunk_steps):
        yield predictor.rollout(part(lo, lo + chunk_steps))


def rollout_tokens(predictor: TokenPredictor, trace: Trace, train_steps: int) -> np.ndarray:
    """Fit on steps < train_steps, then predict the tokens of each later step.

    -> int16 [N_test, layers, k] for the tokens of steps >= train_steps, in trace order.
    """
    if not isinstance(trace, TokensTrace):
        raise MissingFeature(f"predictor {predictor.name!r} needs a tokens trace (per-token routing), "
                             "not a counts trace")
    train_steps = check_train_steps(trace, train_steps)
    train, test = split_tokens(trace, train_steps)
    predictor.fit(train)
    return predictor.rollout(test)


def shares(counts: np.ndarray) -> np.ndarray:
    """Normalise counts [..., experts] to shares; an all-zero row becomes uniform."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=-1, keepdims=True)
    uniform = np.full_like(counts, 1.0 / counts.shape[-1])
    return np.divide(counts, total, out=uniform, where=total > 0)
