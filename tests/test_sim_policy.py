"""Re-plan and copy policies, the oracle bound and the verdict."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_gps.config import (AttentionSpec, ModelConfig, SimulateConfig, StrategyConfig, WorkloadConfig,
                            load_cluster, strategy_from_name)
from moe_gps.trace.data import CountsTrace
from moe_gps.trace.meta import TraceMeta
from sim.cost import Hardware
from sim.planning import CopyCost
from sim.run import simulate
from sim.verdict import THIN_STEPS, compare, speedup_interval, verdict_of
from sim.work import Copies

MODEL = ModelConfig(name="mixtral-2l", num_layers=2, num_experts=8, top_k=2, hidden_size=4096,
                    moe_intermediate_size=14336, attention=AttentionSpec(num_heads=32, num_kv_heads=8, head_dim=128))
US = 1e-6


def counts_trace(counts: np.ndarray) -> CountsTrace:
    """A counts trace of int [steps, layers, experts] (tokens = counts per layer / top_k)."""
    S, L, E = counts.shape
    tokens = (counts[:, 0, :].sum(axis=1) // 2).astype(int).tolist()
    meta = TraceMeta(kind="counts", num_layers=L, num_experts=E, top_k=2, model=MODEL.name, dataset="test",
                     source="synthetic", tokens_per_step=tokens)
    return CountsTrace(meta, counts.astype(np.int64))


def shifting_trace(steps: int = 12, tokens: int = 4096) -> CountsTrace:
    """Expert 0 is hot for the first half, expert 7 for the second (every layer)."""
    c = np.full((steps, 2, 8), tokens * 2 // 16, dtype=np.int64)
    hot = np.where(np.arange(steps) < steps // 2, 0, 7)
    c[np.arange(steps), :, hot] *= 5
    c = c * (tokens * 2) // c.sum(axis=2, keepdims=True)
    return counts_trace(c)


def run(trace, names, cluster="4xA100-nvlink", **kw) -> object:
    strategies = [strategy_from_name(n) if isinstance(n, str) else n for n in names]
    cfg = SimulateConfig(cluster=load_cluster(cluster) if isinstance(cluster, str) else cluster, model=MODEL,
                         strategies=strategies, train_steps=2, **kw)
    return simulate(trace, cfg, progress=False)


# ---------------------------------------------------------------------------- copy cost

def test_copy_cost_by_policy_by_hand():
    """Copies of one layer, GPU 0 -> 1 for 100 us and GPU 0 -> 2 for 50 us (GPU 0 sends 150 us)."""
    hw = Hardware.from_config(load_cluster("4xA100-nvlink"), MODEL)
    copies = Copies(np.array([0, 0]), np.array([0, 0]), np.array([1, 2]), np.array([1e6, 1e6]),
                    np.array([100, 50]) * US)
    attention = np.array([40 * US, 40 * US])
    link = np.array([10 * US, 10 * US])
    cost = lambda policy: CopyCost(policy, 0.5, hw, attention, link, 1000 * US).replan(copies)  # noqa: E731
    host = hw.replan_overhead                                        # applying the placement, every policy
    assert cost("critical") == pytest.approx(host + 150 * US)        # the layer waits for GPU 0's sends
    assert cost("overlap") == pytest.approx(host + 110 * US)         # 150 - 40 under attention
    # 150 us at 2% link time, x 0.5 / 0.5; then GPU 1 (or 2) copies its received 1 MB from staging into its slot,
    # after the install's fixed host work (the replan overhead where the cluster gives no install overhead)
    assert hw.install_overhead == hw.replan_overhead
    assert cost("async") == pytest.approx(hw.install_overhead + 150 * US * 20 / 1000 + 2 * 1e6 / hw.hbm)
    assert cost("hidden") == 0.0


def test_async_copies_between_slots_are_the_installs_not_the_background_jobs():
    """Under async the transfers run in the background; the copies between a GPU's slots (old rows copied
    aside, local copies) are made by the install when the placement switches in, and charged there once:
    the background job holds the transfers only."""
    from moe_gps.placement import plan_placement
    from sim.work import install_time, weight_copies

    hw = Hardware.from_config(load_cluster("4xA100-nvlink"), MODEL)
    before = plan_placement(np.array([[9.0, 1, 1, 1, 1, 1, 1, 1]] * 2), 4, 4, "eplb")
    after = plan_placement(np.array([[1.0, 1, 1, 1, 1, 1, 1, 9]] * 2), 4, 4, "eplb")
    moves = weight_copies(before, after, MODEL.expert_bytes, hw, 0.5)
    local = moves.src == moves.dst
    assert local.any() and (~local).any()
    job = moves.between_gpus()
    assert len(job) == int((~local).sum()) and (job.src != job.dst).all()
    assert job.seconds.sum() == pytest.approx(moves.seconds[~local].sum())
    # the install charges the received experts (staging -> slot) and the copies between slots
    received = np.bincount(moves.dst[~local], weights=moves.bytes[~local], minlength=4)
    within = np.bincount(moves.dst[local], weights=moves.seconds[local], minlength=4)
    assert install_time(moves, 4, hw) == pytest.approx(hw.install_overhead + (2 * received / hw.hbm + within).max())
    # a simulation: the timeline's background lane has transfers only
    # a simulation whose re-plan copies between slots (eplb, the hot expert moving): the timeline's
    # background lane has transfers only
    eplb = dataclasses.replace(strategy_from_name("eplb"), replan_interval=2, window=1, min_gain=0.0)
    cfg = SimulateConfig(cluster=load_cluster("4xA100-nvlink"), model=MODEL, train_steps=2, copy_policy="async",
                         strategies=[strategy_from_name("none"), eplb])
    r = simulate(shifting_trace(steps=14), cfg, progress=False, timeline_steps=range(2, 14))
    assert r.get("eplb").replans >= 1
    lane = {row[2].rsplit(" ", 1)[0] for row in r.timeline["eplb"] if row[0] == "link"}
    assert lane == {"background copy"}


def test_a_note_names_background_re_plans_that_stage_more_than_the_memory_left():
    """Under async the received experts wait in staging until the switch; a strategy that stages more on one
    GPU than its memory has free beside its weights and KV cache gets a note (the numbers stand)."""
    from moe_gps.config.loader import memory_use

    trace = shifting_trace(steps=14)
    eplb = dataclasses.replace(strategy_from_name("eplb"), replan_interval=2, window=1, min_gain=0.0)
    roomy = run(trace, ["none", eplb], copy_policy="async")
    staged = roomy.get("eplb").info.staged_bytes
    assert staged > 0 and not any("stage up to" in n for n in roomy.notes)
    base = load_cluster("4xA100-nvlink")
    r = roomy.get("eplb")
    mem = memory_use(base, MODEL, roomy.config.workload, (8 + r.redundant_slots) // 4, float(roomy.tokens.max()))
    tight = dataclasses.replace(base, gpu=dataclasses.replace(
        base.gpu, hbm_capacity_gb=(mem.total + staged / 2) / 1e9 + base.gpu.reserved_memory_gb))
    short = run(trace, ["none", eplb], cluster=tight, copy_policy="async")
    notes = [n for n in short.notes if "stage up to" in n]
    assert notes == [f"eplb: its background re-plans stage up to {staged / 1e9:.1f} GB of received experts on one "
                     f"GPU until the switch, more than the {staged / 2e9:.1f} GB its memory has free beside its "
                     f"weights and KV cache; a deployment has to stage fewer at once (a layer at a time, say) or "
                     f"runs out of memory"]
    assert np.array_equal(short.get("eplb").layer_time, roomy.get("eplb").layer_time)


# ---------------------------------------------------------------------------- the min_gain rule

def test_min_gain_weighs_the_saving_against_the_copies():
    """The hot expert changes half-way. A re-plan's copies (one 352 MB expert per layer and GPU it
    lands on) cost 1.2 ms at 300 GB/s, and 352 ms at 1 GB/s; balancing saves a few ms per step.
    min_gain 1 re-plans on NVLink only; min_gain 0 re-plans on both."""
    trace = shifting_trace()
    dist = dataclasses.replace(strategy_from_name("dist:previous"), replan_interval=2, window=1)
    slow = load_cluster("4xA100-nvlink")
    slow = dataclasses.replace(slow, intra_node=dataclasses.replace(slow.intra_node, bandwidth_gb_s=1.0))
    fast_r = run(trace, ["none", dist], copy_policy="critical")
    slow_r = run(trace, ["none", dist], cluster=slow, copy_policy="critical")
    assert fast_r.get("dist:previous").replans >= 1
    assert slow_r.get("dist:previous").replans == 0
    eager = run(trace, ["none", dataclasses.replace(dist, min_gain=0.0)], cluster=slow, copy_policy="critical")
    assert eager.get("dist:previous").replans >= 1
    # paying 352 ms of copies per re-plan is much slower than keeping the old placement
    assert eager.get("dist:previous").step_latency.sum() > slow_r.get("dist:previous").step_latency.sum() + 0.3


def test_async_placement_serves_only_after_its_copies_land():
    """With background copies on a slow link the new placement waits until its copies have landed:
    the GPU loads stay those of the old placement for the steps in between, and the copies never sit
    on the critical path (the only cost is the slowed dispatch and combine)."""
    trace = shifting_trace(steps=14)
    dist = dataclasses.replace(strategy_from_name("dist:previous"), replan_interval=2, window=1, min_gain=0.0)
    # background copies at a fifth of NVLink: 352 MB take 6 ms, the job (3.5 GB) lands after a few 11 ms steps
    asy = run(trace, ["none", dist], copy_policy="async", copy_bandwidth_share=0.2).get("dist:previous")
    crit = run(trace, ["none", dist], copy_policy="critical").get("dist:previous")
    first = int(np.flatnonzero(asy.copy_bytes.sum(axis=1) > 0)[0])
    assert first == int(np.flatnonzero(crit.copy_bytes.sum(axis=1) > 0)[0])
    # critical: the new placement serves the step it is made at; async: the old one until its copies land
    assert crit.gpu_skew[first].mean() < asy.gpu_skew[first].mean()
    landed = first + 1 + int(np.argmax(asy.gpu_skew[first + 1:].mean(axis=1) < asy.gpu_skew[first].mean() - 0.1))
    assert landed > first + 1 and np.allclose(asy.gpu_skew[first:landed], asy.gpu_skew[first])
    # the copies never wait on the critical path: only the dispatch and combine they meet slow down, and
    # installing the landed weights (staging -> slots) before the step that switches
    assert asy.phases["copy"].sum() < crit.phases["copy"].sum()
    assert asy.phases["copy"][landed].sum() > asy.phases["copy"][first + 1:landed].sum(axis=1).max()


# ---------------------------------------------------------------------------- the oracle bound

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(G=st.sampled_from([2, 4]), per_node=st.sampled_from([1, 2, 4]), bw=st.floats(1.0, 600.0),
       tokens=st.sampled_from([64, 512, 4096, 16384]), policy=st.sampled_from(["critical", "overlap", "async",
                                                                                "hidden"]),
       seed=st.integers(0, 10_000))
def test_oracle_is_never_slower_than_no_duplication(G, per_node, bw, tokens, policy, seed):
    per_node = min(per_node, G)
    rng = np.random.default_rng(seed)
    steps = 8
    share = rng.dirichlet(np.full(8, rng.uniform(0.2, 3.0)), size=(steps, 2))
    counts = np.maximum(np.round(share * tokens * 2), 0).astype(np.int64)
    counts[:, :, 0] += 1
    trace = counts_trace(counts)
    base = load_cluster("2x8xH100-ib")
    link = dataclasses.replace(base.intra_node, bandwidth_gb_s=bw)
    cluster = dataclasses.replace(base, num_gpus=G, gpus_per_node=per_node, intra_node=link,
                                  inter_node=dataclasses.replace(base.inter_node, bandwidth_gb_s=bw / 4))
    oracle = dataclasses.replace(strategy_from_name("oracle"), replan_interval=int(rng.integers(1, 4)))
    r = run(trace, ["none", oracle], cluster=cluster, copy_policy=policy,
            workload=WorkloadConfig(tokens_per_step=tokens))
    none, orc = r.get("none").step_latency.sum(), r.get("oracle").step_latency.sum()
    assert orc <= none * (1 + 1e-9), (orc, none)


# ---------------------------------------------------------------------------- the verdict

def fake(latencies: dict[str, list[float]], kinds: dict[str, str] | None = None):
    """A SimResult-shaped object with these step latencies."""
    kinds = kinds or {}
    cfg = {n: (StrategyConfig(kind="token", predictor="synthetic") if n == "what-if" else
               StrategyConfig(kind=kinds.get(n, "none" if n == "none" else "static"))) for n in latencies}
    rows = [SimpleNamespace(name=n, config=cfg[n], step_latency=np.asarray(v, dtype=float)) for n, v in latencies.items()]
    S = len(next(iter(latencies.values())))
    # every step routes differently (a distinct routing key per step)
    return SimpleNamespace(strategies=rows, config=SimpleNamespace(seed=0), steps=np.arange(S),
                           tokens=np.full(S, 512.0), routing_key=np.arange(S, dtype=float))


def test_verdict_winner_interval_and_ties():
    rng = np.random.default_rng(0)
    none = 10 + rng.normal(0, 0.1, 40)
    v = verdict_of(fake({"none": none, "a": none / 1.10 + rng.normal(0, 0.02, 40),
                         "b": none / 1.099 + rng.normal(0, 0.02, 40), "c": none / 1.02,
                         "oracle": none / 1.5, "what-if": none / 1.4}, {"oracle": "oracle"}))
    assert v.strategy == "a" and v.ci_low < v.speedup < v.ci_high and v.ci_low > 1.0
    assert v.ties == ["b"] and not v.thin and v.beats_none       # c is outside; oracle and what-if are not deployable
    line = v.line()
    assert line.startswith(f"verdict: a is the fastest deployable strategy, {v.speedup:.3f}x over none (95% CI "
                           f"{v.ci_low:.3f}-{v.ci_high:.3f} over 40 simulated steps)")
    assert line.endswith("ties within the interval: b") and "nan" not in line
    assert set(v.to_dict()) >= {"strategy", "speedup", "ci_low", "ci_high", "ties"}


def test_verdict_when_nothing_beats_no_duplication_and_thin_evidence():
    none = np.array([10.0, 10.2, 9.9, 10.1, 10.0])
    v = verdict_of(fake({"none": none, "a": none + np.array([-0.1, 0.1, 0.05, -0.05, 0.02]), "b": none * 1.2}))
    assert v.strategy == "none" and v.thin and len(none) < THIN_STEPS
    assert v.ties == ["a"] and v.runner_up["strategy"] == "a"      # a's interval contains 1.0
    assert "thin evidence" in v.line() and "nan" not in v.line()
    # one step: a degenerate interval, never nan
    one = verdict_of(fake({"none": [10.0], "a": [9.0]}))
    assert (one.speedup, one.ci_low, one.ci_high) == pytest.approx((10 / 9, 10 / 9, 10 / 9)) and one.thin
    assert speedup_interval(np.ones(5), np.ones(5)) == (1.0, 1.0, 1.0)
    assert verdict_of(fake({"a": [1.0, 2.0]})) is None              # no `none` to compare with


def test_no_duplication_wins_a_tie():
    none = np.array([10.0, 10.2, 9.9, 10.1, 10.0, 10.3, 9.8, 10.0])
    v = verdict_of(fake({"none": none, "a": none * (1 - 1e-13)}))   # a strategy that changes nothing
    assert v.strategy == "none" and v.ties == ["a"]
    assert not v.runner_up["same_every_step"] and "the best duplicating one, a, runs at 1.000x" in v.line()
    same = verdict_of(fake({"none": none, "a": none.copy(), "b": none * 1.1}))   # routes as none does
    assert same.runner_up["strategy"] == "a" and same.runner_up["same_every_step"]
    assert "no duplicating strategy is faster: the best, a, takes the same time on every one of the 8 " \
           "simulated steps" in same.line()


def test_equal_strategies_the_first_listed_is_named():
    none = np.array([10.0, 10.2, 9.9, 10.1, 10.0, 10.3, 9.8, 10.0])
    same = none / 1.1
    v = verdict_of(fake({"none": none, "z": same, "b": same.copy(), "a": same.copy()}))
    assert v.strategy == "z" and v.ties == ["b", "a"] and v.same_as_winner == ["b", "a"]
    # the line says that naming z over b and a is only their order: they route alike on every step
    assert v.line().endswith("ties within the interval: b, a (b and a take its time on every one of the 8 "
                             "simulated steps: their plans route alike, so which is named is only the order they "
                             "are listed in)")
    slower = verdict_of(fake({"none": none, "z": none * 1.01, "a": none * 1.01}))
    assert slower.strategy == "none" and slower.runner_up["strategy"] == "z"


def test_a_tie_is_a_strategy_the_paired_interval_cannot_tell_from_the_winner():
    """b's speed-up over none lies inside a's interval (none varies a lot), but b is 0.5% slower than a
    on every step: compared with a, step by step, it is told apart, so it is no tie; c, 0.5% slower on
    some steps and faster on others, is."""
    rng = np.random.default_rng(1)
    none = 10 + rng.normal(0, 0.5, 40)
    a = none / 1.10 + rng.normal(0, 0.3, 40)
    wobble = np.where(np.arange(40) % 2 == 0, 1.005, 1 / 1.005)
    v = verdict_of(fake({"none": none, "a": a, "b": a * 1.005, "c": a * wobble}))
    b_point = none.mean() / (a * 1.005).mean()
    assert v.strategy == "a" and v.ci_low < b_point < v.ci_high     # inside the winner's interval over none
    assert v.ties == ["c"] and v.line().endswith("ties within the interval: c")
    # without a tie the line says how far behind the closest other is, on the same steps
    alone = verdict_of(fake({"none": none, "a": a, "b": a * 1.005}))
    assert alone.ties == [] and alone.runner_up["strategy"] == "b"
    assert alone.runner_up["vs_winner"] == pytest.approx([1 / 1.005] * 3)
    assert alone.line().endswith("; the next, b, is 0.50% slower on the same steps (95% CI 0.50-0.50%)")
    served = compare({"none": none / 20, "a": a / 10, "b": a / 10 * 0.99}, "none", 0, higher_is_better=True)
    assert served.strategy == "a" and served.next_text("is {gap}% lower", higher_is_better=True) == \
        "; the next, b, is 1.00% lower (95% CI 1.00-1.00%)"


def test_the_interval_resamples_blocks_of_steps_alike_in_time():
    """Steps that drift (a slow wander in the ratio) give a wider interval from blocks of consecutive steps
    than from single steps, which treat them as independent; an interval holds its point."""
    rng = np.random.default_rng(2)
    S = 64
    wander = np.cumsum(rng.normal(0, 0.01, S))
    base = np.full(S, 10.0)
    other = base / (1.05 + wander)
    point, lo, hi = speedup_interval(base, other)
    p1, lo1, hi1 = speedup_interval(base, other, block=1)
    assert point == p1 and lo <= point <= hi
    assert hi - lo > 1.5 * (hi1 - lo1)


def test_speedup_interval_of_zero_and_missing_samples():
    assert speedup_interval(np.zeros(5), np.zeros(5)) == (1.0, 1.0, 1.0)       # nothing on both sides: a tie
    nan = speedup_interval(np.array([1.0, 2.0, np.nan, 1.0, 1.0]), np.ones(5))
    assert all(np.isnan(x) for x in nan)


def test_two_steps_still_give_an_interval_and_one_step_none():
    """A block as long as the series would redraw the series itself: blocks are at most half the steps, so
    two steps resample single steps; one step has no interval, and the gap to the next says none either."""
    point, lo, hi = speedup_interval(np.array([10.0, 11.0]), np.array([9.0, 10.5]))
    assert lo < point < hi
    one = compare({"none": np.array([1.0]), "a": np.array([0.9]), "b": np.array([0.95])}, "none", 0)
    assert "the next, b, is 5.56% slower on the same steps" in one.line() and "95% CI" not in one.line()


def test_a_baseline_with_a_nan_mean_does_not_stop_the_verdict():
    v = compare({"none": np.array([1.0, 1.2, 1.0, np.nan]), "x": np.ones(4)}, "none", 0)
    assert v.strategy == "x" and np.isnan(v.speedup)


def test_verdict_with_only_no_duplication_and_with_one_step():
    only = verdict_of(fake({"none": [10.0, 10.1, 9.9, 10.0, 10.2, 9.8, 10.0, 10.1]}))
    assert only.line() == "verdict: none (no duplication) is the only deployable strategy simulated: nothing to " \
                          "compare it with"
    one = verdict_of(fake({"none": [10.0], "a": [10.0]}))
    assert "takes the same time on its 1 simulated step" in one.line()
    assert "ties (the same time): a" in one.line() and "within the interval" not in one.line()


def test_distinct_steps_count_steps_by_their_expert_loads():
    """Steps 0-3 are one step four times; steps 4 and 5 swap the loads of experts 0 and 1, which share a
    GPU: the same per-GPU loads and skew, but other routing, so they count as two."""
    one = np.array([[400, 300, 100, 100, 100, 100, 100, 100]] * 2)
    swapped = one[:, [1, 0, 2, 3, 4, 5, 6, 7]]
    c = np.stack([one, one, one, one, one, one, one, swapped])
    res = run(counts_trace(c), ["none", "eplb"])
    assert len(res.steps) == 6
    assert res.verdict.distinct_steps == 2 and res.verdict.thin
    assert "2 distinct of the 6 simulated steps" in res.verdict.line()


def test_predicting_strategies_load_the_plan_of_the_profiled_loads():
    """Before serving there are no predictions, only the profile: every distribution predictor (a
    one-step-ahead `previous` as much as the profile) loads the plan made from the true loads of
    the last `window` steps, and differs only in its re-plans."""
    rng = np.random.default_rng(3)
    base = np.array([5.0, 1, 1, 1, 2, 1, 1, 4])
    c = np.stack([[rng.multinomial(8192, rng.dirichlet(base * 20)) for _ in range(2)] for _ in range(10)])
    trace = counts_trace(c)
    names = [StrategyConfig(kind="distribution", predictor=p, redundant_slots=4, replan_interval=100, window=2)
             for p in ("profile", "previous", "ema")]
    res = run(trace, names)
    lat = [r.step_latency for r in res.strategies]
    assert all(r.replans == 0 for r in res.strategies)
    np.testing.assert_array_equal(lat[0], lat[1])
    np.testing.assert_array_equal(lat[0], lat[2])


def test_distribution_strategy_reads_its_rollout_again_from_an_earlier_step(monkeypatch):
    """Predictions are rolled out a chunk at a time as steps are asked for in order; asked again
    from an earlier step (serving passes over the trace several times) they start again, the same."""
    import moe_gps.predict.base as base
    from moe_gps.predict import make_distribution_predictor, rollout_distribution
    from sim.strategies import make_strategy

    monkeypatch.setattr(base, "ROLLOUT_CHUNK", 3)
    trace = shifting_trace(steps=12)
    made = []

    def factory(cfg, ctx, seed):
        made.append(make_strategy(cfg, ctx, seed, cfg.resolved_policy(2)))
        return made[-1]

    cfg = SimulateConfig(cluster=load_cluster("4xA100-nvlink"), model=MODEL, train_steps=2,
                         strategies=[StrategyConfig(kind="distribution", predictor="ema", redundant_slots=4)])
    simulate(trace, cfg, progress=False, strategy_factory=factory)
    ref = rollout_distribution(make_distribution_predictor("ema"), trace, 2)
    st = made[0]
    got = [st._shares(i) for i in (9, 1, 5, 0, 8)]
    for i, g in zip((9, 1, 5, 0, 8), got):
        np.testing.assert_array_equal(g, ref[i])


@pytest.mark.parametrize("block", [1, 3])
def test_bootstrap_drawn_a_few_resamples_at_a_time_is_the_same(monkeypatch, block):
    """The interval's resamples are drawn in bounded batches on long runs: the same interval as one draw."""
    import sim.verdict as verdict
    rng = np.random.default_rng(2)
    a = rng.uniform(1, 2, 200)
    b = a * rng.uniform(0.9, 1.1, 200)
    monkeypatch.setattr(verdict, "BOOTSTRAP_CELLS", 10 ** 9)
    whole = speedup_interval(a, b, 5, block=block)
    monkeypatch.setattr(verdict, "BOOTSTRAP_CELLS", 333)              # one resample (and a bit) at a time
    assert speedup_interval(a, b, 5, block=block) == whole
