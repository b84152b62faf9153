"""What to simulate: the user's point, the axes around it, and the runs of each study.

A **point** is one cluster and workload on one skew variant of the trace: (GPU count,
bandwidth of the fabric the all-to-all crosses, workload, skew variant). A **candidate**
is one strategy with one redundant-slot budget. A **run** is a (point, candidate): one
``sim.run.simulate`` call with one strategy, cached under its config hash.

Studies (docs/recommend.md, "What is simulated"):

* ``headline``: the user's point x every candidate strategy x every redundant-slot budget;
* ``map-bw-skew``: bandwidth x skew at the user's GPU count and workload;
* ``map-gpus-bw``: GPU count x bandwidth at the user's workload and the trace's skew;
* ``map-tokens-bw``: workload x bandwidth at the user's GPU count and the trace's skew;
* ``predictor``: synthetic token predictor accuracy x overhead at the user's point and at
  the largest tokens-per-step workload.

The maps simulate the map strategies (plus the headline's winner and runner-up), all at
``map_redundant_slots_per_gpu``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from moe_gps.config.schema import ClusterConfig, ModelConfig, StrategyConfig, WorkloadConfig, redundant_slots
from moe_gps.errors import UserError
from moe_gps.recommend.skew import SkewVariant
from moe_gps.recommend.sweep import SweepConfig

TRACE_SKEW = "trace"


@dataclass(frozen=True)
class Candidate:
    """One strategy with one slot budget.

    strategy: a name for ``strategy_from_name`` (none, eplb, dist:P, token:P, oracle), or
              ``token:synthetic`` with ``accuracy`` and ``overhead`` (FLOPs per token per layer)
    per_gpu:  extra expert slots per GPU beyond ceil(E / G); 0 for none
    """

    strategy: str
    per_gpu: int = 0
    accuracy: float | None = None
    overhead: float | None = None

    @property
    def synthetic(self) -> bool:
        return self.accuracy is not None

    @property
    def name(self) -> str:
        """The strategy's name in tables (without the slot budget)."""
        if self.synthetic:
            return f"token:synthetic(a={self.accuracy:g},{self.overhead / 1e6:g}MFLOP)"
        return self.strategy

    @property
    def label(self) -> str:
        return self.name if self.strategy == "none" else f"{self.name} +{self.per_gpu}/GPU"

    @property
    def family(self) -> str:
        """none, static, distribution, token, token (hypothetical), oracle."""
        if self.synthetic:
            return "token (hypothetical)"
        head = self.strategy.split(":", 1)[0]
        return {"none": "none", "eplb": "static", "static": "static", "dist": "distribution",
                "distribution": "distribution", "token": "token", "oracle": "oracle"}.get(head, head)

    @property
    def deployable(self) -> bool:
        """A strategy one can run (not the oracle bound, not a what-if predictor)."""
        return not self.synthetic and self.family != "oracle"

    def config(self, num_gpus: int, num_experts: int, placement: str = "typical") -> StrategyConfig:
        from moe_gps.config.loader import strategy_from_name

        if self.synthetic:
            cfg = StrategyConfig(kind="token", predictor="synthetic", name=self.name,
                                 predictor_options={"accuracy": float(self.accuracy),
                                                    "overhead": float(self.overhead), "placement": placement})
        else:
            cfg = strategy_from_name(self.strategy)
        if cfg.kind != "none":
            cfg = dataclasses.replace(cfg, redundant_slots=redundant_slots(num_gpus, num_experts, self.per_gpu))
        return cfg


@dataclass(frozen=True)
class Point:
    """num_gpus, bandwidth (GB/s), workload (index into SweepPlan.workloads), skew (variant key)."""

    num_gpus: int
    bandwidth_gb_s: float
    workload: int
    skew: str


@dataclass(frozen=True)
class RunSpec:
    point: Point
    candidate: Candidate


def cluster_at(user: ClusterConfig, num_gpus: int, bandwidth_gb_s: float) -> ClusterConfig:
    """The user's cluster with ``num_gpus`` GPUs and the all-to-all fabric at ``bandwidth_gb_s``.

    One-node clusters stay one node of ``num_gpus`` GPUs (one NVLink/PCIe domain); a
    multi-node cluster keeps its GPUs per node (fewer GPUs than a node: one node of them).
    The bandwidth is set on intra_node when the result is one node, else on inter_node.
    """
    if user.num_nodes == 1 or num_gpus <= user.gpus_per_node:
        per_node = num_gpus
    else:
        per_node = user.gpus_per_node
    c = dataclasses.replace(user, num_gpus=num_gpus, gpus_per_node=per_node,
                            name=f"{user.name} [{num_gpus} GPUs, {bandwidth_gb_s:g} GB/s]")
    if c.num_nodes == 1:
        c.intra_node = dataclasses.replace(user.intra_node, bandwidth_gb_s=float(bandwidth_gb_s))
    else:
        c.inter_node = dataclasses.replace(user.inter_node, bandwidth_gb_s=float(bandwidth_gb_s))
    return c


def fabric_bandwidth(cluster: ClusterConfig) -> tuple[str, float]:
    """(fabric name, GB/s) of the fabric the bandwidth axis sets for this cluster."""
    if cluster.num_nodes > 1 and cluster.inter_node is not None:
        return "inter_node", cluster.inter_node.bandwidth_gb_s
    return "intra_node", cluster.intra_node.bandwidth_gb_s


def workload_tokens(w: WorkloadConfig, trace_tokens: float) -> float:
    return float(w.tokens_per_step) if w.tokens_per_step else float(trace_tokens)


#: the prompt length a prefill workload's label leaves out
DEFAULT_SEQ_LEN = WorkloadConfig().seq_len


def workload_label(w: WorkloadConfig, trace_tokens: float) -> str:
    """A workload's name in reports: phase and tokens per step, with decode's context length and a prompt
    length other than the default (one label per distinct workload of a plan, see :func:`make_plan`)."""
    tok = f"{workload_tokens(w, trace_tokens):.0f}"
    tail = " (trace)" if not w.tokens_per_step else ""
    if w.phase == "decode":
        return f"decode {tok}{tail}, ctx {w.seq_len}"
    return f"prefill {tok}{tail}" + (f", prompt {w.seq_len}" if w.seq_len != DEFAULT_SEQ_LEN else "")


@dataclass
class SweepPlan:
    """The resolved axes (the user's values included) and the runs of each study.

    workloads[0] is the user's workload; skews maps variant key -> SkewVariant
    ("trace" first); bandwidths and gpus are sorted and hold the user's values; trace_tokens is the
    mean of the trace's step sizes, trace_token_range their smallest and largest.
    """

    sweep: SweepConfig
    cluster: ClusterConfig
    model: ModelConfig
    trace_tokens: float
    user: Point
    bandwidths: list[float]
    gpus: list[int]
    workloads: list[WorkloadConfig]
    skews: dict[str, SkewVariant]
    fabric: str
    headline_candidates: list[Candidate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    trace_token_range: tuple[int, int] = (0, 0)

    # -- axes
    def workload_order(self) -> list[int]:
        """Workload indices sorted for a map axis: prefill by tokens, then decode by tokens."""
        return sorted(range(len(self.workloads)),
                      key=lambda i: (self.workloads[i].phase != "prefill",
                                     workload_tokens(self.workloads[i], self.trace_tokens), self.workloads[i].seq_len))

    def skew_order(self) -> list[str]:
        return sorted(self.skews, key=lambda k: self.skews[k].achieved)

    def largest_workload(self) -> int:
        return max(range(len(self.workloads)), key=lambda i: workload_tokens(self.workloads[i], self.trace_tokens))

    def point_cluster(self, p: Point) -> ClusterConfig:
        return cluster_at(self.cluster, p.num_gpus, p.bandwidth_gb_s)

    def fabric_of(self, num_gpus: int) -> str:
        """The fabric the bandwidth axis sets at ``num_gpus`` GPUs (intra_node where they fit one node)."""
        return fabric_bandwidth(cluster_at(self.cluster, num_gpus, 1.0))[0]

    def fabric_label(self, gpu_counts) -> str:
        """The bandwidth axis's fabric over ``gpu_counts``, in words."""
        names = {self.fabric_of(g) for g in gpu_counts}
        if len(names) == 1:
            return names.pop()
        return f"all-to-all fabric (intra_node up to {self.cluster.gpus_per_node} GPUs, inter_node above)"

    # -- studies
    def headline_runs(self) -> list[RunSpec]:
        return [RunSpec(self.user, c) for c in self.headline_candidates]

    def map_candidates(self, extra: list[Candidate]) -> list[Candidate]:
        r = self.sweep.map_redundant_slots_per_gpu
        out = [Candidate("none")]
        for name in self.sweep.map_strategies:
            out.append(Candidate(name, 0 if name == "none" else r))
        m = self.sweep.map_token_predictor
        if m is not None:
            out.append(Candidate("token:synthetic", r, m.accuracy, m.overhead_flops))
        out += extra
        seen, uniq = set(), []
        for c in out:
            if c not in seen:
                seen.add(c)
                uniq.append(c)
        return uniq

    def map_runs(self, cands: list[Candidate]) -> dict[str, list[RunSpec]]:
        u = self.user
        bw_skew = [Point(u.num_gpus, b, u.workload, s) for s in self.skews for b in self.bandwidths]
        gpus_bw = [Point(g, b, u.workload, TRACE_SKEW) for g in self.gpus for b in self.bandwidths]
        tok_bw = [Point(u.num_gpus, b, w, TRACE_SKEW) for w in range(len(self.workloads)) for b in self.bandwidths]
        return {name: [RunSpec(p, c) for p in pts for c in cands]
                for name, pts in (("map-bw-skew", bw_skew), ("map-gpus-bw", gpus_bw), ("map-tokens-bw", tok_bw))}

    def predictor_points(self) -> list[Point]:
        u = self.user
        pts = [u]
        big = self.largest_workload()
        if big != u.workload:
            pts.append(dataclasses.replace(u, workload=big))
        return pts

    def predictor_runs(self) -> list[RunSpec]:
        r = self.sweep.map_redundant_slots_per_gpu
        return [RunSpec(p, Candidate("token:synthetic", r, a, c)) for p in self.predictor_points()
                for a in self.sweep.predictor_accuracy for c in self.sweep.predictor_overhead_flops]


def check_gpu_counts(sweep: SweepConfig, cluster: ClusterConfig, where: str = "sweep") -> None:
    """UserError where a GPU count of the sweep does not fill whole nodes of a multi-node cluster."""
    if cluster.num_nodes > 1:
        for i, g in enumerate(sweep.num_gpus):
            if g > cluster.gpus_per_node and g % cluster.gpus_per_node:
                raise UserError(f"{where}: num_gpus[{i}]: {g} GPUs do not fill whole nodes of "
                                f"{cluster.gpus_per_node} (cluster {cluster.name}); use a multiple of "
                                f"{cluster.gpus_per_node} or at most {cluster.gpus_per_node}")


def make_plan(sweep: SweepConfig, trace, cluster: ClusterConfig, model: ModelConfig, workload: WorkloadConfig,
              skews: dict[str, SkewVariant], where: str = "sweep") -> SweepPlan:
    """Resolve the axes around the user's point and the headline candidates."""
    check_gpu_counts(sweep, cluster, where)
    fabric, user_bw = fabric_bandwidth(cluster)
    G = cluster.num_gpus
    gpus = sorted(set(sweep.num_gpus) | {G})
    bandwidths = sorted(set(float(b) for b in sweep.bandwidth_gb_s) | {float(user_bw)})
    trace_tokens = float(trace.tokens_per_step.mean())
    workloads = [workload]
    key = lambda w: (w.phase, w.seq_len, workload_tokens(w, trace_tokens))  # noqa: E731
    for w in sweep.workloads:
        if key(w) not in {key(x) for x in workloads}:
            workloads.append(w)
    from sim.strategies import expand_strategies

    names, notes = expand_strategies(sweep.strategies, trace)
    cands: list[Candidate] = []
    for n in names:
        if n == "none":
            cands.append(Candidate("none"))
        else:
            cands += [Candidate(n, r) for r in sorted(set(sweep.redundant_slots_per_gpu))]
    if Candidate("none") not in cands:
        cands.insert(0, Candidate("none"))
        notes.append("none (no duplication) added to the strategies: every speed-up is against it")
    user = Point(G, float(user_bw), 0, TRACE_SKEW)
    tps = trace.tokens_per_step
    plan = SweepPlan(sweep, cluster, model, trace_tokens, user, bandwidths, gpus, workloads, skews, fabric,
                     cands, notes, (int(tps.min()), int(tps.max())) if len(tps) else (0, 0))
    return plan
