"""SIGTERM and SIGHUP handled like Ctrl-C (SIGINT), in every process moe-gps starts.

``timeout``, torchrun, Kubernetes and closing a terminal stop a process with SIGTERM or
SIGHUP, whose default action kills it on the spot: temporary files stay behind and
worker processes die with tracebacks. :func:`install` makes both raise
:class:`Terminated` (a ``KeyboardInterrupt``), so the same clean-up that Ctrl-C runs
(temporary files removed, worker pools and child processes stopped) runs for them too, and
the process exits with ``128 + signal`` (143 for SIGTERM, 129 for SIGHUP; 130 for
Ctrl-C). A second signal during that clean-up, Ctrl-C included, is ignored, except that a
second Ctrl-C cuts short a wait for a child or for a pool's runs under way (:func:`second_ctrl_c`).

Pool worker processes call :func:`install_worker`: they ignore all three signals
(``timeout`` and the terminal send them to the whole process group), and their parent
stops them between two tasks, so that none dies holding the pool's queue lock or
half-way through a file. :func:`run_child` runs a child process (torchrun) and passes a
termination on to it instead of killing it outright.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
from typing import Iterator

#: signals handled like SIGINT (SIGHUP does not exist on Windows)
SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM or SIGHUP; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


#: set while the clean-up that a signal started runs (the signals then ignored; :func:`second_ctrl_c`)
_STOPPING = [False]


def _raise_terminated(signum: int, frame) -> None:
    """Signal handler: ignore Ctrl-C, SIGTERM and SIGHUP from now on, and raise :class:`Terminated` (SIGTERM,
    SIGHUP) or ``KeyboardInterrupt`` (Ctrl-C)."""
    for sig in (signal.SIGINT, *SIGNALS):     # clean-up runs once: later signals are ignored
        signal.signal(sig, signal.SIG_IGN)
    _STOPPING[0] = True
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)


@contextlib.contextmanager
def second_ctrl_c() -> Iterator[None]:
    """For a bounded wait in the clean-up a signal started (a child's grace period, the runs under way of a
    pool): a second Ctrl-C raises ``KeyboardInterrupt`` in the block, so that the wait can be cut short;
    elsewhere, and for SIGTERM and SIGHUP, nothing changes."""
    if not _STOPPING[0] or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def install() -> dict:
    """Make SIGTERM and SIGHUP raise :class:`Terminated`, and Ctrl-C ``KeyboardInterrupt`` as before, in this
    (main) thread, each of them once: the clean-up the first starts is not cut short by a second (``timeout``
    sends its signal to the process and again to its group; an impatient user presses Ctrl-C twice). Returns
    the handlers they had. A signal that is already ignored (``nohup`` ignores SIGHUP) stays ignored, and
    Ctrl-C keeps a handler other than Python's own."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, *SIGNALS)}
    for sig, old in before.items():
        if old is not signal.SIG_IGN and (sig != signal.SIGINT or old is signal.default_int_handler):
            signal.signal(sig, _raise_terminated)
    return before


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """:func:`install` for the duration of the block, then the handlers as they were."""
    before = install()
    try:
        yield
    finally:
        for sig, old in before.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        _STOPPING[0] = False


def install_worker() -> None:
    """Pool worker start: ignore Ctrl-C, SIGTERM and SIGHUP; the parent stops the pool."""
    for sig in (signal.SIGINT, *SIGNALS):
        signal.signal(sig, signal.SIG_IGN)
    unblock()


def unblock() -> None:
    """In a process forked inside :func:`held` (which inherits its signal mask): let Ctrl-C, SIGTERM and
    SIGHUP through again, once the process has its own handlers for them."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, *SIGNALS})


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold back Ctrl-C, SIGTERM and SIGHUP during the block (main thread); they arrive when it ends.

    For the few steps that must not be cut in two, e.g. creating a temporary file and
    remembering its name (so that the clean-up knows what to remove). Two things hold them:
    the thread's signal mask (which a process forked in the block inherits), and, for a signal
    the kernel hands to another thread (Ray's, a worker pool's), whose Python handler would
    still run in this thread at once, a handler that only notes it until the block ends."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    caught = (signal.SIGINT, *SIGNALS)
    noted: list[int] = []
    handlers = {sig: signal.getsignal(sig) for sig in caught}
    handlers = {sig: h for sig, h in handlers.items() if callable(h)}     # Python handlers only
    before = None
    try:
        for sig in handlers:
            signal.signal(sig, lambda signum, frame: noted.append(signum))
        before = signal.pthread_sigmask(signal.SIG_BLOCK, set(caught))
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if before is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)
        for signum in dict.fromkeys(noted):        # each signal once, in the order it came
            handlers[signum](signum, None)


def ignore() -> None:
    """Ignore SIGTERM and SIGHUP from now on: the process is on its way out with an exit code of
    its own, which a late signal (torchrun stops every rank once one exits) must not change."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def exit_code(err: KeyboardInterrupt) -> int:
    """130 for Ctrl-C, 128 + the signal for :class:`Terminated`."""
    return getattr(err, "exit_code", 130)


def describe(err: KeyboardInterrupt) -> str:
    """'interrupted' (Ctrl-C) or 'terminated by SIGTERM' / 'terminated by SIGHUP'."""
    return f"terminated by {signal.Signals(err.signum).name}" if isinstance(err, Terminated) else "interrupted"


def run_child(cmd: list[str], grace_s: float = 30.0, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, **kwargs)``, but a Ctrl-C or termination of this process is passed on.

    The child runs in a session of its own, so that a signal reaches it only from here, once, whether
    it was sent to this process alone (a scheduler, ``kill``) or to its process group (the terminal's
    Ctrl-C, ``timeout``): torchrun stops its ranks on the first and was cut short by a second. On
    Ctrl-C (SIGINT) or :class:`Terminated` the child gets the same signal, has ``grace_s`` seconds to
    clean up and exit, and is killed only then, or at a second Ctrl-C; the interruption is then raised
    again here.
    """
    kwargs.setdefault("start_new_session", True)
    with subprocess.Popen(cmd, **kwargs) as proc:
        try:
            out, err = proc.communicate()
        except KeyboardInterrupt as stop:
            if proc.poll() is None:
                proc.send_signal(stop.signum if isinstance(stop, Terminated) else signal.SIGINT)
            try:
                with second_ctrl_c():
                    proc.communicate(timeout=grace_s)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                proc.kill()
                proc.wait()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
