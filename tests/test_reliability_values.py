"""Values of the wrong type or out of reach that used to end in a traceback or pass silently: predictor
and planner options, YAML keys given twice and YAML 1.2 floats, a sweep's GPU counts on a multi-node
cluster, a KV cache bigger than the GPU."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from moe_gps.cli.main import main
from moe_gps.errors import UserError
from moe_gps.files import parse_yaml
from moe_gps.placement import plan_placement

from conftest import one_line

BUNDLED = str(Path(__file__).resolve().parents[1] / "traces" / "mixtral_mmlu.parquet")


@pytest.mark.parametrize("strategy, message", [
    ("dist:ema(alpha=abc)", "distribution predictor 'ema': alpha must be a number, got 'abc'"),
    ("dist:window(window=4.5)", "distribution predictor 'window': window must be an integer, got 4.5"),
    ("dist:window(window=abc)", "window must be an integer, got 'abc'"),
    ("token:synthetic(accuracy=true)", "token predictor 'synthetic': accuracy must be a number, got True"),
    ("token:most-frequent(online=maybe)", "online must be true or false or null, got 'maybe'"),
    ("dist:token-hist(max_keys=-5)", "token-hist: max_keys must be >= 1, got -5"),      # ran, as if unbounded
    ("token:token-id(max_keys=0)", "token-id: max_keys must be >= 1, got 0"),
])
def test_predictor_options_of_the_wrong_type_are_one_line(tmp_path, capsys, strategy, message):
    code = main(["simulate", BUNDLED, "--strategies", f"none,{strategy}", "--no-plots", "-o", str(tmp_path / "o")])
    assert message in one_line(capsys, code)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("algorithm, options, message", [
    ("eplb", {"num_groups": "x"}, "num_groups must be an integer, got 'x'"),
    ("eplb", {"num_nodes": 2.5}, "num_nodes must be an integer, got 2.5"),
    ("eplb", {"num_groups": True}, "num_groups must be an integer, got True"),
    ("greedy", {"threshold": float("nan")}, "threshold must be a number, got nan"),
    ("waterfill", {"max_copies": [1, 2]}, "max_copies must be an integer or null, got [1, 2]"),
])
def test_planner_options_of_the_wrong_type_are_user_errors(algorithm, options, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        plan_placement(np.ones((2, 8)), 4, 4, algorithm, **options)
    # the right types (numpy's included) still plan
    plan_placement(np.ones((2, 8)), 4, 4, "eplb", num_nodes=np.int64(2), num_groups=2)


def test_a_yaml_key_given_twice_is_an_error_and_yaml_12_floats_are_numbers(tmp_path, capsys):
    with pytest.raises(UserError, match=r"c.yaml: not valid YAML at line 3, column 1: key 'num_gpus' given twice"):
        parse_yaml("name: x\nnum_gpus: 4\nnum_gpus: 8\n", "c.yaml")
    assert parse_yaml("a: 3e2\nb: 8.4e6\nc: 1.0e-3\nd: '3e2'\ne: 300\n", "f") == {
        "a": 300.0, "b": 8.4e6, "c": 1e-3, "d": "3e2", "e": 300}
    # a cluster file whose link bandwidth is written 3e2
    from moe_gps.config import load_cluster
    from moe_gps.config.loader import dump_yaml
    text = dump_yaml(load_cluster("4xA100-nvlink")).replace("bandwidth_gb_s: 300.0", "bandwidth_gb_s: 3e2", 1)
    assert "3e2" in text
    (tmp_path / "c.yaml").write_text(text)
    assert load_cluster(str(tmp_path / "c.yaml")).intra_node.bandwidth_gb_s == 300.0


def test_sweep_gpu_counts_that_do_not_fill_nodes_are_refused_before_anything_is_written(tmp_path, capsys):
    from test_recommend import TINY
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**TINY, "num_gpus": [12], "strategies": ["none"]}))
    code = main(["recommend", BUNDLED, "--cluster", "2x8xH100-ib", "--sweep", str(tmp_path / "s.yaml"),
                 "-o", str(tmp_path / "r"), "-j", "1"])
    assert f"{tmp_path / 's.yaml'}: num_gpus[0]: 12 GPUs do not fill whole nodes of 8" in one_line(capsys, code)
    assert not (tmp_path / "r").exists()


def test_a_kv_cache_bigger_than_the_gpu_is_refused(tmp_path, capsys):
    code = main(["serve", BUNDLED, "--kv-cache-gb", "1000", "--requests", "20", "--strategies", "none", "--no-plots",
                 "-o", str(tmp_path / "s")])
    err = one_line(capsys, code)
    assert "--kv-cache-gb) 1000 GB does not fit one GPU of cluster 4xA100-nvlink: 72.0 GB available" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("old, new, message", [
    ("shares: even", "shares: lumpy", "shares says 'lumpy' but replica_share gives even shares"),
    ("num_gpus: 4", "num_gpus: abc", "num_gpus must be an integer, got 'abc'"),
    ("allow_colocated: true", "allow_colocated: maybe", "allow_colocated must be true or false, got 'maybe'"),
])
def test_a_placement_file_with_a_wrong_field_is_refused(tmp_path, capsys, old, new, message):
    from moe_gps.placement import load_placement
    assert main(["plan", BUNDLED, "--gpus", "4", "--redundant", "4", "-o", str(tmp_path / "p.yaml")]) == 0
    text = (tmp_path / "p.yaml").read_text()
    assert old in text
    (tmp_path / "q.yaml").write_text(text.replace(old, new, 1))
    with pytest.raises(UserError, match=message):
        load_placement(tmp_path / "q.yaml")


def test_a_config_written_for_another_trace_is_noted(tmp_path, capsys):
    assert main(["simulate", BUNDLED, "--strategies", "none", "--no-plots", "-o", str(tmp_path / "a")]) == 0
    other = tmp_path / "other.parquet"
    other.write_bytes(Path(BUNDLED).read_bytes())
    capsys.readouterr()
    assert main(["simulate", str(other), "--config", str(tmp_path / "a" / "config.yaml"), "--no-plots",
                 "-o", str(tmp_path / "b")]) == 0
    assert f"was written for the trace {BUNDLED}; this run simulates {other}" in capsys.readouterr().out
    assert main(["simulate", BUNDLED, "--config", str(tmp_path / "a" / "config.yaml"), "--no-plots",
                 "-o", str(tmp_path / "c")]) == 0
    assert "was written for the trace" not in capsys.readouterr().out


def test_a_rerun_into_a_folder_removes_the_earlier_runs_plots_it_does_not_draw(tmp_path, capsys):
    """Tables of one run beside plots of another would disagree: a rerun with --no-plots (or without
    --timeline) removes the earlier run's figures and timeline, and nothing else of the folder's."""
    out = tmp_path / "o"
    assert main(["simulate", BUNDLED, "--strategies", "none", "--timeline", "20", "-o", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    assert (out / "breakdown.png").is_file() and (out / "timeline.json").is_file()
    capsys.readouterr()
    assert main(["simulate", BUNDLED, "--strategies", "none", "--no-plots", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "removed an earlier run's breakdown.png, skew_per_layer.png, latency_cdf.png, timeline.png, " \
           "timeline.json" in text
    assert sorted(p.name for p in out.iterdir()) == [".moe-gps-files", "config.yaml", "layers.parquet", "notes.txt",
                                                      "steps.csv", "summary.csv", "summary.txt"]


def test_files_of_the_users_named_like_a_figure_are_kept(tmp_path, capsys):
    """Only what a moe-gps run recorded writing is removed as stale: a file of the user's that has a
    figure's name, in a folder no run wrote (or written there after), stays, and the run says so."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "breakdown.png").write_text("my own plot")
    (out / "timeline.json").write_text("my timeline")
    assert main(["simulate", BUNDLED, "--strategies", "none", "--no-plots", "-o", str(out)]) == 0
    assert "kept breakdown.png, timeline.json in" in capsys.readouterr().out
    assert (out / "breakdown.png").read_text() == "my own plot" and (out / "timeline.json").read_text() == "my timeline"
    assert main(["simulate", BUNDLED, "--strategies", "none", "--no-plots", "-o", str(out)]) == 0
    assert (out / "timeline.json").read_text() == "my timeline"          # the record does not adopt them


def test_predict_evaluate_refuses_flags_that_would_do_nothing(tmp_path, capsys):
    """--synthetic-flops without --synthetic, and a run in which no asked predictor can run (token
    predictors on a counts trace): one line, exit 2, no output folder."""
    code = main(["predict", "evaluate", BUNDLED, "--synthetic-flops", "1e6"])
    assert "--synthetic-flops is the overhead of the predictors of --synthetic" in one_line(capsys, code)
    code = main(["predict", "evaluate", BUNDLED, "--predictors", "previous", "--overhead-curve", "1e6,3"])
    assert "--overhead-curve is the overhead of the predictors of --synthetic" in one_line(capsys, code)
    assert main(["trace", "synth", "--kind", "counts", "--steps", "20", "--tokens", "512",
                 "-o", str(tmp_path / "c.parquet")]) == 0
    capsys.readouterr()
    code = main(["predict", "evaluate", str(tmp_path / "c.parquet"), "--predictors", "most-frequent",
                 "-o", str(tmp_path / "pe")])
    assert "no predictor could run on this trace: most-frequent: " in one_line(capsys, code)
    assert not (tmp_path / "pe").exists()


@pytest.mark.parametrize("doc, message", [
    ({"output": {"timings": "steps.csv"}}, "output.steps 'steps.csv' is also output.timings"),
    ({"output": {"trace": ""}}, "output.trace must name a file, got ''"),
    ({"output": {"steps": "summary.json"}}, "output.steps 'summary.json' is also the run's summary.json"),
    ({"run": {"timeout_s": float("nan")}}, "run.timeout_s: must be a finite number, got nan"),
    ({"run": {"timeout_s": float("inf")}}, "run.timeout_s: must be a finite number, got inf"),
    ({"run": {"timeout_s": 1e300}}, "run.timeout_s must be from 1 to 86400 seconds, got 1e+300"),   # C int overflow
    ({"run": {"timeout_s": 1e-6}}, "run.timeout_s must be from 1 to 86400 seconds, got 1e-06"),
    ({"model": {"router_bias_std": float("nan")}}, "model.router_bias_std: must be a finite number, got nan"),
    ({"model": {"seed": -1}}, "model.seed must be at least 0, got -1"),
    ({"input": {"seed": -2}}, "input.seed must be at least 0, got -2"),
    ({"model": {"seed": 10**23}}, "model.seed must be at most 2^63 - 1, got 100000000000000000000000"),
    ({"model": {"router_bias_std": 1e300}}, "model.router_bias_std must be in [0, 100]"),
    ({"output": {"trace": "../escape.parquet"}}, "output.trace must be a file name in output.dir, without a folder"),
    ({"output": {"timings": "/tmp/t.csv"}}, "output.timings must be a file name in output.dir, without a folder"),
    ({"output": {"steps": "."}}, "output.steps must be a file name in output.dir, without a folder"),
    ({"model": False}, "section 'model' must be a mapping"),
    ({"run": []}, "section 'run' must be a mapping"),
])
def test_run_config_values_that_used_to_fail_on_every_rank(doc, message):
    from runtime.config import parse_run_config
    with pytest.raises(UserError, match=re.escape(f"r.yaml: {message}")):
        parse_run_config(doc, "r.yaml")


def test_a_run_never_writes_over_its_own_inputs(tmp_path, capsys):
    """An output folder that holds the run's input trace or its config would have them overwritten by the
    run's outputs of the same names: one line naming both, exit 2, the inputs untouched."""
    pytest.importorskip("torch")
    from moe_gps.trace import write_trace
    from moe_gps.trace.synth import synthesize

    folder = tmp_path / "in"
    folder.mkdir()
    write_trace(folder / "trace.parquet", synthesize("mixtral-mmlu", num_steps=4, tokens_per_step=64, seed=0,
                                                     num_layers=2))
    before = (folder / "trace.parquet").read_bytes()
    doc = {"model": {"num_layers": 2, "hidden_size": 64, "intermediate_size": 64, "num_heads": 2},
           "input": {"trace": "trace.parquet", "batch_size": 2, "seq_len": 16}, "run": {"steps": 2},
           "duplication": {"num_redundant": 2}}
    config = folder / "run.yaml"
    config.write_text(yaml.safe_dump(doc))
    run = ["run", "--nproc", "2", "--config", str(config), "--duplication", "off"]
    code = main(run + ["-o", str(folder)])
    assert "the run would write its trace.parquet over input.trace" in one_line(capsys, code)
    assert (folder / "trace.parquet").read_bytes() == before
    config.write_text(yaml.safe_dump({**doc, "output": {"dir": str(folder), "trace": "t.parquet",
                                                        "timings": "run.yaml"}}))
    text = config.read_text()
    code = main(run)
    assert "output.dir" in (line := one_line(capsys, code)) and "its run.yaml over the run config" in line
    assert config.read_text() == text
    # an empty --out is refused, not read as "no --out"
    with pytest.raises(SystemExit) as ex:
        main(run + ["--out", ""])
    assert "argument -o/--output/--out: an empty value ('')" in one_line(capsys, ex.value.code)


def test_moe_gps_run_checks_the_checkpoint_and_the_folders_lock_before_torchrun(tmp_path, capsys):
    """A model.checkpoint without config.json, and an output folder another run is writing to: one line and
    exit 2 from `moe-gps run` itself (they used to surface on the ranks, under torchrun's failure dump)."""
    pytest.importorskip("torch")
    from moe_gps.outputs import locked_output_dir

    (tmp_path / "ckpt").mkdir()
    doc = {"model": {"checkpoint": "ckpt"}, "run": {"steps": 2}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    run = ["run", "--nproc", "2", "--config", str(tmp_path / "r.yaml"), "--duplication", "off"]
    code = main(run + ["-o", str(tmp_path / "out")])
    assert "model.checkpoint: " in (line := one_line(capsys, code)) and "no config.json" in line
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"model": {"num_layers": 2, "hidden_size": 64,
                                                               "intermediate_size": 64, "num_heads": 2},
                                                     "duplication": {"num_redundant": 0}}))
    with locked_output_dir(tmp_path / "busy"):
        code = main(run + ["-o", str(tmp_path / "busy")])
    assert "another run is writing to this folder" in one_line(capsys, code)
    # a warm-up as long as the run: a note that it never plans (here before --nproc's own error)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"run": {"steps": 3}, "duplication": {"warmup_steps": 50}}))
    code = main(run[:-1] + ["dist-only", "--nproc", "100000", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "note: duplication.warmup_steps=50 is not below the 3 steps of the run" in err


@pytest.mark.parametrize("mode, duplication, message", [
    ("dist-only", {"distribution_predictor": "nope"}, "duplication.distribution_predictor: unknown predictor 'nope'"),
    ("dist-only", {"distribution_predictor": "oracle"},
     "duplication.distribution_predictor: 'oracle' reads the routing of the step itself"),
    ("dist-only", {"distribution_predictor": "synthetic"},
     "duplication.distribution_predictor: 'synthetic' reads the routing of the step itself"),
    ("dist-only", {"distribution_params": {"alpha": -0.5}},
     "duplication.distribution_params: ema: alpha must be in (0, 1], got -0.5"),
    ("token-to-expert", {"token_predictor": "prev-layer"},
     "duplication.token_predictor: 'prev-layer' reads the routing of the step"),
    ("token-to-expert", {"token_predictor": "bogus"},
     "duplication.token_predictor: unknown predictor 'bogus' (choose from most-frequent, token-id, position)"),
    ("static", {"algorithm_options": {"bogus": 1}}, "algorithm 'eplb' does not take option(s) bogus"),
])
def test_moe_gps_run_builds_the_policy_before_torchrun(tmp_path, capsys, mode, duplication, message):
    """What every rank builds first (the predictor, step 0's placement) is built by `moe-gps run` before it
    starts torchrun: one line and exit 2, not a line per rank and torchrun's failure dump."""
    pytest.importorskip("torch")
    doc = {"model": {"num_layers": 2, "hidden_size": 64, "intermediate_size": 64, "num_heads": 2},
           "input": {"batch_size": 2, "seq_len": 16}, "run": {"steps": 4},
           "duplication": {"num_redundant": 2, "warmup_steps": 2, **duplication}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    code = main(["run", "--nproc", "2", "--config", str(tmp_path / "r.yaml"), "--duplication", mode,
                 "-o", str(tmp_path / "out")])
    assert message in one_line(capsys, code)
    assert not (tmp_path / "out").exists()


def test_config_yaml_writes_out_the_predictors_defaults(tmp_path, capsys):
    """config.yaml makes every default explicit, the predictors' own included (ema's alpha, window's
    window); a rerun from it writes the same config."""
    from moe_gps.config.loader import load_simulate_config
    assert main(["simulate", BUNDLED, "--strategies", "none,dist:ema,dist:window(window=4)", "--no-plots",
                 "-o", str(tmp_path / "a")]) == 0
    cfg = load_simulate_config(tmp_path / "a" / "config.yaml")
    opts = {s.name: s.predictor_options for s in cfg.strategies}
    assert opts["dist:ema"] == {"online": True, "alpha": 0.3}
    assert opts["dist:window(window=4)"] == {"online": True, "window": 4}
    assert main(["simulate", BUNDLED, "--config", str(tmp_path / "a" / "config.yaml"), "--no-plots",
                 "-o", str(tmp_path / "b")]) == 0
    for name in ("config.yaml", "summary.csv", "steps.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_steps_that_are_copies_of_one_step_are_thin_evidence():
    """24 copies of one trace step are one step of evidence: the verdict says so, however many there are;
    a single simulated step gives no interval."""
    from moe_gps.cli.main import build_parser
    from moe_gps.cli.simulate_cmd import build_config
    from moe_gps.trace import load_trace
    from sim.run import simulate

    t = load_trace(BUNDLED)
    copies = t.select_steps([3] * 24)
    cfg = build_config(build_parser().parse_args(["simulate", "x", "--strategies", "none,eplb,dist:ema"]), copies)[0]
    v = simulate(copies, cfg, progress=False).verdict
    assert v.thin and v.distinct_steps == 1 and v.steps == 18
    assert "[thin evidence: 1 distinct of the 18 simulated steps (the others are exact copies)" in v.line()
    # copies of one step are one sample: no interval (a bootstrap over them gave a zero-width one)
    cfg = build_config(build_parser().parse_args(["simulate", "x", "--strategies", "none,eplb,dist:ema",
                                                  "--tokens-per-step", "16384"]), copies)[0]
    line = simulate(copies, cfg, progress=False).verdict.line()
    assert "dist:ema is the fastest" in line and "95% CI" not in line
    assert "(no interval: the 18 simulated steps are copies of one); the next, eplb, is" in line
    res = simulate(copies, build_config(build_parser().parse_args(["simulate", "x", "--strategies", "none,oracle"]),
                                        copies)[0], progress=False)
    from sim.verdict import bound_lines
    assert "no interval: the 18 simulated steps are copies of one" in bound_lines(res)[0]
    full = simulate(t, build_config(build_parser().parse_args(["simulate", "x", "--strategies", "none,eplb"]),
                                    t)[0], progress=False).verdict
    assert not full.thin and full.distinct_steps == full.steps == 48
    two = t.select_steps([3, 4])
    cfg = build_config(build_parser().parse_args(["simulate", "x", "--strategies", "none,eplb", "--train-steps",
                                                  "1"]), two)[0]
    line = simulate(two, cfg, progress=False).verdict.line()
    assert "eplb, runs at" in line and "(no interval from 1 simulated step)" in line and "95% CI" not in line


def test_trace_import_with_the_wrong_format_names_the_likely_one(tmp_path, capsys):
    lines = "\n".join('{"topk_weights": [2, 2], "topk_ids": [[0, 1], [2, 3]]}' for _ in range(4)) + "\n"
    (tmp_path / "calls.jsonl").write_text(lines)
    code = main(["trace", "import", "--from", "gate-csv", str(tmp_path / "calls.jsonl"),
                 "-o", str(tmp_path / "t.parquet")])
    err = one_line(capsys, code)
    assert "(calls.jsonl looks like JSON lines of topk_ids" in err and "did you mean --from vllm-jsonl?)" in err
    assert not (tmp_path / "t.parquet").exists()


def test_eplb_keeps_vllms_step_interval_when_its_window_is_given():
    """vLLM's step_interval (3000) does not depend on window_size: only a window scaled to a short
    history scales the interval with it (3 x the window)."""
    from moe_gps.config import StrategyConfig
    given = StrategyConfig(kind="static", eplb_config={"window_size": 500})
    given.check("test")
    assert given.resolved_policy(5000).interval == 3000 and given.resolved_policy(5000).window == 500
    assert StrategyConfig(kind="static", window=8).resolved_policy(16).interval == 3000
    short = StrategyConfig(kind="static").resolved_policy(16)
    assert (short.window, short.interval) == (16, 48)


def test_vllm_jsonl_warns_when_the_kept_passes_look_like_dummy_ones(tmp_path, capsys):
    import json
    rng = np.random.default_rng(0)

    def call(T):
        ids = [sorted(rng.choice(8, 2, replace=False).tolist()) for _ in range(T)]
        return json.dumps({"topk_weights": [T, 2], "topk_ids": ids})
    (tmp_path / "c.jsonl").write_text("\n".join(call(T) for T in (4, 64, 4, 64)) + "\n")
    args = ["trace", "import", "--from", "vllm-jsonl", str(tmp_path / "c.jsonl"), "--num-layers", "1",
            "--num-experts", "8", "-o", str(tmp_path / "t.parquet")]
    assert main(args) == 0
    assert "moe-gps: warning: the kept passes hold 4 to 64 tokens" in capsys.readouterr().err
    assert main([*args, "--min-tokens", "10"]) == 0
    assert "warning" not in capsys.readouterr().out


def test_serve_knows_a_presets_dense_layers_under_another_spelling_of_its_name():
    """A DeepSeek-V3 config.json loads as 'DeepSeek-V3' (its folder) or with the hub name as an alias:
    serve still counts its 3 dense layers and its vocabulary."""
    import dataclasses
    from moe_gps.config import load_model
    from moe_gps.config.serving import IterationParts
    from sim.serving.iteration import resolve_parts
    m = load_model("deepseek-v3")
    for name, aliases in (("DeepSeek-V3", []), ("dsv3", ["deepseek-ai/DeepSeek-V3"])):
        p = resolve_parts(IterationParts(), dataclasses.replace(m, name=name, aliases=aliases))
        assert (p.vocab_size, p.dense_layers, p.dense_intermediate_size) == (129280, 3, 18432)


def test_exports_the_servers_cannot_read_are_refused(tmp_path, capsys):
    """vLLM Ascend cannot express a device holding one expert twice; SGLang and vLLM Ascend read a
    placement file as JSON only when its name ends in .json."""
    from moe_gps.placement import Placement
    from moe_gps.placement.export import export_text
    twice = Placement(np.array([[0, 0, 1, 2, 3, 1]]), 3, 4, allow_colocated=True)     # device 0: expert 0 twice
    with pytest.raises(UserError, match="layer 0, device 0 holds expert 0 twice"):
        export_text(twice, "vllm-ascend")
    for flag in ("--sglang", "--vllm-ascend"):
        code = main(["plan", BUNDLED, "--gpus", "4", "--redundant", "4", "--algorithm", "waterfill",
                     "--num-hidden-layers", "32", "-o", str(tmp_path / "p.yaml"), flag, str(tmp_path / "map.txt")])
        assert f"{flag} {tmp_path / 'map.txt'}: the server reads this file as JSON only when its name ends in " \
               f".json" in one_line(capsys, code)
    assert not (tmp_path / "p.yaml").exists()


def test_gpt_oss_attention_weights_keep_the_checkpoints_dtype(tmp_path):
    """gpt-oss quantizes its experts to MXFP4 and keeps the attention in BF16 (modules_to_not_convert):
    the attention's weights count 2 bytes each in the memory check and the attention's weight reads."""
    import json
    from moe_gps.config import load_cluster, load_model
    from moe_gps.config.loader import memory_use
    from moe_gps.config.schema import WorkloadConfig
    cfg = {"model_type": "gpt_oss", "hidden_size": 2880, "num_attention_heads": 64, "num_key_value_heads": 8,
           "head_dim": 64, "num_hidden_layers": 36, "num_local_experts": 128, "num_experts_per_tok": 4,
           "intermediate_size": 2880, "torch_dtype": "bfloat16",
           "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                      "lm_head"]}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = load_model(str(tmp_path / "config.json"))
    assert m.weight_bytes == 4.25 / 8 and m.dense_weight_bytes == 2.0 and m.dense_bytes == 2.0
    use = memory_use(load_cluster("4xA100-nvlink"), m, WorkloadConfig(), 33, 0.0)
    assert use.dense_weights == 36 * m.attention_params * 2.0
    del cfg["quantization_config"]["modules_to_not_convert"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_model(str(tmp_path / "config.json")).dense_weight_bytes is None


def test_a_bootstrap_with_resamples_where_nothing_is_met_has_no_nan():
    """Resamples where the base meets the SLO on no request drawn: 0/0 is a tie, x/0 is unbounded; the
    interval is never NaN."""
    from sim.verdict import speedup_interval
    rng = np.random.default_rng(0)
    base = (rng.random(40) < 0.05).astype(float)            # the base meets the SLO for about 2 requests
    other = (rng.random(40) < 0.5).astype(float)
    point, lo, hi = speedup_interval(other, base, seed=1)
    assert not np.isnan([point, lo, hi]).any() and lo <= point <= hi


def test_serve_verdict_from_one_request_has_no_interval_and_request_times_are_exact(tmp_path, capsys):
    import csv
    assert main(["serve", BUNDLED, "--requests", "1", "--strategies", "none,eplb", "--no-plots",
                 "-o", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "(no interval from 1 request) [thin evidence: fewer than 8 requests]" in out and "95% CI" not in out
    row = next(csv.DictReader(open(tmp_path / "s" / "requests.csv")))
    first, arrival = float(row["first_token_s"]), float(row["arrival_s"])
    assert (first - arrival) * 1e3 == pytest.approx(float(row["ttft_ms"]), rel=1e-5)


def test_no_expert_takes_more_than_the_steps_tokens(tmp_path, capsys):
    """A token takes an expert once: a counts trace with an expert above its step's tokens is refused, and
    the synthesizer never writes one (sst2's skew reaches the cap of 8 experts, top-2, 512 tokens)."""
    from moe_gps.trace import TraceMeta, load_trace, write_trace
    from moe_gps.trace.data import CountsTrace
    bad = np.array([[[5, 1, 0, 0]]], dtype=np.int64)               # 3 tokens, top-2: 6 assignments, 5 on one
    write_trace(tmp_path / "bad.parquet", CountsTrace(TraceMeta("counts", 1, 4, 2, tokens_per_step=[3]), bad))
    err = one_line(capsys, main(["trace", "validate", str(tmp_path / "bad.parquet")]))
    assert "step 0, layer 0: expert 0 takes 5 assignments, more than the step's 3 tokens" in err
    assert main(["trace", "synth", "--profile", "sst2", "--kind", "counts", "--steps", "32", "--tokens", "512",
                 "-o", str(tmp_path / "c.parquet")]) == 0
    c = load_trace(tmp_path / "c.parquet").counts()
    assert c.max() <= 512 and (c.sum(axis=2) == 1024).all()


def test_rechunk_leaves_the_target_alone_when_the_regrouped_trace_fails_validation(tmp_path, capsys):
    from moe_gps.trace import TraceMeta, write_trace
    from moe_gps.trace.data import CountsTrace
    big = 2 ** 39                                            # each step 2^39 tokens: two make one over 2^40
    counts = np.zeros((4, 1, 2), dtype=np.int64)
    counts[:, 0, 0] = big
    write_trace(tmp_path / "huge.parquet", CountsTrace(TraceMeta("counts", 1, 2, 1, tokens_per_step=[big] * 4),
                                                       counts))
    (tmp_path / "old.parquet").write_bytes(b"the user's file")
    code = main(["trace", "rechunk", str(tmp_path / "huge.parquet"), "--tokens-per-step", str(2 * big),
                 "-o", str(tmp_path / "old.parquet")])
    err = one_line(capsys, code)
    assert str(tmp_path / "old.parquet") in err and "more than the 2^40" in err
    assert (tmp_path / "old.parquet").read_bytes() == b"the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.parquet", "old.parquet"]


def test_rechunk_refuses_to_write_over_the_trace_it_regroups(tmp_path, capsys):
    """Regrouping leaves the tokens after the last whole step out: written over its input, it lost them."""
    from moe_gps.trace import write_trace
    from moe_gps.trace.synth import synthesize
    path = tmp_path / "keep.parquet"
    write_trace(path, synthesize("mixtral-mmlu", num_steps=4, tokens_per_step=64, num_layers=2, seed=0))
    before = path.read_bytes()
    for out in (path, tmp_path / "." / "keep.parquet"):
        err = one_line(capsys, main(["trace", "rechunk", str(path), "--tokens-per-step", "100", "-o", str(out)]))
        assert "the output would overwrite the trace it regroups" in err
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["keep.parquet"]


def test_synth_refuses_what_the_trace_format_cannot_hold_and_takes_a_profile_name(tmp_path, capsys):
    code = main(["trace", "synth", "--kind", "counts", "--steps", "2", "--tokens", str(2 ** 40),
                 "-o", str(tmp_path / "h.parquet")])
    assert "more than the 2^40 a counts trace may hold" in one_line(capsys, code)
    assert not (tmp_path / "h.parquet").exists()
    assert main(["trace", "synth", "--set", "name=mine", "--steps", "2", "--tokens", "64",
                 "-o", str(tmp_path / "n.parquet")]) == 0
    assert "profile mine" in capsys.readouterr().out


def test_simulate_and_serve_never_write_over_the_files_they_read(tmp_path, capsys):
    """A trace named layers.parquet in the output folder was replaced by the layer table (and then unreadable
    as a trace); a --config read from the output folder was replaced by the run's own config.yaml."""
    import shutil

    out = tmp_path / "o"
    out.mkdir()
    trace = out / "layers.parquet"
    shutil.copy(BUNDLED, trace)
    before = trace.read_bytes()
    code = main(["simulate", str(trace), "--strategies", "none", "--no-plots", "-j", "1", "-o", str(out)])
    assert "this run's layers.parquet would replace its input" in one_line(capsys, code)
    assert trace.read_bytes() == before and [p.name for p in out.iterdir()] == ["layers.parquet"]
    run = tmp_path / "run"
    assert main(["simulate", BUNDLED, "--strategies", "none", "--no-plots", "-j", "1", "-o", str(run)]) == 0
    config = run / "config.yaml"
    config.write_text(config.read_text() + "# my notes\n")
    mine = config.read_text()
    capsys.readouterr()
    code = main(["simulate", BUNDLED, "--config", str(config), "--seed", "5", "--no-plots", "-o", str(run)])
    assert "this run's config.yaml would replace its input" in one_line(capsys, code)
    assert config.read_text() == mine
    assert main(["simulate", BUNDLED, "--config", str(config), "--seed", "5", "--no-plots",
                 "-o", str(tmp_path / "again")]) == 0               # into another folder it reruns
    # in place, the rerun of a config.yaml as it was written writes the same bytes: nothing is lost
    again = tmp_path / "again" / "config.yaml"
    assert main(["simulate", BUNDLED, "--config", str(again), "--no-plots", "-o", str(tmp_path / "again")]) == 0
    code = main(["serve", BUNDLED, "--strategies", "none", "--requests", "5", "--no-plots",
                 "--workload", str(_workload_named(tmp_path / "w", "config.yaml")), "-o", str(tmp_path / "w")])
    assert "this run's config.yaml would replace its input" in one_line(capsys, code)


def _workload_named(folder, name: str):
    folder.mkdir()
    path = folder / name
    path.write_text("name: w\nprompt_tokens: {dist: fixed, value: 16}\noutput_tokens: {dist: fixed, value: 2}\n"
                    "rate: 5\n")
    return path


def test_a_strategys_own_options_win_over_the_flags_for_every_strategy(tmp_path, capsys):
    """--redundant-slots 4 ran eplb(num_redundant_experts=8) with 4 slots under its label, and --replan-interval
    replaced eplb(step_interval=20)'s; now the strategy keeps what it names, with a note, and the others
    take the flag."""
    import yaml

    out = tmp_path / "o"
    assert main(["simulate", BUNDLED, "--strategies", "none", "eplb", "eplb(num_redundant_experts=8)",
                 "eplb(window_size=10,step_interval=20)", "--redundant-slots", "4", "--replan-interval", "4",
                 "--window", "2", "--no-plots", "-j", "1", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "note: --redundant-slots 4 does not apply to eplb(num_redundant_experts=8), which sets its own " \
           "redundant_slots (8)" in text
    assert "note: --replan-interval 4 does not apply to eplb(window_size=10,step_interval=20), which sets its " \
           "own replan_interval (20)" in text
    ran = {s["name"] or "none": s for s in yaml.safe_load((out / "config.yaml").read_text())["strategies"]}
    assert ran["eplb"]["redundant_slots"] == 4 and ran["eplb"]["replan_interval"] == 4 and ran["eplb"]["window"] == 2
    assert ran["eplb(num_redundant_experts=8)"]["redundant_slots"] == 8
    assert ran["eplb(window_size=10,step_interval=20)"]["replan_interval"] == 20
    assert ran["eplb(window_size=10,step_interval=20)"]["window"] == 10
    assert ran["eplb(window_size=10,step_interval=20)"]["redundant_slots"] == 4


def test_a_predictor_option_named_twice_is_refused(tmp_path, capsys):
    code = main(["simulate", BUNDLED, "--strategies", "dist:ema(alpha=0.3,alpha=0.5)", "--no-plots",
                 "-o", str(tmp_path / "o")])
    assert "strategy 'dist:ema(alpha=0.3,alpha=0.5)': option 'alpha' given twice" in one_line(capsys, code)


def test_a_config_files_bad_predictor_option_names_the_file(tmp_path, capsys):
    """configs.md: every problem of a config file is one line naming the file and the key; a predictor's
    own range check (made when the strategy is built) left the file out."""
    import yaml

    run = tmp_path / "run"
    assert main(["simulate", BUNDLED, "--strategies", "none", "dist:ema", "--no-plots", "-j", "1",
                 "-o", str(run)]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["strategies"][1]["predictor_options"]["alpha"] = 5
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    code = main(["simulate", BUNDLED, "--config", str(path), "--no-plots", "-j", "1", "-o", str(tmp_path / "o")])
    assert f"{path}: strategies[1] (dist:ema): ema: alpha must be in (0, 1], got 5" in one_line(capsys, code)


def test_a_yaml_input_that_says_what_the_run_writes_stays_as_it_is(tmp_path):
    """recommend --sweep OUT/sweep.yaml -o OUT (resuming from the cache): the sweep it writes differs from the
    one it read only in the header's command line, so the user's file stays; other data is refused."""
    from moe_gps.outputs import staged_outputs

    out = tmp_path / "o"
    out.mkdir()
    mine = out / "sweep.yaml"
    mine.write_text("# my notes\nseed: 0\nnum_gpus: [4]\n")
    with staged_outputs(out, inputs=(str(mine),)) as stage:
        (stage.path / "sweep.yaml").write_text("# the command: moe-gps recommend ...\nseed: 0\nnum_gpus: [4]\n")
        (stage.path / "runs.csv").write_text("a\n1\n")
    assert mine.read_text() == "# my notes\nseed: 0\nnum_gpus: [4]\n" and (out / "runs.csv").exists()
    with pytest.raises(UserError, match="this run's sweep.yaml would replace its input"):
        with staged_outputs(out, inputs=(str(mine),)) as stage:
            (stage.path / "sweep.yaml").write_text("seed: 1\nnum_gpus: [4]\n")
    assert mine.read_text() == "# my notes\nseed: 0\nnum_gpus: [4]\n"


def test_set_aside_drops_the_earlier_files_on_success_and_names_a_killed_runs_leftovers(tmp_path):
    from moe_gps.outputs import ASIDE_NAME, set_aside

    out = tmp_path / "o"
    (out / "runs" / "A").mkdir(parents=True)
    (out / "runs" / "A" / "t.txt").write_text("old")
    (out / "r.txt").write_text("old report")
    with set_aside(out, ["runs/A", "r.txt"]):
        assert not (out / "r.txt").exists() and (out / ASIDE_NAME / "r.txt").read_text() == "old report"
        (out / "runs" / "A").mkdir()
        (out / "runs" / "A" / "t.txt").write_text("new")
        (out / "r.txt").write_text("new report")
    assert (out / "r.txt").read_text() == "new report" and (out / "runs" / "A" / "t.txt").read_text() == "new"
    assert not (out / ASIDE_NAME).exists()
    (out / ASIDE_NAME).mkdir()                          # what a run killed outright (SIGKILL) leaves
    with pytest.raises(UserError, match="the files of an earlier run in .* that was killed before it ended"):
        with set_aside(out, ["r.txt"]):
            pass


def test_a_one_step_trace_is_told_how_to_regroup_and_when_that_is_only_noise():
    """A one-step trace is told to regroup its tokens; where the steps that would make hold fewer tokens than
    experts x top_k, it is told that is noise rather than given a step size its own warning then calls noise."""
    from moe_gps.cli.main import build_parser
    from moe_gps.cli.simulate_cmd import build_config
    from moe_gps.errors import UserError
    from moe_gps.trace import load_trace
    from sim.run import default_train_steps

    t = load_trace(BUNDLED)
    cfg = build_config(build_parser().parse_args(["simulate", "x"]), t)[0]            # 8 experts, top-2
    with pytest.raises(UserError, match=r"regroup its 512 tokens into several steps, e\.g\. --tokens-per-step 32 "
                                        r"\(16 steps\)"):
        default_train_steps(cfg, 1, 512)
    with pytest.raises(UserError, match=r"its 200 tokens are too few for several steps of at least experts x top_k "
                                        r"\(8 x 2\) tokens.*record a longer trace, or regroup it anyway "
                                        r"\(--tokens-per-step 12 \(16 steps\)"):
        default_train_steps(cfg, 1, 200)


BIG = "9" * 5000                  # more digits than Python converts to an int
DEEP = "[" * 50000 + "]" * 50000  # deeper than the parser's stack


@pytest.mark.parametrize("name, text, argv, message", [
    ("r.jsonl", '{"prompt_routed_experts": [[[0, ' + BIG + ']]]}\n',
     ["trace", "import", "--from", "vllm-routed", "{f}", "--num-experts", "8", "-o", "{tmp}/x.parquet"],
     "{f}: not valid JSON (Exceeds the limit (4300 digits) for integer string conversion"),
    ("r.jsonl", DEEP + "\n", ["trace", "import", "--from", "vllm-routed", "{f}", "--num-experts", "8", "-o",
                              "{tmp}/x.parquet"], "{f}: not valid JSON (nested too deep)"),
    ("v.jsonl", DEEP + "\n", ["trace", "import", "--from", "vllm-jsonl", "{f}", "--num-layers", "1",
                              "--num-experts", "8", "-o", "{tmp}/x.parquet"],
     "{f}:1: not valid JSON (nested too deep)"),
    ("p.json", '{"expert_popularity": [[' + BIG + ']]}', ["trace", "import", "--from", "popularity-json", "{f}",
                                                          "--top-k", "2", "-o", "{tmp}/x.parquet"],
     "{f}: not valid JSON (Exceeds the limit"),
    ("config.json", '{"model_type": "mixtral", "num_hidden_layers": ' + BIG + '}',
     ["simulate", BUNDLED, "--model", "{f}", "-o", "{tmp}/s"], "{f}: not valid JSON (Exceeds the limit"),
    ("c.yaml", "name: c\nnum_gpus: " + BIG + "\n", ["simulate", BUNDLED, "--cluster", "{f}", "-o", "{tmp}/s"],
     "{f}: not valid YAML (Exceeds the limit"),
])
def test_numbers_too_long_and_nesting_too_deep_are_one_line(tmp_path, capsys, name, text, argv, message):
    """Well-formed JSON or YAML that Python's parsers still refuse (an integer of 5000 digits, 50000 nested
    brackets) is one line and exit 2, not a ValueError or RecursionError traceback."""
    from moe_gps.cli.main import main

    f = tmp_path / name
    f.write_text(text)
    code = main([a.replace("{f}", str(f)).replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message.replace("{f}", str(f)) in err, err
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "s").exists()


def test_trace_metadata_too_deep_or_too_long_is_one_line(tmp_path):
    import pyarrow.parquet as pq

    from moe_gps.errors import UserError
    from moe_gps.trace import load_trace

    table = pq.read_table(BUNDLED)
    meta = table.schema.metadata[b"moe_gps"].decode()
    for bad, why in ((meta.replace('"num_experts": 8', '"num_experts": ' + BIG), "Exceeds the limit"),
                     (meta[:-1] + ', "x": ' + DEEP + "}", "nested too deep")):
        path = tmp_path / "m.parquet"
        pq.write_table(table.replace_schema_metadata({b"moe_gps": bad.encode()}), path)
        with pytest.raises(UserError, match=f"m.parquet: metadata entry 'moe_gps' is not valid JSON \\({why}"):
            load_trace(path)


def test_plan_refuses_more_redundant_slots_than_give_each_expert_one_per_gpu(tmp_path, capsys):
    """`plan --redundant 100000` wrote a 9.6 MB plan of 12,501 copies of each expert on 4 GPUs (exit 0)."""
    from moe_gps.cli.main import main

    assert main(["plan", BUNDLED, "--gpus", "4", "--redundant", "100000", "-o", str(tmp_path / "p.yaml")]) == 2
    assert capsys.readouterr().err == ("moe-gps: error: --redundant 100000: more than the 24 that give every one of "
                                       "the 8 experts a slot on each of the 4 GPUs; a replica past that shares a GPU "
                                       "with another replica of its expert, which moves no load between GPUs\n")
    assert not (tmp_path / "p.yaml").exists()
    assert main(["plan", BUNDLED, "--gpus", "4", "--redundant", "24", "-o", str(tmp_path / "p.yaml")]) == 0
    assert main(["plan", BUNDLED, "--gpus", "1", "--redundant", "1", "-o", str(tmp_path / "q.yaml")]) == 2
    assert "--redundant 1: with one GPU a redundant slot moves no load between GPUs; use 0" in capsys.readouterr().err


def test_a_strategy_option_or_config_value_too_long_or_too_deep_is_one_line(tmp_path, capsys):
    """A strategy option's value and a config value that parse but cannot be shown are one line too."""
    from moe_gps.cli.main import main

    for value in (BIG, "[" * 3000 + "]" * 3000):
        assert main(["simulate", BUNDLED, "--strategies", f"none,dist:ema(alpha={value})", "-o",
                     str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot read the value of option 'alpha'" in err
    cluster = tmp_path / "deep.yaml"
    cluster.write_text("name: c\nnum_gpus: " + "[" * 2000 + "]" * 2000 + "\n")
    assert main(["simulate", BUNDLED, "--cluster", str(cluster), "-o", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_gpus: must be an integer, got [[[[...]]]]" in err, err
    assert not (tmp_path / "s").exists()


def test_more_redundant_slots_than_give_each_expert_one_per_rank_are_refused_before_planning():
    """`num_redundant: 1000000000` made `moe-gps run`'s check plan a placement for hours (EPLB replicates one
    slot at a time); it is refused at once, as `plan --redundant` refuses it."""
    pytest.importorskip("torch")
    from moe_gps.errors import UserError
    from runtime.config import DuplicationSection
    from runtime.duplication import DuplicationPolicy

    cfg = DuplicationSection(num_redundant=1_000_000_000)
    with pytest.raises(UserError, match=r"duplication.num_redundant 1000000000: more than the 8 that give every one "
                                        r"of the 8 experts a slot on each of the 2 ranks"):
        DuplicationPolicy("dist-only", cfg, 2, 4, 8, 2, 512)
