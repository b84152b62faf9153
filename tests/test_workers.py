"""moe_gps.workers.unordered: a pool's results as they finish, stoppable without leaving the pool stuck."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from moe_gps.workers import unordered


def _square(x: int) -> int:
    time.sleep(0.01)
    return x * x


def _fail(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x


def _pool(n: int = 2):
    return multiprocessing.get_context("fork").Pool(n)


def test_every_result_once_in_any_order():
    with _pool() as pool:
        assert sorted(unordered(pool, _square, range(20), chunksize=3)) == [x * x for x in range(20)]
        assert list(unordered(pool, _square, [])) == []


def test_a_worker_error_is_raised_here():
    with _pool() as pool:
        with pytest.raises(ValueError, match="three"):
            list(unordered(pool, _fail, range(8)))


def test_interrupted_consumer_leaves_a_pool_that_closes_and_joins():
    """Ctrl-C (here: KeyboardInterrupt from another thread's timer) while waiting for results: the pool
    still closes and joins (with imap_unordered the interruption could leave the pool's lock held)."""
    import _thread

    pool = _pool()
    timer = threading.Timer(0.05, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        for _ in unordered(pool, _square, range(400)):
            pass
    pool.close()
    joiner = threading.Thread(target=pool.join, daemon=True)
    joiner.start()
    joiner.join(30)
    assert not joiner.is_alive()
