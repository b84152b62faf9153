"""Vectorised building blocks of the table predictors: keyed count tables, top-k, chunks.

A *keyed count table* holds, for every key (a token id, a position, ...) and layer,
how many of the keyed tokens were routed to each expert: int32 [keys, layers, experts].
Predictors rank experts by ``count + PRIOR * k * marginal`` where ``marginal`` is the
layer's overall expert share: because ``k * marginal <= 1`` and ``PRIOR < 1``, the prior
never overrides a difference of one observed token; it only breaks ties and decides for
keys never seen (which therefore get the layer's most frequent experts).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from moe_gps.trace.data import slot_major

#: tie-break weight of the layer marginal, in tokens (< 1, see the module docstring)
PRIOR = 0.5
#: largest float work array built at once (elements); bigger jobs go in token chunks
CHUNK_ELEMENTS = 1 << 22


def chunks(n: int, elements_per_row: int, budget: int = CHUNK_ELEMENTS) -> Iterator[slice]:
    """Row slices of [0, n) so that a chunk's work array stays under ``budget`` elements."""
    step = max(1, budget // max(1, elements_per_row))
    for lo in range(0, n, step):
        yield slice(lo, min(n, lo + step))


def topk_desc(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores along the last axis, largest first -> int16 [..., k].

    Deterministic: equal scores are ordered by lower index first.
    """
    e = scores.shape[-1]
    if k >= e:
        idx = np.argsort(-scores, axis=-1, kind="stable")
        return idx[..., :k].astype(np.int16)
    if k <= 4 and np.isfinite(scores).all():
        if scores.dtype == np.float32 and scores.size >= SMALL_TOPK_KEYS:
            return _topk_keys(scores, k)
        # a few argmax passes (each the first largest, so ties go to the lower index) beat a sort
        work = np.array(scores, dtype=np.float32 if scores.dtype == np.float32 else np.float64).reshape(-1, e)
        out = np.empty((len(work), k), dtype=np.int16)
        rows = np.arange(len(work))
        for j in range(k):
            top = work.argmax(axis=-1)
            out[:, j] = top
            if j + 1 < k:
                work[rows, top] = -np.inf
        return out.reshape(scores.shape[:-1] + (k,))
    if e <= 64:
        return np.argsort(-scores, axis=-1, kind="stable")[..., :k].astype(np.int16)
    part = np.argpartition(-scores, k - 1, axis=-1)[..., :k]
    # where more scores tie with the k-th largest than places are left for them, argpartition may take
    # any of them: those rows take a stable sort (lowest indices first)
    kth = np.take_along_axis(scores, part, axis=-1).min(axis=-1, keepdims=True)
    tied = scores == kth
    left = k - (scores > kth).sum(axis=-1)
    fix = tied.sum(axis=-1) > left
    if fix.any():
        part[fix] = np.argsort(-scores[fix], axis=-1, kind="stable")[:, :k]
    part.sort(axis=-1)  # index order first, so the stable sort below breaks ties by index
    vals = np.take_along_axis(scores, part, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1).astype(np.int16)


#: finite float32 scores of at least this many elements are ranked by :func:`_topk_keys` (below, argmax
#: passes over the rows cost less than its setup)
SMALL_TOPK_KEYS = 1 << 15


def _topk_keys(scores: np.ndarray, k: int) -> np.ndarray:
    """:func:`topk_desc` of finite float32 scores [..., E], k < E, as k column-wise maxima of int64 keys
    (an argmax along a short last axis costs a call per row): each score's bits mapped to an integer of the
    same order (-0.0 as 0.0, as comparisons see it), shifted left, with E - 1 - index in the low bits, so
    that the largest key of a row is its first largest score, and all its keys differ. -> int16 [..., k]"""
    e = scores.shape[-1]
    bits = (e - 1).bit_length()
    w = np.array(np.moveaxis(scores, -1, 0), order="C")        # [E, ...] (a copy): a maximum over E rows
    w += np.float32(0.0)                                       # -0.0 -> 0.0
    b = w.view(np.int32)
    b ^= (b >> 31) & 0x7FFFFFFF                                # negative scores: lower bits flipped
    key = b.astype(np.int64)
    key += 1 << 31                                             # > 0
    key <<= bits
    key |= (e - 1 - np.arange(e, dtype=np.int64)).reshape((e,) + (1,) * (w.ndim - 1))
    out = np.empty(scores.shape[:-1] + (k,), dtype=np.int16)
    for j in range(k):
        top = key.max(axis=0)
        out[..., j] = (e - 1) - (top & ((1 << bits) - 1))
        if j + 1 < k:
            key[key == top] = 0                                # the chosen key: below every other
    return out


def compact_keys(keys: np.ndarray, num_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_inverse=True)`` of keys int [T] in [0, num_keys), by a table of the
    ``num_keys`` keys instead of a sort -> (distinct keys int64 [U] ascending, intp [T] position of each)."""
    seen = np.zeros(num_keys, dtype=bool)
    seen[keys] = True
    uniq = np.flatnonzero(seen)
    row = np.empty(num_keys, dtype=np.intp)
    row[uniq] = np.arange(len(uniq))
    return uniq.astype(np.int64), row[keys]


class KeyedCounts:
    """Counts of experts per (key, layer): int32 [keys, layers, experts].

    ``add`` accumulates the routing of tokens with given keys; ``scores`` gives the
    ranking scores ``count + PRIOR * k * marginal`` of tokens; ``probabilities`` gives
    smoothed shares ``(count + a * k * marginal) / (k * n_key + a * k)``.
    """

    def __init__(self, num_keys: int, num_layers: int, num_experts: int, top_k: int) -> None:
        self.num_keys, self.num_layers, self.num_experts, self.top_k = num_keys, num_layers, num_experts, top_k
        self.counts = np.zeros((num_keys, num_layers, num_experts), dtype=np.int32)
        self.layer_total = np.zeros((num_layers, num_experts), dtype=np.int64)

    def add(self, keys: np.ndarray, experts: np.ndarray, valid: np.ndarray | None = None) -> None:
        """keys int [T] (0 <= key < num_keys); experts int [T, L, k]; valid bool [T] or None."""
        kept = keys if valid is None else keys[valid]
        if len(kept) and (int(kept.min()) < 0 or int(kept.max()) >= self.num_keys):   # a negative key would wrap
            raise ValueError(f"KeyedCounts.add: keys must be in [0, {self.num_keys}), got "
                             f"{int(kept.min())}..{int(kept.max())}")
        if len(keys) == 0:
            return
        L, E, K = self.num_layers, self.num_experts, self.num_keys
        # count over the distinct keys only, then add their rows (the table may have many more keys); the
        # tokens left out share an extra key K, so that one count gives the layer totals of every token too
        if valid is not None:
            keys = np.where(valid, keys, K)
        uniq, inv = compact_keys(keys, K + 1 if valid is not None else K)
        flat = slot_major(experts)                            # [k, T, L]
        flat += (inv[:, None] * L + np.arange(L)) * E
        by_key = np.bincount(flat.ravel(), minlength=len(uniq) * L * E).reshape(len(uniq), L, E)
        self.layer_total += by_key.sum(axis=0)
        if uniq[-1] == K:
            uniq, by_key = uniq[:-1], by_key[:-1]
        self.counts[uniq] += by_key.astype(np.int32)

    def marginal(self) -> np.ndarray:
        """Layer expert shares over everything added, float [L, E] (uniform if nothing yet)."""
        tot = self.layer_total.sum(axis=1, keepdims=True)
        uniform = np.full(self.layer_total.shape, 1.0 / self.num_experts)
        return np.divide(self.layer_total, tot, out=uniform, where=tot > 0)

    def topk(self, keys: np.ndarray) -> np.ndarray:
        """Most frequent k experts of each token's key: keys int [T] -> int16 [T, L, k]."""
        prior = (PRIOR * self.top_k * self.marginal()).astype(np.float32)
        if len(keys) and 0 <= keys.min() and keys.max() < self.num_keys:
            uniq, inv = compact_keys(keys, self.num_keys)
        else:
            uniq, inv = np.unique(keys, return_inverse=True)
        # rank once per distinct key, then broadcast to the tokens
        ranked = np.empty((len(uniq), self.num_layers, self.top_k), dtype=np.int16)
        for sl in chunks(len(uniq), self.num_layers * self.num_experts):
            ranked[sl] = topk_desc(self.counts[uniq[sl]].astype(np.float32) + prior, self.top_k)
        return np.take(ranked, inv.reshape(-1), axis=0)

    def probabilities(self, keys: np.ndarray, prior_tokens: float) -> np.ndarray:
        """Smoothed expert shares per distinct key: keys int [U] -> float [U, L, E], rows sum to 1."""
        k = self.top_k
        m = self.marginal()
        c = self.counts[keys].astype(np.float64)
        n = c @ np.ones(self.num_experts)  # = k * tokens of the key (sums of integers: exact in any order)
        return (c + prior_tokens * k * m) / (n + prior_tokens * k)[..., None]


class KeyIndex:
    """Compact keys for raw token ids: the ``max_keys`` most frequent ids get rows 0..K-1;
    every other id maps to K ("not in the table")."""

    def __init__(self, ids: np.ndarray, max_keys: int) -> None:
        uniq, freq = np.unique(ids, return_counts=True)
        if len(uniq) > max_keys:
            keep = np.sort(np.argsort(-freq, kind="stable")[:max_keys])
            uniq = uniq[keep]
        self.ids = uniq  # sorted
        self.size = len(uniq)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """int64 [T]: row of each id, or ``size`` for ids outside the table."""
        pos = np.searchsorted(self.ids, ids)
        pos = np.minimum(pos, max(self.size - 1, 0))
        hit = (self.ids[pos] == ids) if self.size else np.zeros(len(ids), dtype=bool)
        return np.where(hit, pos, self.size).astype(np.int64)
