"""Config dataclasses of ``moe-gps serve``: the request workload, the scheduler, the parts of an
iteration outside the MoE layers, the SLO, and the whole serve config.

Fields carry their documentation in ``metadata`` (:func:`~moe_gps.config.schema.spec`);
docs/serving.md lists every one (a test checks it). The workload file format is
:class:`RequestWorkload`; a bundled one is ``chat`` (``presets/workloads/chat.yaml``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from moe_gps.config.schema import SimulateConfig, spec
from moe_gps.errors import UserError

ARRIVAL_PROCESSES = ("poisson", "gamma", "csv")
LENGTH_DISTS = ("fixed", "uniform", "empirical")
#: the coefficient of variation of gamma arrival gaps when the workload does not give one
GAMMA_CV = 2.0
#: the lowest request rate (requests/s): slower arrivals span so long that the simulated clock loses the
#: resolution of an iteration (a million requests at this rate span 1e9 s, where a double keeps 0.1 µs)
MIN_RATE = 1e-3
#: the largest fixed time of an iteration beyond the model (µs): a second
MAX_OVERHEAD_US = 1e6
#: the columns of a requests CSV (as exported from a server's logs)
CSV_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")


@dataclass
class ArrivalSpec:
    """When requests arrive."""

    process: str = spec(
        "poisson: exponential gaps at `rate`; gamma: gamma-distributed gaps at `rate` with coefficient of "
        "variation `cv` (> 1 is burstier than Poisson); csv: the `arrival_s` column of `requests_csv`, in "
        "order, time-scaled so that its mean rate is `rate` (the bursts of the log are kept)",
        choices=ARRIVAL_PROCESSES, default="poisson")
    cv: float | None = spec("process gamma: standard deviation / mean of the gaps between arrivals (1 = Poisson; "
                            "default 2); not used, and not written, for the other processes", gt=0, default=None)

    def __post_init__(self) -> None:
        # cv means something for gamma gaps only: 2 there unless given, and absent (not written) elsewhere
        if self.process == "gamma":
            if self.cv is None:
                self.cv = GAMMA_CV
        else:
            self.cv = None


@dataclass
class LengthSpec:
    """A distribution of token counts (prompt or output)."""

    dist: str = spec(
        "fixed: always `value`; uniform: integers from `min` to `max`, both included; empirical: drawn from "
        "the column of `requests_csv` (rows drawn together for prompt and output when both are empirical, "
        "so that their correlation is kept)", choices=LENGTH_DISTS)
    value: int | None = spec("dist fixed: the length", unit="tokens", ge=1, default=None)
    min: int | None = spec("dist uniform: the smallest length", unit="tokens", ge=1, default=None)
    max: int | None = spec("dist uniform: the largest length", unit="tokens", ge=1, default=None)

    def check(self, where: str) -> None:
        used = {"fixed": ("value",), "uniform": ("min", "max"), "empirical": ()}[self.dist]
        for key in ("value", "min", "max"):
            if key in used and getattr(self, key) is None:
                raise UserError(f"{where}.{key}: required for dist {self.dist}")
            if key not in used and getattr(self, key) is not None:
                raise UserError(f"{where}.{key}: not used by dist {self.dist}")
        if self.dist == "uniform" and self.min > self.max:
            raise UserError(f"{where}.min: {self.min} is above max={self.max}")


@dataclass
class RequestWorkload:
    """A stream of requests: when they arrive and how long their prompts and outputs are."""

    name: str = spec("workload name, for the reader")
    prompt_tokens: LengthSpec = spec("prompt length distribution")
    output_tokens: LengthSpec = spec("output length distribution (tokens generated, the first included)")
    arrival: ArrivalSpec = spec("the arrival process", factory=ArrivalSpec)
    rate: float | None = spec("mean arrival rate; `--rate` and `--rates` override it", unit="requests/s",
                              ge=MIN_RATE, default=None)
    num_requests: int = spec("requests per simulated rate; `--requests` overrides it", ge=1, default=1000)
    requests_csv: str | None = spec(
        "CSV with a header and the columns arrival_s, prompt_tokens, output_tokens (one row per request, "
        "e.g. exported from a server's logs); a relative path is taken from the workload file's folder. "
        "Needed by arrival process csv and by empirical lengths", default=None)
    description: str = spec("free text: where the numbers come from", default="")

    def check(self, where: str) -> None:
        needs = self.arrival.process == "csv" or "empirical" in (self.prompt_tokens.dist, self.output_tokens.dist)
        if needs and self.requests_csv is None:
            raise UserError(f"{where}: requests_csv: required by arrival process csv and empirical lengths")


@dataclass
class SchedulerConfig:
    """Continuous batching with chunked prefill, one scheduler per GPU (data-parallel attention)."""

    max_num_batched_tokens: int = spec(
        "token budget of one iteration on one GPU: decode tokens first, then prefill chunks (vLLM's "
        "max_num_batched_tokens; its default for an online server on A100-class GPUs)", unit="tokens", ge=1,
        default=2048)
    max_num_seqs: int = spec("requests running at once on one GPU (vLLM's max_num_seqs)", ge=1, default=256)
    block_size: int = spec("KV-cache block: a request holds a whole number of blocks (vLLM's block_size)",
                           unit="tokens", ge=1, default=16)
    kv_cache_gb: float | None = spec(
        "KV-cache capacity of one GPU; absent: the GPU's HBM less reserved memory, expert slots, attention, "
        "dense layers, embeddings and LM head (docs/serving.md)", unit="GB (1e9 B)", gt=0, default=None)


@dataclass
class IterationParts:
    """The parts of an iteration outside the MoE layers (docs/serving.md, "Iteration time")."""

    vocab_size: int | None = spec(
        "vocabulary size (embeddings, LM head); absent: known for the bundled model presets", ge=1, default=None)
    tied_embeddings: bool = spec("the LM head shares the embedding matrix (one copy in memory)", default=False)
    dense_layers: int | None = spec(
        "dense (non-MoE) transformer layers before the MoE layers, e.g. DeepSeek-V3's first 3; absent: known "
        "for the bundled model presets, else 0", ge=0, default=None)
    dense_intermediate_size: int | None = spec(
        "FFN dimension of a dense layer; absent: known for the bundled model presets", ge=1, default=None)
    overhead_us: float = spec(
        "fixed time of every iteration beyond the model: scheduling, sampling, detokenization, launching "
        "(an assumption: measure it as a server's time per iteration at batch 1 less the model's)",
        unit="us", ge=0, le=MAX_OVERHEAD_US, default=500.0)


@dataclass
class SLOConfig:
    """The service-level objective that goodput counts against."""

    ttft_ms: float | None = spec("time to first token a request must not exceed; absent: no limit", unit="ms",
                                 gt=0, default=None)
    tpot_ms: float | None = spec("time per output token a request must not exceed; absent: no limit",
                                 unit="ms", gt=0, default=None)
    attainment: float = spec(
        "share of requests that must meet the SLO for a rate to count as served (the sweep's sustainable "
        "rate)", gt=0, le=1, default=0.9)

    @property
    def given(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None


@dataclass
class ServeConfig:
    """Everything ``moe-gps serve`` ran with; written to the output folder as config.yaml."""

    simulate: SimulateConfig = spec(
        "cluster, model, strategies, copy policy, seed and training steps, as for `moe-gps simulate` (its "
        "workload is not used: each iteration's batch is what it is, and re-plans price their copies against "
        "decodes at the requests' mean context)")
    workload: RequestWorkload = spec("the request workload")
    rates: list[float] = spec("request rates simulated, one run each", unit="requests/s", factory=list)
    scheduler: SchedulerConfig = spec("the scheduler", factory=SchedulerConfig)
    iteration: IterationParts = spec("the parts of an iteration outside the MoE layers", factory=IterationParts)
    slo: SLOConfig = spec("the SLO of goodput", factory=SLOConfig)

    def check(self, where: str) -> None:
        for i, r in enumerate(self.rates):
            if not (math.isfinite(r) and r >= MIN_RATE):
                raise UserError(f"{where}: rates[{i}]: must be a finite number >= {MIN_RATE:g}, got {r!r}")


def load_request_workload(name_or_path: str) -> RequestWorkload:
    """A bundled workload (``chat``) or a workload YAML; ``requests_csv`` is resolved against the file's folder
    (an absolute path, so that a config written with it reruns from anywhere)."""
    from moe_gps.config.loader import _load, preset_names

    w = _load("workloads", RequestWorkload, name_or_path)
    if name_or_path in preset_names("workloads"):
        return w
    return _csv_beside(w, name_or_path)


def _csv_beside(w: RequestWorkload, config_path: str) -> RequestWorkload:
    """``w`` with its ``requests_csv`` made absolute, a relative one taken from ``config_path``'s folder."""
    import dataclasses

    if w.requests_csv is None:
        return w
    path = Path(w.requests_csv)
    if not path.is_absolute():
        path = Path(config_path).parent / path
    return dataclasses.replace(w, requests_csv=str(path.resolve()))


def load_serve_config(path: str) -> ServeConfig:
    """A whole serve config (as written to the output folder), fully checked; a relative ``requests_csv``
    is taken from the config file's folder."""
    import dataclasses

    from moe_gps.config.loader import build
    from moe_gps.files import read_yaml

    cfg = build(ServeConfig, read_yaml(path), str(path))
    return dataclasses.replace(cfg, workload=_csv_beside(cfg.workload, path))
