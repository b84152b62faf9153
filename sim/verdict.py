"""The verdict: which deployable strategy is fastest, by how much over no duplication, how sure.

Speed-up of strategy X over ``none`` = mean step latency of none / mean step latency of X,
over the simulated steps. Its 95% interval is a paired bootstrap over steps: resample the
steps (the same ones for both strategies) :data:`RESAMPLES` times with the simulation's seed,
take the ratio of the means each time, and keep the 2.5th and 97.5th percentiles.

* The *winner* is the deployable strategy (every one but the oracle and the predictors that
  read the true routing: ``oracle``, ``synthetic``, ``curve``) with the lowest mean step latency;
  ``none`` can win, and wins ties (to rounding).
* A *tie* is another deployable strategy whose speed-up lies inside the winner's interval
  (when ``none`` wins: one whose own interval contains 1.0).
* Fewer than :data:`THIN_STEPS` simulated steps is *thin evidence*, and the verdict says so;
  steps that are exact copies of another (the same tokens and routing) do not count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:                       # pragma: no cover
    from sim.run import SimResult

RESAMPLES = 2000
THIN_STEPS = 8
#: resampled indices held at a time by :func:`speedup_interval` (resamples x samples)
BOOTSTRAP_CELLS = 1 << 20


def speedup_interval(base: np.ndarray, other: np.ndarray, seed: int = 0, level: float = 0.95,
                     resamples: int = RESAMPLES, block: int = 1) -> tuple[float, float, float]:
    """(speed-up, low, high): mean(base) / mean(other) and its paired-bootstrap interval.

    base, other: float [S] step latencies of the same steps. ``block`` > 1: a moving-block bootstrap,
    which resamples runs of ``block`` consecutive samples (for samples that are correlated in time,
    such as the requests of one queue)."""
    base, other = np.asarray(base, dtype=np.float64), np.asarray(other, dtype=np.float64)
    point = float(base.mean() / other.mean())
    n = len(base)
    if n < 2:
        return point, point, point
    rng = np.random.default_rng(seed)
    block = max(1, min(int(block), n))
    ratio = np.empty(resamples)
    rows = max(1, BOOTSTRAP_CELLS // n)             # resamples drawn at a time: memory bounded on long runs
    for r0 in range(0, resamples, rows):
        m = min(rows, resamples - r0)
        if block == 1:
            idx = rng.integers(0, n, size=(m, n))
        else:
            starts = rng.integers(0, n - block + 1, size=(m, -(-n // block)))
            idx = (starts[:, :, None] + np.arange(block)[None, None, :]).reshape(m, -1)[:, :n]
        num, den = base[idx].mean(axis=1), other[idx].mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            # a resample where both means are 0 (neither meets an SLO on any request drawn) is a tie
            ratio[r0:r0 + m] = np.where((num == 0) & (den == 0), 1.0, num / den)
    a = (1 - level) / 2
    # where some resamples' ratio is infinite (no SLO met under the base in them), interpolating between
    # infinities gives NaN: take observed values then (the interval is open above)
    lo, hi = np.nanquantile(ratio, [a, 1 - a], method="linear" if np.isfinite(ratio).all() else "inverted_cdf")
    return point, float(min(lo, point)), float(max(hi, point))


@dataclass
class Verdict:
    """The fastest deployable strategy and how sure the simulation is of it (module docstring).

    speedup, ci_low, ci_high: over ``none``;  ties: strategies not separated from the winner;
    steps: simulated steps;  thin: fewer than THIN_STEPS of them;  runner_up: the best other
    deployable strategy, its (speedup, low, high) and whether its samples equal ``none``'s on every
    step (``same_every_step``), when ``none`` wins.
    """

    strategy: str
    speedup: float
    ci_low: float
    ci_high: float
    ties: list[str]
    steps: int
    thin: bool
    runner_up: dict[str, Any] | None = field(default=None)
    #: simulated steps that are not exact copies of another (the same routing): copies add no evidence
    #: (None: not counted, as for serving's requests)
    distinct_steps: int | None = None

    @property
    def beats_none(self) -> bool:
        """The winner is faster than no duplication beyond the interval."""
        return self.strategy != "none" and self.ci_low > 1.0

    def line(self) -> str:
        """The one-line verdict printed after the tables."""
        n = f"{self.steps} simulated step{'s' if self.steps != 1 else ''}"
        ci = lambda lo, hi: interval_text(lo, hi, self.steps, "simulated step")  # noqa: E731
        ties = f"; ties within the interval: {', '.join(self.ties)}" if self.ties else ""
        if self.strategy == "none":
            text = "verdict: none (no duplication) is the fastest deployable strategy"
            if self.runner_up is not None and self.runner_up.get("same_every_step"):
                text += (f"; no duplicating strategy is faster: the best, {self.runner_up['strategy']}, takes the "
                         f"same time on every one of the {n} (its plans route as no duplication does)")
            elif self.runner_up is not None:
                r = self.runner_up
                text += (f"; the best duplicating one, {r['strategy']}, runs at {r['speedup']:.3f}x "
                         f"({ci(r['ci_low'], r['ci_high'])})")
            text += ties
        else:
            text = (f"verdict: {self.strategy} is the fastest deployable strategy, {self.speedup:.3f}x over none "
                    f"({ci(self.ci_low, self.ci_high)})")
            if not self.beats_none:
                text += ", not faster than no duplication beyond the interval"
            text += ties
        if self.thin and self.distinct_steps is not None and self.distinct_steps < self.steps:
            text += (f" [thin evidence: {self.distinct_steps} distinct of the {n} (the others are exact copies), "
                     f"fewer than {THIN_STEPS}]")
        elif self.thin:
            text += f" [thin evidence: fewer than {THIN_STEPS} simulated steps]"
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def interval_text(lo: float, hi: float, n: int, unit: str) -> str:
    """``95% CI lo-hi over n units``, or ``no interval from 1 unit`` (one sample gives none)."""
    what = f"{n} {unit}{'s' if n != 1 else ''}"
    return f"95% CI {lo:.3f}-{hi:.3f} over {what}" if n > 1 else f"no interval from {what}"


def verdict_of(result: "SimResult") -> Verdict | None:
    """The verdict of a simulation, or None when it has no ``none`` strategy to compare with."""
    rows = [r for r in result.strategies if r.config.deployable]
    base = next((r for r in rows if r.config.kind == "none"), None)
    if base is None or not rows:
        return None
    v = compare({r.name: r.step_latency for r in rows}, base.name, result.config.seed)
    # steps with the same routing (tokens, each layer's expert skew, none's latency) are copies of one step
    # (to 1e-12: the event model's clock adds rounding of the order of 1e-17 s to equal steps' latencies)
    routing = np.column_stack([result.tokens, result.expert_skew, base.step_latency])
    v.distinct_steps = len(np.unique(np.round(routing, 12), axis=0))
    v.thin = v.distinct_steps < THIN_STEPS
    return v


def oracle_gain_text(none_us: dict[str, float], oracle_us: dict[str, float], cluster, model) -> str:
    """Where the oracle's time per MoE layer goes against none's: the layout exchange its direct routing
    skips (:func:`sim.cost.layout_time` on ``cluster`` for ``model``: it knows every token's replica, so
    no exchange of counts precedes its dispatch), and the rest, which is its placement (its FFN, and the
    dispatch and combine traffic its placement changes). none_us, oracle_us: mean µs per MoE layer of
    ``total`` and ``ffn``."""
    from sim.cost import Hardware, layout_time

    layout_us = float(layout_time(Hardware.from_config(cluster, model)).max() * 1e6)
    saved = none_us["total"] - oracle_us["total"]
    rest = round(saved - layout_us, 1) + 0.0        # + 0.0: a rest that rounds to -0.0 is printed 0.0
    return (f"it saves {saved:.1f} µs a MoE layer: {layout_us:.1f} µs is the layout exchange it skips by "
            f"sending every token straight to its replica (direct routing), the other {rest:.1f} µs "
            f"its placement, copies included (expert FFN {oracle_us['ffn']:.1f} against none's {none_us['ffn']:.1f} µs)")


def bound_lines(result: "SimResult") -> list[str]:
    """One line per oracle strategy beside ``none``: its speed-up over none with the interval of
    :func:`speedup_interval`, and where its gain comes from (:func:`oracle_gain_text`)."""
    base = next((r for r in result.strategies if r.config.kind == "none"), None)
    if base is None:
        return []
    us = lambda r: {"total": float(r.layer_time.mean() * 1e6), "ffn": float(r.phases["ffn"].mean() * 1e6)}  # noqa: E731
    out = []
    for r in result.strategies:
        if r.config.kind != "oracle":
            continue
        point, lo, hi = speedup_interval(base.step_latency, r.step_latency, result.config.seed)
        S = len(base.step_latency)
        out.append(f"bound: {r.name} ({r.redundant_slots} redundant slots, true loads known in advance, no "
                   f"predictor cost) runs at {point:.3f}x over none ({interval_text(lo, hi, S, 'simulated step')}); "
                   + oracle_gain_text(us(base), us(r), result.config.cluster, result.config.model))
    return out


def compare(samples: dict[str, np.ndarray], base: str, seed: int, higher_is_better: bool = False,
            block: int = 1) -> Verdict:
    """The verdict over deployable strategies' paired ``samples`` (name -> float [S], the same S
    steps or requests for all, ``base`` among them). The winner has the best mean (lowest, or highest
    when ``higher_is_better``; ``base`` on a tie, else the first listed); its *speed-up* over ``base``
    is mean(base) / mean(it) (or the inverse), with the interval of :func:`speedup_interval`
    (``block``: its block length)."""
    def stats(x):
        return speedup_interval(x, samples[base], seed, block=block) if higher_is_better else \
            speedup_interval(samples[base], x, seed, block=block)

    sign = -1.0 if higher_is_better else 1.0
    st = {name: stats(x) for name, x in samples.items()}
    # on equal means (to rounding) ``base`` wins: a change must be better to be named
    mean = {n: sign * float(np.mean(x)) for n, x in samples.items()}
    best = min(mean.values())
    tied = [n for n in samples if mean[n] <= best + abs(best) * 1e-9]
    winner = base if base in tied else tied[0]          # else the first listed
    S = len(samples[base])
    point, lo, hi = st[winner]
    others = [n for n in samples if n != winner]
    if winner == base:
        ties = [n for n in others if st[n][1] <= 1.0 + 1e-9 and st[n][2] >= 1.0 - 1e-9]
        second = max(others, key=lambda n: st[n][0], default=None)      # the first listed of the best
        runner = None if second is None else dict(zip(("strategy", "speedup", "ci_low", "ci_high"),
                                                       (second, *st[second])),
                                                   same_every_step=bool(np.array_equal(samples[second],
                                                                                       samples[base])))
        return Verdict(base, 1.0, 1.0, 1.0, ties, S, S < THIN_STEPS, runner)
    ties = [n for n in others if lo <= st[n][0] <= hi]
    return Verdict(winner, point, lo, hi, ties, S, S < THIN_STEPS)
