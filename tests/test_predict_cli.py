"""`moe-gps predict evaluate` and `moe-gps predict list`."""

from __future__ import annotations

import csv
import json

import pytest

from moe_gps.cli.main import build_parser, main
from moe_gps.predict import DISTRIBUTION_PREDICTORS, TOKEN_PREDICTORS
from moe_gps.trace import CountsTrace, TraceMeta, write_trace
from moe_gps.trace.synth import synthesize


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("predict") / "small.parquet"
    write_trace(path, synthesize("mixtral-mmlu", num_steps=8, tokens_per_step=128, num_layers=4, seed=1))
    return path


@pytest.fixture(scope="module")
def counts_file(tmp_path_factory):
    tr = synthesize("mixtral-mmlu", num_steps=8, tokens_per_step=128, num_layers=4, seed=1)
    m = tr.meta
    path = tmp_path_factory.mktemp("predict") / "counts.parquet"
    write_trace(path, CountsTrace(TraceMeta(kind="counts", num_layers=m.num_layers, num_experts=m.num_experts,
                                            top_k=m.top_k), tr.counts()))
    return path


def test_help_says_what_each_predictor_uses_and_costs(capsys):
    with pytest.raises(SystemExit) as ex:
        build_parser().parse_args(["predict", "evaluate", "--help"])
    assert ex.value.code == 0
    out = capsys.readouterr().out
    for name, cls in list(DISTRIBUTION_PREDICTORS.items()) + list(TOKEN_PREDICTORS.items()):
        assert f"    {name}\n" in out
    assert out.count("uses: ") == len(DISTRIBUTION_PREDICTORS) + len(TOKEN_PREDICTORS)
    assert out.count("cost: ") == len(DISTRIBUTION_PREDICTORS) + len(TOKEN_PREDICTORS)
    assert "previous layer" in out and "FLOPs" in out


def test_evaluate_table(trace_file, capsys):
    code = main(["predict", "evaluate", str(trace_file), "--train-steps", "4",
                 "--predictors", "ema,profile,oracle,prev-layer,most-frequent", "--synthetic", "0.8",
                 "--per-layer", "recall,balancedness"])
    assert code == 0
    out = capsys.readouterr().out
    assert "Distribution-only predictors" in out and "Token-to-expert predictors" in out
    assert "fit on steps 0-3, tested on steps 4-7 (4 steps)" in out
    assert "Per layer: recall" in out and "Per layer: balancedness" in out
    assert "synthetic(a=0.8,typical)" in out
    lines = [l for l in out.splitlines() if l.startswith("prev-layer ")]
    assert len(lines) == 1


def test_evaluate_json_and_files(trace_file, tmp_path, capsys):
    out_dir = tmp_path / "res"
    code = main(["predict", "evaluate", str(trace_file), "--predictors", "ema,token:oracle,d:oracle,previous",
                 "--json", "--out", str(out_dir), "--mode", "offline"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["train_steps"] == 4 and data["test_steps"] == 4
    reps = {(p["kind"], p["name"]): p for p in data["predictors"]}
    assert set(reps) == {("distribution", "ema"), ("distribution", "oracle"), ("distribution", "previous"),
                         ("token", "oracle")}
    assert reps[("distribution", "ema")]["mode"] == "offline"
    assert reps[("token", "oracle")]["overall"]["recall"] == 1.0
    assert reps[("distribution", "oracle")]["overall"]["eps_mean"] == 0.0
    assert "flops_per_token" in reps[("distribution", "ema")]["cost"]
    assert json.loads((out_dir / "predict.json").read_text()) == data
    rows = list(csv.DictReader((out_dir / "predict_summary.csv").open()))
    assert {r["name"] for r in rows} == {"ema", "oracle", "previous"}
    layer_rows = list(csv.DictReader((out_dir / "predict_per_layer.csv").open()))
    assert len(layer_rows) == 4 * 4  # 4 predictors x 4 layers


def test_counts_trace_skips_token_predictors(counts_file, capsys):
    code = main(["predict", "evaluate", str(counts_file), "--predictors", "ema,prev-layer"])
    assert code == 0
    out = capsys.readouterr().out
    assert "skipped token predictor prev-layer" in out and "counts trace" in out
    assert main(["predict", "evaluate", str(counts_file)]) == 0  # defaults: only distribution predictors
    out = capsys.readouterr().out
    assert "Distribution-only predictors" in out and "Token-to-expert" not in out
    assert "token-to-expert predictors not run: this is a counts trace" in out


@pytest.mark.parametrize("argv, message", [
    (["--predictors", "crystal-ball"], "unknown predictor 'crystal-ball'"),
    (["--train-steps", "8"], "train steps must be between 1 and 7"),
    (["--synthetic", "1.5"], "--synthetic: accuracy must be in [0, 1]"),
    (["--per-layer", "speed"], "--per-layer: unknown metric"),
    (["--redundant", "3"], "do not divide evenly"),
    (["--synthetic", "0.9", "--overhead-curve", "1"], "--overhead-curve: expected SCALE,RATE"),
    (["--algorithm", "magic"], "unknown placement algorithm 'magic'"),
    (["--gpus", "0"], "--gpus must be >= 1"),
])
def test_user_errors_are_one_line(trace_file, capsys, argv, message):
    code = main(["predict", "evaluate", str(trace_file)] + argv)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-gps: error: ") and message in err and err.count("\n") == 1


def test_missing_file(tmp_path, capsys):
    assert main(["predict", "evaluate", str(tmp_path / "nope.parquet")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_list(capsys):
    assert main(["predict", "list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["distribution"]) == set(DISTRIBUTION_PREDICTORS)
    assert set(data["token"]) == set(TOKEN_PREDICTORS)
    assert all(v["uses"] and v["cost"] for kind in data.values() for v in kind.values())
