"""Request streams: seeded draws from a :class:`~moe_gps.config.serving.RequestWorkload`.

The same seed gives the same requests; every rate uses the same random numbers scaled to
its rate (common random numbers), so that curves over rates are smooth and strategies are
compared on identical requests. Formats and formulas: docs/serving.md, "Workload file".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_gps.config.schema import MAX_SEQ_LEN
from moe_gps.config.serving import CSV_COLUMNS, LengthSpec, RequestWorkload
from moe_gps.errors import UserError


@dataclass
class Requests:
    """n requests in arrival order.

    arrival_s: float [n] seconds from the start;  prompt, output: int64 [n] tokens (output >= 1: the
    first output token comes out of the prefill);  rate: the mean rate they arrive at, requests/s (a
    replayed log's own, 1 / its mean gap, where no rate scales it; None: not known)
    """

    arrival_s: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    rate: float | None = None

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def tokens(self) -> int:
        """Tokens the model processes for all of them: each prompt, and every output token but the last
        (fed back to produce the next)."""
        return int((self.prompt + self.output - 1).sum())


def read_requests_csv(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arrival_s float [m], prompt int64 [m], output int64 [m]) from a CSV with a header row and the
    columns arrival_s, prompt_tokens, output_tokens (more columns are ignored)."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: requests CSV not found")
    try:
        df = pd.read_csv(p)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise UserError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from None
    missing = [c for c in CSV_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (need {', '.join(CSV_COLUMNS)})")
    if len(df) == 0:
        raise UserError(f"{path}: no rows")
    out = []
    for col in CSV_COLUMNS:
        v = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(v) | (v < (0 if col == "arrival_s" else 1))
        if col != "arrival_s":
            bad |= (v != np.round(v)) | (v > MAX_SEQ_LEN)       # a length past any model (and past int64)
        if bad.any():
            row = int(np.argmax(bad))
            need = "a number >= 0" if col == "arrival_s" else f"an integer from 1 to {MAX_SEQ_LEN}"
            raise UserError(f"{path}: row {row + 2}: {col}: must be {need}, got {str(df[col].iloc[row])!r}")
        out.append(v if col == "arrival_s" else v.astype(np.int64))
    return out[0], out[1], out[2]


def _lengths(spec: LengthSpec, n: int, rng: np.random.Generator, column: np.ndarray | None,
             rows: np.ndarray | None) -> np.ndarray:
    if spec.dist == "fixed":
        return np.full(n, spec.value, dtype=np.int64)
    if spec.dist == "uniform":
        return rng.integers(spec.min, spec.max + 1, size=n, dtype=np.int64)
    return column[rows]


def generate_requests(workload: RequestWorkload, rate: float | None, num_requests: int, seed: int) -> Requests:
    """``num_requests`` requests of ``workload`` arriving at ``rate`` requests/s (None: the workload's
    rate; for arrival process csv with no rate anywhere, the log's own timing)."""
    rate = workload.rate if rate is None else rate
    proc = workload.arrival.process
    if rate is None and proc != "csv":
        raise UserError(f"workload {workload.name}: no request rate; give --rate R (requests/s) or set rate:")
    n = int(num_requests)
    rng = np.random.default_rng(seed)
    csv = read_requests_csv(workload.requests_csv) if workload.requests_csv is not None else None
    # arrivals
    if proc == "poisson":
        arrival = np.cumsum(rng.standard_exponential(n)) / rate
        rows = None
    elif proc == "gamma":
        k = 1.0 / workload.arrival.cv ** 2
        arrival = np.cumsum(rng.standard_gamma(k, n) / k) / rate
        rows = None
    else:
        arrival, rows, log_rate = _replay(csv[0], n, rate, workload.requests_csv)
        rate = log_rate if rate is None else rate
    # lengths: empirical ones take the replayed rows, or rows drawn together for prompt and output
    if rows is None and "empirical" in (workload.prompt_tokens.dist, workload.output_tokens.dist):
        rows = rng.integers(0, len(csv[0]), size=n)
    prompt = _lengths(workload.prompt_tokens, n, rng, csv[1] if csv else None, rows)
    output = _lengths(workload.output_tokens, n, rng, csv[2] if csv else None, rows)
    return Requests(arrival.astype(np.float64), prompt, output, float(rate))


def _replay(times: np.ndarray, n: int, rate: float | None, path: str) -> tuple[np.ndarray, np.ndarray, float]:
    """The log's arrivals in time order, the first at 0, repeated end to end (one mean gap apart) when
    more requests are asked for than it has, and time-scaled to ``rate``.
    -> (arrival_s [n], rows [n], the log's own mean rate 1 / gap)."""
    order = np.argsort(times, kind="stable")
    t = times[order] - times[order[0]]
    m = len(t)
    span = float(t[-1])
    if m < 2 or span <= 0:
        raise UserError(f"{path}: arrival process csv needs at least 2 distinct arrival times")
    gap = span / (m - 1)
    laps = -(-n // m)
    arrival = (t[None, :] + (np.arange(laps) * (span + gap))[:, None]).ravel()[:n]
    rows = np.tile(order, laps)[:n]
    if rate is not None:
        arrival = arrival * ((1.0 / gap) / rate)
    return arrival, rows, 1.0 / gap
