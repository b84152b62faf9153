"""The verdict: which deployable strategy is fastest, by how much over no duplication, how sure.

Speed-up of strategy X over ``none`` = mean step latency of none / mean step latency of X,
over the simulated steps. Its 95% interval is a paired circular block bootstrap over steps:
resample runs of ⌈√S⌉ consecutive steps, at most S / 2 (the same ones for both strategies; consecutive steps
are alike, as a trace drifts slowly and a placement serves several steps, so single steps
would give too narrow an interval) :data:`RESAMPLES` times with the simulation's seed, take
the ratio of the means each time, and keep the 2.5th and 97.5th percentiles.

* The *winner* is the deployable strategy (every one but the oracle and the predictors that
  read the true routing: ``oracle``, ``synthetic``, ``curve``) with the lowest mean step latency;
  ``none`` can win, and wins ties (to rounding).
* A *tie* is another deployable strategy that the simulation cannot tell apart from the winner:
  the interval of its own speed-up over the winner (paired, as above) contains 1.0.
* Fewer than :data:`THIN_STEPS` simulated steps is *thin evidence*, and the verdict says so;
  steps that are exact copies of another (the same number of tokens and the same expert loads in
  every layer) do not count, and steps that are all copies of one give no interval.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:                       # pragma: no cover
    from sim.run import SimResult

RESAMPLES = 2000
THIN_STEPS = 8
#: resampled indices held at a time by :func:`speedup_interval` (resamples x samples)
BOOTSTRAP_CELLS = 1 << 20


def block_length(n: int) -> int:
    """Samples per block of the block bootstrap of ``n`` samples in time order: ⌈√n⌉, at most n / 2 (a
    circular block as long as the series would redraw the series itself: no interval at all)."""
    return max(1, min(math.ceil(math.sqrt(n)), n // 2))


def speedup_interval(base: np.ndarray, other: np.ndarray, seed: int = 0, level: float = 0.95,
                     resamples: int = RESAMPLES, block: int | None = None) -> tuple[float, float, float]:
    """(speed-up, low, high): mean(base) / mean(other) and its paired circular block bootstrap interval.

    base, other: float [S] samples of the same steps (or requests), in time order. The bootstrap
    resamples runs of ``block`` consecutive samples (default :func:`block_length`: samples close in
    time are alike; 1: single samples), wrapping around at the end (circular blocks: every sample is
    drawn as often; a block is at most half the samples). Two means of 0 are a tie (1.0); a NaN sample
    gives NaN."""
    base, other = np.asarray(base, dtype=np.float64), np.asarray(other, dtype=np.float64)
    n = len(base)
    if np.isnan(base).any() or np.isnan(other).any():
        return math.nan, math.nan, math.nan
    mb, mo = (float(base.mean()), float(other.mean())) if n else (math.nan, math.nan)
    point = 1.0 if mb == 0 and mo == 0 else (mb / mo if mo else math.inf)
    if n < 2:
        return point, point, point
    rng = np.random.default_rng(seed)
    block = max(1, min(block_length(n) if block is None else int(block), n // 2))
    ratio = np.empty(resamples)
    rows = max(1, BOOTSTRAP_CELLS // n)             # resamples drawn at a time: memory bounded on long runs
    for r0 in range(0, resamples, rows):
        m = min(rows, resamples - r0)
        if block == 1:
            idx = rng.integers(0, n, size=(m, n))
        else:
            starts = rng.integers(0, n, size=(m, -(-n // block)))       # circular: every sample as likely
            idx = ((starts[:, :, None] + np.arange(block)[None, None, :]) % n).reshape(m, -1)[:, :n]
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
    deployable strategy and its (speedup, low, high) over ``none``; when ``none`` wins, whether its
    samples equal ``none``'s on every step (``same_every_step``), else ``vs_winner``: its own
    (speed-up, low, high) over the winner, on the same steps (at most 1).
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
    #: ties whose samples equal the winner's on every step: their plans route as the winner's do, so which
    #: of them is named is only the order they are listed in
    same_as_winner: list[str] = field(default_factory=list)

    @property
    def one_sample(self) -> bool:
        """One step, or steps that are all copies of one: no interval (every resample is the same)."""
        return self.steps <= 1 or self.distinct_steps == 1

    @property
    def beats_none(self) -> bool:
        """The winner is faster than no duplication beyond the interval."""
        return self.strategy != "none" and self.ci_low > 1.0

    def line(self) -> str:
        """The one-line verdict printed after the tables."""
        n = f"{self.steps} simulated step{'s' if self.steps != 1 else ''}"
        ci = lambda lo, hi: interval_text(lo, hi, self.steps, "simulated step", self.distinct_steps)  # noqa: E731
        within = "(the same time)" if self.one_sample else "within the interval"
        ties = f"; ties {within}: {', '.join(self.ties)}" if self.ties else ""
        every = self.every("simulated step")
        if self.strategy == "none" and self.runner_up is None:
            text = ("verdict: none (no duplication) is the only deployable strategy simulated: nothing to compare "
                    "it with")
        elif self.strategy == "none":
            text = "verdict: none (no duplication) is the fastest deployable strategy"
            if self.runner_up.get("same_every_step"):
                text += (f"; no duplicating strategy is faster: the best, {self.runner_up['strategy']}, takes the "
                         f"same time on {every} (its plans route as no duplication does)")
            else:
                r = self.runner_up
                text += (f"; the best duplicating one, {r['strategy']}, runs at {r['speedup']:.3f}x "
                         f"({ci(r['ci_low'], r['ci_high'])})")
            text += ties
        else:
            text = (f"verdict: {self.strategy} is the fastest deployable strategy, {self.speedup:.3f}x over none "
                    f"({ci(self.ci_low, self.ci_high)})")
            if not self.beats_none:
                text += ", not faster than no duplication beyond the interval"
            text += (ties or self.next_text()) + self.same_text()
        if self.thin and self.distinct_steps is not None and self.distinct_steps < self.steps:
            text += (f" [thin evidence: {self.distinct_steps} distinct of the {n} (the others are exact copies), "
                     f"fewer than {THIN_STEPS}]")
        elif self.thin:
            text += f" [thin evidence: fewer than {THIN_STEPS} simulated steps]"
        return text

    def next_text(self, behind: str = "is {gap}% slower on the same steps", higher_is_better: bool = False) -> str:
        """``; the next, X, is 0.063% slower on the same steps (95% CI 0.0049-0.12%)``: how far behind the
        winner the closest other strategy is, when the winner has no ties (else, or when that strategy is
        none: ""). ``behind`` words the gap: 1 / ratio - 1 of its speed-up over the winner, or 1 - ratio
        where ``higher_is_better`` (its share of the winner's)."""
        r = self.runner_up
        if self.strategy == "none" or self.ties or r is None or "vs_winner" not in r or r["strategy"] == "none":
            return ""
        ratio, lo, hi = r["vs_winner"]
        gap = (lambda x: 100 * (1 - x)) if higher_is_better else (lambda x: 100 * (1 / x - 1))   # noqa: E731
        pct = lambda x: f"{x:.2g}" if abs(x) < 0.1 else f"{x:.2f}"  # noqa: E731  (a bound near 0 keeps its digits)
        ci = "" if self.one_sample else f" (95% CI {pct(gap(hi))}-{pct(gap(lo))}%)"     # one sample: no interval
        return f"; the next, {r['strategy']}, {behind.format(gap=pct(gap(ratio)))}{ci}"

    def every(self, unit: str) -> str:
        """``every one of the 48 simulated steps``, or ``its 1 simulated step``."""
        return f"every one of the {self.steps} {unit}s" if self.steps != 1 else f"its {self.steps} {unit}"

    def same_text(self, unit: str = "simulated step") -> str:
        """`` (a and b take its time on every one of the 48 simulated steps: ...)``: the ties whose samples equal
        the winner's on every step (or request), or ""."""
        same = self.same_as_winner
        if not same or self.strategy == "none":
            return ""
        return (f" ({and_list(same)} {'takes' if len(same) == 1 else 'take'} its time on {self.every(unit)}: "
                f"their plans route alike, so which is named is only the order they are listed in)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def and_list(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def interval_text(lo: float, hi: float, n: int, unit: str, distinct: int | None = None) -> str:
    """``95% CI lo-hi over n units``, or ``no interval from 1 unit`` (one sample gives none), or, when the
    ``distinct`` units are one, ``no interval: the n units are copies of one``."""
    what = f"{n} {unit}{'s' if n != 1 else ''}"
    if n <= 1:
        return f"no interval from {what}"
    if distinct == 1:
        return f"no interval: the {what} are copies of one"
    return f"95% CI {lo:.3f}-{hi:.3f} over {what}"


def verdict_of(result: "SimResult") -> Verdict | None:
    """The verdict of a simulation, or None when it has no ``none`` strategy to compare with."""
    rows = [r for r in result.strategies if r.config.deployable]
    base = next((r for r in rows if r.config.kind == "none"), None)
    if base is None or not rows:
        return None
    v = compare({r.name: r.step_latency for r in rows}, base.name, result.config.seed)
    # steps that route alike (the same tokens, tokens per GPU and expert loads) are copies of one step
    v.distinct_steps = len(np.unique(result.routing_key))
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
    distinct = len(np.unique(result.routing_key))
    out = []
    for r in result.strategies:
        if r.config.kind != "oracle":
            continue
        point, lo, hi = speedup_interval(base.step_latency, r.step_latency, result.config.seed)
        ci = interval_text(lo, hi, len(base.step_latency), "simulated step", distinct)
        out.append(f"bound: {r.name} ({r.redundant_slots} redundant slots, true loads known in advance, no "
                   f"predictor cost) runs at {point:.3f}x over none ({ci}); "
                   + oracle_gain_text(us(base), us(r), result.config.cluster, result.config.model))
    return out


def compare(samples: dict[str, np.ndarray], base: str, seed: int, higher_is_better: bool = False) -> Verdict:
    """The verdict over deployable strategies' paired ``samples`` (name -> float [S], the same S
    steps or requests for all, in time order, ``base`` among them). The winner has the best mean
    (lowest, or highest when ``higher_is_better``; ``base`` on a tie, else the first listed); its
    *speed-up* over ``base`` is mean(base) / mean(it) (or the inverse), with the interval of
    :func:`speedup_interval`. Its ties: the others whose speed-up over the winner has an interval
    that holds 1.0."""
    def stats(x, ref):
        return speedup_interval(x, ref, seed) if higher_is_better else speedup_interval(ref, x, seed)

    sign = -1.0 if higher_is_better else 1.0
    st = {name: stats(x, samples[base]) for name, x in samples.items()}
    # on equal means (to rounding) ``base`` wins: a change must be better to be named
    mean = {n: sign * float(np.mean(x)) for n, x in samples.items()}
    best = min((m for m in mean.values() if m == m), default=math.nan)        # a NaN mean never wins
    tied = [n for n in samples if mean[n] <= best + abs(best) * 1e-9]
    winner = base if base in tied or not tied else tied[0]          # else the first listed
    S = len(samples[base])
    point, lo, hi = st[winner]
    others = [n for n in samples if n != winner]
    vs_winner = st if winner == base else {n: stats(samples[n], samples[winner]) for n in others}
    ties = [n for n in others if vs_winner[n][1] <= 1.0 + 1e-9 and vs_winner[n][2] >= 1.0 - 1e-9]
    if winner != base:
        # the closest other (the first listed of the best), over none and against the winner on the same steps
        near = max(others, key=lambda n: vs_winner[n][0])
        runner = dict(zip(("strategy", "speedup", "ci_low", "ci_high"), (near, *st[near])),
                      vs_winner=list(vs_winner[near]))
        same = [n for n in ties if n != base and np.array_equal(samples[n], samples[winner])]
        return Verdict(winner, point, lo, hi, ties, S, S < THIN_STEPS, runner, same_as_winner=same)
    second = max(others, key=lambda n: st[n][0], default=None)      # the first listed of the best
    runner = None if second is None else dict(zip(("strategy", "speedup", "ci_low", "ci_high"), (second, *st[second])),
                                              same_every_step=bool(np.array_equal(samples[second], samples[base])))
    return Verdict(base, 1.0, 1.0, 1.0, ties, S, S < THIN_STEPS, runner)
