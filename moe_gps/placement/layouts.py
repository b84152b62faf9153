"""Building blocks shared by the planners: the static layouts, spare slots, shares.

Planners that leave slots empty (``-1`` in a work array) fill them at the end with
*spare* replicas that take no tokens (share 0): the placement stays dense (every slot
holds weights, as vLLM, SGLang and our runtime expect) and a later re-plan can give a
spare a share without moving any weights. A spare holds the expert with the highest
load per replica that its GPU does not hold yet.
"""

from __future__ import annotations

import numpy as np

# The static layouts of the ``none`` planner, by the name vLLM gives them
# (``--expert-placement-strategy``): ``linear`` is :func:`contiguous`, ``round_robin``
# is :func:`round_robin`.
STATIC_LAYOUTS = ("linear", "round_robin")


def contiguous(num_layers: int, num_experts: int, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """The static layout: E/N contiguous experts per GPU (the first E % N GPUs get one more).

    -> int64 [L, P] with -1 in the slots left over.
    """
    E, N, S = num_experts, num_gpus, slots_per_gpu
    size = np.full(N, E // N)
    size[: E % N] += 1
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    row = np.full(N * S, -1, dtype=np.int64)
    for g in range(N):
        row[g * S: g * S + size[g]] = np.arange(start[g], start[g] + size[g])
    return np.broadcast_to(row, (num_layers, N * S)).copy()


def round_robin(num_layers: int, num_experts: int, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """vLLM's ``round_robin`` layout: expert e on GPU ``e % N``, in its slot ``e // N``.

    With 4 experts on 2 GPUs, GPU 0 holds experts 0 and 2, GPU 1 holds 1 and 3.
    -> int64 [L, P] with -1 in the slots left over.
    """
    E, N, S = num_experts, num_gpus, slots_per_gpu
    e = np.arange(E)
    row = np.full(N * S, -1, dtype=np.int64)
    row[(e % N) * S + e // N] = e
    return np.broadcast_to(row, (num_layers, N * S)).copy()


def fill_spares(slot_exp: np.ndarray, loads: np.ndarray, num_gpus: int) -> np.ndarray:
    """Put a spare replica in every free (-1) slot; the caller gives spares share 0.

    A GPU with ``k`` free slots gets the ``k`` hottest experts it does not hold, hottest
    first into its lowest free slot. Only when a GPU has more slots than there are
    experts it lacks (slots per GPU > experts) does a spare repeat an expert it holds.

    slot_exp: int [L, P]; loads: [L, E] -> int64 [L, P] without -1.
    """
    slot_exp = slot_exp.copy()
    free = slot_exp < 0
    if not free.any():
        return slot_exp
    L, P = slot_exp.shape
    E = loads.shape[1]
    N = num_gpus
    S = P // N
    need = free.reshape(L, N, S).sum(axis=2)                              # [L, N]
    # a GPU with k free slots holds S - k experts, so the S hottest include k it lacks
    T = min(E, S)
    order = np.argsort(-np.asarray(loads, dtype=np.float64), axis=1, kind="stable")   # hottest first
    top = order[:, :T]                                                    # [L, T]
    blocks = slot_exp.reshape(L, N, S)
    avail = ~(top[:, None, :, None] == blocks[:, :, None, :]).any(axis=3)  # [L, N, T]
    pick = avail & (np.cumsum(avail, axis=2) <= need[:, :, None])
    assigned = pick.sum(axis=2)                                           # [L, N]
    l, _, pos = np.nonzero(pick)                                          # by layer, GPU, hotness
    pick_exp = order[l, pos]
    fl, fg, fs = np.nonzero(free.reshape(L, N, S))                         # by layer, GPU, slot
    gpu_id = fl * N + fg
    first_of_gpu = np.searchsorted(gpu_id, gpu_id, side="left")
    k = np.arange(len(gpu_id)) - first_of_gpu                             # rank of the free slot on its GPU
    got = assigned.reshape(-1)[gpu_id]
    offset = (np.cumsum(assigned.reshape(-1)) - assigned.reshape(-1))[gpu_id]
    # more free slots than experts the GPU lacks (slots per GPU > experts): repeat the hottest
    repeat = order[fl, np.maximum(k - got, 0) % E]
    slot_exp[fl, fg * S + fs] = np.where(k < got, pick_exp[np.minimum(offset + k, len(pick_exp) - 1)]
                                         if len(pick_exp) else repeat, repeat)
    return slot_exp


def shares_from_tokens(slot_exp: np.ndarray, tokens: np.ndarray, num_experts: int) -> np.ndarray:
    """Per-slot share = slot tokens / expert tokens; experts with no tokens split evenly.

    slot_exp: int [L, P] (no -1); tokens: float [L, P] -> float64 [L, P]
    """
    L, P = slot_exp.shape
    key = np.arange(L)[:, None] * num_experts + slot_exp
    tot = np.bincount(key.ravel(), weights=tokens.ravel(), minlength=L * num_experts).reshape(L, num_experts)
    cnt = np.bincount(key.ravel(), minlength=L * num_experts).reshape(L, num_experts)
    t = np.take_along_axis(tot, slot_exp, axis=1)
    c = np.take_along_axis(cnt, slot_exp, axis=1)
    return np.where(t > 0, tokens / np.where(t > 0, t, 1.0), 1.0 / c)
