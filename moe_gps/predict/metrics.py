"""Metrics of predictions against the true routing (definitions: docs/predictors.md).

Distribution metrics, per (step, layer), from predicted shares p_hat and true shares p
(true counts normalised), E experts:

* ``eps_mean`` = mean_e |p_hat_e - p_e| / (1/E)     (the MoE-GPS paper's error ε)
* ``eps_max``  = max_e  |p_hat_e - p_e| / (1/E)
* ``jsd``      = Jensen-Shannon divergence in bits, in [0, 1]
* ``balancedness`` = mean GPU load / max GPU load when replicas are planned from p_hat
  (placement planner) and the step's true tokens are routed through that plan.
* ``balancedness_vllm`` (per step, over all layers) = sum_l mean GPU load / sum_l max GPU
  load of the same plan: the formula vLLM's EPLB logs.

Token metrics, per (token, layer), from predicted experts P (k, best first) and true
experts T (k, highest gate weight first):

* ``top1``   = [P_0 == T_0]                 (top-1 hit)
* ``recall`` = |P ∩ T| / k                   (top-k recall)
* ``exact``  = [P == T as sets]             (exact-set accuracy)
"""

from __future__ import annotations

import numpy as np

from moe_gps.predict.base import shares
from moe_gps.predict.tables import chunks
from moe_gps.trace.data import expert_counts
from moe_gps.trace.stats import js_divergence


def distribution_errors(pred: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """pred float [S, L, E] (rows sum to 1), counts int [S, L, E] -> {metric: float [S, L]}."""
    p = shares(counts)
    q = np.asarray(pred, dtype=np.float64)
    E = p.shape[-1]
    diff = np.abs(q - p) * E
    return {"eps_mean": diff.mean(axis=-1), "eps_max": diff.max(axis=-1), "jsd": js_divergence(p, q)}


def planned_gpu_loads(pred: np.ndarray, counts: np.ndarray, num_gpus: int, num_redundant: int,
                      algorithm: str = "eplb") -> np.ndarray:
    """GPU loads of the true tokens under a plan made from the prediction.

    pred: float [S, L, E] predicted shares; counts: int [S, L, E] true counts -> float [S, L, GPUs].
    Every (step, layer) gets its own plan from ``pred * (assignments of that step)`` (the
    step's token count is known before routing); all are planned in one call.
    """
    from moe_gps.placement import plan_placement

    S, L, E = counts.shape
    total = counts.sum(axis=-1, keepdims=True).astype(np.float64)
    loads = (np.asarray(pred, dtype=np.float64) * total).reshape(S * L, E)
    plan = plan_placement(loads, num_gpus, num_redundant, algorithm=algorithm)
    return plan.gpu_loads(counts.reshape(S * L, E)).reshape(S, L, num_gpus)


def planned_balancedness(pred: np.ndarray, counts: np.ndarray, num_gpus: int, num_redundant: int,
                         algorithm: str = "eplb") -> np.ndarray:
    """Balancedness left after planning from the prediction and routing the true tokens:
    float [S, L] (see :func:`planned_gpu_loads`)."""
    from moe_gps.placement import balancedness

    return balancedness(planned_gpu_loads(pred, counts, num_gpus, num_redundant, algorithm))


def static_gpu_loads(counts: np.ndarray, num_gpus: int, num_redundant: int) -> np.ndarray:
    """GPU loads with no duplication (the planner's ``none``: contiguous experts, spare
    slots unused), routing the true tokens: counts [S, L, E] -> float [S, L, GPUs]."""
    E = counts.shape[-1]
    return planned_gpu_loads(np.full(counts.shape, 1.0 / E), counts, num_gpus, num_redundant, "none")


def static_balancedness(counts: np.ndarray, num_gpus: int, num_redundant: int) -> np.ndarray:
    """Balancedness with no duplication: counts [S, L, E] -> float [S, L]."""
    from moe_gps.placement import balancedness

    return balancedness(static_gpu_loads(counts, num_gpus, num_redundant))


def token_hits(pred: np.ndarray, true: np.ndarray) -> dict[str, np.ndarray]:
    """pred, true int [N, L, k] -> {"top1", "recall", "exact": float [N, L]}."""
    if pred.shape != true.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the routing's {true.shape}")
    n, L, k = true.shape
    top1 = np.empty((n, L), dtype=np.float32)
    hits = np.empty((n, L), dtype=np.int16)
    for sl in chunks(n, L * k * k):
        p, t = pred[sl], true[sl]
        top1[sl] = p[..., 0] == t[..., 0]
        hits[sl] = (p[..., :, None] == t[..., None, :]).any(axis=-1).sum(axis=-1)
    return {"top1": top1, "recall": hits.astype(np.float32) / k, "exact": (hits == k).astype(np.float32)}


def predicted_counts(pred: np.ndarray, step_offsets: np.ndarray, num_experts: int) -> np.ndarray:
    """Loads implied by token predictions: int [N, L, k] -> int64 [steps, L, E]."""
    return expert_counts(pred, step_offsets, num_experts)
