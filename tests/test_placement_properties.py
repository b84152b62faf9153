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


# -- the vectorised building blocks against plain-Python references of what their docstrings say


@st.composite
def weight_rows(draw):
    """(weights [B, packs x per_pack] with ties, zeros or all positive; packs)."""
    B, packs, per = draw(st.integers(1, 4)), draw(st.integers(1, 8)), draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["float", "ties", "zeros", "positive ties"]))
    shape = (B, packs * per)
    w = {"float": lambda: rng.random(shape), "ties": lambda: rng.integers(0, 4, shape).astype(float),
         "zeros": lambda: np.where(rng.random(shape) < 0.5, 0.0, rng.random(shape)),
         "positive ties": lambda: rng.integers(1, 3, shape).astype(float)}[kind]()
    return w, packs


def _pack_reference(w: np.ndarray, packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Heaviest first (ties by index) onto the lightest pack with room (ties to the lowest id)."""
    B, n = w.shape
    pack_of, pos_of = np.zeros((B, n), dtype=np.int64), np.zeros((B, n), dtype=np.int64)
    for b in range(B):
        level, held = [0.0] * packs, [0] * packs
        for i in sorted(range(n), key=lambda i: (-w[b, i], i)):
            p = min((q for q in range(packs) if held[q] < n // packs), key=lambda q: (level[q], q))
            pack_of[b, i], pos_of[b, i] = p, held[p]
            level[p] += w[b, i]
            held[p] += 1
    return pack_of, pos_of


@SETTINGS
@given(weight_rows())
def test_pack_is_the_greedy_it_describes(case):
    from moe_gps.placement.eplb import pack

    w, packs = case
    if w.shape[1] // packs == 1:
        return                                   # one item a pack: in order (its own branch)
    got, want = pack(w, packs), _pack_reference(w, packs)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


@st.composite
def two_layouts(draw):
    """(new [R, N x S], old [R, N x S_old], N, E): random experts, repeats within a GPU allowed."""
    N, S, S_old = draw(st.integers(1, 6)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    E, R = draw(st.integers(1, 12)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.integers(0, E, (R, N * S)), rng.integers(0, E, (R, N * S_old)), N, E


@SETTINGS
@given(two_layouts())
def test_arrivals_counts_each_gpus_new_experts_once(case):
    from moe_gps.placement.waterfill import arrivals

    new, old, N, _ = case
    blocks = lambda x, r, g: set(x[r].reshape(N, -1)[g].tolist())  # noqa: E731
    want = [sum(len(blocks(new, r, g) - blocks(old, r, g)) for g in range(N)) for r in range(len(new))]
    assert arrivals(new, old, N).tolist() == want


@SETTINGS
@given(two_layouts())
def test_relabel_gpus_is_the_greedy_matching_it_describes(case):
    """Surest new GPUs first (most experts in common with some old GPU, ties by number), each onto the
    free old number it shares most experts with (ties to the lowest)."""
    from moe_gps.placement.waterfill import relabel_gpus

    new, old, N, E = case
    share = np.random.default_rng(0).random(new.shape)
    got, got_share = relabel_gpus(new, share, old, N, E)
    for r in range(len(new)):
        nb, ob = new[r].reshape(N, -1), old[r].reshape(N, -1)
        common = [[len(set(nb[a].tolist()) & set(ob[b].tolist())) for b in range(N)] for a in range(N)]
        taken, number = set(), {}
        for a in sorted(range(N), key=lambda a: (-max(common[a]), a)):
            number[a] = min((b for b in range(N) if b not in taken), key=lambda b: (-common[a][b], b))
            taken.add(number[a])
        want = np.concatenate([nb[a] for a in sorted(range(N), key=lambda a: number[a])])
        want_share = np.concatenate([share[r].reshape(N, -1)[a] for a in sorted(range(N), key=lambda a: number[a])])
        assert np.array_equal(got[r], want) and np.array_equal(got_share[r], want_share)
