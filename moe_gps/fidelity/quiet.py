"""How much of the machine other processes took while a measurement ran (Linux).

Timings on a shared machine are only as good as the machine was quiet. For a child process
(torchrun and its ranks) :func:`run_watched` measures

    interference = (CPU time the whole machine was busy - CPU time of the child and its
                    descendants) / wall time                                   [cores]

from ``/proc/stat`` (user + nice + system + irq + softirq + steal) and
``getrusage(RUSAGE_CHILDREN)``: the average number of cores that something else used (other
users' jobs, or the hypervisor's steal time) during the measurement. ``None`` where
``/proc/stat`` does not exist.
"""

from __future__ import annotations

import os
import resource
import subprocess
import time
from dataclasses import dataclass

from moe_gps.signals import run_child


def _busy_seconds() -> float | None:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            parts = f.readline().split()
    except OSError:
        return None
    if not parts or parts[0] != "cpu":
        return None
    v = [int(x) for x in parts[1:]]
    # user nice system idle iowait irq softirq steal (guest is inside user)
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass
class Watched:
    """A finished child: its result, wall seconds, its CPU seconds and the interference (cores or None)."""

    proc: subprocess.CompletedProcess
    wall_s: float
    own_cpu_s: float
    interference: float | None


def run_watched(cmd: list[str], **kwargs) -> Watched:
    """``subprocess.run(cmd, **kwargs)`` with the interference measured around it."""
    b0, c0, t0 = _busy_seconds(), _children_cpu(), time.perf_counter()
    proc = run_child(cmd, **kwargs)
    b1, c1, t1 = _busy_seconds(), _children_cpu(), time.perf_counter()
    wall, own = t1 - t0, c1 - c0
    other = None if b0 is None or b1 is None or wall <= 0 else max(0.0, (b1 - b0 - own) / wall)
    return Watched(proc, wall, own, other)
