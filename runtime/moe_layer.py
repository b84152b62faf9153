"""The expert-parallel MoE layer: experts in physical slots, all-to-all dispatch and combine.

A forward pass on every rank (``T`` local tokens, ``k`` experts per token, ``H`` hidden):

1. the router's top-k gives ``experts [T, k]`` and gate ``weights [T, k]``;
2. each (token, expert) pair is given a replica slot by the plan's token shares
   (:mod:`runtime.routing`);
3. ranks all-gather their per-expert pair counts ``[ranks, experts]``; every rank then
   knows its send and receive split sizes;
4. hidden states go out with ``all_to_all_single`` and uneven splits, grouped by
   destination rank and, within it, by slot;
5. each rank runs its slots' experts on contiguous row groups (SwiGLU:
   ``down(act(x W_gate^T) * (x W_up^T))``);
6. results come back with a second ``all_to_all_single`` (the splits reversed);
7. ``out[t] = sum_j weights[t, j] * y[t, j]``.

Slot weights are one flat tensor ``slot_weights [S, 2*I*H + H*I]`` per layer; the views
``w_gate_up [S, 2I, H]`` and ``w_down [S, H, I]`` use the fused layout of HuggingFace
transformers v5 (gate rows first, then up rows), so checkpoint tensors copy straight in
and a whole expert moves between ranks as one message.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from runtime.dist import DistContext, all_gather_flat
from runtime.routing import LayerTables, assign_slots, slot_counts, slot_major_order

#: phases timed per layer and forward (seconds), in this order
PHASES = ("route_s", "counts_s", "dispatch_s", "expert_s", "combine_s")


def expert_ffn(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
               act: Callable[[torch.Tensor], torch.Tensor] = F.silu) -> torch.Tensor:
    """One SwiGLU expert: x [n, H], w_gate_up [2I, H], w_down [H, I] -> [n, H]."""
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.linear(act(gate) * up, w_down)


def top_k_routing(logits: torch.Tensor, top_k: int, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: softmax over experts (float32), top-k, optionally renormalised.

    logits [T, E] -> (experts long [T, k] best first, weights float32 [T, k])
    """
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return experts, weights


def reference_moe(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w_gate_up: torch.Tensor,
                  w_down: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor] = F.silu) -> torch.Tensor:
    """The same layer in one process with every expert: the ground truth for the EP layer.

    x [T, H], experts [T, k], weights [T, k], w_gate_up [E, 2I, H], w_down [E, H, I] -> [T, H]
    """
    T, k = experts.shape
    flat = experts.reshape(-1)
    y = torch.zeros(T * k, x.shape[1], dtype=x.dtype, device=x.device)
    for e in torch.unique(flat).tolist():
        rows = torch.nonzero(flat == e).squeeze(1)
        y[rows] = expert_ffn(x[rows // k], w_gate_up[e], w_down[e], act)
    return (y.view(T, k, -1) * weights.to(x.dtype).unsqueeze(-1)).sum(dim=1)


class ExpertParallelMoE(nn.Module):
    """The experts of one MoE layer, held in this rank's physical slots.

    layer:             MoE layer index (for messages)
    num_experts:       logical experts E; hidden_size H; intermediate_size I
    ctx:               the process group (:class:`runtime.dist.DistContext`)
    act:               the expert activation (SiLU for Mixtral, Qwen and OLMoE)

    After a forward, ``stats`` holds the phase times (:data:`PHASES`, seconds), ``expert_cpu_s`` (the
    process's CPU time during the expert compute), ``pairs_local`` (T * k), ``expert_tokens`` (pairs this
    rank's experts computed) and ``slot_tokens`` int64 [S] (pairs per local slot).
    """

    def __init__(self, layer: int, num_experts: int, hidden_size: int, intermediate_size: int, ctx: DistContext,
                 act: Callable[[torch.Tensor], torch.Tensor] = F.silu, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.layer = layer
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.ctx = ctx
        self.act = act
        self.dtype = dtype
        self.tables: LayerTables | None = None
        self.register_buffer("slot_weights", torch.empty(0, self.expert_numel, dtype=dtype, device=ctx.device),
                             persistent=False)
        self.sync_timing = ctx.device.type == "cuda"
        self.stats: dict = {}

    # --------------------------------------------------------------- weights
    @property
    def expert_numel(self) -> int:
        """Elements of one expert: 2*I*H (gate and up) + H*I (down)."""
        return 3 * self.intermediate_size * self.hidden_size

    @property
    def expert_bytes(self) -> int:
        return self.expert_numel * torch.empty(0, dtype=self.dtype).element_size()

    @property
    def slots_per_gpu(self) -> int:
        return int(self.slot_weights.shape[0])

    @property
    def w_gate_up(self) -> torch.Tensor:
        """View [S, 2I, H]."""
        a = 2 * self.intermediate_size * self.hidden_size
        return self.slot_weights[:, :a].view(-1, 2 * self.intermediate_size, self.hidden_size)

    @property
    def w_down(self) -> torch.Tensor:
        """View [S, H, I]."""
        a = 2 * self.intermediate_size * self.hidden_size
        return self.slot_weights[:, a:].view(-1, self.hidden_size, self.intermediate_size)

    def pack_expert(self, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        """One expert's weights as the flat row a slot stores: [2I, H], [H, I] -> [expert_numel]."""
        return torch.cat([w_gate_up.reshape(-1), w_down.reshape(-1)]).to(self.dtype)

    def set_slots(self, tables: LayerTables, slot_weights: torch.Tensor) -> None:
        """Install this rank's slots: tables for the layer, weights [S, expert_numel]."""
        if slot_weights.shape != (tables.slots_per_gpu, self.expert_numel):
            raise ValueError(f"layer {self.layer}: slot weights have shape {tuple(slot_weights.shape)}, "
                             f"expected {(tables.slots_per_gpu, self.expert_numel)}")
        self.tables = tables
        self.slot_weights = slot_weights.to(device=self.ctx.device, dtype=self.dtype).contiguous()

    def local_slots(self) -> np.ndarray:
        """Global slot ids held by this rank: int64 [S]."""
        S = self.tables.slots_per_gpu
        return np.arange(self.ctx.rank * S, (self.ctx.rank + 1) * S)

    # --------------------------------------------------------------- forward
    def _now(self) -> float:
        if self.sync_timing:
            torch.cuda.synchronize(self.ctx.device)
        return time.perf_counter()

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                route_s: float = 0.0) -> torch.Tensor:
        """x [T, H], experts int [T, k], weights [T, k] -> [T, H]."""
        if self.tables is None:
            raise RuntimeError(f"layer {self.layer}: no placement installed (call set_slots)")
        ctx, tables = self.ctx, self.tables
        N, S, me = ctx.world_size, tables.slots_per_gpu, ctx.rank
        T, k = experts.shape
        t0 = self._now()

        # 3. every rank's per-expert pair counts
        local_counts = torch.bincount(experts.reshape(-1).long(), minlength=self.num_experts)
        if ctx.distributed:
            gathered = torch.empty(N * self.num_experts, dtype=local_counts.dtype, device=local_counts.device)
            with ctx.guard(f"all_gather of expert counts, layer {self.layer}"):
                all_gather_flat(gathered, local_counts, group=ctx.group)
            counts_all = gathered.view(N, self.num_experts).cpu().numpy()
        else:
            counts_all = local_counts.cpu().numpy()[None, :]
        C = slot_counts(tables, counts_all)                                   # [N, P]
        per_rank = C.reshape(N, N, S)                                         # [source, dest, slot]
        send_splits = per_rank[me].sum(axis=1).tolist()
        recv_blocks = per_rank[:, me, :]                                      # [source, local slot]
        recv_splits = recv_blocks.sum(axis=1).tolist()
        t1 = self._now()

        # 2./4. replica per pair, rows grouped by destination and slot, then dispatch
        slot = assign_slots(experts, tables, counts_all, me)
        send_order = torch.argsort(slot, stable=True)
        send_x = x[send_order // k]
        if ctx.distributed:
            recv_x = x.new_empty(sum(recv_splits), x.shape[1])
            with ctx.guard(f"all_to_all_single dispatch, layer {self.layer}"):
                dist.all_to_all_single(recv_x, send_x, recv_splits, send_splits, group=ctx.group)
        else:
            recv_x = send_x
        t2 = self._now()

        # 5. grouped expert compute
        c2 = time.process_time()
        index, per_slot = slot_major_order(recv_blocks)
        index_t = torch.as_tensor(index, device=x.device)
        xs = recv_x[index_t]
        ys = torch.empty_like(xs)
        w_gu, w_d = self.w_gate_up, self.w_down
        bounds = np.concatenate([[0], np.cumsum(per_slot)])
        for q in range(S):
            a, b = int(bounds[q]), int(bounds[q + 1])
            if b > a:
                ys[a:b] = expert_ffn(xs[a:b], w_gu[q], w_d[q], self.act)
        y_recv = torch.empty_like(ys)
        y_recv[index_t] = ys
        t3 = self._now()
        c3 = time.process_time()

        # 6. combine
        if ctx.distributed:
            back = x.new_empty(send_x.shape[0], x.shape[1])
            with ctx.guard(f"all_to_all_single combine, layer {self.layer}"):
                dist.all_to_all_single(back, y_recv, send_splits, recv_splits, group=ctx.group)
        else:
            back = y_recv
        y_pairs = torch.empty_like(back)
        y_pairs[send_order] = back
        # 7. weighted sum over the top-k
        out = (y_pairs.view(T, k, -1) * weights.to(x.dtype).unsqueeze(-1)).sum(dim=1)
        t4 = self._now()
        self.stats = {"route_s": route_s, "counts_s": t1 - t0, "dispatch_s": t2 - t1, "expert_s": t3 - t2,
                      "combine_s": t4 - t3, "expert_cpu_s": c3 - c2, "pairs_local": T * k,
                      "expert_tokens": int(per_slot.sum()), "slot_tokens": per_slot,
                      "pairs_sent_remote": int(sum(send_splits) - send_splits[me])}
        return out


class MoEBlock(nn.Module):
    """A Mixtral-style sparse MoE block: a linear router, top-k softmax gating, EP experts.

    ``router_bias`` [E] is added to the router logits (zero unless the run config sets
    ``router_bias_std``: a stand-in for a trained router's skew in randomly initialised
    models). When ``record`` is on, ``last_experts`` int16 [T, k] and ``last_weights``
    float32 [T, k] keep the routing of the latest forward (on the host).
    """

    def __init__(self, layer: int, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 ctx: DistContext, dtype: torch.dtype = torch.float32, normalize: bool = True) -> None:
        super().__init__()
        self.top_k = top_k
        self.normalize = normalize
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, dtype=dtype, device=ctx.device)
        self.register_buffer("router_bias", torch.zeros(num_experts, device=ctx.device))
        self.experts = ExpertParallelMoE(layer, num_experts, hidden_size, intermediate_size, ctx, dtype=dtype)
        self.record = False
        self.last_experts: np.ndarray | None = None
        self.last_weights: np.ndarray | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        t0 = self.experts._now()
        experts, weights = top_k_routing(self.gate(x).float() + self.router_bias, self.top_k, self.normalize)
        route_s = self.experts._now() - t0
        if self.record:
            self.last_experts = experts.to(torch.int16).cpu().numpy()
            self.last_weights = weights.float().cpu().numpy()
        return self.experts(x, experts, weights, route_s=route_s).reshape(shape)
