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
from moe_gps.placement.moves import move_plan
from moe_gps.placement.placement import row_max
from sim.cost import (Hardware, alltoall_outer_time, alltoall_time, attention_compute_time, attention_time,
                      beside_attention, collective_skew, combine_host_time, combine_together, dispatch_host_time,
                      ffn_time_rows, layout_time, local_copy_time, shared_compute, transfer_time)
from sim.loads import StepLoads


@dataclass
class StepPlan:
    """What a strategy decided for one step.

    placement:      the placement in force during the step
    predictor_s:    float [G] seconds of predictor work per layer on each GPU
    predicted_src:  float [L, G, E] correctly predicted assignments by home GPU (token kind
                    with direct routing, and the oracle), or None
    predictor_compute_s: float [G] the compute part of predictor_s (:func:`sim.cost.predictor_compute_time`),
                    for a predictor that runs beside the attention; None: no compute
    """

    placement: Placement
    predictor_s: np.ndarray
    predicted_src: np.ndarray | None = None
    predictor_compute_s: np.ndarray | None = None


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

    def between_gpus(self) -> "Copies":
        """The transfers alone (rows with src != dst): what runs in the background under ``async``; the
        work within a GPU is the install's (:func:`install_time`)."""
        link = self.src != self.dst
        return Copies(self.layer[link], self.src[link], self.dst[link], self.bytes[link], self.seconds[link])


@dataclass
class StepWork:
    """Phase durations of one step, seconds, [L, G] each (see docs/simulator.md).

    dispatch_link, combine_link: the link part of dispatch and combine (what background copies slow down)
    copies: the weight copies the event model schedules inside the step's layers (copy policies
            critical and overlap; empty otherwise)
    gpu_tokens: float [L, G] tokens each GPU's experts process (FFN load)
    expert_counts: float [L, E] true tokens per expert
    copy_bytes: float [L] bytes of weights copied for each layer by a re-plan made at this step
    skew: float [L, 3] seconds of collective skew included in each layer's dispatch, correction (0 when it
          has none) and combine (:func:`sim.cost.collective_skew`); None: no skew
    replan_host: seconds of host work applying a new placement, on every GPU before the first layer
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
    skew: np.ndarray | None = None
    dispatch_link: np.ndarray | None = None
    combine_link: np.ndarray | None = None
    replan_host: float = 0.0


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
    its share of its expert's column, and a GPU's slots are summed. (When every GPU's tokens have
    the same expert mix the traffic is an outer product, which :func:`placement_phases` prices
    without building it: :func:`sim.cost.alltoall_outer_time`.)
    """
    L, G, E = src_counts.shape
    S = placement.slots_per_gpu
    by_expert = np.swapaxes(src_counts, 1, 2).reshape(L * E, G)     # a view where the layout is [L, E, G]
    rows = (np.arange(L)[:, None] * E + placement.phy2log).reshape(L * G, S)
    share = placement.replica_share.reshape(L * G, S)
    # slot by slot of each GPU (the same sums, in the same order, as summing the GPU's slots at once)
    out = by_expert.take(rows[:, 0], axis=0)                        # [L G, G]
    out *= share[:, :1]
    for s in range(1, S):
        part = by_expert.take(rows[:, s], axis=0)
        part *= share[:, s:s + 1]
        out += part
    return np.swapaxes(out.reshape(L, G, G), 1, 2)


def background_share(copy_policy: str, bandwidth_share: float) -> float | None:
    """Share of the copy bandwidth a re-plan's copies get in the background (copy policy ``async``);
    None: they are made on the critical path, at the whole bandwidth (the ``background_share`` of
    :func:`weight_copies`)."""
    return bandwidth_share if copy_policy == "async" else None


def weight_copies(previous: Placement | None, current: Placement, expert_bytes: float,
                  hw: Hardware, background_share: float | None = None) -> Copies:
    """Copies needed to go from ``previous`` to ``current`` (none when it is the same placement): the
    moves the runtime makes (:func:`moe_gps.placement.moves.move_plan`).

    Between GPUs: one transfer of expert_bytes per (layer, expert, destination GPU), from a GPU that
    held the expert (on the destination's node where one did). One row per (layer, source,
    destination): its bytes / copy bandwidth + its transfers x copy latency
    (:func:`sim.cost.transfer_time`).

    Within a GPU (rows with src == dst, no link bytes): the expert rows the GPU copies between its
    slots (:meth:`~moe_gps.placement.moves.MovePlan.row_copies`: the old rows read after being
    overwritten, copied aside first; local copies; a received expert's second slots), each
    :func:`sim.cost.local_copy_time`.

    ``background_share``: copies in the background (copy policy ``async``): the transfers get that
    share of the copy bandwidth, and they run before the new placement is installed, so the install
    copies aside only the sources of local copies. None: the copies are made with the slot writes, at
    the whole copy bandwidth.
    """
    if previous is None or previous is current:
        return Copies.empty()
    G = current.num_gpus
    plan = move_plan(previous.phy2log, current.phy2log, G, hw.node_of_gpu)
    t = plan.transfers
    key = (t.layer.astype(np.int64) * G + t.src_rank) * G + t.dst_rank
    uniq, counts = np.unique(key, return_counts=True)
    l, rest = np.divmod(uniq, G * G)
    s, d = np.divmod(rest, G)
    nbytes = counts * float(expert_bytes)
    share = 1.0 if background_share is None else background_share
    secs = transfer_time(nbytes, hw.same_node()[s, d], hw, share, counts)
    local = local_copy_time(plan.row_copies(sends=background_share is None), expert_bytes, hw)      # [L, G]
    sl, sg = np.nonzero(local > 0)
    return Copies(np.concatenate([l, sl]), np.concatenate([s, sg]), np.concatenate([d, sg]),
                  np.concatenate([nbytes, np.zeros(len(sl))]), np.concatenate([secs, local[sl, sg]]))


def install_time(copies: Copies, num_gpus: int, hw: Hardware) -> float:
    """Seconds that switching in a placement whose weights were copied in the background adds before the
    step's first layer, on the GPU that takes longest: the install's fixed host work (``hw.install_overhead``:
    the routing tables), its received experts copied from the staging buffers into their slots
    (2 x bytes / HBM bandwidth: read + write) and its copies between slots (the rows with src == dst of
    ``copies``, the background move)."""
    link = copies.src != copies.dst
    received = np.bincount(copies.dst[link], weights=copies.bytes[link], minlength=num_gpus)
    local = np.bincount(copies.dst[~link], weights=copies.seconds[~link], minlength=num_gpus)
    return hw.install_overhead + float((2.0 * received / hw.hbm + local).max(initial=0.0))


def moves_weights(previous: Placement | None, current: Placement) -> bool:
    """True if going from ``previous`` to ``current`` rewrites any slot (a re-plan; a change of
    shares alone moves nothing)."""
    return previous is not None and previous is not current and not np.array_equal(previous.phy2log,
                                                                                    current.phy2log)


@dataclass
class PlacementPhases:
    """The phases a placement decides, seconds [L, G] each (links, hosts and collective skew included).

    dispatch_link / combine_link: their link parts; traffic: float [L, G, G] tokens dispatched
    from home GPU g to GPU h; gpu_tokens: float [L, G] FFN tokens per GPU; skew: float [L, 3] the
    collective skew included in dispatch, correction and combine.
    """

    dispatch: np.ndarray
    correction: np.ndarray
    ffn: np.ndarray
    combine: np.ndarray
    dispatch_link: np.ndarray
    combine_link: np.ndarray
    gpu_tokens: np.ndarray
    has_correction: bool
    skew: np.ndarray | None = None

    def layer_time(self) -> np.ndarray:
        """float [L]: the part of the layer time the placement decides (closed form: the maxima
        over GPUs of dispatch, correction, FFN and combine)."""
        return row_max(self.dispatch) + row_max(self.correction) + row_max(self.ffn) + row_max(self.combine)


def placement_phases(p: Placement, src_counts: np.ndarray | None, predicted_src: np.ndarray | None,
                     model: ModelConfig, hw: Hardware, home_frac: np.ndarray | None = None,
                     arrival: np.ndarray | None = None, counts: np.ndarray | None = None) -> PlacementPhases:
    """Dispatch, correction, FFN and combine of every layer and GPU under placement ``p``.

    src_counts: float [L, G, E] (token, expert) assignments by home GPU; predicted_src: the
    correctly predicted part of them when tokens are routed directly (token-to-expert
    prediction), else None (every token is dispatched after the gate); home_frac: float [G]
    when every GPU's tokens of ``src_counts`` have the same expert mix (:func:`route`); arrival:
    float [L, G] seconds each GPU works between the previous combine and the dispatch (predictor +
    attention), for the dispatch's collective skew (None: the GPUs arrive together); counts: float
    [L, E] the expert counts of one mix, in place of ``src_counts`` (None) when ``home_frac`` is given
    and ``predicted_src`` is None.

    Collective skew (:func:`sim.cost.collective_skew`): the dispatch's from ``arrival``, and from
    layer 1 on no more than the previous layer's combine's (the GPUs leave a combine that one of them
    reached clearly last together); the correction's as for GPUs arriving together (they leave the
    dispatch together); the combine's from the FFN finish times.
    """
    if counts is not None:
        if home_frac is None or predicted_src is not None:
            raise ValueError("placement_phases: counts stand in for one mix's assignments: they need home_frac "
                             "and no predicted_src")
        L, E = counts.shape
        G = len(home_frac)
    elif home_frac is not None:
        L, G, E = src_counts.shape
        g = int(np.argmax(home_frac))                        # one GPU's row holds the whole mix
        counts = src_counts[:, g, :] / home_frac[g]          # [L, E]
    else:
        L, G, E = src_counts.shape
        counts = src_counts.sum(axis=1)                      # [L, E]
    # FFN: tokens per slot = expert tokens x the slot's share
    slot_tokens = p.slot_loads(counts)                       # [L, P]
    ffn, gpu_tokens = ffn_time_rows(slot_tokens, p.slots_per_gpu, model, hw)   # [L, G] each
    bpt = model.token_bytes
    layout = layout_time(hw)[None, :]                        # [1, G]
    exact = predicted_src is not None and predicted_src is src_counts   # every token predicted right: no correction
    if predicted_src is not None and not exact:
        # direct routing: the predicted layout is known, correct tokens go without a layout
        # exchange; the mispredicted ones follow in a correction all-to-all that needs one
        main = route(predicted_src, p)                       # [L, G, G]
        fix = route(src_counts - predicted_src, p)
        link = alltoall_time(main, bpt, hw)
        dispatch = link + dispatch_host_time(main.sum(axis=2), model, hw)
        any_fix = (np.abs(fix).sum(axis=(1, 2)) > 1e-9)[:, None]
        correction = np.where(any_fix, layout + alltoall_time(fix, bpt, hw)
                              + dispatch_host_time(fix.sum(axis=2), model, hw), 0.0)
        traffic = main + fix
        rows = traffic.sum(axis=2)
        returned = returned_rows(traffic) if hw.combine_return_row else 0.0
    elif home_frac is not None:
        # one expert mix on every GPU: the traffic is home_frac[g] x the tokens GPU h takes (:func:`route`)
        link = alltoall_outer_time(home_frac, gpu_tokens, bpt, hw)
        rows = home_frac[None, :] * gpu_tokens.sum(axis=1, keepdims=True)
        returned = gpu_tokens * (1.0 - home_frac[None, :]) if hw.combine_return_row else 0.0   # g's from others
        dispatch = (0.0 if exact else layout) + link + dispatch_host_time(rows, model, hw)
        correction = np.zeros((L, G))
    else:
        traffic = route(src_counts, p)
        link = alltoall_time(traffic, bpt, hw)
        rows = traffic.sum(axis=2)
        returned = returned_rows(traffic) if hw.combine_return_row else 0.0
        dispatch = (0.0 if exact else layout) + link + dispatch_host_time(rows, model, hw)
        correction = np.zeros((L, G))
    # without a correction the combine sends back what the dispatch sent: each GPU's max(send,
    # receive) and its peers are the same
    combine_link = link if predicted_src is None or exact else alltoall_time(np.swapaxes(traffic, 1, 2), bpt, hw)
    combine = combine_link + combine_host_time(rows, model, hw, returned)
    if hw.compute_units:
        ffn = shared_compute(ffn, hw)
    if hw.combine_together:
        combine = combine + combine_together(ffn, hw)[:, None]
    skew = np.zeros((L, 3))
    if hw.collective_skew:
        # the next phase starts when the latest rank has left the collective
        skew[:, 0] = hw.collective_skew if arrival is None else collective_skew(arrival, hw)
        skew[:, 1] = np.where(correction.max(axis=1) > 0, hw.collective_skew, 0.0)
        skew[:, 2] = collective_skew(ffn, hw)
        # ranks that all waited in a combine for one last rank leave it together: the next layer's dispatch
        # keeps no more skew than that combine
        skew[1:, 0] = np.minimum(skew[1:, 0], skew[:-1, 2])
        dispatch = dispatch + skew[:, :1]
        correction = np.where(correction > 0, correction + skew[:, 1:2], 0.0)
        combine = combine + skew[:, 2:]
    return PlacementPhases(dispatch, correction, ffn, combine, link, combine_link, gpu_tokens,
                           predicted_src is not None, skew)


def returned_rows(traffic: np.ndarray) -> np.ndarray:
    """float [..., G]: the rows each GPU took from the others in a dispatch of ``traffic`` [..., G, G] (and
    sends back in the combine)."""
    return traffic.sum(axis=-2) - np.diagonal(traffic, axis1=-2, axis2=-1)


def build_step_work(plan: StepPlan, copies: Copies | None, loads: StepLoads, model: ModelConfig,
                    workload: WorkloadConfig, hw: Hardware, copy_bytes: np.ndarray | None = None,
                    replan_host: float = 0.0, attention: np.ndarray | None = None,
                    attention_compute: np.ndarray | None = None) -> StepWork:
    """Every phase's duration on every GPU for one step under one plan.

    copies: the weight copies to schedule inside the step's layers (or None); copy_bytes: float [L]
    bytes the step's re-plan copies (default: those of ``copies``); replan_host: seconds of host work
    applying a new placement before the first layer; attention: float [G] seconds of each GPU's
    attention block per layer (default: :func:`attention_time` of its tokens under ``workload``), and
    attention_compute its compute part (default: :func:`attention_compute_time` of the same; needed
    for a predictor that runs beside it, :func:`sim.cost.beside_attention`).
    """
    L, G = loads.counts.shape[0], len(loads.home_tokens)
    if attention is None:
        attention = attention_time(loads.home_tokens, model, workload, hw)
    attn = _on_layers(attention, L, G)
    pred = _on_layers(np.asarray(plan.predictor_s, dtype=np.float64), L, G)
    if hw.predictor_overlap:                       # beside the attention: only what sticks out
        if attention_compute is None:
            attention_compute = attention_compute_time(loads.home_tokens, model, workload, hw)
        pred_compute = 0.0 if plan.predictor_compute_s is None else plan.predictor_compute_s
        pred = _on_layers(beside_attention(attention, attention_compute, plan.predictor_s, pred_compute, hw), L, G)
    if hw.compute_units:
        # GPUs of a node share processors: predictor and attention, which all GPUs start at once, stretch
        busy = pred + attn
        stretch = np.divide(shared_compute(busy, hw), busy, out=np.ones_like(busy), where=busy > 0)
        attn, pred = attn * stretch, pred * stretch
    if loads.mix_counts is not None and plan.predicted_src is None:     # one mix: priced from its counts
        ph = placement_phases(plan.placement, None, None, model, hw, loads.home_frac, arrival=pred + attn,
                              counts=loads.mix_counts)
    else:
        ph = placement_phases(plan.placement, loads.src_counts, plan.predicted_src, model, hw, loads.home_frac,
                              arrival=pred + attn)
    copies = copies if copies is not None else Copies.empty()
    if copy_bytes is None:
        copy_bytes = np.bincount(copies.layer, weights=copies.bytes, minlength=L) if len(copies) else np.zeros(L)
    return StepWork(pred, attn, ph.dispatch, ph.correction, ph.ffn, ph.combine, copies, ph.gpu_tokens,
                    loads.counts, copy_bytes, ph.has_correction, ph.skew, ph.dispatch_link,
                    ph.combine_link, replan_host)


def _on_layers(per_gpu: np.ndarray, L: int, G: int) -> np.ndarray:
    """float [L, G]: ``per_gpu`` [G] (or what broadcasts to it) on every layer, a new array (the phases'
    arithmetic on it runs faster than on a broadcast view)."""
    return np.array(np.broadcast_to(per_gpu, (L, G)))


def copy_port_busy(copies: Copies, num_layers: int, num_gpus: int) -> np.ndarray:
    """float [L, G]: seconds each GPU is busy with copies: the larger of sending and of receiving
    followed by its work within the GPU (rows with src == dst)."""
    out = np.zeros((num_layers, num_gpus))
    send = np.zeros((num_layers, num_gpus))
    link = copies.src != copies.dst
    np.add.at(out, (copies.layer, copies.dst), copies.seconds)
    np.add.at(send, (copies.layer[link], copies.src[link]), copies.seconds[link])
    return np.maximum(out, send)


def phase_maxima(work: StepWork) -> np.ndarray:
    """float [L, 5]: per layer, the maxima over GPUs of predictor + attention, dispatch, correction,
    FFN and combine, in the order they run (the closed form's terms)."""
    out = np.empty((work.attention.shape[0], 5))
    for j, phase in enumerate((work.predictor + work.attention, work.dispatch, work.correction, work.ffn,
                               work.combine)):
        out[:, j] = row_max(phase)
    return out


def closed_form_layer_times(work: StepWork, copy_policy: str) -> np.ndarray:
    """Layer times [L] with no overlap effects and no contention (docs/simulator.md):

    T_layer = H + C + max_g(P + A) + max_g D + max_g X + max_g F + max_g M

    where H = the re-plan host time (first layer only), C = max over GPUs of their copy-port
    busy time when the copy policy is ``critical``, and 0 otherwise (copies assumed hidden).
    Exact when no GPU's link carries copies and dispatch traffic at once, no port serves two
    copies at once, and no background copy is in flight.
    """
    L, G = work.attention.shape
    t = phase_maxima(work).sum(axis=1)
    if copy_policy == "critical" and len(work.copies):
        t = t + copy_port_busy(work.copies, L, G).max(axis=1)
    if work.replan_host:
        t = t.copy()
        t[0] += work.replan_host
    return t
