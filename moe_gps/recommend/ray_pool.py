"""Ray as the sweep's worker pool (``moe-gps recommend --backend ray``).

:class:`RayPool` has the part of ``multiprocessing.Pool``'s interface that
:class:`~moe_gps.recommend.runner.Runner` uses (``imap_unordered``, ``close``,
``terminate``, ``join``), so the runner's cache, resume and record order are the same on
both backends. What goes to the cluster:

* the trace, once, through the object store (``ray.put``); each task carries only its
  reference, and a worker process fetches and unpickles it on its first task only;
* the code of ``moe_gps`` and ``sim`` as they are on this machine (Ray's ``py_modules``),
  so that workers compute what the cache keys (which include a digest of that code) say; not
  to a local cluster started here, whose workers import the same files (same interpreter,
  folder and environment) without the packaging;
* per task, a chunk of runs: each a simulate config and the run's coordinates (a few KB).

Records come back to this process, which writes the cache files; workers never write to
the file system. Ray is an optional dependency: ``pip install 'moe-gps[distributed]'``.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable, Iterable, Iterator

from moe_gps import signals
from moe_gps.errors import UserError

INSTALL = "pip install 'moe-gps[distributed]'"

_STATE: dict[str, Any] = {}   # worker side: the object reference its state was made from


def import_ray():
    """The ``ray`` module, or a UserError naming the install command."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--backend ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


#: seconds to wait for the head of a Ray cluster (--address) to accept a TCP connection
CONNECT_TIMEOUT_S = 3.0


def check_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A UserError naming --address unless ``HOST:PORT`` (or ``ray://HOST:PORT``) accepts a TCP connection
    within ``timeout`` seconds: ray.init would otherwise retry an unreachable head for minutes. Addresses
    without a port (``auto``, ``local``) are left to Ray."""
    import socket

    hostport = address.split("://", 1)[1] if "://" in address else address
    if ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")                      # [::1]:6379
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--address {address}: not HOST:PORT of a Ray cluster's head (e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        why = (f"no answer within {timeout:g} s" if isinstance(err, socket.timeout) else
               (err.strerror or str(err) or type(err).__name__).lower())
        raise UserError(f"--address {address}: cannot reach a Ray cluster there ({why}); give the address that "
                        f"`ray start --head` printed on the head node") from None


def _task(box: list, init: Callable, init_args: tuple, fn: Callable, items: list) -> list:
    """Worker side: ``init(trace, *init_args)`` once per worker and trace, then ``fn`` over ``items``.

    ``box`` holds the trace's ObjectRef inside a list, so that Ray passes the reference
    rather than fetching the trace for every task.
    """
    ref = box[0]
    if _STATE.get("ref") != ref.hex():
        import ray

        init(ray.get(ref), *init_args)
        _STATE["ref"] = ref.hex()
    return [fn(item) for item in items]


class RayPool:
    """Runs ``fn(item)`` as Ray tasks on workers initialised with ``init(trace, *init_args)``.

    ``address``: an existing cluster (``ray start --head`` prints it; ``auto`` finds one
    started on this machine); None starts a local cluster of ``num_cpus`` CPUs, shut down by
    :meth:`close` / :meth:`terminate`. A Ray already initialised in this process is used as it is.
    """

    def __init__(self, trace, init: Callable, init_args: tuple, address: str | None, num_cpus: int):
        ray = self._ray = import_ray()
        self._started = False
        if not ray.is_initialized():
            import moe_gps
            import sim

            options: dict[str, Any] = dict(logging_level=logging.ERROR, log_to_driver=False)
            if address:
                check_address(address)
                options.update(address=address, runtime_env={"py_modules": [moe_gps, sim]})
            else:  # "local": a new cluster even where `ray start` left one running on this machine
                options.update(address="local", num_cpus=num_cpus, include_dashboard=False)
            handlers = {sig: signal.getsignal(sig) for sig in signals.SIGNALS}
            try:
                ray.init(**options)
            except Exception as err:  # noqa: BLE001 - Ray raises several types for an unreachable cluster
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
                raise UserError(f"cannot start or reach {where}: {first}") from None
            self._started = True
            # ray.init installs its own SIGTERM handler (which kills the process outright); keep the
            # caller's, so that SIGTERM and SIGHUP stop the sweep as Ctrl-C does
            if threading.current_thread() is threading.main_thread():
                for sig, old in handlers.items():
                    if old is not None:
                        signal.signal(sig, old)
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", num_cpus)))
        self._box = [ray.put(trace)]
        self._init, self._init_args = init, init_args
        self._remote = ray.remote(_task)
        self._pending: list = []

    def imap_unordered(self, fn: Callable, items: Iterable, chunksize: int = 1) -> Iterator:
        """``fn(item)`` for every item, in the order they finish; ``chunksize`` items per task.

        At most two tasks per CPU are submitted at a time, so that stopping leaves only those to
        end (no ``ray.cancel``, which can race a task's completion and abort Ray's core worker)."""
        ray, items = self._ray, list(items)
        step = max(1, chunksize)
        chunks = iter([items[i:i + step] for i in range(0, len(items), step)])
        window = 2 * self.cpus
        self._pending = []
        while True:
            for c in chunks:
                self._pending.append(self._remote.remote(self._box, self._init, self._init_args, fn, c))
                if len(self._pending) >= window:
                    break
            if not self._pending:
                return
            done, self._pending = ray.wait(self._pending, num_returns=1)
            yield from ray.get(done[0])

    def terminate(self) -> None:
        """Stop: submit nothing more and disconnect; Ray ends the tasks of a driver that has gone, and
        a cluster started here is shut down."""
        self._pending = []
        self.close()

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False

    def join(self) -> None:
        """Nothing to wait for: :meth:`close` returns once the cluster is down."""
