"""Predicted against measured, per strategy and phase, and the strategies' ranking.

For one run (ranks N, strategy): on the compared steps (from ``first_step``),

    predicted = mean of the simulator's per-step time,   measured = mean of the run's
    error     = predicted / measured - 1

for the step's MoE time (``total``) and each phase (attention, dispatch, ffn, combine, sync;
copy over the steps that moved weights only). Means, because the simulator's phase times are
expected times: ``calibrate`` fits every phase on means over repeats, and a phase's time is
right-skewed (a rank descheduled now and then), so its median is below the time the model
charges for it while the step, a sum of many phases, is not. Each measured mean has a
standard error (:meth:`RunComparison.stderr_of`) with its degrees of freedom, and a 95% interval
of +/- t standard errors, t the two-sided 95% quantile of Student's t (:func:`t95`: 4.30 for the
spread of 3 runs' means, 1.96 for many steps); a phase is *off* by how far the prediction lies
outside that interval, as a fraction of the measured mean (:meth:`RunComparison.beyond`). The
ranking orders the strategies of one N by mean measured total and by mean predicted total; it
agrees when the orders are the same.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from moe_gps.fidelity.measured import PHASES

#: a phase counts for ``--max-phase-error`` when its measured mean is at least this share of the step's
MIN_PHASE_SHARE = 0.05


@functools.lru_cache(maxsize=None)
def t95(dof: int) -> float:
    """Two-sided 95% quantile of Student's t with ``dof`` degrees of freedom: the q with
    P(|T| <= q) = 0.95 (12.71 for 1, 4.30 for 2, 2.78 for 4, 1.96 as dof grows). By bisection on
    2 x the integral of the density from 0 to q (Simpson's rule on 4000 intervals, exact to 1e-6)."""
    nu = float(dof)
    if not nu >= 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {dof}")
    c = math.exp(math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2)) / math.sqrt(nu * math.pi)

    def inside(q: float) -> float:                      # P(|T| <= q)
        x = np.linspace(0.0, q, 4001)
        f = c * (1 + x * x / nu) ** (-(nu + 1) / 2)
        w = np.ones_like(x)
        w[1:-1:2], w[2:-1:2] = 4.0, 2.0
        return 2 * float(w @ f) * (q / 4000) / 3

    lo, hi = 1.9, 13.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if inside(mid) < 0.95 else (lo, mid)
    return (lo + hi) / 2


@dataclass
class RunComparison:
    """One (ranks, strategy): per-step arrays over the compared steps (seconds) and the summary rows.

    interference: the most cores other processes used during a pooled run (None: unknown)
    run_means:    mean measured total of each pooled run, seconds
    run_of:       int [steps] the pooled run each compared step comes from (None: one run)
    """

    nproc: int
    strategy: str
    steps: np.ndarray
    predicted: dict[str, np.ndarray]
    measured: dict[str, np.ndarray]
    copy_steps: np.ndarray
    interference: float | None = None
    run_means: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    run_of: np.ndarray | None = None

    def _values(self, which: str, phase: str) -> np.ndarray:
        v = (self.predicted if which == "predicted" else self.measured)[phase]
        return v[self.copy_steps] if phase == "copy" else v

    def mean(self, which: str, phase: str) -> float:
        v = self._values(which, phase)
        return float(np.mean(v)) if len(v) else float("nan")

    def error(self, phase: str) -> float:
        p, m = self.mean("predicted", phase), self.mean("measured", phase)
        return p / m - 1.0 if m > 0 and np.isfinite(p) else float("nan")

    @property
    def stderr(self) -> float:
        """Standard error of the measured mean total (seconds): :meth:`stderr_of` ``("total")``."""
        return self.stderr_of("total")

    def stderr_of(self, phase: str) -> float:
        """Standard error of the measured mean of ``phase`` (seconds; copy over its steps): the larger of
        the within-run figure std(steps) / sqrt(steps) and, with several runs, the between-run figure
        std(run means) / sqrt(runs) (the machine's speed drifts between runs)."""
        return self.spread(phase)[0]

    def spread(self, phase: str) -> tuple[float, int]:
        """(:meth:`stderr_of`, its degrees of freedom: steps - 1 or runs - 1, whichever figure it is)."""
        v = self._values("measured", phase)
        if len(v) < 2:
            return float("nan"), 0
        within = float(np.std(v, ddof=1) / np.sqrt(len(v)))
        if phase == "total" and self.run_of is None:
            r = np.asarray(self.run_means)
        elif self.run_of is not None:
            runs = self.run_of[self.copy_steps] if phase == "copy" else self.run_of
            r = np.array([np.mean(v[runs == i]) for i in np.unique(runs)])
        else:
            r = np.zeros(0)
        between = float(np.std(r, ddof=1) / np.sqrt(len(r))) if len(r) > 1 else 0.0
        return (between, len(r) - 1) if between > within else (within, len(v) - 1)

    def ci95(self, phase: str) -> float:
        """Half-width of the 95% interval of the measured mean of ``phase`` (seconds): :func:`t95` of the
        standard error's degrees of freedom, times the standard error (:meth:`stderr_of`)."""
        se, dof = self.spread(phase)
        return t95(dof) * se if dof >= 1 else float("nan")

    def share(self, phase: str) -> float:
        """|measured mean of ``phase``| / measured mean step (copy: both over the steps that moved weights)."""
        if phase == "total":
            return 1.0
        m = abs(self.mean("measured", phase))
        tot = self.measured["total"][self.copy_steps] if phase == "copy" else self.measured["total"]
        t = float(np.mean(tot)) if len(tot) else float("nan")
        return m / t if t > 0 else float("nan")

    def beyond(self, phase: str) -> float:
        """How far the predicted mean lies outside the measurement's 95% interval, as a fraction of the
        measured mean: max(0, |predicted - measured| - ci95) / |measured| (0: inside the interval; nan when
        the phase was not measured, or measured once, which gives no interval)."""
        p, m = self.mean("predicted", phase), self.mean("measured", phase)
        ci = self.ci95(phase)
        if not (np.isfinite(p) and np.isfinite(m) and np.isfinite(ci)) or m == 0:
            return float("nan")
        return max(0.0, abs(p - m) - ci) / abs(m)

    def rows(self) -> list[dict]:
        out = []
        for phase in ("total",) + PHASES:
            n = int(self.copy_steps.sum()) if phase == "copy" else len(self.steps)
            out.append({"nproc": self.nproc, "strategy": self.strategy, "phase": phase, "steps": n,
                        "predicted_ms": self.mean("predicted", phase) * 1e3,
                        "measured_ms": self.mean("measured", phase) * 1e3, "error": self.error(phase),
                        "measured_stderr_ms": self.stderr_of(phase) * 1e3,
                        "measured_ci95_ms": self.ci95(phase) * 1e3, "share_of_step": self.share(phase),
                        "beyond_ci95": self.beyond(phase),
                        "interference_cores": self.interference, "runs": len(self.run_means)})
        return out


def predicted_phases(result, keep: np.ndarray) -> dict[str, np.ndarray]:
    """The simulator's per-step times in the compared phases: name -> [kept steps] seconds.

    result: a sim StrategyResult; keep: bool [steps simulated], the steps to compare.
    """
    ph = {k: v.sum(axis=1) for k, v in result.phases.items()}      # [S] per phase
    out = {"attention": ph["predictor"] + ph["attention"], "dispatch": ph["dispatch"] + ph["correction"],
           "ffn": ph["ffn"], "combine": ph["combine"], "copy": ph["copy"], "sync": ph["sync"],
           "total": result.step_latency}
    return {k: v[keep] for k, v in out.items()}


def compare_run(nproc: int, strategy: str, pairs: list[tuple], first_step: int) -> RunComparison:
    """Line up simulated and measured steps from ``first_step`` on, pooled over ``pairs``.

    pairs: (sim StrategyResult, its simulated trace steps int [S], MeasuredRun) per run; each run
    is predicted with its own simulation (e.g. from the calibration made just before it).
    """
    pred: dict[str, list[np.ndarray]] = {}
    meas: dict[str, list[np.ndarray]] = {p: [] for p in PHASES + ("total",)}
    steps, means, run_of = [], [], []
    for i, (sim_result, sim_steps, run) in enumerate(pairs):
        keep = sim_steps >= first_step
        for p, v in predicted_phases(sim_result, keep).items():
            pred.setdefault(p, []).append(v)
        steps1 = sim_steps[keep]
        pos = {int(s): i for i, s in enumerate(run.steps)}
        missing = [int(s) for s in steps1 if int(s) not in pos]
        if missing:
            raise ValueError(f"steps {missing[:5]} were simulated but not measured")
        idx = np.array([pos[int(s)] for s in steps1], dtype=np.int64)
        for p in PHASES:
            meas[p].append(run.phases[p][idx])
        meas["total"].append(run.total[idx])
        means.append(float(np.mean(run.total[idx])))
        steps.append(steps1)
        run_of.append(np.full(len(steps1), i, dtype=np.int64))
    measured = {p: np.concatenate(v) for p, v in meas.items()}
    predicted = {p: np.concatenate(v) for p, v in pred.items()}
    moved = (measured["copy"] > 0) | (predicted["copy"] > 0)
    return RunComparison(nproc, strategy, np.concatenate(steps), predicted, measured, moved, run_means=means,
                         run_of=np.concatenate(run_of))


def phase_failures(comparisons: list[RunComparison], max_error: float,
                   min_share: float = MIN_PHASE_SHARE) -> list[tuple[int, str, str, float, float]]:
    """The (ranks, strategy, phase, beyond, share) of every phase that takes at least ``min_share`` of the
    measured step and whose predicted mean lies more than ``max_error`` (a fraction of the measured
    mean) outside the measurement's 95% interval (:meth:`RunComparison.beyond`), worst first. The step
    total is not a phase; ``sync`` is."""
    out = []
    for c in comparisons:
        for p in PHASES:
            share, off = c.share(p), c.beyond(p)
            if np.isfinite(share) and share >= min_share and np.isfinite(off) and off > max_error:
                out.append((c.nproc, c.strategy, p, off, share))
    return sorted(out, key=lambda x: -x[3])


def ranking(comparisons: list[RunComparison]) -> dict[int, dict]:
    """Per N: strategies ordered by mean measured and by mean predicted total; ``agrees`` when
    the orders are the same. A pair is *resolved* when its measured means differ by more than the
    95% interval of the difference: :func:`t95` (the smaller degrees of freedom of the two) times its
    standard error, sqrt(se_a^2 + se_b^2); ``resolved_agrees``: the predicted order agrees on
    every resolved pair (``misordered`` lists those it does not, ``unresolved`` the others)."""
    out = {}
    for n in sorted({c.nproc for c in comparisons}):
        cs = [c for c in comparisons if c.nproc == n]
        by_meas = [c.strategy for c in sorted(cs, key=lambda c: c.mean("measured", "total"))]
        by_pred = [c.strategy for c in sorted(cs, key=lambda c: c.mean("predicted", "total"))]
        wrong, unresolved = [], []
        for i, a in enumerate(cs):
            for b in cs[i + 1:]:
                dm = a.mean("measured", "total") - b.mean("measured", "total")
                dp = a.mean("predicted", "total") - b.mean("predicted", "total")
                (se_a, dof_a), (se_b, dof_b) = a.spread("total"), b.spread("total")
                dof = min(dof_a, dof_b)
                if not (dof >= 1 and abs(dm) > t95(dof) * np.hypot(se_a, se_b)):
                    unresolved.append((a.strategy, b.strategy))
                elif dm * dp <= 0:
                    wrong.append((a.strategy, b.strategy))
        out[n] = {"measured": by_meas, "predicted": by_pred, "agrees": by_meas == by_pred,
                  "resolved_agrees": not wrong, "misordered": wrong, "unresolved": unresolved}
    return out
