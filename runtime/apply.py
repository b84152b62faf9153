"""Applying a new placement while running: move expert weights between ranks, then check.

The moves are :func:`moe_gps.placement.moves.move_plan`'s, the same ones the simulator
prices (:func:`sim.work.weight_copies`): per new slot keep, copy from another slot of
the rank, or receive (one transfer per layer, expert and destination rank).

:func:`apply_placement` copies aside the old rows that are read after being overwritten
(:meth:`MovePlan.snapshots`), runs the transfers of all layers in one
``batch_isend_irecv``, fills the local copies, installs the new routing tables and
then checks that every slot it wrote holds the expert it should (:class:`Fingerprints`: a
digest of the slot's bytes; a kept slot was checked when it was last written), failing on
every rank together, each with one line, if one slot is wrong.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from moe_gps.placement.moves import KEEP, LOCAL, RECV, MovePlan, move_plan
from runtime.dist import DistContext, all_gather_flat
from runtime.moe_layer import ExpertParallelMoE
from runtime.routing import layer_tables


@dataclass
class MoveStats:
    """What one placement change did on this rank (and in total, for the plan counts)."""

    seconds: float = 0.0              # on the critical path (async: the install)
    background_s: float = 0.0         # async: from starting the transfers to their landing (and check) here
    bytes_sent: int = 0
    bytes_received: int = 0
    row_copies: int = 0               # expert rows this rank copied between its slots (snapshots included)
    counts: dict = field(default_factory=dict)


class WeightCheckFailed(RuntimeError):
    """A slot does not hold the weights of the expert it should; the message is one line for this rank."""


#: splitmix64 constants, as signed int64 (torch has no uint64 arithmetic)
_K = [k - (1 << 64) if k >= 1 << 63 else k for k in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)]
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def digest(rows: torch.Tensor, chunk_elements: int | None = None) -> torch.Tensor:
    """A 64-bit digest of every row's bytes: ``rows [S, n]`` -> int64 ``[S]``.

    Each element's bit pattern is mixed with its position (``x xor pos * K1``, then the
    splitmix64 finaliser) and the mixed values are summed with 64-bit wrap-around. Exact
    integer arithmetic on the device, so replicas agree bit for bit on any device, and any
    change of a value or of the order of values (two halves swapped, a slot shifted)
    changes the digest except with probability about 2^-64. The rows are mixed
    ``chunk_elements`` at a time (default: 2^18 on CPU, where a chunk's int64 copy then stays in
    the cache, 2^24 on GPUs, fewer kernel launches); the result does not depend on it.
    """
    S, n = rows.shape
    out = torch.zeros(S, dtype=torch.int64, device=rows.device)
    if S == 0 or n == 0:
        return out
    if chunk_elements is None:
        chunk_elements = 1 << 18 if rows.device.type == "cpu" else 1 << 24
    bits = rows.contiguous().view(_BITS[rows.element_size()])
    step = max(1, chunk_elements // S)
    for c0 in range(0, n, step):
        h = bits[:, c0:c0 + step].to(torch.int64, copy=True)      # a copy: mixed in place below
        shifted = torch.empty_like(h)
        h ^= torch.arange(c0, c0 + h.shape[1], dtype=torch.int64, device=rows.device).mul_(_K[0])
        h *= _K[1]
        h ^= torch.bitwise_right_shift(h, 31, out=shifted)
        h *= _K[2]
        h ^= torch.bitwise_right_shift(h, 29, out=shifted)
        out += h.sum(dim=1)
    return out


class Fingerprints:
    """The digest (:func:`digest`) of every logical expert's weights, ``table [L, E]``, taken when
    the weights were loaded.

    Built from every rank's slots with one all-gather; replicas of an expert must agree.
    """

    def __init__(self, blocks: list[ExpertParallelMoE], ctx: DistContext) -> None:
        L = len(blocks)
        E = blocks[0].num_experts
        local = torch.stack([digest(b.slot_weights) for b in blocks])                # [L, S]
        if ctx.distributed:
            allg = torch.empty((ctx.world_size,) + tuple(local.shape), dtype=local.dtype, device=local.device)
            with ctx.guard("all_gather of expert digests"):
                all_gather_flat(allg.view(-1), local.reshape(-1).contiguous(), group=ctx.group)
        else:
            allg = local[None]
        allg = allg.cpu().numpy()                                                  # [N, L, S]
        table = np.zeros((L, E), dtype=np.int64)
        for l, b in enumerate(blocks):
            phy = b.tables.phy2log
            fp = allg[:, l].reshape(-1)                                             # [P] in slot order
            table[l, phy] = fp
            bad = np.flatnonzero(table[l, phy] != fp)
            if len(bad):
                raise WeightCheckFailed(f"rank {ctx.rank}: layer {l}: the replicas of expert {int(phy[bad[0]])} "
                                        "hold different weights at load time")
        self.table = table

    def check(self, blocks: list[ExpertParallelMoE], ctx: DistContext,
              slots: list[np.ndarray] | None = None) -> list[str]:
        """Problems on this rank, one text per wrong slot (empty when every slot holds its expert).

        slots: per layer, the local slot indices to check (None: every slot)."""
        bad = []
        for l, b in enumerate(blocks):
            local = b.local_slots()                                                 # [S] global slot ids
            if slots is None:
                idx = np.arange(len(local))
                got = digest(b.slot_weights).cpu().numpy()
            else:                                                                   # slot by slot: no copies
                idx = np.asarray(slots[l], dtype=np.int64)
                got = _digests([b.slot_weights[q] for q in idx.tolist()])
            want_e = b.tables.phy2log[local[idx]]
            for j in np.flatnonzero(got != self.table[l, want_e]):
                bad.append(f"layer {l}, slot {int(local[idx[j]])} should hold expert {int(want_e[j])} "
                           "but its bytes differ")
        return bad

    def check_received(self, plan: MovePlan, staged: dict[int, torch.Tensor]) -> list[str]:
        """Problems with the rows received for ``plan.transfers`` (``staged``: transfer index -> row), one
        text per row that is not the weights of the expert it was sent for."""
        t = plan.transfers
        ids = sorted(staged)
        got = _digests([staged[i] for i in ids])
        return [f"layer {int(t.layer[i])}, expert {int(t.expert[i])} received from rank {int(t.src_rank[i])} but "
                "its bytes differ" for i, g in zip(ids, got) if g != self.table[int(t.layer[i]), int(t.expert[i])]]


def _digests(rows: list[torch.Tensor]) -> np.ndarray:
    """int64 [n]: the :func:`digest` of each row ``[numel]``, one at a time (no stacked copy), read back once."""
    if not rows:
        return np.zeros(0, dtype=np.int64)
    return torch.cat([digest(r[None]) for r in rows]).cpu().numpy()


def apply_placement(blocks: list[ExpertParallelMoE], new_phy2log: np.ndarray, new_share: np.ndarray,
                    ctx: DistContext, fingerprints: Fingerprints | None = None) -> MoveStats:
    """Move expert weights so that the slots follow ``new_phy2log [L, P]``; install the tables.

    new_share [L, P]: the replica token shares. Checks every slot it wrote afterwards when
    ``fingerprints`` is given (raising on every rank if any slot is wrong).
    """
    t0 = time.perf_counter()
    new_phy2log = np.asarray(new_phy2log, dtype=np.int64)
    plan = move_plan(np.stack([b.tables.phy2log for b in blocks]), new_phy2log, ctx.world_size, ctx.node_of)
    stats = MoveStats(counts=plan.counts())
    buffers, sources = write_targets(blocks, plan, ctx.rank)
    recv_into = receivers(plan, ctx.rank)
    ops = transfer_ops(blocks, plan, ctx.rank, lambda l, q: _old_row(sources, l, q),
                       lambda i: buffers[recv_into[i][0]][int(recv_into[i][1][0])], ctx.group, stats)
    if ops:
        with ctx.guard(f"batch_isend_irecv of {len(plan.transfers)} expert transfers"):
            for req in dist.batch_isend_irecv(ops):
                req.wait()
    stats.row_copies = fill_slots(blocks, plan, ctx, buffers, sources, recv_into, new_phy2log, new_share,
                                  fingerprints)
    stats.seconds = time.perf_counter() - t0
    return stats


def transfer_ops(blocks: list[ExpertParallelMoE], plan: MovePlan, me: int, send_row, recv_row, group,
                 stats: MoveStats) -> list:
    """This rank's sends and receives of ``plan.transfers``, in the order every rank issues them.

    send_row(layer, old local slot) -> the row [numel] to send; recv_row(transfer index) -> the row
    to receive into. Adds the bytes to ``stats``."""
    ops = []
    for i, (l, _, src, src_local, dst) in enumerate(plan.transfers.tolist()):
        nbytes = blocks[l].expert_bytes
        if src == me and dst != me:
            ops.append(dist.P2POp(dist.isend, send_row(l, src_local).contiguous(), dst, group=group))
            stats.bytes_sent += nbytes
        if dst == me:
            ops.append(dist.P2POp(dist.irecv, recv_row(i), src, group=group))
            stats.bytes_received += nbytes
    return ops


def write_targets(blocks: list[ExpertParallelMoE], plan: MovePlan, me: int, sends: bool = True) -> tuple[list, list]:
    """The buffers the new slots are written into (``[S_new, numel]`` per layer: the live ones when the
    slot count stays) and, per layer, (old buffer, snapshots of the old rows that are read after
    being overwritten: :meth:`MovePlan.snapshots`; ``sends`` False once the transfers have run)."""
    S_new = plan.new_slots_per_gpu
    snapshots = plan.snapshots(sends)[:, me]                            # [L, S_old]
    buffers, sources = [], []
    for l, b in enumerate(blocks):
        old_buf = b.slot_weights
        if plan.in_place:
            new_buf = old_buf
            snap = {int(q): old_buf[q].clone() for q in np.flatnonzero(snapshots[l])}
        else:
            new_buf = torch.empty(S_new, b.expert_numel, dtype=old_buf.dtype, device=old_buf.device)
            snap = {}
        buffers.append(new_buf)
        sources.append((old_buf, snap))
    return buffers, sources


def _old_row(sources: list, l: int, q: int) -> torch.Tensor:
    old_buf, snap = sources[l]
    return snap[q] if q in snap else old_buf[q]


def receivers(plan: MovePlan, me: int) -> dict[int, tuple[int, np.ndarray]]:
    """transfer index -> (layer, this rank's new local slots [n] that take the received expert)."""
    out = {}
    for i, (l, _, _, _, dst) in enumerate(plan.transfers.tolist()):
        if dst == me:
            out[i] = (l, np.flatnonzero((plan.action[l, me] == RECV) & (plan.source[l, me] == i)))
    return out


def fill_slots(blocks: list[ExpertParallelMoE], plan: MovePlan, ctx: DistContext, buffers: list, sources: list,
               recv_into: dict, new_phy2log: np.ndarray, new_share: np.ndarray, fingerprints: Fingerprints | None,
               staged: dict[int, torch.Tensor] | None = None) -> int:
    """After the transfers: the received rows (``staged``: transfer index -> row, when they were received
    aside; checked already, see :meth:`Fingerprints.check_received`), the local copies, the routing tables,
    then the check of the slots written here (those filled from ``staged`` not again). Returns the expert
    rows copied between this rank's slots, the snapshots ``sources`` holds included (the staged rows not)."""
    me, S_new = ctx.rank, plan.new_slots_per_gpu
    copied = sum(len(snap) for _, snap in sources)
    written = [np.ones(S_new, dtype=bool) if not plan.in_place else plan.action[l, me] != KEEP
               for l in range(len(blocks))]                                     # [L][S_new]: to check
    for i, row in (staged or {}).items():
        l, slots = recv_into[i]
        buffers[l][int(slots[0])].copy_(row)
        written[l][int(slots[0])] = False
    for l, b in enumerate(blocks):
        act, src = plan.action[l, me], plan.source[l, me]
        buf = buffers[l]
        for q in range(S_new):
            if act[q] == LOCAL or (act[q] == KEEP and not plan.in_place):
                buf[q].copy_(_old_row(sources, l, int(src[q])))
                copied += 1
    for i, (l, slots) in recv_into.items():
        for q in slots[1:]:
            buffers[l][int(q)].copy_(buffers[l][int(slots[0])])
            copied += 1
    for l, b in enumerate(blocks):
        tables = layer_tables(new_phy2log[l], np.asarray(new_share)[l], b.num_experts, S_new, ctx.device)
        b.set_slots(tables, buffers[l])
    if fingerprints is not None:
        check_slots(blocks, ctx, fingerprints, [np.flatnonzero(w) for w in written])
    return copied


def check_slots(blocks: list[ExpertParallelMoE], ctx: DistContext, fingerprints: Fingerprints,
                slots: list[np.ndarray] | None = None) -> None:
    """Every slot of every rank (``slots``: per layer, the local slots to check) holds the expert its
    tables say (one all_reduce), else :class:`WeightCheckFailed` on every rank, each with one line."""
    problems = fingerprints.check(blocks, ctx, slots)
    n_bad = torch.tensor([len(problems)], dtype=torch.int64, device=ctx.device)
    if ctx.distributed:
        with ctx.guard("all_reduce of the placement check"):
            dist.all_reduce(n_bad, group=ctx.group)
    total = int(n_bad.item())
    if total:
        raise check_failed(ctx, problems, total, f"after the placement change at step {ctx.step}", "slot")


def check_failed(ctx: DistContext, problems: list[str], total: int, when: str, what: str) -> WeightCheckFailed:
    """The one line of this rank for a weight check that found ``total`` wrong items (``what``: slot,
    received expert) in all ranks; ``problems``: this rank's."""
    mine = (f"{len(problems)} wrong {what}(s) here: " + "; ".join(problems[:4])
            + ("; ..." if len(problems) > 4 else "")) if problems else f"this rank's {what}s are all correct"
    return WeightCheckFailed(f"rank {ctx.rank}: weight check {when} found {total} {what}(s) with the wrong weights "
                             f"in all ranks; {mine}")
