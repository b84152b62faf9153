"""Tunable synthetic predictors, for sweeps over predictors that do not exist yet.

:class:`SyntheticTokenPredictor` takes the true routing and corrupts it to a chosen
accuracy ``a`` (top-k recall: the fraction of a token's true experts that are
predicted) at a chosen cost. Exactly ``round((1 - a) * T * L * k)`` of a step's
(token, layer, slot) entries are chosen uniformly at random and replaced by a wrong
expert: one not among the token's true experts at that layer and not already
predicted for it. *Which* wrong expert is the error placement:

* ``optimistic``: drawn in proportion to the step's true load of that layer, so the
  loads implied by the prediction stay unbiased: only which token goes where is wrong;
* ``typical``: drawn uniformly over the experts;
* ``pessimistic``: always the least-loaded expert of that step and layer (the next
  least-loaded for a token's second wrong slot, ...), so every miss is taken from the
  experts that carry the load and piled onto one cold expert: the implied loads are as
  far from the truth as accuracy ``a`` allows, and a plan built from them duplicates
  the wrong expert.

:class:`SyntheticDistributionPredictor` perturbs the true shares to a chosen error ε.

:func:`accuracy_overhead_curve` is the exponential accuracy -> overhead model
``overhead(a) = scale * exp(-rate * (1 - a))``; :meth:`AccuracyOverheadCurve.fit`
fits it to measured (accuracy, overhead) points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_gps.errors import UserError
from moe_gps.predict.base import DistributionPredictor, PredictorCost, TokenPredictor, shares
from moe_gps.predict.tokens import MostFrequentTokens, PositionTokens, PrevLayerTokens, TokenIdTokens
from moe_gps.trace.data import StepRouting, TokensTrace, expert_counts

PLACEMENTS = ("optimistic", "typical", "pessimistic")


# --------------------------------------------------------------------------- the curve


@dataclass(frozen=True)
class AccuracyOverheadCurve:
    """overhead(a) = scale * exp(-rate * (1 - a)): ``scale`` is the overhead of a perfect
    predictor (any unit: FLOPs per token per layer when it feeds a PredictorCost),
    ``rate`` how many e-folds cheaper each unit of accuracy given up makes it."""

    scale: float
    rate: float

    def __post_init__(self) -> None:
        if not (self.scale >= 0 and np.isfinite(self.scale)):
            raise UserError(f"accuracy-overhead curve: scale must be a finite number >= 0, got {self.scale}")
        if not (self.rate >= 0 and np.isfinite(self.rate)):
            raise UserError(f"accuracy-overhead curve: rate must be a finite number >= 0, got {self.rate}")

    def __call__(self, accuracy):
        return accuracy_overhead_curve(accuracy, self.scale, self.rate)

    def accuracy_for(self, overhead: float) -> float:
        """The accuracy that costs ``overhead`` (inverse of the curve, clipped to [0, 1])."""
        if overhead <= 0 or self.scale <= 0:
            return 0.0
        if self.rate == 0:
            return 1.0
        return float(np.clip(1 + np.log(overhead / self.scale) / self.rate, 0.0, 1.0))

    @classmethod
    def fit(cls, accuracies, overheads) -> "AccuracyOverheadCurve":
        """Least-squares fit of log(overhead) = log(scale) - rate * (1 - a) to >= 2 points
        with distinct accuracies and positive overheads."""
        a = np.asarray(accuracies, dtype=np.float64)
        c = np.asarray(overheads, dtype=np.float64)
        if a.shape != c.shape or a.ndim != 1 or len(a) < 2 or np.ptp(a) == 0:
            raise UserError("accuracy-overhead fit needs >= 2 points with distinct accuracies")
        if np.any(c <= 0):
            raise UserError("accuracy-overhead fit needs positive overheads")
        slope, intercept = np.polyfit(a - 1.0, np.log(c), 1)
        return cls(scale=float(np.exp(intercept)), rate=float(max(slope, 0.0)))

    @classmethod
    def through(cls, a1: float, c1: float, a2: float, c2: float) -> "AccuracyOverheadCurve":
        """The curve through two (accuracy, overhead) anchor points."""
        return cls.fit([a1, a2], [c1, c2])


def accuracy_overhead_curve(accuracy, scale: float, rate: float):
    """Exponential accuracy -> overhead model: ``scale * exp(-rate * (1 - accuracy))``.

    accuracy: float or array in [0, 1]; scale: the overhead at accuracy 1 (in the unit
    you want back); rate: e-folds of overhead per unit of accuracy.
    """
    a = np.asarray(accuracy, dtype=np.float64)
    if np.any((a < 0) | (a > 1)):
        raise UserError(f"accuracy must be in [0, 1], got {accuracy}")
    out = scale * np.exp(-rate * (1.0 - a))
    return float(out) if out.ndim == 0 else out


def _as_cost(overhead) -> PredictorCost:
    if isinstance(overhead, PredictorCost):
        return overhead
    if overhead is None:
        return PredictorCost(note="synthetic predictor given no overhead: free")
    value = float(overhead)
    if not (value >= 0 and np.isfinite(value)):
        raise UserError(f"synthetic predictor: overhead must be a finite number >= 0, got {overhead}")
    return PredictorCost(flops_per_token=value, note="synthetic predictor: overhead given as FLOPs per token")


# --------------------------------------------------------------------- token predictor


class SyntheticTokenPredictor(TokenPredictor):
    """Corrupts the true routing to top-k recall ``accuracy`` (see the module docstring).

    overhead: a PredictorCost, or a number = FLOPs per token per layer, or None (free).
    """

    name = "synthetic"
    uses = "the true routing, corrupted to accuracy a (a what-if predictor, not a real one)"
    cost_formula = "whatever overhead c it is given (FLOPs per token per layer, or a PredictorCost)"

    def __init__(self, accuracy: float = 0.9, overhead=None, placement: str = "typical", seed: int = 0,
                 online: bool | None = None) -> None:
        super().__init__(online)
        if not 0 <= accuracy <= 1:
            raise UserError(f"synthetic predictor: accuracy must be in [0, 1], got {accuracy}")
        if placement not in PLACEMENTS:
            raise UserError(f"synthetic predictor: placement {placement!r} is not one of {', '.join(PLACEMENTS)}")
        self.accuracy, self.placement, self.seed = float(accuracy), placement, int(seed)
        self._cost = _as_cost(overhead)

    @classmethod
    def from_curve(cls, accuracy: float, curve: AccuracyOverheadCurve, placement: str = "typical",
                   seed: int = 0) -> "SyntheticTokenPredictor":
        """A synthetic predictor whose FLOPs per token come from an accuracy-overhead curve."""
        return cls(accuracy, PredictorCost(flops_per_token=curve(accuracy),
                                           note=f"accuracy-overhead curve scale={curve.scale:g} "
                                                f"rate={curve.rate:g}"), placement, seed)

    def params(self) -> dict:
        return {"accuracy": self.accuracy, "placement": self.placement, "seed": self.seed}

    def describe(self) -> str:
        return f"synthetic(a={self.accuracy:g},{self.placement})"

    def _fit(self, trace: TokensTrace) -> None:
        self._rng = np.random.default_rng(self.seed)

    def predict(self, step: StepRouting) -> np.ndarray:
        return corrupt(step.experts, self.num_experts, self.accuracy, self.placement, self._rng)

    def cost(self) -> PredictorCost:
        return self._cost


class CurveTokenPredictor(SyntheticTokenPredictor):
    """A what-if token-to-expert predictor at accuracy ``a`` whose cost follows the exponential
    accuracy -> overhead curve: given (``scale``, ``rate``), or fitted when it is fitted to the
    measured (top-k recall, FLOPs per token) of the real token predictors that the training steps
    support (:func:`measured_curve`). Its routing is the truth corrupted to ``a``, as ``synthetic``."""

    name = "curve"
    uses = "the true routing corrupted to accuracy a, at the cost the accuracy-overhead curve gives a"
    cost_formula = "scale * exp(-rate * (1 - a)) FLOPs per token per layer (fitted to the measured predictors)"

    def __init__(self, accuracy: float = 0.9, scale: float | None = None, rate: float | None = None,
                 placement: str = "typical", seed: int = 0, online: bool | None = None) -> None:
        super().__init__(accuracy, None, placement, seed, online)
        if (scale is None) != (rate is None):
            raise UserError("curve predictor: give both scale and rate, or neither (then they are fitted)")
        self.curve = None if scale is None else AccuracyOverheadCurve(float(scale), float(rate))

    def params(self) -> dict:
        extra = {} if self.curve is None else {"scale": self.curve.scale, "rate": self.curve.rate}
        return {"accuracy": self.accuracy, **extra, "placement": self.placement, "seed": self.seed}

    def describe(self) -> str:
        return f"curve(a={self.accuracy:g},{self.placement})"

    def _fit(self, trace: TokensTrace) -> None:
        super()._fit(trace)
        if self.curve is None:
            self.curve, self.points = measured_curve(trace)
        self._cost = PredictorCost(flops_per_token=self.curve(self.accuracy),
                                   note=f"accuracy-overhead curve scale={self.curve.scale:.4g} "
                                        f"rate={self.curve.rate:.4g} at accuracy {self.accuracy:g}")


#: the real token predictors the curve is fitted to: those that need neither torch nor the true routing
CURVE_PREDICTORS = (MostFrequentTokens, TokenIdTokens, PositionTokens, PrevLayerTokens)


def measured_curve(trace: TokensTrace) -> tuple[AccuracyOverheadCurve, list[tuple[str, float, float]]]:
    """The accuracy -> overhead curve fitted to the real token predictors on ``trace``: each (that the
    trace has the columns for, torch-free) fitted on its first half of steps, its top-k recall
    measured on the second half, paired with its FLOPs per token. -> (curve, [(name, recall, flops)])."""
    from moe_gps.predict.base import rollout_tokens

    if trace.num_steps < 2:
        raise UserError("curve predictor: fitting the accuracy-overhead curve needs at least 2 training steps "
                        "(or give scale and rate)")
    half = trace.num_steps // 2
    truth = trace.experts[int(trace.step_offsets[half]):]
    points = []
    for cls in CURVE_PREDICTORS:
        if any(getattr(trace, f) is None for f in getattr(cls, "needs", ())):
            continue
        pred = cls()
        guess = rollout_tokens(pred, trace, half)
        hit = (truth[:, :, :, None] == guess[:, :, None, :]).any(axis=3)
        flops = pred.cost().flops_per_token
        if flops > 0:
            points.append((cls.name, float(hit.mean()), float(flops)))
    if len({round(p[1], 9) for p in points}) < 2:
        raise UserError("curve predictor: fewer than 2 measured predictors with distinct accuracies to fit the "
                        "accuracy-overhead curve on (give scale and rate)")
    return AccuracyOverheadCurve.fit([p[1] for p in points], [p[2] for p in points]), points


def corrupt(experts: np.ndarray, num_experts: int, accuracy: float, placement: str,
            rng: np.random.Generator) -> np.ndarray:
    """A copy of ``experts`` int [T, L, k] with round((1 - accuracy) * T*L*k) entries wrong.

    Every replaced entry names an expert outside the token's true set at that layer and
    distinct from its other predicted experts (always possible while E >= 2k; with fewer
    experts a replacement may fall back to one of the token's true experts). Slots are
    replaced in order 0..k-1, so a later slot avoids the replacements of earlier ones.
    -> int16 [T, L, k]
    """
    T, L, k = experts.shape
    E = num_experts
    out = experts.astype(np.int16, copy=True)
    total = T * L * k
    n_bad = int(round((1.0 - accuracy) * total))
    if n_bad == 0 or T == 0:
        return out
    bad = np.zeros(total, dtype=bool)
    bad[rng.choice(total, size=n_bad, replace=False)] = True
    bad = bad.reshape(T, L, k)
    load = expert_counts(experts, np.array([0, len(experts)]), E)[0].astype(np.float64)  # the step's true load per layer [L, E]
    if placement == "pessimistic":
        order = np.argsort(load, axis=1, kind="stable")  # coldest first, lower index on ties
    else:
        weights = load if placement == "optimistic" else np.ones((L, E))
        cdf = np.cumsum(weights, axis=1)
        cdf /= cdf[:, -1:]
    for j in range(k):
        t, l = np.nonzero(bad[:, :, j])
        if len(t) == 0:
            continue
        # experts this entry may not name: the true set, and earlier slots' replacements
        forbidden = np.concatenate([experts[t, l].astype(np.int64), out[t, l, :j].astype(np.int64)], axis=1)
        choice = np.full(len(t), -1, dtype=np.int64)
        todo = np.arange(len(t))
        if placement == "pessimistic":
            for r in range(min(E, k + j + 1)):  # at most k + j experts are forbidden
                cand = order[l[todo], r]
                ok = ~(forbidden[todo] == cand[:, None]).any(axis=1)
                choice[todo[ok]] = cand[ok]
                todo = todo[~ok]
                if len(todo) == 0:
                    break
        else:
            for _ in range(64):  # rejection sampling: draw, keep those not forbidden
                u = rng.random(len(todo))
                c = cdf[l[todo]]
                cand = np.minimum((c < u[:, None]).sum(axis=1), E - 1)
                ok = ~(forbidden[todo] == cand[:, None]).any(axis=1) & (weights[l[todo], cand] > 0)
                choice[todo[ok]] = cand[ok]
                todo = todo[~ok]
                if len(todo) == 0:
                    break
            if len(todo):  # rare: the few allowed experts carry little weight; take one of them
                free = ~(np.arange(E)[None, :, None] == forbidden[todo][:, None, :]).any(axis=2)
                score = np.where(free, weights[l[todo]] + 1e-9, -1.0)
                choice[todo] = np.argmax(score, axis=1)
                todo = todo[~free[np.arange(len(todo)), choice[todo]]]
        if len(todo):  # nothing allowed (E < 2k): keep the predicted set distinct at least
            others = np.delete(out[t[todo], l[todo]], j, axis=1)
            free = ~(np.arange(E)[None, :, None] == others[:, None, :]).any(axis=2)
            choice[todo] = np.argmax(free, axis=1)
        out[t, l, j] = choice
    return out


# -------------------------------------------------------------- distribution predictor


class SyntheticDistributionPredictor(DistributionPredictor):
    """The true shares perturbed to a mean error ``error`` = mean_e |p_hat - p| * E.

    overhead: a PredictorCost, or a number = FLOPs per step per layer, or None (free).

    A zero-sum Gaussian direction is drawn per (step, layer); its length is set by
    bisection so that, after clipping at 0 and renormalising, the error is ``error``
    (capped at the largest error reachable along that direction).
    """

    name = "synthetic"
    uses = "the true shares, perturbed to error ε (a what-if predictor, not a real one)"
    cost_formula = "whatever overhead it is given (FLOPs per step per layer, or a PredictorCost); default free"
    learns_from_counts = False

    def __init__(self, error: float = 0.1, overhead=None, seed: int = 0, online: bool | None = None) -> None:
        super().__init__(online)
        if not 0 <= error <= 2:
            raise UserError(f"synthetic distribution predictor: error must be in [0, 2], got {error}")
        self.error, self.seed = float(error), int(seed)
        if isinstance(overhead, (int, float)) and not isinstance(overhead, bool):
            flops = _as_cost(overhead).flops_per_token  # validated number
            self._cost = PredictorCost(fixed_flops_per_step=flops, note="synthetic: overhead given as FLOPs per step")
        else:
            self._cost = _as_cost(overhead)

    def params(self) -> dict:
        return {"error": self.error, "seed": self.seed}

    def describe(self) -> str:
        return f"synthetic(eps={self.error:g})"

    def _fit(self, counts, tokens) -> None:
        self._rng = np.random.default_rng(self.seed)

    def predict(self, step: StepRouting | None = None) -> np.ndarray:
        if step is None:
            raise UserError("the synthetic distribution predictor needs the step's routing")
        return self._perturb(shares(step.counts(self.num_experts))[None])[0]

    def rollout(self, counts, tokens=None) -> np.ndarray:
        self._check_fitted()
        return self._perturb(shares(counts))

    def _perturb(self, p: np.ndarray) -> np.ndarray:
        E = p.shape[-1]
        d = self._rng.standard_normal(p.shape)
        d -= d.mean(axis=-1, keepdims=True)
        d /= np.maximum(np.abs(d).sum(axis=-1, keepdims=True), 1e-12)  # unit L1 length

        def err(scale):
            q = np.maximum(p + scale[..., None] * d, 0.0)
            q /= q.sum(axis=-1, keepdims=True)
            return np.abs(q - p).mean(axis=-1) * E, q

        lo = np.zeros(p.shape[:-1])
        hi = np.full(p.shape[:-1], 64.0)
        for _ in range(60):
            mid = (lo + hi) / 2
            e, _ = err(mid)
            below = e < self.error
            lo = np.where(below, mid, lo)
            hi = np.where(below, hi, mid)
        return err((lo + hi) / 2)[1]

    def cost(self) -> PredictorCost:
        return self._cost
