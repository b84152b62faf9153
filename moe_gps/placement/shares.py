"""Uneven replica shares by water-filling: the best token split for a fixed placement.

Given where the replicas are, choose how much of each expert's load each of its GPUs
takes so that the busiest GPU is as light as possible. The achievable GPU load
vectors form a polymatroid base polytope, so the split that minimises the sum of
squared GPU loads also minimises the maximum (it is the lexicographically optimal
one). We minimise that sum by block coordinate descent: for one expert at a time,
with the other experts' loads fixed, the best split is *water-filling* over its GPUs
(pour the expert's load into the least loaded of its GPUs until they are level).
Sweeps repeat until no GPU load changes by more than ``tol`` of the mean.

Vectorised: the experts with replicas on two or more GPUs are coloured so that the
experts of one colour share no GPU within a layer; a sweep water-fills one colour at a
time, all layers and all experts of that colour in the same numpy calls (the same
result as one expert at a time). Experts whose replicas all sit on one GPU keep their
split; replicas of one expert on the same GPU split that GPU's part evenly.
"""

from __future__ import annotations

import numpy as np


def split_experts(phy2log: np.ndarray, num_gpus: int, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Replicas per (layer, GPU, expert): int64 [L, N, E]; distinct GPUs per expert: int64 [L, E]."""
    L, P = phy2log.shape
    S = P // num_gpus
    gpu = np.arange(P) // S
    key = (np.arange(L)[:, None] * num_gpus + gpu[None, :]) * num_experts + phy2log
    on_gpu = np.bincount(key.ravel(), minlength=L * num_gpus * num_experts).reshape(L, num_gpus, num_experts)
    return on_gpu, (on_gpu > 0).sum(axis=1)


def optimal_shares(phy2log: np.ndarray, loads: np.ndarray, num_gpus: int, share: np.ndarray | None = None,
                   max_sweeps: int = 4, tol: float = 1e-3) -> np.ndarray:
    """Replica shares that balance GPU loads for the given placement.

    phy2log: int [L, P]; loads: float [L, E]; share: float [L, P] to start from (None:
    even). Sweeps stop once no GPU load moves by more than ``tol`` x the mean GPU
    load, or after ``max_sweeps``. Returns float64 [L, P]; the shares of each
    expert's replicas sum to 1, and no GPU ends up busier than the busiest GPU under
    the starting shares (each water-filling step can only lower the busiest of the
    GPUs it touches).
    """
    L, P = phy2log.shape
    E = loads.shape[1]
    N = num_gpus
    S = P // N
    rows = np.arange(L)
    w = np.asarray(loads, dtype=np.float64)
    # slots sorted by (expert, GPU): an expert's slots are contiguous, its GPUs ascending
    slot_gpu = np.arange(P) // S
    order = np.argsort(phy2log * N + slot_gpu, axis=1, kind="stable")
    s_exp = np.take_along_axis(phy2log, order, axis=1)
    s_gpu = order // S
    new_pair = np.ones((L, P), dtype=bool)
    new_pair[:, 1:] = (s_exp[:, 1:] != s_exp[:, :-1]) | (s_gpu[:, 1:] != s_gpu[:, :-1])
    ekey = (rows[:, None] * E + s_exp).ravel()
    count = np.bincount(ekey, minlength=L * E).reshape(L, E)
    spread = np.bincount(ekey, weights=new_pair.ravel(), minlength=L * E).reshape(L, E)
    if share is None:
        share = 1.0 / np.take_along_axis(count, phy2log, axis=1)
    share = np.asarray(share, dtype=np.float64)
    multi = (spread >= 2) & (w > 0)
    M = int(multi.sum(axis=1).max()) if multi.any() else 0
    if M == 0:
        return share.copy()
    start = np.cumsum(count, axis=1) - count                          # first sorted position of each expert

    # the multi-GPU experts of each layer, hottest first, padded (load 0, dummy GPU N);
    # a "run" is one GPU of an expert (colocated replicas of the expert form one run)
    mexp = np.argsort(np.where(multi, -w, np.inf), axis=1, kind="stable")[:, :M]
    mvalid = np.take_along_axis(multi, mexp, axis=1)
    mload = np.where(mvalid, np.take_along_axis(w, mexp, axis=1), 0.0)
    mcount = np.take_along_axis(count, mexp, axis=1)
    K = int(mcount.max())
    mentry = (np.arange(K)[None, None, :] < mcount[:, :, None]) & mvalid[:, :, None]     # [L, M, K]
    spos = np.minimum(np.take_along_axis(start, mexp, axis=1)[:, :, None] + np.arange(K), P - 1)
    mslot = np.where(mentry, np.take_along_axis(order, spos.reshape(L, -1), axis=1).reshape(L, M, K), 0)
    mfirst = np.take_along_axis(new_pair, spos.reshape(L, -1), axis=1).reshape(L, M, K) & mentry
    run = np.cumsum(mfirst, axis=2) - 1
    runkey = ((rows[:, None, None] * M + np.arange(M)[None, :, None]) * K + np.maximum(run, 0))[mentry]
    slot_tokens = np.take_along_axis(w, phy2log, axis=1) * share
    x = np.bincount(runkey, weights=slot_tokens[np.broadcast_to(rows[:, None, None], mslot.shape)[mentry],
                                                mslot[mentry]],
                    minlength=L * M * K).reshape(L, M, K)              # tokens of expert j on its run-th GPU
    runlen = np.bincount(runkey, minlength=L * M * K).reshape(L, M, K)
    mhas = runlen > 0
    mgpu = np.full((L, M, K), N, dtype=np.int64)
    first_idx = np.nonzero(mfirst)
    mgpu[first_idx[0], first_idx[1], run[mfirst]] = (mslot // S)[mfirst]
    gpu_load = np.zeros((L, N + 1))
    gpu_load[:, :N] = slot_tokens.reshape(L, N, S).sum(axis=2)

    stop = tol * max(float(w.sum(axis=1).max()) / N, 1e-300)
    groups = _independent_groups(mgpu, mhas, N)
    flat_load = gpu_load.reshape(-1)
    gkey = rows[:, None, None] * (N + 1) + mgpu                          # flat index of each run's GPU
    kk = np.arange(1, K + 1)
    for _ in range(max_sweeps):
        moved = 0.0
        for sel_l, sel_j in groups:
            # water-fill every expert of the group at once: they share no GPU within a layer
            g, ok, xj, wj = gkey[sel_l, sel_j], mhas[sel_l, sel_j], x[sel_l, sel_j], mload[sel_l, sel_j]
            base = np.where(ok, flat_load[g] - xj, np.inf)
            sb = np.sort(base, axis=1)
            level = (wj[:, None] + np.cumsum(np.where(np.isfinite(sb), sb, 0.0), axis=1)) / kk
            k = np.maximum((sb < level).sum(axis=1), 1)
            lam = level[np.arange(len(k)), k - 1]
            new = np.where(ok, np.maximum(lam[:, None] - base, 0.0), 0.0)
            delta = new - xj
            flat_load[g[ok]] += delta[ok]
            x[sel_l, sel_j] = new
            moved = max(moved, float(np.abs(delta).max()))
        if moved <= stop:
            break

    # back to per-slot shares: tokens of (expert, GPU) / expert load / replicas of it on that GPU
    new_share = share.copy()
    val = x.reshape(-1)[runkey] / np.repeat(mload.reshape(-1), K)[runkey] / runlen.reshape(-1)[runkey]
    new_share[np.broadcast_to(rows[:, None, None], mslot.shape)[mentry], mslot[mentry]] = val
    sums = np.bincount((rows[:, None] * E + phy2log).ravel(), weights=new_share.ravel(),
                       minlength=L * E).reshape(L, E)
    return new_share / np.take_along_axis(sums, phy2log, axis=1)


def _independent_groups(mgpu: np.ndarray, mhas: np.ndarray, N: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split the multi-GPU experts into groups that share no GPU within a layer.

    Greedy colouring, hottest expert first (column order): each expert takes the lowest
    colour not yet used on any of its GPUs; the colours in use at a GPU are the bits of
    a uint64 per (layer, GPU). Experts of one colour are water-filled together exactly,
    so a sweep costs (colours) numpy calls instead of (experts). An expert that finds all
    64 colours taken gets a group of its own.

    mgpu: int [L, M, K] GPU of each run (N = padding); mhas: bool [L, M, K].
    -> list of (layer indices, expert column indices), in colour order.
    """
    L, M, K = mgpu.shape
    rows = np.arange(L)[:, None]
    used = np.zeros((L, N + 1), dtype=np.uint64)          # column N (padding) is kept at 0
    bits = np.empty((L, M), dtype=np.uint64)
    one = np.uint64(1)
    for j in range(M):
        g = mgpu[:, j]
        taken = np.bitwise_or.reduce(used[rows, g], axis=1)
        bit = ~taken & (taken + one)                       # lowest clear bit; 0 when all 64 are set
        used[rows, g] |= bit[:, None]
        used[:, N] = 0
        bits[:, j] = bit
    valid = mhas.any(axis=2)
    colour = np.where(bits > 0, np.log2(np.maximum(bits, one).astype(np.float64)).astype(np.int64),
                      64 + np.arange(M)[None, :])
    colour = np.where(valid, colour, -1)
    return [np.nonzero(colour == c) for c in np.unique(colour[colour >= 0])]
