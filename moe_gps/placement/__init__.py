"""Expert placement: which logical expert each physical slot of each GPU holds.

>>> from moe_gps.placement import plan_placement, balancedness
>>> p = plan_placement(loads, num_gpus=8, num_redundant=8, algorithm="eplb")   # loads: [layers, experts]
>>> balancedness(p.gpu_loads(loads))                                          # [layers]

Algorithms (:data:`ALGORITHMS`): ``none`` (static: vLLM's ``linear`` or ``round_robin``), ``greedy`` (MoE-GPS paper,
Algorithm 1), ``eplb`` (DeepSeek, global or hierarchical) and ``waterfill`` (ours:
uneven shares, few copies, migration-aware). See docs/placement.md.
"""

from moe_gps.placement.io import load_placement, save_placement
from moe_gps.placement.metrics import PlacementMetrics, bytes_moved, placement_metrics
from moe_gps.placement.placement import Capacity, Placement, balancedness, vllm_balancedness
from moe_gps.placement.planner import ALGORITHMS, plan_placement

__all__ = ["ALGORITHMS", "Capacity", "Placement", "PlacementMetrics", "balancedness", "bytes_moved", "load_placement",
           "placement_metrics", "plan_placement", "save_placement", "vllm_balancedness"]
