"""The simulator on a runtime run: same routing, same placements, same strategy.

* :func:`replay_placements` re-runs the runtime's own duplication schedule
  (:class:`runtime.duplication.DuplicationPolicy`, numpy only: the same predictors and
  planner, fed the recorded routing in step order) and so recovers the placement that was
  in force at every step of the run; :func:`check_replay` compares it with what the run
  recorded (``share_tokens`` of timings.csv, the final placement.yaml).
* :func:`simulate_run` simulates the recorded trace (the routing that actually happened,
  with the ``rank`` column, so every token starts on the rank it started on) with those
  placements, through :func:`sim.run.simulate` and a :class:`ReplayStrategy`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe_gps.config.schema import ClusterConfig, SimulateConfig, StrategyConfig
from moe_gps.fidelity.model import MODE_KINDS, model_for_run, workload_for_run
from moe_gps.placement import Placement
from moe_gps.trace.data import TokensTrace


def replay_placements(trace: TokensTrace, run_cfg, mode: str, num_ranks: int) -> list[Placement]:
    """The placement in force at each step of a run (list of length ``trace.num_steps``)."""
    from runtime.duplication import DuplicationPolicy

    m = trace.meta
    T = int(trace.tokens_per_step[0]) if trace.num_steps else 0
    policy = DuplicationPolicy(mode, run_cfg.duplication, num_ranks, m.num_layers, m.num_experts, m.top_k, T)
    placement = policy.initial()
    out = []
    for s in range(trace.num_steps):
        routing = trace.step(s)
        if policy.wants_plan(s):
            placement, _ = policy.plan(s, routing.token_id, routing.seq, routing.pos)
        out.append(placement)
        policy.observe(routing)
    return out


def check_replay(placements: list[Placement], trace: TokensTrace, timings, run_dir: Path) -> list[str]:
    """Problems found comparing the replayed placements with the run's records (empty: identical).

    timings: the run's timings.csv as a DataFrame (columns step, rank, layer, share_tokens).
    """
    problems = []
    counts = trace.counts()                                              # [S, L, E]
    G = placements[0].num_gpus
    L = trace.meta.num_layers
    rec = timings.sort_values(["step", "layer", "rank"])
    for s, p in enumerate(placements):
        want = rec[rec.step == s].share_tokens.to_numpy().reshape(L, G)
        got = p.gpu_loads(counts[s])
        if not np.allclose(got, want, atol=1e-6 * max(1.0, float(np.abs(want).max()))):
            problems.append(f"step {s}: replayed placement gives tokens per rank {got.round(1).tolist()}, "
                            f"the run recorded {want.round(1).tolist()}")
    final = run_dir / "placement.yaml"
    if final.exists():
        end = Placement.load(final)
        if not np.array_equal(end.phy2log, placements[-1].phy2log):
            problems.append(f"{final}: the run's final placement differs from the replayed one")
    return problems


class _Replay:
    """Built lazily so that importing this module does not import the simulator."""

    cls = None

    @classmethod
    def get(cls):
        if cls.cls is None:
            from sim.strategies import StepDecision, Strategy
            from sim.work import StepPlan, moves_weights, weight_copies

            class ReplayStrategy(Strategy):
                """Returns, for each step, the placement a real run had (no predictor time: the runtime
                predicts and plans on rank 0 between steps, outside the MoE layers). Every new placement
                costs the host time of applying it, and its copies wait on the critical path, as the
                runtime applies a placement between steps."""

                def __init__(self, cfg, ctx, seed, placements):
                    super().__init__(cfg, ctx, seed)
                    self.placements = placements
                    self.info.notes.append("placements replayed from a runtime run")

                def step(self, i, loads, job_pending):
                    p = self.placements[loads.step]
                    prev, self.current = self.current, p
                    L = loads.src_counts.shape[0]
                    plan = StepPlan(p, np.zeros(self.num_gpus))
                    if prev is None or p is prev:
                        return StepDecision(plan, None, None, np.zeros(L))
                    copies = weight_copies(prev, p, self.ctx.model.expert_bytes, self.hw)
                    moved = moves_weights(prev, p)
                    self.replans += int(moved)
                    nbytes = np.bincount(copies.layer, weights=copies.bytes, minlength=L)
                    return StepDecision(plan, copies, None, nbytes, self.hw.replan_overhead, moved)

            cls.cls = ReplayStrategy
        return cls.cls


def strategy_config(mode: str, run_cfg, num_ranks: int) -> StrategyConfig:
    """A strategy config that describes what the runtime's ``mode`` does (kind, slots, planner,
    re-plan interval, predictor); the simulation itself replays the run's placements."""
    d = run_cfg.duplication
    kind = MODE_KINDS[mode]
    if kind == "none":
        return StrategyConfig(kind="none", name=mode)
    predictor = {"distribution": d.distribution_predictor, "token": d.token_predictor}.get(kind)
    options = {"distribution": d.distribution_params, "token": d.token_params}.get(kind) or {}
    return StrategyConfig(kind=kind, name=mode, predictor=predictor, predictor_options=dict(options),
                          planner=d.algorithm, planner_options=dict(d.algorithm_options),
                          redundant_slots=d.num_redundant, replan_interval=d.replan_every, min_gain=0.0,
                          direct_routing=False if kind == "token" else None)


def simulate_run(trace: TokensTrace, run_cfg, mode: str, cluster: ClusterConfig, placements: list[Placement],
                 first_step: int, trace_name: str = "trace"):
    """Simulate steps ``first_step - 1 ..`` of a run's trace with its placements -> StrategyResult.

    The step before ``first_step`` is simulated too (and dropped by the caller) so that the
    weight copies into ``first_step`` are charged from the placement that preceded it.
    """
    from sim.run import simulate

    cfg = SimulateConfig(cluster=cluster, model=model_for_run(run_cfg), workload=workload_for_run(run_cfg),
                         strategies=[strategy_config(mode, run_cfg, cluster.num_gpus)], seed=0,
                         train_steps=max(1, first_step - 1), trace=trace_name, copy_policy="critical")
    cls = _Replay.get()

    def factory(scfg, ctx, seed):
        return cls(scfg, ctx, seed, placements)

    result = simulate(trace, cfg, progress=False, trace_name=trace_name, strategy_factory=factory)
    return result, result.strategies[0]
