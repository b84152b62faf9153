"""Run a function on N local ranks in a gloo group on 127.0.0.1 (tests and benchmarks).

``run_local(fn, world_size, *args)`` starts ``world_size`` processes, each calling
``fn(ctx, *args)`` with a joined :class:`runtime.dist.DistContext`, and returns the
list of their return values (rank order). A rank that raises makes ``run_local``
raise with that rank's error; a rank that does not finish in ``timeout_s`` is killed
and reported. Processes start with ``forkserver`` (torch imported once in the
server) so that each rank costs a fork, not a fresh ``import torch``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from typing import Any, Callable


def _entry(fn: Callable, rank: int, world_size: int, port: int, timeout_s: float, threads: int,
           results: Any, args: tuple) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    try:
        import torch

        from runtime.dist import init_distributed
        torch.set_num_threads(threads)
        ctx = init_distributed("cpu", timeout_s)
        try:
            out = fn(ctx, *args)
        finally:
            try:
                ctx.close()
            except Exception:
                pass
        results.put((rank, True, out))
    except BaseException as err:  # report every failure to the parent
        results.put((rank, False, f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))


class RankFailed(RuntimeError):
    """A rank of a local group raised; ``rank`` and ``message`` say which and what."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(f"rank {rank} failed: {message}")
        self.rank = rank
        self.message = message


def run_local(fn: Callable, world_size: int, *args: Any, timeout_s: float = 60.0, collective_timeout_s: float = 30.0,
              threads: int = 1, start_method: str = "forkserver", return_errors: bool = False) -> list[Any]:
    """Run ``fn(ctx, *args)`` on ``world_size`` local gloo ranks; results in rank order.

    ``fn`` must be importable (a module-level function). Raises :class:`RankFailed`
    for the first rank that raised (the lowest rank among those that did), unless
    ``return_errors``: then a failed rank's entry is a :class:`RankFailed`.
    """
    from runtime.dist import free_port

    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(["torch", "torch.distributed", "runtime.moe_layer"])
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, collective_timeout_s, threads, results, args),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(out) - set(errors))
                raise RankFailed(missing[0], f"did not finish within {timeout_s:g} s (ranks {missing} still running)")
            try:
                rank, ok, value = results.get(timeout=min(left, 0.5))
            except queue.Empty:
                # a rank that died without reporting (os._exit, a signal): give the queue a moment
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in out and r not in errors]
                if not dead:
                    continue
                try:
                    rank, ok, value = results.get(timeout=1.0)
                except queue.Empty:
                    for r in dead:
                        errors[r] = f"exited with code {procs[r].exitcode} without reporting"
                    continue
            (out if ok else errors)[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors and not return_errors:
        r = min(errors)
        raise RankFailed(r, errors[r])
    return [out[r] if r in out else RankFailed(r, errors[r]) for r in range(world_size)]
