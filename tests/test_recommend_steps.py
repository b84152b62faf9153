"""recommend counts its steps as simulate does: a --tokens-per-step that regroups the trace is applied
before train_steps, sim_steps and the trace's skew; the terminal's run counts add up."""

from __future__ import annotations

import dataclasses

import numpy as np

from moe_gps.config import AttentionSpec, ModelConfig, WorkloadConfig, load_cluster
from moe_gps.recommend.core import recommend
from moe_gps.recommend.report import key_numbers, terminal
from moe_gps.recommend.skew import mean_expert_skew
from moe_gps.recommend.sweep import parse_sweep
from moe_gps.trace import CountsTrace
from moe_gps.trace.regroup import regroup
from moe_gps.trace.synth import synthesize

MODEL = ModelConfig(name="moe-4l", num_layers=4, num_experts=8, top_k=2, hidden_size=2048,
                    moe_intermediate_size=8192, attention=AttentionSpec(num_heads=16, num_kv_heads=4, head_dim=128))
SWEEP = {"seed": 0, "train_steps": 4, "sim_steps": 8, "bandwidth_gb_s": [100], "skew": [2.0], "num_gpus": [4],
         "workloads": [{"phase": "prefill", "tokens_per_step": 256}], "redundant_slots_per_gpu": [1],
         "strategies": ["none", "eplb", "dist:ema"], "map_strategies": ["none", "eplb"],
         "map_token_predictor": None, "predictor_accuracy": [0.9], "predictor_overhead_flops": [0]}


def test_tokens_per_step_regroups_before_the_steps_are_counted():
    # two passes of 2048 tokens: too few steps for train_steps 4 + sim_steps 8, but 32 steps of 128
    trace = synthesize("sst2", num_steps=2, tokens_per_step=2048, seed=1, num_layers=4)
    r = recommend(trace, load_cluster("4xA100-nvlink"), MODEL, WorkloadConfig(tokens_per_step=128),
                  parse_sweep(SWEEP, "sweep"), jobs=1, progress=False)
    assert any("regrouped the trace's 2 steps of 2048 tokens into 32 steps of 128" in n for n in r.notes)
    assert any("simulates steps 4..11 of the trace's 32" in n for n in r.notes)
    # the workload of 256 tokens regroups the 12 kept steps of 128 into 6: fewer than simulate regroups into
    assert not any(n.startswith("workload prefill 256") for n in r.notes)
    at_point = r.df[r.df["workload"] == "prefill 128"]
    assert set(at_point["sim_steps"]) == {8}
    # the trace's skew is that of the regrouped steps the runs simulate
    steps = regroup(trace, 128).select_steps(list(range(12)))
    assert np.isclose(r.plan.skews["trace"].achieved, mean_expert_skew(steps, 4))


def test_a_swept_workload_that_regroups_again_is_named():
    trace = synthesize("sst2", num_steps=40, tokens_per_step=128, seed=1, num_layers=4)
    sweep = parse_sweep({**SWEEP, "sim_steps": 36}, "sweep")
    r = recommend(trace, load_cluster("4xA100-nvlink"), MODEL, WorkloadConfig(), sweep, jobs=1, progress=False)
    note = next(n for n in r.notes if n.startswith("workload prefill 256"))
    assert "regroup the 40 steps into 20 steps of 256 tokens, of which the first 4 fit the predictors" in note
    assert set(r.df[r.df["workload"] == "prefill 256"]["sim_steps"]) == {16}


def test_uneven_counts_steps_and_the_run_counts_are_said_as_they_are():
    tokens = synthesize("sst2", num_steps=14, tokens_per_step=256, seed=1, num_layers=4)
    counts = tokens.counts()
    sizes = np.where(np.arange(14) % 2 == 0, 1, 3)           # steps of 256 and 768 tokens
    meta = dataclasses.replace(tokens.meta, kind="counts", tokens_per_step=[int(256 * k) for k in sizes])
    trace = CountsTrace(meta, counts * sizes[:, None, None])
    sweep = parse_sweep({**SWEEP, "sim_steps": 6, "strategies": ["none", "eplb"],
                         "map_token_predictor": {"accuracy": 0.9, "overhead_flops": 0}}, "sweep")
    r = recommend(trace, load_cluster("4xA100-nvlink"), MODEL, WorkloadConfig(), sweep, jobs=1, progress=False)
    text = terminal(r)
    assert "256-768 tokens/step (as in the trace; mean 512" in text.splitlines()[0]
    assert dict(key_numbers(r))["redundant slots"].split()[0].isdigit()
    runs = next(line for line in text.splitlines() if line.startswith("runs: "))
    n = len(r.records)
    infeasible = sum(x["status"] == "infeasible" for x in r.records)
    assert infeasible >= 1            # the hypothetical token predictor cannot run on counts
    assert runs.startswith(f"runs: {n} ({n - infeasible} ok, {infeasible} infeasible, 0 errors; ")


def test_a_workload_that_would_regroup_into_no_step_to_simulate_scales_instead():
    """40 steps of 128 tokens would regroup into 13 steps of 384: enough for MIN_STEPS, but train_steps=13 would
    leave none of them to simulate; the runs scale the steps instead (as simulate does) and run."""
    trace = synthesize("sst2", num_steps=40, tokens_per_step=128, seed=1, num_layers=4)
    sweep = parse_sweep({**SWEEP, "train_steps": 13, "sim_steps": 27,
                         "workloads": [{"phase": "prefill", "tokens_per_step": 384}]}, "sweep")
    r = recommend(trace, load_cluster("4xA100-nvlink"), MODEL, WorkloadConfig(), sweep, jobs=1, progress=False)
    note = next(n for n in r.notes if n.startswith("the runs of workload prefill 384 scale"))
    assert "fewer than the 14 that regrouping needs (one more than train_steps=13)" in note
    runs = r.df[r.df["workload"] == "prefill 384"]
    assert len(runs) and set(runs["status"]) == {"ok"} and set(runs["sim_steps"]) == {27}
