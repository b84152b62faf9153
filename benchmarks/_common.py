"""Helpers shared by the benchmark scripts: argument checks, timing and saving results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from moe_gps.atomic import write_text_atomic
from moe_gps.cli.common_args import positive_int

__all__ = ["positive_int", "environment", "git_commit", "load_average", "save", "time_it"]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def load_average() -> float | None:
    """The 1-minute load average now (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def git_commit(root: Path = ROOT) -> str | None:
    """The commit checked out in ``root`` (``git rev-parse HEAD``); None where git or the repository is missing."""
    try:
        done = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "HEAD"], cwd=root, capture_output=True,
                              text=True)
    except OSError:
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def environment(load_average_at_start: float | None = None) -> dict:
    """Provenance of a run: command line, machine, versions, load and the tree's commit."""
    import numpy

    env = {"argv": list(sys.argv), "python": platform.python_version(), "numpy": numpy.__version__,
           "processor": platform.processor() or platform.machine(), "system": platform.platform(),
           "cpus": os.cpu_count(),
           "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
           "git_commit": git_commit()}
    if load_average_at_start is not None:
        env["load_average_1m_at_start"] = load_average_at_start
    else:
        env["load_average_1m_at_save"] = load_average()
    return env


def time_it(fn: Callable[[], object], repeat: int = 5) -> dict[str, float]:
    """Run ``fn`` ``repeat`` (>= 1) times; seconds as min / median / max."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"min_s": min(times), "median_s": statistics.median(times), "max_s": max(times), "repeat": repeat}


def save(name: str, figures: dict, load_average_at_start: float | None = None) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the run's provenance (see :func:`environment`):
    the 1-minute load average at the start when the script passes it, else the one at save time."""
    figures = {"machine": environment(load_average_at_start), **figures}
    path = RESULTS / f"{name}.json"
    write_text_atomic(path, json.dumps(figures, indent=2) + "\n")
    return path
