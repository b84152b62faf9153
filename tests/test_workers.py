"""moe_gps.workers.unordered: a pool's results as they finish, stoppable without leaving the pool stuck."""

from __future__ import annotations

import multiprocessing
import os
import signal
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


def _ticks(x: int, scale: int) -> int:
    from moe_gps.workers import progress

    progress(x)
    return x * scale


def _fail_here(x: int, context) -> int:
    return _fail(x)


def test_fork_map_runs_in_forked_workers_and_passes_their_progress_here():
    from moe_gps.workers import fork_map

    seen: list[int] = []
    # the context reaches every item, in the workers too (inherited, not pickled)
    assert sorted(fork_map(_ticks, [1, 2, 3, 4], jobs=2, context=10, on_progress=seen.append)) == [10, 20, 30, 40]
    assert sorted(seen) == [1, 2, 3, 4]                 # every worker's progress reached this process
    # one job: in this process, in order; progress outside a worker goes nowhere
    assert list(fork_map(_ticks, [3, 1], jobs=1, context=10, on_progress=seen.append)) == [30, 10]
    assert sorted(seen) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="three"):
        list(fork_map(_fail_here, range(6), jobs=2))


def test_one_parallel_section_at_a_time():
    from moe_gps.workers import can_fork, forking

    with forking(3) as outer:
        assert outer == (3 if can_fork() else 1)
        with forking(3) as inner:                       # as in a worker, or another thread: here
            assert inner == 1
    with forking(1) as one:
        assert one == 1
    with forking(2) as again:                           # released: free again
        assert again == (2 if can_fork() else 1)


def _killed(x: int, context) -> int:
    import os
    import signal

    if x == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.2)
    return x


def test_fork_map_reports_a_killed_worker_instead_of_waiting_for_ever():
    from moe_gps.workers import fork_map

    with pytest.raises(MemoryError, match="killed with SIGKILL"):
        list(fork_map(_killed, [1, 2, 3], jobs=3))


_KILL_POOLS = """
import multiprocessing, os, signal, sys, time
from moe_gps.workers import kill_pool

def killed_within(pool):
    t = time.monotonic()
    kill_pool(pool, wait_s=30.0)
    return round(time.monotonic() - t, 1), sum(w.exitcode is None for w in pool._pool)

ctx = multiprocessing.get_context("fork")
for wait in (0.0,) * 10 + (0.5,):   # workers still starting, then waiting for tasks (one holds the queue's lock)
    idle = ctx.Pool(2)
    time.sleep(wait)
    print(*killed_within(idle))
def slow(x):
    time.sleep(0.5)
    return len(x)

busy = ctx.Pool(2)                  # more tasks queued than the pipe to the workers holds: the task handler
for k in range(300):                # waits to write the rest, which no worker reads once they are dead
    busy.apply_async(slow, ("x" * 20000,))
time.sleep(0.3)
print(*killed_within(busy))
pool = ctx.Pool(2)
# a process that takes the task queue's lock and is killed holding it, as a worker killed by the
# out-of-memory killer while it waited for its next task
holder = ctx.Process(target=lambda lock: (lock.acquire(), time.sleep(100)), args=(pool._inqueue._rlock,))
holder.start()
time.sleep(0.5)
os.kill(holder.pid, signal.SIGKILL)
holder.join()
print(*killed_within(pool))
import threading
assert threading.active_count() == 1, threading.enumerate()        # the pools' threads ended too
"""


def test_kill_pool_ends_a_pool_even_when_a_dead_process_holds_its_task_queue_lock():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _KILL_POOLS], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]      # the process also exits: nothing left waiting
    for line in proc.stdout.splitlines():
        waited, alive = line.split()
        assert float(waited) < 5 and alive == "0", proc.stdout   # Pool.terminate alone waits for ever


_ERROR_BESIDE_A_BIG_RESULT = """
import threading, time
import numpy as np
from moe_gps.errors import UserError
from moe_gps.workers import fork_map

def work(i, context):
    if i == 0:
        time.sleep(0.05)
        raise UserError("boom")
    return np.ones(4_000_000)                     # 32 MB: the other worker is still sending it when 0 fails

for trial in range(10):
    try:
        list(fork_map(work, [0, 1, 2, 3], 2))
    except UserError:
        pass
    time.sleep(0.1)
    print(sum("handle" in t.name for t in threading.enumerate()))
"""


def test_an_error_in_one_worker_leaves_no_pool_thread_while_another_sends_its_result():
    """One worker fails while the other is halfway through sending a large result: killed there, it would
    hold the result queue's lock for ever, and the pool's task and result handlers would wait on it (the
    threads a later fork of this process must not have: see Warm)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _ERROR_BESIDE_A_BIG_RESULT], capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["0"] * 10, proc.stdout


def _terminated(x: int, context) -> int:
    import os
    import signal

    if x == 1:
        os.kill(os.getpid(), signal.SIGTERM)          # as a kill of the whole process group would
    time.sleep(0.2)
    return x


def test_fork_map_stops_like_the_parent_when_a_worker_gets_sigterm():
    from moe_gps.signals import Terminated
    from moe_gps.workers import fork_map

    with pytest.raises(Terminated) as err:
        list(fork_map(_terminated, [1, 2, 3], jobs=3))
    assert err.value.exit_code == 143


@pytest.fixture
def one_thread(monkeypatch):
    """Warm forks only from a process of one thread: stop the tqdm monitor thread an earlier test may
    have started (and keep tqdm from starting another)."""
    import tqdm

    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)
    if tqdm.tqdm.monitor is not None:
        tqdm.tqdm.monitor.exit()
        tqdm.tqdm.monitor = None
    assert threading.active_count() == 1, threading.enumerate()


def _where(name: str) -> tuple[int, bool]:
    import os
    import sys
    return os.getpid(), name in sys.modules


def _exit_now(code: int) -> None:
    import os
    os._exit(code)


def test_warm_runs_the_call_in_a_process_that_imported_the_modules_first(tmp_path, monkeypatch, one_thread):
    import os
    import sys

    from moe_gps.workers import Warm

    name = f"warm_probe_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert name not in sys.modules            # imported by the warm process, not here
    with Warm((name,)) as warm:
        warm.submit(_where, name)
        pid, imported = warm.result()
    assert pid != os.getpid() and imported and name not in sys.modules
    assert not warm.proc.is_alive()
    with Warm((name,), fork=False) as here:
        here.submit(_where, "os")
        assert here.result() == (os.getpid(), True)


def test_warm_raises_the_call_error_here_and_names_a_process_that_died(one_thread):
    from moe_gps.workers import Warm

    with Warm() as warm:
        warm.submit(_fail, 3)
        with pytest.raises(ValueError, match="three"):
            warm.result()
    with Warm() as warm:
        assert warm.proc is not None            # (in this process, the call would end the test run)
        warm.submit(_exit_now, 7)
        with pytest.raises(RuntimeError, match=r"ended with exit code 7 before its work was done"):
            warm.result()


def test_leaving_warm_on_an_error_ends_its_process_at_once(one_thread):
    from moe_gps.workers import Warm

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with Warm() as warm:
            warm.submit(time.sleep, 30)
            raise KeyboardInterrupt
    assert time.monotonic() - t0 < 10 and warm.proc.exitcode is not None


def _forked_sleepers(folder: str) -> list:
    """Two forked workers (fork_map) that write their pids, then sleep."""
    from moe_gps.workers import fork_map, forking

    with forking(2) as jobs:
        return list(fork_map(_sleep_after_pid, range(2), jobs, folder))


def _sleep_after_pid(i: int, folder: str) -> int:
    import os
    from pathlib import Path

    (Path(folder) / f"{i}.pid").write_text(str(os.getpid()))
    time.sleep(30)
    return i


def test_leaving_warm_on_an_error_also_stops_the_workers_its_call_forked(tmp_path, one_thread):
    import os

    from moe_gps.workers import Warm

    with pytest.raises(KeyboardInterrupt):
        with Warm() as warm:
            warm.submit(_forked_sleepers, str(tmp_path))
            deadline = time.monotonic() + 30
            while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            raise KeyboardInterrupt
    assert warm.proc.exitcode == -15
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 2
    for pid in pids:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"worker {pid} still runs")


def test_leaving_warm_at_once_on_an_error_ends_its_process_every_time(one_thread):
    """The SIGTERM can reach the process before it has its own handlers (held since the fork, not lost),
    here from a parent whose SIGTERM raises, as the CLI's does."""
    from moe_gps.signals import handled
    from moe_gps.workers import Warm

    with handled():
        for _ in range(6):
            t0 = time.monotonic()
            with pytest.raises(ValueError):
                with Warm(("xml.dom.minidom",)) as warm:
                    raise ValueError
            # -15: stopped by the SIGTERM; 0, rarely: it had read the end of the pipe and left by itself
            assert warm.proc.exitcode in (-15, 0) and time.monotonic() - t0 < 5


def _warm_then_a_late_sigterm(child, parent_end) -> None:
    from moe_gps.workers import _warm_main

    _warm_main(child, parent_end, ())
    os.kill(os.getpid(), signal.SIGTERM)      # the parent's terminate(), once this process is done
    time.sleep(0.5)


def test_a_sigterm_after_the_warm_process_is_done_ends_it_quietly(one_thread, capfd):
    """A parent that leaves on an error closes the pipe, then terminates: the process may have read the
    end of the pipe and returned already. That SIGTERM ends it by the signal, without a traceback."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_warm_then_a_late_sigterm, args=(child, parent))
    proc.start()
    child.close()
    parent.close()
    proc.join(timeout=10)
    assert proc.exitcode == -15 and capfd.readouterr().err == ""
