"""The cost model behind ``duplication.min_gain``: the simulator's hysteresis rule on a cluster file.

A check whose plan moves weights re-plans only when the time the plan is predicted to save
over the next ``replan_interval`` steps exceeds ``min_gain`` x the predicted cost of the
move. Both sides come from the simulator's closed-form cost model
(:func:`sim.strategies.saving_per_step`, :func:`sim.strategies.passes_min_gain`,
:func:`sim.planning.copy_cost`) on ``duplication.cluster`` (a cluster YAML, e.g. from
``moe-gps calibrate``) and the runtime's random model (:func:`moe_gps.fidelity.model.model_for_run`):
the same arithmetic as the simulator's ``min_gain``, so a replay of the run on the same
files reaches the same decisions. numpy only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moe_gps.config.schema import COPY_BANDWIDTH_SHARE
from moe_gps.errors import UserError
from moe_gps.placement import Placement


class GainModel:
    """Predicted saving and move cost of a candidate placement on one cluster, for one run."""

    def __init__(self, run_cfg, num_ranks: int) -> None:
        from moe_gps.config.loader import load_cluster
        from moe_gps.fidelity.model import model_for_run, tokens_per_rank, workload_for_run
        from sim.cost import Hardware
        from sim.work import background_share

        d = run_cfg.duplication
        if not d.cluster:
            raise UserError(f"{run_cfg.source}: duplication.min_gain={d.min_gain:g} needs duplication.cluster "
                            "(a cluster file, e.g. from moe-gps calibrate)")
        cluster = load_cluster(d.cluster)
        if cluster.num_gpus != num_ranks:
            raise UserError(f"duplication.cluster: {d.cluster}: the cluster has {cluster.num_gpus} GPUs, this run "
                            f"{num_ranks} ranks; duplication.cluster must describe the ranks of the run")
        self.model = model_for_run(run_cfg)
        self.workload = workload_for_run(run_cfg)
        hw = Hardware.from_config(cluster, self.model)
        # the runtime's experts read their weights once per layer; predictors run on the host between steps
        self.hw = dataclasses.replace(hw, weight_reads=True, predictor_overlap=True)
        self.policy = d.copy_policy
        self.background_share = background_share(self.policy, COPY_BANDWIDTH_SHARE)
        self.home_tokens = np.full(num_ranks, float(tokens_per_rank(run_cfg)))            # [G]
        self.home_frac = self.home_tokens / self.home_tokens.sum()                        # [G]
        self.min_gain, self.interval = d.min_gain, d.replan_interval

    def price(self, current: Placement, cand: Placement, believed: np.ndarray) -> float:
        """Seconds the move from ``current`` to ``cand`` is predicted to cost (its copies under the copy
        policy, plus the host time of applying a placement); believed [L, E]: the step's believed loads."""
        from sim.planning import copy_cost
        from sim.work import placement_phases, weight_copies

        src = believed[:, None, :] * self.home_frac[None, :, None]                        # [L, G, E]
        phases = placement_phases(current, src, None, self.model, self.hw, self.home_frac)
        cost = copy_cost(self.policy, COPY_BANDWIDTH_SHARE, phases, self.home_tokens, np.zeros(len(self.home_tokens)),
                         self.model, self.workload, self.hw)
        moves = weight_copies(current, cand, self.model.expert_bytes, self.hw, self.background_share)
        return float(cost.replan(moves))

    def worth(self, current: Placement, earlier: Placement, cand: Placement, seen: np.ndarray,
              believed: np.ndarray) -> bool:
        """The simulator's ``min_gain`` rule: ``earlier`` (a plan made from the first half of the recent
        steps' beliefs) against ``current`` on the true loads of the second half, ``seen`` [K, L, E]
        (shares x the plan's tokens per layer); the move priced for ``cand``."""
        from sim.strategies import passes_min_gain, saving_per_step

        per_step = saving_per_step(current, earlier, seen, self.home_frac, self.model, self.hw, False)
        return passes_min_gain(per_step, self.interval, self.min_gain, self.price(current, cand, believed))


def gain_model_for(run_cfg, mode: str, num_ranks: int) -> GainModel | None:
    """The cost model a run of ``mode`` on ``num_ranks`` ranks needs: a :class:`GainModel` when
    ``duplication.min_gain`` > 0 and the mode plans, else None (a bad cluster file is a UserError)."""
    if run_cfg.duplication.min_gain > 0 and mode != "off":
        return GainModel(run_cfg, num_ranks)
    return None
