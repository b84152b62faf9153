"""Skew variants of a trace (moe_gps.recommend.skew): structure kept, popularity moved as documented."""

from __future__ import annotations

import numpy as np
import pytest

from moe_gps.recommend.skew import (mean_expert_skew, popularity, reweight, search_gamma, target_popularity,
                                    transport)
from moe_gps.trace import CountsTrace
from moe_gps.trace.synth import synthesize
from sim.loads import as_counts_trace


@pytest.fixture(scope="module")
def trace():
    return synthesize("mixtral-mmlu", num_steps=12, tokens_per_step=512, seed=2, num_layers=4)


def test_transport_moves_p_to_q_in_expectation():
    p = np.array([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    for gamma in (0.0, 0.5, 2.0, 5.0):
        q = target_popularity(p, gamma)
        send, recv = transport(p, q)
        moved = (p * send).sum(axis=1, keepdims=True)
        after = p * (1 - send) + moved * recv
        assert np.allclose(after, q), gamma
        assert np.allclose(q.sum(axis=1), 1)
    assert np.allclose(target_popularity(p, 0.0), 0.25)          # gamma 0: uniform
    assert np.allclose(target_popularity(p, 1.0), p)             # gamma 1: unchanged


@pytest.mark.parametrize("gamma", [0.0, 0.4, 2.5, 8.0])
def test_reweight_keeps_structure_and_never_duplicates(trace, gamma):
    v = reweight(trace, gamma, seed=0)
    assert v.experts.shape == trace.experts.shape and v.experts.dtype == np.int16
    assert np.array_equal(v.step_offsets, trace.step_offsets)
    for col in ("token_id", "seq", "pos"):
        assert np.array_equal(getattr(v, col), getattr(trace, col))
    e = v.experts
    k = e.shape[2]
    for a in range(k):
        for b in range(a + 1, k):
            assert not (e[:, :, a] == e[:, :, b]).any(), "duplicate expert in a token's top-k"
    assert e.min() >= 0 and e.max() < trace.meta.num_experts
    assert v.meta.provenance["skew_variant"]["gamma"] == gamma


def test_popularity_moves_towards_target(trace):
    p = popularity(trace.counts())
    flat, sharp = reweight(trace, 0.0), reweight(trace, 3.0)
    pf, ps = popularity(flat.counts()), popularity(sharp.counts())
    # flatter: closer to uniform; sharper: the hottest expert of each layer gains
    assert np.abs(pf - 0.125).sum() < 0.35 * np.abs(p - 0.125).sum()
    # and the popularity lands near its target q = p ** gamma (normalised): it covers more than 70% of
    # the L1 distance from p to q in every layer (the rest: whole token-id groups move, and a token
    # that already has a receiver cannot take it again)
    for g, v in ((0.0, flat), (3.0, sharp)):
        q = target_popularity(p, g)
        err = np.abs(popularity(v.counts()) - q).sum(axis=1)
        assert (err < 0.3 * np.abs(p - q).sum(axis=1)).all(), (g, err)
    hot = p.argmax(axis=1)
    assert (ps[np.arange(4), hot] > p[np.arange(4), hot] + 0.02).all()
    # skew rises with gamma
    skews = [mean_expert_skew(reweight(trace, g), 3) for g in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert skews == sorted(skews)
    assert skews[2] == pytest.approx(mean_expert_skew(trace, 3))


def test_same_token_id_same_experts_move_the_same_way(trace):
    """The moves are a function of (token id, layer, experts), so a vocabulary id keeps one routing."""
    v = reweight(trace, 3.0, seed=5)
    ids = trace.token_id
    layer = 1
    key = ids.astype(np.int64) * 64 + trace.experts[:, layer, 0] * 8 + trace.experts[:, layer, 1]
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    assert np.array_equal(v.experts[:, layer], v.experts[first[inverse], layer])
    assert (v.experts != trace.experts).any()
    # and a different seed moves other assignments
    assert not np.array_equal(reweight(trace, 3.0, seed=6).experts, v.experts)


def test_search_gamma_reaches_target_or_says_it_cannot(trace):
    base = mean_expert_skew(trace, 3)
    v = search_gamma(trace, base + 0.4, first_step=3)
    assert v.reachable and v.gamma > 1 and abs(v.achieved - (base + 0.4)) <= 0.01
    assert mean_expert_skew(reweight(trace, v.gamma), 3) == pytest.approx(v.achieved)
    low = search_gamma(trace, 1.0, first_step=3)   # perfectly even routing: beyond the transform
    assert not low.reachable and low.gamma == 0.0 and low.achieved > 1.0


def test_counts_trace_variant_keeps_totals_and_caps():
    tr = synthesize("sst2", num_steps=6, tokens_per_step=128, seed=1, num_layers=3)
    ct = as_counts_trace(tr, tr.counts())
    assert isinstance(ct, CountsTrace)
    for g in (0.0, 3.0, 12.0):
        v = reweight(ct, g)
        c = v.counts()
        assert c.dtype == np.int64 and (c >= 0).all()
        assert np.array_equal(c.sum(axis=2), ct.counts().sum(axis=2))
        assert (c <= 128).all()                       # an expert appears once per token at most
    assert mean_expert_skew(reweight(ct, 0.0)) < mean_expert_skew(ct) < mean_expert_skew(reweight(ct, 3.0))
