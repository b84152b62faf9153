"""What a runtime run measured, per step, in the simulator's phases (docs/fidelity.md).

From ``timings.csv`` (one row per step, rank and layer) and ``steps.csv`` (per step and
rank). Within a layer every rank runs attention and its router, then the collectives of
the MoE layer; a collective ends for everybody shortly after the last rank enters it, so a
rank that arrives early spends the difference waiting inside it. The critical path of a
layer is therefore (seconds, r over ranks):

    attention = max_r (attention_s + route_s)       the slowest rank's own work
    dispatch  = min_r (counts_s + dispatch_s)       the last rank to arrive did not wait
    ffn       = max_r expert_s                      the busiest rank's experts
    combine   = min_r combine_s                     the last rank to arrive did not wait

and the step's phases are their sums over layers. Weight moves happen before the
forward pass, all layers at once: ``copy = max_r move_s``. The step's MoE time is measured
directly, not as the sum of the phases above:

    total = min_r sum over layers of (attention_s + route_s + counts_s + dispatch_s + expert_s + combine_s)
            + copy

(the rank that started the forward last waited for no one at the start: its own layers
are the step's critical path; the others' sums include waiting for it, e.g. while rank 0
records the previous step). What the total has beyond the phases is

    sync = total - (attention + dispatch + ffn + combine + copy)

the time lost because ranks leave each collective at different times: the phases take each
collective from its last-arriving rank and each compute phase from its slowest rank, as if
all ranks started every phase together; a rank that leaves a collective late starts its
next phase late, and the next collective waits for it (the simulator's collective skew).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_gps.errors import UserError

#: phases compared, in layer order (the simulator's names)
PHASES = ("attention", "dispatch", "ffn", "combine", "copy", "sync")


@dataclass
class MeasuredRun:
    """Per step of a run: ``steps`` int [S]; ``phases[name]`` and ``total`` float seconds [S];
    ``ffn_cpu_share``: the busiest rank's CPU time over its wall time in the expert compute, summed over
    the run's layers and steps (None for runs recorded without ``expert_cpu_s``)."""

    steps: np.ndarray
    phases: dict[str, np.ndarray]
    total: np.ndarray
    replanned: np.ndarray
    ffn_cpu_share: float | None = None


def read_run(run_dir: str | Path):
    """(timings DataFrame, steps DataFrame) of a run folder; UserError if they are missing."""
    import pandas as pd

    run_dir = Path(run_dir)
    out = []
    for name in ("timings.csv", "steps.csv"):
        p = run_dir / name
        if not p.exists():
            raise UserError(f"{run_dir}: no {name}; is it a runtime run folder (runtime.launch --out)?")
        out.append(pd.read_csv(p))
    return tuple(out)


def measured_phases(timings, steps) -> MeasuredRun:
    """The critical-path phases and the total of every step (module docstring)."""
    t = timings.copy()
    t["home"] = t.attention_s.fillna(0.0) + t.route_s
    t["disp"] = t.counts_s + t.dispatch_s
    t["all"] = t.home + t.disp + t.expert_s + t.combine_s
    per_layer = t.groupby(["step", "layer"]).agg(attention=("home", "max"), dispatch=("disp", "min"),
                                                 ffn=("expert_s", "max"), combine=("combine_s", "min"))
    per_step = per_layer.groupby("step").sum()
    own = t.groupby(["step", "rank"])["all"].sum().groupby("step").min()
    move = steps.groupby("step").move_s.max()
    replanned = steps[steps["rank"] == 0].set_index("step").get("replanned")
    idx = per_step.index.to_numpy()
    phases = {p: per_step[p].to_numpy(dtype=np.float64) for p in PHASES[:4]}
    phases["copy"] = move.reindex(idx).fillna(0.0).to_numpy(dtype=np.float64)
    total = own.reindex(idx).to_numpy(dtype=np.float64) + phases["copy"]
    phases["sync"] = total - sum(phases[p] for p in PHASES[:5])
    rp = (replanned.reindex(idx).fillna(0).to_numpy() > 0) if replanned is not None else np.zeros(len(idx), bool)
    share = None
    if "expert_cpu_s" in t:
        busiest = t.loc[t.groupby(["step", "layer"])["expert_s"].idxmax()]
        wall = float(busiest.expert_s.sum())
        share = float(busiest.expert_cpu_s.sum()) / wall if wall > 0 else None
    return MeasuredRun(idx.astype(np.int64), phases, total, rp, share)
