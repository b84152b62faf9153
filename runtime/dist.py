"""The process group: backend from the device, timeouts, and failures that name a rank.

``init_distributed`` joins (or, for one process, skips) a ``torch.distributed`` group:
NCCL when the device is a GPU, gloo on CPU, with a timeout on every collective. Each
rank writes its progress (step and phase) to the group's key-value store; when a
collective fails (a peer died, or it timed out), :meth:`DistContext.guard` turns the
backend error into a :class:`CollectiveFailure` whose message names the failing
collective and the ranks that exited or are not responding (:mod:`runtime.faults`:
from their process, their ``exit`` key, their heartbeat - a counter each rank's
background thread bumps in the store every second - and their progress), instead of a
hang or a bare backend traceback.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from moe_gps.errors import UserError
from runtime import faults



#: backend errors (DistBackendError and friends subclass RuntimeError; DistError exists from torch 2.3)
_DIST_ERRORS = (RuntimeError,) + ((dist.DistError,) if hasattr(dist, "DistError") else ())


def all_gather_flat(output: torch.Tensor, tensor: torch.Tensor, group: Any = None) -> None:
    """Concatenate every rank's ``tensor`` into ``output`` (rank order); torch >= 2.4 and newer names."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(output, tensor, group=group)


class CollectiveFailure(RuntimeError):
    """A collective failed or timed out; the message names the rank(s) behind."""


def choose_device(device: str = "auto", local_rank: int = 0, where: str = "device") -> torch.device:
    """``auto``: ``cuda:<local_rank>`` when a GPU is visible, else CPU; or the named device.

    ``cuda`` with no GPU visible is a :class:`UserError` naming ``where`` (the flag or key that asked)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{where} cuda: torch sees no GPU (torch.cuda.is_available() is False); "
                            "use cpu, or auto to take a GPU when there is one")
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device(device)


def choose_backend(device: torch.device) -> str:
    """NCCL for GPUs, gloo for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass
class DistContext:
    """Who this process is in the expert-parallel group.

    rank, world_size: in the group (0 and 1 when torch.distributed is not used)
    device:           where tensors live; backend: "gloo" | "nccl" | "none"
    timeout_s:        timeout of every collective, seconds
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "none"
    timeout_s: float = 60.0
    group: Any = None
    store: Any = None
    node_of: np.ndarray | None = None   # int [world_size]: each rank's node (ranks on one host); None: one node
    peers: list[str] | None = None      # every rank's "<host> <pid>", gathered when the group started
    _last: tuple[int, str] = (-1, "start")
    _stop: Any = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ----------------------------------------------------------- progress
    def _set(self, kind: str, value: str) -> None:
        if self.store is not None:
            try:
                self.store.set(faults.key(kind, self.rank), value)
            except Exception:  # the store may be gone when the host rank died; progress is advisory
                self.store = None

    @property
    def step(self) -> int:
        """The step this rank last recorded progress in (-1 before the first)."""
        return self._last[0]

    def progress(self, step: int, phase: str) -> None:
        """Record that this rank reached ``phase`` of ``step`` (read when a peer fails)."""
        self._last = (step, phase)
        self._set("progress", f"{step} {phase}")

    def mark_exit(self, reason: str) -> None:
        """Tell the other ranks why this one stops (read when their next collective fails)."""
        self._set("exit", reason)

    def start_heartbeat(self, interval_s: float = faults.HEARTBEAT_S) -> None:
        """Bump this rank's heartbeat counter in the store every ``interval_s`` (daemon thread)."""
        if self.store is None or self._stop is not None:
            return
        self._stop = threading.Event()
        key, store, stop = faults.key("heartbeat", self.rank), self.store, self._stop

        def beat() -> None:
            while not stop.is_set():
                try:
                    store.add(key, 1)
                except Exception:
                    return
                stop.wait(interval_s)

        threading.Thread(target=beat, name="moe-gps-heartbeat", daemon=True).start()

    def describe_failure(self, what: str, err: BaseException, elapsed: float,
                         wait_s: float = 0.0) -> tuple[str, faults.Diagnosis]:
        """One line: this rank, the failed collective, the ranks that exited or stopped responding
        (:func:`runtime.faults.diagnose`; ``wait_s`` > 0 also watches heartbeats), the backend's words;
        and the diagnosis itself."""
        step, phase = self._last
        found = faults.diagnose(self.store, self.rank, self.world_size, self._last, wait_s=wait_s,
                                peers=self.peers)
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return (f"rank {self.rank}: collective '{what}' at step {step} ({phase}) failed after {elapsed:.1f} s "
                f"(timeout {self.timeout_s:g} s): {found.text(self.world_size)}; backend said: {cause[:300]}",
                found)

    def stopped_by_peer(self, err: KeyboardInterrupt) -> CollectiveFailure | None:
        """For a rank stopped by a signal: the failure that names a peer that exited (torchrun stops every
        rank as soon as one exits, often before the others reach a collective), else None."""
        if not self.distributed:
            return None
        from moe_gps.signals import describe

        found = faults.diagnose(self.store, self.rank, self.world_size, self._last, peers=self.peers)
        if not found.exited:
            return None
        if all(d.startswith(("KeyboardInterrupt", "Terminated")) for d in found.exited.values()):
            return None         # the peers were stopped by the same Ctrl-C or SIGTERM: no failure of theirs
        step, phase = self._last
        return CollectiveFailure(f"rank {self.rank}: {describe(err)} at step {step} ({phase}): "
                                 f"{found.text(self.world_size)}")

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run collectives; a backend error becomes a :class:`CollectiveFailure` naming ranks.

        A rank that exited is named at once; otherwise the heartbeats are watched for 2.5 s
        (a SIGTERM meanwhile, e.g. from torchrun, ends the wait with what is known).
        """
        t0 = time.perf_counter()
        try:
            yield
        except CollectiveFailure:
            raise
        except _DIST_ERRORS as err:  # DistBackendError, timeouts, closed peers
            if not self.distributed:
                raise
            elapsed = time.perf_counter() - t0
            quick, found = self.describe_failure(what, err, elapsed)
            if found.exited or not found.store_ok:
                raise CollectiveFailure(quick) from err
            try:
                full, _ = self.describe_failure(what, err, elapsed, wait_s=2.5 * faults.HEARTBEAT_S)
            except KeyboardInterrupt:
                raise CollectiveFailure(quick) from err
            raise CollectiveFailure(full) from err

    def barrier(self, what: str = "barrier") -> None:
        if self.distributed:
            with self.guard(what):
                dist.barrier(group=self.group)

    def close(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str = "auto", timeout_s: float = 60.0, *, rank: int | None = None,
                     world_size: int | None = None, init_method: str | None = None) -> DistContext:
    """Join the process group described by the environment (torchrun) or the arguments.

    Under ``torchrun`` the rank, world size and rendezvous come from ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. With a world of
    one, no process group is created and every collective is skipped.
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = choose_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size <= 1:
        return DistContext(0, 1, dev, "none", timeout_s)
    backend = choose_backend(dev)
    if backend == "nccl":
        # fail (and tear down) on a timed-out NCCL collective instead of hanging
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    kwargs: dict[str, Any] = {"backend": backend, "timeout": _dt.timedelta(seconds=timeout_s),
                              "rank": rank, "world_size": world_size,
                              "init_method": init_method or "env://"}
    if backend == "nccl":
        kwargs["device_id"] = dev
    dist.init_process_group(**kwargs)
    store = None
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # private API; progress reports are then unavailable
        store = None
    ctx = DistContext(rank, world_size, dev, backend, timeout_s, None, store)
    ctx._set("pid", faults.whoami())
    peers: list = [None] * world_size
    with ctx.guard("all_gather of the ranks' host names and process ids"):
        dist.all_gather_object(peers, faults.whoami())
    ctx.peers = peers
    hosts = [p.partition(" ")[0] for p in peers]
    if len(set(hosts)) > 1:                   # nodes numbered in order of their first rank
        first: dict = {}
        ctx.node_of = np.array([first.setdefault(h, len(first)) for h in hosts], dtype=np.int64)
    ctx.progress(-1, "joined")
    ctx.start_heartbeat()
    return ctx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for local test groups)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
