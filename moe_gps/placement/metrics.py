"""How good a placement is, and what it costs. Formulas (also in docs/placement.md):

For layer ``l`` with expert loads ``w[e]`` (tokens), GPU loads ``G[g]`` = sum over the
slots of GPU ``g`` of ``w[phy2log[s]] * replica_share[s]``:

* ``balancedness``      = mean_g G[g] / max_g G[g]            (1.0 is perfect); the summary
  averages it over layers
* ``balancedness_vllm`` = sum_l mean_g G[l, g] / sum_l max_g G[l, g], one number for all
  layers: the formula vLLM's EPLB logs (heavy layers weigh more)
* ``gpu_skewness``      = max_g G[g] / mean_g G[g]  = 1 / balancedness
* ``skewness_before``   = max_e w[e] / mean_e w[e]               (the paper's skewness)
* ``replica_skewness``  = max / mean of the slot loads over the replicas that take tokens
* ``replicas_used``     = slots with share > 0;  ``redundant_used`` = replicas_used - E
* ``extra_slots_per_gpu`` = slots_per_gpu - E / N (memory beyond a no-duplication layout)
* ``extra_memory_per_gpu`` = extra_slots_per_gpu x layers x expert_bytes
* ``experts_moved``     = number of (layer, GPU, expert) with the expert on the GPU in the
  new plan but not in the previous one (each needs the expert's weights sent to that GPU;
  reordering slots within a GPU is a local copy and is not counted)
* ``bytes_moved``       = experts_moved x expert_bytes

Per-layer values are arrays [layers]; :meth:`PlacementMetrics.summary` averages them
(sums for counts of moves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_gps.placement.placement import Placement, balancedness, vllm_balancedness
from moe_gps.trace.stats import skewness


@dataclass
class PlacementMetrics:
    """Per-layer metrics of a placement under given loads (arrays are [layers])."""

    balancedness: np.ndarray
    gpu_skewness: np.ndarray
    skewness_before: np.ndarray
    replica_skewness: np.ndarray
    replicas_used: np.ndarray
    redundant_used: np.ndarray
    slots_per_gpu: int
    extra_slots_per_gpu: float
    extra_memory_per_gpu: float | None
    experts_moved: np.ndarray | None
    bytes_moved: float | None
    max_gpu_tokens: np.ndarray
    balancedness_vllm: float = 1.0

    def summary(self) -> dict[str, Any]:
        """One number per metric (mean over layers; moves summed)."""
        out = {
            "balancedness": float(self.balancedness.mean()),
            "balancedness_min": float(self.balancedness.min()),
            "balancedness_vllm": float(self.balancedness_vllm),
            "gpu_skewness": float(self.gpu_skewness.mean()),
            "skewness_before": float(self.skewness_before.mean()),
            "replica_skewness": float(self.replica_skewness.mean()),
            "replicas_used": float(self.replicas_used.mean()),
            "redundant_used": float(self.redundant_used.mean()),
            "slots_per_gpu": self.slots_per_gpu,
            "extra_slots_per_gpu": self.extra_slots_per_gpu,
            "extra_memory_per_gpu": self.extra_memory_per_gpu,
            "experts_moved": None if self.experts_moved is None else int(self.experts_moved.sum()),
            "bytes_moved": self.bytes_moved,
        }
        return out


def bytes_moved(new: Placement, old: Placement, expert_bytes: float | None = None) -> tuple[np.ndarray, float | None]:
    """Experts that must arrive on a GPU that did not hold them: (int64 [layers], bytes or None)."""
    if (new.num_layers, new.num_experts, new.num_gpus) != (old.num_layers, old.num_experts, old.num_gpus):
        from moe_gps.errors import UserError
        raise UserError("bytes moved: the two placements differ in layers, experts or GPUs")
    arrive = (new.experts_on_gpu() > 0) & (old.experts_on_gpu() == 0)
    per_layer = arrive.sum(axis=(1, 2))
    return per_layer, None if expert_bytes is None else float(per_layer.sum() * expert_bytes)


def placement_metrics(p: Placement, loads: np.ndarray, previous: Placement | None = None,
                      expert_bytes: float | None = None) -> PlacementMetrics:
    """Metrics of ``p`` under ``loads`` [layers, experts] (see the module docstring)."""
    loads = np.asarray(loads, dtype=np.float64)
    if expert_bytes is None:
        expert_bytes = p.capacity.expert_bytes
    slot = p.slot_loads(loads)
    gpu = slot.reshape(p.num_layers, p.num_gpus, p.slots_per_gpu).sum(axis=2)
    bal = balancedness(gpu)
    skew_before = np.nan_to_num(skewness(loads), nan=1.0)  # a layer with no load counts as even
    active = p.replica_share > 0
    n_active = active.sum(axis=1)
    mean_slot = np.where(active, slot, 0.0).sum(axis=1) / n_active
    max_slot = np.where(active, slot, -np.inf).max(axis=1)
    rep_skew = np.where(mean_slot > 0, max_slot / np.where(mean_slot > 0, mean_slot, 1.0), 1.0)
    extra_slots = p.slots_per_gpu - p.num_experts / p.num_gpus
    moved, moved_bytes = (None, None) if previous is None else bytes_moved(p, previous, expert_bytes)
    return PlacementMetrics(
        balancedness=bal,
        gpu_skewness=np.where(bal > 0, 1.0 / np.where(bal > 0, bal, 1.0), np.inf),
        skewness_before=skew_before,
        replica_skewness=rep_skew,
        replicas_used=n_active,
        redundant_used=n_active - p.num_experts,
        slots_per_gpu=p.slots_per_gpu,
        extra_slots_per_gpu=float(extra_slots),
        extra_memory_per_gpu=None if expert_bytes is None else float(extra_slots * p.num_layers * expert_bytes),
        experts_moved=moved,
        bytes_moved=moved_bytes,
        max_gpu_tokens=gpu.max(axis=1),
        balancedness_vllm=float(vllm_balancedness(gpu)),
    )
