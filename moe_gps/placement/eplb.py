"""DeepSeek-style EPLB, vectorised over layers (and nodes).

The algorithm (DeepSeek's EPLB, as described in its README):

1. *replicate*: start with one replica per logical expert; give each extra slot to the
   expert with the highest load per replica (``load / replicas``), ties to the lowest id;
2. *pack*: sort replicas by load (``load / replicas``), heaviest first (ties by slot
   order), and put each on the lightest GPU that still has a free slot (ties to the
   lowest GPU id); when a GPU holds exactly one slot, replicas go in order.

The *hierarchical* variant first packs expert groups onto nodes (balancing group
load), then replicates within each node and packs each node's replicas onto its GPUs,
so that the experts of a group stay on one node (less inter-node traffic with
group-limited routing). With one node, or when the groups do not divide over the
nodes, the *global* variant runs: replicate over all experts and pack over all GPUs.

Each step is a Python loop over slots whose body is a handful of numpy operations on
all layers (and nodes) at once, so the cost is ``O(slots)`` numpy calls whatever the
number of layers. Shares are even: each replica takes ``1 / replicas`` of its
expert's tokens.
"""

from __future__ import annotations

import numpy as np

from moe_gps.errors import UserError


def replicate(weight: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give ``num_slots - n`` extra slots to the experts with the highest load per replica.

    weight: float [B, n]  ->  phy2log int64 [B, num_slots] (slot i < n holds expert i),
    replica_rank int64 [B, num_slots] (0 for an expert's first replica), count int64 [B, n]
    """
    B, n = weight.shape
    w = weight.astype(np.float64)
    phy2log = np.empty((B, num_slots), dtype=np.int64)
    phy2log[:, :n] = np.arange(n)
    rank = np.zeros((B, num_slots), dtype=np.int64)
    count = np.ones((B, n), dtype=np.int64)
    per_replica = w.copy()
    rows = np.arange(B)
    for i in range(n, num_slots):
        e = per_replica.argmax(axis=1)
        phy2log[:, i] = e
        c = count[rows, e]
        rank[:, i] = c
        count[rows, e] = c + 1
        per_replica[rows, e] = w[rows, e] / (c + 1)
    return phy2log, rank, count


def pack(weight: np.ndarray, num_packs: int, capacity: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Heaviest first onto the lightest pack with room; every pack gets ``n / num_packs`` items.

    weight: float [B, n]  ->  pack int64 [B, n], position in pack int64 [B, n]
    capacity: optional int [B], items per pack for each row (several packings in one
    call, e.g. for the two layouts of ``waterfill``). Items beyond ``capacity x
    num_packs`` in the heaviest-first order of a row are left over: their pack and
    position are meaningless (give them a weight below every real item's).
    """
    B, n = weight.shape
    per_pack = n // num_packs
    if capacity is not None:
        per_pack = np.asarray(capacity, dtype=np.int64)[:, None]
    elif per_pack == 1:
        idx = np.broadcast_to(np.arange(n), (B, n)).copy()
        return idx, np.zeros((B, n), dtype=np.int64)
    order = np.argsort(-weight, axis=1, kind="stable")
    sorted_w = np.take_along_axis(weight.astype(np.float64), order, axis=1)
    level = np.zeros(B * num_packs)           # pack load, flat [B * num_packs]; +inf once full
    filled = np.zeros(B * num_packs, dtype=np.int64)
    level2d = level.reshape(B, num_packs)
    chosen = np.empty((B, n), dtype=np.int64)  # pack of the j-th heaviest item
    base = np.arange(B) * num_packs
    first = 0
    if capacity is None and per_pack >= 2 and (sorted_w[:, :num_packs] > 0).all():
        # the first num_packs items, all heavier than 0, go one to each empty pack in order
        chosen[:, :num_packs] = np.arange(num_packs)
        level2d[:] = sorted_w[:, :num_packs]
        filled[:] = 1
        first = num_packs
    for j in range(first, n):
        if capacity is None and j == n - num_packs and (filled == per_pack - 1).all():
            # one free place left in every pack: the last items go, heaviest first, to the packs from
            # the lightest (ties to the lowest id), one each
            chosen[:, j:] = np.argsort(level2d, axis=1, kind="stable")
            break
        p = level2d.argmin(axis=1)
        fp = base + p
        chosen[:, j] = p
        c = filled[fp] + 1
        filled[fp] = c
        level[fp] = np.where(c >= (per_pack if capacity is None else per_pack[:, 0]), np.inf,
                             level[fp] + sorted_w[:, j])
    # position in pack = how many earlier (heavier) items went to the same pack
    by_pack = np.argsort(chosen, axis=1, kind="stable")
    rank_sorted = np.empty((B, n), dtype=np.int64)
    sp = np.take_along_axis(chosen, by_pack, axis=1)
    newp = np.ones((B, n), dtype=bool)
    newp[:, 1:] = sp[:, 1:] != sp[:, :-1]
    idx = np.broadcast_to(np.arange(n), (B, n))
    start = np.maximum.accumulate(np.where(newp, idx, 0), axis=1)
    np.put_along_axis(rank_sorted, by_pack, idx - start, axis=1)
    pack_of = np.empty((B, n), dtype=np.int64)
    pos_of = np.empty((B, n), dtype=np.int64)
    np.put_along_axis(pack_of, order, chosen, axis=1)
    np.put_along_axis(pos_of, order, rank_sorted, axis=1)
    return pack_of, pos_of


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def eplb(weight: np.ndarray, num_slots: int, num_gpus: int, num_nodes: int = 1,
         num_groups: int = 1) -> tuple[np.ndarray, str]:
    """DeepSeek EPLB. weight: [L, E] -> (phy2log int64 [L, num_slots], variant name).

    ``variant`` is ``"hierarchical"`` when ``num_nodes > 1`` and the groups divide over
    the nodes, else ``"global"`` (DeepSeek's rule).
    """
    L, E = weight.shape
    if num_nodes < 1 or num_groups < 1:
        raise UserError(f"eplb: num_nodes and num_groups must be at least 1, got {num_nodes} and {num_groups}")
    if num_gpus % num_nodes:
        raise UserError(f"eplb: {num_gpus} GPUs do not divide over {num_nodes} nodes")
    if num_nodes > 1 and num_groups % num_nodes == 0:
        if E % num_groups:
            raise UserError(f"eplb: {E} experts do not divide into {num_groups} groups")
        if num_slots % num_nodes:
            raise UserError(f"eplb: {num_slots} slots do not divide over {num_nodes} nodes")
        return _hierarchical(weight, num_slots, num_groups, num_nodes, num_gpus), "hierarchical"
    return _hierarchical(weight, num_slots, 1, 1, num_gpus), "global"


def _hierarchical(weight: np.ndarray, num_slots: int, num_groups: int, num_nodes: int,
                  num_gpus: int) -> np.ndarray:
    L, E = weight.shape
    w = weight.astype(np.float64)
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = E // num_nodes
    slots_per_node = num_slots // num_nodes
    slots_per_gpu = num_slots // num_gpus

    # 1. groups onto nodes; "node order" lists the experts node by node
    if num_nodes == 1:
        node_order = np.broadcast_to(np.arange(E), (L, E))       # node-order position -> expert
    else:
        group_node, group_pos = pack(w.reshape(L, num_groups, group_size).sum(axis=2), num_nodes)
        first = (group_node * groups_per_node + group_pos) * group_size   # [L, groups]
        position = (first[:, :, None] + np.arange(group_size)).reshape(L, E)  # expert -> node-order position
        node_order = _inverse(position)

    # 2. replicate within each node: rows are (layer, node)
    node_w = np.take_along_axis(w, node_order, axis=1).reshape(L * num_nodes, experts_per_node)
    slot2local, _, count = replicate(node_w, slots_per_node)

    # 3. pack each node's replicas onto its GPUs
    slot_w = np.take_along_axis(node_w / count, slot2local, axis=1)
    gpu, pos = pack(slot_w, num_gpus // num_nodes)
    final_slot = gpu * slots_per_gpu + pos                      # replica -> slot within its node
    local_at_slot = np.take_along_axis(slot2local, _inverse(final_slot), axis=1)
    local_at_slot = local_at_slot.reshape(L, num_nodes, slots_per_node) \
        + (np.arange(num_nodes) * experts_per_node)[None, :, None]
    return np.take_along_axis(np.asarray(node_order), local_at_slot.reshape(L, num_slots), axis=1)
