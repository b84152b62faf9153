"""``waterfill``: our planner. Uneven replica shares, best of two layouts, migration-aware.

DeepSeek's EPLB splits every expert's tokens evenly over its replicas, so a replica is
only useful in whole ``1/replicas`` steps. With uneven shares (the runtime sends a
chosen fraction of an expert's tokens to each replica) one copy can take exactly the
tokens that level two GPUs. Per layer:

A. *EPLB layout, water-filled*: DeepSeek's EPLB layout (global variant); replicas of
   one expert on the same GPU are merged into one (the freed slot takes a spare);
   then, starting from EPLB's even split, the best token split for that layout
   (:func:`moe_gps.placement.shares.optimal_shares`). Each water-filling step can
   only lower the busiest GPU it touches, so A is never worse than EPLB.
B. *Hot-to-cold copies, water-filled*: whole experts heaviest first onto the lightest
   GPU (at most ceil(E/N) per GPU, so every GPU keeps free slots), then the best-fit
   copy loop of :mod:`moe_gps.placement.greedy` (copy the replica of the hottest GPU
   that best carries half the gap to the coldest GPU with room) until the gap is
   within ``threshold`` x mean, then the best token split. Uses copies only where
   they close a gap, so it often needs fewer replicas than EPLB.

The layer takes the better of A and B (higher balancedness; on a tie, fewer
replicas with tokens). With ``previous`` (the placement in force), a third candidate
is the previous layout with re-split shares, which moves no weights: it is kept when
its balancedness is within ``migration_tolerance`` of the best; otherwise the new
layout's GPUs are renumbered to overlap the previous one as much as possible, which
cuts the weights to move without changing balance.

Slots left free hold spare replicas with share 0 (:mod:`moe_gps.placement.layouts`).
"""

from __future__ import annotations

import numpy as np

from moe_gps.errors import UserError
from moe_gps.placement.eplb import pack, replicate
from moe_gps.placement.greedy import best_fit_copies, copy_hot_to_cold
from moe_gps.placement.layouts import fill_spares, shares_from_tokens
from moe_gps.placement.placement import first_copies
from moe_gps.placement.shares import optimal_shares


def gpu_balancedness(phy2log: np.ndarray, share: np.ndarray, loads: np.ndarray, num_gpus: int) -> np.ndarray:
    """float64 [L]: mean / max GPU load of a placement under ``loads``."""
    L, P = phy2log.shape
    g = (np.take_along_axis(loads, phy2log, axis=1) * share).reshape(L, num_gpus, P // num_gpus).sum(axis=2)
    mx = g.max(axis=1)
    return np.where(mx > 0, g.mean(axis=1) / np.where(mx > 0, mx, 1.0), 1.0)


def merge_colocated(slot_exp: np.ndarray, share: np.ndarray, N: int, E: int) -> tuple[np.ndarray, np.ndarray]:
    """Free (-1) every replica of an expert beyond the first on the same GPU, adding its share
    to that first one. The GPU loads do not change; the freed slot can hold a spare.

    slot_exp: int [L, P]; share: float [L, P] -> (int64 [L, P], float64 [L, P])
    """
    L, P = slot_exp.shape
    S = P // N
    key = (np.arange(P) // S)[None, :] * (E + 1) + np.where(slot_exp >= 0, slot_exp, E)
    order = np.argsort(key, axis=1, kind="stable")
    sk = np.take_along_axis(key, order, axis=1)
    ss = np.take_along_axis(share, order, axis=1)
    first = np.ones_like(sk, dtype=bool)
    first[:, 1:] = (sk[:, 1:] != sk[:, :-1]) | (sk[:, 1:] % (E + 1) == E)
    run = np.cumsum(first, axis=1) - 1                          # run index within the row
    run_share = np.bincount((np.arange(L)[:, None] * P + run).ravel(), weights=ss.ravel(),
                            minlength=L * P).reshape(L, P)
    merged_sorted = np.where(first, np.take_along_axis(run_share, run, axis=1), 0.0)
    merged = np.empty_like(merged_sorted)
    np.put_along_axis(merged, order, merged_sorted, axis=1)
    dup = np.empty_like(first)
    np.put_along_axis(dup, order, ~first, axis=1)
    return np.where(dup, -1, slot_exp), merged


def two_layouts(loads: np.ndarray, N: int, S: int, copies: int) -> tuple[np.ndarray, np.ndarray]:
    """The starting layouts of candidates A and B, packed in one batched call.

    A: DeepSeek's global EPLB with ``copies`` extra replicas (exactly
    :func:`moe_gps.placement.eplb.eplb` when ``copies = N * S - E``; with fewer, the
    unused slots are weightless items packed last and come back -1).
    B: whole experts, heaviest first onto the lightest GPU, at most ceil(E/N) per GPU,
    in each GPU's first slots; the other slots -1.
    -> (A int64 [L, P], B int64 [L, P])
    """
    L, E = loads.shape
    P = N * S
    rows = np.arange(L)[:, None]
    slot2log, _, count = replicate(loads, E + copies)
    wa = np.full((L, P), -1.0)
    wa[:, :E + copies] = np.take_along_axis(loads / count, slot2log, axis=1)
    wb = np.full((L, P), -1.0)                # loads are >= 0: the padding sorts last
    wb[:, :E] = loads
    per_b = -(-E // N)
    if S == 1:                                # DeepSeek's one-slot rule: pack apart
        a_gpu, a_pos = pack(wa, N)
        b_gpu, b_pos = pack(wb, N, capacity=np.full(L, per_b))
    else:
        gpu, pos = pack(np.concatenate([wa, wb]), N, capacity=np.repeat([S, per_b], L))
        a_gpu, a_pos, b_gpu, b_pos = gpu[:L], pos[:L], gpu[L:], pos[L:]
    a = np.full((L, P), -1, dtype=np.int64)
    a[rows, (a_gpu * S + a_pos)[:, :E + copies]] = slot2log
    b = np.full((L, P), -1, dtype=np.int64)
    b[rows, (b_gpu * S + b_pos)[:, :E]] = np.arange(E)
    return a, b


def waterfill(loads: np.ndarray, N: int, S: int, previous=None, threshold: float = 0.0,
              max_copies: int | None = None, migration_tolerance: float = 0.002,
              max_sweeps: int = 2) -> tuple[np.ndarray, np.ndarray, dict]:
    L, E = loads.shape
    R = N * S - E
    max_copies = R if max_copies is None else min(int(max_copies), R)
    if max_copies < 0 or threshold < 0 or migration_tolerance < 0 or max_sweeps < 0:
        raise UserError("waterfill: max_copies, threshold, migration_tolerance and max_sweeps must be >= 0")
    rows = np.arange(L)[:, None]

    # A: DeepSeek's EPLB layout (max_copies extra replicas; the other slots free), colocated
    # replicas merged; its water-filling starts from EPLB's even split: never worse than EPLB
    a_exp, b_start = two_layouts(loads, N, S, max_copies)
    held = a_exp >= 0
    count = np.bincount((rows * E + np.where(held, a_exp, 0))[held], minlength=L * E).reshape(L, E)
    a_even = np.where(held, 1.0 / np.maximum(count[rows, np.where(held, a_exp, 0)], 1), 0.0)
    a_exp, a_start = merge_colocated(a_exp, a_even, N, E)
    # B: whole experts balanced, then best-fit copies hot to cold
    b_exp, tokens, _ = copy_hot_to_cold(b_start, loads, N, max_copies, threshold, pick="best_fit")
    # C (with previous): the previous layout, starting from its shares; it moves nothing
    cands = [a_exp, b_exp]
    reuse = previous is not None and previous.phy2log.shape[1] == N * S
    if reuse:
        cands.append(previous.phy2log)
    k = len(cands)
    tiled = np.tile(loads, (k, 1))
    stacked = fill_spares(np.concatenate(cands), tiled, N)                    # [k * L, P]
    starts = [np.where(a_exp >= 0, a_start, 0.0), shares_from_tokens(stacked[L:2 * L], tokens, E)]
    if reuse:
        starts.append(previous.replica_share)
    # one water-filling run over all candidates at once: the same numpy calls on k x the rows
    shares = optimal_shares(stacked, tiled, N, np.concatenate(starts), max_sweeps=max_sweeps)
    bal = gpu_balancedness(stacked, shares, tiled, N).reshape(k, L)
    used = (shares > 0).sum(axis=1).reshape(k, L)

    take_b = (bal[1] > bal[0] + 1e-9) | ((bal[1] >= bal[0] - 1e-9) & (used[1] < used[0]))
    phy2log = np.where(take_b[:, None], stacked[L:2 * L], stacked[:L])
    share = np.where(take_b[:, None], shares[L:2 * L], shares[:L])
    info = {"threshold": threshold, "max_copies": max_copies, "max_sweeps": max_sweeps,
            "layers_from_copies": int(take_b.sum()), "layers_from_eplb_layout": int((~take_b).sum())}
    if previous is None:
        return phy2log, share, info

    # migration-aware: the new plan with its GPUs renumbered to overlap the previous one, or
    # the previous layout changed in only k slots (k = 0: as is, with new shares), whichever
    # moves the fewest experts among those within migration_tolerance of the best balance
    best = np.maximum(bal[0], bal[1])
    phy2log, share = relabel_gpus(phy2log, share, previous.phy2log, N, E)
    if not reuse:
        info["layers_kept"] = 0
        return phy2log, share, info
    prev = previous.phy2log
    ks = [0] + [2 ** i for i in range(int(np.log2(max(R, 1))) + 1) if 2 ** i < R] + ([R] if R > 0 else [])
    d_exp, d_share = incremental(loads, N, S, prev, shares[2 * L:], ks, threshold, max_sweeps)
    nk = len(ks)
    d_bal = gpu_balancedness(d_exp, d_share, np.tile(loads, (nk, 1)), N).reshape(nk, L)
    d_moves = arrivals(d_exp, np.tile(prev, (nk, 1)), N).reshape(nk, L)
    new_moves = arrivals(phy2log, prev, N)
    ok = d_bal >= best[None, :] - migration_tolerance                     # [nk, L]
    cost = np.where(ok, d_moves, np.iinfo(np.int64).max)
    pick = cost.argmin(axis=0)                                           # fewest moves (smallest k on ties)
    use_d = ok[pick, np.arange(L)] & (cost[pick, np.arange(L)] <= new_moves)
    if use_d.any():
        idx = pick[use_d] * L + np.flatnonzero(use_d)
        phy2log[use_d] = d_exp[idx]
        share[use_d] = d_share[idx]
        # a kept layer of an EPLB plan may hold two replicas of an expert on one GPU
        info["allow_colocated"] = bool(previous.allow_colocated)
    info["layers_kept"] = int((use_d & (pick == 0)).sum())
    info["layers_changed_in_place"] = int((use_d & (pick > 0)).sum())
    info["migration_tolerance"] = migration_tolerance
    return phy2log, share, info


def incremental(loads: np.ndarray, N: int, S: int, prev: np.ndarray, prev_share: np.ndarray, ks: list[int],
                threshold: float, max_sweeps: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidates that change the previous layout in at most k slots, for each k in ``ks``.

    The k replicas that carry the fewest tokens (never an expert's busiest replica) are
    freed, their tokens go to that expert's busiest replica, the best-fit copy loop
    refills at most k of the freed slots, and slots it leaves free get their old
    expert back (no move). prev_share: the previous layout's shares already re-split
    for ``loads``. -> (phy2log int64 [len(ks) * L, P], shares float64 [len(ks) * L, P]).
    """
    L, P = prev.shape
    E = loads.shape[1]
    rows = np.arange(L)[:, None]
    tok = loads[rows, prev] * prev_share
    # rank each replica within its expert by tokens, busiest first
    by_tok = np.argsort(-tok, axis=1, kind="stable")
    by_exp = np.take_along_axis(by_tok, np.argsort(np.take_along_axis(prev, by_tok, axis=1), axis=1,
                                                   kind="stable"), axis=1)
    sorted_exp = np.take_along_axis(prev, by_exp, axis=1)
    first = np.ones((L, P), dtype=bool)
    first[:, 1:] = sorted_exp[:, 1:] != sorted_exp[:, :-1]
    top_slot = np.zeros((L, E), dtype=np.int64)
    top_slot[np.broadcast_to(rows, (L, P))[first], sorted_exp[first]] = by_exp[first]
    removable = np.ones((L, P), dtype=bool)
    np.put_along_axis(removable, by_exp, ~first, axis=1)
    # removal order: least tokens first
    order = np.argsort(np.where(removable, tok, np.inf), axis=1, kind="stable")
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.broadcast_to(np.arange(P), (L, P)), axis=1)
    exps, toks, caps = [], [], []
    for k in ks:
        gone = removable & (position < k)
        moved = np.bincount((rows * E + prev)[gone], weights=tok[gone], minlength=L * E).reshape(L, E)
        t = np.where(gone, 0.0, tok)
        t[rows, top_slot] += moved
        exps.append(np.where(gone, -prev - 2, prev))
        toks.append(t)
        caps.append(np.full(L, k))
    slot_exp, tokens, _ = best_fit_copies(np.concatenate(exps), np.concatenate(toks), N, np.concatenate(caps),
                                          threshold)
    old = np.tile(prev, (len(ks), 1))
    slot_exp = np.where(slot_exp < 0, old, slot_exp)                     # unused freed slots: as before
    share = optimal_shares(slot_exp, np.tile(loads, (len(ks), 1)), N,
                           shares_from_tokens(slot_exp, tokens, E), max_sweeps=max_sweeps)
    return slot_exp, share


def arrivals(new: np.ndarray, old: np.ndarray, N: int) -> np.ndarray:
    """int64 [rows]: (GPU, expert) pairs in ``new`` that ``old`` lacks (weights to send).

    new: int [rows, N * S]; old: int [rows, N * S_old]. Each GPU's few slots are compared one slot
    column at a time (numpy's reductions over a short last axis are several times slower)."""
    R, P = new.shape
    nb = new.reshape(R, N, P // N)
    ob = old.reshape(R, N, old.shape[1] // N)
    sent = np.zeros(R, dtype=np.int64)
    for s, first in enumerate(first_copies(nb)):
        col = nb[:, :, s]
        had = col == ob[:, :, 0]
        for t in range(1, ob.shape[2]):
            had |= col == ob[:, :, t]
        # an expert a GPU newly holds twice is sent once: count its first slot only
        sent += (first & ~had).sum(axis=1)
    return sent


def relabel_gpus(phy2log: np.ndarray, share: np.ndarray, prev: np.ndarray, N: int,
                 E: int) -> tuple[np.ndarray, np.ndarray]:
    """Renumber the GPUs of a new plan to keep experts where they were (greedy matching).

    GPU numbers are arbitrary, so any permutation of whole GPUs is an equally good
    plan; this picks, hottest overlap first, the old GPU that shares the most experts
    with each new GPU. Within a GPU, slots keep their order.
    """
    L, P = phy2log.shape
    S = P // N
    layer = np.arange(L)[:, None]
    old_on = np.zeros((L, E, N), dtype=bool)                            # [L, E, old GPU]: held it
    old_on[layer[:, :, None], prev.reshape(L, N, -1), np.arange(N)[None, :, None]] = True
    # [L, new GPU, old GPU]: experts in common, from each new GPU's S slots (an expert it holds
    # twice counted once), a slot column at a time
    nb = phy2log.reshape(L, N, S)
    overlap = np.zeros((L, N, N))
    for s, first in enumerate(first_copies(nb)):
        overlap += old_on[layer, nb[:, :, s]] & first[:, :, None]
    rows = np.arange(L)
    order = np.argsort(-overlap.max(axis=2), axis=1, kind="stable")     # surest matches first
    free_old = np.zeros((L, N))                                         # -inf once taken
    mapping = np.zeros((L, N), dtype=np.int64)                          # new GPU -> old number
    for k in range(N):
        gn = order[:, k]
        go = (overlap[rows, gn] + free_old).argmax(axis=1)
        mapping[rows, gn] = go
        free_old[rows, go] = -np.inf
    # mapping: new GPU gn gets number mapping[gn]; reorder the slot blocks
    inv = np.argsort(mapping, axis=1)                           # old number -> new GPU
    idx = (inv[:, :, None] * S + np.arange(S)).reshape(L, P)
    return np.take_along_axis(phy2log, idx, axis=1), np.take_along_axis(share, idx, axis=1)
