"""Usage errors name the (sub)command that found them; flags are spelled in full; errors from a flag's value
name the flag; the runtime's entry points report usage errors in one line; plan says what balancedness is."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_gps.cli.main import build_parser, main

from conftest import one_line

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = str(ROOT / "traces" / "mixtral_mmlu.parquet")


def usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as ex:
        main(argv)
    return one_line(capsys, ex.value.code)


@pytest.mark.parametrize("argv, command, unknown", [
    (["simulate", "T", "--strategy", "none"], "moe-gps simulate", "--strategy none"),
    (["serve", "T", "--slo-ttft", "5"], "moe-gps serve", "--slo-ttft 5"),
    (["predict", "evaluate", "T", "--foo"], "moe-gps predict evaluate", "--foo"),
    (["trace", "synth", "-o", "x.parquet", "--foo", "1"], "moe-gps trace synth", "--foo 1"),
])
def test_an_unknown_flag_is_an_error_of_the_subcommand(capsys, argv, command, unknown):
    err = usage_error(capsys, argv)
    assert err.startswith(f"moe-gps: error: {command}: unrecognized arguments: {unknown} "), err
    assert err.endswith(f"(see '{command} --help')"), err


def test_an_unknown_flag_before_the_command_is_the_root_parsers(capsys):
    err = usage_error(capsys, ["--foo", "simulate", "T"])
    assert err.startswith("moe-gps: error: moe-gps: unrecognized arguments: --foo"), err


@pytest.mark.parametrize("argv, flag", [
    (["simulate", "T", "--train-step", "4"], "--train-step"),
    (["plan", "T", "--gpus", "4", "-o", "p.yaml", "--step", "0:4"], "--step"),
])
def test_a_flag_must_be_spelled_in_full(capsys, argv, flag):
    err = usage_error(capsys, argv)
    assert f"unrecognized arguments: {flag}" in err, err


@pytest.mark.parametrize("module", ["runtime.launch", "runtime.record_hf"])
def test_the_runtime_entry_points_report_usage_errors_in_one_line(capsys, module):
    import importlib

    mod = importlib.import_module(module)
    with pytest.raises(SystemExit) as ex:
        mod.main(["--bogus"])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"{module}: error: python -m {module}: ") and "usage:" not in err, err
    assert err.strip().endswith(f"(see 'python -m {module} --help')"), err


def test_plan_says_balancedness_is_not_speed(capsys, tmp_path):
    from moe_gps.cli.plan_cmd import BALANCEDNESS_CAVEAT

    assert main(["plan", BUNDLED, "--gpus", "4", "--redundant", "4", "-o", str(tmp_path / "p.yaml")]) == 0
    out = capsys.readouterr().out
    assert BALANCEDNESS_CAVEAT in out.splitlines()
    assert "not speed" in BALANCEDNESS_CAVEAT and "moe-gps simulate" in BALANCEDNESS_CAVEAT


def test_predict_evaluate_lists_its_algorithms_and_checks_them_before_the_trace_loads(capsys):
    from moe_gps.placement import ALGORITHMS

    with pytest.raises(SystemExit):
        main(["predict", "evaluate", "--help"])
    assert "--algorithm {" + ",".join(ALGORITHMS) + "}" in capsys.readouterr().out
    err = one_line(capsys, main(["predict", "evaluate", "no-such-trace.parquet", "--algorithm", "foo"]))
    assert err.startswith("moe-gps: error: --algorithm: unknown placement algorithm 'foo'; choose one of "), err


@pytest.mark.parametrize("argv, start", [
    (["simulate", "{trace}", "--strategies", "foo", "--no-plots"], "moe-gps: error: --strategies: strategy 'foo'"),
    (["simulate", "{trace}", "--cluster", "4xA100", "--no-plots"], "moe-gps: error: --cluster: unknown cluster preset"),
    (["simulate", "{trace}", "--model", "nope", "--no-plots"], "moe-gps: error: --model: unknown model preset"),
    (["simulate", "{trace}", "--workload", "{tmp}/no.yaml", "--no-plots"], "moe-gps: error: --workload: "),
    (["simulate", "{trace}", "--strategies", "none", "--timeline", "99", "--no-plots"],
     "moe-gps: error: --timeline 99: timeline step 99 is not among the simulated steps"),
    (["serve", "{trace}", "--strategies", "bogus", "--no-plots"], "moe-gps: error: --strategies: strategy 'bogus'"),
    (["serve", "{trace}", "--cluster", "4xA100", "--no-plots"], "moe-gps: error: --cluster: unknown cluster preset"),
    (["serve", "{trace}", "--workload", "nope", "--no-plots"], "moe-gps: error: --workload: unknown workload preset"),
    (["recommend", "{trace}", "--cluster", "4xA100"], "moe-gps: error: --cluster: unknown cluster preset"),
    # a predictor unknown, or an option it does not take, is found when the strategy is made: still the flag's
    (["simulate", "{trace}", "--strategies", "none,token:bogus", "--no-plots"],
     "moe-gps: error: --strategies token:bogus: unknown token predictor 'bogus'"),
    (["serve", "{trace}", "--requests", "20", "--strategies", "none,dist:ema(window=0)", "--no-plots"],
     "moe-gps: error: --strategies dist:ema(window=0): distribution predictor 'ema' has no parameter"),
])
def test_an_error_about_a_flags_value_names_the_flag(capsys, tmp_path, argv, start):
    argv = [a.format(trace=BUNDLED, tmp=tmp_path) for a in argv] + ["-o", str(tmp_path / "out")]
    err = one_line(capsys, main(argv))
    assert err.startswith(start), err


@pytest.mark.parametrize("argv, dest, value", [
    (["trace", "synth", "-o", "x.parquet", "--tokens-per-step", "8"], "tokens", 8),
    (["trace", "synth", "-o", "x.parquet", "--tokens", "8"], "tokens", 8),
    (["trace", "import", "x", "--from", "vllm-jsonl", "-o", "y", "--model-name", "M"], "model", "M"),
    (["trace", "import", "x", "--from", "vllm-jsonl", "-o", "y", "--model", "M"], "model", "M"),
    (["plan", "T", "--gpus", "4", "-o", "p.yaml", "--redundant-slots", "4"], "redundant", 4),
    (["plan", "T", "--gpus", "4", "-o", "p.yaml", "--redundant", "4"], "redundant", 4),
    (["predict", "evaluate", "T", "--redundant-slots", "2"], "redundant", 2),
])
def test_flag_names_and_their_aliases(argv, dest, value):
    assert getattr(build_parser().parse_args(argv), dest) == value
