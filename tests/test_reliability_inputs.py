"""Bad values that used to pass: counts that wrap int64, infinite gate weights, physical quantities that
make times overflow, 1-layer traces in the statistics, damaged recommend cache records, a malformed
config.json for `moe-gps record`, a truncated trace named in a run config."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re

import numpy as np
import pytest
import yaml

from moe_gps.cli.main import main
from moe_gps.config import WorkloadConfig, load_cluster
from moe_gps.config.loader import dump_yaml
from moe_gps.errors import UserError
from moe_gps.recommend.core import recommend
from moe_gps.recommend.sweep import parse_sweep
from moe_gps.trace import TraceMeta, write_trace
from moe_gps.trace.data import CountsTrace, TokensTrace
from moe_gps.trace.importers import import_popularity_json, import_vllm_jsonl
from moe_gps.trace.synth import synthesize

from conftest import one_line
from test_recommend import MODEL, TINY


def test_counts_whose_sum_passes_2_63_are_rejected_not_wrapped(tmp_path, capsys):
    counts = np.full((2, 1, 4), 2**62, dtype=np.int64)               # each layer sums to 2^64: wraps to 0
    write_trace(tmp_path / "c.parquet", CountsTrace(TraceMeta("counts", 1, 4, 1), counts))
    err = one_line(capsys, main(["trace", "validate", str(tmp_path / "c.parquet")]))
    assert "column 'count', row 0: step 0, layer 0 sums to 1.845e+19 assignments, more than the 2^40" in err
    # importers share the limit
    (tmp_path / "pop.json").write_text(json.dumps({"expert_popularity": [[1e30, 2, 3, 4]]}))
    with pytest.raises(UserError, match=r"1e\+30 is not a count \(a non-negative integer below 2\^40\)"):
        import_popularity_json([tmp_path / "pop.json"], top_k=1)
    (tmp_path / "pop2.json").write_text(json.dumps({"expert_popularity": [[2**62] * 4]}))
    with pytest.raises(UserError, match="is not a count"):
        import_popularity_json([tmp_path / "pop2.json"], top_k=1)


def test_counts_just_under_the_limit_sum_exactly():
    from moe_gps.trace.validate import counts_array

    S, E = 5, 4
    cols = {"step": np.repeat(np.arange(S), E), "layer": np.zeros(S * E, np.int64),
            "expert": np.tile(np.arange(E), S), "count": np.full(S * E, 2**38 - 1, np.int64)}
    counts = counts_array(cols, TraceMeta("counts", 1, E, 1), "c.parquet")
    assert counts.sum() == S * E * (2**38 - 1)      # just under 2^40 per step: accepted, sums exact
    cols["count"] = cols["count"] + 1                # 2^40 per step and layer
    with pytest.raises(UserError, match=r"step 0, layer 0 sums to 1.1e\+12 assignments, more than the 2\^40"):
        counts_array(cols, TraceMeta("counts", 1, E, 1), "c.parquet")


def test_infinite_gate_weight_is_rejected_like_nan(tmp_path, capsys):
    meta = TraceMeta("tokens", 1, 4, 1)
    for value, word in ((np.inf, "infinite"), (np.nan, "NaN"), (-1.0, "negative")):
        w = np.full((10, 1, 1), 0.5, np.float32)
        w[7] = value
        write_trace(tmp_path / "w.parquet", TokensTrace(meta, np.zeros((10, 1, 1), np.int16), np.array([0, 10]), w))
        err = one_line(capsys, main(["trace", "validate", str(tmp_path / "w.parquet")]))
        assert f"column 'weight_0', row 7: gate weight is {word}" in err
    lines = [json.dumps({"topk_ids": [[0, 1], [2, 3]], "topk_weights": [[0.6, 0.4], [0.5, 0.5]]})] * 2
    lines[1] = '{"topk_ids": [[0, 1], [2, 3]], "topk_weights": [[Infinity, 0.4], [0.5, 0.5]]}'
    (tmp_path / "v.jsonl").write_text("\n".join(lines))
    with pytest.raises(UserError, match="v.jsonl:2: 'topk_weights' row 0 holds a NaN, infinite or negative weight"):
        import_vllm_jsonl([tmp_path / "v.jsonl"], num_layers=1)


def test_trace_inspect_works_on_a_one_layer_trace(tmp_path, capsys):
    write_trace(tmp_path / "one.parquet", synthesize("mixtral-mmlu", num_steps=4, tokens_per_step=64, seed=0,
                                                     num_layers=1))
    assert main(["trace", "inspect", str(tmp_path / "one.parquet"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["layers"]) == 1 and data["layers"][0]["affinity_next"] is None  # no next layer: null
    assert data["layers"][0]["skewness"] > 1
    assert main(["trace", "inspect", str(tmp_path / "one.parquet")]) == 0


@pytest.mark.parametrize("key, value", [("intra_node.bandwidth_gb_s", 1.0e-300), ("gpu.hbm_bandwidth_gb_s", 1e-300),
                                        ("gpu.peak_tflops_bf16", 1e-30), ("gpu.compute_efficiency", 1e-300),
                                        ("intra_node.latency_us", 1e300)])
def test_physical_quantities_that_make_times_overflow_are_config_errors(tmp_path, capsys, key, value):
    doc = yaml.safe_load(dump_yaml(load_cluster("4xA100-nvlink")))
    section, field = key.split(".")
    doc[section][field] = value
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError, match=re.escape(f"c.yaml: {key}: {value!r}") + ".* is not a sane value"):
        load_cluster(str(tmp_path / "c.yaml"))
    trace = tmp_path / "t.parquet"
    write_trace(trace, synthesize("mixtral-mmlu", num_steps=4, tokens_per_step=64, seed=0))
    err = one_line(capsys, main(["simulate", str(trace), "--cluster", str(tmp_path / "c.yaml"), "-o",
                                 str(tmp_path / "sim")]))
    assert f"{key}: {value!r}" in err and not (tmp_path / "sim").exists()


def test_recommend_cache_record_that_is_damaged_is_simulated_again(tmp_path):
    trace = synthesize("mixtral-mmlu", num_steps=10, tokens_per_step=256, seed=1, num_layers=4)
    sweep = parse_sweep({**TINY, "predictor_accuracy": [1.0], "predictor_overhead_flops": [0],
                         "strategies": ["none", "eplb"], "map_strategies": ["none"], "map_token_predictor": None,
                         "redundant_slots_per_gpu": [1]}, "tiny")
    cluster = load_cluster("4xA100-nvlink")
    first = recommend(trace, cluster, MODEL, WorkloadConfig(), sweep, out_dir=tmp_path, jobs=1, progress=False)
    files = sorted(p for p in (tmp_path / "cache").glob("*.json") if not p.name.startswith("skew-"))
    no_status = json.loads(files[0].read_text())
    del no_status["status"]                                        # a record missing 'status' (check kept)
    files[0].write_text(json.dumps(no_status))
    edited = json.loads(files[1].read_text())
    edited["latency_mean_ms"] = 0.001                              # a hand-edited number
    files[1].write_text(json.dumps(edited))
    files[2].write_text('{"key": "truncated')                      # half a record
    skew = next((tmp_path / "cache").glob("skew-*.json"))
    skew.write_text("[1, 2]")                                      # not a record at all
    again = recommend(trace, cluster, MODEL, WorkloadConfig(), sweep, out_dir=tmp_path, jobs=1, progress=False)
    assert again.simulated == 3 and again.from_cache == len(first.records) - 3
    a = {r["key"]: r["latency_mean_ms"] for r in first.records}
    assert a == {r["key"]: r["latency_mean_ms"] for r in again.records}


needs_hf = pytest.mark.skipif(importlib.util.find_spec("torch") is None
                              or importlib.util.find_spec("transformers") is None,
                              reason="needs torch and transformers")


@needs_hf
@pytest.mark.parametrize("text, message", [
    ('{"model_type": "mixtral", ', "config.json: not valid JSON (Expecting property name"),
    ('["mixtral"]', "config.json: expected a JSON object, got list"),
    ('{"hidden_size": 8}', "config.json: has no 'model_type'"),
    ('{"model_type": "no-such-model"}', "config.json: transformers cannot read it"),
    ('{"model_type": "mixtral", "num_hidden_layers": "x"}', "config.json: transformers cannot read it"),
])
def test_record_with_a_malformed_config_json_is_one_line(tmp_path, capsys, text, message):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(text)
    err = one_line(capsys, main(["record", "--model", str(tmp_path / "ckpt"), "-o", str(tmp_path / "t.parquet")]))
    assert message in err and not (tmp_path / "t.parquet").exists()


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_run_precheck_reads_the_files_the_config_names(tmp_path, capsys):
    """A truncated trace (or plan) named in a run config is one line before torchrun starts any rank."""
    write_trace(tmp_path / "full.parquet", synthesize("mixtral-mmlu", num_steps=4, tokens_per_step=64, seed=0))
    data = (tmp_path / "full.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "plan.yaml").write_text("phy2log: [[0, 1]\n")
    for key, value, found in (("input", {"trace": "cut.parquet"}, "input.trace: "),
                              ("duplication", {"placement": "plan.yaml"}, "duplication.placement: ")):
        (tmp_path / "run.yaml").write_text(json.dumps({key: value}))
        err = one_line(capsys, main(["run", "--config", str(tmp_path / "run.yaml"), "--duplication", "static",
                                     "--out", str(tmp_path / "out")]))
        assert f"run.yaml: {found}" in err and not (tmp_path / "out").exists()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "run.yaml").write_text("{}")
    err = one_line(capsys, main(["run", "--config", str(tmp_path / "run.yaml"), "--duplication", "off",
                                 "--out", str(tmp_path / "afile")]))
    assert err.endswith("afile: exists and is a file, not a folder")


def test_cluster_presets_are_within_the_sane_range():
    from moe_gps.config.loader import preset_names

    for name in preset_names("clusters"):
        c = load_cluster(name)
        for spec in (c.gpu, c.intra_node, c.inter_node):
            for f in dataclasses.fields(spec) if spec is not None else ():
                v = getattr(spec, f.name)
                assert not isinstance(v, float) or v == 0 or 1e-6 <= v <= 1e12, (name, f.name, v)


@pytest.mark.skipif(__import__("sys").getfilesystemencoding().lower() != "utf-8",
                    reason="file names that are not valid UTF-8 need a UTF-8 file system encoding")
def test_a_parquet_file_name_that_is_not_utf8_is_one_line(tmp_path, capsys, monkeypatch):
    """pyarrow opens files by UTF-8 name: a trace (read or written) named with other bytes is one line, exit 2."""
    import os

    monkeypatch.chdir(tmp_path)
    name = os.fsdecode(b"bad\xffname.parquet")
    write_trace(tmp_path / "ok.parquet", synthesize("sst2", num_steps=2, tokens_per_step=16, seed=0, num_layers=2))
    (tmp_path / name).write_bytes((tmp_path / "ok.parquet").read_bytes())
    for args in (["trace", "inspect", name], ["trace", "synth", "--steps", "2", "--tokens", "4", "-o", "s" + name]):
        one_line(capsys, main(args), "the file name is not valid UTF-8", "name.parquet")
    # such bytes elsewhere on the command line (the output folder's lock records the command), as a
    # terminal shows them (pytest's capture cannot)
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "moe_gps.cli.main", "simulate", "ok.parquet", "--no-plots",
                           "-o", "out", "--cluster", os.fsdecode(b"c\xff.yaml")], capture_output=True)
    assert done.returncode == 2 and done.stderr.splitlines() == [b"moe-gps: error: --cluster: c\\udcff.yaml: no such file"]
    assert sorted(os.listdir(tmp_path)) == sorted(["ok.parquet", name])          # nothing half-written


def test_a_prompt_or_context_beyond_any_model_is_one_line(tmp_path, capsys):
    """seq_len is bounded (100M tokens): a prompt of 10^13 tokens once ran to hours a layer and a
    report of them; from the flag, a workload file and a sweep's workloads it is one line."""
    trace = tmp_path / "t.parquet"
    write_trace(trace, synthesize("sst2", num_steps=16, tokens_per_step=64, seed=0))
    (tmp_path / "w.yaml").write_text("phase: prefill\nseq_len: 1000000000000\n")
    base = ["simulate", str(trace), "--no-plots", "--strategies", "none", "-o", str(tmp_path / "o")]
    one_line(capsys, main(base + ["--seq-len", "10000000000000"]), "--seq-len must be in [1, 100000000]")
    one_line(capsys, main(base + ["--workload", str(tmp_path / "w.yaml")]), "w.yaml: seq_len", "<= 1e+08")
    with pytest.raises(UserError, match=r"workloads\[0\]\.seq_len"):
        parse_sweep({"workloads": [{"phase": "prefill", "tokens_per_step": 64, "seq_len": 10**13}]}, "s.yaml")
    assert not (tmp_path / "o").exists()


def test_a_config_whose_train_steps_leave_nothing_to_simulate_names_the_file(tmp_path, capsys):
    trace = tmp_path / "t.parquet"
    write_trace(trace, synthesize("sst2", num_steps=16, tokens_per_step=64, seed=0))
    assert main(["simulate", str(trace), "--no-plots", "--strategies", "none", "-o", str(tmp_path / "a")]) == 0
    cfg = tmp_path / "a" / "config.yaml"
    cfg.write_text(re.sub(r"(?m)^train_steps: .*$", "train_steps: 100", cfg.read_text()))
    capsys.readouterr()
    one_line(capsys, main(["simulate", str(trace), "--no-plots", "--config", str(cfg), "-o", str(tmp_path / "b")]),
             f"{cfg}: train_steps 100 leaves no step to simulate", "use at most 15")


def test_a_model_file_that_does_not_match_the_trace_is_named(tmp_path, capsys):
    from pathlib import Path

    import moe_gps.config as config

    trace = tmp_path / "t.parquet"
    write_trace(trace, synthesize("sst2", num_steps=16, tokens_per_step=64, seed=0))
    preset = Path(config.__file__).parent / "presets" / "models" / "mixtral-8x7b.yaml"
    (tmp_path / "m16.yaml").write_text(preset.read_text().replace("num_experts: 8", "num_experts: 16"))
    one_line(capsys, main(["simulate", str(trace), "--no-plots", "--model", str(tmp_path / "m16.yaml"),
                           "-o", str(tmp_path / "o")]), f"(--model {tmp_path / 'm16.yaml'}): num_experts=16")


def test_a_bad_predictor_option_names_its_strategy(tmp_path, capsys):
    trace = tmp_path / "t.parquet"
    write_trace(trace, synthesize("sst2", num_steps=16, tokens_per_step=64, seed=0))
    one_line(capsys, main(["simulate", str(trace), "--no-plots", "--strategies", "none,dist:ema(alpha=5)",
                           "-o", str(tmp_path / "o")]),
             "--strategies dist:ema(alpha=5): ema: alpha must be in (0, 1], got 5")
