"""Statistics for calibration samples (numpy only).

Samples are ``(size, rank, seconds)`` rows, in repeat order for each (size, rank), as
:mod:`runtime.fidelity_bench` records them. Three summaries per size:

* :func:`typical`: the mean over every rank and repeat (single-rank benchmarks);
* :func:`critical`: per repeat the maximum over ranks, then the mean over repeats (a phase
  every rank runs at once with the same work: the slowest rank sets when the next
  collective can start, as in the simulator, where the phase takes the maximum over GPUs);
* :func:`collective`: per repeat the minimum over ranks, then the mean over repeats (a
  collective measured after a barrier: the rank that entered last waited for no one, so its
  time is the collective's own duration).

Means, not medians: the simulator adds phase times, and a step's time is the sum of many of
them, so its median is close to the sum of their *means*. Phase times are right-skewed (a
collective now and then waits for a descheduled rank), and the sum of their medians would
miss that tail (measured: 4 layers' dispatch, median of the per-step sum 11.5 ms, 4 x the
mean per layer 11.9 ms, 4 x the median per layer 9.6 ms).

Fits are least squares on those means with relative weights (every size counts the same
in percent), see :func:`fit_line`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _by_size(rows) -> dict[float, dict[int, list[float]]]:
    out: dict[float, dict[int, list[float]]] = {}
    for size, rank, t in rows:
        out.setdefault(float(size), {}).setdefault(int(rank), []).append(float(t))
    return out


def typical(rows) -> tuple[np.ndarray, np.ndarray]:
    """(sizes [n], mean seconds [n]) over all ranks and repeats, sizes ascending."""
    by = _by_size(rows)
    sizes = np.array(sorted(by))
    mean = np.array([np.mean(np.concatenate([np.asarray(v) for v in by[s].values()])) for s in sizes])
    return sizes, mean


def _repeats(rows, reduce) -> tuple[np.ndarray, list[np.ndarray]]:
    """(sizes [n] ascending, per size the ``reduce`` over ranks of each repeat [repeats])."""
    by = _by_size(rows)
    sizes = np.array(sorted(by))
    out = []
    for s in sizes:
        per_rank = list(by[s].values())
        reps = min(len(v) for v in per_rank)
        out.append(reduce(np.stack([np.asarray(v[:reps]) for v in per_rank]), axis=0))
    return sizes, out


def _per_repeat(rows, reduce) -> tuple[np.ndarray, np.ndarray]:
    sizes, per = _repeats(rows, reduce)
    return sizes, np.array([np.mean(v) for v in per])


def collective(rows) -> tuple[np.ndarray, np.ndarray]:
    """(sizes [n], mean over repeats of the minimum over ranks), sizes ascending."""
    return _per_repeat(rows, np.min)


def collective_repeats(rows) -> tuple[np.ndarray, np.ndarray]:
    """(size of each repeat [n], its minimum over ranks [n]): :func:`collective` before the mean."""
    sizes, per = _repeats(rows, np.min)
    return np.repeat(sizes, [len(v) for v in per]), np.concatenate(per)


def collective_apart(rows, arrivals, apart: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The :func:`collective` mean over only the repeats where one rank reached the collective clearly
    last: (sizes [n], that mean [n] (NaN where no repeat was), the share of repeats it is over [n]).
    ``arrivals`` are the ranks' times before the collective (rows like ``rows``, repeat for repeat; e.g.
    each rank's FFN before the combine); a repeat counts where the largest of them exceeds the
    second-largest by at least ``apart`` seconds."""
    by, before = _by_size(rows), _by_size(arrivals)
    sizes = np.array(sorted(by))
    mean, share = [], []
    for s in sizes:
        ranks = sorted(by[s])
        reps = min(min(len(by[s][r]) for r in ranks), min(len(before.get(s, {}).get(r, [])) for r in ranks))
        t = np.stack([np.asarray(by[s][r][:reps]) for r in ranks]).min(axis=0)
        a = np.sort(np.stack([np.asarray(before[s][r][:reps]) for r in ranks]), axis=0)
        keep = (a[-1] - a[-2] >= apart) if len(ranks) > 1 else np.ones(reps, dtype=bool)
        mean.append(float(t[keep].mean()) if keep.any() else np.nan)
        share.append(float(keep.mean()) if reps else 0.0)
    return sizes, np.array(mean), np.array(share)


def critical(rows) -> tuple[np.ndarray, np.ndarray]:
    """(sizes [n], mean over repeats of the maximum over ranks), sizes ascending."""
    return _per_repeat(rows, np.max)


@dataclass
class Line:
    """t = intercept + slope * x, fitted on means; ``rel_rms`` is the RMS relative residual."""

    intercept: float
    slope: float
    rel_rms: float


def fit_line(x, t, nonnegative: bool = True) -> Line:
    """Least squares of ``t ~ a + b x`` weighted by 1 / t (relative errors).

    With ``nonnegative`` a negative intercept is set to 0 and the slope refitted through the
    origin (a fixed cost cannot be negative). A slope that comes out <= 0 (noise swamping the
    size effect) is replaced by the largest size's time over its size, an upper bound.
    """
    x = np.asarray(x, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    w = 1.0 / np.maximum(t, 1e-12)
    A = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
    (a, b), *_ = np.linalg.lstsq(A, t * w, rcond=None)
    if nonnegative and a < 0:
        a = 0.0
        b = float(np.sum(w * w * x * t) / np.sum(w * w * x * x))
    if b <= 0:
        i = int(np.argmax(x))
        a, b = 0.0, float(t[i] / x[i])
    pred = a + b * x
    rel = float(np.sqrt(np.mean(((pred - t) / t) ** 2)))
    return Line(float(a), float(b), rel)


def median_residual(measured, modelled) -> tuple[float, float]:
    """(median of measured - modelled, clipped at 0; its spread as the half interquartile range)."""
    r = np.asarray(measured, dtype=np.float64) - np.asarray(modelled, dtype=np.float64)
    q1, q2, q3 = np.percentile(r, [25, 50, 75])
    return max(0.0, float(q2)), float((q3 - q1) / 2)
