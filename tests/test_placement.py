"""Placement planner: the Placement object, the algorithms, metrics and plan files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from moe_gps.errors import UserError
from moe_gps.placement import (ALGORITHMS, Capacity, Placement, balancedness, bytes_moved, load_placement,
                               placement_metrics, plan_placement, save_placement)
from moe_gps.placement.eplb import eplb
from moe_gps.placement.reference import eplb_reference
from moe_gps.placement.shares import optimal_shares

# DeepSeek EPLB README example: 2 layers x 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs
README_WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                 [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
README_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def skewed_loads(layers: int, experts: int, seed: int = 0, sigma: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(0.0, sigma, (layers, experts)) * 100


# ----------------------------------------------------------------------------- EPLB
def test_eplb_reproduces_deepseek_readme_example():
    p = plan_placement(README_WEIGHT, num_gpus=8, num_redundant=4, algorithm="eplb", num_nodes=2, num_groups=4)
    assert p.phy2log.tolist() == README_PHY2LOG
    assert p.meta["options"]["variant"] == "hierarchical"
    assert p.slots_per_gpu == 2 and p.num_slots == 16
    # replica counts and log2phy follow from phy2log
    assert p.replica_count.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    assert p.log2phy.shape == (2, 12, 2)
    assert p.log2phy[0, 5].tolist() == [0, 2] and p.log2phy[0, 0].tolist() == [12, -1]
    # the plain loop reference gives the same answer
    assert eplb_reference(README_WEIGHT, 16, 8, 2, 4) == README_PHY2LOG


def test_eplb_vectorised_equals_plain_reference_on_random_cases():
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(150):
        nodes, per_node = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        N = nodes * per_node
        groups = nodes * int(rng.integers(1, 3)) if rng.random() < 0.7 else int(rng.integers(1, 5))
        E = groups * int(rng.integers(1, 5))
        P = E + (-E) % N + N * int(rng.integers(0, 3))
        if P % nodes:
            continue
        L = int(rng.integers(1, 4))
        # integer loads make ties common: the tie rules must match too
        w = rng.integers(0, 6, (L, E)).astype(float) if rng.random() < 0.5 else rng.pareto(1.5, (L, E))
        assert eplb(w, P, N, nodes, groups)[0].tolist() == eplb_reference(w, P, N, nodes, groups)
        checked += 1
    assert checked > 100


def test_eplb_rejects_impossible_hierarchy():
    with pytest.raises(UserError, match="12 experts do not divide into 8 groups"):
        plan_placement(np.ones((1, 12)), 8, 4, "eplb", num_nodes=2, num_groups=8)
    with pytest.raises(UserError, match="GPUs do not divide over 3 nodes"):
        plan_placement(np.ones((1, 12)), 8, 4, "eplb", num_nodes=3, num_groups=3)


# ----------------------------------------------------------------------- none/greedy
def test_none_is_contiguous_and_spares_take_no_tokens():
    loads = skewed_loads(2, 8)
    p = plan_placement(loads, 4, 0, "none")
    assert p.phy2log.tolist() == [list(range(8))] * 2
    q = plan_placement(loads, 4, 4, "none")            # 3 slots per GPU: 2 experts + 1 spare
    assert q.phy2log[:, [0, 1, 3, 4, 6, 7, 9, 10]].tolist() == [list(range(8))] * 2
    np.testing.assert_allclose(q.gpu_loads(loads), p.gpu_loads(loads))
    assert (q.replica_share[:, 2::3] == 0).all()


def test_none_round_robin_is_vllm_round_robin():
    """vLLM ``--expert-placement-strategy round_robin`` (vllm/config/parallel.py, ParallelConfig
    docstring): with 4 experts and 2 ranks, rank 0 holds experts [0, 2] and rank 1 [1, 3]."""
    loads = np.array([[4.0, 3.0, 2.0, 1.0]])
    p = plan_placement(loads, 2, 0, "none", layout="round_robin")
    assert p.phy2log.tolist() == [[0, 2, 1, 3]] and p.meta["options"]["layout"] == "round_robin"
    np.testing.assert_allclose(p.gpu_loads(loads), [[6.0, 4.0]])
    assert plan_placement(loads, 2, 0, "none").phy2log.tolist() == [[0, 1, 2, 3]]     # linear
    q = plan_placement(skewed_loads(2, 10), 4, 2, "none", layout="round_robin")       # 3 slots per GPU
    assert q.phy2log[0, [0, 1, 2, 3, 4, 5, 6, 7, 9, 10]].tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 3, 7]
    assert (q.replica_share[:, [8, 11]] == 0).all() and (q.replica_share.sum(axis=1) == 10).all()
    with pytest.raises(UserError, match="layout must be one of linear, round_robin"):
        plan_placement(loads, 2, 0, "none", layout="zigzag")


def test_vllm_balancedness_is_the_sum_ratio_not_the_mean_of_ratios():
    """vLLM logs sum_l mean_g / sum_l max_g (vllm/distributed/eplb/eplb_state.py,
    _compute_eplb_load_stats); MoE-GPS's ``balancedness`` is per layer, averaged."""
    from moe_gps.placement import vllm_balancedness

    gpu = np.array([[10.0, 30.0],     # layer 0: mean 20, max 30 -> 0.667
                    [1.0, 1.0]])      # layer 1: mean 1,  max 1  -> 1.0
    assert balancedness(gpu).mean() == pytest.approx((2 / 3 + 1) / 2)
    assert vllm_balancedness(gpu) == pytest.approx(21 / 31)
    loads = skewed_loads(4, 8)
    p = plan_placement(loads, 4, 0, "none")
    m = placement_metrics(p, loads).summary()
    g = p.gpu_loads(loads)
    assert m["balancedness_vllm"] == pytest.approx(g.mean(axis=1).sum() / g.max(axis=1).sum())
    assert vllm_balancedness(np.zeros((2, 3))) == 1.0


def test_greedy_follows_paper_algorithm_on_a_hand_example():
    # GPU0 holds experts {0, 1} = 11 tokens, GPU1 holds {2, 3} = 2 tokens. The gap is 9:
    # copy expert 0 (most popular on the hottest GPU) to GPU1 and move 9/2 = 4.5 tokens.
    loads = np.array([[10.0, 1.0, 1.0, 1.0]])
    p = plan_placement(loads, 2, 2, "greedy", threshold=0.0)
    assert p.phy2log.tolist() == [[0, 1, 2, 2, 3, 0]] or p.phy2log[0, :2].tolist() == [0, 1]
    slots0 = p.log2phy[0, 0][p.log2phy[0, 0] >= 0]
    assert sorted((p.gpu_of_slot[slots0]).tolist()) == [0, 1]
    np.testing.assert_allclose(p.gpu_loads(loads), [[6.5, 6.5]])
    np.testing.assert_allclose(sorted(p.replica_share[0, slots0]), [0.45, 0.55])


def test_greedy_respects_threshold_and_copy_cap():
    loads = skewed_loads(4, 16, seed=3)
    none = balancedness(plan_placement(loads, 4, 4, "none").gpu_loads(loads))
    capped = plan_placement(loads, 4, 4, "greedy", threshold=0.0, max_copies=1)
    assert ((capped.replica_share > 0).sum(axis=1) <= 17).all()
    full = plan_placement(loads, 4, 4, "greedy", threshold=0.0)
    b_capped, b_full = balancedness(capped.gpu_loads(loads)), balancedness(full.gpu_loads(loads))
    assert (b_full >= b_capped - 1e-12).all() and (b_capped >= none - 1e-12).all()
    assert b_full.mean() > none.mean() + 0.05


# -------------------------------------------------------------------------- waterfill
def test_waterfill_never_worse_than_eplb_and_better_on_skew():
    loads = skewed_loads(8, 64, seed=1)
    for R in (8, 16):
        e = balancedness(plan_placement(loads, 8, R, "eplb").gpu_loads(loads))
        w = plan_placement(loads, 8, R, "waterfill")
        bw = balancedness(w.gpu_loads(loads))
        assert (bw >= e - 1e-9).all()
        assert bw.mean() > e.mean()
        assert not w.allow_colocated


def test_waterfill_with_fewer_slots_matches_eplb_with_more():
    # Mixtral-like: 8 experts on 8 GPUs. EPLB needs 16 redundant slots for what waterfill
    # reaches with 8 (uneven shares make each copy count fully).
    loads = skewed_loads(16, 8, seed=2, sigma=0.35)
    eplb16 = balancedness(plan_placement(loads, 8, 16, "eplb").gpu_loads(loads)).mean()
    ours8 = balancedness(plan_placement(loads, 8, 8, "waterfill").gpu_loads(loads)).mean()
    assert ours8 >= eplb16


def test_optimal_shares_reach_the_lp_optimum():
    linprog = pytest.importorskip("scipy.optimize").linprog
    rng = np.random.default_rng(0)
    for _ in range(25):
        N, E = int(rng.integers(2, 6)), int(rng.integers(2, 10))
        P = E + (-E) % N + N * int(rng.integers(0, 2))
        w = rng.lognormal(0, 1, (1, E)) * 10
        phy2log = eplb(w, P, N)[0]
        share = optimal_shares(phy2log, w, N, max_sweeps=500, tol=1e-12)
        got = (w[0, phy2log[0]] * share[0]).reshape(N, -1).sum(axis=1).max()
        # LP: variables = tokens per slot and T; minimise T
        c = np.zeros(P + 1)
        c[-1] = 1
        a_eq = np.zeros((E, P + 1))
        a_eq[phy2log[0], np.arange(P)] = 1
        a_ub = np.zeros((N, P + 1))
        a_ub[np.arange(P) // (P // N), np.arange(P)] = 1
        a_ub[:, -1] = -1
        opt = linprog(c, A_ub=a_ub, b_ub=np.zeros(N), A_eq=a_eq, b_eq=w[0], method="highs").x[-1]
        assert got == pytest.approx(opt, rel=1e-6)


def test_waterfill_migration_keeps_layers_and_moves_fewer_bytes():
    loads = skewed_loads(8, 32, seed=4)
    first = plan_placement(loads, 8, 8, "waterfill")
    same = plan_placement(loads, 8, 8, "waterfill", previous=first)
    assert bytes_moved(same, first)[0].sum() == 0
    assert same.meta["options"]["layers_kept"] == 8
    drifted = loads * np.random.default_rng(5).lognormal(0, 0.3, loads.shape)
    aware = plan_placement(drifted, 8, 8, "waterfill", previous=first)
    blind = plan_placement(drifted, 8, 8, "waterfill")
    assert bytes_moved(aware, first)[0].sum() < bytes_moved(blind, first)[0].sum()
    b_aware = balancedness(aware.gpu_loads(drifted))
    b_blind = balancedness(blind.gpu_loads(drifted))
    assert (b_aware >= b_blind - 0.002 - 1e-9).all()


def test_waterfill_can_keep_an_eplb_plan_with_colocated_replicas():
    loads = np.array([[100.0, 1, 1, 1]])
    prev = plan_placement(loads, 2, 4, "eplb")              # expert 0 gets 5 replicas over 2 GPUs
    assert prev.allow_colocated
    p = plan_placement(loads, 2, 4, "waterfill", previous=prev)
    assert p.phy2log.shape == prev.phy2log.shape


# -------------------------------------------------------------------- Placement object
def test_gpu_loads_conserve_tokens_and_take_leading_axes():
    loads = skewed_loads(3, 12)
    p = plan_placement(loads, 4, 4, "waterfill")
    steps = np.stack([loads, 2 * loads])                     # [steps, layers, experts]
    g = p.gpu_loads(steps)
    assert g.shape == (2, 3, 4)
    np.testing.assert_allclose(g.sum(axis=-1), steps.sum(axis=-1))
    np.testing.assert_allclose(g[1], 2 * g[0])
    assert balancedness(g).shape == (2, 3)


def test_gpu_sums_and_gpu_any_are_numpys_reductions_over_each_gpus_slots():
    from moe_gps.placement.placement import gpu_any, gpu_sums

    rng = np.random.default_rng(3)
    for S in (1, 2, 5, 7, 8, 11):
        # magnitudes far apart, so that a different order of the additions would round differently
        x = rng.random((3, 4, 6 * S)) * 10.0 ** rng.integers(-8, 17, (3, 4, 6 * S))
        blocks = x.reshape(3, 4, 6, S)
        in_order = blocks[..., 0].copy()
        for j in range(1, S):
            in_order += blocks[..., j]
        got = gpu_sums(x, S)
        assert got.shape == (3, 4, 6)
        if S < 8:
            assert np.array_equal(got, in_order)
        # numpy's own reduction: the same numbers below 8 terms, pairwise sums from 8
        np.testing.assert_allclose(got, blocks.sum(axis=-1), rtol=1e-14)
        flags = x > np.median(x) * 3
        assert np.array_equal(gpu_any(flags, S), flags.reshape(3, 4, 6, S).any(axis=-1))
    counts = np.arange(12).reshape(2, 6)                      # integers: numpy's sum, exact
    assert gpu_sums(counts, 3).tolist() == [[3, 12], [21, 30]]
    assert gpu_any(counts > 10, 3).tolist() == [[False, False], [False, True]]


def test_balancedness_values():
    assert balancedness(np.array([2.0, 2.0, 2.0])) == 1.0
    assert balancedness(np.array([4.0, 2.0, 0.0])) == pytest.approx(0.5)
    assert balancedness(np.zeros((2, 3))).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("phy2log, kwargs, message", [
    ([[0, 1, 2, 0]], {"num_gpus": 2, "num_experts": 4}, "expert 3 has no replica"),
    ([[0, 1, 5, 0]], {"num_gpus": 2, "num_experts": 4}, "holds logical expert 5, outside 0..3"),
    ([[0, 0, 1, 2]], {"num_gpus": 2, "num_experts": 3}, "GPU 0 holds two replicas of expert 0"),
    ([[0, 1, 2]], {"num_gpus": 2, "num_experts": 3}, "3 slots per layer do not divide evenly over 2 GPUs"),
    ([0, 1], {"num_gpus": 1, "num_experts": 2}, "must be 2-D"),
    ([[0.5, 1]], {"num_gpus": 1, "num_experts": 2}, "whole numbers"),
])
def test_placement_validation_errors(phy2log, kwargs, message):
    with pytest.raises(UserError, match=message):
        Placement(phy2log, **kwargs)


def test_placement_share_and_capacity_errors():
    with pytest.raises(UserError, match="expert 0: the shares of its replicas sum to 0.8"):
        Placement([[0, 1, 2, 0]], 2, 3, [[0.4, 1, 1, 0.4]])
    with pytest.raises(UserError, match="not a finite number >= 0"):
        Placement([[0, 1]], 1, 2, [[-1.0, 1.0]])
    Placement([[0, 0, 1, 2]], 2, 3, allow_colocated=True)        # allowed when the plan says so
    with pytest.raises(UserError, match="3 slots per GPU exceed the capacity of 2"):
        Placement([[0, 1, 2, 3, 0, 1]], 2, 4, capacity=Capacity(max_slots_per_gpu=2))
    with pytest.raises(UserError, match="exceed the cap of 1000 bytes"):
        Placement([[0, 1, 2, 3]], 2, 4, capacity=Capacity(expert_bytes=600, max_expert_bytes_per_gpu=1000))
    with pytest.raises(UserError, match="more than the capacity of 2"):
        plan_placement(np.ones((1, 4)), 2, 2, capacity=Capacity(max_slots_per_gpu=2))


def test_log2phy_and_replica_count_agree_with_phy2log():
    p = plan_placement(skewed_loads(4, 16, seed=9), 4, 8, "eplb")
    for l in range(p.num_layers):
        for e in range(p.num_experts):
            slots = p.log2phy[l, e][p.log2phy[l, e] >= 0]
            assert slots.tolist() == np.flatnonzero(p.phy2log[l] == e).tolist()
            assert len(slots) == p.replica_count[l, e]


# ------------------------------------------------------------------------ plan_placement
@pytest.mark.parametrize("args, kwargs, message", [
    ((np.ones((2, 8)), 3, 0), {}, r"8 experts \+ 0 redundant = 8 slots per layer do not divide evenly over 3 "
                                  r"GPUs; use --redundant 1"),
    ((np.ones((2, 8)), 4, 0), {"algorithm": "magic"}, "unknown placement algorithm 'magic'"),
    ((np.ones((2, 8)), 4, 0), {"algorithm": "eplb", "threshold": 1}, "does not take option"),
    ((np.ones(8), 4, 0), {}, "expected a 2-D array"),
    ((np.full((1, 4), np.nan), 2, 0), {}, "NaN"),
    ((-np.ones((1, 4)), 2, 0), {}, "negative load"),
    ((np.ones((1, 4)), 0, 0), {}, "num_gpus must be a positive integer"),
    ((np.ones((1, 4)), 2, -2), {}, "num_redundant must be an integer >= 0"),
    ((np.ones((1, 4)), 2, 0), {"algorithm": "greedy", "threshold": -1}, "threshold must be >= 0"),
])
def test_plan_placement_argument_errors(args, kwargs, message):
    with pytest.raises(UserError, match=message):
        plan_placement(*args, **kwargs)


def test_previous_must_match():
    prev = plan_placement(np.ones((2, 8)), 4, 0)
    with pytest.raises(UserError, match="previous placement is for 2 layers, 8 experts, 4 GPUs"):
        plan_placement(np.ones((3, 8)), 4, 0, previous=prev)


def test_every_algorithm_handles_all_zero_and_single_hot_loads():
    for loads in (np.zeros((2, 8)), np.eye(1, 8) * 1000.0):
        for alg in ALGORITHMS:
            p = plan_placement(loads, 4, 4, alg)
            np.testing.assert_allclose(p.gpu_loads(loads).sum(axis=-1), loads.sum(axis=-1))


# ------------------------------------------------------------------------------ metrics
def test_metrics_formulas():
    loads = np.array([[8.0, 4.0, 2.0, 2.0]])
    p = Placement([[0, 1, 2, 3]], 2, 4)                     # GPU0 = 12, GPU1 = 4
    m = placement_metrics(p, loads, expert_bytes=100)
    assert m.balancedness[0] == pytest.approx(8 / 12)
    assert m.gpu_skewness[0] == pytest.approx(1.5)
    assert m.skewness_before[0] == pytest.approx(8 / 4)
    assert m.redundant_used[0] == 0 and m.extra_slots_per_gpu == 0
    # GPU0 = {0: half, 2, 3} = 4 + 2 + 2, GPU1 = {0: half, 1, 2: spare} = 4 + 4 + 0
    q = Placement([[0, 2, 3, 0, 1, 2]], 2, 4, [[0.5, 1, 1, 0.5, 1, 0.0]])
    mq = placement_metrics(q, loads, previous=p, expert_bytes=100)
    assert mq.balancedness[0] == 1.0
    assert mq.replicas_used[0] == 5 and mq.redundant_used[0] == 1
    assert mq.extra_slots_per_gpu == 1 and mq.extra_memory_per_gpu == 100
    # GPU0 held {0, 1} and now needs 2, 3; GPU1 held {2, 3} and now needs 0, 1
    assert mq.experts_moved.tolist() == [4] and mq.bytes_moved == 400


# --------------------------------------------------------------------------- YAML files
@pytest.mark.parametrize("algorithm", ["eplb", "waterfill"])
def test_save_load_roundtrip(tmp_path, algorithm):
    loads = skewed_loads(3, 16)
    p = plan_placement(loads, 4, 4, algorithm, capacity=Capacity(expert_bytes=1000))
    p.meta["trace"] = "x.parquet"
    path = tmp_path / "plan.yaml"
    save_placement(p, path)
    q = load_placement(path)
    assert q == p
    assert q.algorithm == algorithm and q.capacity.expert_bytes == 1000 and q.meta["trace"] == "x.parquet"
    assert q.shares_are_even == (algorithm == "eplb")
    np.testing.assert_allclose(q.gpu_loads(loads), p.gpu_loads(loads), rtol=1e-12)
    assert [f for f in os.listdir(tmp_path) if f != "plan.yaml"] == []     # no temporary left


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_placement(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="bad.yaml: not valid YAML at line 2"):
        load_placement(bad)
    bad.write_text("algorithm: eplb\n")
    with pytest.raises(UserError, match="not a MoE-GPS placement"):
        load_placement(bad)
    bad.write_text("moe_gps_placement: 99\n")
    with pytest.raises(UserError, match="schema version 99 is not supported"):
        load_placement(bad)
    bad.write_text("moe_gps_placement: 1\nnum_experts: 3\nnum_gpus: 2\nphy2log:\n- [0, 1, 1, 0]\n")
    with pytest.raises(UserError, match=r"bad.yaml: placement: layer 0: logical expert 2 has no replica"):
        load_placement(bad)


# ------------------------------------------------------------------------------ exports
def test_exports(tmp_path):
    from moe_gps.placement.export import even_share_balancedness, export_placement, sglang_logical_count
    from moe_gps.trace.layer_ids import decoder_layers

    loads = skewed_loads(3, 12)
    p = plan_placement(loads, 4, 4, "eplb")
    export_placement(p, "sglang", tmp_path / "s.json", decoder_layers(3, None, num_hidden_layers=5, first_moe_layer=1))
    s = json.loads((tmp_path / "s.json").read_text())
    assert list(s) == ["physical_to_logical_map"]           # SGLang passes the keys as arguments
    rows = s["physical_to_logical_map"]
    assert len(rows) == 5 and rows[1:4] == p.phy2log.tolist()
    assert rows[0] == rows[4] == [i % 12 for i in range(16)]
    # layer ids from a trace's provenance, not contiguous (Qwen2-MoE's mlp_only_layers)
    layers = decoder_layers(3, {"original_layer_ids": [0, 2, 3], "num_hidden_layers": 4})
    from moe_gps.placement.export import export_text
    rows = json.loads(export_text(p, "sglang", layers))["physical_to_logical_map"]
    assert len(rows) == 4 and [rows[0], rows[2], rows[3]] == p.phy2log.tolist() and rows[1] == list(range(12)) + [0, 1, 2, 3]
    lc = json.loads(sglang_logical_count(np.round(loads), layers))
    assert list(lc) == ["logical_count"] and len(lc["logical_count"]) == 4
    assert lc["logical_count"][1] == [0] * 12 and lc["logical_count"][2] == np.round(loads[1]).astype(int).tolist()
    export_placement(p, "vllm", tmp_path / "v.json")
    assert json.loads((tmp_path / "v.json").read_text()) == p.phy2log.tolist()
    # vLLM Ascend maps each expert of a device to one slot: a device holding an expert twice is refused
    blocks = np.sort(p.phy2log.reshape(3, 4, 4), axis=2)
    if (blocks[:, :, 1:] == blocks[:, :, :-1]).any():
        with pytest.raises(UserError, match="holds expert .* twice, which vLLM Ascend's expert map cannot express"):
            export_placement(p, "vllm-ascend", tmp_path / "a.json")
    q = plan_placement(loads, 4, 4, "waterfill")
    export_placement(q, "vllm-ascend", tmp_path / "a.json")
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["moe_layer_count"] == 3 and a["layer_list"][2]["device_count"] == 4
    assert a["layer_list"][2]["device_list"][1] == {"device_id": 1, "device_expert": q.phy2log[2, 4:8].tolist()}
    with pytest.raises(UserError, match="do not fit in 3 decoder layers"):
        decoder_layers(3, None, num_hidden_layers=3, first_moe_layer=1)
    with pytest.raises(UserError, match="needs one row per decoder layer"):
        export_placement(p, "sglang", tmp_path / "x.json")
    w = plan_placement(loads, 4, 4, "waterfill")
    assert (even_share_balancedness(w, loads) <= balancedness(w.gpu_loads(loads)) + 1e-12).all()
    np.testing.assert_allclose(even_share_balancedness(p, loads), balancedness(p.gpu_loads(loads)))


# ------------------------------------------------------------------------- real traces
def test_real_mixtral_popularity(real_traces):
    folder = real_traces / "mixtral-8x7b-mmlu-popularity" / "mixtral_8x7b_instruct"
    files = sorted(folder.glob("*.json"))
    if not files:
        pytest.skip("no Mixtral popularity files")
    loads = np.asarray(json.loads(files[0].read_text())["expert_popularity"], dtype=float)
    assert loads.shape == (32, 8)
    bal = {a: balancedness(plan_placement(loads, 4, 4, a).gpu_loads(loads)).mean() for a in ALGORITHMS}
    assert bal["none"] < bal["eplb"] <= bal["waterfill"]
    assert bal["none"] < bal["greedy"]
    assert bal["waterfill"] > 0.99


def test_take_layers_keeps_the_same_floats():
    """Layers taken out of a placement (and stacked, with repeats) keep their shares bit for bit; a new
    placement of the same arrays would normalise them again (rounding changes most of them)."""
    rng = np.random.default_rng(0)
    phy = np.tile([0, 1, 2, 0, 1, 0], (50, 1))
    share = rng.uniform(0.05, 1, (50, 6))
    key = np.arange(50)[:, None] * 3 + phy
    share /= np.bincount(key.ravel(), share.ravel(), minlength=150).reshape(50, 3)[np.arange(50)[:, None], phy]
    p = Placement(phy, 3, 3, share, algorithm="custom", allow_colocated=True, meta={"a": 1})
    again = Placement(p.phy2log, 3, 3, p.replica_share, allow_colocated=True)
    assert not np.array_equal(again.replica_share, p.replica_share)        # what take_layers must not do
    index = np.array([7, 3, 3, 49])
    q = p.take_layers(index)
    assert np.array_equal(q.replica_share, p.replica_share[index]) and np.array_equal(q.phy2log, phy[index])
    assert q.num_layers == 4 and q.algorithm == "custom" and q.allow_colocated and q.meta == {"a": 1}
    assert np.array_equal(q.replica_count, p.replica_count[index])
    assert np.array_equal(q.log2phy, Placement(phy[index], 3, 3, share[index], allow_colocated=True).log2phy)
    twice = p.take_layers(np.tile(np.arange(50), 2))
    assert np.array_equal(twice.replica_share, np.tile(p.replica_share, (2, 1)))


def test_sglang_static_dispatch_sends_a_ranks_tokens_to_its_own_replica_first():
    """2 GPUs, 2 experts, 2 slots each: GPU 0 holds expert 0 twice, GPU 1 experts 0 and 1; loads 4 and 2.
    Static dispatch: each rank keeps its 2 tokens of expert 0 (both hold it); expert 1's tokens all go to
    GPU 1 (rank 0 holds none) -> GPU loads 2 and 4, balancedness 0.75. An even split over the replicas
    would give 2.67 and 3.33 (0.9)."""
    from moe_gps.placement.export import even_share_balancedness, sglang_static_balancedness

    p = Placement(np.array([[0, 0, 0, 1]]), 2, 2, allow_colocated=True)
    loads = np.array([[4.0, 2.0]])
    assert sglang_static_balancedness(p, loads) == pytest.approx([0.75])
    assert even_share_balancedness(p, loads) == pytest.approx([0.9])
    # 6 GPUs, one slot each, expert 1 on GPUs 1 and 3, every other expert once; 1 token of each expert per
    # rank: the 4 ranks without expert 1 spread 2 and 2 over its replicas -> GPU loads 6, 3, 6, 3, 6, 6
    q = Placement(np.array([[0, 1, 2, 1, 3, 4]]), 6, 5)
    assert sglang_static_balancedness(q, np.full((1, 5), 6.0)) == pytest.approx([5 / 6])
