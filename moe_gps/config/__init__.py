"""Configs for the simulator: cluster, model, workload and strategy, from YAML or presets.

>>> from moe_gps.config import load_cluster, load_model, preset_names
>>> load_cluster("4xA100-nvlink").intra_node.bandwidth_gb_s
300.0
>>> preset_names("models")
['deepseek-v3', 'mixtral-8x7b', 'qwen3-30b-a3b']

Fields, units and preset sources: docs/configs.md.
"""

from moe_gps.config.loader import (
    MemoryUse, build, check_combination, check_model_matches_trace, dump_yaml, infer_model, load_cluster,
    load_model, load_simulate_config, load_workload, memory_use, parse_yaml, preset_names, read_yaml,
    strategy_from_name, to_dict,
)
from moe_gps.config.schema import (
    STRATEGY_KINDS, AttentionSpec, ClusterConfig, GPUSpec, LinkSpec, ModelConfig, SimulateConfig,
    StrategyConfig, WorkloadConfig,
)

__all__ = [
    "AttentionSpec", "ClusterConfig", "GPUSpec", "LinkSpec", "MemoryUse", "ModelConfig", "STRATEGY_KINDS",
    "SimulateConfig", "StrategyConfig", "WorkloadConfig", "build", "check_combination",
    "check_model_matches_trace", "dump_yaml", "infer_model", "load_cluster", "load_model",
    "load_simulate_config", "load_workload", "memory_use", "parse_yaml", "preset_names", "read_yaml",
    "strategy_from_name", "to_dict",
]
