"""Distribution-only predictors: each layer's expert load share for the next step.

All work on counts alone (a counts trace is enough) except ``token-hist``, which reads
the step's token ids. Shapes: counts and shares are [layers, experts] per step; every
predicted row sums to 1. Formulas: docs/predictors.md.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from moe_gps.errors import UserError
from moe_gps.predict.base import DistributionPredictor, PredictorCost, shares
from moe_gps.predict.tables import KeyedCounts, KeyIndex, compact_keys
from moe_gps.trace.data import StepRouting, TokensTrace

F32 = 4  # bytes of one stored share or count


class OracleDistribution(DistributionPredictor):
    """The true shares of the step (a reference bound, not a real predictor)."""

    name = "oracle"
    uses = "the true routing of the step itself (reference only; cannot run before routing)"
    cost_formula = "0 (reference)"
    learns_from_counts = False

    def _fit(self, counts, tokens) -> None:
        pass

    def predict(self, step: StepRouting | None = None) -> np.ndarray:
        if step is None:
            raise UserError("the oracle distribution predictor needs the step's routing")
        return shares(step.counts(self.num_experts))

    def rollout(self, counts: np.ndarray, tokens: TokensTrace | None = None) -> np.ndarray:
        self._check_fitted()
        return shares(counts)

    def cost(self) -> PredictorCost:
        return PredictorCost(note="reference bound: reads the true routing")


class ProfilePredictor(DistributionPredictor):
    """Offline profile: the multinomial maximum-likelihood estimate from the training split.

    p_hat[l, e] = (sum_s c[s, l, e] + alpha) / (sum_s sum_e' c[s, l, e'] + E * alpha), with
    ``alpha`` = ``smoothing`` (0 = the plain MLE of the MoE-GPS paper). Offline by default;
    in online mode the sums also run over every observed test step.
    """

    name = "profile"
    uses = "expert counts of the training steps (online: plus every observed step)"
    cost_formula = "reads E shares per step: fixed bytes 4E; online adds E flops/step"
    default_online = False

    def __init__(self, online: bool | None = None, smoothing: float = 0.0) -> None:
        super().__init__(online)
        if smoothing < 0:
            raise UserError(f"profile: smoothing must be >= 0, got {smoothing}")
        self.smoothing = float(smoothing)

    def params(self) -> dict:
        return {"online": self.online, "smoothing": self.smoothing}

    def _fit(self, counts, tokens) -> None:
        self.total = counts.sum(axis=0)

    def fit_range(self, part, num_steps, chunk_steps=256):
        self.fit(part(0, min(num_steps, chunk_steps)))
        for lo in range(chunk_steps, num_steps, chunk_steps):   # integer sums: the same total
            self.total = self.total + part(lo, min(num_steps, lo + chunk_steps)).sum(axis=0)
        return self

    def predict(self, step=None) -> np.ndarray:
        return shares(self.total + self.smoothing)

    def _observe(self, counts, step) -> None:
        self.total = self.total + counts

    def rollout(self, counts, tokens=None) -> np.ndarray:
        self._check_fitted()
        if not self.online:
            return np.broadcast_to(self.predict(), counts.shape).copy()
        before = self.total + np.concatenate([np.zeros((1,) + counts.shape[1:]), np.cumsum(counts, axis=0)[:-1]])
        self.total = self.total + counts.sum(axis=0)
        return shares(before + self.smoothing)

    def cost(self) -> PredictorCost:
        E = self.num_experts
        return PredictorCost(fixed_flops_per_step=E if self.online else 0, fixed_bytes_per_step=F32 * E,
                             state_bytes=F32 * E, note="one stored share vector per layer")


class WindowPredictor(DistributionPredictor):
    """Pooled shares of the last ``window`` steps: sum of their counts, normalised.

    Offline: the last ``window`` training steps, forever.
    """

    name = "window"
    uses = "expert counts of the last W steps"
    cost_formula = "per step: E*(W+1) flops, reads E*W counts (4 bytes each)"

    def __init__(self, online: bool | None = None, window: int = 8) -> None:
        super().__init__(online)
        if int(window) != window or window < 1:
            raise UserError(f"{self.name}: window must be a positive integer, got {window}")
        self.window = int(window)

    def params(self) -> dict:
        return {"online": self.online, "window": self.window}

    def _fit(self, counts, tokens) -> None:
        self.history = deque((c for c in counts[-self.window:]), maxlen=self.window)

    def fit_range(self, part, num_steps, chunk_steps=256):
        return self.fit(part(max(0, num_steps - self.window), num_steps))        # only the last W are kept

    def predict(self, step=None) -> np.ndarray:
        return shares(np.sum(self.history, axis=0))

    def _observe(self, counts, step) -> None:
        self.history.append(counts)

    def rollout(self, counts, tokens=None) -> np.ndarray:
        self._check_fitted()
        if not self.online:
            return np.broadcast_to(self.predict(), counts.shape).copy()
        w = self.window
        allc = np.concatenate([np.asarray(self.history), counts])  # [h + S, L, E]
        h = len(self.history)
        csum = np.concatenate([np.zeros((1,) + allc.shape[1:]), np.cumsum(allc, axis=0)])
        idx = np.arange(counts.shape[0]) + h  # prediction for test step i uses rows < h + i
        pooled = csum[idx] - csum[np.maximum(idx - w, 0)]
        for c in counts:
            self.history.append(c)
        return shares(pooled)

    def cost(self) -> PredictorCost:
        E, W = self.num_experts, self.window
        return PredictorCost(fixed_flops_per_step=E * (W + 1), fixed_bytes_per_step=F32 * E * W,
                             state_bytes=F32 * E * W, note="W stored count vectors per layer")


class PreviousPredictor(WindowPredictor):
    """The previous step's shares (a window of 1)."""

    name = "previous"
    uses = "expert counts of the previous step"
    cost_formula = "per step: 2E flops, reads E counts"

    def __init__(self, online: bool | None = None) -> None:
        super().__init__(online, window=1)

    def params(self) -> dict:
        return {"online": self.online}


class EMAPredictor(DistributionPredictor):
    """Exponential moving average of step shares: m <- alpha * p_s + (1 - alpha) * m.

    Started at the first training step's shares and run through the training steps.
    """

    name = "ema"
    uses = "expert counts of every earlier step, weighted (1 - alpha)^age"
    cost_formula = "per step: 3E flops, reads 2E values"

    def __init__(self, online: bool | None = None, alpha: float = 0.3) -> None:
        super().__init__(online)
        if not 0 < alpha <= 1:
            raise UserError(f"ema: alpha must be in (0, 1], got {alpha}")
        self.alpha = float(alpha)

    def params(self) -> dict:
        return {"online": self.online, "alpha": self.alpha}

    def _fit(self, counts, tokens) -> None:
        m = shares(counts[0])
        for s in range(1, len(counts)):
            m = self.alpha * shares(counts[s]) + (1 - self.alpha) * m
        self.m = m

    def fit_range(self, part, num_steps, chunk_steps=256):
        self.fit(part(0, min(num_steps, chunk_steps)))
        for lo in range(chunk_steps, num_steps, chunk_steps):   # the same recursion, a chunk at a time
            for c in part(lo, min(num_steps, lo + chunk_steps)):
                self.m = self.alpha * shares(c) + (1 - self.alpha) * self.m
        return self

    def predict(self, step=None) -> np.ndarray:
        return self.m / self.m.sum(axis=-1, keepdims=True)

    def _observe(self, counts, step) -> None:
        self.m = self.alpha * shares(counts) + (1 - self.alpha) * self.m

    def cost(self) -> PredictorCost:
        E = self.num_experts
        return PredictorCost(fixed_flops_per_step=3 * E, fixed_bytes_per_step=2 * F32 * E,
                             state_bytes=F32 * E, note="one running share vector per layer")


class KalmanPredictor(DistributionPredictor):
    """Per-(layer, expert) Kalman filter on the shares, a local-level model:

        x_s = x_{s-1} + w_s,   w ~ N(0, q_l)        (the true share drifts)
        y_s = x_s + v_s,       v ~ N(0, b / n_s)    (a step's share is a noisy sample)

    with b = pbar (1 - pbar) the multinomial variance of a share (pbar: the training
    profile) and n_s = k * tokens the assignments of step s. The drift-to-noise ratio
    q_l / mean_s,e(b / n_s) of each layer is chosen from a grid (1e-4 .. 1e2) to minimise the
    one-step-ahead squared error over the training steps. Unlike a fixed-alpha EMA,
    each layer gets its own gain, and small (noisy) steps move the estimate less.
    """

    name = "kalman"
    uses = "expert counts and token totals of every earlier step (gain fitted on the training steps)"
    cost_formula = "per step: ~12E flops, reads 3E values"
    GRID = np.logspace(-4, 2, 25)

    def _fit(self, counts, tokens) -> None:
        self._fit_passes(counts.sum(axis=0), np.maximum(counts.sum(axis=2), 1.0), lambda: iter(counts))

    def fit_range(self, part, num_steps, chunk_steps=256):
        self.fit(part(0, 1))                     # shapes and checks; the passes below make the fit
        chunks = lambda: (part(lo, min(num_steps, lo + chunk_steps))  # noqa: E731
                          for lo in range(0, num_steps, chunk_steps))
        total, per_step = 0, []
        for c in chunks():                       # pass 1: the sums (integers: the same as at once)
            total = total + c.sum(axis=0)
            per_step.append(c.sum(axis=2))
        self._fit_passes(total, np.maximum(np.concatenate(per_step), 1.0),
                         lambda: (row for c in chunks() for row in c))
        return self

    def _fit_passes(self, total: np.ndarray, n: np.ndarray, steps) -> None:
        """The fit from the training counts' sum ``total`` [L, E], assignments per step and layer ``n``
        [S, L], and ``steps()``: a fresh iterator over the steps' counts [L, E] in order (read twice)."""
        pbar = shares(total)  # [L, E]
        self.base_var = np.maximum(pbar * (1 - pbar), 1e-12)
        S = len(n)
        scale = self.base_var.mean(axis=1) / n.mean(axis=0)  # [L]: mean observation variance
        if S >= 3:
            ratios = self.GRID[:, None]  # [G, 1]: candidate q_l / mean observation variance
            rows = steps()
            x = np.broadcast_to(shares(next(rows)), (len(self.GRID),) + pbar.shape).copy()
            P = self.base_var[None] / n[0][None, :, None]
            sq = np.zeros((len(self.GRID), self.num_layers))
            q = (ratios * scale[None])[..., None]  # [G, L, 1]
            for s, c in enumerate(rows, start=1):   # one step's shares at a time, no [S, L, E] copy
                ys = shares(c)[None]
                sq += ((ys - x) ** 2).sum(axis=2)
                x, P = self._step(x, P, q, ys, n[s][None, :, None])
            self.ratio = self.GRID[np.argmin(sq, axis=0)]
        else:
            self.ratio = np.ones(self.num_layers)
        self.q = (self.ratio * scale)[:, None]  # [L, 1]
        rows = steps()
        self.x = shares(next(rows))
        self.P = self.base_var / n[0][:, None]
        for s, c in enumerate(rows, start=1):
            self.x, self.P = self._step(self.x, self.P, self.q, shares(c), n[s][:, None])

    def _step(self, x, P, q, y, n):
        P_pred = P + q
        R = self.base_var / n
        K = P_pred / (P_pred + R)
        return x + K * (y - x), (1 - K) * P_pred

    def predict(self, step=None) -> np.ndarray:
        return shares(np.maximum(self.x, 0.0))

    def _observe(self, counts, step) -> None:
        n = np.maximum(counts.sum(axis=1), 1.0)
        self.x, self.P = self._step(self.x, self.P, self.q, shares(counts), n[:, None])

    def cost(self) -> PredictorCost:
        E = self.num_experts
        return PredictorCost(fixed_flops_per_step=12 * E, fixed_bytes_per_step=3 * F32 * E,
                             state_bytes=2 * F32 * E, note="state and variance per expert")


class TokenHistogramPredictor(DistributionPredictor):
    """Shares conditioned on the step's token ids, corrected for drift.

    raw[l, e] = mean over the step's tokens t of P(e | token_id_t, l), with P estimated
    from the counts of earlier steps under a Dirichlet prior centred on the layer's
    marginal (``prior_tokens`` pseudo-tokens); ids outside the table (the ``max_keys``
    most frequent) use the marginal. Prediction: raw * c, renormalised, where c[l, e]
    is an EMA (rate ``alpha``) of true / raw over the observed steps (c starts at 1;
    ``alpha = 0`` turns the correction off). The table explains what the batch's
    content does to the load; c follows what it does not (drift).
    """

    name = "token-hist"
    uses = "the step's token ids; per-id expert counts of earlier steps; drift correction from earlier steps"
    cost_formula = "per token: E flops and 4(E+1) B (one table row per token id); per step: 4E flops, 8E B"
    needs_tokens = True

    def __init__(self, online: bool | None = None, prior_tokens: float = 1.0, alpha: float = 0.3,
                 max_keys: int = 65536) -> None:
        super().__init__(online)
        if prior_tokens <= 0:
            raise UserError(f"token-hist: prior_tokens must be > 0, got {prior_tokens}")
        if not 0 <= alpha <= 1:
            raise UserError(f"token-hist: alpha must be in [0, 1], got {alpha}")
        if max_keys < 1:
            raise UserError(f"token-hist: max_keys must be >= 1, got {max_keys}")
        self.prior_tokens, self.alpha, self.max_keys = float(prior_tokens), float(alpha), int(max_keys)

    def params(self) -> dict:
        return {"online": self.online, "prior_tokens": self.prior_tokens, "alpha": self.alpha,
                "max_keys": self.max_keys}

    def _fit(self, counts, tokens: TokensTrace) -> None:
        self._train = tokens
        self._build(tokens.token_id)
        self.correction = np.ones((self.num_layers, self.num_experts))

    def _build(self, ids: np.ndarray) -> None:
        cap = max(1, min(self.max_keys, (1 << 24) // (self.num_layers * self.num_experts)))
        self.index = KeyIndex(ids, cap)
        self._table = None          # the training steps are counted under the new rows when next read
        self._predicted = None      # (step, its rows, raw shares) of the last prediction

    @property
    def table(self) -> KeyedCounts:
        """The count table of the ids' rows (the training steps counted on first use after an index is
        made: a rollout makes its own before it reads the table)."""
        if self._table is None:
            self._table = KeyedCounts(self.index.size + 1, self.num_layers, self.num_experts, self._train.meta.top_k)
            keys = self.index(self._train.token_id)
            self._table.add(keys, self._train.experts, keys < self.index.size)
        return self._table

    def _raw(self, step: StepRouting | None) -> tuple[np.ndarray, np.ndarray]:
        """(the step's table rows int64 [T], raw shares float [L, E]); the ones :meth:`predict` worked out
        when it is asked again for the step it last predicted (nothing was counted in between)."""
        held = self._predicted
        if held is not None and held[0] is step:
            return held[1], held[2]
        if step is None or step.token_id is None:
            raise UserError("token-hist needs the step's token ids")
        keys = self.index(step.token_id)
        uniq, inv = compact_keys(keys, self.index.size + 1)
        freq = np.bincount(inv, minlength=len(uniq))
        probs = self.table.probabilities(uniq, self.prior_tokens)  # [U, L, E]
        return keys, np.tensordot(freq / freq.sum(), probs, axes=(0, 0))

    def predict(self, step: StepRouting | None = None) -> np.ndarray:
        keys, raw = self._raw(step)
        self._predicted = (step, keys, raw)
        return shares(raw * self.correction)

    def _observe(self, counts, step: StepRouting | None) -> None:
        if self.alpha > 0:
            keys, raw = self._raw(step)
            ratio = np.divide(shares(counts), raw, out=np.ones_like(raw), where=raw > 1e-12)
            self.correction = self.alpha * ratio + (1 - self.alpha) * self.correction
        else:
            keys = self.index(step.token_id)
        self._predicted = None
        self.table.add(keys, step.experts, keys < self.index.size)

    def rollout(self, counts, tokens: TokensTrace | None = None) -> np.ndarray:
        self._check_fitted()
        # the table covers ids of the training and the test steps (ids are known before
        # routing; only counts of observed steps ever enter it)
        self._build(np.concatenate([self._train.token_id, tokens.token_id]))
        self.correction = np.ones((self.num_layers, self.num_experts))
        return super().rollout(counts, tokens)

    def cost(self) -> PredictorCost:
        E = self.num_experts
        rows = self.table.num_keys
        return PredictorCost(flops_per_token=E, bytes_per_token=F32 * (E + 1), fixed_flops_per_step=4 * E,
                             fixed_bytes_per_step=2 * F32 * E, state_bytes=F32 * E * (rows + 1),
                             note=f"table of {rows} token ids x {E} shares per layer, and a correction vector")
