"""Re-weight a trace to a higher or lower expert skew, keeping its per-token structure.

The recommendation sweeps skewness (max / mean tokens per expert, the MoE-GPS paper's
measure) beyond the trace's own. A variant of a trace is made per layer ``l`` by moving
a share of the (token, expert) assignments from experts that should lose load to
experts that should gain it (docs/recommend.md, "Skew variants"):

* ``p[l, e]``: the trace's popularity of expert e at layer l (over all its steps);
* ``q[l, e] = p[l, e] ** gamma / sum_e' p[l, e'] ** gamma``: the target popularity;
  ``gamma > 1`` sharpens it (hot experts hotter, higher skew), ``gamma < 1`` flattens
  it, ``gamma = 1`` is the trace itself, ``gamma = 0`` uniform;
* a *sender* (``p > q``) gives away the share ``s = (p - q) / p`` of its assignments; the
  *receivers* (``q > p``) take them in proportion to ``q - p``. The popularity becomes
  ``q`` (each sender loses ``p - q``, the receivers gain that total in proportion to
  their deficit), up to the rounding below.

Which assignments move keeps the per-token structure. Assignments are grouped by
(layer, expert, token id) (the token's row when the trace has no ``token_id``); within
each (layer, expert) the groups are put in a fixed pseudo-random order (a hash of token
id, layer, expert and seed) and a group moves when the midpoint of its cumulative share
in that order is below ``s``; a moved group goes to the receiver at that position of
the receivers' cumulative weights. So every occurrence of a vocabulary id routed to an
expert moves the same way (token-id, position and previous-layer predictors still find
structure), the moved share is ``s`` to within half a group, and a larger ``s`` moves a
superset. A new expert is never one the token already has at that layer (no duplicate
in a token's top-k): then another receiver is drawn (a hash per token, up to 8 tries),
else the assignment stays. Step-to-step drift stays, because moves are per assignment.

:func:`search_gamma` finds ``gamma`` by bisection so that the mean expert skew of the
simulated steps (the number ``moe-gps simulate`` prints) reaches a target, and says
when the target is out of the transform's reach.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from moe_gps.trace.data import CountsTrace, TokensTrace, expert_counts

#: a new expert is drawn at most this many times before the assignment stays where it is
MAX_DRAWS = 8
#: gamma searched in [GAMMA_MIN, GAMMA_MAX]
GAMMA_MIN, GAMMA_MAX = 0.0, 12.0


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (wraps on overflow, as intended)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_uniform(ident: np.ndarray, layer: np.ndarray, expert: np.ndarray, salt: int, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per element, a fixed function of its arguments.

    ident, layer, expert: int arrays of one shape -> float64 of that shape.
    """
    with np.errstate(over="ignore"):
        base = np.uint64((seed * 1_000_003 + salt) % 2**64)       # any seed >= 0, reduced to 64 bits
        key = _mix(np.asarray(ident, dtype=np.uint64) ^ _mix(base + np.zeros(1, np.uint64)))
        key = _mix(key ^ (np.asarray(layer, dtype=np.uint64) << np.uint64(20)) ^ np.asarray(expert, dtype=np.uint64))
    return (key >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def popularity(counts: np.ndarray) -> np.ndarray:
    """float [L, E]: share of each layer's assignments per expert. counts: [steps, L, E]."""
    tot = counts.sum(axis=0).astype(np.float64)
    return tot / np.maximum(tot.sum(axis=1, keepdims=True), 1.0)


def target_popularity(p: np.ndarray, gamma: float) -> np.ndarray:
    """q = p ** gamma, normalised per layer (experts with p = 0 stay at 0 unless gamma = 0)."""
    if gamma == 0:
        q = np.ones_like(p)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(p > 0, np.power(np.where(p > 0, p, 1.0), gamma), 0.0)
    return q / np.maximum(q.sum(axis=1, keepdims=True), 1e-300)


def transport(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move probabilities and receiver weights from p to q.

    -> send float [L, E]: probability that an assignment to e moves away;
       recv float [L, E]: each layer's receivers' weights, summing to 1 (0 where none)
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        send = np.where(p > q, (p - q) / np.where(p > 0, p, 1.0), 0.0)
    gain = np.maximum(q - p, 0.0)
    recv = gain / np.maximum(gain.sum(axis=1, keepdims=True), 1e-300)
    return np.clip(send, 0.0, 1.0), recv


class Reweighter:
    """The gamma-independent part of the token transform of one trace (groups and their order),
    so that :meth:`apply` for many gammas (the bisection, the sweep's variants) is cheap.

    trace: TokensTrace with experts int16 [N, L, k]
    """

    def __init__(self, trace: TokensTrace, seed: int = 0) -> None:
        self.trace, self.seed = trace, seed
        E, L = trace.meta.num_experts, trace.meta.num_layers
        experts = trace.experts
        N, _, k = experts.shape
        self.pop = popularity(trace.counts())
        ident = (trace.token_id.astype(np.int64) if trace.token_id is not None else np.arange(N, dtype=np.int64))
        ident = ident - ident.min() if N else ident
        span = int(ident.max()) + 1 if N else 1
        le = np.arange(L, dtype=np.int64)[None, :, None] * E + experts.astype(np.int64)       # [N, L, k]
        key = le * span + ident[:, None, None]
        uniq, inv, weight = np.unique(key.ravel(), return_inverse=True, return_counts=True)
        g_le, g_id = np.divmod(uniq, span)
        g_l, g_e = np.divmod(g_le, E)
        u = hash_uniform(g_id, g_l, g_e, 0, seed)
        order = np.lexsort((u, g_le))
        seg, w = g_le[order], weight[order].astype(np.float64)
        total = np.bincount(seg, weights=w, minlength=L * E)
        cum = np.cumsum(w)
        first = np.r_[True, seg[1:] != seg[:-1]]
        base = np.maximum.accumulate(np.where(first, cum - w, 0.0))      # cumsum before each segment
        mid = np.empty(len(uniq))
        mid[order] = (cum - w - base + w / 2) / total[seg]
        #: per assignment: the midpoint of its group's cumulative share within (layer, expert)
        self.position = mid[inv].reshape(N, L, k)
        self.ident = ident

    def apply(self, gamma: float, pop: np.ndarray | None = None) -> TokensTrace:
        """The variant for ``gamma`` (module docstring); ``pop`` overrides the popularity p."""
        trace = self.trace
        if gamma == 1.0:
            return trace
        E, L = trace.meta.num_experts, trace.meta.num_layers
        experts = trace.experts
        N, _, k = experts.shape
        p = self.pop if pop is None else pop
        send, recv = transport(p, target_popularity(p, gamma))
        cdf = np.cumsum(recv, axis=1)
        layer = np.arange(L)[None, :]
        out = experts.copy()
        for j in range(k):
            e = experts[:, :, j].astype(np.int64)
            s = send[layer, e]                                  # [N, L]
            pos = self.position[:, :, j]
            move = pos < s
            t, l = np.nonzero(move)
            if len(t) == 0:
                continue
            r = pos[t, l] / s[t, l]                             # place within the moved share, [0, 1)
            cand = np.empty(len(t), dtype=np.int64)
            for ll in np.unique(l):
                sel = l == ll
                cand[sel] = np.minimum(np.searchsorted(cdf[ll], r[sel], side="right"), E - 1)
            # not allowed: the token's own experts, and earlier slots' new experts
            forbidden = np.concatenate([experts[t, l].astype(np.int64), out[t, l, :j].astype(np.int64)], axis=1)
            todo = np.arange(len(t))
            for attempt in range(MAX_DRAWS + 1):
                if attempt:
                    u = hash_uniform(self.ident[t[todo]] * (k + 1) + j, l[todo], e[t[todo], l[todo]], attempt, self.seed)
                    cand[todo] = np.minimum((cdf[l[todo]] <= u[:, None]).sum(axis=1), E - 1)
                c = cand[todo]
                ok = ~(forbidden[todo] == c[:, None]).any(axis=1) & (recv[l[todo], c] > 0)
                out[t[todo[ok]], l[todo[ok]], j] = c[ok]
                todo = todo[~ok]
                if len(todo) == 0:
                    break
        meta = dataclasses.replace(trace.meta, provenance={**trace.meta.provenance,
                                                           "skew_variant": {"gamma": gamma, "seed": self.seed}})
        return dataclasses.replace(trace, meta=meta, experts=out)


def reweight_tokens(trace: TokensTrace, gamma: float, seed: int = 0, pop: np.ndarray | None = None) -> TokensTrace:
    """A copy of ``trace`` with its expert popularity moved towards ``p ** gamma`` (module docstring).

    experts int16 [N, L, k] -> the same shape; every other column is kept. ``pop`` (float
    [L, E]) is the popularity p to start from (default: the trace's own).
    """
    if gamma == 1.0:
        return trace
    return Reweighter(trace, seed).apply(gamma, pop)


def reweight_counts(trace: CountsTrace, gamma: float, pop: np.ndarray | None = None) -> CountsTrace:
    """The same transport applied to each step's counts in expectation, rounded to integers
    (largest remainder, so every layer keeps its total) and capped at the step's tokens
    per expert (an expert appears at most once in a token's top-k)."""
    if gamma == 1.0:
        return trace
    counts = trace.counts()
    c = counts.astype(np.float64)                         # [S, L, E]
    p = popularity(counts) if pop is None else pop
    send, recv = transport(p, target_popularity(p, gamma))
    moved = c * send[None]
    new = c - moved + moved.sum(axis=2, keepdims=True) * recv[None]
    cap = trace.tokens_per_step.astype(np.float64)[:, None, None]
    over = np.maximum(new - cap, 0.0)
    new = np.minimum(new, cap)
    room = np.maximum(cap - new, 0.0)
    new += over.sum(axis=2, keepdims=True) * room / np.maximum(room.sum(axis=2, keepdims=True), 1e-300)
    base = np.floor(new + 1e-9)
    short = np.rint(c.sum(axis=2) - base.sum(axis=2)).astype(np.int64)      # [S, L]
    order = np.argsort(-(new - base), axis=2, kind="stable")
    rank = np.argsort(order, axis=2, kind="stable")
    base += rank < short[..., None]
    meta = dataclasses.replace(trace.meta, provenance={**trace.meta.provenance, "skew_variant": {"gamma": gamma}})
    return CountsTrace(meta, base.astype(np.int64))


def reweight(trace: TokensTrace | CountsTrace, gamma: float, seed: int = 0) -> TokensTrace | CountsTrace:
    """:func:`reweight_tokens` or :func:`reweight_counts`, by the trace's kind."""
    if isinstance(trace, TokensTrace):
        return reweight_tokens(trace, gamma, seed)
    return reweight_counts(trace, gamma)


def variant_maker(trace: TokensTrace | CountsTrace, seed: int = 0):
    """A function gamma -> variant of ``trace`` that reuses the gamma-independent work."""
    if isinstance(trace, TokensTrace):
        rw = Reweighter(trace, seed)
        return rw.apply
    return lambda gamma: reweight_counts(trace, gamma)


def mean_expert_skew(trace: TokensTrace | CountsTrace, first_step: int = 0) -> float:
    """Mean over steps >= first_step and layers of max / mean tokens per expert (the skewness
    ``moe-gps simulate`` reports for its simulated steps)."""
    if isinstance(trace, TokensTrace):
        lo = int(trace.step_offsets[first_step])
        c = expert_counts(trace.experts[lo:], trace.step_offsets[first_step:] - lo, trace.meta.num_experts)
    else:
        c = trace.counts()[first_step:]
    c = c.astype(np.float64)
    mean = c.mean(axis=2)
    ok = mean > 0
    return float((c.max(axis=2)[ok] / mean[ok]).mean())


@dataclass
class SkewVariant:
    """A trace re-weighted towards a target skew.

    key:       label used in tables ("trace" for the trace itself, else "skew=<target>")
    target:    requested mean expert skew (None for the trace itself)
    gamma:     the sharpening exponent (1.0 = unchanged)
    achieved:  mean expert skew of the simulated steps of the variant
    reachable: False when the target lies outside what the transform can reach (the
               nearest reachable variant is used, and the report says so)
    """

    key: str
    target: float | None
    gamma: float
    achieved: float
    reachable: bool = True


def search_gamma(trace: TokensTrace | CountsTrace, target: float, first_step: int, seed: int = 0,
                 tol: float = 0.01, max_iter: int = 24, make=None) -> SkewVariant:
    """Bisection on gamma (the skew rises with it) until the mean expert skew of steps >=
    ``first_step`` of the variant is within ``tol`` of ``target``; the closest found when it
    cannot be. ``make``: a :func:`variant_maker` of ``trace`` to reuse."""
    key = f"skew={target:g}"
    make = make or variant_maker(trace, seed)

    def skew_at(g: float) -> float:
        return mean_expert_skew(make(g), first_step)

    base = skew_at(1.0)
    if abs(base - target) <= tol:
        return SkewVariant(key, target, 1.0, base)
    up = target > base
    lo, hi = (1.0, GAMMA_MAX) if up else (GAMMA_MIN, 1.0)
    end = hi if up else lo
    s_end = skew_at(end)
    if (up and s_end < target - tol) or (not up and s_end > target + tol):
        return SkewVariant(key, target, end, s_end, reachable=False)   # out of reach
    best = (abs(s_end - target), end, s_end)
    for _ in range(max_iter):
        mid = (lo + hi) / 2
        s = skew_at(mid)
        if abs(s - target) < best[0]:
            best = (abs(s - target), mid, s)
        if abs(s - target) <= tol:
            break
        lo, hi = (mid, hi) if s < target else (lo, mid)
    _, g, s = best
    return SkewVariant(key, target, g, s, reachable=abs(s - target) <= 2 * tol)
