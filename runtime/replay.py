"""The simulator on a runtime run: same routing, same placements, same strategy.

* :func:`replay_run` re-runs the runtime's own duplication schedule
  (:class:`runtime.duplication.DuplicationPolicy`, numpy only: the same predictors,
  planner, ``window`` and ``min_gain`` rule on the same cluster file, fed the recorded
  routing in step order) and so recovers the placement that was in force at every step of
  the run; :func:`check_replay` compares it with what the run recorded (``share_tokens``
  of timings.csv, the final placement.yaml). Under ``copy_policy: async`` the step at
  which a move's weights had landed depends on timing, so it is read from the run's
  steps.csv (``switched``, ``planned_at``; the folder is named in the trace's provenance).
* :func:`simulate_run` simulates the recorded trace (the routing that actually happened,
  with the ``rank`` column, so every token starts on the rank it started on) with those
  placements, through :func:`sim.run.simulate` and a :class:`ReplayStrategy`, under the
  run's copy policy (async: the copies run in the background from the step the move
  started, and the placement switches at the step the run switched).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_gps.config.schema import COPY_BANDWIDTH_SHARE, ClusterConfig, SimulateConfig, StrategyConfig
from moe_gps.errors import UserError
from moe_gps.fidelity.model import MODE_KINDS, model_for_run, workload_for_run
from moe_gps.placement import Placement, load_placement
from moe_gps.trace.data import TokensTrace


@dataclass
class ReplayedMove:
    """A placement whose weights moved in the background (copy policy async): adopted before step
    ``start``, in force from step ``switch`` (None: still in flight when the run ended)."""

    start: int
    switch: int | None
    placement: Placement


@dataclass
class Replay:
    """What a run did, replayed: the placement in force at each step (list of length ``num_steps``)
    and the background moves of an async run (in step order; empty otherwise)."""

    placements: list[Placement]
    moves: list[ReplayedMove]


def replay_run(trace: TokensTrace, run_cfg, mode: str, num_ranks: int, steps=None) -> Replay:
    """Re-run the runtime's schedule on a run's recorded trace (module docstring).

    steps: the run's steps.csv as a DataFrame (async runs; default: read from the folder the
    trace's provenance names)."""
    from runtime.duplication import DuplicationPolicy
    from runtime.gain import gain_model_for
    from sim.work import moves_weights

    m, d = trace.meta, run_cfg.duplication
    T = int(trace.tokens_per_step[0]) if trace.num_steps else 0
    gain = gain_model_for(run_cfg, mode, num_ranks)
    policy = DuplicationPolicy(mode, d, num_ranks, m.num_layers, m.num_experts, m.top_k, T, gain)
    background = d.copy_policy == "async" and policy.due_ever()
    switches = recorded_switches(trace, steps) if background else {}
    placement = policy.initial()
    out: list[Placement] = []
    moves: list[ReplayedMove] = []
    for s in range(trace.num_steps):
        routing = trace.step(s)
        if policy.pending is not None and switches.get(s) == moves[-1].start:
            placement = policy.landed()
            moves[-1].switch = s
        policy.before(s, routing.token_id, routing.seq, routing.pos)
        if policy.wants_plan(s):
            new, _ = policy.plan(s)
            if new is not None:
                later = background and moves_weights(placement, new)
                policy.adopt(new, later)
                if later:
                    moves.append(ReplayedMove(s, None, new))
                else:
                    placement = new
        out.append(placement)
        policy.observe(routing)
    return Replay(out, moves)


def recorded_switches(trace: TokensTrace, steps=None) -> dict[int, int]:
    """step -> the step whose plan came into force at it, for the placements an async run switched
    in later than planned (from steps.csv: rank 0's ``switched`` and ``planned_at``)."""
    import pandas as pd

    if steps is None:
        prov = trace.meta.provenance or {}
        folder, name = prov.get("run_dir"), ((prov.get("config") or {}).get("output") or {}).get("steps")
        path = Path(folder) / name if folder and name else None
        if path is None or not path.exists():
            raise UserError("an async run's placements switch in when their weights have landed; replaying it "
                            f"needs the run's steps.csv ({path or 'the trace names no run folder'})")
        steps = pd.read_csv(path)
    if "switched" not in steps.columns:
        raise UserError("the run's steps.csv has no 'switched' column (written by a runtime without copy_policy "
                        "async); rerun it")
    r0 = steps[(steps["rank"] == 0) & (steps["switched"] == 1) & (steps["planned_at"] != steps["step"])]
    return {int(a): int(b) for a, b in zip(r0["step"], r0["planned_at"])}


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
        end = load_placement(final)
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
            from sim.work import StepPlan, install_time, moves_weights, weight_copies

            class ReplayStrategy(Strategy):
                """Returns, for each step, the placement a real run had (no predictor time: the runtime
                predicts and plans on rank 0 between steps, outside the MoE layers). Every new placement
                costs the host time of applying it. Under copy policy critical its copies wait on the
                critical path, as the runtime applies a placement between steps; under async a move's
                copies start as a background job at the step the run started it (``moves``), and the
                placement switches in at the step the run switched it in, installing its weights
                (:func:`sim.work.install_time`)."""

                def __init__(self, cfg, ctx, seed, placements, moves=()):
                    super().__init__(cfg, ctx, seed)
                    self.placements = placements
                    self.starts = {m.start: m for m in moves}
                    self.landed = {m.switch for m in moves if m.switch is not None}
                    self.in_flight = None                    # the copies of the move in the background

                def _copies(self, prev, p, background_share):
                    L = self.ctx.model.num_layers
                    copies = weight_copies(prev, p, self.ctx.model.expert_bytes, self.hw, background_share)
                    return copies, np.bincount(copies.layer, weights=copies.bytes, minlength=L)

                def step(self, i, loads, job_pending):
                    s = loads.step
                    p = self.placements[s]
                    prev, self.current = self.current, p
                    L = loads.counts.shape[0]
                    plan = StepPlan(p, np.zeros(self.num_gpus))
                    background, nbytes, started = None, np.zeros(L), False
                    if prev is not None and s in self.starts:
                        moves, nbytes = self._copies(p, self.starts[s].placement, self.ctx.background_share)
                        self.in_flight = moves               # installed where its placement switches in
                        background = moves.between_gpus()    # the transfers; the copies between slots: the install
                        started = True
                        self.replans += 1
                    if prev is None or p is prev:
                        return StepDecision(plan, None, background, nbytes, 0.0, started)
                    if s in self.landed:          # its weights were copied in the background: install them
                        host = install_time(self.in_flight, self.num_gpus, self.hw)
                        return StepDecision(plan, None, background, nbytes, host, started)
                    copies, moved_bytes = self._copies(prev, p, None)
                    moved = moves_weights(prev, p)
                    self.replans += int(moved)
                    return StepDecision(plan, copies, background, nbytes + moved_bytes, self.hw.replan_overhead,
                                        moved or started)

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
                          redundant_slots=d.num_redundant, replan_interval=d.replan_interval,
                          window=d.window if d.window is not None else (None if kind == "static" else 1),
                          min_gain=d.min_gain,
                          direct_routing=False if kind == "token" else None)


def simulate_run(trace: TokensTrace, run_cfg, mode: str, cluster: ClusterConfig, replay: Replay,
                 first_step: int, trace_name: str = "trace"):
    """Simulate steps ``first_step - 1 ..`` of a run's trace with its replayed placements (and, under
    copy policy async, its background moves: :func:`replay_run`) -> StrategyResult.

    The step before ``first_step`` is simulated too (and dropped by the caller) so that the
    weight copies into ``first_step`` are charged from the placement that preceded it.
    """
    from sim.run import simulate

    policy = run_cfg.duplication.copy_policy
    cfg = SimulateConfig(cluster=cluster, model=model_for_run(run_cfg), workload=workload_for_run(run_cfg),
                         strategies=[strategy_config(mode, run_cfg, cluster.num_gpus)], seed=0,
                         train_steps=max(1, first_step - 1), trace=trace_name, copy_policy=policy,
                         copy_bandwidth_share=COPY_BANDWIDTH_SHARE)
    cls = _Replay.get()

    def factory(scfg, ctx, seed):
        return cls(scfg, ctx, seed, replay.placements, replay.moves)

    result = simulate(trace, cfg, progress=False, trace_name=trace_name, strategy_factory=factory)
    return result, result.strategies[0]
