"""``copy_policy: async``: a placement's weights move in the background while the old one serves.

When a new placement is adopted, every rank starts a :class:`BackgroundMove`: a thread that
issues this rank's sends (straight from the live slots, which the forward passes only read)
and receives (into staging rows, one per received expert) with ``batch_isend_irecv`` on the
*background group*, a second process group created at start-up (gloo on CPU; on a GPU its
own NCCL communicator, driven from a side stream), and waits for them. The following steps
run with the old placement. With ``verify``, the thread also checks the received rows
against the digests taken at load time once they have landed (:meth:`Fingerprints.check_received`),
off the critical path. At each step boundary the ranks agree, with one small ``all_reduce``
on the main group, whether every rank's transfers have landed and passed that check
(:func:`all_landed`; a row that failed it fails every rank with one line, before any switch);
when they have, :meth:`BackgroundMove.install` writes the staged rows and the local copies
into the slots, switches the routing tables and checks the slots the local copies wrote
(:mod:`runtime.apply`), on every rank at the same step.

A failed or timed-out transfer becomes the usual one-line :class:`runtime.dist.CollectiveFailure`
(the thread runs it under :meth:`DistContext.guard`), raised on the main thread at the
next step boundary; :meth:`BackgroundMove.join` waits for the thread (at most the group's
timeout) so that no rank leaves with its transfers still running.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

from moe_gps.placement.moves import move_plan
from runtime.apply import Fingerprints, MoveStats, check_failed, fill_slots, receivers, transfer_ops, write_targets
from runtime.dist import DistContext
from runtime.moe_layer import ExpertParallelMoE


def background_group(ctx: DistContext):
    """The process group background transfers run on (collective: every rank calls it at start-up);
    None for a one-rank run."""
    if not ctx.distributed:
        return None
    return dist.new_group(backend=ctx.backend, timeout=_dt.timedelta(seconds=ctx.timeout_s))


class BackgroundMove:
    """The transfers of one placement change, running in a thread.

    new_phy2log, new_share [L, P]: the placement to install; started_at: the step it was adopted at;
    fingerprints: the digests the received rows and the installed slots are checked against (None: no check).
    """

    def __init__(self, blocks: list[ExpertParallelMoE], new_phy2log: np.ndarray, new_share: np.ndarray,
                 ctx: DistContext, group, started_at: int, fingerprints: Fingerprints | None = None) -> None:
        self.blocks, self.ctx, self.started_at, self.fingerprints = blocks, ctx, started_at, fingerprints
        self.new_phy2log = np.asarray(new_phy2log, dtype=np.int64)
        self.new_share = np.asarray(new_share, dtype=np.float64)
        self.plan = move_plan(np.stack([b.tables.phy2log for b in blocks]), self.new_phy2log, ctx.world_size,
                              ctx.node_of)
        self.stats = MoveStats(counts=self.plan.counts())
        self.recv_into = receivers(self.plan, ctx.rank)
        self.staged = {i: torch.empty(blocks[l].expert_numel, dtype=blocks[l].slot_weights.dtype,
                                      device=blocks[l].slot_weights.device) for i, (l, _) in self.recv_into.items()}
        self.ops = transfer_ops(blocks, self.plan, ctx.rank, lambda l, q: blocks[l].slot_weights[q],
                                lambda i: self.staged[i], group, self.stats)
        self.background_s = 0.0
        self.wrong: list[str] = []        # the received rows that failed the check (set before landing)
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moe-gps-background-move", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            delay = float(os.environ.get("MOE_GPS_BACKGROUND_DELAY_S", "0") or 0)   # testing aid: slow transfers
            if delay > 0:
                time.sleep(delay)
            if self.ops:
                stream = torch.cuda.Stream(self.ctx.device) if self.ctx.device.type == "cuda" else None
                if stream is not None:
                    torch.cuda.set_device(self.ctx.device)
                    stream.wait_stream(torch.cuda.current_stream(self.ctx.device))
                with self.ctx.guard(f"background batch_isend_irecv of {len(self.plan.transfers)} expert transfers "
                                    f"(placement of step {self.started_at})"):
                    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                        for req in dist.batch_isend_irecv(self.ops):
                            req.wait()
                        if self.fingerprints is not None:
                            self.wrong = self.fingerprints.check_received(self.plan, self.staged)
                    if stream is not None:
                        stream.synchronize()
        except BaseException as err:          # raised on the main thread at the next step boundary
            self.error = err
        finally:
            self.background_s = time.perf_counter() - t0
            self._done.set()

    def landed_here(self) -> bool:
        """This rank's transfers are done and, with fingerprints, checked (raises their failure, if they
        failed)."""
        if self._done.is_set() and self.error is not None:
            raise self.error
        return self._done.is_set()

    def install(self) -> MoveStats:
        """Put the new placement in force (call when :func:`all_landed`: the received rows have passed
        their check); its stats, ``seconds`` being the time the install took on the critical path."""
        t0 = time.perf_counter()
        self.join()
        buffers, sources = write_targets(self.blocks, self.plan, self.ctx.rank, sends=False)
        self.stats.row_copies = fill_slots(self.blocks, self.plan, self.ctx, buffers, sources, self.recv_into,
                                           self.new_phy2log, self.new_share, self.fingerprints, staged=self.staged)
        self.staged = {}
        self.stats.seconds = time.perf_counter() - t0
        self.stats.background_s = self.background_s
        return self.stats

    def join(self, quiet: bool = False) -> None:
        """Wait for the thread (at most the collective timeout and a little) and raise its failure;
        ``quiet``, when the run is failing anyway: wait at most 5 s (the daemon thread's transfers end
        with their group's timeout) and raise nothing."""
        self._thread.join(min(5.0, self.ctx.timeout_s) if quiet else self.ctx.timeout_s + 10.0)
        if self.error is not None and not quiet:
            raise self.error


def all_landed(ctx: DistContext, move: BackgroundMove) -> bool:
    """Whether every rank's transfers of ``move`` have landed and passed their check (one all_reduce on the
    main group of [ranks still waiting, wrong received rows]; a rank whose transfers failed raises their
    one-line failure first). A wrong received row on any rank raises
    :class:`runtime.apply.WeightCheckFailed` on every rank, each with one line, before any switch."""
    landed = move.landed_here()
    wrong = move.wrong if landed else []
    mine = torch.tensor([int(not landed), len(wrong)], dtype=torch.int64, device=ctx.device)
    if ctx.distributed:
        with ctx.guard("all_reduce of the background transfers' status"):
            dist.all_reduce(mine, group=ctx.group)
    waiting, total = (int(v) for v in mine.tolist())
    if total:
        raise check_failed(ctx, wrong, total, f"of the experts received in the background for the placement of "
                                              f"step {move.started_at}", "received expert")
    return waiting == 0
