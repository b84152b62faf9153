"""The process group: backend from the device, timeouts, and failures that name a rank.

``init_distributed`` joins (or, for one process, skips) a ``torch.distributed`` group:
NCCL when the device is a GPU, gloo on CPU, with a timeout on every collective. Each
rank writes its progress (step and phase) to the group's key-value store; when a
collective fails (a peer died, or it timed out), :meth:`DistContext.guard` turns the
backend error into a :class:`CollectiveFailure` whose message names the failing
collective and the ranks that are dead (their heartbeat, a counter each rank's
background thread bumps in the store every second, stopped) or behind (alive but at
an earlier step or phase), instead of a hang or a bare backend traceback.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist

PROGRESS_PREFIX = "moe_gps/progress/"
HEARTBEAT_PREFIX = "moe_gps/heartbeat/"
HEARTBEAT_S = 1.0
#: the phases of a step, in order (a rank at an earlier (step, phase) is behind)
STEP_PHASES = ("joined", "start", "plan", "move", "forward", "gather", "done")


#: backend errors (DistBackendError and friends subclass RuntimeError; DistError exists from torch 2.3)
_DIST_ERRORS = (RuntimeError,) + ((dist.DistError,) if hasattr(dist, "DistError") else ())


def all_gather_flat(output: torch.Tensor, tensor: torch.Tensor, group: Any = None) -> None:
    """Concatenate every rank's ``tensor`` into ``output`` (rank order); torch >= 2.4 and newer names."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(output, tensor, group=group)


class CollectiveFailure(RuntimeError):
    """A collective failed or timed out; the message names the rank(s) behind."""


def choose_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: ``cuda:<local_rank>`` when a GPU is visible, else CPU; or the named device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for, but torch sees no GPU (torch.cuda.is_available() is False)")
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
    _last: tuple[int, str] = (-1, "start")
    _stop: Any = None
    #: print a first line to stderr as soon as a collective fails (before looking for the culprit,
    #: which takes ~2.5 s; torchrun may kill this rank meanwhile because a peer died)
    announce: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ----------------------------------------------------------- progress
    def progress(self, step: int, phase: str) -> None:
        """Record that this rank reached ``phase`` of ``step`` (read when a peer fails)."""
        self._last = (step, phase)
        if self.store is not None:
            try:
                self.store.set(f"{PROGRESS_PREFIX}{self.rank}", f"{step} {phase}")
            except Exception:  # the store may be gone when the host rank died; progress is advisory
                self.store = None

    def start_heartbeat(self, interval_s: float = HEARTBEAT_S) -> None:
        """Bump this rank's heartbeat counter in the store every ``interval_s`` (daemon thread)."""
        if self.store is None or self._stop is not None:
            return
        self._stop = threading.Event()
        key, store, stop = f"{HEARTBEAT_PREFIX}{self.rank}", self.store, self._stop

        def beat() -> None:
            while not stop.is_set():
                try:
                    store.add(key, 1)
                except Exception:
                    return
                stop.wait(interval_s)

        threading.Thread(target=beat, name="moe-gps-heartbeat", daemon=True).start()

    def dead_ranks(self, wait_s: float = 2.5 * HEARTBEAT_S) -> list[int] | None:
        """Ranks whose heartbeat did not advance within ``wait_s`` (None: the store is unreachable)."""
        if self.store is None:
            return None
        try:
            keys = [f"{HEARTBEAT_PREFIX}{r}" for r in range(self.world_size)]
            first = [self.store.add(k, 0) for k in keys]
            time.sleep(wait_s)
            second = [self.store.add(k, 0) for k in keys]
        except Exception:
            return None
        return [r for r in range(self.world_size) if r != self.rank and second[r] == first[r]]

    def peer_progress(self) -> dict[int, str]:
        """Last recorded (step, phase) of each rank, as text; ranks that never wrote are absent."""
        out: dict[int, str] = {}
        if self.store is None:
            return out
        for r in range(self.world_size):
            key = f"{PROGRESS_PREFIX}{r}"
            try:
                if self.store.check([key]):
                    out[r] = self.store.get(key).decode()
            except Exception:
                break
        return out

    def _progress_lines(self, exclude: list[int]) -> list[str]:
        step, phase = self._last
        seen = self.peer_progress()
        if not seen:
            return []

        def key(text: str) -> tuple[int, int]:
            s, _, ph = text.partition(" ")
            return int(s), STEP_PHASES.index(ph) if ph in STEP_PHASES else 0
        mine = key(f"{step} {phase}")
        behind = [r for r in range(self.world_size) if r not in exclude and r != self.rank
                  and (r not in seen or key(seen[r]) < mine)]
        lines = [f"behind (stuck or slow): rank {', '.join(map(str, behind))}"] if behind else []
        lines.append("last progress: " + ", ".join(f"rank {r}: {seen.get(r, 'never started')}"
                                                   for r in range(self.world_size)))
        return lines

    def describe_failure(self, what: str, err: BaseException, elapsed: float, quick: bool = False) -> str:
        """One line: the failed collective, dead ranks (heartbeat; skipped when ``quick``), ranks behind."""
        step, phase = self._last
        lines = [f"rank {self.rank}: collective '{what}' at step {step} ({phase}) failed after {elapsed:.1f} s "
                 f"(timeout {self.timeout_s:g} s)"]
        dead: list[int] = []
        if not quick:
            found = self.dead_ranks() if self.store is not None else None
            if found is None:
                lines.append("could not reach the key-value store to tell which rank failed (in a local launch "
                             "rank 0 hosts it: it may be the rank that died)")
            elif found:
                dead = found
                lines.append(f"dead (no heartbeat): rank {', '.join(map(str, dead))}")
        lines += self._progress_lines(dead)
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        lines.append(f"backend said: {cause[:300]}")
        return "; ".join(lines)

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run collectives; a backend error becomes a :class:`CollectiveFailure` naming ranks."""
        t0 = time.perf_counter()
        try:
            yield
        except CollectiveFailure:
            raise
        except _DIST_ERRORS as err:  # DistBackendError, timeouts, closed peers
            if not self.distributed:
                raise
            elapsed = time.perf_counter() - t0
            if self.announce:
                print(f"runtime: {self.describe_failure(what, err, elapsed, quick=True)}; checking heartbeats...",
                      file=sys.stderr, flush=True)
            raise CollectiveFailure(self.describe_failure(what, err, elapsed)) from err

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
    ctx.progress(-1, "joined")
    ctx.start_heartbeat()
    return ctx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for local test groups)."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
