"""Regrouping a trace's own tokens into steps of another size, and the phase read from a trace."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moe_gps.cli.main import main
from moe_gps.config import AttentionSpec, ModelConfig, SimulateConfig, load_cluster, strategy_from_name
from moe_gps.errors import UserError
from moe_gps.trace import load_trace, write_trace
from moe_gps.trace.data import CountsTrace, TokensTrace
from moe_gps.trace.regroup import MIN_STEPS, decode_shaped, regroup, regroup_or_scale
from moe_gps.trace.synth import synthesize
from sim.loads import as_counts_trace
from sim.run import simulate

MODEL = ModelConfig(name="mixtral-4l", num_layers=4, num_experts=8, top_k=2, hidden_size=4096,
                    moe_intermediate_size=14336, attention=AttentionSpec(num_heads=32, num_kv_heads=8, head_dim=128))


@pytest.fixture(scope="module")
def trace() -> TokensTrace:
    return synthesize("mixtral-mmlu", num_steps=10, tokens_per_step=100, seed=2, num_layers=4, with_weights=True)


def test_regrouping_keeps_every_assignment_in_order(trace):
    big = regroup(trace, 250)                      # 1000 tokens: 4 steps of 250, steps of 100 concatenated
    assert big.num_steps == 4 and big.tokens_per_step.tolist() == [250] * 4
    assert np.array_equal(big.experts, trace.experts[:1000]) and np.array_equal(big.weights, trace.weights[:1000])
    for f in ("token_id", "seq", "pos"):
        assert np.array_equal(getattr(big, f), getattr(trace, f)[:1000]), f
    small = regroup(trace, 30)                     # steps of 100 split; the last 10 tokens left out
    assert small.num_steps == 33 and np.array_equal(small.experts, trace.experts[:990])
    assert small.meta.provenance["regrouped"]["tokens_left_out"] == 10
    # the (token, layer, expert) assignments of each regrouped step are those of its slice of the trace
    s = small.step(5)
    assert np.array_equal(s.experts, trace.experts[150:180]) and np.array_equal(s.token_id, trace.token_id[150:180])


def test_a_single_step_trace_regroups_into_several(trace, tmp_path, capsys):
    one = trace.select_steps([0])
    one = dataclasses.replace(one, step_offsets=np.array([0, 100]))
    path = tmp_path / "one.parquet"
    write_trace(path, one)
    model = tmp_path / "m.yaml"
    from moe_gps.config import dump_yaml
    model.write_text(dump_yaml(MODEL))
    # refused as it is, with the remedy named
    assert main(["simulate", str(path), "--model", str(model), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "the trace has 1 step" in err and "--tokens-per-step 6 (16 steps)" in err and err.count("\n") == 1
    assert main(["trace", "rechunk", str(path), "--tokens-per-step", "10", "-o", str(tmp_path / "r.parquet")]) == 0
    assert "1 step of 100 tokens regrouped into 10 steps of 10" in capsys.readouterr().out
    r = load_trace(tmp_path / "r.parquet")
    assert r.num_steps == 10 and np.array_equal(r.experts, one.experts)
    # predict evaluate regroups the same way, and warns when steps hold fewer tokens than experts x top_k
    assert main(["predict", "evaluate", str(path), "--tokens-per-step", "10", "--predictors", "profile"]) == 0
    out = capsys.readouterr().out
    assert "warning: some steps hold fewer tokens (10) than experts x top_k (8 x 2)" in out
    assert main(["predict", "evaluate", str(path)]) == 2
    assert "--tokens-per-step N" in capsys.readouterr().err


def test_simulate_regroups_or_scales_with_a_warning(trace):
    cfg = SimulateConfig(cluster=load_cluster("4xA100-nvlink"), model=MODEL,
                         strategies=[strategy_from_name("none"), strategy_from_name("dist:ema")])
    enough = dataclasses.replace(cfg, workload=dataclasses.replace(cfg.workload, tokens_per_step=50))
    r = simulate(trace, enough, progress=False)                    # 1000 tokens: 20 steps of 50
    assert r.inferred == ["regrouped the trace's 10 steps of 100 tokens into 20 steps of 50, in trace order"]
    assert r.tokens.tolist() == [50.0] * 15 and not r.warnings
    few = dataclasses.replace(cfg, workload=dataclasses.replace(cfg.workload, tokens_per_step=200))
    r = simulate(trace, few, progress=False)                       # 5 steps of 200 < MIN_STEPS: scaled
    assert r.inferred == [] and r.tokens.tolist() == [200.0] * 8
    assert len(r.warnings) == 1 and r.warnings[0].startswith(
        f"--tokens-per-step 200: the trace holds 1000 tokens, 5 steps of 200 (regrouping needs {MIN_STEPS}")
    assert "scaled from its 100 tokens instead" in r.warnings[0]
    from sim.report import format_summary
    assert "\nwarning: --tokens-per-step 200" in format_summary(r)


def test_counts_traces_regroup_by_whole_steps(trace):
    counts = as_counts_trace(trace, trace.counts())
    counts = CountsTrace(dataclasses.replace(counts.meta, tokens_per_step=[100] * 10), counts.counts())
    merged = regroup(counts, 200)
    assert merged.num_steps == 5 and np.array_equal(merged.counts()[1], counts.counts()[2] + counts.counts()[3])
    with pytest.raises(UserError, match="regroups only into whole multiples of its steps"):
        regroup(counts, 150)
    same, note, warning = regroup_or_scale(counts, 150)
    assert same is counts and note is None and "whole multiples" in warning
    assert "keeps the sampling noise of the smaller step" in warning          # 100 tokens scaled up to 150
    _, _, down = regroup_or_scale(counts, 50)                                  # 100 tokens scaled down to 50
    assert "less sampling noise than a real step of 50 tokens" in down


def test_the_phase_is_read_from_the_trace(trace, tmp_path, capsys):
    assert decode_shaped(trace) is None                            # prefill: many tokens of a sequence per step
    # a decode trace: each step holds one new token of each of 8 sequences
    steps, seqs = 12, 8
    dec = synthesize("mixtral-mmlu", num_steps=steps, tokens_per_step=seqs, seed=1, num_layers=4)
    dec = dataclasses.replace(dec, seq=np.tile(np.arange(seqs, dtype=np.int32), steps),
                              pos=np.repeat(np.arange(steps, dtype=np.int32), seqs))
    assert decode_shaped(dec) == "one token per sequence per step"
    path = tmp_path / "dec.parquet"
    write_trace(path, dec)
    model = tmp_path / "m.yaml"
    from moe_gps.config import dump_yaml
    model.write_text(dump_yaml(MODEL))
    assert main(["simulate", str(path), "--model", str(model), "--strategies", "none", "--no-plots",
                 "-o", str(tmp_path / "o")]) == 0
    head = capsys.readouterr().out.splitlines()[:3]
    assert ", decode, " in head[0] and head[1].strip() == "phase decode, from the trace: one token per sequence per step"
    # --phase wins over what the trace says
    assert main(["simulate", str(path), "--model", str(model), "--strategies", "none", "--no-plots", "--phase",
                 "prefill", "-o", str(tmp_path / "o2")]) == 0
    assert ", prefill, " in capsys.readouterr().out.splitlines()[0]


def test_timeline_steps_are_those_of_the_regrouped_trace(tmp_path, capsys):
    """--timeline names steps of the trace as simulated: after --tokens-per-step regroups the bundled
    trace's 64 steps of 512 tokens into 16 of 2048 (simulated: 4..15), step 5 is drawn and step 40 is
    refused with the simulated range, and nothing is written."""
    import json
    from pathlib import Path

    bundled = str(Path(__file__).resolve().parents[1] / "traces" / "mixtral_mmlu.parquet")
    common = ["simulate", bundled, "--tokens-per-step", "2048", "--strategies", "none,eplb", "--no-plots"]
    assert main([*common, "--timeline", "5", "-o", str(tmp_path / "ok")]) == 0
    steps = {e["args"]["step"] for e in json.loads((tmp_path / "ok" / "timeline.json").read_text())["traceEvents"]
             if e["ph"] == "X"}
    assert steps == {5}
    capsys.readouterr()
    assert main([*common, "--timeline", "40", "-o", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "timeline step 40 is not among the simulated steps, 4..15 (regrouped" in err and err.count("\n") == 1
    assert not (tmp_path / "no").exists()
    assert main([*common, "--timeline", "15:20", "-o", str(tmp_path / "no")]) == 2    # runs past the last
    assert "timeline steps 15..19 are not all among the simulated steps, 4..15" in capsys.readouterr().err


def test_rechunk_says_why_a_counts_trace_cannot_regroup_and_keeps_every_regrouping(trace, tmp_path):
    counts = as_counts_trace(trace, trace.counts())
    counts = CountsTrace(dataclasses.replace(counts.meta, tokens_per_step=[100] * 10), counts.counts())
    with pytest.raises(UserError, match="the trace holds 1000 tokens, fewer than one step of 1100"):
        regroup(counts, 1100)
    c = counts.counts().copy()
    c[1::2] *= 2                                                        # steps of 100 and 200 tokens
    uneven = CountsTrace(dataclasses.replace(counts.meta, tokens_per_step=[100, 200] * 5), c)
    with pytest.raises(UserError, match="which must then all hold the same tokens; these hold"):
        regroup(uneven, 100)
    twice = regroup(regroup(trace, 100), 300)
    r = twice.meta.provenance["regrouped"]
    assert r["tokens_per_step"] == 300 and r["earlier"]["tokens_per_step"] == 100


def test_regrouping_that_would_leave_no_step_after_train_steps_scales_instead():
    t = synthesize("sst2", num_steps=40, tokens_per_step=128, seed=1, num_layers=4)     # 13 steps of 384
    regrouped, note, warning = regroup_or_scale(t, 384)
    assert regrouped.num_steps == 13 and warning is None
    same, note, warning = regroup_or_scale(t, 384, train_steps=13)
    assert same is t and note is None
    assert "regrouping makes 13 steps of 384, and train_steps=13 would leave none of them to simulate" in warning
    assert regroup_or_scale(t, 384, train_steps=12)[0].num_steps == 13
