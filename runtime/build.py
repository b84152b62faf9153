"""Build the model a run executes: the random Mixtral-style stack or a local HF checkpoint.

Both give a :class:`ModelHandle`: the module (``input_ids [B, S] -> hidden``), its MoE
blocks in layer order (each with an ``experts`` :class:`ExpertParallelMoE` and the
``record``/``last_experts``/``last_weights`` routing record), and how to load one
expert's weights for :func:`runtime.model.install_slots`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from moe_gps.placement import Placement
from runtime.config import ModelSection
from runtime.dist import DistContext
from runtime.model import TORCH_DTYPES, MixtralStyleModel, install_slots


@dataclass
class ModelHandle:
    module: nn.Module
    blocks: list
    num_experts: int
    top_k: int
    vocab_size: int
    name: str
    weight_fn: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
    attention_seconds: Callable[[], list[float]] | None = None
    finish_install: Callable[[], None] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def experts(self) -> list:
        return [b.experts for b in self.blocks]

    def install(self, placement: Placement, ctx: DistContext) -> None:
        """Load this rank's slots of ``placement`` (from the seed or the checkpoint)."""
        install_slots(self.experts, placement.phy2log, placement.replica_share, self.weight_fn, ctx)
        if self.finish_install is not None:
            self.finish_install()
            self.finish_install = None

    def set_record(self, on: bool) -> None:
        for b in self.blocks:
            b.record = on

    def routing(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's routing of the last forward: experts int16 [T, L, k], weights float32 [T, L, k]."""
        return (np.stack([b.last_experts for b in self.blocks], axis=1),
                np.stack([b.last_weights for b in self.blocks], axis=1))


def build_model(cfg: ModelSection, ctx: DistContext) -> ModelHandle:
    if cfg.checkpoint:
        return _build_hf(cfg, ctx)
    model = MixtralStyleModel(cfg, ctx).eval()
    name = (f"random Mixtral-style (layers={cfg.num_layers}, hidden={cfg.hidden_size}, "
            f"intermediate={cfg.intermediate_size}, experts={cfg.num_experts}, top_k={cfg.top_k}, "
            f"router_bias_std={cfg.router_bias_std}, seed={cfg.seed})")
    return ModelHandle(model, model.moe_blocks, cfg.num_experts, cfg.top_k, cfg.vocab_size, name,
                       model.expert_weights, model.attention_seconds)


def _build_hf(cfg: ModelSection, ctx: DistContext) -> ModelHandle:
    from runtime.hf import load_hf_model, moe_settings, wrap_moe_blocks

    model = load_hf_model(cfg.checkpoint, TORCH_DTYPES[cfg.dtype])
    E, k, _ = moe_settings(model.config)
    blocks = wrap_moe_blocks(model, ctx)
    vocab = int(model.config.get_text_config().vocab_size)

    def finish() -> None:
        for b in blocks:
            b.drop_source()
        model.to(ctx.device)

    return ModelHandle(model, blocks, E, k, vocab, model.moe_gps_source,
                       lambda l, e: blocks[l].expert_weights(e), None, finish)


def forward(handle: ModelHandle, input_ids: torch.Tensor) -> torch.Tensor:
    """Run the model; HF models return their last hidden state."""
    with torch.inference_mode():
        if isinstance(handle.module, MixtralStyleModel):
            return handle.module(input_ids)
        out = handle.module.model(input_ids=input_ids, use_cache=False)
        return out.last_hidden_state
