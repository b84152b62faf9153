"""Hot-to-cold copying: the MoE-GPS paper's Algorithm 1 and our best-fit variant.

Start from a layout of whole experts (the static contiguous one for the paper's
algorithm). Then, while the hottest GPU ``h`` and the coldest GPU ``c`` differ by more
than ``threshold`` x the mean GPU load:

* take an expert on ``h`` (the paper: its most popular one, i.e. the replica with the
  most tokens on ``h``);
* if ``c`` already holds that expert, shift tokens to that replica; otherwise copy the
  expert into a free slot of ``c`` (the memory cap: ``c`` must have one; the cap on
  copies: at most ``max_copies`` per layer);
* move ``min(tokens of that replica on h, (load_h - load_c) / 2)`` tokens from ``h`` to ``c``.

``c`` is the coldest GPU with a free slot (or, for a shift, the coldest GPU overall).
Every move lowers the sum of squared GPU loads, so the loop ends; it also stops when
no move is possible or after ``max_iters`` rounds. Shares come out uneven: each
replica takes the tokens it was given. Slots still free at the end get spare
replicas with share 0 (see :mod:`moe_gps.placement.layouts`).

``pick="best_fit"`` (used by our ``waterfill`` planner, :func:`best_fit_copies`) makes
copies only, to the coldest GPU with a free slot, of the replica on ``h`` that best
carries half the gap (the smallest one that can carry it all, else the largest) among
the experts that GPU lacks; it closes the gap with fewer copies, and ``waterfill``
re-splits the shares afterwards anyway.

All layers advance in lockstep: one round is a few numpy operations on [layers, ...].
"""

from __future__ import annotations

import numpy as np


def copy_hot_to_cold(slot_exp: np.ndarray, loads: np.ndarray, num_gpus: int, max_copies: int,
                     threshold: float, pick: str = "most_popular",
                     max_iters: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the copy loop from a layout of whole experts.

    slot_exp: int [L, P], -1 = free slot; every expert appears exactly once.
    loads:    float [L, E].
    pick:     "most_popular" (the paper: may also shift tokens to a replica the coldest
              GPU already holds; at most ``max_iters`` rounds) or "best_fit" (copies
              only, at most ``max_copies`` rounds).
    Returns (slot_exp int64 [L, P] with -1 left where no copy went, slot tokens float64
    [L, P], copies made per layer int64 [L]).
    """
    L, P = slot_exp.shape
    N = num_gpus
    S = P // N
    rows = np.arange(L)
    r2 = rows[:, None]
    w = np.asarray(loads, dtype=np.float64)
    slot_exp = slot_exp.astype(np.int64).copy()
    held = slot_exp >= 0
    tokens = np.where(held, w[r2, np.where(held, slot_exp, 0)], 0.0)
    gpu_load = tokens.reshape(L, N, S).sum(axis=2)
    free = (~held).reshape(L, N, S).sum(axis=2)
    copies = np.zeros(L, dtype=np.int64)
    tol = threshold * w.sum(axis=1) / N
    active = w.sum(axis=1) > 0
    local = np.arange(S)
    if pick == "best_fit":
        return _best_fit_copies(slot_exp, tokens, gpu_load, free, N, S, np.full(L, max_copies), tol, active)
    if pick != "most_popular":
        raise ValueError(f"pick must be 'most_popular' or 'best_fit', got {pick!r}")
    if max_iters is None:
        max_iters = 4 * (max_copies + N) + 16
    for _ in range(max_iters):
        if not active.any():
            break
        h = gpu_load.argmax(axis=1)
        c_free = np.where(free > 0, gpu_load, np.inf).argmin(axis=1)
        has_free = free[rows, c_free] > 0
        h_slots = h[:, None] * S + local                                  # [L, S]
        h_exp = slot_exp[r2, h_slots]
        h_tok = np.where(h_exp >= 0, tokens[r2, h_slots], -1.0)
        choice = h_tok.argmax(axis=1)
        e0 = h_exp[rows, choice]
        c_any = gpu_load.argmin(axis=1)
        any_slots = c_any[:, None] * S + local
        on_any = slot_exp[r2, any_slots] == e0[:, None]
        free_slots = c_free[:, None] * S + local
        on_free = slot_exp[r2, free_slots] == e0[:, None]
        shift = on_any.any(axis=1) & (gpu_load[rows, h] - gpu_load[rows, c_any] > tol)
        target = np.where(shift, c_any, c_free)
        gap = gpu_load[rows, h] - gpu_load[rows, target]
        existing = np.where(shift, any_slots[rows, on_any.argmax(axis=1)],
                            np.where(on_free.any(axis=1), free_slots[rows, on_free.argmax(axis=1)], -1))
        src = h_slots[rows, choice]
        e = slot_exp[rows, src]
        src_tok = h_tok[rows, choice]
        need_copy = existing < 0
        ok = active & (gap > tol) & (src_tok > 0) & (target != h) & (~need_copy | (has_free & (copies < max_copies)))
        if not ok.any():
            break
        move = np.minimum(src_tok, gap / 2)
        t_slots = target[:, None] * S + local
        first_free = (slot_exp[r2, t_slots] < 0).argmax(axis=1)
        dst = np.where(need_copy, t_slots[rows, first_free], existing)
        r = rows[ok]
        newc = ok & need_copy
        slot_exp[rows[newc], dst[newc]] = e[newc]
        free[rows[newc], target[newc]] -= 1
        copies += newc
        tokens[r, src[r]] -= move[r]
        tokens[r, dst[r]] += move[r]
        gpu_load[r, h[r]] -= move[r]
        gpu_load[r, target[r]] += move[r]
        active &= ok
    return slot_exp, tokens, copies


def best_fit_copies(slot_exp: np.ndarray, tokens: np.ndarray, num_gpus: int, max_copies,
                    threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best-fit copy loop from any layout with free (-1) slots and tokens per slot.

    slot_exp: int [L, P], negative = free: -1, or ``-(e + 2)`` for a slot freed from expert
    ``e`` (the loop then treats ``e`` as still on that GPU and never copies it back there);
    tokens: float [L, P] (tokens each replica takes); max_copies: int or int [L]. A copy
    goes into the lowest free slot of the target GPU.
    Returns (slot_exp, tokens, copies per layer), as :func:`copy_hot_to_cold`.
    """
    L, P = slot_exp.shape
    N = num_gpus
    S = P // N
    slot_exp = slot_exp.astype(np.int64).copy()
    tokens = np.asarray(tokens, dtype=np.float64).copy()
    gpu_load = tokens.reshape(L, N, S).sum(axis=2)
    free = (slot_exp < 0).reshape(L, N, S).sum(axis=2)
    total = gpu_load.sum(axis=1)
    return _best_fit_copies(slot_exp, tokens, gpu_load, free, N, S, np.broadcast_to(max_copies, (L,)),
                            threshold * total / N, total > 0)


def _best_fit_copies(slot_exp, tokens, gpu_load, free, N, S, max_copies, tol, active):
    """The best-fit loop, one copy per round (the hot path of ``waterfill``)."""
    L, P = slot_exp.shape
    rows = np.arange(L)
    local = np.arange(S)
    copies = np.zeros(L, dtype=np.int64)
    flat_exp = slot_exp.reshape(-1)
    flat_tok = tokens.reshape(-1)
    flat_load = gpu_load.reshape(-1)
    flat_free = free.reshape(-1)
    row_slot = rows * P
    row_gpu = rows * N
    active = active & (np.asarray(max_copies) > 0)
    for _ in range(int(np.max(max_copies, initial=0))):
        h = gpu_load.argmax(axis=1)
        t = np.where(free > 0, gpu_load, np.inf).argmin(axis=1)
        hs = (row_slot + h * S)[:, None] + local                       # flat slots of the hottest GPU
        ts = (row_slot + t * S)[:, None] + local
        h_exp = flat_exp[hs]
        t_exp = flat_exp[ts]
        t_real = np.where(t_exp >= -1, t_exp, -t_exp - 2)             # a freed slot remembers its expert
        there = (h_exp[:, :, None] == t_real[:, None, :]).any(axis=2) | (h_exp < 0)
        h_tok = np.where(there, -1.0, flat_tok[hs])
        gap = flat_load[row_gpu + h] - flat_load[row_gpu + t]
        half = gap / 2
        fit = np.where(h_tok >= half[:, None], h_tok, np.inf)
        choice = np.where(np.isfinite(fit).any(axis=1), fit.argmin(axis=1), h_tok.argmax(axis=1))
        src = hs[rows, choice]
        src_tok = h_tok[rows, choice]                              # -1 where nothing can go
        ok = active & (gap > tol) & (src_tok > 0) & (flat_free[row_gpu + t] > 0) & (t != h)
        if not ok.any():
            break
        r = rows[ok]
        move = np.minimum(src_tok, half)[ok]
        dst = ts[rows, (t_exp < 0).argmax(axis=1)][ok]
        flat_exp[dst] = flat_exp[src[ok]]
        flat_free[row_gpu[ok] + t[ok]] -= 1
        flat_tok[src[ok]] -= move
        flat_tok[dst] = move
        flat_load[row_gpu[ok] + h[ok]] -= move
        flat_load[row_gpu[ok] + t[ok]] += move
        copies[r] += 1
        active &= ok & (copies < max_copies)
    return slot_exp, tokens, copies
