"""From (placement, true loads) to the duration of every phase on every GPU: :class:`StepWork`.

All layers of a step at once, with numpy. The event model (:mod:`sim.engine`) then
schedules these durations on SimPy resources; :func:`closed_form_layer_times` adds them
up without any overlap or contention, which the event model must match in that case.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_gps.config.schema import ModelConfig, WorkloadConfig
from moe_gps.placement import Placement
from sim.cost import (Hardware, alltoall_time, attention_time, combine_host_time, dispatch_host_time, ffn_time,
                      layout_time, local_copy_time, shared_compute, transfer_time)
from sim.loads import StepLoads
from sim.strategies import StepPlan


@dataclass
class Copies:
    """Weight copies of one step: one row per (layer, source GPU, destination GPU).

    layer, src, dst: int64 [C];  bytes, seconds: float64 [C]. A row with src == dst is work within
    one GPU (copies between its slots, applying the placement): no link bytes.
    """

    layer: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    bytes: np.ndarray
    seconds: np.ndarray

    @classmethod
    def empty(cls) -> "Copies":
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, z, np.zeros(0), np.zeros(0))

    def __len__(self) -> int:
        return len(self.layer)


@dataclass
class StepWork:
    """Phase durations of one step, seconds, [L, G] each (see docs/simulator.md).

    gpu_tokens: float [L, G] tokens each GPU's experts process (FFN load)
    expert_counts: float [L, E] true tokens per expert
    copy_bytes: float [L] bytes of weights copied for each layer
    skew: seconds of collective skew included in each dispatch, correction (when it has one) and combine
    """

    predictor: np.ndarray
    attention: np.ndarray
    dispatch: np.ndarray
    correction: np.ndarray
    ffn: np.ndarray
    combine: np.ndarray
    copies: Copies
    gpu_tokens: np.ndarray
    expert_counts: np.ndarray
    copy_bytes: np.ndarray
    has_correction: bool = False
    skew: float = 0.0


def share_by_gpu(placement: Placement) -> np.ndarray:
    """float [L, E, G]: the share of expert e's tokens that GPU g takes (sum over its replicas)."""
    L, P = placement.phy2log.shape
    E, G = placement.num_experts, placement.num_gpus
    key = (np.arange(L)[:, None] * E + placement.phy2log) * G + placement.gpu_of_slot[None, :]
    flat = np.bincount(key.ravel(), weights=placement.replica_share.ravel(), minlength=L * E * G)
    return flat.reshape(L, E, G)


def route(src_counts: np.ndarray, placement: Placement) -> np.ndarray:
    """Tokens from home GPU g to GPU h when each expert's tokens split by replica share.

    src_counts: float [L, G, E] -> float [L, G, G]; no matrix product: each slot takes
    its share of its expert's column, and a GPU's slots are summed.
    """
    L, G, E = src_counts.shape
    idx = np.broadcast_to(placement.phy2log[:, None, :], (L, G, placement.num_slots))
    per_slot = np.take_along_axis(src_counts, idx, axis=2) * placement.replica_share[:, None, :]
    return per_slot.reshape(L, G, G, placement.slots_per_gpu).sum(axis=3)


def weight_copies(previous: Placement | None, current: Placement, expert_bytes: float,
                  hw: Hardware) -> Copies:
    """Copies needed to go from ``previous`` to ``current`` (none when it is the same placement).

    Between GPUs: a GPU needs one copy of expert e (expert_bytes) for each layer where it hosts
    e now and did not before. The source is a GPU that hosted e before, preferring one on the
    same node, then the first after the destination in ring order (to spread the senders).

    Within a GPU (rows with src == dst, no link bytes): every slot that now holds another
    expert than before (every slot when the slots per GPU changed) and is not filled by a
    copy from another GPU is a copy between slots (:func:`sim.cost.local_copy_time`); and
    applying the placement costs every GPU ``replan_overhead`` before the first layer.
    """
    if previous is None or previous is current:
        return Copies.empty()
    L, G = current.phy2log.shape[0], current.num_gpus
    now = current.experts_on_gpu() > 0          # [L, G, E]
    before = previous.experts_on_gpu() > 0
    need = now & ~before
    layer, dst, expert = np.nonzero(need)
    holders = before[layer, :, expert]          # [n, G]
    same = hw.same_node()[dst]                  # [n, G]
    ring = (np.arange(G)[None, :] - dst[:, None]) % G
    score = holders * ((1 + same) * G - ring)
    src = np.argmax(score, axis=1) if len(layer) else np.zeros(0, dtype=np.int64)
    key = (layer * G + src) * G + dst
    uniq, counts = np.unique(key, return_counts=True)
    l, rest = np.divmod(uniq, G * G)
    s, d = np.divmod(rest, G)
    nbytes = counts * float(expert_bytes)
    secs = transfer_time(nbytes, hw.same_node()[s, d], hw)
    # within each GPU: slots rewritten, less those a transfer fills; the re-plan's host time
    S_new, S_old = current.slots_per_gpu, previous.slots_per_gpu
    new_slots = current.phy2log.reshape(L, G, S_new)
    if S_new == S_old:
        written = (new_slots != previous.phy2log.reshape(L, G, S_old)).sum(axis=2)
    else:
        written = np.full((L, G), S_new)
    local = local_copy_time(written - need.sum(axis=2), expert_bytes, hw)      # [L, G]
    local[0] += hw.replan_overhead
    sl, sg = np.nonzero(local > 0)
    return Copies(np.concatenate([l, sl]), np.concatenate([s, sg]), np.concatenate([d, sg]),
                  np.concatenate([nbytes, np.zeros(len(sl))]), np.concatenate([secs, local[sl, sg]]))


def build_step_work(plan: StepPlan, previous: Placement | None, loads: StepLoads, model: ModelConfig,
                    workload: WorkloadConfig, hw: Hardware) -> StepWork:
    """Every phase's duration on every GPU for one step under one plan."""
    p = plan.placement
    L, G, E = loads.src_counts.shape
    counts = loads.counts                                    # [L, E]
    # FFN: tokens per slot = expert tokens x the slot's share
    slot_tokens = p.slot_loads(counts)                       # [L, P]
    ffn = ffn_time(slot_tokens, p.slots_per_gpu, model, hw)  # [L, G]
    gpu_tokens = slot_tokens.reshape(L, G, p.slots_per_gpu).sum(axis=2)
    # dispatch (and correction): tokens from home GPU g to GPU h
    bpt = model.token_bytes
    layout = layout_time(hw)[None, :]                        # [1, G]
    if plan.predicted_src is not None:
        # direct routing: the predicted layout is known, correct tokens go without a layout
        # exchange; the mispredicted ones follow in a correction all-to-all that needs one
        main = route(plan.predicted_src, p)                  # [L, G, G]
        fix = route(loads.src_counts - plan.predicted_src, p)
        dispatch = alltoall_time(main, bpt, hw) + dispatch_host_time(main.sum(axis=2), model, hw)
        any_fix = (np.abs(fix).sum(axis=(1, 2)) > 1e-9)[:, None]
        correction = np.where(any_fix, layout + alltoall_time(fix, bpt, hw)
                              + dispatch_host_time(fix.sum(axis=2), model, hw), 0.0)
        traffic = main + fix
        has_corr = True
    else:
        traffic = route(loads.src_counts, p)
        dispatch = layout + alltoall_time(traffic, bpt, hw) + dispatch_host_time(traffic.sum(axis=2), model, hw)
        correction = np.zeros((L, G))
        has_corr = False
    combine = alltoall_time(np.swapaxes(traffic, 1, 2), bpt, hw) + combine_host_time(traffic.sum(axis=2), model, hw)
    if hw.collective_skew:
        # the next phase starts when the latest rank has left the collective
        dispatch = dispatch + hw.collective_skew
        correction = np.where(correction > 0, correction + hw.collective_skew, 0.0)
        combine = combine + hw.collective_skew
    attn = np.broadcast_to(attention_time(loads.home_tokens, model, workload, hw), (L, G))
    pred = np.broadcast_to(np.asarray(plan.predictor_s, dtype=np.float64), (L, G))
    if hw.compute_units:
        # GPUs of a node share processors: the compute phases, which all GPUs start at once, stretch
        ffn = shared_compute(ffn, hw)
        busy = pred + attn
        stretch = np.divide(shared_compute(busy, hw), busy, out=np.ones_like(busy), where=busy > 0)
        attn, pred = attn * stretch, pred * stretch
    copies = weight_copies(previous, p, model.expert_bytes, hw)
    copy_bytes = np.bincount(copies.layer, weights=copies.bytes, minlength=L) if len(copies) else np.zeros(L)
    return StepWork(pred, attn, dispatch, correction, ffn, combine, copies, gpu_tokens, counts, copy_bytes,
                    has_corr, hw.collective_skew)


def copy_port_busy(copies: Copies, num_layers: int, num_gpus: int) -> np.ndarray:
    """float [L, G]: seconds each GPU is busy with copies: the larger of sending and of receiving
    followed by its work within the GPU (rows with src == dst)."""
    out = np.zeros((num_layers, num_gpus))
    send = np.zeros((num_layers, num_gpus))
    link = copies.src != copies.dst
    np.add.at(out, (copies.layer, copies.dst), copies.seconds)
    np.add.at(send, (copies.layer[link], copies.src[link]), copies.seconds[link])
    return np.maximum(out, send)


def closed_form_layer_times(work: StepWork, overlap_copies: bool) -> np.ndarray:
    """Layer times [L] with no overlap effects and no contention (docs/simulator.md):

    T_layer = C + max_g(P + A) + max_g D + max_g X + max_g F + max_g M

    where C = max over GPUs of their copy-link busy time when copies do not overlap
    attention, and 0 when they do (assumed hidden). Exact when no GPU's link carries
    copies and dispatch traffic at once, and no port serves two copies at once.
    """
    L, G = work.attention.shape
    t = ((work.predictor + work.attention).max(axis=1) + work.dispatch.max(axis=1)
         + work.correction.max(axis=1) + work.ffn.max(axis=1) + work.combine.max(axis=1))
    if not overlap_copies and len(work.copies):
        t = t + copy_port_busy(work.copies, L, G).max(axis=1)
    return t
