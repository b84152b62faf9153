"""The sweep file's validation and the ``moe-gps recommend`` command: exit codes, one-line errors, --json."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from moe_gps.cli.main import main
from moe_gps.config import load_cluster
from moe_gps.config.loader import dump_yaml
from moe_gps.errors import UserError
from moe_gps.recommend.plan import cluster_at, make_plan, redundant_slots
from moe_gps.recommend.sweep import SweepConfig, default_sweep_text, load_sweep, parse_sweep
from moe_gps.trace import write_trace
from moe_gps.trace.synth import synthesize

from test_recommend import MODEL, TINY


def test_default_sweep_is_the_dataclass_default_and_large_enough():
    s = load_sweep()
    assert s == SweepConfig()
    assert "map_token_predictor" in default_sweep_text()
    # the decision maps alone hold > 200 runs for the default trace (issue 6's benchmark size)
    cells = (len(s.bandwidth_gb_s) + 1) * ((len(s.skew) + 1) + len(s.num_gpus) + (len(s.workloads) + 1))
    assert cells * (len(s.map_strategies) + 1) > 200


@pytest.mark.parametrize("patch, message", [
    ({"bandwith_gb_s": [1]}, "tiny.yaml: bandwith_gb_s: unknown key; did you mean 'bandwidth_gb_s'?"),
    ({"bandwidth_gb_s": [100, -3]},
     "tiny.yaml: bandwidth_gb_s[1]: must be a bandwidth between 1e-06 and 1e+12 GB/s, got -3.0"),
    ({"bandwidth_gb_s": []}, "tiny.yaml: bandwidth_gb_s: must list at least one value"),
    ({"bandwidth_gb_s": 100}, "tiny.yaml: bandwidth_gb_s: must be a list, got 100"),
    ({"skew": [0.5]}, "tiny.yaml: skew[0]: must be a number >= 1 (max / mean tokens per expert), got 0.5"),
    ({"num_gpus": [4, 2.5]}, "tiny.yaml: num_gpus[1]: must be an integer, got 2.5"),
    ({"predictor_accuracy": [1.2]}, "tiny.yaml: predictor_accuracy[0]: must be a number in [0, 1], got 1.2"),
    ({"redundant_slots_per_gpu": [0]}, "tiny.yaml: redundant_slots_per_gpu[0]: must be an integer >= 1"),
    ({"sim_steps": 0}, "tiny.yaml: sim_steps: must be an integer >= 1, got 0"),
    ({"seed": "x"}, "tiny.yaml: seed: must be an integer, got 'x'"),
    ({"predictor_placement": "bad"}, "tiny.yaml: predictor_placement: must be one of optimistic, typical, "
                                     "pessimistic, got 'bad'"),
    ({"strategies": ["none", "dist:nope"]}, "tiny.yaml: strategies[1] (dist:nope): unknown distribution "
                                            "predictor 'nope'"),
    ({"strategies": ["static:fancy"]}, "tiny.yaml: strategies[0] (static:fancy): unknown placement algorithm"),
    ({"map_strategies": ["eplb(x=1)"]}, "tiny.yaml: map_strategies[0]: strategy 'eplb(x=1)': eplb_config: unknown key 'x'"),
    ({"strategies": ["token:synthetic"]}, "tiny.yaml: strategies[0]: synthetic predictors are swept by"),
    ({"map_strategies": ["all"]}, "tiny.yaml: map_strategies[0]: 'all' is only allowed in strategies"),
    ({"workloads": [{"phase": "train"}]}, "tiny.yaml: workloads[0].phase: must be one of prefill, decode, got "
                                          "'train'"),
    ({"map_token_predictor": {"accuracy": 2}}, "tiny.yaml: map_token_predictor.accuracy: must be a number <= 1"),
])
def test_sweep_errors_are_one_line_and_name_the_key(patch, message):
    with pytest.raises(UserError) as err:
        parse_sweep({**TINY, **patch}, "tiny.yaml")
    text = str(err.value)
    assert "\n" not in text and text.startswith(message), text


def test_numbers_written_like_8_4e6_are_numbers():
    s = parse_sweep({"predictor_overhead_flops": ["8.4e6", 0], "map_token_predictor":
                     {"accuracy": 0.9, "overhead_flops": "1e7"}}, "f")
    assert s.predictor_overhead_flops == [8.4e6, 0.0] and s.map_token_predictor.overhead_flops == 1e7
    assert s.bandwidth_gb_s == SweepConfig().bandwidth_gb_s      # absent keys keep the defaults
    assert parse_sweep({"map_token_predictor": None}, "f").map_token_predictor is None


def test_cluster_variants_and_slot_budgets():
    nv = load_cluster("4xA100-nvlink")
    c = cluster_at(nv, 8, 50)
    assert (c.num_gpus, c.gpus_per_node, c.intra_node.bandwidth_gb_s) == (8, 8, 50.0)
    assert nv.intra_node.bandwidth_gb_s == 300 and nv.num_gpus == 4          # the user's is not changed
    ib = load_cluster("2x8xH100-ib")
    c = cluster_at(ib, 32, 25)
    assert (c.num_nodes, c.inter_node.bandwidth_gb_s, c.intra_node.bandwidth_gb_s) == (4, 25.0, 450)
    c = cluster_at(ib, 4, 100)                                                  # fewer than a node: one node
    assert (c.num_nodes, c.intra_node.bandwidth_gb_s) == (1, 100.0)
    for g in (1, 2, 3, 4, 6, 8, 16, 32):
        for r in (1, 2):
            R = redundant_slots(g, 8, r)
            assert (8 + R) % g == 0 and (8 + R) // g == -(-8 // g) + r


def test_gpu_counts_must_fill_nodes_of_a_multi_node_cluster():
    tr = synthesize("mixtral-mmlu", num_steps=6, tokens_per_step=64, seed=0, num_layers=4)
    sw = parse_sweep({**TINY, "num_gpus": [8, 12]}, "s.yaml")
    with pytest.raises(UserError, match=r"s.yaml: num_gpus\[1\]: 12 GPUs do not fill whole nodes of 8"):
        make_plan(sw, tr, load_cluster("2x8xH100-ib"), MODEL, __import__("moe_gps.config").config.WorkloadConfig(),
                  {}, where="s.yaml")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    tr = synthesize("mixtral-mmlu", num_steps=10, tokens_per_step=256, seed=1, num_layers=4)
    write_trace(d / "t.parquet", tr)
    (d / "model.yaml").write_text(dump_yaml(MODEL))
    tiny = {**TINY, "predictor_accuracy": [1.0], "predictor_overhead_flops": [0], "skew": [1.8],
            "strategies": ["none", "eplb", "dist:profile"], "redundant_slots_per_gpu": [1]}
    (d / "sweep.yaml").write_text(yaml.safe_dump(tiny))
    return d


def test_cli_json_and_exit_code_0(files, capsys):
    out = files / "report"
    code = main(["recommend", str(files / "t.parquet"), "--model", str(files / "model.yaml"), "--sweep",
                 str(files / "sweep.yaml"), "-o", str(out), "--json", "-j", "2"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    rec = data["recommendation"]
    assert rec["candidate"] in {"none", "eplb +1/GPU", "dist:profile +1/GPU"}
    assert data["runs"]["errors"] == 0 and data["runs"]["total"] == data["runs"]["simulated"]
    assert (out / "report.html").exists() and str(out / "report.html") in data["files"]
    assert "--sweep" in (out / "sweep.yaml").read_text().splitlines()[1]
    # the same command again: everything from the cache, same answer, terminal output this time
    code = main(["recommend", str(files / "t.parquet"), "--model", str(files / "model.yaml"), "--sweep",
                 str(files / "sweep.yaml"), "-o", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "RECOMMENDATION:" in text and f"{data['runs']['total']} read from the cache" in text
    assert rec["candidate"] in text.splitlines()[3]


def test_the_report_folder_holds_what_reruns_the_headline(files, capsys):
    """simulate_config.yaml is the headline comparison with the sweep's assumptions and every default
    explicit (as simulate's own config.yaml), and runs.csv has every phase of the layer time."""
    from moe_gps.config.loader import load_simulate_config

    sweep = yaml.safe_load((files / "sweep.yaml").read_text())
    (files / "paper.yaml").write_text(yaml.safe_dump({**sweep, "assumptions": "paper"}))
    out = files / "paper-report"
    assert main(["recommend", str(files / "t.parquet"), "--model", str(files / "model.yaml"), "--sweep",
                 str(files / "paper.yaml"), "-o", str(out), "-j", "1"]) == 0
    capsys.readouterr()
    cfg = load_simulate_config(out / "simulate_config.yaml")
    assert cfg.assumptions == "paper" and cfg.copy_policy == "hidden"
    digest = hashlib.sha256((files / "t.parquet").read_bytes()).hexdigest()
    for name in ("simulate_config.yaml", "sweep.yaml"):
        assert f"sha256 {digest}" in (out / name).read_text(), name
    predicting = [s for s in cfg.strategies if s.kind == "distribution"]
    assert all(s.replan_interval == 1 and s.min_gain == 0 and s.planner == "greedy" for s in predicting)
    assert all(s.planner is not None and s.replan_interval is not None for s in cfg.strategies if s.kind != "none")
    header = (out / "runs.csv").read_text().splitlines()[0].split(",")
    assert "layer_sync_us" in header
    assert main(["simulate", str(files / "t.parquet"), "--config", str(out / "simulate_config.yaml"), "--no-plots",
                 "-o", str(files / "paper-simulate")]) == 0


@pytest.mark.parametrize("args, message", [
    (["--jobs", "0"], "--jobs must be >= 1, got 0"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--tokens-per-step", "0"], "--tokens-per-step must be >= 1, got 0"),
    (["--cluster", "nope"], "--cluster: unknown cluster preset 'nope'"),
    (["--sweep", "missing.yaml"], "missing.yaml: no such file"),
])
def test_cli_bad_input_exits_2_with_one_line(files, capsys, args, message, monkeypatch):
    monkeypatch.chdir(files)
    code = main(["recommend", "t.parquet", "--model", "model.yaml", "-o", "r", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"moe-gps: error: {message}") and err.count("\n") == 1


def test_cli_bad_sweep_file_and_trace(files, capsys):
    (files / "bad.yaml").write_text("skew: [0.5]\n")
    code = main(["recommend", str(files / "t.parquet"), "--model", str(files / "model.yaml"), "--sweep",
                 str(files / "bad.yaml"), "-o", str(files / "r2")])
    err = capsys.readouterr().err
    assert code == 2 and "bad.yaml: skew[0]: must be a number >= 1" in err and err.count("\n") == 1
    code = main(["recommend", str(files / "nothing.parquet"), "-o", str(files / "r3")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "nothing.parquet" in err
    # a trace whose model cannot be inferred (4 layers named mixtral-8x7b) and no --model
    code = main(["recommend", str(files / "t.parquet"), "-o", str(files / "r4")])
    err = capsys.readouterr().err
    assert code == 2 and "give --model" in err


def test_workloads_that_differ_only_in_prompt_length_are_two_points(files, capsys):
    """Two prefill workloads of one size and different prompt lengths (your own --seq-len beside the sweep's
    workload of that size, say) are labelled apart, and the report is made."""
    sweep = yaml.safe_load((files / "sweep.yaml").read_text())
    sweep["workloads"] = [{"phase": "prefill", "tokens_per_step": 1024},
                          {"phase": "prefill", "tokens_per_step": 1024, "seq_len": 8192}]
    path = files / "prompts.yaml"
    path.write_text(yaml.safe_dump(sweep))
    out = files / "prompts"
    code = main(["recommend", str(files / "t.parquet"), "--model", str(files / "model.yaml"), "--sweep",
                 str(path), "-o", str(out), "--json", "-j", "1", "--tokens-per-step", "1024", "--seq-len", "2048"])
    assert code == 0
    import pandas as pd

    labels = set(pd.read_csv(out / "runs.csv")["workload"])
    assert {"prefill 1024, prompt 2048", "prefill 1024", "prefill 1024, prompt 8192"} <= labels


def test_a_file_where_the_cache_folder_goes_is_one_line(files, capsys):
    out = files / "cachefile"
    out.mkdir()
    (out / "cache").write_text("mine")
    code = main(["recommend", str(files / "t.parquet"), "--model", str(files / "model.yaml"), "--sweep",
                 str(files / "sweep.yaml"), "-o", str(out), "-j", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "a file where the sweep keeps its cache folder" in err
    assert (out / "cache").read_text() == "mine"


def test_a_trace_too_short_for_train_steps_is_told_a_step_size_that_regroups_it(tmp_path, capsys):
    """One step of 512 tokens: recommend names a --tokens-per-step that regroups it into enough steps (it had
    said to set train_steps below 1), and says when the one given only scaled the steps."""
    from pathlib import Path

    from moe_gps.trace import load_trace

    one = tmp_path / "one.parquet"
    write_trace(one, load_trace(Path(__file__).resolve().parents[1] / "traces" / "mixtral_mmlu.parquet")
                .select_steps([3]))
    assert main(["recommend", str(one), "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("moe-gps: error: the trace has 1 step; train_steps=16 leaves none to simulate: give "
                   "--tokens-per-step 30 or fewer, which regroups its 512 tokens into at least 17 steps")
    assert main(["recommend", str(one), "--tokens-per-step", "64", "-o", str(tmp_path / "r")]) == 2
    assert ("the trace has 1 step (--tokens-per-step 64 makes fewer than 17 steps, so each step's counts are "
            "scaled instead); train_steps=16") in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    small = tmp_path / "small.parquet"                 # 100 tokens: steps of 5, below experts x top_k
    assert main(["trace", "synth", "--steps", "1", "--tokens", "100", "-o", str(small)]) == 0
    capsys.readouterr()
    assert main(["recommend", str(small), "-o", str(tmp_path / "r")]) == 2
    assert ("give --tokens-per-step 5 or fewer, which regroups its 100 tokens into at least 17 steps, each fewer "
            "than experts x top_k") in capsys.readouterr().err
