"""A Mixtral-style decoder stack with random weights, expert-parallel MoE blocks.

Per layer: RMSNorm -> causal multi-head attention with rotary embeddings -> residual ->
RMSNorm -> sparse MoE block (linear router, softmax top-k, renormalised, SwiGLU
experts in physical slots on the ranks) -> residual. Attention, norms, router and
embedding are replicated on every rank (each rank runs its own sequences: data
parallel attention, expert parallel MoE); the experts live only in their slots.

Every weight is seeded: non-expert weights from ``seed`` (identical on every rank,
built on the CPU and then moved), and each expert from ``(seed, layer, expert)``, so a
rank generates only the experts its slots hold and replicas are bit-identical.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.config import ModelSection
from runtime.dist import DistContext
from runtime.moe_layer import ExpertParallelMoE, MoEBlock

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary(x: torch.Tensor, base: float = 1e6) -> torch.Tensor:
    """Rotary position embedding on x [B, heads, S, D] (positions 0 .. S-1)."""
    B, nh, S, D = x.shape
    inv = 1.0 / (base ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D))
    ang = torch.arange(S, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False, dtype=dtype)
        self.o = nn.Linear(hidden, hidden, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, H = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(rotary(q), rotary(k), v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(B, S, H))


class DecoderLayer(nn.Module):
    def __init__(self, layer: int, cfg: ModelSection, ctx: DistContext, dtype: torch.dtype) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, dtype=dtype)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, dtype)
        self.moe_norm = RMSNorm(cfg.hidden_size, dtype=dtype)
        self.moe = MoEBlock(layer, cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.top_k,
                            DistContext(), dtype)   # built on the CPU; re-bound to ``ctx`` by the model
        self.attention_s = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t0 = self.moe.experts._now()
        x = x + self.attn(self.attn_norm(x))
        self.attention_s = self.moe.experts._now() - t0
        return x + self.moe(self.moe_norm(x))


class MixtralStyleModel(nn.Module):
    """Embedding, ``num_layers`` decoder layers with MoE blocks, final norm.

    forward: input_ids long [B, S] -> hidden [B, S, H]. ``moe_blocks`` lists the MoE
    blocks in layer order; :meth:`expert_weights` gives the seeded weights of one expert.
    """

    def __init__(self, cfg: ModelSection, ctx: DistContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype = TORCH_DTYPES[cfg.dtype]
        torch.manual_seed(cfg.seed)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype)
        self.layers = nn.ModuleList(DecoderLayer(l, cfg, ctx, self.dtype) for l in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, dtype=self.dtype)
        rng = np.random.default_rng([cfg.seed, 7])
        for layer in self.layers:
            bias = rng.normal(0.0, cfg.router_bias_std, cfg.num_experts) if cfg.router_bias_std > 0 \
                else np.zeros(cfg.num_experts)
            layer.moe.router_bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
        self.to(ctx.device)
        for layer in self.layers:
            layer.moe.experts.ctx = ctx
            layer.moe.experts.sync_timing = ctx.device.type == "cuda"
            layer.moe.experts.slot_weights = layer.moe.experts.slot_weights.to(ctx.device)

    @property
    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.moe for layer in self.layers]

    def attention_seconds(self) -> list[float]:
        return [layer.attention_s for layer in self.layers]

    def expert_weights(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded weights of one expert: (gate_up [2I, H], down [H, I]), on the CPU."""
        H, I = self.cfg.hidden_size, self.cfg.intermediate_size
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.cfg.seed, layer, expert])
                                              .generate_state(1)[0]))
        gate_up = (torch.rand(2 * I, H, generator=g) * 2 - 1) / math.sqrt(H)
        down = (torch.rand(H, I, generator=g) * 2 - 1) / math.sqrt(I)
        return gate_up.to(self.dtype), down.to(self.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def install_slots(experts: list[ExpertParallelMoE], phy2log: np.ndarray, share: np.ndarray,
                  weight_fn: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]], ctx: DistContext) -> None:
    """Fill this rank's slots of every layer from ``weight_fn(layer, expert)`` and set the tables.

    phy2log, share: [L, P]. Each expert is generated/loaded once per rank, however many
    of the rank's slots hold it.
    """
    from runtime.routing import layer_tables

    P = phy2log.shape[1]
    S = P // ctx.world_size
    for l, ep in enumerate(experts):
        mine = phy2log[l, ctx.rank * S:(ctx.rank + 1) * S]
        rows = {}
        for e in np.unique(mine).tolist():
            gate_up, down = weight_fn(l, int(e))
            rows[e] = ep.pack_expert(gate_up, down)
        buf = torch.stack([rows[int(e)] for e in mine]) if S else torch.empty(0, ep.expert_numel)
        ep.set_slots(layer_tables(phy2log[l], share[l], ep.num_experts, S, ctx.device), buf)

