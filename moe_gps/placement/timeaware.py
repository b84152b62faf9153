"""``timeaware``: a replica only where its weight read and its copy pay for themselves.

The count-balancing planners (``eplb``, ``greedy``, ``waterfill``) level tokens per GPU
and fill every redundant slot. But a replica that takes few tokens still reads its whole
weights in the expert FFN, and a new replica must first be copied: when the FFN is
weight-read bound (small batches) or links are slow, levelling tokens makes the layer
slower. This planner compares *predicted time*, from a time model given by the caller
(the simulator's cost model, :class:`TimeModel`), and per layer keeps the best of:

* **home** (the static layout plus time-aware replicas). Start from the static layout
  (:func:`moe_gps.placement.layouts.contiguous`): every expert in its home slot with all
  its tokens, exactly no duplication. Then repeat: on the GPU with the largest predicted
  time take the replica with the most tokens (expert ``e``) and move tokens of ``e`` to the
  GPU with the smallest time that holds ``e`` already (a *shift*: no copy) or has a
  redundant slot without tokens (a *copy*, charged ``copy_penalty_s``); try half the token
  gap between the two GPUs, a quarter and an eighth, keep the amount that lowers the
  layer's predicted time (plus copy penalties) most, and stop when none does. Redundant
  slots may stay unused (share 0). With ``previous`` in the static layout, its redundant
  slots keep what they hold, so using them later costs no copy.
* **balanced**: DeepSeek's EPLB layout (every slot used, even shares), its GPUs renumbered
  to keep as many experts where ``previous`` had them as possible, charged
  ``copy_penalty_s`` for every expert a GPU newly holds compared with ``previous``.

Because "home" starts from no duplication and only takes moves that lower the predicted
time, a layer is never predicted slower than with no duplication. With
``copy_penalty_s = inf`` nothing is copied: layers in the static layout only re-split
their tokens over the replicas in place, the others are kept as they are.
"""

from __future__ import annotations

import functools
from typing import Protocol

import numpy as np

from moe_gps.errors import UserError
from moe_gps.placement.eplb import eplb
from moe_gps.placement.layouts import contiguous, fill_spares
from moe_gps.placement.placement import Placement, gpu_any, gpu_sums, row_sums
from moe_gps.placement.waterfill import arrivals, relabel_gpus

#: token amounts tried per move, as fractions of half the gap between the two GPUs
TRIALS = (1.0, 0.5, 0.25)


class TimeModel(Protocol):
    """Predicted time of MoE layers as a function of where their tokens go.

    A model may also offer ``begin``, ``moved`` and ``apply`` (as
    :class:`sim.planning.LayerTimeModel` does) to price a move from per-GPU sums instead of
    whole layers: ``begin(slot_exp, slot_tokens, layers) -> (state, seconds [n], seconds [n, G])``;
    ``moved(state, rows, src, dst, expert, x) -> (seconds [m], seconds [m, G], moved)`` prices m
    moves; ``apply(state, rows, moved, pick)`` makes the moves ``pick`` of them in ``state``.
    Otherwise :class:`_Moves` prices moves with :meth:`evaluate`."""

    def evaluate(self, slot_exp: np.ndarray, slot_tokens: np.ndarray,
                 layers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """slot_exp: int [n, P] (-1 = empty, with 0 tokens); slot_tokens: float [n, P];
        layers: int [n], the layers the rows are -> (seconds [n] per layer, seconds [n, G]
        per GPU: the GPU's own share of the layer, used to pick the hottest and coldest)."""


class _Moves:
    """``begin`` / ``moved`` / ``apply`` of a time model that has only ``evaluate``: each move is
    priced by evaluating its whole layer."""

    def __init__(self, cost: TimeModel) -> None:
        self.cost = cost

    def begin(self, slot_exp, slot_tokens, layers):
        state = {"exp": slot_exp.copy(), "tok": slot_tokens.copy(), "layers": np.asarray(layers)}
        return (state, *self.cost.evaluate(slot_exp, slot_tokens, layers))

    def _moved(self, state, rows, src, dst, expert, x):
        ar = np.arange(len(rows))
        exp, tok = state["exp"][rows], state["tok"][rows]
        tok[ar, src] -= x
        tok[ar, dst] += x
        exp[ar, dst] = np.where(x > 0, expert, exp[ar, dst])
        return exp, tok

    def moved(self, state, rows, src, dst, expert, x):
        exp, tok = self._moved(state, rows, src, dst, expert, x)
        return (*self.cost.evaluate(exp, tok, state["layers"][rows]), (exp, tok))

    @staticmethod
    def apply(state, rows, moved, pick) -> None:
        exp, tok = moved
        state["exp"][rows], state["tok"][rows] = exp[pick], tok[pick]


@functools.lru_cache(maxsize=16)
def static_slots(num_layers: int, num_experts: int, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """:func:`~moe_gps.placement.layouts.contiguous` (the static layout, int64 [L, P], -1 in the slots left
    over), made once per shape: read-only."""
    base = contiguous(num_layers, num_experts, num_gpus, slots_per_gpu)
    base.setflags(write=False)
    return base


def home_layers(placement: Placement | None, base: np.ndarray, num_gpus: int) -> np.ndarray:
    """bool [L]: the layers of ``placement`` that keep every expert's home slot of ``base`` (the
    static layout); all False without a placement of the same shape."""
    L = base.shape[0]
    if placement is None or placement.num_gpus != num_gpus or placement.phy2log.shape != base.shape:
        return np.zeros(L, dtype=bool)
    home = base >= 0
    return ((placement.phy2log == base) | ~home).all(axis=1)


def new_pairs(phy2log: np.ndarray, previous: Placement | None, num_gpus: int) -> np.ndarray:
    """int [L]: (GPU, expert) pairs per layer that ``phy2log`` holds and ``previous`` did not
    (the experts to copy); 0 without a previous placement."""
    if previous is None:
        return np.zeros(phy2log.shape[0], dtype=np.int64)
    return arrivals(phy2log, previous.phy2log, num_gpus)


def timeaware(loads: np.ndarray, N: int, S: int, previous: Placement | None, cost: TimeModel | None = None,
              copy_penalty_s: float = 0.0, balanced: bool = True,
              max_moves: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Plan by predicted time (module docstring).

    loads: float [L, E] predicted tokens per expert; cost: the time model (required);
    copy_penalty_s: seconds charged to a layer for each expert copied into it (the copy's
    predicted cost spread over the steps the plan will serve; ``inf``: no copies);
    balanced: consider the balanced candidate (False: every layer keeps the static layout);
    max_moves: rounds of the home candidate at most (default 4 (R + N) + 16).
    -> (phy2log int64 [L, P], replica_share float64 [L, P], info)
    """
    if cost is None:
        raise UserError("timeaware: needs a time model (cost=...): it plans by predicted layer time, as "
                        "`moe-gps simulate` and `recommend` do with the cluster's cost model")
    penalty = float(copy_penalty_s)
    if not penalty >= 0:
        raise UserError(f"timeaware: copy_penalty_s must be >= 0, got {copy_penalty_s}")
    L, E = loads.shape
    base = static_slots(L, E, N, S)
    at_home = home_layers(previous, base, N)
    rounds = 4 * (N * S - E + N) + 16 if max_moves is None else int(max_moves)
    kept = np.zeros(L, dtype=bool)
    chosen = np.zeros(L, dtype=bool)
    copies = None
    if penalty == np.inf and previous is not None:
        # nothing may be copied: a layer not in the static layout stays as it is
        kept = ~at_home
        phy2log, share = previous.phy2log.copy(), previous.replica_share.copy()
        if at_home.any():
            phy2log[at_home], share[at_home], _ = _home(loads, N, S, base, previous, at_home, cost, penalty, rounds,
                                                        np.flatnonzero(at_home))
    else:
        phy2log, share, obj = _home(loads, N, S, base, previous, at_home, cost, penalty, rounds, np.arange(L))
        if balanced:
            bal, _ = eplb(loads, N * S, N)
            if previous is not None:
                # GPU numbers are arbitrary: keep as many experts where they are as the layout allows
                bal = relabel_gpus(bal, np.zeros(bal.shape), previous.phy2log, N, E)[0]
            bal_tok = loads[np.arange(L)[:, None], bal] / _replicas(bal, E)
            home_copies, bal_copies = new_pairs(phy2log, previous, N), new_pairs(bal, previous, N)
            score = obj + penalty * home_copies
            bal_score = cost.evaluate(bal, bal_tok, np.arange(L))[0] + penalty * bal_copies
            chosen = bal_score < score * (1 - 1e-12)
            phy2log[chosen] = bal[chosen]
            share[chosen] = 1.0 / _replicas(bal, E)[chosen]
            copies = np.where(chosen, bal_copies, home_copies)      # new_pairs is per layer
    if copies is None:
        copies = new_pairs(phy2log, previous, N)
    info = {"copy_penalty_s": penalty, "balanced_layers": int(chosen.sum()), "kept_layers": int(kept.sum()),
            "unused_slots": int(((share == 0) & ~chosen[:, None]).sum()), "copies": int(copies.sum()),
            "allow_colocated": bool(chosen.any() or (kept.any() and previous.allow_colocated))}
    return phy2log, share, info


def _replicas(phy2log: np.ndarray, E: int) -> np.ndarray:
    """float [L, P]: how many replicas the slot's expert has in its layer."""
    L, P = phy2log.shape
    key = (np.arange(L)[:, None] * E + phy2log).ravel()
    return np.bincount(key, minlength=L * E)[key].reshape(L, P).astype(np.float64)


def _home(loads: np.ndarray, N: int, S: int, base: np.ndarray, previous: Placement | None, at_home: np.ndarray,
          cost: TimeModel, penalty: float, rounds: int,
          layers: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The home candidate of ``layers`` (int [n]): (phy2log int [n, P], share float [n, P], predicted time
    float [n]); loads float [L, E], base int [L, P] (the static layout), at_home bool [L]."""
    loads, at_home = loads[layers], at_home[layers]
    slot_exp = base[layers]                                  # a copy (rows of the static layout)
    L, E = loads.shape
    P = N * S
    home = slot_exp >= 0
    spare = ~home
    tokens = np.where(home, loads[np.arange(L)[:, None], np.maximum(slot_exp, 0)], 0.0)
    if at_home.any():
        slot_exp[at_home] = previous.phy2log[layers[at_home]]
    gpu = np.arange(P) // S
    model = cost if hasattr(cost, "moved") else _Moves(cost)
    state, obj, gpu_t = model.begin(slot_exp, tokens, layers)
    score = obj.copy()
    spread = (gpu_t ** 2).sum(axis=1)
    active = loads.sum(axis=1) > 0
    copies = penalty < np.inf
    K = len(TRIALS)
    trials = np.asarray(TRIALS)
    for _ in range(rounds):
        idx = np.flatnonzero(active)
        n = len(idx)
        if not n:
            break
        r = np.arange(n)
        ex, tk, gt = slot_exp[idx], tokens[idx], gpu_t[idx]
        h = gt.argmax(axis=1)
        src = np.where(gpu == h[:, None], tk, -1.0).argmax(axis=1)              # h's replica with most tokens
        e = ex[r, src]
        src_tok = tk[r, src]
        holds_e = ex == e[:, None]
        gpu_has_e = gpu_any(holds_e, S)
        if copies:
            open_slot = spare[idx] & (tk <= 0) & ~gpu_has_e[:, gpu]              # may take a copy of e
            can = gpu_has_e | gpu_any(open_slot, S)
        else:
            can = gpu_has_e.copy()
        can[r, h] = False
        c = np.where(can, gt, np.inf).argmin(axis=1)
        shift = gpu_has_e[r, c]
        on_c = gpu == c[:, None]
        dst = (holds_e & on_c).argmax(axis=1)
        if copies:
            dst = np.where(shift, dst, (open_slot & on_c).argmax(axis=1))
        # (without copies every move that can be made is a shift: a row without one moves nothing, x = 0)
        g_tok = gpu_sums(tk, S)
        half = np.minimum(src_tok, (g_tok[r, h] - g_tok[r, c]) / 2)
        ok = can[r, c] & (src_tok > 0) & (half > 0)
        # every trial amount at once: rows k * n + j are trial k of layer idx[j]
        x = np.where(ok, half, 0.0) * trials[:, None]                                  # [K, n]
        o, g, after = model.moved(state, np.concatenate((idx,) * K), np.concatenate((src,) * K),
                                  np.concatenate((dst,) * K), np.concatenate((e,) * K), x.ravel())
        o, g = o.reshape(K, n), g.reshape(K, n, -1)
        cur = score[idx]
        s_k = o + np.where(ok & ~shift, penalty, 0.0) + (cur - obj[idx])
        # a move must lower the layer's time (with penalties), or keep it and even out the GPUs (a
        # lower sum of squared GPU times): with two GPUs at the top, either one alone cannot lower it
        sq_k = row_sums(g ** 2)
        gain = (s_k < cur * (1 - 1e-12)) | ((s_k <= cur * (1 + 1e-12)) & (sq_k < spread[idx] * (1 - 1e-9)))
        s_k = np.where(ok & gain, s_k, np.inf)
        best_k = _best(s_k, sq_k)
        best = s_k[best_k, r]
        take = np.isfinite(best)
        active[idx[~take]] = False
        t = np.flatnonzero(take)
        if not len(t):
            continue
        li = idx[t]
        bk = best_k[t]
        x = half[t] * trials[bk]
        model.apply(state, li, after, bk * n + t)          # the moves priced above
        tokens[li, src[t]] -= x
        tokens[li, dst[t]] += x
        new = ~shift[t]
        slot_exp[li[new], dst[t][new]] = e[t][new]
        obj[li] = o[bk, t]
        gpu_t[li] = g[bk, t]
        score[li] = best[t]
        spread[li] = sq_k[bk, t]
    tokens = np.maximum(tokens, 0.0)
    if (slot_exp < 0).any():
        slot_exp = fill_spares(slot_exp, loads, N)
    key = (np.arange(L)[:, None] * E + slot_exp).ravel()
    tot = np.bincount(key, weights=tokens.ravel(), minlength=L * E)[key].reshape(L, P)   # the slot's expert's tokens
    # each replica's tokens / its expert's tokens; an expert without tokens keeps them at home
    share = np.where(tot > 0, tokens / np.where(tot > 0, tot, 1.0), home.astype(np.float64))
    return slot_exp, share, obj


def _best(score: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """int [n]: per column, the row with the lowest score, ties broken by the lowest spread."""
    low = score.min(axis=0)
    tie = score <= low[None, :] * (1 + 1e-12)
    return np.where(tie, spread, np.inf).argmin(axis=0)
