"""Helpers shared by the benchmark scripts: timing and saving results."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

from moe_gps.atomic import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def time_it(fn: Callable[[], object], repeat: int = 5) -> dict[str, float]:
    """Run ``fn`` ``repeat`` times; seconds as min / median / max."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"min_s": min(times), "median_s": statistics.median(times), "max_s": max(times), "repeat": repeat}


def save(name: str, figures: dict) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the machine it ran on."""
    figures = {"machine": {"python": platform.python_version(), "processor": platform.processor(),
                           "system": platform.platform()}, **figures}
    path = RESULTS / f"{name}.json"
    write_text_atomic(path, json.dumps(figures, indent=2) + "\n")
    return path
