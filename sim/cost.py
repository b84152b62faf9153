"""The cost model: time of every phase of one MoE layer on one GPU, in seconds.

Pure numpy, vectorised over any leading axes (layers, GPUs, slots). Formulas, units and
their reasons are in docs/simulator.md ("Cost model"); the names here follow it:

* compute: roofline ``max(FLOPs / peak, bytes / HBM bandwidth) + kernel overhead``;
* all-to-all (dispatch, combine, correction): per GPU, the intra- and inter-node fabrics
  work in parallel, each taking ``max(bytes sent, bytes received) / bandwidth`` plus the
  latency of every peer it exchanges with; a dispatch whose layout is not known in
  advance first exchanges token counts with every peer (latency only);
* weight copies: ``bytes / link bandwidth + latency`` per (source, destination) pair;
* predictor: roofline of the predictor's FLOPs and bytes per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_gps.config.schema import ClusterConfig, ModelConfig, WorkloadConfig


@dataclass(frozen=True)
class Hardware:
    """Rates derived from a :class:`ClusterConfig` and the model's compute dtype (SI units).

    flops:   effective FLOP/s (peak x compute_efficiency)
    hbm:     effective HBM B/s (bandwidth x memory_efficiency)
    overhead: seconds added to a compute phase that has work
    intra_bw, inter_bw: B/s per GPU per direction;  intra_lat, inter_lat: seconds per message
    node_of_gpu: int [G]
    """

    flops: float
    hbm: float
    overhead: float
    intra_bw: float
    intra_lat: float
    inter_bw: float
    inter_lat: float
    node_of_gpu: np.ndarray

    @classmethod
    def from_config(cls, cluster: ClusterConfig, model: ModelConfig) -> "Hardware":
        g = cluster.gpu
        peak = g.peak_tflops_bf16
        if model.compute_dtype == "fp8" and g.peak_tflops_fp8 is not None:
            peak = g.peak_tflops_fp8
        inter = cluster.inter_node or cluster.intra_node
        return cls(
            flops=peak * 1e12 * g.compute_efficiency,
            hbm=g.hbm_bandwidth_gb_s * 1e9 * g.memory_efficiency,
            overhead=g.kernel_overhead_us * 1e-6,
            intra_bw=cluster.intra_node.bandwidth_gb_s * 1e9,
            intra_lat=cluster.intra_node.latency_us * 1e-6,
            inter_bw=inter.bandwidth_gb_s * 1e9,
            inter_lat=inter.latency_us * 1e-6,
            node_of_gpu=np.arange(cluster.num_gpus) // cluster.gpus_per_node,
        )

    @property
    def num_gpus(self) -> int:
        return len(self.node_of_gpu)

    def same_node(self) -> np.ndarray:
        """bool [G, G]: True where two GPUs share a node (diagonal included)."""
        return self.node_of_gpu[:, None] == self.node_of_gpu[None, :]


def roofline(flops, bytes_, hw: Hardware):
    """max(flops / peak, bytes / HBM) in seconds, elementwise (no overhead)."""
    return np.maximum(np.asarray(flops, dtype=np.float64) / hw.flops, np.asarray(bytes_, dtype=np.float64) / hw.hbm)


def attention_time(tokens, model: ModelConfig, workload: WorkloadConfig, hw: Hardware):
    """Attention block (+ shared experts) on one GPU for ``tokens`` of its own tokens.

    tokens: [...] (float, may be fractional after workload scaling) -> seconds [...]

    FLOPs = 2 n (P_attn + P_shared) + 4 n c H d,  c = seq_len (decode) or (seq_len + 1) / 2 (prefill)
    bytes = (P_attn + P_shared) w + KV + 2 n h a,  KV = n seq_len k_b (decode) or n k_b (prefill, written)
    """
    n = np.asarray(tokens, dtype=np.float64)
    a = model.attention
    params = model.attention_params + model.shared_params
    ctx = workload.seq_len if workload.phase == "decode" else (workload.seq_len + 1) / 2
    flops = 2.0 * n * params + 4.0 * n * ctx * a.num_heads * a.head_dim
    kv = n * model.kv_bytes_per_token * (workload.seq_len if workload.phase == "decode" else 1)
    bytes_ = params * model.weight_bytes + kv + 2.0 * n * model.token_bytes
    return np.where(n > 0, roofline(flops, bytes_, hw) + hw.overhead, 0.0)


def expert_slot_time(tokens, model: ModelConfig, hw: Hardware):
    """One replica (slot) processing ``tokens`` tokens: roofline of its GEMMs, no overhead.

    FLOPs = 2 n m h f;  bytes = m h f w (weights, read once if n > 0) + 2 n h a (in and out)
    """
    n = np.asarray(tokens, dtype=np.float64)
    flops = 2.0 * n * model.expert_params
    bytes_ = np.where(n > 0, model.expert_bytes, 0.0) + 2.0 * n * model.token_bytes
    return roofline(flops, bytes_, hw)


def ffn_time(slot_tokens, slots_per_gpu: int, model: ModelConfig, hw: Hardware):
    """Grouped GEMM of one GPU: the sum of its slots' rooflines + one kernel overhead.

    slot_tokens: [..., slots] (slot s on GPU s // slots_per_gpu) -> seconds [..., GPUs]
    """
    t = expert_slot_time(slot_tokens, model, hw)
    t = t.reshape(*t.shape[:-1], -1, slots_per_gpu).sum(axis=-1)
    busy = np.asarray(slot_tokens).reshape(*t.shape, slots_per_gpu).sum(axis=-1) > 0
    return t + np.where(busy, hw.overhead, 0.0)


def alltoall_time(traffic, bytes_per_token: float, hw: Hardware):
    """Per-GPU time of an all-to-all that moves ``traffic`` tokens.

    traffic: [..., G, G] tokens from GPU g (row) to GPU h (column); the diagonal stays local.
    -> seconds [..., G]:  max over fabrics f of
       max(S_f[g], R_f[g]) * bytes_per_token / B_f + lat_f * m_f[g]
    where S_f, R_f are the tokens g sends/receives over fabric f and m_f[g] the number of peers
    on fabric f that g exchanges a non-zero amount with (either direction).
    """
    traffic = np.asarray(traffic, dtype=np.float64)
    G = traffic.shape[-1]
    same = hw.same_node()
    off = ~np.eye(G, dtype=bool)
    nz = traffic > 0
    talks = nz | np.swapaxes(nz, -1, -2)                      # g and h exchange something
    out = np.zeros(traffic.shape[:-1])
    for mask, bw, lat in ((same & off, hw.intra_bw, hw.intra_lat), (~same, hw.inter_bw, hw.inter_lat)):
        if not mask.any():
            continue
        t = traffic * mask
        send, recv = t.sum(axis=-1), t.sum(axis=-2)
        peers = (talks & mask).sum(axis=-1)
        np.maximum(out, np.maximum(send, recv) * (bytes_per_token / bw) + lat * peers, out=out)
    return out


def layout_time(hw: Hardware) -> np.ndarray:
    """Per-GPU seconds [G] of the layout exchange before a dispatch: every GPU tells every
    other how many tokens it will send (a few bytes per peer, so latency only):
    lat_intra * (intra-node peers) + lat_inter * (inter-node peers)."""
    same = hw.same_node()
    intra = same.sum(axis=1) - 1
    inter = (~same).sum(axis=1)
    return hw.intra_lat * intra + hw.inter_lat * inter


def transfer_time(bytes_, same_node, hw: Hardware):
    """One point-to-point transfer (a weight copy): bytes / bandwidth + one message latency.

    bytes_: [...];  same_node: bool [...] (intra- or inter-node fabric) -> seconds [...]
    """
    b = np.asarray(bytes_, dtype=np.float64)
    bw = np.where(same_node, hw.intra_bw, hw.inter_bw)
    lat = np.where(same_node, hw.intra_lat, hw.inter_lat)
    return np.where(b > 0, b / bw + lat, 0.0)


def predictor_time(tokens, flops_per_token: float, bytes_per_token: float, fixed_bytes: float,
                   hw: Hardware, fixed_flops: float = 0.0):
    """A predictor run over ``tokens`` tokens on one GPU (one layer): roofline + one kernel overhead.

    FLOPs = fixed_flops + n * flops_per_token;  bytes = fixed_bytes + n * bytes_per_token;
    0 on a GPU without tokens or for a predictor that costs nothing.
    """
    n = np.asarray(tokens, dtype=np.float64)
    if not (flops_per_token > 0 or bytes_per_token > 0 or fixed_bytes > 0 or fixed_flops > 0):
        return np.zeros_like(n)
    t = roofline(fixed_flops + n * flops_per_token, fixed_bytes + n * bytes_per_token, hw)
    return np.where(n > 0, t + hw.overhead, 0.0)
