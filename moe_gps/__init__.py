"""MoE-GPS: expert load balancing for Mixture-of-Experts inference.

Core library: router traces (:mod:`moe_gps.trace`), predictors, placement planning,
configs and reports. The simulator lives in :mod:`sim`, the torch.distributed runtime
in :mod:`runtime`.
"""

__version__ = "0.1.0"
