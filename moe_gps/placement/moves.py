"""The weight moves from one placement to the next: what every slot does, which transfers run, and the
row copies inside each GPU.

For every layer and every slot of the new placement (GPU ``g``, local index ``q``, logical expert
``e``), :func:`move_plan` picks one action:

* ``KEEP``  the same slot already holds ``e`` (same GPU, same local index): nothing moves;
* ``LOCAL`` ``e`` is in another slot of GPU ``g``: a copy in the GPU's memory;
* ``RECV``  ``e`` is on other GPUs only: one transfer per (layer, expert, destination GPU), so a
  GPU that needs ``e`` in two slots receives it once and copies it to the second.

The source of a transfer is a GPU that held ``e`` before, on the destination's node where one
did; the destinations of one expert take its old replicas in turn, to spread the sends.

The runtime applies the plan (:mod:`runtime.apply`) and the simulator prices it
(:func:`sim.work.weight_copies`): both read the same transfers and the same row copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KEEP, LOCAL, RECV = 0, 1, 2

#: the columns of :attr:`MovePlan.transfers`
TRANSFER_FIELDS = ("layer", "expert", "src_rank", "src_local", "dst_rank")


@dataclass
class MovePlan:
    """What to do per layer and GPU.

    action [L, N, S_new]: KEEP, LOCAL or RECV per new slot;
    source [L, N, S_new]: the old local slot to keep/copy from (KEEP/LOCAL) or the index of the
    transfer in ``transfers`` (RECV);
    transfers: a record array [T] with the fields :data:`TRANSFER_FIELDS`, sorted by (layer, expert,
    dst_rank), the order every rank issues them in.
    """

    action: np.ndarray
    source: np.ndarray
    transfers: np.recarray
    old_slots_per_gpu: int
    new_slots_per_gpu: int

    @property
    def in_place(self) -> bool:
        """The slot count stays: new slots are written over the old ones."""
        return self.old_slots_per_gpu == self.new_slots_per_gpu

    def counts(self) -> dict[str, int]:
        return {"slots_kept": int((self.action == KEEP).sum()), "local_copies": int((self.action == LOCAL).sum()),
                "slots_received": int((self.action == RECV).sum()), "transfers": len(self.transfers)}

    def snapshots(self, sends: bool = True) -> np.ndarray:
        """bool [L, N, S_old]: old slots that are read after being overwritten, so the runtime copies them
        aside first: sources of local copies and (``sends``: the transfers run with the slot writes, not
        before them) of transfers, that the new placement rewrites. None are when the slot count
        changes (the new slots go to a new buffer)."""
        L, N, _ = self.action.shape
        needed = np.zeros((L, N, self.old_slots_per_gpu), dtype=bool)
        if not self.in_place:
            return needed
        l, g, q = np.nonzero(self.action == LOCAL)
        needed[l, g, self.source[l, g, q]] = True
        if sends:
            t = self.transfers
            needed[t.layer, t.src_rank, t.src_local] = True
        return needed & (self.action != KEEP)

    def row_copies(self, sends: bool = True) -> np.ndarray:
        """int [L, N]: expert rows copied inside each GPU to apply the plan: the snapshots
        (:meth:`snapshots`), the local copies (and every kept slot, when the slot count changes), and a
        received expert's copies to its second and later slots."""
        copies = (self.action == LOCAL).sum(axis=2) + (self.action == RECV).sum(axis=2)
        if not self.in_place:
            copies += (self.action == KEEP).sum(axis=2)
        L, N, _ = self.action.shape
        received = np.zeros((L, N), dtype=np.int64)
        np.add.at(received, (self.transfers.layer, self.transfers.dst_rank), 1)
        return copies - received + self.snapshots(sends).sum(axis=2)


def move_plan(old_phy2log: np.ndarray, new_phy2log: np.ndarray, num_ranks: int,
              node_of: np.ndarray | None = None) -> MovePlan:
    """Plan the weight moves from one placement to the next (numpy only, the same on every rank).

    old_phy2log [L, N * S_old], new_phy2log [L, N * S_new] (slot = rank * S + i); node_of: int [N], the
    node of each GPU, 0 .. N - 1 (None: one node).
    """
    old = np.asarray(old_phy2log, dtype=np.int64)
    new = np.asarray(new_phy2log, dtype=np.int64)
    L, N = old.shape[0], num_ranks
    if new.shape[0] != L:
        raise ValueError(f"old placement has {L} layers, new has {new.shape[0]}")
    if old.shape[1] % N or new.shape[1] % N:
        raise ValueError(f"slots ({old.shape[1]} old, {new.shape[1]} new) do not divide over {N} ranks")
    if node_of is not None and (len(node_of) != N or np.any(np.asarray(node_of) < 0)
                                or np.any(np.asarray(node_of) >= N)):
        raise ValueError(f"node_of must give the node (0 .. {N - 1}) of each of the {N} GPUs, got {node_of}")
    S_old, S_new = old.shape[1] // N, new.shape[1] // N
    old_r = old.reshape(L, N, S_old)
    new_r = new.reshape(L, N, S_new)
    action = np.full((L, N, S_new), RECV, dtype=np.int8)
    source = np.full((L, N, S_new), -1, dtype=np.int64)
    q = min(S_old, S_new)
    same = old_r[:, :, :q] == new_r[:, :, :q]
    action[:, :, :q][same] = KEEP
    source[:, :, :q][same] = np.broadcast_to(np.arange(q), same.shape)[same]
    # local copies: the expert sits in some old slot of the same GPU (take the first)
    match = new_r[:, :, :, None] == old_r[:, :, None, :]                  # [L, N, S_new, S_old]
    has = match.any(axis=3)
    first = match.argmax(axis=3)
    local = has & (action != KEEP)
    action[local] = LOCAL
    source[local] = first[local]
    # transfers: one per (layer, expert, destination GPU)
    E1 = max(old.max(initial=0), new.max(initial=0)) + 1
    l_idx, r_idx, s_idx = np.nonzero(action == RECV)
    experts = new_r[l_idx, r_idx, s_idx]
    key = (l_idx * E1 + experts) * N + r_idx
    uniq, inverse = np.unique(key, return_inverse=True)                  # sorted (layer, expert, dst)
    inverse = inverse.reshape(-1)
    source[l_idx, r_idx, s_idx] = inverse
    one = np.zeros(len(uniq), dtype=np.int64)
    one[inverse] = np.arange(len(inverse))                               # a slot of each transfer
    t_layer, t_dst, t_expert = l_idx[one], r_idx[one], experts[one]
    # sources. The old replicas: one per (layer, expert, GPU), its first slot there, in (layer, expert, node,
    # GPU) order
    nodes = np.zeros(N, dtype=np.int64) if node_of is None else np.asarray(node_of, dtype=np.int64)
    hl, hg, hq = (a.ravel() for a in np.meshgrid(np.arange(L), np.arange(N), np.arange(S_old), indexing="ij"))
    by_expert = hl * E1 + old_r.ravel()
    order = np.lexsort((hq, hg, nodes[hg], by_expert))
    by_expert, by_node, hg, hq = by_expert[order], by_expert[order] * N + nodes[hg[order]], hg[order], hq[order]
    first = np.r_[np.ones(min(1, len(hg)), dtype=bool), (by_expert[1:] != by_expert[:-1]) | (hg[1:] != hg[:-1])]
    by_expert, by_node, hg, hq = by_expert[first], by_node[first], hg[first], hq[first]
    # the pool of each transfer: the replicas on the destination's node, or all of them where none is
    want = t_layer * E1 + t_expert
    want_node = want * N + nodes[t_dst]
    near_lo, near_hi = np.searchsorted(by_node, want_node), np.searchsorted(by_node, want_node, side="right")
    all_lo, all_hi = np.searchsorted(by_expert, want), np.searchsorted(by_expert, want, side="right")
    has_near = near_hi > near_lo
    lo = np.where(has_near, near_lo, all_lo)
    size = np.where(has_near, near_hi - near_lo, all_hi - all_lo)
    if (size == 0).any():
        i = int(np.argmax(size == 0))
        raise ValueError(f"layer {t_layer[i]}: expert {t_expert[i]} has no replica in the old placement to copy from")
    # the destinations of one pool take its replicas in turn (in node, then GPU order), to spread the sends
    group = want * (N + 1) + np.where(has_near, nodes[t_dst], N)
    order = np.argsort(group, kind="stable")
    starts = np.flatnonzero(np.r_[np.ones(min(1, len(group)), dtype=bool), group[order][1:] != group[order][:-1]])
    turn = np.empty(len(group), dtype=np.int64)
    turn[order] = np.arange(len(group)) - np.repeat(starts, np.diff(np.r_[starts, len(group)]))
    pick = lo + turn % np.maximum(size, 1)
    src, src_local = hg[pick], hq[pick]
    transfers = np.rec.fromarrays([t_layer, t_expert, src, src_local, t_dst], names=TRANSFER_FIELDS)
    return MovePlan(action, source, transfers, S_old, S_new)
