"""``plan_placement``: one entry point for every algorithm.

>>> p = plan_placement(loads, num_gpus=8, num_redundant=8, algorithm="eplb")
>>> balancedness(p.gpu_loads(loads)).mean()
"""

from __future__ import annotations

import functools
import inspect
import time
from typing import Any, Callable

import numpy as np

from moe_gps.errors import UserError
from moe_gps.options import check_options
from moe_gps.placement.eplb import eplb
from moe_gps.placement.greedy import copy_hot_to_cold
from moe_gps.placement.layouts import STATIC_LAYOUTS, contiguous, fill_spares, round_robin, shares_from_tokens
from moe_gps.placement.placement import Capacity, Placement
from moe_gps.placement.timeaware import timeaware
from moe_gps.placement.waterfill import waterfill


def _plan_none(loads: np.ndarray, N: int, S: int, previous: Placement | None,
               layout: str = "linear") -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Static baseline, no duplication: vLLM's ``linear`` layout (E/N contiguous experts per
    GPU) or its ``round_robin`` one (expert e on GPU e % N); leftover slots hold spares (share 0)."""
    if layout not in STATIC_LAYOUTS:
        raise UserError(f"none: layout must be one of {', '.join(STATIC_LAYOUTS)}, got {layout!r}")
    L, E = loads.shape
    slot_exp = (contiguous if layout == "linear" else round_robin)(L, E, N, S)
    spare = slot_exp < 0
    phy2log = fill_spares(slot_exp, loads, N)
    info = {"layout": layout}
    if not spare.any():
        return phy2log, None, info
    return phy2log, np.where(spare, 0.0, 1.0), {**info, "spares": int(spare.sum(axis=1).max())}


def _plan_greedy(loads: np.ndarray, N: int, S: int, previous: Placement | None, threshold: float = 0.05,
                 max_copies: int | None = None, max_iters: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """MoE-GPS paper, Algorithm 1: copy the hottest GPU's most popular expert to the coldest GPU,
    moving half the gap, until the gap is within ``threshold`` x mean GPU load."""
    L, E = loads.shape
    R = N * S - E
    max_copies = R if max_copies is None else int(max_copies)
    if max_copies < 0:
        raise UserError(f"greedy: max_copies must be >= 0, got {max_copies}")
    if threshold < 0:
        raise UserError(f"greedy: threshold must be >= 0, got {threshold}")
    slot_exp, tokens, copies = copy_hot_to_cold(contiguous(L, E, N, S), loads, N, max_copies, threshold,
                                                pick="most_popular", max_iters=max_iters)
    phy2log = fill_spares(slot_exp, loads, N)
    share = shares_from_tokens(phy2log, tokens, E)
    return phy2log, share, {"threshold": threshold, "max_copies": max_copies,
                            "copies_made": int(copies.max()) if L else 0}


def _plan_eplb(loads: np.ndarray, N: int, S: int, previous: Placement | None, num_nodes: int = 1,
               num_groups: int = 1) -> tuple[np.ndarray, None, dict]:
    """DeepSeek EPLB (global, or hierarchical with nodes and expert groups); even shares."""
    phy2log, variant = eplb(loads, N * S, N, int(num_nodes), int(num_groups))
    return phy2log, None, {"variant": variant, "num_nodes": int(num_nodes), "num_groups": int(num_groups)}


PLANNERS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray | None, dict]]] = {
    "none": _plan_none,
    "greedy": _plan_greedy,
    "eplb": _plan_eplb,
    "waterfill": waterfill,
    "timeaware": timeaware,
}
#: the planners that need nothing but loads (``timeaware`` also needs a time model: ``cost=``)
ALGORITHMS: tuple[str, ...] = tuple(name for name in PLANNERS if name != "timeaware")

# EPLB (DeepSeek) may put two replicas of one expert on one GPU; the others never do.
_COLOCATED = {"eplb": True}


@functools.cache
def _options_of(fn: Callable) -> tuple[str, ...]:
    """The options a planner takes: its parameters after loads, N, S and previous."""
    return tuple(p for p in inspect.signature(fn).parameters if p not in ("loads", "N", "S", "previous"))


def check_loads(loads: Any, where: str = "loads") -> np.ndarray:
    """float64 [layers, experts], finite and >= 0, or UserError."""
    try:
        arr = np.asarray(loads, dtype=np.float64)
    except (ValueError, TypeError) as err:
        raise UserError(f"{where}: not a numeric array ({err})") from None
    if arr.ndim != 2:
        raise UserError(f"{where}: expected a 2-D array [layers, experts], got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise UserError(f"{where}: needs at least one layer and one expert, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise UserError(f"{where}: contains NaN or infinite values")
    if (arr < 0).any():
        l, e = np.argwhere(arr < 0)[0]
        raise UserError(f"{where}: layer {l}, expert {e} has negative load {arr[l, e]}")
    return arr


def check_redundant_slots(num_experts: int, num_gpus: int, num_redundant: int, name: str, gpu: str = "GPU") -> None:
    """UserError when ``num_redundant`` (named ``name``: a flag or config key) is more than the
    ``num_experts x (num_gpus - 1)`` slots that give every expert one on each of the ``num_gpus`` (called
    ``gpu``s): a replica past that shares a GPU with another of its expert and moves no load."""
    E, N, R = num_experts, num_gpus, num_redundant
    if R > E * (N - 1):
        raise UserError(f"{name} {R}: more than the {E * (N - 1)} that give every one of the {E} experts a slot on "
                        f"each of the {N} {gpu}s; a replica past that shares a {gpu} with another replica of its "
                        f"expert, which moves no load between {gpu}s")


def plan_placement(loads: Any, num_gpus: int, num_redundant: int, algorithm: str = "eplb",
                   previous: Placement | None = None, capacity: Capacity | None = None,
                   **options: Any) -> Placement:
    """Plan where every replica lives, for all layers at once.

    loads:          [layers, experts] predicted or measured tokens per expert
    num_gpus:       GPUs in the expert-parallel group
    num_redundant:  extra slots per layer in total; ``(experts + num_redundant) % num_gpus == 0``
    algorithm:      one of :data:`PLANNERS` (``timeaware`` needs ``cost=``, a time model)
    previous:       the placement in force, for migration-aware planning and bytes moved
    capacity:       limits the plan must respect (slots and expert memory per GPU)
    options:        algorithm-specific, e.g. ``layout`` (none: ``linear`` | ``round_robin``),
                    ``num_nodes``/``num_groups`` (eplb),
                    ``threshold``/``max_copies`` (greedy), ``migration_tolerance`` (waterfill),
                    ``cost``/``copy_penalty_s`` (timeaware: the time model, see
                    :mod:`moe_gps.placement.timeaware`)
    """
    w = check_loads(loads)
    L, E = w.shape
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, (int, np.integer)) or num_gpus < 1:
        raise UserError(f"num_gpus must be a positive integer, got {num_gpus!r}")
    if isinstance(num_redundant, bool) or not isinstance(num_redundant, (int, np.integer)) or num_redundant < 0:
        raise UserError(f"num_redundant must be an integer >= 0, got {num_redundant!r}")
    N, R = int(num_gpus), int(num_redundant)
    if algorithm not in PLANNERS:
        raise UserError(f"unknown placement algorithm {algorithm!r}; choose one of {', '.join(PLANNERS)}")
    if (E + R) % N:
        up = R + (-(E + R)) % N
        raise UserError(f"{E} experts + {R} redundant = {E + R} slots per layer do not divide evenly over "
                        f"{N} GPUs; use --redundant {up} (or another value making experts + redundant a "
                        f"multiple of {N})")
    S = (E + R) // N
    capacity = capacity or Capacity()
    if capacity.max_slots_per_gpu is not None and S > capacity.max_slots_per_gpu:
        raise UserError(f"{E + R} slots over {N} GPUs is {S} slots per GPU, more than the capacity of "
                        f"{capacity.max_slots_per_gpu}; use fewer redundant slots or more GPUs")
    if previous is not None:
        if not isinstance(previous, Placement):
            raise UserError(f"previous must be a Placement, got {type(previous).__name__}")
        if (previous.num_layers, previous.num_experts, previous.num_gpus) != (L, E, N):
            raise UserError(f"previous placement is for {previous.num_layers} layers, {previous.num_experts} "
                            f"experts, {previous.num_gpus} GPUs; these loads need {L} layers, {E} experts, "
                            f"{N} GPUs")
    fn = PLANNERS[algorithm]
    accepted = _options_of(fn)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UserError(f"algorithm {algorithm!r} does not take option(s) {', '.join(unknown)}; "
                        f"it takes: {', '.join(accepted) or 'none'}")
    check_options(fn, options, f"algorithm {algorithm!r}")
    t0 = time.perf_counter()
    phy2log, share, info = fn(w, N, S, previous, **options)
    elapsed = time.perf_counter() - t0
    meta = {"options": info, "planning_seconds": round(elapsed, 6)}
    # more slots per GPU than experts: some GPU must hold an expert twice
    colocated = _COLOCATED.get(algorithm, False) or bool(info.pop("allow_colocated", False)) or S > E
    return Placement(phy2log, N, E, share, algorithm=algorithm, allow_colocated=colocated,
                     capacity=capacity, meta=meta)
