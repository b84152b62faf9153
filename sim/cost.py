"""The cost model: time of every phase of one MoE layer on one GPU, in seconds.

Pure numpy, vectorised over any leading axes (layers, GPUs, slots). Formulas, units and
their reasons are in docs/simulator.md ("Cost model"); the names here follow it:

* compute: roofline ``max(FLOPs / peak, bytes / HBM bandwidth) + kernel overhead``;
* all-to-all (dispatch, combine, correction): per GPU, the intra- and inter-node fabrics
  work in parallel, each taking ``max(bytes sent, bytes received) / bandwidth`` plus the
  latency of every peer it exchanges with; a dispatch whose layout is not known in
  advance first exchanges token counts with every peer (latency only);
* weight copies: ``bytes / link bandwidth + latency`` per (source, destination) pair;
* predictor: roofline of the predictor's FLOPs and bytes per token;
* per-phase software costs (optional cluster fields, zero by default; measured by
  ``moe-gps calibrate``, docs/fidelity.md): the attention block's own efficiency and fixed
  time, a fixed time per expert slot with tokens, a fixed host time per dispatch and per
  combine, and token permutation (row gathers and scatters) at its own bandwidth;
* collective skew: ranks leave a collective at different times, and the next one waits for
  the latest: a time added to every dispatch, correction and combine (the ``sync`` phase),
  smaller when one rank arrives clearly last (:func:`collective_skew`);
* applying a new placement: a fixed host time per re-plan and per GPU, and copies between
  slots of one GPU at memory bandwidth (read + write).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from moe_gps.config.schema import ClusterConfig, ModelConfig, WorkloadConfig
from moe_gps.placement.placement import gpu_sums


@dataclass(frozen=True)
class Hardware:
    """Rates derived from a :class:`ClusterConfig` and the model's compute dtype (SI units).

    flops:   effective FLOP/s (peak x compute_efficiency)
    hbm:     effective HBM B/s (bandwidth x memory_efficiency)
    overhead: seconds added to a compute phase that has work
    intra_bw, inter_bw: B/s per GPU per direction;  intra_lat, inter_lat: seconds per message
    node_of_gpu: int [G]
    attn_flops: effective FLOP/s of the attention block (peak x attention_efficiency)
    attn_overhead: seconds added to an attention phase that has tokens
    expert_overhead: seconds per expert slot with tokens in the FFN
    dispatch_overhead, combine_overhead: host seconds per dispatch (or correction) / combine per GPU
    combine_together: host seconds a combine adds when the GPUs reach it together (:func:`combine_together`)
    combine_return_row: host seconds per row a GPU sends back in a combine (:func:`combine_host_time`)
    permute_bw: B/s of token permutation (0: not modelled)
    compute_units: processors the GPUs of a node share (0: not shared)
    intra_copy_bw, intra_copy_lat, inter_copy_bw, inter_copy_lat: weight copies (unset: the link's numbers)
    collective_skew: seconds between the first and the last GPU leaving a collective (ranks arriving together)
    skew_floor: share of collective_skew left when one GPU arrives clearly last (1: constant skew)
    skew_gap: seconds of arrival gap over which the skew falls towards its floor (0: constant skew)
    replan_overhead: host seconds per GPU to apply a new placement
    install_overhead: host seconds per GPU to switch in a placement whose weights were copied in the background
    weight_reads: an expert replica reads its weights once per layer it has tokens (False: FFN time in
                  proportion to tokens only, the MoE-GPS paper's model)
    predictor_overlap: token predictors run beside the layer's attention and distribution predictors on
                  the host between steps (False: every predictor before the layer's attention)
    """

    flops: float
    hbm: float
    overhead: float
    intra_bw: float
    intra_lat: float
    inter_bw: float
    inter_lat: float
    node_of_gpu: np.ndarray
    attn_flops: float = 0.0
    attn_overhead: float = 0.0
    expert_overhead: float = 0.0
    dispatch_overhead: float = 0.0
    combine_overhead: float = 0.0
    combine_together: float = 0.0
    combine_return_row: float = 0.0
    permute_bw: float = 0.0
    compute_units: float = 0.0
    intra_copy_bw: float = 0.0
    intra_copy_lat: float = -1.0
    inter_copy_bw: float = 0.0
    inter_copy_lat: float = -1.0
    collective_skew: float = 0.0
    skew_floor: float = 1.0
    skew_gap: float = 0.0
    replan_overhead: float = 0.0
    install_overhead: float = 0.0
    weight_reads: bool = True
    predictor_overlap: bool = False

    def __post_init__(self) -> None:
        if not self.attn_flops:
            object.__setattr__(self, "attn_flops", self.flops)
        for name, default in (("intra_copy_bw", self.intra_bw), ("inter_copy_bw", self.inter_bw)):
            if not getattr(self, name):
                object.__setattr__(self, name, default)
        for name, default in (("intra_copy_lat", self.intra_lat), ("inter_copy_lat", self.inter_lat)):
            if getattr(self, name) < 0:
                object.__setattr__(self, name, default)

    @classmethod
    def from_config(cls, cluster: ClusterConfig, model: ModelConfig) -> "Hardware":
        g = cluster.gpu
        peak = g.peak_tflops_bf16
        if model.compute_dtype == "fp8" and g.peak_tflops_fp8 is not None:
            peak = g.peak_tflops_fp8
        inter = cluster.inter_node or cluster.intra_node
        attn_eff = g.compute_efficiency if g.attention_efficiency is None else g.attention_efficiency
        attn_over = g.kernel_overhead_us if g.attention_overhead_us is None else g.attention_overhead_us
        return cls(
            flops=peak * 1e12 * g.compute_efficiency,
            hbm=g.hbm_bandwidth_gb_s * 1e9 * g.memory_efficiency,
            overhead=g.kernel_overhead_us * 1e-6,
            intra_bw=cluster.intra_node.bandwidth_gb_s * 1e9,
            intra_lat=cluster.intra_node.latency_us * 1e-6,
            inter_bw=inter.bandwidth_gb_s * 1e9,
            inter_lat=inter.latency_us * 1e-6,
            node_of_gpu=np.arange(cluster.num_gpus) // cluster.gpus_per_node,
            attn_flops=peak * 1e12 * attn_eff,
            attn_overhead=attn_over * 1e-6,
            expert_overhead=g.expert_overhead_us * 1e-6,
            dispatch_overhead=g.dispatch_overhead_us * 1e-6,
            combine_overhead=g.combine_overhead_us * 1e-6,
            combine_together=g.combine_together_us * 1e-6,
            combine_return_row=g.combine_return_row_us * 1e-6,
            permute_bw=(g.permute_bandwidth_gb_s or 0.0) * 1e9,
            compute_units=cluster.compute_units_per_node or 0.0,
            intra_copy_bw=(cluster.intra_node.copy_bandwidth_gb_s or 0.0) * 1e9,
            intra_copy_lat=_us(cluster.intra_node.copy_latency_us),
            inter_copy_bw=(inter.copy_bandwidth_gb_s or 0.0) * 1e9,
            inter_copy_lat=_us(inter.copy_latency_us),
            collective_skew=cluster.collective_skew_us * 1e-6,
            skew_floor=1.0 if cluster.collective_skew_floor is None else cluster.collective_skew_floor,
            skew_gap=(cluster.collective_skew_gap_us or 0.0) * 1e-6,
            replan_overhead=g.replan_overhead_us * 1e-6,
            install_overhead=(g.replan_overhead_us if g.install_overhead_us is None else g.install_overhead_us) * 1e-6,
        )

    @property
    def num_gpus(self) -> int:
        return len(self.node_of_gpu)

    def same_node(self) -> np.ndarray:
        """bool [G, G]: True where two GPUs share a node (diagonal included)."""
        return self.node_of_gpu[:, None] == self.node_of_gpu[None, :]

    # -- constants of the cluster's shape, worked out once (read-only arrays; the fields never change)
    @functools.cached_property
    def _fabrics(self) -> tuple[tuple[np.ndarray, np.ndarray, float, float], ...]:
        """Per fabric with GPU pairs on it (peers on the node, then GPUs of other nodes): (its pairs,
        bool [G, G]; the same as float [G, G]; bandwidth B/s; latency s)."""
        same = self.same_node()
        off = ~np.eye(len(self.node_of_gpu), dtype=bool)
        out = []
        for mask, bw, lat in ((same & off, self.intra_bw, self.intra_lat), (~same, self.inter_bw, self.inter_lat)):
            if mask.any():
                out.append((_frozen(mask), _frozen(mask.astype(np.float64)), bw, lat))
        return tuple(out)

    @functools.cached_property
    def _layout(self) -> np.ndarray:
        """float [G]: :func:`layout_time` (read-only)."""
        same = self.same_node()
        intra = same.sum(axis=1) - 1
        inter = (~same).sum(axis=1)
        return _frozen(self.intra_lat * intra + self.inter_lat * inter)

    @functools.cached_property
    def _nodes(self) -> tuple[int, int, np.ndarray]:
        """(nodes, GPUs on node 0, one-hot float [G, nodes] of each GPU's node)."""
        node = self.node_of_gpu
        nodes = int(node.max()) + 1 if len(node) else 0
        per_node = int(np.sum(node == 0)) if len(node) else 0
        return nodes, per_node, _frozen((node[:, None] == np.arange(nodes)[None, :]).astype(np.float64))


def _frozen(a: np.ndarray) -> np.ndarray:
    """``a``, made read-only (a constant shared by every call)."""
    a.setflags(write=False)
    return a


def _us(value: float | None) -> float:
    """Microseconds to seconds; None (not set) -> -1 (take the link's latency)."""
    return -1.0 if value is None else value * 1e-6


def roofline(flops, bytes_, hw: Hardware, flop_rate: float | None = None):
    """max(flops / peak, bytes / HBM) in seconds, elementwise (no overhead); ``flop_rate``
    replaces the peak (the attention block's own rate)."""
    rate = hw.flops if flop_rate is None else flop_rate
    return np.maximum(np.asarray(flops, dtype=np.float64) / rate, np.asarray(bytes_, dtype=np.float64) / hw.hbm)


def permute_time(rows, passes: int, model: ModelConfig, hw: Hardware):
    """Token permutation: ``passes`` memory passes over ``rows`` hidden-state rows, each reading
    and writing every row once: passes * rows * 2 h a / permute_bw seconds (0 when not modelled).

    rows: [...] -> seconds [...]
    """
    r = np.asarray(rows, dtype=np.float64)
    if not hw.permute_bw:
        return np.zeros_like(r)
    return passes * r * (2.0 * model.token_bytes / hw.permute_bw)


def attention_time(tokens, model: ModelConfig, workload: WorkloadConfig, hw: Hardware):
    """Attention block (+ shared experts) on one GPU for ``tokens`` of its own tokens, all of one
    workload (every token attends to c keys and reads or writes its KV entries as below).

    tokens: [...] (float, may be fractional after workload scaling) -> seconds [...]

    c = seq_len (decode) or (seq_len + 1) / 2 (prefill);  KV entries = n seq_len (decode, read) or n
    (prefill, written);  time = :func:`attention_block_time` (n, n c, KV entries)
    """
    return attention_block_time(*_workload_block(tokens, workload), model, hw)


def attention_compute_time(tokens, model: ModelConfig, workload: WorkloadConfig, hw: Hardware):
    """The compute part of :func:`attention_time`: its FLOPs at the attention block's rate (no memory
    term, no overhead).  tokens: [...] -> seconds [...]"""
    n, context, _ = _workload_block(tokens, workload)
    return attention_block_compute(n, context, model, hw)


def _workload_block(tokens, workload: WorkloadConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, context, KV entries) of ``tokens`` tokens of one workload (:func:`attention_time`)."""
    n = np.asarray(tokens, dtype=np.float64)
    decode = workload.phase == "decode"
    ctx = workload.seq_len if decode else (workload.seq_len + 1) / 2
    return n, n * ctx, n * (workload.seq_len if decode else 1)


def attention_block_time(tokens, context, kv_entries, model: ModelConfig, hw: Hardware):
    """Attention block (+ shared experts) on one GPU for a batch of ``tokens`` tokens whose queries
    attend to ``context`` keys in all (summed over the tokens) and that read or write ``kv_entries``
    KV-cache entries in all (any mix of prefill chunks and decodes; docs/serving.md).

    tokens, context, kv_entries: [...] -> seconds [...]

    FLOPs = 2 n (P_attn + P_shared) + 4 C H d
    bytes = (P_attn + P_shared) w_dense + K k_b + 2 n h a
    time = max(FLOPs / (peak x attention_efficiency), bytes / HBM) + attention overhead
    """
    n = np.asarray(tokens, dtype=np.float64)
    params = model.attention_params + model.shared_params
    bytes_ = params * model.dense_bytes + np.asarray(kv_entries, dtype=np.float64) * model.kv_bytes_per_token \
        + 2.0 * n * model.token_bytes
    return np.where(n > 0, roofline(_attention_flops(n, context, model), bytes_, hw, hw.attn_flops)
                    + hw.attn_overhead, 0.0)


def attention_block_compute(tokens, context, model: ModelConfig, hw: Hardware):
    """The compute part of :func:`attention_block_time`: FLOPs / (peak x attention_efficiency), no memory
    term, no overhead.  tokens, context: [...] -> seconds [...]"""
    n = np.asarray(tokens, dtype=np.float64)
    return np.where(n > 0, _attention_flops(n, context, model) / hw.attn_flops, 0.0)


def _attention_flops(n: np.ndarray, context, model: ModelConfig) -> np.ndarray:
    """FLOPs of the attention block (+ shared experts): 2 n (P_attn + P_shared) + 4 C H d."""
    a = model.attention
    params = model.attention_params + model.shared_params
    return 2.0 * n * params + 4.0 * np.asarray(context, dtype=np.float64) * (a.num_heads * a.head_dim)


def expert_slot_time(tokens, model: ModelConfig, hw: Hardware):
    """One replica (slot) processing ``tokens`` tokens: roofline of its GEMMs, no overhead.

    FLOPs = 2 n m h f;  bytes = m h f w (weights, read once if n > 0) + 2 n h a (in and out);
    without ``hw.weight_reads`` the weights are not read (time in proportion to n)
    """
    n = np.asarray(tokens, dtype=np.float64)
    # :func:`roofline`, in place (the simulator's most called cost; the same numbers in fewer passes)
    mem = np.multiply(n, 2.0, out=np.empty(n.shape))
    t = np.multiply(mem, model.expert_params, out=np.empty(n.shape))
    t /= hw.flops
    mem *= model.token_bytes
    if hw.weight_reads:
        np.add(mem, model.expert_bytes, out=mem, where=n > 0)
    mem /= hw.hbm
    np.maximum(t, mem, out=t)
    return t if t.ndim else t[()]


def ffn_time(slot_tokens, slots_per_gpu: int, model: ModelConfig, hw: Hardware):
    """Grouped GEMM of one GPU: the sum of its slots' rooflines (+ expert overhead per slot with
    tokens) + one kernel overhead + 2 permutation passes over its rows (group by expert, scatter back).

    slot_tokens: [..., slots] (slot s on GPU s // slots_per_gpu) -> seconds [..., GPUs]
    """
    return ffn_time_rows(slot_tokens, slots_per_gpu, model, hw)[0]


def ffn_time_rows(slot_tokens, slots_per_gpu: int, model: ModelConfig, hw: Hardware) -> tuple[np.ndarray, np.ndarray]:
    """:func:`ffn_time` and each GPU's rows (the tokens of its slots, summed in slot order: :func:`gpu_sums`):
    slot_tokens [..., slots] -> (seconds [..., GPUs], tokens [..., GPUs])."""
    n = np.asarray(slot_tokens, dtype=np.float64)
    t = expert_slot_time(n, model, hw)
    if hw.expert_overhead:
        np.add(t, hw.expert_overhead, out=t, where=n > 0)
    t = gpu_sums(t, slots_per_gpu)
    rows = gpu_sums(n, slots_per_gpu)
    if hw.overhead:
        np.add(t, hw.overhead, out=t, where=rows > 0)
    if hw.permute_bw:
        t += permute_time(rows, 2, model, hw)
    return t, rows


def alltoall_time(traffic, bytes_per_token: float, hw: Hardware):
    """Per-GPU time of an all-to-all that moves ``traffic`` tokens.

    traffic: [..., G, G] tokens from GPU g (row) to GPU h (column); the diagonal stays local.
    -> seconds [..., G]:  max over fabrics f of
       max(S_f[g], R_f[g]) * bytes_per_token / B_f + lat_f * m_f[g]
    where S_f, R_f are the tokens g sends/receives over fabric f and m_f[g] the number of peers
    on fabric f that g exchanges a non-zero amount with (either direction).
    """
    traffic = np.asarray(traffic, dtype=np.float64)
    nz = traffic > 0
    talks = nz | np.swapaxes(nz, -1, -2)                      # g and h exchange something
    out = np.zeros(traffic.shape[:-1])
    for mask, m, bw, lat in hw._fabrics:
        # the fabric's sums without a masked copy of the traffic (m: the mask as floats)
        send, recv = np.einsum("...gh,gh->...g", traffic, m), np.einsum("...gh,gh->...h", traffic, m)
        peers = np.count_nonzero(talks & mask, axis=-1)
        np.maximum(out, np.maximum(send, recv) * (bytes_per_token / bw) + lat * peers, out=out)
    return out


def alltoall_outer_time(frac, takes, bytes_per_token: float, hw: Hardware):
    """:func:`alltoall_time` of an all-to-all whose traffic is an outer product,
    traffic[l, g, h] = frac[g] x takes[l, h] (every GPU's tokens with the same expert mix), in
    O(L G) instead of O(L G^2).

    frac: float [G] share of the tokens that start on each GPU;  takes: float [L, G] tokens each
    GPU's replicas take  ->  seconds [L, G]. With N_f(g) the GPUs that g reaches over fabric f
    and F = frac > 0, T = takes > 0:

        S_f[g] = frac[g] x sum_{h in N_f(g)} takes[h];   R_f[g] = takes[g] x sum_{h in N_f(g)} frac[h]
        m_f[g] = F[g] x #{h in N_f(g): T[h]} + T[g] x #{h in N_f(g): F[h]} - F[g] T[g] x #{h in N_f(g): F[h] T[h]}

    (m_f: the peers g exchanges a non-zero amount with, either direction), then as :func:`alltoall_time`.
    """
    frac = np.asarray(frac, dtype=np.float64)
    takes = np.asarray(takes, dtype=np.float64)
    node = hw.node_of_gpu
    nodes, per_node, onehot = hw._nodes

    def reach(x: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """x [..., G] -> sums over the other GPUs of g's node and over the GPUs of other nodes (None: a fabric
        without GPU pairs, not needed)."""
        same = (x @ onehot)[..., node]
        intra = same - x if per_node > 1 else None
        inter = x.sum(axis=-1, keepdims=True) - same if nodes > 1 else None
        return intra, inter

    F = (frac > 0).astype(np.float64)
    T = (takes > 0).astype(np.float64)
    sums = zip(reach(takes), reach(frac), reach(T), reach(F), reach(F * T))
    out = np.zeros(takes.shape)
    fabrics = ((per_node > 1, hw.intra_bw, hw.intra_lat), (nodes > 1, hw.inter_bw, hw.inter_lat))
    for (used, bw, lat), (to, of, t_n, f_n, ft_n) in zip(fabrics, sums):
        if not used:
            continue
        send, recv = frac * to, takes * of
        peers = F * t_n + T * f_n - F * T * ft_n
        np.maximum(out, np.maximum(send, recv) * (bytes_per_token / bw) + lat * peers, out=out)
    return out


def layout_time(hw: Hardware) -> np.ndarray:
    """Per-GPU seconds [G] of the layout exchange before a dispatch: every GPU tells every
    other how many tokens it will send (a few bytes per peer, so latency only):
    lat_intra * (intra-node peers) + lat_inter * (inter-node peers). Read-only (worked out once per cluster)."""
    return hw._layout


def shared_compute(seconds, hw: Hardware):
    """Finish times of a compute phase that every GPU starts at once when the GPUs of a node share
    ``compute_units`` processors (processor sharing): with n GPUs of a node still computing, each
    progresses at min(1, units / n) of its own speed. Unchanged when nothing is shared.

    seconds: [..., G] time each GPU's work takes on a processor of its own -> [..., G] finish times.
    Per node, in order of increasing work w_(1) <= w_(2) <= ...: t_(i) = t_(i-1) + (w_(i) - w_(i-1)) / r_i
    with r_i = min(1, units / (GPUs not yet finished)).
    """
    t = np.asarray(seconds, dtype=np.float64)
    G = t.shape[-1]
    per_node = int(np.sum(hw.node_of_gpu == 0)) if G else 0
    if not hw.compute_units or hw.compute_units >= per_node or G == 0:
        return t
    lead = t.shape[:-1]
    w = t.reshape(*lead, G // per_node, per_node)
    order = np.argsort(w, axis=-1, kind="stable")
    ws = np.take_along_axis(w, order, axis=-1)
    prev = np.concatenate([np.zeros_like(ws[..., :1]), ws[..., :-1]], axis=-1)
    active = per_node - np.arange(per_node)                               # GPUs still computing
    rate = np.minimum(1.0, hw.compute_units / active)
    finish_sorted = np.cumsum((ws - prev) / rate, axis=-1)
    out = np.empty_like(ws)
    np.put_along_axis(out, order, finish_sorted, axis=-1)
    return out.reshape(t.shape)


def arrival_gap(arrival):
    """How much later the last GPU reaches a collective than the second-last: the largest minus the
    second-largest of ``arrival`` over the last axis (0 with one GPU).  arrival: [..., G] -> seconds [...]"""
    a = np.asarray(arrival, dtype=np.float64)
    if a.shape[-1] < 2:
        return np.zeros(a.shape[:-1])
    top = np.partition(a, a.shape[-1] - 2, axis=-1)[..., -2:]
    return top[..., 1] - top[..., 0]


def collective_skew(arrival, hw: Hardware):
    """Collective skew of a collective that the GPUs reach at times ``arrival`` (the time each spent since
    they left the previous collective together):

        skew = s0 x (floor + (1 - floor) x exp(-gap / w)),  gap = :func:`arrival_gap` (arrival)

    with s0 = ``hw.collective_skew`` (GPUs arriving together: every GPU's lateness adds to the wait),
    floor = ``hw.skew_floor`` and w = ``hw.skew_gap``. When one GPU is clearly last, the others' lateness
    is absorbed while they wait for it, and only the floor is left. Without w (or floor = 1): s0.

    arrival: [..., G] -> seconds [...]
    """
    a = np.asarray(arrival, dtype=np.float64)
    s0 = hw.collective_skew
    if _skew_constant(hw):
        return np.full(a.shape[:-1], float(s0))
    f = hw.skew_floor + (1.0 - hw.skew_floor) * np.exp(-arrival_gap(a) / hw.skew_gap)
    return s0 * f


def combine_together(arrival, hw: Hardware):
    """What a combine costs beyond its host overhead when the GPUs reach it at times ``arrival``, for
    GPUs arriving together: they all exchange at once, while a GPU that arrives clearly last finds the
    others waiting, ready to receive. "Together" is within about the collective skew (the spread of the
    GPUs leaving the previous collective), so it falls with the arrival gap over that:

        together x exp(-gap / s0),  gap = :func:`arrival_gap` (arrival)

    with together = ``hw.combine_together`` and s0 = ``hw.collective_skew`` (without s0: at any gap).

    arrival: [..., G] -> seconds [...]
    """
    a = np.asarray(arrival, dtype=np.float64)
    if _together_constant(hw):
        return np.full(a.shape[:-1], float(hw.combine_together))
    return hw.combine_together * np.exp(-arrival_gap(a) / hw.collective_skew)


def combine_wait(arrival, hw: Hardware):
    """:func:`collective_skew` + :func:`combine_together` of a combine the GPUs reach at ``arrival`` [..., G]:
    seconds [...], or one number (a float) when neither depends on the arrival times."""
    if _skew_constant(hw) and _together_constant(hw):
        return float(hw.collective_skew) + float(hw.combine_together)
    return collective_skew(arrival, hw) + combine_together(arrival, hw)


def _skew_constant(hw: Hardware) -> bool:
    """:func:`collective_skew` does not depend on the arrival times (no skew, no gap scale, or floor 1)."""
    return not hw.collective_skew or not hw.skew_gap or hw.skew_floor >= 1.0


def _together_constant(hw: Hardware) -> bool:
    """:func:`combine_together` does not depend on the arrival times (no together term, or no skew)."""
    return not hw.combine_together or not hw.collective_skew


def dispatch_host_time(rows, model: ModelConfig, hw: Hardware):
    """Host work of one dispatch (or correction) on a GPU that sends ``rows`` rows (its own included):
    dispatch overhead + 1 permutation pass (gathering the rows into send order).  rows: [...] -> seconds"""
    return hw.dispatch_overhead + permute_time(rows, 1, model, hw)


def combine_host_time(rows, model: ModelConfig, hw: Hardware, returned=0.0):
    """Host work of one combine on a GPU whose ``rows`` rows come back and that sends back ``returned``
    rows it computed for other GPUs: combine overhead + 2 permutation passes (back to token order,
    weighted sum over the top-k) + combine_return_row x returned.  rows, returned: [...] -> seconds"""
    out = hw.combine_overhead + permute_time(rows, 2, model, hw)
    return out + hw.combine_return_row * np.asarray(returned, dtype=np.float64) if hw.combine_return_row else out


def transfer_time(bytes_, same_node, hw: Hardware, bandwidth_share: float = 1.0, transfers=1):
    """Weight copies between one pair of GPUs: bytes / (share x copy bandwidth) + transfers x copy
    latency (the link's own numbers unless the cluster gives copy_bandwidth_gb_s / copy_latency_us;
    ``bandwidth_share`` < 1 for copies in the background that get only part of the link; one transfer
    per expert copied, as the runtime sends them).

    bytes_: [...];  same_node: bool [...] (intra- or inter-node fabric);  transfers: [...] or a number
    -> seconds [...]
    """
    b = np.asarray(bytes_, dtype=np.float64)
    bw = np.where(same_node, hw.intra_copy_bw, hw.inter_copy_bw) * bandwidth_share
    lat = np.where(same_node, hw.intra_copy_lat, hw.inter_copy_lat)
    return np.where(b > 0, b / bw + np.asarray(transfers, dtype=np.float64) * lat, 0.0)


def local_copy_time(copies, expert_bytes: float, hw: Hardware):
    """Copying ``copies`` experts between slots of one GPU: 2 x bytes (read + write) / HBM each.
    copies: [...] -> seconds [...]"""
    return np.asarray(copies, dtype=np.float64) * (2.0 * expert_bytes / hw.hbm)


def predictor_time(tokens, cost, hw: Hardware):
    """A predictor run over ``tokens`` tokens on one GPU (one layer): roofline + one kernel overhead
    + its serial latency.

    cost: a ``moe_gps.predict.PredictorCost``.
    FLOPs = fixed_flops + n * flops_per_token;  bytes = fixed_bytes + n * bytes_per_token;
    time = R(FLOPs, bytes) + κ + serial_steps x step_latency_s;
    0 on a GPU without tokens or for a predictor that costs nothing.
    """
    n = np.asarray(tokens, dtype=np.float64)
    if not (cost.flops_per_token > 0 or cost.bytes_per_token > 0 or cost.fixed_bytes_per_step > 0
            or cost.fixed_flops_per_step > 0 or cost.latency_s > 0):
        return np.zeros_like(n)
    t = roofline(cost.fixed_flops_per_step + n * cost.flops_per_token,
                 cost.fixed_bytes_per_step + n * cost.bytes_per_token, hw)
    return np.where(n > 0, t + hw.overhead + cost.latency_s, 0.0)


def predictor_compute_time(tokens, cost, hw: Hardware):
    """The compute part of :func:`predictor_time`: its FLOPs at the GPU's rate (no memory term, no
    overhead, no serial latency).  tokens: [...] -> seconds [...]"""
    n = np.asarray(tokens, dtype=np.float64)
    return np.where(n > 0, (cost.fixed_flops_per_step + n * cost.flops_per_token) / hw.flops, 0.0)


def beside_attention(attention, attention_compute, predictor, predictor_compute, hw: Hardware):
    """Seconds a predictor run beside the attention block on the same GPU adds to it (token-to-expert
    predictors under ``predictor_overlap``). The two share the GPU's compute units, so together they
    take the longer of the two, and at least their compute times added (with the attention's fixed
    time):

        busy = max(T_attn, T_pred, C_attn + attention overhead + C_pred);  added = busy - T_attn

    (C: FLOPs / rate, :func:`attention_compute_time`, :func:`predictor_compute_time`). All [...] -> [...].
    """
    attn = np.asarray(attention, dtype=np.float64)
    shared = np.where(attn > 0, np.asarray(attention_compute, dtype=np.float64) + hw.attn_overhead, 0.0) \
        + np.asarray(predictor_compute, dtype=np.float64)
    return np.maximum(np.maximum(attn, predictor), shared) - attn
