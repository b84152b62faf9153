"""The expert-parallel MoE layer and placement moves: single-process units and real gloo groups."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from moe_gps.placement import Placement, plan_placement  # noqa: E402
from runtime.apply import Fingerprints, apply_placement  # noqa: E402
from runtime.dist import DistContext  # noqa: E402
from runtime.local import run_local  # noqa: E402
from runtime.moe_layer import ExpertParallelMoE, reference_moe, top_k_routing  # noqa: E402
from runtime.routing import assign_slots, layer_tables, slot_counts, slot_major_order  # noqa: E402

E, H, I = 8, 16, 24


# ----------------------------------------------------------------------------- helpers (also run on the ranks)

def _weights(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, 2 * I, H, generator=g, dtype=torch.float64),
            torch.randn(E, H, I, generator=g, dtype=torch.float64))


def _batch(n_tokens: int, k: int, seed: int, skew: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, H, generator=g, dtype=torch.float64)
    logits = torch.randn(n_tokens, E, generator=g) + torch.linspace(0, skew, E)
    experts, weights = top_k_routing(logits, k)
    return x, experts, weights


def _layer(ctx, phy2log, share, wgu, wd, layer: int = 0):
    ep = ExpertParallelMoE(layer, E, H, I, ctx, dtype=torch.float64)
    S = len(phy2log) // ctx.world_size
    mine = phy2log[ctx.rank * S:(ctx.rank + 1) * S]
    ep.set_slots(layer_tables(phy2log, share, E, S), torch.stack([ep.pack_expert(wgu[e], wd[e]) for e in mine]))
    return ep


def _cases(N: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, phy2log [P], share [P]) placements of E experts over N ranks."""
    skewed = np.array([[40, 5, 9, 3, 22, 1, 7, 13.0]])
    out = [("contiguous", np.arange(E), np.ones(E)),
           ("permuted", np.random.default_rng(1).permutation(E), np.ones(E))]
    for alg in ("eplb", "waterfill", "greedy"):
        p = plan_placement(skewed, N, N, algorithm=alg)
        out.append((alg, p.phy2log[0], p.replica_share[0]))
    # the same expert twice on one rank, uneven shares, and a spare copy with share 0
    extra = [0, 0] if N == 2 else [0, 0, 0, 3]
    phy = np.concatenate([np.arange(E), extra])
    share = np.ones(len(phy))
    r0 = np.flatnonzero(phy == 0)
    share[r0] = np.arange(1, len(r0) + 1) / np.arange(1, len(r0) + 1).sum()
    r3 = np.flatnonzero(phy == 3)
    if len(r3) == 2:
        share[r3] = [1.0, 0.0]
    out.append(("colocated+uneven+spare", phy, share))
    assert all(len(c[1]) % N == 0 for c in out)
    return out


def equivalence_worker(ctx, k: int, sizes: list[int]):
    """Every case and batch size: EP output vs the reference, and measured pairs per rank."""
    N = ctx.world_size
    wgu, wd = _weights()
    results = []
    for name, phy, share in _cases(N):
        for T in sizes:
            x, ex, w = _batch(N * T, k, seed=T)
            ep = _layer(ctx, phy, share, wgu, wd)
            mine = slice(ctx.rank * T, (ctx.rank + 1) * T)
            y = ep(x[mine], ex[mine], w[mine])
            ref = reference_moe(x, ex, w, wgu, wd)[mine]
            results.append((name, T, float((y - ref).abs().max()), ep.stats["expert_tokens"]))
    return results


def _check_equivalence(results_per_rank, N: int, k: int, sizes: list[int]) -> None:
    cases = _cases(N)
    for i, (name, phy, share) in enumerate((c for c in cases for _ in sizes)):
        T = sizes[i % len(sizes)]
        errs = [r[i][2] for r in results_per_rank]
        assert max(errs) < 1e-10, (name, T, errs)
        # pairs each rank computed = the plan's shares applied to the true counts (within 1 per replica)
        _, ex, _ = _batch(N * T, k, seed=T)
        counts = np.bincount(ex.reshape(-1).numpy(), minlength=E)[None]
        p = Placement(phy[None], N, E, share[None], allow_colocated=True)
        want = p.gpu_loads(counts)[0]
        got = np.array([r[i][3] for r in results_per_rank])
        assert got.sum() == N * T * k
        assert np.all(np.abs(got - want) <= p.slots_per_gpu), (name, T, got, want)


@pytest.fixture(scope="module")
def four_rank_results():
    sizes = [37, 3]
    return run_local(equivalence_worker, 4, 2, sizes, timeout_s=90), sizes


def test_ep_layer_equals_reference_on_4_ranks(four_rank_results):
    results, sizes = four_rank_results
    _check_equivalence(results, 4, 2, sizes)


def test_ep_layer_equals_reference_on_2_ranks_top1_and_moves():
    out = run_local(two_rank_worker, 2, timeout_s=90)
    _check_equivalence([o["equivalence"] for o in out], 2, 1, [21])
    for o in out:
        assert o["moves_ok"], o
    r0, r1 = out[0]["moves"], out[1]["moves"]
    assert r0[0]["transfers"] > 0 and r0[0]["bytes"] + r1[0]["bytes"] > 0
    # applying the same placement again moves nothing: every slot is kept
    assert r0[-1]["bytes"] == r1[-1]["bytes"] == 0 and r0[-1]["transfers"] == 0
    assert r0[-1]["kept"] == ID_LAYERS * r0[-1]["slots"]


# ----------------------------------------------------------------------------- moves

ID_LAYERS = 2


def _id_weights(layer: int, expert: int, ep: ExpertParallelMoE):
    """Weights that encode the logical id: every element of expert e in layer l is 100 * l + e."""
    v = float(100 * layer + expert)
    return torch.full((2 * I, H), v, dtype=torch.float64), torch.full((H, I), v, dtype=torch.float64)


def _slot_ids(ep: ExpertParallelMoE, layer: int) -> list[int]:
    rows = ep.slot_weights
    assert torch.all(rows == rows[:, :1]), "a slot holds a mix of experts"
    return [int(v) - 100 * layer for v in rows[:, 0].tolist()]


def _install(ctx, eps, phy2log: np.ndarray, fn):
    from runtime.model import install_slots
    install_slots(eps, phy2log, np.asarray(Placement(phy2log, ctx.world_size, E, allow_colocated=True).replica_share),
                  lambda l, e: fn(l, e, eps[l]), ctx)


def _move_sequence() -> list[np.ndarray]:
    """Placements [2 layers, 10 slots] for 2 ranks x 5 slots, applied in turn."""
    seq = [np.array([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]]),
           # layer 0: expert 5 three times on rank 1 (local copies); layer 1: every expert changes rank
           np.array([[0, 1, 2, 3, 4, 5, 6, 7, 5, 5], [5, 6, 7, 0, 1, 0, 1, 2, 3, 4]]),
           # layer 0: rank 0 holds expert 1 twice (local copy), rank 1 needs expert 0 twice (one transfer);
           # layer 1 unchanged
           np.array([[1, 1, 5, 3, 4, 0, 0, 2, 6, 7], [5, 6, 7, 0, 1, 0, 1, 2, 3, 4]])]
    seq.append(seq[-1].copy())                                              # unchanged: nothing may move
    return seq


def two_rank_worker(ctx):
    out = {"equivalence": equivalence_worker(ctx, 1, [21])}
    N = ctx.world_size
    eps = [ExpertParallelMoE(l, E, H, I, ctx, dtype=torch.float64) for l in range(ID_LAYERS)]
    seq = _move_sequence()
    _install(ctx, eps, seq[0], _id_weights)
    fp = Fingerprints(eps, ctx)
    ok, moves = True, []
    for phy in seq[1:]:
        share = Placement(phy, N, E, allow_colocated=True).replica_share
        st = apply_placement(eps, phy, share, ctx, fp)
        S = phy.shape[1] // N
        for l, ep in enumerate(eps):
            ok &= _slot_ids(ep, l) == phy[l, ctx.rank * S:(ctx.rank + 1) * S].tolist()
        moves.append({"bytes": st.bytes_sent + st.bytes_received, "transfers": st.counts["transfers"],
                      "kept": st.counts["slots_kept"], "slots": phy.shape[1]})
    # random weights: after moves the layer still equals the reference
    wgu, wd = _weights(5)
    ep = _layer(ctx, seq[0][0], np.ones(seq[0].shape[1]) / np.bincount(seq[0][0])[seq[0][0]], wgu, wd)
    fp2 = Fingerprints([ep], ctx)
    phy = seq[2][:1]
    apply_placement([ep], phy, Placement(phy, N, E, allow_colocated=True).replica_share, ctx, fp2)
    T = 19
    x, ex, w = _batch(N * T, 2, seed=9)
    mine = slice(ctx.rank * T, (ctx.rank + 1) * T)
    ok &= float((ep(x[mine], ex[mine], w[mine]) - reference_moe(x, ex, w, wgu, wd)[mine]).abs().max()) < 1e-10
    out.update(moves_ok=bool(ok), moves=moves)
    return out


def test_routing_matches_plan_shares_exactly():
    N, k = 4, 2
    p = plan_placement(np.array([[50, 1, 2, 30, 4, 5, 6, 7.0]]), N, 4, algorithm="waterfill")
    tables = layer_tables(p.phy2log[0], p.replica_share[0], E, p.slots_per_gpu)
    rng = np.random.default_rng(0)
    per_rank = [torch.as_tensor(rng.choice(E, size=(int(T), k), p=np.arange(1, 9) / 36.0)) for T in (10, 0, 33, 7)]
    counts_all = np.stack([np.bincount(x.reshape(-1).numpy(), minlength=E) for x in per_rank])
    C = slot_counts(tables, counts_all)
    for r, x in enumerate(per_rank):
        slots = assign_slots(x, tables, counts_all, r).numpy() if x.numel() else np.zeros(0, np.int64)
        assert np.array_equal(np.bincount(slots, minlength=tables.num_slots), C[r])
        assert np.array_equal(p.phy2log[0][slots], x.reshape(-1).numpy())      # a replica of the routed expert
    n_e = counts_all.sum(axis=0)
    got = C.sum(axis=0)
    want = n_e[p.phy2log[0]] * p.replica_share[0]
    assert np.all(np.abs(got - want) <= 1.0)


def test_slot_major_order():
    C = np.array([[2, 0, 1], [1, 3, 0]])           # [source, slot]
    labels = np.repeat(np.tile(np.arange(3), 2), C.ravel())   # slot of each received row
    index, per_slot = slot_major_order(C)
    assert per_slot.tolist() == [3, 3, 1]
    assert np.array_equal(labels[index], np.sort(labels, kind="stable"))
    assert sorted(index.tolist()) == list(range(C.sum()))


def test_single_process_layer_and_fingerprint_check_catches_a_wrong_slot():
    ctx = DistContext()
    wgu, wd = _weights()
    phy = np.array([0, 1, 2, 3, 4, 5, 6, 7, 3, 3])
    share = np.array([1, 1, 1, 0.5, 1, 1, 1, 1, 0.25, 0.25])
    ep = _layer(ctx, phy, share, wgu, wd)
    x, ex, w = _batch(50, 2, seed=1)
    assert torch.allclose(ep(x, ex, w), reference_moe(x, ex, w, wgu, wd), rtol=0, atol=1e-10)
    fp = Fingerprints([ep], ctx)
    assert fp.check([ep], ctx) == []
    ep.slot_weights[4] = ep.slot_weights[5]
    problems = fp.check([ep], ctx)
    assert len(problems) == 1 and "slot 4 should hold expert 4" in problems[0]
