"""Results of a ``multiprocessing`` pool as they finish, in a way that Ctrl-C and SIGTERM can stop.

``Pool.imap_unordered`` makes the caller wait inside the pool's own lock. A signal handler
that raises (Ctrl-C, or SIGTERM and SIGHUP through :mod:`moe_gps.signals`) can fire just after
that lock is taken and before the ``with`` statement that releases it has begun; the lock is
then held for ever, the pool's result thread blocks on it, and ``Pool.join`` (or the pool's
clean-up at exit) never returns. :func:`unordered` submits the chunks with callbacks that
append to a deque (no lock on the caller's side) and waits by sleeping, so an interruption
always lands in plain code, and the pool can be closed and joined afterwards.

:func:`fork_map` runs a function over items in forked processes, which inherit what the parent
holds (a trace, configs) without pickling it; a worker reports progress with :func:`progress`;
:func:`forking` gives a parallel section its number of workers, one section at a time;
:func:`watch` makes :func:`unordered` raise when a pool's worker is killed, where the pool itself
would wait for ever; :func:`kill_pool` then ends the pool in bounded time.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from moe_gps.signals import SIGNALS, Terminated, held, unblock

#: in a worker of :func:`fork_map`: the call's context and the queue its progress goes to (empty elsewhere)
_WORKER: dict = {}
#: held by the parallel section (:func:`forking`) of this process that has forked workers
_FORKING = threading.Lock()


def _chunk(fn: Callable, items: list) -> list:
    return [fn(x) for x in items]


def unordered(pool, fn: Callable, items: Iterable, chunksize: int = 1, poll_s: float = 0.005,
              waiting: Callable[[], None] | None = None) -> Iterator[Any]:
    """``fn(item)`` for every item, in the order they finish, ``chunksize`` items per task; a worker's
    exception is raised here. ``waiting()`` is called whenever no result is ready."""
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
            if waiting is not None:
                waiting()
            time.sleep(poll_s)


@contextlib.contextmanager
def forking(jobs: int) -> Iterator[int]:
    """How many forked workers a parallel section may use: ``jobs``, or 1 where processes cannot be
    forked (:func:`can_fork`) or another section of this process holds the workers (a call made in
    a worker, or from another thread), which then runs in this process. Decide a section's split
    inside it, then run it with :func:`fork_map` and that count."""
    if jobs <= 1 or not can_fork() or not _FORKING.acquire(blocking=False):
        yield 1
        return
    try:
        yield jobs
    finally:
        _FORKING.release()


def fork_map(fn: Callable, items: Iterable, jobs: int, context: Any = None,
             on_progress: Callable[[int], None] | None = None) -> Iterator[Any]:
    """``fn(item, context)`` for every item, in ``jobs`` forked processes in the order they finish
    (here, one after another, with one job or one item, or where processes cannot be forked).
    ``fn`` must be a module-level function; ``context`` is what every item needs: the workers
    inherit it when they are forked, nothing of it is pickled. Run it inside :func:`forking`, with
    the count that gives. A call to :func:`progress` in a worker calls ``on_progress`` here.
    """
    items = list(items)
    if jobs <= 1 or len(items) <= 1 or not can_fork():
        for x in items:
            yield fn(x, context)
        return
    ctx = multiprocessing.get_context("fork")
    queue = ctx.SimpleQueue() if on_progress is not None else None

    pool = None

    def drain() -> None:
        while queue is not None and not queue.empty():
            on_progress(queue.get())

    try:
        _WORKER.update(context=context, progress=queue)    # the workers, forked now, inherit them
        try:
            # a signal during the start waits until the pool is named here, so that it is killed below (a
            # pool cut off half-started was left to the clean-up at exit, which could wait for ever)
            with held():
                pool = ctx.Pool(min(jobs, len(items)), initializer=_worker_signals)
        finally:
            _WORKER.clear()
        check = watch(pool)

        def waiting() -> None:
            drain()
            check()

        for res in unordered(pool, _in_worker, [(fn, x) for x in items], waiting=waiting):
            drain()
            yield res
        pool.close()
        pool.join()         # a signal while the workers end kills them too (else the clean-up at exit waits)
    except BaseException:
        if pool is not None:
            kill_pool(pool)
        raise
    finally:
        if queue is not None:
            queue.close()


def watch(pool) -> Callable[[], None]:
    """A ``waiting`` callback for :func:`unordered` on a ``multiprocessing`` pool just started: it raises
    once one of the pool's workers has ended (killed, e.g. by the out-of-memory killer). The pool itself
    would start a new worker and wait for ever for the task the dead one held."""
    workers = list(pool._pool)              # multiprocessing keeps its workers there

    def check() -> None:
        dead = next((w for w in workers if w.exitcode is not None), None)
        if dead is not None:
            raise _ended(dead.pid, dead.exitcode)

    return check


#: how long :func:`kill_pool` waits at most for the pool's workers to end
KILL_WAIT_S = 10.0


def kill_pool(pool, wait_s: float = KILL_WAIT_S) -> None:
    """End a ``multiprocessing`` pool at once: stop it starting workers in place of dead ones, kill its
    workers, and wait at most ``wait_s`` seconds for them to end.

    Not ``Pool.terminate``: it sends SIGTERM, which a worker may ignore (recommend's do), and it takes the
    task queue's lock, which a worker killed while it waited for its next task holds for ever. The pool's
    own threads end on their sentinels within ``wait_s`` (should a worker have died on its own while it held
    the result queue's lock, they are daemons that end with the process); its clean-up at exit is
    cancelled, as nothing is left for it to do."""
    from multiprocessing.pool import TERMINATE

    pool._state = TERMINATE
    handler = pool._worker_handler
    for thread in (handler, pool._task_handler, pool._result_handler):
        thread._state = TERMINATE                 # no more workers started, no more results waited for
    pool._change_notifier.put(None)               # the worker handler sees that now
    deadline = time.monotonic() + wait_s
    # a worker killed halfway through sending a result would hold the result queue's lock for ever, and the
    # task handler's closing sentinel, and so both handlers, would wait on it: hold it while they are killed
    wlock = getattr(pool._outqueue, "_wlock", None)
    held = wlock is not None and wlock.acquire(timeout=min(1.0, wait_s))
    try:
        while True:
            workers = list(pool._pool)
            for proc in workers:
                if proc.exitcode is None:
                    proc.kill()
            if (not handler.is_alive() and all(proc.exitcode is not None for proc in workers)) \
                    or time.monotonic() > deadline:
                break
            handler.join(0.05)
    finally:
        if held:
            wlock.release()
    # the task handler may be blocked writing tasks no worker reads any more: with the workers dead, drain them
    tasks = pool._inqueue._reader
    while pool._task_handler.is_alive() and time.monotonic() < deadline:
        while tasks.poll():
            tasks.recv_bytes()
        pool._task_handler.join(0.05)
    pool._result_handler.join(max(0.0, deadline - time.monotonic()))    # it ends on the sentinel now sent
    pool._terminate.cancel()


def _ended(pid: int, exitcode: int) -> BaseException:
    """What to raise for a worker process that ended before its work was done."""
    if -exitcode in SIGNALS:                        # stopped with the whole process group
        return Terminated(-exitcode)
    if exitcode == -9:
        return MemoryError(f"worker process {pid} was killed with SIGKILL, as the kernel's out-of-memory "
                           "killer does; run fewer workers at once (--jobs)")
    return RuntimeError(f"a worker process (pid {pid}) ended with exit code {exitcode} before its work was done")


def _in_worker(job: tuple[Callable, Any]) -> Any:
    fn, item = job
    return fn(item, _WORKER["context"])


def can_fork() -> bool:
    """Whether :func:`fork_map` runs its items in forked processes here: where ``fork`` is a start
    method and is safe with the system's libraries (not on macOS, where Python itself moved away
    from it)."""
    return "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin"


def _worker_signals() -> None:
    """Worker start: Ctrl-C and SIGHUP are the parent's to handle; SIGTERM, which the parent's
    ``Pool.terminate`` sends, ends the worker quietly (not the parent's handler inherited). The worker was
    forked with them held (:func:`fork_map`): they come through from now on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.SIG_IGN)
    unblock()


def progress(n: int = 1) -> None:
    """In a worker of :func:`fork_map`: ``n`` more units of work done (nothing elsewhere)."""
    queue = _WORKER.get("progress")
    if queue is not None:
        queue.put(n)


class Warm:
    """One call run in a process forked now, which imports ``modules`` meanwhile: a slow import
    (matplotlib's) then costs no time where another core is free while this process goes on.

    :meth:`submit` sends the call (``fn`` module-level; ``fn`` and its arguments are pickled, so
    keep them small) and :meth:`result` waits for its return value, or raises its exception. One
    call per instance. Use as a context manager: the process ends with it (at once, on an error).
    With ``fork`` False, or where processes cannot be forked (:func:`can_fork`), the call runs in
    this process, in :meth:`result`.
    """

    def __init__(self, modules: tuple[str, ...] = (), fork: bool = True) -> None:
        self.proc = self.conn = None
        self._call: tuple | None = None
        # only from a process of one thread: a lock another thread holds would stay locked in the fork
        if fork and can_fork() and threading.active_count() == 1:
            ctx = multiprocessing.get_context("fork")
            self.conn, child = ctx.Pipe()
            # not a daemon: it forks workers of its own (sim.plots); it ends when this process closes the pipe
            self.proc = ctx.Process(target=_warm_main, args=(child, self.conn, modules), name="moe-gps-warm")
            with held():        # the process starts with the signals held, until it has its own handlers
                self.proc.start()
            child.close()

    def submit(self, fn: Callable, *args: Any) -> None:
        if self.proc is None:
            self._call = (fn, args)
        else:
            self.conn.send((fn, args))

    def result(self) -> Any:
        if self.proc is None:
            fn, args = self._call
            return fn(*args)
        while not self.conn.poll(0.005):          # a short wait: Ctrl-C and SIGTERM land in plain code
            pass
        try:
            ok, value = self.conn.recv()
        except EOFError:                          # the process ended without an answer
            self.proc.join()
            raise _ended(self.proc.pid, self.proc.exitcode) from None
        if not ok:
            raise value
        return value

    def __enter__(self) -> "Warm":
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        if self.proc is None or self.conn.closed:
            return
        if exc_type is None:
            with contextlib.suppress(OSError):
                self.conn.send(None)          # no call, or the call is done: the process ends by itself
            self.proc.join()
            self.conn.close()
        else:
            self.stop()

    def stop(self) -> None:
        """End the process now, a call it is making with it (e.g. before the folder it writes into is
        removed); the context's exit then has nothing left to do."""
        if self.proc is None or self.conn.closed:
            return
        self.conn.close()                     # a process waiting for its call reads the end of the pipe
        self.proc.terminate()                 # one making the call stops it (and the workers it forked)
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


#: in the warm process: whether it is making its call
_WARM_CALLING = [False]


def _warm_main(conn, parent_end, modules: tuple[str, ...]) -> None:
    """The warm process. Ctrl-C and SIGHUP are the parent's to handle; SIGTERM (the parent's
    ``terminate``) is :func:`_warm_sigterm`'s."""
    parent_end.close()                          # so that the parent closing its end is the end of the pipe
    # (a SIGTERM already pending, held since the fork, must not be discarded by ignoring it on the way)
    signal.signal(signal.SIGTERM, _warm_sigterm)
    for sig in (signal.SIGINT, *SIGNALS):
        if sig != signal.SIGTERM:
            signal.signal(sig, signal.SIG_IGN)
    try:
        unblock()                               # held by the parent while it forked (Warm.__init__)
        _warm_call(conn, modules)
    except Terminated as err:                   # the call's workers are stopped: end by the signal
        _end_by(err.signum)


def _warm_sigterm(signum: int, frame) -> None:
    """SIGTERM in the warm process: while it makes its call, raise :class:`Terminated`, so that the
    workers the call forked are stopped first; otherwise end at once by the signal, without a word.
    The handler is never swapped for another while a signal may come (CPython reports a signal that
    arrives during the swap on stderr)."""
    if _WARM_CALLING[0]:
        raise Terminated(signum)
    _end_by(signum)


def _end_by(signum: int) -> None:
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _warm_call(conn, modules: tuple[str, ...]) -> None:
    import importlib

    for m in modules:
        importlib.import_module(m)
    try:
        job = conn.recv()
    except EOFError:                          # the parent has gone
        return
    if job is None:
        return
    fn, args = job
    _WARM_CALLING[0] = True
    try:
        reply = (True, fn(*args))
    except Exception as err:  # noqa: BLE001 - raised in the parent
        reply = (False, err)
    _WARM_CALLING[0] = False
    try:
        conn.send(reply)
    except BrokenPipeError:
        return
    except Exception as err:  # noqa: BLE001 - a result or an exception that does not pickle
        conn.send((False, RuntimeError(f"{type(err).__name__}: {err}")))
