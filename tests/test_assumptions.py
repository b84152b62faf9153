"""The assumption bundles (realistic, paper) and the paper's predictor costs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moe_gps.config import AttentionSpec, ModelConfig, SimulateConfig, load_cluster, load_model, strategy_from_name
from moe_gps.config.loader import load_simulate_config
from moe_gps.config.schema import ASSUMPTION_BUNDLES
from moe_gps.errors import UserError
from moe_gps.predict.costs import cost_preset
from moe_gps.predict.synthetic import CurveTokenPredictor, measured_curve
from moe_gps.trace.synth import synthesize
from sim.report import write_outputs
from sim.run import resolve_config, simulate

MODEL = ModelConfig(name="mixtral-4l", num_layers=4, num_experts=8, top_k=2, hidden_size=4096,
                    moe_intermediate_size=14336, attention=AttentionSpec(num_heads=32, num_kv_heads=8, head_dim=128))
NAMES = ("none", "eplb", "dist:ema", "token:most-frequent", "oracle")
TOP = ("copy_policy", "ffn_weight_reads", "predictor_overlap")
STRATEGY = ("replan_interval", "window", "min_gain", "planner", "direct_routing")


@pytest.fixture(scope="module")
def trace():
    return synthesize("sst2", num_steps=12, tokens_per_step=256, seed=3, num_layers=4)


def config(**kw) -> SimulateConfig:
    return SimulateConfig(cluster=load_cluster("4xA100-nvlink"), model=MODEL,
                          strategies=[strategy_from_name(n) for n in NAMES], train_steps=4, **kw)


def test_each_bundle_sets_exactly_its_fields():
    plain = config()
    for name, bundle in ASSUMPTION_BUNDLES.items():
        filled = config(assumptions=name).with_assumptions()
        for key in TOP:
            assert getattr(filled, key) == bundle[key], (name, key)
        for before, after in zip(plain.strategies, filled.strategies):
            want = {**(bundle["predicting"] if after.kind in ("distribution", "token") else {}),
                    **(bundle["token"] if after.kind == "token" else {}),
                    **(bundle["oracle"] if after.kind == "oracle" else {})}
            for key in STRATEGY:
                assert getattr(after, key) == want.get(key, getattr(before, key)), (name, after.kind, key)
    # the paper's bundle: copies hidden, every batch re-planned by its greedy planner, FFN in proportion to
    # tokens, predictors before attention, post-gate dispatch
    paper = ASSUMPTION_BUNDLES["paper"]
    assert (paper["copy_policy"], paper["ffn_weight_reads"], paper["predictor_overlap"]) == ("hidden", False, False)
    assert paper["predicting"] == {"replan_interval": 1, "window": 1, "min_gain": 0.0, "planner": "greedy"}


def test_a_field_given_wins_and_the_bundle_is_written_in_full(trace, tmp_path):
    cfg = config(assumptions="paper", copy_policy="critical")
    cfg = dataclasses.replace(cfg, strategies=[s if s.kind != "distribution" else dataclasses.replace(s, window=3)
                                               for s in cfg.strategies])
    resolved, _ = resolve_config(cfg, 4, "t")
    assert resolved.copy_policy == "critical" and resolved.ffn_weight_reads is False
    dist = next(s for s in resolved.strategies if s.kind == "distribution")
    assert (dist.window, dist.replan_interval, dist.min_gain, dist.planner) == (3, 1, 0.0, "greedy")
    r = simulate(trace, cfg, progress=False)
    write_outputs(r, tmp_path, plots=False)
    again = load_simulate_config(tmp_path / "config.yaml")
    for key in TOP:
        assert getattr(again, key) == getattr(resolved, key)
    assert [dataclasses.asdict(s) for s in again.strategies] == [dataclasses.asdict(s) for s in r.config.strategies]
    rerun = simulate(trace, again, progress=False)
    for a, b in zip(r.strategies, rerun.strategies):
        assert np.array_equal(a.layer_time, b.layer_time), a.name


def test_the_summary_names_the_assumptions_and_the_choices_the_run_made(trace):
    """Two outputs side by side say which model made each: the bundle, and a field given on its own."""
    from sim.report import format_summary

    paper = format_summary(simulate(trace, config(assumptions="paper", copy_policy="async"), progress=False))
    assert ("paper assumptions (copies async, expert FFN in proportion to its tokens, predictors before "
            "attention)") in paper.splitlines()[0]
    real = format_summary(simulate(trace, config(), progress=False))
    assert ("realistic assumptions (copies async, every replica reads its weights, predictors beside "
            "attention)") in real.splitlines()[0]


def test_paper_assumptions_change_the_terms_they_name(trace):
    real = simulate(trace, config(), progress=False)
    paper = simulate(trace, config(assumptions="paper"), progress=False)
    # FFN in proportion to tokens: no weight read, so no duplication's FFN is faster than with reads
    assert paper.get("none").phases["ffn"].mean() < real.get("none").phases["ffn"].mean()
    # re-planned every batch, copies hidden: the distribution strategy re-plans many times, pays nothing
    d = paper.get("dist:ema")
    assert d.replans >= 4 and d.copy_bytes.sum() > 0 and d.phases["copy"].max() == 0
    # the distribution predictor before attention (paper) costs GPU time; on the host (realistic) none
    assert paper.get("dist:ema").phases["predictor"].min() > 0 and real.get("dist:ema").phases["predictor"].max() == 0
    assert paper.config.copy_policy == "hidden" and real.config.copy_policy == "async"


def test_paper_predictor_costs():
    mixtral = load_model("mixtral-8x7b")
    mlp = cost_preset("paper-mlp", mixtral.hidden_size, mixtral.num_experts, 512, 5e-6)
    # 4096 -> 128 -> 64 -> 8: 2 (4096 x 128 + 128 x 64 + 64 x 8) = 1,065,984 FLOPs per token
    assert mlp.flops_per_token == 2 * (4096 * 128 + 128 * 64 + 64 * 8) and mlp.latency_s == 0
    assert "4096->128->64->8" in mlp.note
    # scaled to a model: DeepSeek-V3 (7168 hidden, 256 experts) -> 7168 -> 224 -> 112 -> 256
    ds = load_model("deepseek-v3")
    big = cost_preset("paper-mlp", ds.hidden_size, ds.num_experts, 512, 5e-6)
    assert big.flops_per_token == 2 * (7168 * 224 + 224 * 112 + 112 * 256)
    lstm = cost_preset("lstm", mixtral.hidden_size, mixtral.num_experts, 512, 5e-6)
    assert lstm.serial_steps == 512 and lstm.latency_s == pytest.approx(2.56e-3)
    assert lstm.flops_per_token == 2 * (4 * (4096 * 128 + 128 * 128) + 128 * 8)
    with pytest.raises(UserError, match="unknown predictor cost preset 'big'"):
        cost_preset("big", 4096, 8, 1, 0)


def test_cost_presets_and_the_curve_in_a_simulation(trace):
    names = ["none", "token:synthetic(accuracy=0.9,cost=lstm)", "token:synthetic(accuracy=0.9,cost=paper-mlp)",
             "token:curve(accuracy=0.9)"]
    cfg = dataclasses.replace(config(predictor_overlap=False), strategies=[strategy_from_name(n) for n in names])
    r = simulate(trace, cfg, progress=False)
    lstm, mlp = r.get(names[1]), r.get(names[2])
    # the LSTM's 512 serial steps of 5 us: 2.56 ms before every layer's attention, on top of its roofline
    assert lstm.phases["predictor"].min() > 2.56e-3 > mlp.phases["predictor"].max()
    # the curve is fitted to the measured predictors: its cost at 0.9 follows it
    curve, points = measured_curve(trace.select_steps(range(4)))
    assert len(points) >= 2 and r.get(names[3]).info.predictor_cost["flops_per_token"] == pytest.approx(curve(0.9))
    assert not r.get(names[3]).config.deployable and r.verdict.strategy in ("none", *names[1:3])
    explicit = CurveTokenPredictor(0.5, scale=1e6, rate=2.0)
    explicit.fit(trace)
    assert explicit.cost().flops_per_token == pytest.approx(1e6 * np.exp(-1.0))
    with pytest.raises(UserError, match="give both scale and rate"):
        CurveTokenPredictor(0.5, scale=1e6)
