"""The deployment flags simulate and recommend share: one definition, one way to become configs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moe_gps.cli.common_args import DEPLOYMENT_DESTS, DEFAULT_CLUSTER, deployment_from_args
from moe_gps.cli.main import build_parser, main
from moe_gps.cli.simulate_cmd import build_config
from moe_gps.config import dump_yaml, load_cluster
from moe_gps.trace import write_trace
from moe_gps.trace.synth import synthesize

from test_recommend import MODEL  # Mixtral-sized layers, 4 of them, like the trace below


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("common_args")
    trace = synthesize("mixtral-mmlu", num_steps=8, tokens_per_step=64, seed=2, num_layers=4)
    write_trace(d / "t.parquet", trace)
    (d / "model.yaml").write_text(dump_yaml(MODEL))
    (d / "workload.yaml").write_text("phase: decode\nseq_len: 2048\ntokens_per_step: 128\n")
    return d, trace


def _subparser(command: str):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices[command]


def _deployment_actions(command: str) -> list[tuple]:
    return [(a.dest, tuple(a.option_strings), a.type, a.default, a.choices, a.metavar, a.help)
            for a in _subparser(command)._actions if a.dest in DEPLOYMENT_DESTS]


def test_simulate_and_recommend_define_the_same_flags():
    sim, rec = _deployment_actions("simulate"), _deployment_actions("recommend")
    assert [a[0] for a in sim] == list(DEPLOYMENT_DESTS)
    assert sim == rec
    flags = dict((a[0], a[1]) for a in sim)
    assert flags == {"cluster": ("--cluster",), "model": ("--model",), "workload": ("--workload",),
                     "phase": ("--phase",), "seq_len": ("--seq-len",), "tokens_per_step": ("--tokens-per-step",)}
    assert all(a[3] is None for a in sim)  # no default in the parser: None means "not given"


@pytest.mark.parametrize("command", ["simulate", "recommend"])
def test_help_reads_well(command):
    proc = subprocess.run([sys.executable, "-m", "moe_gps.cli.main", command, "--help"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "100"})
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for flag in ("--cluster PRESET|FILE", "--model PRESET|FILE", "--workload FILE", "--phase {prefill,decode}",
                 "--seq-len N", "--tokens-per-step N"):
        assert flag in text
    assert f"(default: {DEFAULT_CLUSTER})" in text and "4xA100-pcie" in text and "mixtral-8x7b" in text


def _args(command: str, d, *extra):
    return build_parser().parse_args([command, str(d / "t.parquet"), "--model", str(d / "model.yaml"), *extra])


def test_both_commands_turn_the_flags_into_the_same_configs(files):
    d, trace = files
    extra = ["--cluster", "8xH100-nvlink", "--workload", str(d / "workload.yaml"), "--phase", "prefill",
             "--seq-len", "256", "--tokens-per-step", "512"]
    cluster, model, workload, _ = deployment_from_args(_args("recommend", d, *extra), trace)
    cfg, _, _ = build_config(_args("simulate", d, *extra, "--strategies", "none"), trace)
    assert (cfg.cluster, cfg.model, cfg.workload) == (cluster, model, workload)
    assert cluster == load_cluster("8xH100-nvlink") and model == MODEL
    # the workload file's fields, each overridden by its flag
    assert (workload.phase, workload.seq_len, workload.tokens_per_step) == ("prefill", 256, 512)
    # without flags: the file as written; without a file: the defaults, with the default cluster
    _, _, w, _ = deployment_from_args(_args("recommend", d, "--workload", str(d / "workload.yaml")), trace)
    assert (w.phase, w.seq_len, w.tokens_per_step) == ("decode", 2048, 128)
    c, _, w, _ = deployment_from_args(_args("recommend", d), trace)
    assert c == load_cluster(DEFAULT_CLUSTER) and (w.phase, w.seq_len, w.tokens_per_step) == ("prefill", 512, None)


def test_simulate_config_file_takes_the_workload_overrides(files, tmp_path):
    d, trace = files
    cfg, _, _ = build_config(_args("simulate", d, "--strategies", "none", "--seq-len", "64"), trace)
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg))
    args = build_parser().parse_args(["simulate", str(d / "t.parquet"), "--config", str(tmp_path / "config.yaml"),
                                      "--phase", "decode", "--tokens-per-step", "32"])
    again, _, _ = build_config(args, trace)
    assert (again.workload.phase, again.workload.seq_len, again.workload.tokens_per_step) == ("decode", 64, 32)
    assert again.cluster == cfg.cluster and again.model == cfg.model


@pytest.mark.parametrize("command", ["simulate", "recommend"])
@pytest.mark.parametrize("flag, message", [
    (["--seq-len", "0"], "--seq-len must be in [1, 100000000] tokens, got 0"),
    (["--tokens-per-step", "-3"], "--tokens-per-step must be >= 1, got -3"),
])
def test_bad_workload_flags_are_one_line_exit_2(files, capsys, command, flag, message):
    d, _ = files
    out = d / f"never-{command}"
    code = main([command, str(d / "t.parquet"), "--model", str(d / "model.yaml"), *flag, "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err == f"moe-gps: error: {message}\n"
    assert not out.exists()


@pytest.mark.parametrize("command", ["simulate", "recommend"])
def test_model_not_inferable_names_the_trace(files, capsys, command):
    d, _ = files
    code = main([command, str(d / "t.parquet"), "-o", str(d / f"never2-{command}")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"{d / 't.parquet'}: cannot tell the model from the trace metadata (model 'mixtral-8x7b', 4 layers" in err
    assert "give --model PRESET|FILE" in err


def test_a_trace_of_a_presets_shape_under_another_name_is_told_that_preset(tmp_path):
    """A trace imported without --model (model 'unknown') of a preset's shape: the error names the preset."""
    import argparse
    from types import SimpleNamespace

    from moe_gps.cli.common_args import model_from_args
    from moe_gps.errors import UserError
    from moe_gps.trace.meta import TraceMeta

    args = argparse.Namespace(model=None, trace="q.parquet")
    qwen = SimpleNamespace(meta=TraceMeta(kind="counts", num_layers=48, num_experts=128, top_k=8))
    with pytest.raises(UserError, match=r"q.parquet: cannot tell the model .*; give --model PRESET\|FILE \(the "
                                        r"preset qwen3-30b-a3b has that shape\)$"):
        model_from_args(args, qwen)
    odd = SimpleNamespace(meta=TraceMeta(kind="counts", num_layers=5, num_experts=128, top_k=8))
    with pytest.raises(UserError, match=r"give --model PRESET\|FILE$"):
        model_from_args(args, odd)
