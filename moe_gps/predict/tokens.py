"""Token-to-expert predictors built on count tables (no learning beyond counting).

Each predicts, for every token of a step and every layer, the k experts it will be
routed to, best first: int16 [tokens, layers, k]. Ranking rule of every table
predictor: most observed tokens first; ties, and keys never seen, by the layer's
overall frequency (see :mod:`moe_gps.predict.tables`). In online mode the tables also
count every step after it is routed.
"""

from __future__ import annotations

import numpy as np

from moe_gps.errors import UserError
from moe_gps.predict.base import PredictorCost, TokenPredictor
from moe_gps.predict.tables import CHUNK_ELEMENTS, PRIOR, KeyedCounts, KeyIndex, chunks, topk_desc
from moe_gps.trace.data import StepRouting, TokensTrace

I16, F32, I32 = 2, 4, 4  # bytes
#: largest key array of one co-occurrence count in :class:`PrevLayerTokens` (elements; it stays in cache)
COUNT_ELEMENTS = 1 << 18


class OracleTokens(TokenPredictor):
    """The true experts (a reference bound, not a real predictor)."""

    name = "oracle"
    uses = "the true routing of the token (reference only; cannot run before routing)"
    cost_formula = "0 (reference)"

    def _fit(self, trace) -> None:
        pass

    def predict(self, step: StepRouting) -> np.ndarray:
        return step.experts.astype(np.int16, copy=True)

    def cost(self) -> PredictorCost:
        return PredictorCost(note="reference bound: reads the true routing")


class _KeyedTokens(TokenPredictor):
    """Most frequent experts per (key, layer); subclasses say what the key is."""

    def _keys(self, step: StepRouting | TokensTrace) -> np.ndarray:
        raise NotImplementedError

    def _num_keys(self, trace: TokensTrace) -> int:
        raise NotImplementedError

    def _fit(self, trace: TokensTrace) -> None:
        self.table = KeyedCounts(self._num_keys(trace), self.num_layers, self.num_experts, self.top_k)
        keys = self._keys(trace)
        self.table.add(keys, trace.experts, keys < self.table.num_keys - self._spare)

    _spare = 0  # rows at the end of the table that are never counted ("not in the table")

    def predict(self, step: StepRouting) -> np.ndarray:
        return self.table.topk(self._keys(step))

    def _observe(self, step: StepRouting) -> None:
        keys = self._keys(step)
        self.table.add(keys, step.experts, keys < self.table.num_keys - self._spare)

    def pair_probs(self, step: StepRouting | TokensTrace, t: np.ndarray, layer: np.ndarray) -> np.ndarray:
        """Smoothed P(expert | key, layer) of the (token row t, layer) pairs -> float32 [m, E]
        (one pseudo-token spread like the layer marginal; features of the MLP)."""
        keys = self._keys(step)[t]
        c = self.table.counts[keys, layer].astype(np.float32)
        m = self.table.marginal()[layer].astype(np.float32)
        k = self.top_k
        return (c + k * m) / (c.sum(axis=1, keepdims=True) + k)

    def _lookup_cost(self, note: str) -> PredictorCost:
        k, E = self.top_k, self.num_experts
        rows = self.table.num_keys
        # online: k counter increments and a re-rank of the token's row (E compares) per token
        update = (k + E) if self.online else 0.0
        extra = I32 * E if self.online else 0  # the counts of the row
        return PredictorCost(flops_per_token=float(update), bytes_per_token=I32 + I16 * k + extra,
                             state_bytes=(I16 * k + extra) * rows,
                             note=note + ("; online: counts kept and re-ranked" if self.online else ""))


class MostFrequentTokens(_KeyedTokens):
    """Every token gets the layer's k most frequent experts."""

    name = "most-frequent"
    uses = "expert counts per layer of earlier steps"
    cost_formula = "0 flops, reads k expert ids per step (2k B); online: k flops/token, E flops and 4E B per step"

    def _num_keys(self, trace) -> int:
        return 1

    def _keys(self, step) -> np.ndarray:
        return np.zeros(len(step.experts), dtype=np.int64)

    def predict(self, step: StepRouting) -> np.ndarray:
        one = self.table.topk(np.zeros(1, dtype=np.int64))
        return np.broadcast_to(one, (len(step.experts),) + one.shape[1:]).copy()

    def cost(self) -> PredictorCost:
        k, E = self.top_k, self.num_experts
        if self.online:  # count the step's assignments, re-rank E counters once per step
            return PredictorCost(flops_per_token=float(k), fixed_flops_per_step=float(E),
                                 fixed_bytes_per_step=I16 * k + I32 * E, state_bytes=I16 * k + I32 * E,
                                 note="one top-k list per layer, its counts updated every step")
        return PredictorCost(fixed_bytes_per_step=I16 * k, state_bytes=I16 * k, note="one top-k list per layer")


class TokenIdTokens(_KeyedTokens):
    """Most frequent experts of the token's vocabulary id (``max_keys`` most frequent ids)."""

    name = "token-id"
    uses = "the token's vocabulary id; per-id expert counts of earlier steps"
    cost_formula = "per token: 0 flops, reads its id (4 B) and a k-entry row (2k B); online: +k+E flops, +4E B"
    needs = ("token_id",)
    _spare = 1
    _table: KeyedCounts | None = None

    def __init__(self, online: bool | None = None, max_keys: int = 65536) -> None:
        super().__init__(online)
        if max_keys < 1:
            raise UserError(f"token-id: max_keys must be >= 1, got {max_keys}")
        self.max_keys = int(max_keys)

    def params(self) -> dict:
        return {"online": self.online, "max_keys": self.max_keys}

    def _num_keys(self, trace) -> int:
        return self.index.size + 1

    def _fit(self, trace: TokensTrace) -> None:
        self._train = trace
        self._make_index(trace.token_id)

    def _make_index(self, ids: np.ndarray) -> None:
        cap = max(1, min(self.max_keys, (1 << 24) // (self.num_layers * self.num_experts)))
        self.index = KeyIndex(ids, cap)
        self._table = None          # the training steps are counted under the new rows when next read
        self._held_keys = None      # (step, its rows) last looked up

    @property
    def table(self) -> KeyedCounts:
        """The count table of the ids' rows (the training steps counted on first use after an index is
        made: a rollout makes its own before it reads the table)."""
        if self._table is None:
            _KeyedTokens._fit(self, self._train)
        return self._table

    @table.setter
    def table(self, table: KeyedCounts) -> None:
        self._table = table

    def _keys(self, step) -> np.ndarray:
        held = self._held_keys            # a step is looked up to predict it, then again to count it
        if held is None or held[0] is not step:
            held = self._held_keys = (step, self.index(step.token_id))
        return held[1]

    def prepare(self, test: TokensTrace) -> None:
        """Give the test steps' ids table rows too (ids are known before routing; only
        observed routing is ever counted); the training steps are recounted when the table is next read."""
        self.check_features(test)
        self._make_index(np.concatenate([self._train.token_id, test.token_id]))

    def rollout(self, trace: TokensTrace) -> np.ndarray:
        self._check_fitted()
        self.prepare(trace)
        return super().rollout(trace)

    def cost(self) -> PredictorCost:
        return self._lookup_cost(f"top-k table of {self.table.num_keys} ids per layer")


class PositionTokens(_KeyedTokens):
    """Most frequent experts at the token's position in its request (positions >=
    ``max_pos - 1`` share one row)."""

    name = "position"
    uses = "the token's position in its request; per-position expert counts of earlier steps"
    cost_formula = "per token: 0 flops, reads its position (4 B) and a k-entry row (2k B); online: +k+E flops, +4E B"
    needs = ("pos",)

    def __init__(self, online: bool | None = None, max_pos: int = 4096) -> None:
        super().__init__(online)
        if max_pos < 1:
            raise UserError(f"position: max_pos must be >= 1, got {max_pos}")
        self.max_pos = int(max_pos)

    def params(self) -> dict:
        return {"online": self.online, "max_pos": self.max_pos}

    def _num_keys(self, trace) -> int:
        return self.max_pos

    def _keys(self, step) -> np.ndarray:
        return np.clip(step.pos, 0, self.max_pos - 1).astype(np.int64)

    def cost(self) -> PredictorCost:
        return self._lookup_cost(f"top-k table of {self.max_pos} positions per layer")


class PrevLayerTokens(TokenPredictor):
    """Cross-layer affinity (as in ExFlow / pre-gating): for layer l >= 1, score expert e
    by sum_j d^j P_l(e | i_j) over the token's experts i_0..i_{k-1} at layer l - 1 of the
    same step (highest gate weight first; d = ``slot_decay``), with
    P_l(e | i) = (A_l[i, e] + PRIOR*k*m_l[e]) / (sum_e A_l[i, e] + PRIOR*k) from the
    co-occurrence counts A_l of earlier steps. Layer 0 gets the most frequent experts."""

    name = "prev-layer"
    uses = "the token's experts at the previous layer of the same step; co-occurrence counts of earlier steps"
    cost_formula = ("per token: 2kE flops (weighted sum of k rows; online +k^2), reads k rows of E floats "
                    "and k ids (4kE+2k B)")

    def __init__(self, online: bool | None = None, slot_decay: float = 1.0) -> None:
        super().__init__(online)
        if not 0 <= slot_decay <= 1:
            raise UserError(f"prev-layer: slot_decay must be in [0, 1], got {slot_decay}")
        self.slot_decay = float(slot_decay)

    def params(self) -> dict:
        return {"online": self.online, "slot_decay": self.slot_decay}

    def _fit(self, trace: TokensTrace) -> None:
        L, E = self.num_layers, self.num_experts
        self.A = np.zeros((L, E, E), dtype=np.int64)  # A[l, i, e]: i at l-1, e at l (A[0] unused)
        self.freq = KeyedCounts(1, L, E, self.top_k)
        self._count(trace.experts)

    def _count(self, experts: np.ndarray) -> None:
        n, L, k = experts.shape
        E = self.num_experts
        self.freq.add(np.zeros(n, dtype=np.int64), experts)
        if L < 2 or n == 0:
            return
        # (layer, expert at the layer before, expert) of every slot pair, counted a cache-sized chunk of
        # tokens at a time, laid out [k, L, tokens] so that every array operation runs along the tokens
        row = (np.arange(1, L, dtype=np.intp) * (E * E))[:, None]     # [L-1, 1]
        for sl in chunks(n, (L - 1) * k * k, COUNT_ELEMENTS):
            ex = np.empty((k, L, sl.stop - sl.start), dtype=np.intp)
            ex[...] = experts[sl].transpose(2, 1, 0)
            prev = ex[:, :-1] * E + row                                # [k, L-1, c]
            flat = (prev[:, None] + ex[None, :, 1:]).ravel()           # [k, k, L-1, c]
            self.A += np.bincount(flat, minlength=L * E * E).reshape(L, E, E)

    def _conditional(self) -> np.ndarray:
        k = self.top_k
        m = self.freq.marginal()  # [L, E]
        a = PRIOR * k
        return ((self.A + a * m[:, None, :]) / (self.A.sum(axis=2, keepdims=True) + a)).astype(np.float32)

    def predict(self, step: StepRouting) -> np.ndarray:
        n = len(step.experts)
        L, E, k = self.num_layers, self.num_experts, self.top_k
        out = np.empty((n, L, k), dtype=np.int16)
        out[:, 0] = self.freq.topk(np.zeros(1, dtype=np.int64))[0, 0]
        if L < 2:
            return out
        P = self._conditional()  # [L, E, E]
        if E ** k <= n and (L - 1) * E ** k * E <= CHUNK_ELEMENTS:
            # fewer (layer, expert list) pairs than tokens, and their scores fit one work array: rank every
            # pair once, then look the tokens' up
            combos = np.indices((E,) * k).reshape(k, -1).T          # [E^k, k]: expert lists in code order
            ranked = self._ranked(P, combos[None], np.arange(1, L)[:, None])      # [L-1, E^k, k]
            code = step.experts[:, :-1, 0].astype(np.intp)              # [n, L-1]: row of the token's list
            for j in range(1, k):
                code *= E
                code += step.experts[:, :-1, j]
            code += np.arange(L - 1, dtype=np.intp) * E ** k
            out[:, 1:] = np.take(ranked.reshape(-1, k), code, axis=0)
            return out
        for sl in chunks(n, (L - 1) * E * (k + 1)):
            out[sl, 1:] = self._ranked(P, step.experts[sl, :-1, :].astype(np.int64), np.arange(1, L)[None, :])
        return out

    def _ranked(self, P: np.ndarray, prev: np.ndarray, lay: np.ndarray) -> np.ndarray:
        """The k best experts after the expert lists ``prev`` int64 [..., k] at the layer before, at the
        layers ``lay`` (1.., broadcasting with ``prev[..., 0]``) -> int16 [<that broadcast shape>, k]."""
        score = P[lay, prev[..., 0]]
        for j in range(1, self.top_k):
            if self.slot_decay > 0:
                score += np.float32(self.slot_decay ** j) * P[lay, prev[..., j]]
        return topk_desc(score, self.top_k)

    def _observe(self, step: StepRouting) -> None:
        self._count(step.experts)

    def pair_probs(self, step: StepRouting | TokensTrace, t: np.ndarray, layer: np.ndarray) -> np.ndarray:
        """Weighted mean (weights d^j) over the token's experts at layer - 1 of P_layer(e | i)
        for the (token row t, layer) pairs -> float32 [m, E]; the layer marginal at layer 0 (features of the MLP)."""
        P = self._conditional()
        out = self.freq.marginal()[layer].astype(np.float32)
        deep = layer >= 1
        if deep.any():
            tt, ll = t[deep], layer[deep]
            prev = step.experts[tt, ll - 1].astype(np.int64)  # [m', k]
            w = (self.slot_decay ** np.arange(self.top_k)).astype(np.float32)
            out[deep] = np.tensordot(P[ll[:, None], prev], w / w.sum(), axes=([1], [0]))
        return out

    def cost(self) -> PredictorCost:
        E, k = self.num_experts, self.top_k
        update = k * k if self.online else 0  # online: k*k co-occurrence increments per token
        return PredictorCost(flops_per_token=2 * k * E + update, bytes_per_token=F32 * k * E + I16 * k,
                             state_bytes=F32 * E * E, note="an E x E affinity table per layer")
