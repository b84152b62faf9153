"""Request-level metrics of a serving run, goodput at an SLO, and the verdict between strategies.

Definitions (docs/serving.md, "Metrics"), per request with arrival a, first token f, last
token e and O output tokens:

* TTFT = f - a;  TPOT = (e - f) / (O - 1) (undefined for O = 1);  end-to-end latency = e - a;
* throughput = requests / (last finish - first arrival), and output tokens over the same span;
* a request meets the SLO when TTFT <= ttft_ms and TPOT <= tpot_ms (each when given; a
  one-token answer has no TPOT to miss); goodput = requests meeting it / the same span.

The verdict compares strategies on the same requests: with an SLO, on SLO attainment (the share
of requests meeting it, paired request by request; goodput's ratio where the runs take the same
span); without one, or when every strategy meets it for exactly the same requests, on mean
end-to-end latency. Its 95% interval is a paired circular block bootstrap over the requests in
arrival order (blocks of ceil(sqrt(n)) requests, since neighbours in a queue are not
independent), as simulate's over steps: :func:`sim.verdict.compare`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moe_gps.config.serving import SLOConfig
from sim.serving.requests import Requests
from sim.verdict import THIN_STEPS, Verdict, compare, interval_text, speedup_interval

PERCENTILES = (50, 90, 99)


@dataclass
class RequestTimes:
    """Per-request latencies in seconds, float [n] each (tpot: NaN for one-token answers)."""

    ttft: np.ndarray
    tpot: np.ndarray
    e2e: np.ndarray
    queue: np.ndarray
    span: float

    @classmethod
    def of(cls, req: Requests, admitted: np.ndarray, first: np.ndarray, finish: np.ndarray) -> "RequestTimes":
        a = req.arrival_s
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(req.output > 1, (finish - first) / np.maximum(req.output - 1, 1), np.nan)
        span = float(finish.max() - a.min()) if len(a) else 0.0
        return cls(first - a, tpot, finish - a, admitted - a, span)

    def met(self, slo: SLOConfig) -> np.ndarray:
        """bool [n]: the request meets the SLO."""
        ok = np.ones(len(self.ttft), dtype=bool)
        if slo.ttft_ms is not None:
            ok &= self.ttft <= slo.ttft_ms / 1e3
        if slo.tpot_ms is not None:
            ok &= np.isnan(self.tpot) | (self.tpot <= slo.tpot_ms / 1e3)
        return ok


def _pct(x: np.ndarray, q: float) -> float:
    x = x[~np.isnan(x)]
    return float(np.percentile(x, q)) if len(x) else math.nan


def latency_row(t: RequestTimes, req: Requests, slo: SLOConfig) -> dict:
    """Percentiles (ms), means, throughput and goodput of one run, units in the keys."""
    row: dict = {}
    for name, x in (("ttft", t.ttft), ("tpot", t.tpot), ("e2e", t.e2e)):
        row[f"{name}_mean_ms"] = float(np.nanmean(x) * 1e3) if np.isfinite(x).any() else math.nan
        for q in PERCENTILES:
            row[f"{name}_p{q}_ms"] = _pct(x, q) * 1e3
    row["queue_mean_ms"] = float(t.queue.mean() * 1e3) if len(t.queue) else math.nan
    span = t.span if t.span > 0 else math.nan
    row["throughput_rps"] = len(req) / span
    row["output_tokens_per_s"] = float(req.output.sum()) / span
    met = t.met(slo)
    row["slo_attainment"] = float(met.mean()) if len(met) else math.nan
    row["goodput_rps"] = float(met.sum()) / span
    return row


def serving_verdict(times: dict[str, RequestTimes], deployable: list[str], base: str | None, slo: SLOConfig,
                    seed: int) -> tuple[Verdict | None, bool]:
    """Which deployable strategy serves best (module docstring) -> (verdict, whether it compared SLO attainment);
    (None, False) without a ``none`` strategy."""
    if base is None or base not in deployable:
        return None, False
    n = len(times[base].e2e)
    if slo.given:
        # strategies that meet the SLO for as many requests are taken in order of their mean latency (the
        # verdict names the first of the best that is listed: never the order of --strategies)
        met = {s: times[s].met(slo).astype(np.float64) for s in deployable}
        order = sorted(deployable, key=lambda s: (-float(met[s].mean()), float(np.nanmean(times[s].e2e))))
        samples = {s: met[s] for s in order}
        if not all(np.array_equal(x, samples[base]) for x in samples.values()):
            if not samples[base].any():
                # no request of the baseline meets the SLO: compare the shares met + 1/n (a finite ratio)
                v = compare({s: x + 1.0 / n for s, x in samples.items()}, base, seed, higher_is_better=True)
                r = v.runner_up
                if r is not None and "vs_winner" in r:     # how far behind the winner: of the shares themselves
                    r["vs_winner"] = list(speedup_interval(samples[r["strategy"]], samples[v.strategy], seed))
                return v, True
            return compare(samples, base, seed, higher_is_better=True), True
    return compare({s: times[s].e2e for s in deployable}, base, seed), False


def verdict_line(v: Verdict, on_goodput: bool) -> str:
    """The one-line serving verdict (``on_goodput``: the verdict compared SLO attainment, else mean latency)."""
    what = "SLO attainment" if on_goodput else "mean end-to-end latency"
    ci = lambda lo, hi: interval_text(lo, hi, v.steps, "request")  # noqa: E731
    thin = f" [thin evidence: fewer than {THIN_STEPS} requests]" if v.thin else ""
    ties = f"; ties within the interval: {', '.join(v.ties)}" if v.ties else ""
    ratio = (lambda x: f"{x:.3f}x none's SLO attainment") if on_goodput else (lambda x: f"{x:.3f}x none's speed")
    if v.strategy == "none":
        text = f"verdict ({what}): none (no duplication) is the best deployable strategy"
        if v.runner_up is not None and v.runner_up.get("same_every_step"):
            text += (f"; no duplicating strategy is better: the best, {v.runner_up['strategy']}, gives the same on "
                     f"{v.every('request')}")
        elif v.runner_up is not None:
            r = v.runner_up
            text += (f"; the best duplicating one, {r['strategy']}, is {ratio(r['speedup'])} "
                     f"({ci(r['ci_low'], r['ci_high'])})")
        return text + ties + thin
    text = (f"verdict ({what}): {v.strategy} is the best deployable strategy, {ratio(v.speedup)} "
            f"({ci(v.ci_low, v.ci_high)})")
    if not v.beats_none:
        text += ", not better than no duplication beyond the interval"
    behind = "meets the SLO for {gap}% fewer of the same requests" if on_goodput else \
        "is {gap}% slower on the same requests"
    return text + (ties or v.next_text(behind, higher_is_better=on_goodput)) + v.same_text("request") + thin
