"""The simulator's description of what the runtime runs: model and workload from a run config.

No torch: :mod:`runtime.config` is numpy/YAML only. The runtime's random model is a
Mixtral-style stack (docs/runtime.md): per layer, multi-head attention with
``hidden_size / num_heads`` dimensional heads (no GQA: ``num_kv_heads = num_heads``, so
``attention_params = 4 hidden^2``, the ``qkv`` and ``o`` projections), a linear router and
SwiGLU experts (``expert_matrices = 3``); weights and hidden states in ``model.dtype``.
One step is a prefill of ``batch_size`` sequences of ``seq_len`` tokens per rank.
"""

from __future__ import annotations

from moe_gps.config.schema import AttentionSpec, ModelConfig, WorkloadConfig
from moe_gps.errors import UserError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

#: runtime ``--duplication`` mode -> (simulator strategy kind, label used in tables)
MODE_KINDS = {"off": "none", "static": "static", "dist-only": "distribution", "token-to-expert": "token"}


def model_for_run(run_cfg, where: str | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of the runtime's random Mixtral-style model (``run_cfg.model``)."""
    m = run_cfg.model
    if m.checkpoint:
        raise UserError(f"{where or run_cfg.source}: model.checkpoint is set; fidelity runs need the runtime's "
                        "random Mixtral-style model (set model.checkpoint: null), whose sizes the simulator knows")
    size = DTYPE_BYTES[m.dtype]
    return ModelConfig(
        name="runtime-random-mixtral-style", num_layers=m.num_layers, num_experts=m.num_experts, top_k=m.top_k,
        hidden_size=m.hidden_size, moe_intermediate_size=m.intermediate_size,
        attention=AttentionSpec(num_heads=m.num_heads, num_kv_heads=m.num_heads,
                                head_dim=m.hidden_size // m.num_heads),
        expert_matrices=3, weight_bytes=size, activation_bytes=size, compute_dtype="bf16",
        aliases=["random-mixtral-style"],
        source=f"the runtime's random model of {run_cfg.source} (model.dtype {m.dtype}: {size} bytes per weight "
               "and per activation; the cluster's peak is the measured rate in that dtype)")


def workload_for_run(run_cfg) -> WorkloadConfig:
    """Prefill of ``input.seq_len``-token sequences; the loads come from the recorded trace."""
    return WorkloadConfig(phase="prefill", seq_len=run_cfg.input.seq_len)


def tokens_per_rank(run_cfg) -> int:
    return run_cfg.input.batch_size * run_cfg.input.seq_len
