"""Whole simulations on small synthetic traces, and the `moe-gps simulate` command."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moe_gps.cli.main import main
from moe_gps.config import (AttentionSpec, ModelConfig, SimulateConfig, StrategyConfig, WorkloadConfig,
                            load_cluster, strategy_from_name)
from moe_gps.config.loader import load_simulate_config
from moe_gps.errors import UserError
from moe_gps.trace import CountsTrace, write_trace
from moe_gps.trace.synth import synthesize
from sim.loads import as_counts_trace
from sim.run import PHASES, simulate
from sim.work import closed_form_layer_times

# Mixtral-sized layers, but only 4 of them, so that everything is quick.
MODEL = ModelConfig(name="mixtral-4l", num_layers=4, num_experts=8, top_k=2, hidden_size=4096,
                    moe_intermediate_size=14336, attention=AttentionSpec(num_heads=32, num_kv_heads=8, head_dim=128))


@pytest.fixture(scope="module")
def trace():
    return synthesize("sst2", num_steps=12, tokens_per_step=256, seed=3, num_layers=4)


def config(names, **kw) -> SimulateConfig:
    strategies = [strategy_from_name(n) if isinstance(n, str) else n for n in names]
    return SimulateConfig(cluster=load_cluster("4xA100-nvlink"), model=MODEL, strategies=strategies,
                          train_steps=4, **kw)


def synthetic(accuracy: float, name: str | None = None, direct_routing: bool | None = None, **kw) -> StrategyConfig:
    return StrategyConfig(kind="token", predictor="synthetic", name=name, direct_routing=direct_routing,
                          predictor_options={"accuracy": accuracy, **kw})


def test_strategies_on_one_trace(trace):
    r = simulate(trace, config(["none", "eplb", "dist:ema", "dist:profile", "token:prev-layer", "oracle"]),
                 progress=False)
    assert list(r.steps) == list(range(4, 12)) and r.tokens.tolist() == [256.0] * 8
    none, eplb, oracle = r.get("none"), r.get("eplb"), r.get("oracle")
    assert none.copy_bytes.sum() == 0 and none.extra_memory == 0 and none.redundant_slots == 0
    assert eplb.extra_memory == 1 * 4 * MODEL.expert_bytes          # one redundant slot per GPU, 4 layers
    # the oracle plans by time from the true loads: never slower than no duplication, here faster
    # than every strategy (256 tokens per step: a replica's weight read costs more than balance saves,
    # so it leaves GPUs as skewed as they are and routes directly)
    assert oracle.step_latency.mean() < none.step_latency.mean()
    assert oracle.step_latency.mean() <= min(x.step_latency.mean() for x in r.strategies) + 1e-12
    # static EPLB at vLLM's cadence scaled to the 4 profiling steps: window 4, a re-plan every 12 steps,
    # none within the 8 simulated ones; the plan loaded before serving costs no copies
    assert eplb.config.window == 4 and eplb.config.replan_interval == 12
    assert eplb.replans == 0 and eplb.copy_bytes.sum() == 0
    # the profile predictor predicts the same shares every step: one plan, never any copy
    assert r.get("dist:profile").copy_bytes.sum() == 0 and r.get("dist:profile").replans == 0
    for s in r.strategies:
        parts = sum(s.phases[p] for p in PHASES)
        assert np.allclose(parts, s.layer_time, rtol=1e-9, atol=1e-15), s.name
        assert (s.phases["copy"] >= -1e-12).all()
        assert s.step_latency.shape == (8,)
    assert r.get("token:prev-layer").info.accuracy is not None
    assert np.isnan(r.expert_skew).sum() == 0 and (r.expert_skew >= 1).all()


def test_event_model_equals_closed_form_without_overlap_or_contention(trace, event_steps, queued_layers):
    """Copies on the critical path (policy critical), none sharing a link: the event model and
    the closed form must agree within 1% (they agree to rounding)."""
    names = [dataclasses.replace(strategy_from_name(n), min_gain=0.0, replan_interval=2)
             for n in ("dist:ema", "eplb")]
    simulate(trace, config(["none", *names], copy_policy="critical"), progress=False)
    exact = 0
    for policy, work, marks in event_steps:
        closed = closed_form_layer_times(work, policy)
        took = marks[:, -1] - marks[:, 0]
        # the closed form is exact unless a port serves two transfers of a layer (then they queue)
        queued = queued_layers(work.copies, len(took))
        assert np.allclose(took[~queued], closed[~queued], rtol=0.01)
        assert np.allclose(took[~queued], closed[~queued], rtol=1e-9)
        assert (took[queued] >= closed[queued] - 1e-12).all()
        exact += int((~queued & (work.copy_bytes > 0)).sum())
    assert exact >= 2


def test_deterministic_for_a_seed(trace):
    # direct routing: which tokens the seed makes mispredicted decides the correction all-to-all
    names = ["none", "dist:kalman", synthetic(0.8, placement="typical", direct_routing=True), "oracle"]
    a = simulate(trace, config(names, seed=5), progress=False)
    b = simulate(trace, config(names, seed=5), progress=False)
    for x, y in zip(a.strategies, b.strategies):
        assert np.array_equal(x.layer_time, y.layer_time) and np.array_equal(x.gpu_skew, y.gpu_skew)
    c = simulate(trace, config(names, seed=6), progress=False)
    assert not np.array_equal(a.strategies[2].layer_time, c.strategies[2].layer_time)   # synthetic reads the seed
    assert np.array_equal(a.strategies[0].layer_time, c.strategies[0].layer_time)


def test_token_accuracy_is_measured_and_charged(trace):
    perfect = synthetic(1.0, name="perfect", direct_routing=True)
    costly = synthetic(1.0, name="costly", overhead=1e9)          # 1e9 FLOPs per token per layer
    names = [perfect, costly, synthetic(0.7, name="a70", direct_routing=True), "oracle"]
    r = simulate(trace, config(names), progress=False)
    p, c, a70, oracle = (r.get(n) for n in ("perfect", "costly", "a70", "oracle"))
    assert p.info.accuracy == 1.0 and a70.info.accuracy == pytest.approx(0.7, abs=0.01)
    # every token predicted and routed directly: no correction, the same placement as the oracle
    assert p.phases["correction"].max() == 0 and np.allclose(p.gpu_skew, oracle.gpu_skew)
    # 64 tokens per GPU x 1e9 FLOPs at 312 TFLOP/s = 205 us, + 5 us launch: beside the attention (the
    # default), only what sticks out of it counts, and the two share the GPU's compute: together at
    # least the attention's compute and fixed time plus the predictor's FLOPs; before the attention
    # (predictor_overlap: false), all of it
    from sim.cost import Hardware, attention_compute_time

    cfg = config([costly])
    hw = Hardware.from_config(cfg.cluster, cfg.model)
    alone = 64 * 1e9 / 312e12 + 5e-6
    shared = float(attention_compute_time(64.0, cfg.model, cfg.workload, hw)) + hw.attn_overhead + 64 * 1e9 / 312e12
    assert shared > alone                  # here the shared compute is what bounds them
    assert c.phases["predictor"] == pytest.approx(max(alone, shared) - c.phases["attention"])
    serial = simulate(trace, config([costly], predictor_overlap=False), progress=False).strategies[0]
    assert serial.phases["predictor"] == pytest.approx(alone)
    assert c.step_latency.mean() > p.step_latency.mean()
    # mispredicted tokens pay a correction all-to-all
    assert a70.phases["correction"].min() > 0


def test_counts_trace_runs_all_but_token_strategies(trace):
    counts = as_counts_trace(trace, trace.counts())
    assert isinstance(counts, CountsTrace) and np.array_equal(counts.counts(), trace.counts())
    r_tok = simulate(trace, config(["none", "dist:ema"]), progress=False)
    r_cnt = simulate(counts, config(["none", "dist:ema"]), progress=False)
    for a, b in zip(r_tok.strategies, r_cnt.strategies):
        assert np.allclose(a.phases["ffn"], b.phases["ffn"]) and np.allclose(a.gpu_skew, b.gpu_skew)
    with pytest.raises(UserError, match="token-to-expert prediction needs a tokens trace"):
        simulate(counts, config(["token:prev-layer"]), progress=False)


def test_counts_trace_kept_in_a_file_simulates_the_same_without_reading_it_whole(trace, tmp_path, monkeypatch):
    """A long counts trace stays in its temporary file (moe_gps.trace.reader): simulating it reads step
    ranges only, with the results of the same trace in memory, for every kind that runs on counts."""
    from moe_gps.trace import load_trace
    from moe_gps.trace.data import StepStore

    write_trace(tmp_path / "c.parquet", as_counts_trace(trace, trace.counts()))
    names = ["none", "eplb", "dist:profile", "dist:window", "dist:ema", "dist:kalman", "oracle"]
    ref = simulate(load_trace(tmp_path / "c.parquet"), config(names), progress=False)
    spilled = load_trace(tmp_path / "c.parquet", spill_bytes=1)
    assert isinstance(spilled.count_array, StepStore)

    def whole(*_args, **_kw):
        raise AssertionError("read the whole counts array")

    monkeypatch.setattr(StepStore, "__array__", whole)
    got = simulate(spilled, config(names), progress=False)
    for a, b in zip(ref.strategies, got.strategies):
        np.testing.assert_array_equal(a.layer_time, b.layer_time)
        np.testing.assert_array_equal(a.copy_bytes, b.copy_bytes)


def test_workload_scaling_and_bad_inputs(trace):
    r = simulate(trace, config(["none"], workload=WorkloadConfig(tokens_per_step=1024)), progress=False)
    assert r.tokens.tolist() == [1024.0] * 8
    small = simulate(trace, config(["none"]), progress=False)
    assert r.get("none").phases["ffn"].mean() > small.get("none").phases["ffn"].mean()
    with pytest.raises(UserError, match=r"model mixtral-4l: num_layers=4 but trace t has num_layers=32"):
        simulate(synthesize(num_steps=3, tokens_per_step=32), config(["none"]), trace_name="t", progress=False)
    with pytest.raises(UserError, match=r"train_steps=12 leaves no step to simulate in a trace of 12 steps"):
        simulate(trace, dataclasses.replace(config(["none"]), train_steps=12), progress=False)


def test_cli_writes_table_and_folder(trace, tmp_path, capsys):
    path = tmp_path / "small.parquet"
    write_trace(path, trace)
    model = tmp_path / "model.yaml"
    from moe_gps.config import dump_yaml
    model.write_text(dump_yaml(MODEL))
    out = tmp_path / "out"
    rc = main(["simulate", str(path), "--model", str(model), "--strategies", "none,eplb", "dist:ema", "oracle",
               "--train-steps", "4", "--seed", "3", "-o", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for word in ("none", "eplb", "dist:ema", "oracle", "speed-up", "MoE layer, us", "copied GB", "re-plans",
                 "copies async"):
        assert word in text
    verdict = [line for line in text.splitlines() if line.startswith("verdict: ")]
    assert len(verdict) == 1 and "nan" not in text
    assert "95% CI" in verdict[0] or "takes the same time on every one of the 8 simulated steps" in verdict[0]
    names = {p.name for p in out.iterdir()}
    assert {"summary.csv", "steps.csv", "layers.parquet", "config.yaml", "summary.txt", "breakdown.png",
            "skew_per_layer.png", "latency_cdf.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    summary = pd.read_csv(out / "summary.csv")
    assert summary["strategy"].tolist() == ["none", "eplb", "dist:ema", "oracle"]
    assert summary.loc[0, "speedup_vs_none"] == 1.0
    assert len(pd.read_csv(out / "steps.csv")) == 4 * 8
    assert len(pd.read_parquet(out / "layers.parquet")) == 4 * 8 * 4
    assert "seed: 3" in (out / "config.yaml").read_text()
    # the code and the trace file the numbers came from
    assert f"sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}" in (out / "config.yaml").read_text().splitlines()[1]
    # rerunning the written config gives the same numbers
    out2 = tmp_path / "out2"
    assert main(["simulate", str(path), "--config", str(out / "config.yaml"), "--no-plots", "--json",
                 "-o", str(out2)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["strategy"] for s in doc["strategies"]] == ["none", "eplb", "dist:ema", "oracle"]
    v = doc["verdict"]
    assert v["strategy"] in ("none", "eplb", "dist:ema") and v["ci_low"] <= v["speedup"] <= v["ci_high"]
    assert isinstance(v["ties"], list) and v["thin"] is False and v["steps"] == 8
    # the policy flags reach every duplicating strategy and the written config
    out3 = tmp_path / "out3"
    assert main(["simulate", str(path), "--model", str(model), "--strategies", "none", "dist:ema", "--train-steps",
                 "4", "--copy-policy", "critical", "--replan-interval", "3", "--window", "2", "--min-gain", "0",
                 "--no-plots", "-o", str(out3)]) == 0
    capsys.readouterr()
    cfg = load_simulate_config(out3 / "config.yaml")
    assert cfg.copy_policy == "critical"
    assert (cfg.strategies[1].replan_interval, cfg.strategies[1].window, cfg.strategies[1].min_gain) == (3, 2, 0.0)
    again = pd.read_csv(out2 / "summary.csv")
    pd.testing.assert_frame_equal(summary, again)


def test_cli_errors(trace, tmp_path, capsys):
    path = tmp_path / "small.parquet"
    write_trace(path, trace)
    assert main(["simulate", str(path), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot tell the model from the trace metadata" in err and err.count("\n") == 1
    assert main(["simulate", str(path), "--model", "mixtral-8x7b", "-o", str(tmp_path / "o")]) == 2
    assert "num_layers=32 but trace" in capsys.readouterr().err
    from moe_gps.config import dump_yaml
    model = tmp_path / "model.yaml"
    model.write_text(dump_yaml(MODEL))
    assert main(["simulate", str(path), "--model", str(model), "--strategies", "dist", "-o", str(tmp_path / "o")]) == 2
    assert "strategy 'dist': not a strategy name" in capsys.readouterr().err
    assert main(["simulate", str(path), "--model", str(model), "--strategies", "dist:nope",
                 "-o", str(tmp_path / "o")]) == 2
    assert "unknown distribution predictor 'nope'" in capsys.readouterr().err
    for flag, value, message in (("--min-gain", "-1", "--min-gain must be a finite number >= 0, got -1.0"),
                                 ("--replan-interval", "0", "--replan-interval must be a finite number >= 1, got 0"),
                                 ("--min-gain", "nan", "--min-gain must be a finite number >= 0, got nan")):
        for only in ([], ["--strategies", "none"]):   # checked even where no strategy takes it
            assert main(["simulate", str(path), "--model", str(model), flag, value, *only,
                         "-o", str(tmp_path / "o")]) == 2
            err = capsys.readouterr().err
            assert err == f"moe-gps: error: {message}\n", err
    assert not (tmp_path / "o").exists()


def test_real_traces(real_traces):
    """Third-party traces (skipped without ../shared/traces/real): the simulator runs on a real
    Mixtral popularity counts trace and a real Qwen3 vLLM prefill trace, and the oracle bound
    is below no duplication on both."""
    from moe_gps.config import load_model
    from moe_gps.trace.importers import import_popularity_json, import_vllm_jsonl

    files = sorted((real_traces / "mixtral-8x7b-mmlu-popularity" / "mixtral_8x7b_original").glob("*.json"))
    counts = import_popularity_json(files, top_k=2, model="mixtral-8x7b", dataset="mmlu").trace
    cfg = SimulateConfig(cluster=load_cluster("4xA100-nvlink"), model=load_model("mixtral-8x7b"), train_steps=2,
                         strategies=[strategy_from_name(n) for n in ("none", "eplb", "dist:profile", "oracle")],
                         workload=WorkloadConfig(tokens_per_step=16384))
    r = simulate(counts, cfg, progress=False)
    assert r.get("oracle").step_latency.mean() < r.get("none").step_latency.mean()
    assert 1.1 < np.nanmean(r.expert_skew) < 1.6        # fiddler's Mixtral/MMLU popularity: mild skew

    q = real_traces / "qwen3-30b-a3b-vllm-sharegpt"
    tokens = import_vllm_jsonl([q / "token_distri_8.jsonl", q / "token_distri_16.jsonl"], model="qwen3-30b-a3b",
                               min_tokens=1000, num_layers=48, num_experts=128).trace
    cfg = SimulateConfig(cluster=load_cluster("8xH100-nvlink"), model=load_model("qwen3-30b-a3b"), train_steps=1,
                         strategies=[strategy_from_name(n) for n in ("none", "token:prev-layer", "oracle")])
    r = simulate(tokens, cfg, progress=False)
    assert r.tokens.tolist() == [2080.0]
    assert r.get("oracle").gpu_skew.mean() < r.get("none").gpu_skew.mean()
    assert 0 < r.get("token:prev-layer").info.accuracy < 1


def test_extra_memory_when_redundant_slots_do_not_divide_over_gpus(trace):
    """8 experts + 4 redundant = 12 slots over 6 GPUs: 4/6 of an expert per GPU on average."""
    from dataclasses import replace
    cluster = load_cluster("8xH100-nvlink")
    cluster = replace(cluster, num_gpus=6)
    strategy = replace(strategy_from_name("dist:profile"), redundant_slots=4)
    cfg = SimulateConfig(cluster=cluster, model=MODEL, strategies=[strategy], train_steps=4)
    r = simulate(trace, cfg, progress=False)
    assert r.strategies[0].extra_memory == pytest.approx(4 / 6 * 4 * MODEL.expert_bytes)


def test_collective_skew_is_the_sync_phase(trace):
    """Every dispatch and combine (no correction here) ends later by the skew; the other phases stay."""
    base = config(["none", "dist:ema"])
    skewed = dataclasses.replace(base, cluster=dataclasses.replace(base.cluster, collective_skew_us=100.0))
    a, b = simulate(trace, base, progress=False), simulate(trace, skewed, progress=False)
    for x, y in zip(a.strategies, b.strategies):
        assert np.allclose(y.layer_time - x.layer_time, 200e-6)
        assert np.allclose(y.phases["sync"], 200e-6) and np.allclose(x.phases["sync"], 0.0)
        for p in PHASES:
            if p != "sync":
                assert np.allclose(x.phases[p], y.phases[p], atol=1e-12), p


def test_timeline_export_matches_the_recorded_phases(trace, tmp_path):
    """The Chrome/Perfetto trace of two steps: valid Trace Event Format, every step spans its latency,
    and each layer's slices last what the breakdown says (FFN, dispatch, predictor + attention)."""
    import json

    from sim.timeline import COPY_TRACK, write_timeline

    names = ["none", dataclasses.replace(strategy_from_name("eplb"), replan_interval=1, window=1)]
    r = simulate(trace, config(names, copy_policy="critical"), progress=False, timeline_steps=range(5, 7))
    path = write_timeline(tmp_path / "timeline.json", r.timeline, 4)
    doc = json.loads(path.read_text())
    events = doc["traceEvents"]
    assert doc["displayTimeUnit"] == "ms" and events
    for e in events:
        assert e["ph"] in ("X", "M") and isinstance(e["pid"], int) and isinstance(e["name"], str)
        if e["ph"] == "X":
            assert isinstance(e["tid"], int) and e["ts"] >= 0 and e["dur"] >= 0 and {"step", "layer"} <= set(e["args"])
    names_by_pid = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    for pid, name in names_by_pid.items():
        res = r.get(name)
        xs = [e for e in events if e["ph"] == "X" and e["pid"] == pid]
        for step in (5, 6):
            i = int(np.flatnonzero(r.steps == step)[0])
            mine = [e for e in xs if e["args"]["step"] == step]
            span = (max(e["ts"] + e["dur"] for e in mine) - min(e["ts"] for e in mine)) * 1e-6
            assert span == pytest.approx(res.step_latency[i], rel=1e-9), (name, step)
            for l in range(MODEL.num_layers):
                layer = [e for e in mine if e["args"]["layer"] == l and e["tid"] < COPY_TRACK]
                longest = lambda n: max(e["dur"] for e in layer if e["name"] == n) * 1e-6  # noqa: E731
                assert longest("expert FFN") == pytest.approx(res.phases["ffn"][i, l], rel=1e-9)
                assert longest("dispatch") == pytest.approx(res.phases["dispatch"][i, l], rel=1e-9)
                assert longest("predictor + attention") == pytest.approx(
                    res.phases["predictor"][i, l] + res.phases["attention"][i, l], rel=1e-9)
    # the re-planning eplb copies weights every step: its copies are on the copy tracks
    eplb_pid = next(p for p, n in names_by_pid.items() if n.startswith("eplb"))
    copies = [e for e in events if e["ph"] == "X" and e["pid"] == eplb_pid and e["tid"] >= COPY_TRACK]
    assert copies and all(e["cat"] == "copy" for e in copies)


@pytest.mark.parametrize("policy", ["critical", "overlap", "async", "hidden"])
def test_the_closed_form_of_quiet_steps_equals_the_event_model(trace, monkeypatch, policy):
    """Steps without copies in flight take the closed form: the same numbers as running every step
    as events, for every strategy and copy policy (to rounding)."""
    import sim.engine as engine
    names = ["none", "eplb", "dist:ema", "token:prev-layer", "oracle",
             dataclasses.replace(strategy_from_name("dist:previous"), replan_interval=2, window=1, min_gain=0.0)]
    cfg = config(names, copy_policy=policy)
    fast = simulate(trace, cfg, progress=False)
    monkeypatch.setattr(engine.EventModel, "closed_form", False)
    slow = simulate(trace, cfg, progress=False)
    for a, b in zip(fast.strategies, slow.strategies):
        assert np.allclose(a.layer_time, b.layer_time, rtol=1e-9, atol=1e-15), (policy, a.name)
        for p in PHASES:
            assert np.allclose(a.phases[p], b.phases[p], rtol=1e-9, atol=1e-12), (policy, a.name, p)


SERVED_IN: list[int] = []           # the processes _recording_serve ran in (a forked worker's stay there)
REAL_SERVE: list = []


def _recording_serve(index, shared):
    import os

    SERVED_IN.append(os.getpid())
    return REAL_SERVE[0](index, shared)


def test_jobs_split_the_strategies_over_processes_with_the_same_results(trace, monkeypatch):
    import os

    import moe_gps.workers as workers
    import sim.run as run

    names = ["none", "eplb", "dist:ema", "token:prev-layer", synthetic(0.8, placement="typical"), "oracle"]
    cfg = config(names, seed=2)
    REAL_SERVE[:] = [run._serve]
    monkeypatch.setattr(run, "_serve", _recording_serve)
    SERVED_IN.clear()
    a = simulate(trace, cfg, progress=False, timeline_steps=range(5, 7))
    assert SERVED_IN == [os.getpid()]                   # one job: served here
    b = simulate(trace, cfg, progress=False, timeline_steps=range(5, 7), jobs=3)
    assert SERVED_IN == [os.getpid()]                   # three jobs: served in forked workers only
    assert [r.name for r in b.strategies] == [r.name for r in a.strategies]
    for x, y in zip(a.strategies, b.strategies):
        assert np.array_equal(x.layer_time, y.layer_time) and np.array_equal(x.copy_bytes, y.copy_bytes)
        assert all(np.array_equal(x.phases[p], y.phases[p]) for p in PHASES)
        assert (x.replans, x.info.accuracy, x.redundant_slots) == (y.replans, y.info.accuracy, y.redundant_slots)
    assert np.array_equal(a.expert_skew, b.expert_skew) and np.array_equal(a.tokens, b.tokens)
    assert a.timeline == b.timeline and list(a.timeline) == list(b.timeline)
    assert a.verdict.to_dict() == b.verdict.to_dict()
    with workers._FORKING:                              # as in a worker of another parallel call: one process
        c = simulate(trace, cfg, progress=False, timeline_steps=range(5, 7), jobs=3)
    assert SERVED_IN == [os.getpid(), os.getpid()]
    assert all(np.array_equal(x.layer_time, y.layer_time) for x, y in zip(a.strategies, c.strategies))


def test_strategy_groups_balance_the_work():
    from sim.run import _groups

    assert _groups(["none", "static", "distribution", "distribution", "oracle"], 2) == [[4], [0, 1, 2, 3]]
    assert _groups(["none", "static"], 8) == [[0], [1]]
    assert _groups(["oracle", "token", "none"], 1) == [[0, 1, 2]]
    groups = _groups(["token"] * 5 + ["none"] * 3, 3)
    assert sorted(k for g in groups for k in g) == list(range(8)) and len(groups) == 3


def test_an_error_in_a_worker_is_the_same_one_line_error(trace):
    from sim.strategies import make_strategy

    def factory(cfg, ctx, seed):
        st = make_strategy(cfg, ctx, seed, cfg.resolved_policy(4))
        if cfg.kind == "distribution":
            def prepare(*a):
                raise UserError("dist:ema: cannot fit (a test)")
            st.prepare = prepare
        return st

    with pytest.raises(UserError, match="cannot fit"):
        simulate(trace, config(["none", "eplb", "dist:ema"]), progress=False, strategy_factory=factory, jobs=2)


def test_plots_drawn_in_workers_are_the_same_files(trace, tmp_path):
    from sim.plots import plot_data, write_plots

    r = plot_data(simulate(trace, config(["none", "eplb", "oracle"]), progress=False, timeline_steps=range(5, 6)))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    serial, forked = write_plots(r, a, jobs=1), write_plots(r, b, jobs=4)
    assert [p.name for p in serial] == [p.name for p in forked] == ["breakdown.png", "skew_per_layer.png",
                                                                   "latency_cdf.png", "timeline.png"]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(serial, forked))


def test_the_oracle_forgets_far_ahead_assignments_of_a_counts_trace_with_the_same_results(trace, monkeypatch):
    from sim.loads import StepLoads

    # a hot expert that changes half-way, and background copies at a trickle of the link: the oracle
    # walks far past its lookahead to find where they would land
    c = np.full((60, 4, 8), 40, dtype=np.int64)
    c[:30, :, 0] += 192
    c[30:, :, 5] += 192
    counts = CountsTrace(as_counts_trace(trace, trace.counts()).meta, c)
    cfg = config(["none", "oracle"], copy_policy="async", copy_bandwidth_share=0.001,
                 workload=WorkloadConfig(tokens_per_step=65536))
    real = StepLoads.release
    monkeypatch.setattr(StepLoads, "release", lambda self: None)
    kept = simulate(counts, cfg, progress=False)                   # every step's assignments kept
    released = []

    def release(self):
        released.append(self.by_home is not None)
        real(self)

    monkeypatch.setattr(StepLoads, "release", release)
    again = simulate(counts, cfg, progress=False)
    assert sum(released) > 10
    for a, b in zip(kept.strategies, again.strategies):
        assert np.array_equal(a.layer_time, b.layer_time) and a.replans == b.replans
    loads = StepLoads(0, 10.0, 1.0, np.array([6.0, 4.0]), None, home_frac=np.array([0.6, 0.4]),
                      mix_counts=np.array([[3.0, 7.0]]))
    first = loads.src_counts.copy()
    loads.release()
    assert loads.by_home is None and np.array_equal(loads.src_counts, first)


@pytest.mark.parametrize("policy", ["hidden", "async"])
def test_token_strategies_resplit_steps_ahead_to_the_same_numbers(trace, monkeypatch, policy):
    """A token strategy re-splits the steps up to its next check in one planner call: the same placements,
    to the last bit, as one call per step, across re-plans (which drop the steps worked out ahead)."""
    import sim.strategies as strategies
    names = ["token:prev-layer", "token:most-frequent",
             dataclasses.replace(strategy_from_name("token:position"), replan_interval=3, window=2, min_gain=0.0)]
    cfg = config(names, copy_policy=policy)
    calls = []
    real = strategies.TokenPlan._resplit_ahead

    def spy(self, i, src):
        out = real(self, i, src)
        calls.append(len(out))
        return out

    monkeypatch.setattr(strategies.TokenPlan, "_resplit_ahead", spy)
    ahead = simulate(trace, cfg, progress=False)
    assert max(calls) > 1 and sum(calls) >= 3 * len(ahead.steps)
    monkeypatch.setattr(strategies, "RESPLIT_STEPS", 1)          # one step at a time
    one = simulate(trace, cfg, progress=False)
    assert ahead.get("token:position").replans >= 1
    for a, b in zip(ahead.strategies, one.strategies):
        assert np.array_equal(a.layer_time, b.layer_time) and a.replans == b.replans, a.name
        for p in PHASES:
            assert np.array_equal(a.phases[p], b.phases[p]), (a.name, p)
        assert np.array_equal(a.gpu_skew, b.gpu_skew, equal_nan=True), a.name


def test_token_strategies_resplit_steps_ahead_to_the_same_bits_on_the_bundled_trace(monkeypatch):
    """On the bundled trace (32 layers, 48 steps), where rounding would show: every float the same."""
    import sim.strategies as strategies
    from moe_gps.config import load_model
    from moe_gps.trace import load_trace
    bundled = load_trace(Path(__file__).resolve().parents[1] / "traces" / "mixtral_mmlu.parquet")
    cfg = SimulateConfig(cluster=load_cluster("4xA100-nvlink"), model=load_model("mixtral-8x7b"),
                         strategies=[strategy_from_name("token:position")])
    ahead = simulate(bundled, cfg, progress=False)
    monkeypatch.setattr(strategies, "RESPLIT_STEPS", 1)
    one = simulate(bundled, cfg, progress=False)
    a, b = ahead.strategies[0], one.strategies[0]
    assert np.array_equal(a.layer_time, b.layer_time) and np.array_equal(a.gpu_skew, b.gpu_skew)


def test_a_cluster_whose_traffic_cannot_fit_in_memory_is_refused_before_any_work(monkeypatch):
    """Thousands of GPUs: the step's GPU-to-GPU traffic arrays grow as L x G^2; refused up front with the
    memory they need, not left to the out-of-memory killer."""
    import moe_gps.trace.synth as synth
    from sim.run import TRAFFIC_ARRAYS, check_traffic_memory

    monkeypatch.setattr(synth, "available_memory", lambda: 2**30)
    check_traffic_memory(64, 58, 2, "c")                                   # DeepSeek-V3 on 64 GPUs: 7 MB
    need = TRAFFIC_ARRAYS * 8 * 32 * 4096 ** 2 * 2 / 2**30
    with pytest.raises(UserError, match=rf"cluster c: 4096 GPUs need about {need:.1f} GiB .* 1.0 GiB available"):
        check_traffic_memory(4096, 32, 2, "c")
    monkeypatch.setattr(synth, "available_memory", lambda: None)          # unknown: no check
    check_traffic_memory(4096, 32, 2, "c")
