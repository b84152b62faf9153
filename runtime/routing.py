"""Which replica each (token, expert) pair goes to, and the all-to-all split sizes.

The rule (deterministic, the same on every rank, and exact to the plan's shares):

* for each logical expert ``e`` the step's pairs routed to ``e`` are numbered
  ``0 .. n_e - 1``: rank 0's pairs first, then rank 1's, ...; within a rank in token
  order (top-k position breaks ties);
* replica ``i`` of ``e`` (slots in ``log2phy`` order) takes the pairs numbered
  ``[B_{e,i-1}, B_{e,i})`` with ``B_{e,i} = round(n_e * (share_0 + ... + share_i))``
  and ``B_{e,-1} = 0``, so every replica gets its share of the step's tokens to within
  one token, whichever rank the tokens start on.

Every rank learns every rank's per-expert counts ``[ranks, experts]`` with one
all-gather; from them each rank computes the whole ``[ranks, slots]`` matrix of pairs
(:func:`slot_counts`) and thus both its send and its receive split sizes, with no
second exchange.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LayerTables:
    """Per-layer placement tables, numpy (host) and torch (device).

    phy2log [P], log2phy [E, R] (-1 padded), replica_count [E], cum_share [E, R]
    (cumulative replica shares, 1.0 from the last real replica on), slots_per_gpu S.
    """

    phy2log: np.ndarray
    log2phy: np.ndarray
    replica_count: np.ndarray
    cum_share: np.ndarray
    slots_per_gpu: int
    log2phy_t: torch.Tensor

    @property
    def num_slots(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.log2phy.shape[0])


def layer_tables(phy2log: np.ndarray, replica_share: np.ndarray, num_experts: int, slots_per_gpu: int,
                 device: torch.device | str = "cpu") -> LayerTables:
    """Build the tables of one layer. phy2log: int [P]; replica_share: float [P]."""
    phy2log = np.asarray(phy2log, dtype=np.int64)
    share = np.asarray(replica_share, dtype=np.float64)
    count = np.bincount(phy2log, minlength=num_experts)
    if (count == 0).any():
        raise ValueError(f"expert {int(np.flatnonzero(count == 0)[0])} has no slot")
    R = int(count.max())
    order = np.argsort(phy2log, kind="stable")                 # slots grouped by expert, ascending
    first = np.concatenate([[0], np.cumsum(count)[:-1]])
    rank_in_expert = np.arange(len(phy2log)) - first[phy2log[order]]
    log2phy = np.full((num_experts, R), -1, dtype=np.int64)
    log2phy[phy2log[order], rank_in_expert] = order
    sh = np.zeros((num_experts, R))
    sh[phy2log[order], rank_in_expert] = share[order]
    cum = np.cumsum(sh, axis=1)
    total = cum[np.arange(num_experts), count - 1][:, None]
    cum = np.where(total > 0, cum / np.where(total > 0, total, 1.0), 0.0)
    pad = np.arange(R)[None, :] >= count[:, None] - 1          # the last real replica and the padding
    cum[pad] = 1.0
    # padded entries point at the expert's first slot; they never receive pairs (empty range)
    log2phy_dev = np.where(log2phy >= 0, log2phy, log2phy[:, :1])
    return LayerTables(phy2log, log2phy, count, cum, int(slots_per_gpu),
                       torch.as_tensor(log2phy_dev, dtype=torch.long, device=device))


def bounds(tables: LayerTables, totals: np.ndarray) -> np.ndarray:
    """Upper pair number (exclusive) of each replica: int64 [E, R]; totals: int [E] pairs per expert."""
    return np.rint(tables.cum_share * np.asarray(totals, dtype=np.float64)[:, None]).astype(np.int64)


def slot_counts(tables: LayerTables, counts_all: np.ndarray) -> np.ndarray:
    """Pairs each source rank sends to each slot: int64 [ranks, P].

    counts_all: int [ranks, E], pairs per expert on each rank (before dispatch).
    """
    counts_all = np.asarray(counts_all, dtype=np.int64)
    N, E = counts_all.shape
    hi_b = bounds(tables, counts_all.sum(axis=0))                            # [E, R]
    lo_b = np.concatenate([np.zeros((E, 1), np.int64), hi_b[:, :-1]], axis=1)
    start = np.cumsum(counts_all, axis=0) - counts_all                       # [N, E] first pair number
    end = start + counts_all
    pairs = np.minimum(end[:, :, None], hi_b[None]) - np.maximum(start[:, :, None], lo_b[None])
    pairs = np.maximum(pairs, 0)                                             # [N, E, R]
    out = np.zeros((N, tables.num_slots), dtype=np.int64)
    valid = tables.log2phy >= 0
    np.add.at(out, (slice(None), tables.log2phy[valid]), pairs[:, valid])
    return out


def assign_slots(experts: torch.Tensor, tables: LayerTables, counts_all: np.ndarray, rank: int) -> torch.Tensor:
    """Slot of each of this rank's pairs: experts int [T, k] -> long [T * k] (row-major pairs).

    counts_all: int [ranks, E] from the all-gather (this rank's row must match ``experts``).
    """
    e = experts.reshape(-1).long()
    device = e.device
    counts_all = np.asarray(counts_all, dtype=np.int64)
    start_global = (np.cumsum(counts_all, axis=0) - counts_all)[rank]       # [E]
    hi_b = torch.as_tensor(bounds(tables, counts_all.sum(axis=0)), device=device)
    order = torch.argsort(e, stable=True)                                    # pairs grouped by expert
    e_sorted = e[order]
    local_first = torch.as_tensor(np.cumsum(counts_all[rank]) - counts_all[rank], device=device)
    j_local = torch.arange(e.numel(), device=device) - local_first[e_sorted]
    j = torch.as_tensor(start_global, device=device)[e_sorted] + j_local   # global pair number
    replica = (hi_b[e_sorted] <= j[:, None]).sum(dim=1)
    slot_sorted = tables.log2phy_t[e_sorted, replica]
    slot = torch.empty_like(slot_sorted)
    slot[order] = slot_sorted
    return slot


def slot_major_order(recv_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows received ordered (source rank, local slot) -> order grouped by local slot.

    recv_counts: int [ranks, S], pairs from each source rank for each of this rank's
    slots. Returns ``index`` int64 [rows] (row ``index[i]`` of the received buffer is
    the i-th row in slot-major order) and ``per_slot`` int64 [S].
    """
    C = np.asarray(recv_counts, dtype=np.int64)
    flat = C.ravel()                                       # (source, slot) order, as received
    start = (np.cumsum(flat) - flat).reshape(C.shape)      # first received row of each block
    blocks_t = C.T.ravel()                                 # slot-major block sizes
    starts_t = start.T.ravel()
    total = int(flat.sum())
    first_out = np.cumsum(blocks_t) - blocks_t             # where each block starts in slot-major order
    index = np.repeat(starts_t - first_out, blocks_t) + np.arange(total)
    return index.astype(np.int64), C.sum(axis=0)
