"""What a strategy predicts before it re-plans: layer times under a placement, and copy costs.

* :class:`LayerTimeModel` is the cost model seen by the ``timeaware`` planner
  (:mod:`moe_gps.placement.timeaware`): for slot contents and tokens per slot it gives each
  layer's predicted dispatch + FFN + combine time, from per-GPU sent and received tokens
  (no [G, G] traffic matrix, so a planner can call it once per move).
* :func:`phases_time` is the exact closed form of the same part of the layer (the one the
  event model equals without copies): the planner's result is checked against it.
* :class:`CopyCost` predicts what a re-plan's copies cost under the copy policy, as the
  ``min_gain`` rule needs (docs/simulator.md, "How strategies re-plan and copy").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from moe_gps.config.schema import ModelConfig, WorkloadConfig
from moe_gps.placement import Placement
from moe_gps.placement.placement import gpu_sums, row_max
from moe_gps.placement.timeaware import home_layers, static_slots
from sim.cost import (Hardware, attention_compute_time, attention_time, beside_attention, combine_host_time,
                      combine_wait, dispatch_host_time, ffn_time, ffn_time_rows, layout_time, shared_compute,
                      transfer_time)
from sim.work import Copies, PlacementPhases, copy_port_busy, install_time, placement_phases


class LayerTimeModel:
    """Predicted dispatch + FFN + combine time of each layer, per GPU (the ``timeaware`` planner's
    :class:`~moe_gps.placement.timeaware.TimeModel`), averaged over K load scenarios.

    src: float [L, G, E], or [K, L, G, E], believed (token, expert) assignments by home GPU in each
    scenario; plan_loads: float [L, E] the loads the planner places tokens of (default: the mean of
    the scenarios). A planned slot takes the share ``tokens / plan_loads[e]`` of its expert, and in
    scenario k the tokens ``share x (tokens of e in k)``. Per layer and GPU g, with rows_g its FFN
    tokens, local_g those of them that start on g, home_g the assignments that start on g, split per
    fabric f (peers on g's node, peers on other nodes):

        recv_f(g) = tokens g's replicas take from peers on f;  send_f(g) = tokens g sends to them
        link(g) = max_f [max(send_f, recv_f) h a / B_f + alpha_f (peers on f)]
        D(g) = [layout] + link(g) + dispatch host(home_g) + skew0
        C(g) = link(g) + combine host(home_g, rows g took from the others) + skew(FFN)
        layer = max_g FFN(g) + max_g D(g) + max_g C(g)

    (skew0: the collective skew of GPUs arriving together; skew(FFN): that of the combine, which the GPUs
    reach when their FFN ends, :func:`sim.cost.collective_skew`), the closed form of :func:`phases_time`
    except that every peer is counted in the latency term (the exact form counts only peers that exchange
    tokens). ``direct``: tokens are routed
    without a layout exchange (token-to-expert prediction, the oracle). ``home_frac`` float [G]: every
    GPU's tokens have the same expert mix (``src`` = counts x home_frac), so that the share of an
    expert's tokens starting on g is home_frac[g] whatever the expert, and the sums above are
    per-GPU products instead of gathers over [K, L, G, E].
    """

    def __init__(self, src: np.ndarray, slots_per_gpu: int, model: ModelConfig, hw: Hardware,
                 direct: bool = False, plan_loads: np.ndarray | None = None,
                 home_frac: np.ndarray | None = None) -> None:
        src = np.asarray(src, dtype=np.float64)
        self.src = src[None] if src.ndim == 3 else src                          # [K, L, G, E]
        K, L, G, E = self.src.shape
        self.S, self.model, self.hw = slots_per_gpu, model, hw
        self.total = self.src.sum(axis=2)                                         # [K, L, E]
        self.plan = self.total.mean(axis=0) if plan_loads is None else np.asarray(plan_loads, dtype=np.float64)
        self.node = hw.node_of_gpu
        self.nodes = int(self.node.max()) + 1 if G else 1
        per_node = G // self.nodes
        self.mix = None if home_frac is None else np.asarray(home_frac, dtype=np.float64)
        if self.mix is not None:
            # the share of an expert's tokens that start on g's node, per GPU g: [G]
            self.mix_node = np.bincount(self.node, weights=self.mix, minlength=self.nodes)[self.node]
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                self.frac = np.where(self.total[:, :, None, :] > 0, self.src / self.total[:, :, None, :], 1.0 / G)
            if self.nodes > 1:      # share of each expert's tokens that start on each node: [K, L, nodes, E]
                self.fnode = np.stack([self.frac[:, :, self.node == b, :].sum(axis=2) for b in range(self.nodes)],
                                      axis=2)
        home = self.src.sum(axis=3)                                               # [K, L, G]
        self.home = home
        skew = hw.collective_skew
        self.dhost = dispatch_host_time(home, model, hw) + skew + (0.0 if direct else layout_time(hw))
        self.chost = combine_host_time(home, model, hw)
        self.lat_intra = hw.intra_lat * (per_node - 1)
        self.lat_inter = hw.inter_lat * (G - per_node)
        self.bpt = model.token_bytes

    def evaluate(self, slot_exp: np.ndarray, slot_tokens: np.ndarray,
                 layers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """slot_exp: int [n, P]; slot_tokens: float [n, P] in plan units; layers: int [n] -> (seconds
        [n] per layer, seconds [n, G] per GPU), each the mean over the scenarios."""
        return self._totals(layers, **self._sums(self._parts(slot_exp, slot_tokens, layers)))

    # -- moves: what the timeaware planner tries, without evaluating whole layers again
    def begin(self, slot_exp: np.ndarray, slot_tokens: np.ndarray,
              layers: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
        """The per-GPU sums of ``n`` layers' contents, for :meth:`moved` and :meth:`apply`, and their
        :meth:`evaluate`."""
        state = {"layers": np.asarray(layers), **self._parts(slot_exp, slot_tokens, layers)}
        return (state, *self._totals(state["layers"], **self._sums(state)))

    def moved(self, state: dict, rows: np.ndarray, src: np.ndarray, dst: np.ndarray, expert: np.ndarray,
              x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        """:meth:`evaluate` of the ``state`` rows ``rows`` [m] with ``x`` [m] plan tokens of ``expert`` [m]
        moved from slot ``src`` [m] to slot ``dst`` [m] (which takes the expert if it was empty), and
        the moved rows' parts, for :meth:`apply`. Only the two GPUs' sums change (and, across nodes,
        what the two nodes take from every GPU), so a move costs O(K G) instead of a layer's O(K P)."""
        parts = self._move(state, rows, src, dst, expert, x)
        return (*self._totals(parts["layers"], **self._sums(parts)), parts)

    @staticmethod
    def apply(state: dict, rows: np.ndarray, moved: dict, pick: np.ndarray) -> None:
        """Make moves priced by :meth:`moved` in ``state``: its rows ``pick`` [n] become the
        ``state`` rows ``rows`` [n] (distinct)."""
        m = moved["layers"].shape[0]
        both = np.concatenate((pick, pick + m))               # the move's two GPUs' slots, as in "tok"
        state["tok"][:, np.concatenate((rows, rows))[:, None], moved["slots"][both]] = moved["tok"][:, both]
        for k, v in moved.items():
            if k not in ("tok", "slots", "layers"):
                state[k][:, rows] = v[:, pick]

    def _parts(self, slot_exp: np.ndarray, slot_tokens: np.ndarray, layers: np.ndarray) -> dict:
        """Per scenario: tokens per slot [K, n, P] and the per-GPU sums [K, n, G] the layer time is made of."""
        n, P = slot_exp.shape
        S = self.S
        G = P // S
        E = self.plan.shape[1]
        e = np.maximum(slot_exp, 0)
        gpu = np.arange(P) // S
        lr = layers[:, None]
        plan = self.plan[lr, e]
        share = np.divide(slot_tokens, plan, out=np.zeros_like(slot_tokens), where=plan > 0)
        tok = share[None] * self.total[:, lr, e]                                  # [K, n, P]
        K = tok.shape[0]
        ffn, rows = ffn_time_rows(tok, S, self.model, self.hw)
        out = {"tok": tok, "ffn": ffn, "rows": rows}
        if self.mix is not None:
            out["local"] = rows * self.mix
            if self.nodes > 1:
                on_node = rows.reshape(K, n, self.nodes, G // self.nodes).sum(axis=3)[:, :, self.node]   # [K, n, G]
                out["to_node"] = on_node * self.mix
                out["inn"] = rows * self.mix_node
            return out
        out["local"] = gpu_sums(tok * self.frac[:, lr, gpu[None, :], e], S)
        if self.nodes > 1:
            # tokens g's replicas take from g's node, and tokens g sends to its node: per GPU, over the
            # slots of its own node only
            # (the tokens of each expert on each node's slots, W [K, n, nodes, E], times g's share of them)
            B = self.nodes
            key = (np.arange(K * n)[:, None] * B + self.node[gpu][None, :]) * E + np.tile(e, (K, 1))
            W = np.bincount(key.ravel(), weights=tok.ravel(), minlength=K * n * B * E).reshape(K, n, B, E)
            every = n == self.frac.shape[1] and (layers == np.arange(n)).all()
            frac = (self.frac if every else self.frac[:, layers]).reshape(K, n, B, G // B, E)
            out["to_node"] = np.einsum("knbje,knbe->knbj", frac, W).reshape(K, n, G)   # g -> its node's replicas
            out["inn"] = gpu_sums(tok * self.fnode[:, lr, self.node[gpu][None, :], e], S)
        return out

    @staticmethod
    def _sums(parts: dict) -> dict:
        return {k: v for k, v in parts.items() if k not in ("tok", "layers", "slots")}

    def _move(self, state: dict, rows: np.ndarray, src: np.ndarray, dst: np.ndarray, expert: np.ndarray,
              x: np.ndarray) -> dict:
        """The parts of ``state`` rows ``rows`` after the moves (new arrays, [K, m, ...]; "tok" and "slots":
        only the slots of the two GPUs of each move, [K, 2 m, S] and int [2 m, S], the source GPUs' first;
        "layers": int [m])."""
        S = self.S
        lr = state["layers"][rows]
        e = np.maximum(expert, 0)
        m = len(rows)
        ar = np.arange(m)
        plan = self.plan[lr, e]
        per = np.divide(x, plan, out=np.zeros(m), where=plan > 0)
        dk = per[None, :] * self.total[:, lr, e]                                  # [K, m] tokens moved
        h, c = src // S, dst // S
        # the slots of each move's two GPUs: rows j < m of h's, rows m + j of c's (the same where h == c)
        g2 = np.concatenate((h, c))
        slots = (g2 * S)[:, None] + np.arange(S)                                    # [2 m, S]
        tok = state["tok"][:, np.concatenate((rows, rows))[:, None], slots]         # [K, 2 m, S]
        tok[:, ar, src - h * S] -= dk
        tok[:, m + ar, dst - c * S] += dk
        within = np.flatnonzero(h == c)
        if len(within):             # a move within one GPU: both changes in its block, in this order
            tok[:, within, dst[within] - h[within] * S] += dk[:, within]
            tok[:, m + within] = tok[:, within]
        out = {"tok": tok, "slots": slots, "layers": lr, "ffn": state["ffn"][:, rows],
               "local": state["local"][:, rows], "rows": state["rows"][:, rows]}
        mix = self.mix
        out["ffn"][:, np.concatenate((ar, ar)), g2] = ffn_time(tok, S, self.model, self.hw)[..., 0]
        for g, sign in ((h, -1.0), (c, 1.0)):
            out["local"][:, ar, g] += sign * dk * (mix[g] if mix is not None else self.frac[:, lr, g, e])
            out["rows"][:, ar, g] += sign * dk
        if self.nodes > 1:
            out["inn"] = state["inn"][:, rows]
            if mix is not None:
                out["inn"][:, ar, h] -= dk * self.mix_node[h]
                out["inn"][:, ar, c] += dk * self.mix_node[c]
                frac = mix[None, None, :]                                                  # [1, 1, G]
            else:
                out["inn"][:, ar, h] -= dk * self.fnode[:, lr, self.node[h], e]
                out["inn"][:, ar, c] += dk * self.fnode[:, lr, self.node[c], e]
                frac = np.moveaxis(self.frac[:, lr, :, e], 0, 1)                          # [K, m, G]
            # every GPU of c's node sends the moved tokens it holds to c now, and those of h's node no longer to h
            side = ((self.node[None, :] == self.node[c][:, None]).astype(np.float64)
                    - (self.node[None, :] == self.node[h][:, None]))                       # [m, G]
            out["to_node"] = state["to_node"][:, rows] + dk[:, :, None] * frac * side[None]
        return out

    def _totals(self, layers: np.ndarray, ffn: np.ndarray, local: np.ndarray, rows: np.ndarray,
                to_node: np.ndarray | None = None, inn: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        hw = self.hw
        if hw.compute_units:
            ffn = shared_compute(ffn, hw)
        home = self.home[:, layers]
        if to_node is None:
            link = np.maximum(home - local, rows - local) * (self.bpt / hw.intra_bw) + self.lat_intra
        else:
            intra = np.maximum(to_node - local, inn - local) * (self.bpt / hw.intra_bw) + self.lat_intra
            inter = np.maximum(home - to_node, rows - inn) * (self.bpt / hw.inter_bw) + self.lat_inter
            link = np.maximum(intra, inter)
        d = link + self.dhost[:, layers]
        wait = combine_wait(ffn, hw)
        c = link + self.chost[:, layers] + np.asarray(wait)[..., None]
        if hw.combine_return_row:
            c = c + hw.combine_return_row * (rows - local)                          # rows g sends back
        layer = row_max(ffn) + row_max(d) + row_max(c)
        return _mean0(layer), _mean0(ffn + d + c)


def _mean0(x: np.ndarray) -> np.ndarray:
    """``x.mean(axis=0)`` (the same numbers: the sum over the first axis / its length), without its overhead."""
    return np.add.reduce(x, axis=0) / x.shape[0]


def time_model(src: np.ndarray, slots_per_gpu: int, model: ModelConfig, hw: Hardware, direct: bool = False,
               plan_loads: np.ndarray | None = None, home_frac: np.ndarray | None = None) -> LayerTimeModel:
    """The planner's time model of believed loads ``src``: float [L, G, E], or [K, L, G, E] for K
    scenarios (then the mean over them), for plans made from ``plan_loads`` (``home_frac`` [G]: ``src``
    is counts spread over the GPUs by it, the same expert mix on every GPU)."""
    return LayerTimeModel(src, slots_per_gpu, model, hw, direct, plan_loads, home_frac)


def phases_time(p: Placement, src: np.ndarray, model: ModelConfig, hw: Hardware,
                direct: bool = False, home_frac: np.ndarray | None = None) -> np.ndarray:
    """float [L]: the exact closed-form dispatch + FFN + combine time of each layer under ``p``
    (every token routed after the gate, or, with ``direct``, straight from the prediction ``src``);
    ``src`` [K, L, G, E]: the mean over the K scenarios; ``home_frac``: float [G] when every GPU's
    tokens have the same expert mix (:func:`sim.work.route`)."""
    if src.ndim == 4:
        return np.mean([phases_time(p, x, model, hw, direct, home_frac) for x in src], axis=0)
    return placement_phases(p, src, src if direct else None, model, hw, home_frac).layer_time()


def static_layers(p: Placement) -> np.ndarray:
    """bool [L]: the layers of ``p`` that keep every expert's home slot of the static layout."""
    return home_layers(p, static_slots(p.num_layers, p.num_experts, p.num_gpus, p.slots_per_gpu), p.num_gpus)


def home_routing(p: Placement) -> Placement:
    """The same slots with, in every layer that keeps the static layout's home slots, each expert's
    tokens on its home slot (no duplication's routing; the replicas elsewhere keep their weights
    and take no tokens). Other layers are unchanged."""
    base = static_slots(p.num_layers, p.num_experts, p.num_gpus, p.slots_per_gpu)
    share = np.where(static_layers(p)[:, None], (base >= 0).astype(np.float64), p.replica_share)
    return Placement(p.phy2log, p.num_gpus, p.num_experts, share, algorithm=p.algorithm,
                     allow_colocated=p.allow_colocated, meta=p.meta)


@functools.lru_cache(maxsize=16)
def static_layout(num_layers: int, num_experts: int, num_gpus: int, slots_per_gpu: int) -> Placement:
    """No duplication in a shape with ``slots_per_gpu`` slots: every expert with all its tokens in its
    home slot of the static layout; the other slots hold expert 0's weights and take no tokens. (A
    layer of :func:`home_routing` at home has this one's times, whatever its other slots hold.) Made
    once per shape, read-only (every caller shares it)."""
    base = static_slots(num_layers, num_experts, num_gpus, slots_per_gpu)
    p = Placement(np.where(base >= 0, base, 0), num_gpus, num_experts, (base >= 0).astype(np.float64),
                  algorithm="none", allow_colocated=True)
    p.phy2log.setflags(write=False)                    # shared by every caller
    p.replica_share.setflags(write=False)
    return p


def pick_layers(a: Placement, b: Placement, keep_b: np.ndarray) -> Placement:
    """``a`` with the layers of ``b`` where ``keep_b`` [L] is True (slots and shares)."""
    phy2log = np.where(keep_b[:, None], b.phy2log, a.phy2log)
    share = np.where(keep_b[:, None], b.replica_share, a.replica_share)
    return Placement(phy2log, a.num_gpus, a.num_experts, share, algorithm=a.algorithm,
                     allow_colocated=a.allow_colocated or b.allow_colocated, meta=a.meta)


@dataclass
class CopyCost:
    """Predicted seconds that weight copies add to the steps, per copy policy.

    policy: critical | overlap | async | hidden;  share: the link share of background copies;
    attention: float [L] seconds of predictor + attention per layer (what overlapping copies hide
    under); link: float [L] seconds of dispatch and combine link time per layer (what background
    copies slow down); step: seconds of one step.
    """

    policy: str
    share: float
    hw: Hardware
    attention: np.ndarray
    link: np.ndarray
    step: float

    def replan(self, copies: Copies) -> float:
        """Seconds a re-plan with ``copies`` adds, the host time of applying it included:

        critical: replan_overhead + sum over layers of max_g busy_g        (the layer waits for its copies)
        overlap:  replan_overhead + sum over layers of max(0, max_g busy_g - attention)   (what attention
                  does not hide)
        async:    D * (sum of link / step) * share / (1 - share) + install,  D = max_g busy_g over all
                  layers (the job's length at the copies' share; meanwhile the collectives' link part
                  runs at 1 - share of the bandwidth); install: :func:`sim.work.install_time` (its fixed
                  part: install_overhead)
        hidden:   0
        busy_g = the larger of g's sending and its receiving followed by its copies between slots.
        """
        if self.policy == "hidden" or not len(copies):
            return 0.0
        L = len(self.attention)
        G = self.hw.num_gpus
        if self.policy == "async":
            busy = copy_port_busy(Copies(np.zeros_like(copies.layer), copies.src, copies.dst, copies.bytes,
                                         copies.seconds), 1, G)
            frac = float(self.link.sum() / self.step) if self.step > 0 else 0.0
            return float(busy.max()) * frac * self.share / (1 - self.share) + install_time(copies, G, self.hw)
        busy = copy_port_busy(copies, L, G).max(axis=1)
        if self.policy == "critical":
            return self.hw.replan_overhead + float(busy.sum())
        return self.hw.replan_overhead + float(np.maximum(busy - self.attention, 0.0).sum())

    def per_expert(self, expert_bytes: float) -> float:
        """Seconds one expert copied into one layer adds (the ``timeaware`` planner's copy penalty,
        before it is spread over the steps the plan serves): :meth:`replan` for one transfer on
        the node's fabric."""
        if self.policy == "hidden":
            return 0.0
        share = self.share if self.policy == "async" else 1.0
        t = float(transfer_time(expert_bytes, True, self.hw, share))
        if self.policy == "critical":
            return t
        if self.policy == "overlap":
            return max(0.0, t - float(self.attention.min(initial=0.0)))
        frac = float(self.link.sum() / self.step) if self.step > 0 else 0.0
        return t * frac * self.share / (1 - self.share)


def copy_cost(policy: str, share: float, phases: PlacementPhases, home_tokens: np.ndarray, predictor_s: np.ndarray,
              model: ModelConfig, workload: WorkloadConfig, hw: Hardware,
              predictor_compute: np.ndarray | float = 0.0) -> CopyCost:
    """The :class:`CopyCost` of a step whose placement-decided phases are ``phases`` (the
    placement in force) and whose GPUs hold ``home_tokens`` [G]; ``predictor_s`` [G] the predictor's
    seconds per layer and ``predictor_compute`` their compute part (:func:`sim.work.build_step_work`)."""
    a = attention_time(home_tokens, model, workload, hw)
    if hw.predictor_overlap:
        a = a + beside_attention(a, attention_compute_time(home_tokens, model, workload, hw), predictor_s,
                                 predictor_compute, hw)
    else:
        a = a + predictor_s
    attn = float(np.max(a, initial=0.0))
    L = phases.ffn.shape[0]
    link = (phases.dispatch_link + phases.combine_link).max(axis=1)
    step = float(phases.layer_time().sum() + attn * L)
    return CopyCost(policy, share, hw, np.full(L, attn), link, step)
