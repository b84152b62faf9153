"""Predictors on synthetic traces: interface, online semantics, metrics, costs, synthetic predictors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moe_gps.errors import UserError
from moe_gps.predict import (DISTRIBUTION_PREDICTORS, AccuracyOverheadCurve, MissingFeature,
                             PredictorCost, SyntheticDistributionPredictor, SyntheticTokenPredictor,
                             accuracy_overhead_curve, distribution_errors, evaluate, make_distribution_predictor,
                             make_token_predictor, predicted_counts, rollout_distribution, rollout_tokens,
                             split_tokens, token_hits)
from moe_gps.predict.base import shares
from moe_gps.trace import CountsTrace, TokensTrace
from moe_gps.trace.synth import synthesize

TRAIN = 6
REAL_DIST = [n for n in DISTRIBUTION_PREDICTORS if n != "synthetic"]
TABLE_TOKEN = ["most-frequent", "token-id", "position", "prev-layer"]


@pytest.fixture(scope="module")
def trace() -> TokensTrace:
    return synthesize("mixtral-mmlu", num_steps=14, tokens_per_step=256, num_layers=6, seed=3)


@pytest.fixture(scope="module")
def counts_trace(trace) -> CountsTrace:
    from moe_gps.trace import TraceMeta
    m = trace.meta
    meta = TraceMeta(kind="counts", num_layers=m.num_layers, num_experts=m.num_experts, top_k=m.top_k)
    return CountsTrace(meta, trace.counts())


def _test_counts(trace, train=TRAIN):
    return trace.counts()[train:]


# ------------------------------------------------------------------ oracle and shapes


def test_oracles_have_zero_error(trace):
    pred = rollout_distribution(make_distribution_predictor("oracle"), trace, TRAIN)
    errs = distribution_errors(pred, _test_counts(trace))
    assert errs["eps_mean"].max() == 0 and errs["eps_max"].max() == 0 and errs["jsd"].max() == 0
    tok = rollout_tokens(make_token_predictor("oracle"), trace, TRAIN)
    hits = token_hits(tok, trace.experts[trace.step_offsets[TRAIN]:])
    assert all(v.min() == 1.0 for v in hits.values())


@pytest.mark.parametrize("name,opts", [(n, {}) for n in REAL_DIST if n != "token-hist"]
                         + [("profile", {"online": True}), ("window", {"online": True, "window": 3}),
                            ("ema", {"online": False}), ("kalman", {"online": False}),
                            ("synthetic", {"error": 0.2, "seed": 1})])
def test_rolled_out_a_chunk_at_a_time_equals_all_at_once(counts_trace, name, opts):
    """The simulator rolls a predictor out a few steps at a time (bounded memory on long traces):
    the same predictions as fitting it and rolling out every test step in one call."""
    from moe_gps.predict import iter_rollout_distribution
    whole = make_distribution_predictor(name, **opts)
    whole.fit(counts_trace.counts()[:TRAIN])
    ref = whole.rollout(counts_trace.counts()[TRAIN:])
    chunks = list(iter_rollout_distribution(make_distribution_predictor(name, **opts), counts_trace, TRAIN, 3))
    assert [len(c) for c in chunks] == [3, 3, 2]
    np.testing.assert_array_equal(np.concatenate(chunks), ref)


@pytest.mark.parametrize("name", [n for n in REAL_DIST if n != "token-hist"])
def test_fit_on_integer_counts_equals_fit_on_floats(counts_trace, name):
    """Counts are fitted as the integers they are (no float copy of the training split): the same
    predictions as fitting their float64 copy."""
    c = counts_trace.counts()
    ints, floats = make_distribution_predictor(name), make_distribution_predictor(name)
    ints.fit(c[:TRAIN])
    floats.fit(c[:TRAIN].astype(np.float64))
    np.testing.assert_array_equal(ints.rollout(c[TRAIN:]), floats.rollout(c[TRAIN:].astype(np.float64)))


@pytest.mark.parametrize("name", REAL_DIST)
def test_distribution_rollout_shape_and_rows(trace, counts_trace, name):
    pred = rollout_distribution(make_distribution_predictor(name), trace, TRAIN)
    S, L, E = trace.counts().shape
    assert pred.shape == (S - TRAIN, L, E)
    assert np.all(pred >= 0)
    np.testing.assert_allclose(pred.sum(axis=-1), 1.0, atol=1e-9)
    if not DISTRIBUTION_PREDICTORS[name].needs_tokens:  # counts alone are enough, same answer
        again = rollout_distribution(make_distribution_predictor(name), counts_trace, TRAIN)
        np.testing.assert_allclose(again, pred)
    else:
        with pytest.raises(MissingFeature, match="token_id"):
            rollout_distribution(make_distribution_predictor(name), counts_trace, TRAIN)


def test_distribution_formulas_by_hand(trace):
    c = trace.counts().astype(float)
    p = shares(c)
    prev = rollout_distribution(make_distribution_predictor("previous"), trace, TRAIN)
    np.testing.assert_allclose(prev, p[TRAIN - 1:-1])
    win = rollout_distribution(make_distribution_predictor("window", window=3), trace, TRAIN)
    for i in range(len(win)):
        s = TRAIN + i
        np.testing.assert_allclose(win[i], shares(c[s - 3:s].sum(axis=0)))
    prof = rollout_distribution(make_distribution_predictor("profile"), trace, TRAIN)  # offline MLE
    np.testing.assert_allclose(prof, np.broadcast_to(shares(c[:TRAIN].sum(axis=0)), prof.shape))
    prof_on = rollout_distribution(make_distribution_predictor("profile", online=True), trace, TRAIN)
    for i in range(len(prof_on)):
        np.testing.assert_allclose(prof_on[i], shares(c[:TRAIN + i].sum(axis=0)))
    a = 0.4
    ema = rollout_distribution(make_distribution_predictor("ema", alpha=a), trace, TRAIN)
    m = p[0]
    for s in range(1, len(p)):
        if s >= TRAIN:
            np.testing.assert_allclose(ema[s - TRAIN], m / m.sum(axis=-1, keepdims=True))
        m = a * p[s] + (1 - a) * m


@pytest.mark.parametrize("name", ["previous", "window", "ema", "kalman", "token-hist"])
def test_offline_mode_never_learns_from_test_steps(trace, name):
    pred = rollout_distribution(make_distribution_predictor(name, online=False), trace, TRAIN)
    if name == "token-hist":  # depends on the step's token ids, not on its routing
        assert not np.allclose(pred[0], pred[1])
        changed = _with_routing_changed(trace, TRAIN)
        np.testing.assert_allclose(rollout_distribution(make_distribution_predictor(name, online=False),
                                                        changed, TRAIN), pred)
    else:
        np.testing.assert_allclose(pred, np.broadcast_to(pred[0], pred.shape))


def _with_routing_changed(trace: TokensTrace, from_step: int, layers=None) -> TokensTrace:
    """A copy whose routing at steps >= from_step (and given layers) is replaced by other experts."""
    experts = trace.experts.copy()
    lo = int(trace.step_offsets[from_step])
    sel = slice(None) if layers is None else layers
    E = trace.meta.num_experts
    experts[lo:, sel] = (experts[lo:, sel] + 3) % E  # still distinct per token
    return TokensTrace(trace.meta, experts, trace.step_offsets, None, token_id=trace.token_id, seq=trace.seq,
                       pos=trace.pos)


@pytest.mark.parametrize("name", REAL_DIST[1:])
def test_online_distribution_does_not_peek(trace, name):
    s = TRAIN + 3
    base = rollout_distribution(make_distribution_predictor(name), trace, TRAIN)
    moved = rollout_distribution(make_distribution_predictor(name), _with_routing_changed(trace, s), TRAIN)
    np.testing.assert_allclose(moved[:s - TRAIN + 1], base[:s - TRAIN + 1])  # up to and including step s
    if DISTRIBUTION_PREDICTORS[name].default_online:
        assert not np.allclose(moved[s - TRAIN + 1:], base[s - TRAIN + 1:])  # later steps learn from it


@pytest.mark.parametrize("name", TABLE_TOKEN + ["mlp"])
def test_token_predictors_do_not_peek(trace, name):
    """Layer l of step s may depend on layers < l of step s and on earlier steps only."""
    kw = {}
    if name == "mlp":
        pytest.importorskip("torch")
        kw = {"iterations": 40}  # quality is not the point here
    s, layer = TRAIN + 2, 3
    lo, hi = trace.step_offsets[s], trace.step_offsets[s + 1]
    base = rollout_tokens(make_token_predictor(name, **kw), trace, TRAIN)
    # change layers >= `layer` of steps >= s: rows of step s at layers <= layer must not move
    changed = _with_routing_changed(trace, s, layers=slice(layer, None))
    moved = rollout_tokens(make_token_predictor(name, **kw), changed, TRAIN)
    np.testing.assert_array_equal(moved[:lo - trace.step_offsets[TRAIN]], base[:lo - trace.step_offsets[TRAIN]])
    r0, r1 = lo - trace.step_offsets[TRAIN], hi - trace.step_offsets[TRAIN]
    np.testing.assert_array_equal(moved[r0:r1, :layer + 1], base[r0:r1, :layer + 1])


@pytest.mark.parametrize("name", TABLE_TOKEN + ["mlp", "synthetic"])
def test_token_rollout_shape_distinct_and_deterministic(trace, name):
    kw = {"accuracy": 0.6} if name == "synthetic" else {}
    if name == "mlp":
        pytest.importorskip("torch")
        kw = {"iterations": 40}
    a = rollout_tokens(make_token_predictor(name, **kw), trace, TRAIN)
    b = rollout_tokens(make_token_predictor(name, **kw), trace, TRAIN)
    n_test = trace.num_tokens - trace.step_offsets[TRAIN]
    assert a.shape == (n_test, trace.meta.num_layers, trace.meta.top_k) and a.dtype == np.int16
    assert a.min() >= 0 and a.max() < trace.meta.num_experts
    srt = np.sort(a, axis=-1)
    assert not (srt[..., 1:] == srt[..., :-1]).any(), "predicted experts of a token must be distinct"
    np.testing.assert_array_equal(a, b)


def test_online_tables_learn(trace):
    on = rollout_tokens(make_token_predictor("token-id"), trace, TRAIN)
    off = rollout_tokens(make_token_predictor("token-id", online=False), trace, TRAIN)
    true = trace.experts[trace.step_offsets[TRAIN]:]
    assert token_hits(on, true)["recall"].mean() > token_hits(off, true)["recall"].mean()


# ------------------------------------------------------------------ cross-layer affinity


def _recall(trace, name, train):
    pred = rollout_tokens(make_token_predictor(name), trace, train)
    return float(token_hits(pred, trace.experts[trace.step_offsets[train]:])["recall"].mean())


def test_prev_layer_beats_most_frequent_only_with_cross_layer_correlation():
    # token_affinity=0: the token id would correlate layers too (same id, every layer)
    corr = synthesize("mixtral-mmlu", num_steps=12, tokens_per_step=256, num_layers=8, seed=5, layer_affinity=2.0,
                      token_affinity=0.0)
    flat = synthesize("mixtral-mmlu", num_steps=12, tokens_per_step=256, num_layers=8, seed=5, layer_affinity=0.0,
                      token_affinity=0.0)
    mf, pl = _recall(corr, "most-frequent", 6), _recall(corr, "prev-layer", 6)
    assert pl > mf + 0.05, (pl, mf)
    mf0, pl0 = _recall(flat, "most-frequent", 6), _recall(flat, "prev-layer", 6)
    assert abs(pl0 - mf0) < 0.02, (pl0, mf0)  # no correlation by construction: no gain


def test_token_id_beats_most_frequent_with_token_affinity():
    tr = synthesize("mixtral-mmlu", num_steps=12, tokens_per_step=256, num_layers=4, seed=2, token_affinity=1.5,
                    vocab_size=256)
    assert _recall(tr, "token-id", 6) > _recall(tr, "most-frequent", 6) + 0.05


# ------------------------------------------------------------------ synthetic predictors


@pytest.mark.parametrize("placement", ["optimistic", "typical", "pessimistic"])
@pytest.mark.parametrize("accuracy", [0.0, 0.3, 0.75, 0.9, 1.0])
def test_synthetic_token_predictor_hits_its_accuracy(trace, accuracy, placement):
    sp = SyntheticTokenPredictor(accuracy=accuracy, overhead=1234.0, placement=placement, seed=1)
    pred = rollout_tokens(sp, trace, TRAIN)
    hits = token_hits(pred, trace.experts[trace.step_offsets[TRAIN]:])
    assert abs(hits["recall"].mean() - accuracy) <= 0.01
    assert abs(hits["top1"].mean() - accuracy) <= 0.03
    srt = np.sort(pred, axis=-1)
    assert not (srt[..., 1:] == srt[..., :-1]).any()
    assert sp.cost().flops_per_token == 1234.0


def test_synthetic_error_placement_order(trace):
    """Implied loads: optimistic closest to the truth, pessimistic farthest; and the plan
    built from pessimistic errors balances worst."""
    true = trace.experts[trace.step_offsets[TRAIN]:]
    offsets = trace.step_offsets[TRAIN:] - trace.step_offsets[TRAIN]
    eps, bal = {}, {}
    for placement in ("optimistic", "typical", "pessimistic"):
        pred = rollout_tokens(SyntheticTokenPredictor(0.7, placement=placement, seed=0), trace, TRAIN)
        implied = shares(predicted_counts(pred, offsets, trace.meta.num_experts))
        eps[placement] = distribution_errors(implied, _test_counts(trace))["eps_mean"].mean()
        from moe_gps.predict import planned_balancedness
        bal[placement] = planned_balancedness(implied, _test_counts(trace), 4, 4).mean()
        assert abs(token_hits(pred, true)["recall"].mean() - 0.7) <= 0.01
    assert eps["optimistic"] < eps["typical"] < eps["pessimistic"], eps
    assert bal["pessimistic"] < bal["typical"] and bal["pessimistic"] < bal["optimistic"], bal


def test_synthetic_seed_changes_errors_not_accuracy(trace):
    a = rollout_tokens(SyntheticTokenPredictor(0.8, seed=0), trace, TRAIN)
    b = rollout_tokens(SyntheticTokenPredictor(0.8, seed=1), trace, TRAIN)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("error", [0.05, 0.2, 0.5])
def test_synthetic_distribution_predictor_hits_its_error(trace, error):
    pred = rollout_distribution(SyntheticDistributionPredictor(error=error, seed=0), trace, TRAIN)
    np.testing.assert_allclose(pred.sum(-1), 1.0, atol=1e-9)
    eps = distribution_errors(pred, _test_counts(trace))["eps_mean"]
    assert abs(eps.mean() - error) <= 0.01 * max(error, 0.1)


def test_bad_synthetic_parameters():
    with pytest.raises(UserError, match="accuracy"):
        SyntheticTokenPredictor(accuracy=1.5)
    with pytest.raises(UserError, match="placement"):
        SyntheticTokenPredictor(accuracy=0.5, placement="random")
    with pytest.raises(UserError, match="overhead"):
        SyntheticTokenPredictor(accuracy=0.5, overhead=-1)


def test_accuracy_overhead_curve():
    assert accuracy_overhead_curve(1.0, scale=5e6, rate=8.0) == pytest.approx(5e6)
    assert accuracy_overhead_curve(0.5, scale=5e6, rate=8.0) == pytest.approx(5e6 * math.exp(-4.0))
    a = np.linspace(0.5, 1.0, 6)
    c = accuracy_overhead_curve(a, 2.0, 6.0)
    assert np.all(np.diff(c) > 0)
    fit = AccuracyOverheadCurve.fit(a, c)
    assert fit.scale == pytest.approx(2.0) and fit.rate == pytest.approx(6.0)
    through = AccuracyOverheadCurve.through(0.6, 100.0, 0.9, 1000.0)
    assert through(0.6) == pytest.approx(100.0) and through(0.9) == pytest.approx(1000.0)
    assert through.accuracy_for(through(0.75)) == pytest.approx(0.75)
    sp = SyntheticTokenPredictor.from_curve(0.9, through)
    assert sp.cost().flops_per_token == pytest.approx(1000.0)
    with pytest.raises(UserError):
        accuracy_overhead_curve(1.2, 1.0, 1.0)
    with pytest.raises(UserError):
        AccuracyOverheadCurve(scale=-1.0, rate=1.0)


# ------------------------------------------------------------------ metrics by hand


def test_distribution_metrics_by_hand():
    counts = np.array([[[3, 1, 0, 0]]])
    pred = np.array([[[0.5, 0.5, 0.0, 0.0]]])
    errs = distribution_errors(pred, counts)
    # |0.5-0.75|, |0.5-0.25|, 0, 0 -> times E=4: 1, 1, 0, 0
    assert errs["eps_mean"][0, 0] == pytest.approx(0.5)
    assert errs["eps_max"][0, 0] == pytest.approx(1.0)
    disjoint = distribution_errors(np.array([[[0.0, 0.0, 0.5, 0.5]]]), counts)
    assert disjoint["jsd"][0, 0] == pytest.approx(1.0)
    assert distribution_errors(shares(counts), counts)["jsd"][0, 0] == 0.0


def test_token_metrics_by_hand():
    true = np.array([[[0, 1]], [[2, 3]], [[4, 5]]], dtype=np.int16)
    pred = np.array([[[0, 1]], [[3, 2]], [[4, 6]]], dtype=np.int16)
    h = token_hits(pred, true)
    np.testing.assert_allclose(h["top1"][:, 0], [1, 0, 1])
    np.testing.assert_allclose(h["recall"][:, 0], [1, 1, 0.5])
    np.testing.assert_allclose(h["exact"][:, 0], [1, 1, 0])


# ------------------------------------------------------------------ costs, errors, evaluate


def test_every_predictor_has_a_cost(trace):
    for name in REAL_DIST:
        p = make_distribution_predictor(name)
        rollout_distribution(p, trace, TRAIN)
        _check_cost(p.cost())
    for name in TABLE_TOKEN + ["oracle"]:
        p = make_token_predictor(name)
        rollout_tokens(p, trace, TRAIN)
        _check_cost(p.cost())
    k, E = trace.meta.top_k, trace.meta.num_experts
    pl = make_token_predictor("prev-layer")
    rollout_tokens(pl, trace, TRAIN)
    assert pl.cost().flops_per_token == 2 * k * E + k * k  # online: plus the co-occurrence updates
    assert make_token_predictor("prev-layer", online=False).fit(trace).cost().flops_per_token == 2 * k * E
    c = pl.cost()
    assert c.time_s(1000, peak_flops=1e12, hbm_bytes_per_s=1e9) == pytest.approx(
        max(c.flops(1000) / 1e12, c.bytes(1000) / 1e9))


def _check_cost(c: PredictorCost):
    vals = [c.flops_per_token, c.bytes_per_token, c.fixed_flops_per_step, c.fixed_bytes_per_step, c.state_bytes]
    assert all(v >= 0 and math.isfinite(v) for v in vals)


def test_missing_features(trace):
    bare = TokensTrace(trace.meta, trace.experts, trace.step_offsets)
    for name, col in (("token-id", "token_id"), ("position", "pos")):
        with pytest.raises(MissingFeature, match=col):
            rollout_tokens(make_token_predictor(name), bare, TRAIN)
    ev = evaluate(bare, ["token-hist"], ["token-id", "position", "prev-layer"], train_steps=TRAIN)
    skipped = {r.name: r.skipped for r in ev.reports if r.skipped}
    assert set(skipped) == {"token-hist", "token-id", "position"}
    assert all("lacks" in s or "token_id" in s for s in skipped.values())


def test_mlp_without_torch_is_skipped_with_a_message(trace, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(MissingFeature, match="torch"):
        make_token_predictor("mlp")
    ev = evaluate(trace, [], ["mlp", "most-frequent"], train_steps=TRAIN)
    assert "torch" in ev.report("mlp").skipped and ev.report("most-frequent").skipped is None


def test_bad_names_params_and_splits(trace):
    with pytest.raises(UserError, match="unknown distribution predictor"):
        make_distribution_predictor("crystal-ball")
    with pytest.raises(UserError, match="no parameter"):
        make_distribution_predictor("ema", beta=1)
    with pytest.raises(UserError, match="alpha"):
        make_distribution_predictor("ema", alpha=0)
    for bad in (0, trace.num_steps):
        with pytest.raises(UserError, match="train steps"):
            rollout_distribution(make_distribution_predictor("ema"), trace, bad)
    with pytest.raises(UserError, match="no parameter"):
        make_token_predictor("prev-layer", window=3)


def test_evaluate_all_predictors(trace, counts_trace):
    pytest.importorskip("torch")
    ev = evaluate(trace, train_steps=TRAIN, synthetic=[0.8])
    assert ev.test_steps == trace.num_steps - TRAIN
    for r in ev.reports:
        assert r.skipped is None, (r.name, r.skipped)
        assert r.cost is not None
        for key in ("eps_mean", "eps_max", "jsd"):
            assert r.overall[key] >= 0 and len(r.per_layer[key]) == trace.meta.num_layers
        assert 0 < r.overall["balancedness"] <= 1
    assert ev.report("oracle", "distribution").overall["eps_mean"] == 0
    assert ev.report("oracle", "token").overall["recall"] == 1
    oracle_bal = ev.report("oracle", "distribution").overall["balancedness"]
    assert oracle_bal > ev.reference["static_balancedness"]
    assert abs(ev.report("synthetic", "token").overall["recall"] - 0.8) <= 0.01
    # a counts trace: distribution predictors run, token predictors are skipped
    ev2 = evaluate(counts_trace, ["ema"], ["prev-layer"], train_steps=TRAIN)
    assert ev2.report("ema").skipped is None and "counts trace" in ev2.report("prev-layer").skipped


def test_split_tokens_keeps_everything(trace):
    a, b = split_tokens(trace, TRAIN)
    assert a.num_steps == TRAIN and b.num_steps == trace.num_steps - TRAIN
    np.testing.assert_array_equal(np.concatenate([a.experts, b.experts]), trace.experts)
    np.testing.assert_array_equal(np.concatenate([a.token_id, b.token_id]), trace.token_id)


@pytest.mark.parametrize("e,k", [(8, 2), (8, 8), (64, 4), (256, 3), (5, 1), (256, 8), (100, 6)])
def test_topk_desc_is_the_stable_descending_order(e, k):
    from moe_gps.predict.tables import topk_desc

    scores = np.random.default_rng(e * k).integers(0, 4, size=(50, 3, e)).astype(np.float32)   # many ties
    assert np.array_equal(topk_desc(scores, k), np.argsort(-scores, axis=-1, kind="stable")[..., :k])


def test_keyed_counts_add_counts_every_routing_by_hand():
    from moe_gps.predict.tables import KeyedCounts

    rng = np.random.default_rng(1)
    table = KeyedCounts(num_keys=1000, num_layers=3, num_experts=8, top_k=2)
    want = np.zeros((1000, 3, 8), dtype=np.int64)
    for _ in range(3):
        keys = rng.integers(0, 1000, size=40)
        experts = rng.integers(0, 8, size=(40, 3, 2)).astype(np.int16)
        valid = rng.random(40) > 0.2
        table.add(keys, experts, valid)
        for t in np.flatnonzero(valid):
            for layer in range(3):
                for x in experts[t, layer]:
                    want[keys[t], layer, x] += 1
    assert np.array_equal(table.counts, want)
    total = table.layer_total.copy()
    for bad in (-1, 1000):          # a negative key would have wrapped around to the last rows
        with pytest.raises(ValueError, match=r"keys must be in \[0, 1000\)"):
            table.add(np.array([3, bad]), np.zeros((2, 3, 2), dtype=np.int16))
    assert np.array_equal(table.counts, want) and np.array_equal(table.layer_total, total)   # nothing added


def test_seeds_beyond_64_bits_work_where_a_64_bit_seed_is_taken(trace):
    """A seed the command line accepts (any integer >= 0) also seeds torch's generator and the skew
    variants' hash, which take 64 bits: it is reduced to them, not an overflow."""
    from moe_gps.recommend.skew import hash_uniform

    idx = np.arange(6)
    u = hash_uniform(idx, idx % 2, idx % 3, salt=7, seed=10**30)
    assert u.shape == (6,) and ((u >= 0) & (u < 1)).all()
    np.testing.assert_array_equal(hash_uniform(idx, idx, idx, 1, 5), hash_uniform(idx, idx, idx, 1, 5 + 2**64 * 3))
    pytest.importorskip("torch")
    a = rollout_tokens(make_token_predictor("mlp", iterations=5, seed=2**64 + 1), trace, TRAIN)
    assert a.min() >= 0 and a.max() < trace.meta.num_experts
