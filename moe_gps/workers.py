"""Results of a ``multiprocessing`` pool as they finish, in a way that Ctrl-C and SIGTERM can stop.

``Pool.imap_unordered`` makes the caller wait inside the pool's own lock. A signal handler
that raises (Ctrl-C, or SIGTERM and SIGHUP through :mod:`moe_gps.signals`) can fire just after
that lock is taken and before the ``with`` statement that releases it has begun; the lock is
then held for ever, the pool's result thread blocks on it, and ``Pool.join`` (or the pool's
clean-up at exit) never returns. :func:`unordered` submits the chunks with callbacks that
append to a deque (no lock on the caller's side) and waits by sleeping, so an interruption
always lands in plain code, and the pool can be closed and joined afterwards.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator


def _chunk(fn: Callable, items: list) -> list:
    return [fn(x) for x in items]


def unordered(pool, fn: Callable, items: Iterable, chunksize: int = 1, poll_s: float = 0.005) -> Iterator[Any]:
    """``fn(item)`` for every item, in the order they finish, ``chunksize`` items per task; a worker's
    exception is raised here."""
    items = list(items)
    step = max(1, int(chunksize))
    done: deque = deque()
    failed: list[BaseException] = []
    left = 0
    for i in range(0, len(items), step):
        pool.apply_async(_chunk, (fn, items[i:i + step]), callback=done.append, error_callback=failed.append)
        left += 1
    while left:
        if failed:
            raise failed[0]
        if done:
            left -= 1
            yield from done.popleft()
        else:
            time.sleep(poll_s)
