"""The planner's time model: a move priced from per-GPU sums equals evaluating the whole layer."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from moe_gps.config import load_cluster, load_model
from moe_gps.placement import Placement, plan_placement
from moe_gps.placement.layouts import contiguous
from moe_gps.placement.timeaware import _Moves
from sim.cost import Hardware
from sim.planning import time_model


def _case(nodes: int, K: int, seed: int):
    model = replace(load_model("mixtral-8x7b"), num_experts=16, num_layers=3, top_k=2)
    cluster = load_cluster("2x8xH100-ib" if nodes > 1 else "4xA100-nvlink")
    G = 8 if nodes > 1 else 4
    cluster = replace(cluster, num_gpus=G, gpus_per_node=G // nodes)
    hw = Hardware.from_config(cluster, model)
    rng = np.random.default_rng(seed)
    L, E = model.num_layers, model.num_experts
    src = rng.gamma(0.7, 50.0, size=(K, L, G, E)) * rng.integers(0, 2, size=(K, L, G, E))
    S = E // G + 1
    return model, hw, src, S


@pytest.mark.parametrize("nodes,K", [(1, 1), (1, 3), (2, 1), (2, 2)])
def test_moved_equals_evaluate(nodes, K):
    model, hw, src, S = _case(nodes, K, seed=nodes * 10 + K)
    L, G, E = src.shape[1:]
    P = G * S
    tm = time_model(src, S, model, hw)
    rng = np.random.default_rng(1)
    p = plan_placement(src.mean(axis=0).sum(axis=1), G, P - E, "eplb")
    exp = p.phy2log.copy()
    exp[:, rng.integers(0, P, 2)] = -1                                   # some empty slots
    tok = np.where(exp >= 0, rng.uniform(0, 40, size=exp.shape), 0.0)
    layers = np.arange(L)
    state, obj, gpu_t = tm.begin(exp, tok, layers)
    o0, g0 = tm.evaluate(exp, tok, layers)
    assert np.allclose(obj, o0) and np.allclose(gpu_t, g0)
    m = 40
    rows = rng.integers(0, L, m)
    src_slot = rng.integers(0, P, m)
    e = exp[rows, src_slot]
    # as the planner moves: to a slot of the same expert or an empty one
    dst_slot = np.array([rng.choice(np.flatnonzero(((exp[r] == x) | (exp[r] < 0)) & (np.arange(P) != s)))
                         for r, s, x in zip(rows, src_slot, e)])
    x = np.where(e >= 0, rng.uniform(0, 1, m) * tok[rows, src_slot], 0.0)
    o, g, after = tm.moved(state, rows, src_slot, dst_slot, e, x)
    ref = _Moves(tm)
    ref_state = ref.begin(exp, tok, layers)[0]
    o_ref, g_ref, ref_after = ref.moved(ref_state, rows, src_slot, dst_slot, e, x)
    assert np.allclose(o, o_ref, rtol=1e-10, atol=1e-15) and np.allclose(g, g_ref, rtol=1e-10, atol=1e-15)
    # applied moves (one per layer) leave the state equal to evaluating the moved layers afresh
    one = np.unique(rows, return_index=True)[1]
    tm.apply(state, rows[one], after, one)
    ref.apply(ref_state, rows[one], ref_after, one)
    o1, g1, _ = tm.moved(state, np.arange(L), np.zeros(L, int), np.zeros(L, int), np.zeros(L, int), np.zeros(L))
    o2, g2 = tm.evaluate(ref_state["exp"], ref_state["tok"], layers)
    assert np.allclose(o1, o2, rtol=1e-10) and np.allclose(g1, g2, rtol=1e-10)


@pytest.mark.parametrize("nodes", [1, 2])
def test_planner_plans_the_same_with_either_pricing(nodes):
    """timeaware with the model's own move pricing gives the plan that pricing by whole layers gives."""
    model, hw, src, S = _case(nodes, 2, seed=7)
    L, G, E = src.shape[1:]
    loads = src.mean(axis=0).sum(axis=1)
    tm = time_model(src, S, model, hw)
    prev = plan_placement(loads[::-1].copy(), G, G * S - E, "eplb")
    for previous, penalty in ((None, 0.0), (prev, 1e-5), (prev, np.inf)):
        a = plan_placement(loads, G, G * S - E, "timeaware", cost=tm, previous=previous, copy_penalty_s=penalty)
        b = plan_placement(loads, G, G * S - E, "timeaware", cost=_Plain(tm), previous=previous,
                           copy_penalty_s=penalty)
        assert np.array_equal(a.phy2log, b.phy2log)
        assert np.allclose(a.replica_share, b.replica_share, atol=1e-9)


class _Plain:
    """A time model with ``evaluate`` only (moves priced by whole layers)."""

    def __init__(self, tm):
        self.tm = tm

    def evaluate(self, slot_exp, slot_tokens, layers):
        return self.tm.evaluate(slot_exp, slot_tokens, layers)


def test_static_layout_times_a_layer_at_home_whatever_its_replicas_hold():
    """A layer of home_routing(p) that keeps the static layout takes the static layout's time (what
    the strategies' no-worse-than-home check reads from a cache per step)."""
    from sim.planning import home_routing, phases_time, static_layout

    model, hw, src, S = _case(2, 1, seed=3)
    src = src[0]
    L, G, E = src.shape
    base = contiguous(L, E, G, S)
    # every layer at home, its spare slots holding replicas of other GPUs' experts that take half their tokens
    spare = base < 0
    other = (np.arange(L * G * S).reshape(L, G * S) * 5) % E
    phy2log = np.where(spare, other, base)
    share = np.where(spare, 0.5, 1.0)
    for layer in range(L):
        for e in np.unique(phy2log[layer][spare[layer]]):
            reps = phy2log[layer] == e
            share[layer, reps] = 1.0 / reps.sum()
    p = Placement(phy2log, G, E, share, allow_colocated=True)
    t_static = phases_time(static_layout(L, E, G, S), src, model, hw)
    assert np.allclose(phases_time(home_routing(p), src, model, hw), t_static, rtol=1e-12)
    assert not np.allclose(phases_time(p, src, model, hw), t_static)              # its replicas take tokens


@pytest.mark.parametrize("nodes", [1, 2])
def test_same_mix_traffic_is_priced_as_the_outer_product(nodes):
    """When every GPU's tokens have the same expert mix, the O(L G) all-to-all equals the one of the
    [L, G, G] traffic, idle GPUs (no tokens, no replicas with tokens) included."""
    from sim.cost import alltoall_outer_time, alltoall_time
    from sim.work import placement_phases, route

    model, hw, src, S = _case(nodes, 1, seed=5 + nodes)
    L, G, E = src.shape[1:]
    counts = src[0].sum(axis=1)
    frac = np.random.default_rng(2).dirichlet(np.ones(G))
    frac[1] = 0.0                                                            # a GPU with no tokens of its own
    frac /= frac.sum()
    same = counts[:, None, :] * frac[None, :, None]
    p = plan_placement(counts, G, G * S - E, "eplb")
    traffic = route(same, p)
    takes = traffic.sum(axis=1)
    takes[0, 2] = 0.0                                                        # a GPU whose replicas take nothing
    outer = frac[None, :, None] * takes[:, None, :]
    assert np.allclose(alltoall_outer_time(frac, takes, model.token_bytes, hw),
                       alltoall_time(outer, model.token_bytes, hw), rtol=1e-12)
    for predicted in (None, same):
        a = placement_phases(p, same, predicted, model, hw, frac)
        b = placement_phases(p, same, predicted, model, hw)
        assert np.allclose(a.layer_time(), b.layer_time(), rtol=1e-12)


def test_counts_trace_simulates_the_same_with_and_without_the_outer_product(monkeypatch):
    from moe_gps.config import SimulateConfig, strategy_from_name
    import sim.work
    from moe_gps.trace.synth_counts import synthesize_counts
    from sim.run import simulate

    trace = synthesize_counts("mixtral-mmlu", num_steps=24, tokens_per_step=512, seed=3, num_layers=4)
    model = replace(load_model("mixtral-8x7b"), num_layers=4)
    cfg = SimulateConfig(cluster=replace(load_cluster("2x8xH100-ib"), num_gpus=8), model=model,
                         strategies=[strategy_from_name(n) for n in ("none", "eplb", "dist:ema", "oracle")])
    fast_path = sim.work.alltoall_outer_time
    outer = []
    monkeypatch.setattr(sim.work, "alltoall_outer_time", lambda *a: (outer.append(1), fast_path(*a))[1])
    fast = simulate(trace, cfg, progress=False)
    assert len(outer) > 24                              # the steps and the judgements took the outer product

    def gathered(frac, takes, bpt, hw):
        return sim.work.alltoall_time(frac[None, :, None] * takes[:, None, :], bpt, hw)

    monkeypatch.setattr(sim.work, "alltoall_outer_time", gathered)
    slow = simulate(trace, cfg, progress=False)
    for a, b in zip(fast.strategies, slow.strategies):
        assert np.allclose(a.layer_time, b.layer_time, rtol=1e-9), a.name


@pytest.mark.parametrize("nodes,K", [(1, 2), (2, 1), (2, 3)])
def test_same_mix_time_model_equals_the_general_one(nodes, K):
    """Loads with one expert mix on every GPU (src = counts x home_frac), priced from per-GPU
    products, give the times, moves and plans of the general model that gathers per expert."""
    model, hw, src, S = _case(nodes, K, seed=3 + nodes)
    L, G, E = src.shape[1:]
    P = G * S
    rng = np.random.default_rng(5)
    home = rng.dirichlet(np.ones(G) * 3)
    mixed = src.sum(axis=2)[:, :, None, :] * home[None, None, :, None]
    loads = mixed.mean(axis=0).sum(axis=1)
    general, fast = time_model(mixed, S, model, hw), time_model(mixed, S, model, hw, home_frac=home)
    p = plan_placement(loads, G, P - E, "eplb")
    tok = np.where(p.phy2log >= 0, rng.uniform(0, 40, size=p.phy2log.shape), 0.0)
    layers = np.arange(L)
    for a, b in zip(general.evaluate(p.phy2log, tok, layers), fast.evaluate(p.phy2log, tok, layers)):
        assert np.allclose(a, b, rtol=1e-12, atol=1e-18)
    sa, sb = general.begin(p.phy2log, tok, layers)[0], fast.begin(p.phy2log, tok, layers)[0]
    rows, src_slot = np.arange(L), rng.integers(0, P, L)
    e = p.phy2log[rows, src_slot]
    dst_slot = (src_slot + S) % P                                      # another GPU's slot
    x = 0.5 * tok[rows, src_slot]
    for a, b in zip(general.moved(sa, rows, src_slot, dst_slot, e, x)[:2],
                    fast.moved(sb, rows, src_slot, dst_slot, e, x)[:2]):
        assert np.allclose(a, b, rtol=1e-12, atol=1e-18)
    prev = plan_placement(loads[::-1].copy(), G, P - E, "eplb")
    for previous, penalty in ((None, 0.0), (prev, 1e-5), (prev, np.inf)):
        a = plan_placement(loads, G, P - E, "timeaware", cost=general, previous=previous, copy_penalty_s=penalty)
        b = plan_placement(loads, G, P - E, "timeaware", cost=fast, previous=previous, copy_penalty_s=penalty)
        assert np.array_equal(a.phy2log, b.phy2log)
        assert np.allclose(a.replica_share, b.replica_share, atol=1e-12)


def test_relabel_counts_the_experts_gpus_share():
    """relabel_gpus renumbers a plan's GPUs to the old numbers sharing the most experts: a plan whose
    GPUs are the old ones in another order (an expert held twice counted once) gets the old order back."""
    from moe_gps.placement.waterfill import relabel_gpus
    rng = np.random.default_rng(2)
    L, N, S, E = 4, 6, 3, 12
    old = np.stack([rng.permutation(np.r_[np.arange(E), rng.integers(0, E, N * S - E)]) for _ in range(L)])
    old[:, 1] = old[:, 0]                                               # GPU 0 holds an expert twice
    perm = np.stack([rng.permutation(N) for _ in range(L)])
    new = np.take_along_axis(old.reshape(L, N, S), perm[:, :, None], axis=1).reshape(L, N * S)
    back, _ = relabel_gpus(new, np.zeros(new.shape), old, N, E)
    assert np.array_equal(back, old)


def test_tokens_each_gpu_sends_to_its_node_by_hand():
    """to_node[g]: the tokens starting on g that go to replicas on g's own node, counted slot by slot."""
    model, hw, src, S = _case(2, 2, seed=11)
    K, L, G, E = src.shape
    tm = time_model(src, S, model, hw)
    p = plan_placement(src.mean(axis=0).sum(axis=1), G, G * S - E, "eplb")
    rng = np.random.default_rng(4)
    tok = rng.uniform(0, 30, size=p.phy2log.shape)
    layers = np.array([2, 0, 2])
    got = tm._parts(p.phy2log[layers], tok[layers], layers)["to_node"]
    node = hw.node_of_gpu
    want = np.zeros_like(got)
    for k in range(K):
        for r, l in enumerate(layers):
            total = src[k, l].sum(axis=0)                         # [E]
            for g in range(G):
                for slot in range(G * S):
                    e = p.phy2log[l, slot]
                    if node[slot // S] == node[g] and total[e] > 0:
                        share = tok[l, slot] / tm.plan[l, e]
                        want[k, r, g] += share * total[e] * src[k, l, g, e] / total[e]
    np.testing.assert_allclose(got, want, rtol=1e-10)
