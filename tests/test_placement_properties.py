"""Property tests: every plan is a valid placement, for random loads and configurations."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_gps.placement import (ALGORITHMS, Placement, balancedness, bytes_moved, load_placement, plan_placement,
                               save_placement)

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configs(draw):
    """(loads [L, E], num_gpus, num_redundant, eplb options)."""
    L = draw(st.integers(1, 3))
    N = draw(st.integers(1, 8))
    E = draw(st.integers(1, 20))
    R = (-E) % N + N * draw(st.integers(0, 2))
    kind = draw(st.sampled_from(["float", "int", "sparse", "equal"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "float":
        loads = rng.lognormal(0, draw(st.floats(0.1, 2.5)), (L, E)) * 100
    elif kind == "int":                      # ties everywhere
        loads = rng.integers(0, 5, (L, E)).astype(float)
    elif kind == "sparse":                   # a few hot experts, the rest idle
        loads = np.where(rng.random((L, E)) < 0.2, rng.integers(1, 10_000, (L, E)), 0).astype(float)
    else:
        loads = np.full((L, E), 7.0)
    # eplb hierarchy: nodes that divide the GPUs, groups that divide the experts
    nodes = draw(st.sampled_from([d for d in range(1, N + 1) if N % d == 0]))
    groups = draw(st.sampled_from([d for d in range(1, E + 1) if E % d == 0]))
    if (E + R) % nodes:
        nodes = 1
    return loads, N, R, {"num_nodes": nodes, "num_groups": groups}


def check_valid(p: Placement, loads: np.ndarray, N: int, R: int) -> None:
    L, E = loads.shape
    S = (E + R) // N
    assert p.phy2log.shape == (L, N * S) and p.slots_per_gpu == S and p.num_gpus == N
    assert ((p.phy2log >= 0) & (p.phy2log < E)).all()
    count = np.stack([np.bincount(row, minlength=E) for row in p.phy2log])
    assert (count >= 1).all() and (count == p.replica_count).all()
    # log2phy lists exactly the slots of each expert, ascending, -1 padded
    assert p.log2phy.shape == (L, E, count.max())
    for l in range(L):
        for e in range(E):
            slots = p.log2phy[l, e]
            n = count[l, e]
            assert slots[:n].tolist() == np.flatnonzero(p.phy2log[l] == e).tolist()
            assert (slots[n:] == -1).all()
    # shares: >= 0 and summing to 1 per expert
    assert (p.replica_share >= 0).all()
    sums = np.zeros((L, E))
    np.add.at(sums, (np.arange(L)[:, None], p.phy2log), p.replica_share)
    np.testing.assert_allclose(sums, 1.0, atol=1e-9)
    # tokens are conserved, balancedness is a ratio in (0, 1]
    g = p.gpu_loads(loads)
    np.testing.assert_allclose(g.sum(axis=1), loads.sum(axis=1), rtol=1e-9, atol=1e-6)
    b = balancedness(g)
    assert ((b > 0) & (b <= 1 + 1e-12)).all()
    # no two replicas of one expert on a GPU, unless the plan says it may
    if not p.allow_colocated:
        blocks = np.sort(p.phy2log.reshape(L, N, S), axis=2)
        assert not (blocks[:, :, 1:] == blocks[:, :, :-1]).any()
    # the object re-validates from its own arrays
    Placement(p.phy2log, N, E, p.replica_share, allow_colocated=p.allow_colocated)


@SETTINGS
@given(configs(), st.sampled_from(ALGORITHMS))
def test_every_plan_is_valid(cfg, algorithm):
    loads, N, R, eplb_opts = cfg
    opts = eplb_opts if algorithm == "eplb" else {}
    p = plan_placement(loads, N, R, algorithm, **opts)
    check_valid(p, loads, N, R)
    E = loads.shape[1]
    if algorithm != "eplb" and (E + R) // N <= E:
        assert not p.allow_colocated


@SETTINGS
@given(configs())
def test_waterfill_is_never_worse_than_eplb(cfg):
    loads, N, R, _ = cfg
    e = balancedness(plan_placement(loads, N, R, "eplb").gpu_loads(loads))
    w = balancedness(plan_placement(loads, N, R, "waterfill").gpu_loads(loads))
    assert (w >= e - 1e-9).all()


@SETTINGS
@given(configs(), st.sampled_from(ALGORITHMS), st.floats(0.0, 0.05))
def test_migration_aware_plans_are_valid(cfg, prev_algorithm, tolerance):
    loads, N, R, _ = cfg
    prev = plan_placement(loads[:, ::-1].copy(), N, R, prev_algorithm)    # planned for other loads
    p = plan_placement(loads, N, R, "waterfill", previous=prev, migration_tolerance=tolerance)
    check_valid(p, loads, N, R)
    moved, _ = bytes_moved(p, prev)
    assert (moved >= 0).all()
    kept = p.meta["options"]["layers_kept"]
    assert 0 <= kept <= loads.shape[0]


@settings(max_examples=40, deadline=None)
@given(configs(), st.sampled_from(ALGORITHMS))
def test_yaml_roundtrip_is_exact(tmp_path_factory, cfg, algorithm):
    loads, N, R, _ = cfg
    p = plan_placement(loads, N, R, algorithm)
    path = tmp_path_factory.mktemp("plans") / "p.yaml"
    save_placement(p, path)
    q = load_placement(path)
    assert np.array_equal(q.phy2log, p.phy2log)
    np.testing.assert_allclose(q.replica_share, p.replica_share, rtol=0, atol=1e-15)
    assert q.allow_colocated == p.allow_colocated
