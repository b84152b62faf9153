"""The event model's schedule of chosen steps as a Chrome / Perfetto trace (Trace Event Format).

One process per strategy; in it one track per GPU (its compute phases and its part of each
collective) and one per GPU's incoming copies (weight copies, background copies, copies
between its slots). Every slice is a complete event (``"ph": "X"``) with its start and
duration in microseconds of simulated time and, in ``args``, the trace step and MoE layer.
Open the file in https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from moe_gps.atomic import write_text_atomic

#: track id of GPU g's copies = COPY_TRACK + g
COPY_TRACK = 1000


def parse_steps(text: str) -> range:
    """``A`` or ``A:B`` -> range(A, B) of trace steps (A alone: range(A, A + 1)); :func:`sim.run.simulate`
    checks that they are simulated steps (of the trace as simulated, after any regrouping)."""
    from moe_gps.errors import UserError

    head, sep, tail = text.partition(":")
    try:
        a = int(head)
        b = int(tail) if sep else a + 1
    except ValueError:
        raise UserError(f"--timeline: expected STEP or FIRST:END (trace steps), got {text!r}") from None
    if not 0 <= a < b:
        raise UserError(f"--timeline {text}: expected 0 <= STEP < END")
    return range(a, b)


def chrome_trace(slices: dict[str, list[tuple]], num_gpus: int) -> dict:
    """The Trace Event Format document of ``slices``: strategy -> [(track, gpu, name, start_s, end_s,
    layer, step)] (track "gpu" or "link")."""
    events: list[dict] = []
    for pid, (strategy, rows) in enumerate(slices.items(), start=1):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": strategy}})
        for g in range(num_gpus):
            for tid, name, order in ((g, f"GPU {g}", 2 * g), (COPY_TRACK + g, f"GPU {g} copies in", 2 * g + 1)):
                # each GPU's row, then its copies' row, as timeline.png draws them
                events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
                events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                               "args": {"sort_index": order}})
        for track, g, name, start, end, layer, step in rows:
            events.append({"ph": "X", "name": name, "cat": "copy" if track == "link" else "phase", "pid": pid,
                           "tid": g if track == "gpu" else COPY_TRACK + g, "ts": start * 1e6,
                           "dur": (end - start) * 1e6, "args": {"step": step, "layer": layer}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"producer": "moe-gps simulate --timeline", "time": "simulated"}}


def write_timeline(path: str | os.PathLike, slices: dict[str, list[tuple]], num_gpus: int) -> Path:
    """Write the trace JSON atomically; returns the path."""
    write_text_atomic(path, json.dumps(chrome_trace(slices, num_gpus)) + "\n")
    return Path(path)
