"""Command-line flags: a bad value is one line naming the flag (exit 2) before any work, nothing silently
ignored or dropped, help that says what the code does, and progress bars on a terminal only."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml

from moe_gps.cli.main import main
from moe_gps.trace import write_trace
from moe_gps.trace.synth import synthesize

from conftest import one_line

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = str(ROOT / "traces" / "mixtral_mmlu.parquet")          # 64 steps x 512 tokens, 8 experts
RUN_YAML = str(ROOT / "runtime" / "examples" / "run.yaml")
HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="the runtime commands need torch")


def help_text(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as ex:
        main(argv + ["--help"])
    assert ex.value.code == 0
    return " ".join(capsys.readouterr().out.split())          # words joined as one line


def option_help(text: str, option: str, chars: int = 400) -> str:
    """The help of ``option`` (e.g. '--seed SEED') in a help text: what follows its last mention."""
    return text.rsplit(option, 1)[1][:chars]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> str:
    """8 steps x 32 tokens, 4 layers x 8 experts, top-2, with token ids."""
    path = tmp_path_factory.mktemp("small") / "small.parquet"
    write_trace(path, synthesize("mixtral-mmlu", num_steps=8, tokens_per_step=32, seed=1, num_layers=4))
    return str(path)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def no_ranks(monkeypatch):
    """Fail a test that starts ranks (calibration, runtime runs, torchrun)."""
    def started(*a, **k):
        raise AssertionError("ranks were started")

    import moe_gps.fidelity.calibrate as cal
    from moe_gps import signals
    monkeypatch.setattr(cal, "run_benchmarks", started)
    monkeypatch.setattr(signals, "run_child", started)
    if HAS_TORCH:
        import runtime.validate as val
        monkeypatch.setattr(val, "run_runtime", started)


@pytest.fixture
def two_cores(monkeypatch):
    import moe_gps.cli.common_args as common
    monkeypatch.setattr(common, "cpu_cores", lambda: 2)


@pytest.fixture
def one_gpu(monkeypatch):
    """torch sees one GPU."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


# --------------------------------------------------------------------------- 1. record --seed

def test_record_refuses_a_negative_seed_in_one_line(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    # checked before the checkpoint loads: no checkpoint is needed to see it
    code = main(["record", "--model", str(tmp_path / "no-checkpoint"), "-o", str(tmp_path / "r.parquet"),
                 "--seed", "-1"])
    one_line(capsys, code, "--seed must be >= 0, got -1")
    assert not (tmp_path / "r.parquet").exists()
    assert "(default: 0)" in option_help(help_text(capsys, ["record"]), "--seed SEED", 200)


# --------------------------------------------------------------------------- 2. --device cuda without a GPU

@needs_torch
def test_calibrate_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys, no_ranks):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    code = main(["calibrate", "--device", "cuda", "-o", str(tmp_path / "c.yaml")])
    one_line(capsys, code, "--device cuda: torch sees no GPU")


@needs_torch
def test_validate_run_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys, no_ranks):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    doc = yaml.safe_load(Path(RUN_YAML).read_text())
    doc["input"]["trace"] = BUNDLED
    doc["run"]["device"] = "cuda"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    code = main(["validate", BUNDLED, "--config", str(cfg), "-o", str(tmp_path / "v")])
    one_line(capsys, code, "run.device cuda: torch sees no GPU")
    assert not (tmp_path / "v").exists()


# --------------------------------------------------------------------------- 3. validate: flags before anything

@needs_torch
@pytest.mark.parametrize("flags, words", [
    (["--attempts", "0"], ["--attempts must be at least 1"]),
    (["--repeats", "2"], ["--repeats must be at least 3"]),
])
def test_validate_checks_flags_before_printing_or_creating(tmp_path, capsys, no_ranks, flags, words):
    out = tmp_path / "vnew"
    code = main(["validate", BUNDLED, "--config", RUN_YAML, *flags, "-o", str(out)])
    one_line(capsys, code, *words)                   # the only line: no "validate: calibrating ..."
    assert not out.exists()


@needs_torch
@pytest.mark.parametrize("flags, named", [
    (["--quick"], "--quick"), (["--repeats", "5"], "--repeats"), (["--attempts", "2"], "--attempts"),
    (["--quick", "--attempts", "2"], "--quick and --attempts"),
])
def test_validate_refuses_calibration_flags_with_cluster(tmp_path, capsys, no_ranks, flags, named):
    code = main(["validate", BUNDLED, "--config", RUN_YAML, "--cluster", str(tmp_path / "cluster.yaml"), *flags,
                 "-o", str(tmp_path / "v")])
    one_line(capsys, code, "applies to the calibration, which --cluster replaces", f"drop {named} or --cluster")
    assert not (tmp_path / "v").exists()


@needs_torch
def test_validate_and_calibrate_refuse_to_write_over_their_inputs_before_any_rank_starts(tmp_path, capsys,
                                                                                        no_ranks):
    """A TRACE inside the folder of a run that validate writes again (runs/N2-off/trace.parquet), and a
    calibration written over its own --config: the run config was replaced and the ranks failed with only
    torchrun's summary to show for it."""
    import shutil

    out = tmp_path / "v"
    trace = out / "runs" / "N2-off" / "trace.parquet"
    trace.parent.mkdir(parents=True)
    shutil.copy(BUNDLED, trace)
    code = main(["validate", str(trace), "--config", RUN_YAML, "--strategies", "off", "-o", str(out)])
    one_line(capsys, code, f"{trace}: validate would write over its input {trace}; write to another folder (-o)")
    assert sorted(p.name for p in out.rglob("*")) == ["N2-off", "runs", "trace.parquet"]
    code = main(["validate", BUNDLED, "--config", RUN_YAML, "--strategies", ",", "-o", str(tmp_path / "w")])
    one_line(capsys, code, "--strategies: no strategy named")          # was a ZeroDivisionError
    code = main(["validate", BUNDLED, "--config", RUN_YAML, "--cluster", "4xA100-nvlink", "--nproc", "4",
                 "-o", str(tmp_path / "w")])
    one_line(capsys, code, "--cluster 4xA100-nvlink: a preset describes GPUs, not the ranks validate runs")
    config = tmp_path / "cal.yaml"
    config.write_text(Path(RUN_YAML).read_text())
    code = main(["calibrate", "--config", str(config), "-o", str(config), "--quick"])
    one_line(capsys, code, f"{config}: the calibration would write over its --config {config}")
    assert config.read_text() == Path(RUN_YAML).read_text()


@needs_torch
def test_validate_calibrates_on_the_device_its_runs_use(tmp_path, monkeypatch):
    """The calibrations ran on the CPU (calibrate's default) even where the runs went to the GPUs."""
    import runtime.validate as val

    seen = []

    def calibrate(run_cfg, n, path, **kw):
        seen.append(kw.get("device"))
        raise val.MeasurementFailed("stop here")

    monkeypatch.setattr(val, "calibrate", calibrate)
    opt = val.ValidateOptions(trace=BUNDLED, config=RUN_YAML, out=tmp_path / "v", strategies=["off"], device="cuda")
    with pytest.raises(val.MeasurementFailed):
        val.validate(opt)
    import torch
    opt = val.ValidateOptions(trace=BUNDLED, config=RUN_YAML, out=tmp_path / "w", strategies=["off"])
    with pytest.raises(val.MeasurementFailed):
        val.validate(opt)                                       # run.device auto: what this machine has
    assert seen == ["cuda", "cuda" if torch.cuda.is_available() else "cpu"]


@needs_torch
def test_a_validation_that_fails_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    """The runs write in place: an earlier validation's files are set aside and come back when the new one
    fails (it left the earlier report beside new runs and a new run config)."""
    import runtime.validate as val

    out = tmp_path / "v"
    earlier = {"summary.txt": "earlier report", "fidelity.csv": "a\n1\n", "runs/run.yaml": "earlier config",
               "runs/N2-off/trace.parquet": "earlier run", "cluster-2.yaml": "earlier cluster",
               "notes.txt": "the user's own file"}
    for rel, text in earlier.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)

    def calibrate(run_cfg, n, path, **kw):
        Path(path).write_text("half a new calibration")
        raise val.MeasurementFailed("the machine was busy")

    monkeypatch.setattr(val, "calibrate", calibrate)
    with pytest.raises(val.MeasurementFailed):
        val.validate(val.ValidateOptions(trace=BUNDLED, config=RUN_YAML, out=out, strategies=["off"]))
    assert {str(p.relative_to(out)): p.read_text() for p in out.rglob("*") if p.is_file()} == earlier


@needs_torch
def test_an_earlier_validations_extra_runs_and_calibrations_are_named(tmp_path):
    """Runs and calibrations an earlier validation made with more rounds or strategies stay beside this one's:
    validate names them, so that runs/ is not read as this report's."""
    import runtime.validate as val

    out = tmp_path / "v"
    for rel in ("runs/N2-off-0", "runs/N2-off-1", "runs/N2-off-2", "runs/N2-static-0", "runs/N4-off-0",
                "runs/mine"):
        (out / rel).mkdir(parents=True)
    for name in ("cluster-2-0.yaml", "cluster-2-2.yaml", "cluster-2-2.model.yaml", "cluster-x.yaml"):
        (out / name).write_text("")
    opt = val.ValidateOptions(trace=BUNDLED, config=RUN_YAML, out=out, nprocs=[2], strategies=["off"], runs=2)
    assert val.earlier_outputs(opt) == ["cluster-2-2.yaml", "runs/N2-off-2", "runs/N2-static-0", "runs/N4-off-0"]
    with_cluster = val.ValidateOptions(trace=BUNDLED, config=RUN_YAML, out=out, nprocs=[2], strategies=["off"],
                                       runs=2, cluster=str(out / "cluster-2-2.yaml"))      # the one it reads
    assert val.earlier_outputs(with_cluster) == ["cluster-2-0.yaml", "runs/N2-off-2", "runs/N2-static-0",
                                                 "runs/N4-off-0"]


# --------------------------------------------------------------------------- 4. --nproc limits

@needs_torch
@pytest.mark.parametrize("argv", [
    ["calibrate", "--nproc", "17", "--device", "cpu", "-o", "{tmp}/c.yaml"],
    ["validate", BUNDLED, "--config", RUN_YAML, "--nproc", "2", "17", "-o", "{tmp}/v"],
    ["run", "--config", RUN_YAML, "--duplication", "off", "--nproc", "17", "--device", "cpu", "-o", "{tmp}/r"],
])
def test_nproc_above_eight_ranks_per_core_is_refused(tmp_path, capsys, no_ranks, two_cores, argv):
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    one_line(capsys, code, "--nproc 17: more than 8 ranks per CPU core (2 core(s) here: at most 16)")
    assert list(tmp_path.iterdir()) == []


@needs_torch
@pytest.mark.parametrize("argv", [
    ["calibrate", "--nproc", "2", "--device", "cuda", "-o", "{tmp}/c.yaml"],
    ["run", "--config", RUN_YAML, "--duplication", "off", "--nproc", "2", "--device", "cuda", "-o", "{tmp}/r"],
])
def test_nproc_above_the_gpus_is_refused(tmp_path, capsys, no_ranks, one_gpu, argv):
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    one_line(capsys, code, "--nproc 2: more ranks than the 1 GPU(s) torch sees")


# --------------------------------------------------------------------------- 5. progress and disk space

@pytest.mark.parametrize("kind", ["tokens", "counts"])
def test_trace_synth_shows_progress_on_a_terminal_only(tmp_path, capsys, monkeypatch, kind):
    argv = ["trace", "synth", "--kind", kind, "--steps", "3", "--tokens", "16", "--set", "num_layers=2"]
    assert main(argv + ["-o", str(tmp_path / "pipe.parquet")]) == 0
    assert capsys.readouterr().err == ""                             # stderr not a terminal: no bar
    term = FakeTerminal()
    monkeypatch.setattr("sys.stderr", term)
    assert main(argv + ["-o", str(tmp_path / "tty.parquet")]) == 0
    assert "synth:" in term.getvalue() and "step" in term.getvalue()


def test_trace_inspect_shows_progress_on_a_terminal_only(small, capsys, monkeypatch):
    assert main(["trace", "inspect", small]) == 0
    assert capsys.readouterr().err == ""
    term = FakeTerminal()
    monkeypatch.setattr("sys.stderr", term)
    assert main(["trace", "inspect", small]) == 0
    assert "inspect:" in term.getvalue() and "layer" in term.getvalue()


def test_counts_trace_larger_than_the_free_disk_is_refused(tmp_path, capsys, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "c.parquet"
    code = main(["trace", "synth", "--kind", "counts", "--steps", "100", "--tokens", "8", "-o", str(out)])
    # 100 steps x 32 layers x 8 experts x 8 bytes = 204800 bytes = 200 KiB
    one_line(capsys, code, "--steps 100 --tokens-per-step 8: the counts take 200.00 KiB before compression",
             "100 steps x 32 layers x 8 experts x 8 bytes", "at least 12.50 KiB compressed",
             "more than the 1000 B free in")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 6. messages that name the flag

@pytest.mark.parametrize("argv, words", [
    (["plan", "{small}", "--gpus", "0"], "--gpus must be at least 1, got 0"),
    (["plan", "{small}", "--gpus", "4", "--redundant", "-1"], "--redundant must be >= 0, got -1"),
    (["plan", "{small}", "--gpus", "4", "--nodes", "0"], "--nodes must be at least 1, got 0"),
    (["plan", "{small}", "--gpus", "4", "--groups", "0"], "--groups must be at least 1, got 0"),
    (["plan", "{small}", "--gpus", "4", "--max-slots-per-gpu", "0"], "--max-slots-per-gpu must be at least 1"),
    (["plan", "{small}", "--gpus", "4", "--max-slots-per-gpu", "1"],
     "--max-slots-per-gpu 1: 8 experts + 0 redundant = 8 slots over 4 GPUs is 2 slots per GPU, more than the "
     "capacity of 1"),
    (["plan", "{small}", "--gpus", "4", "--algorithm", "greedy", "--max-copies", "-1"],
     "--max-copies must be >= 0, got -1"),
    (["plan", "{small}", "--gpus", "4", "--redundant", "4", "--sglang", "{tmp}/s.json", "--num-hidden-layers", "4",
      "--ep-num-redundant-experts", "-4"], "--ep-num-redundant-experts must be >= 0, got -4"),   # was: use -4
    (["predict", "evaluate", "{small}", "--synthetic", "0.9", "--synthetic-flops", "nan"],
     "--synthetic-flops must be a finite number >= 0, got nan"),          # named the predictor, not the flag
    (["predict", "evaluate", "{small}", "--synthetic", ","], "--synthetic: no accuracy named, got ','"),
    (["predict", "evaluate", "{small}", "--redundant", "-1"], "--redundant must be >= 0, got -1"),
    (["predict", "evaluate", "{small}", "--train-steps", "0"], "--train-steps must be at least 1, got 0"),
    (["predict", "evaluate", "{small}", "--train-steps", "8"],
     "--train-steps 8: train steps must be between 1 and 7 for a trace of 8 steps"),
    (["predict", "evaluate", "{small}", "--tokens-per-step", "100000"],
     "--tokens-per-step 100000: the trace holds 256 tokens, fewer than one step of 100000"),
    (["trace", "rechunk", "{small}", "--tokens-per-step", "100000", "-o", "{tmp}/r.parquet"],
     "--tokens-per-step 100000: the trace holds 256 tokens, fewer than one step of 100000"),
    (["trace", "synth", "--steps", "0", "-o", "{tmp}/s.parquet"], "--steps must be at least 1, got 0"),
    (["trace", "synth", "--tokens", "0", "-o", "{tmp}/s.parquet"], "--tokens-per-step must be at least 1, got 0"),
    (["serve", BUNDLED, "--train-steps", "64", "--no-plots", "-o", "{tmp}/sv"],
     "--train-steps 64 leaves no trace step to route the requests' tokens: the trace has 64 steps"),
])
def test_bad_values_name_their_flag(small, tmp_path, capsys, argv, words):
    argv = argv + (["-o", "{tmp}/p.yaml"] if argv[0] == "plan" else [])
    code = main([a.replace("{small}", small).replace("{tmp}", str(tmp_path)) for a in argv])
    one_line(capsys, code, words)
    assert list(tmp_path.iterdir()) == []


def test_counts_rechunk_refusal_names_the_flag(tmp_path, capsys):
    src = tmp_path / "c.parquet"
    assert main(["trace", "synth", "--kind", "counts", "--steps", "4", "--tokens", "8", "-o", str(src)]) == 0
    capsys.readouterr()
    code = main(["trace", "rechunk", str(src), "--tokens-per-step", "12", "-o", str(tmp_path / "r.parquet")])
    one_line(capsys, code, "--tokens-per-step 12: a counts trace regroups only into whole multiples")


# --------------------------------------------------------------------------- 7. flags silently ignored

def test_predict_placement_needs_synthetic(small, capsys):
    code = main(["predict", "evaluate", small, "--predictors", "ema", "--placement", "optimistic"])
    one_line(capsys, code, "--placement", "give --synthetic too")
    # with --synthetic it applies, and is recorded as before
    assert main(["predict", "evaluate", small, "--predictors", "ema", "--synthetic", "0.9", "--placement",
                 "optimistic", "--per-layer", "none", "--json"]) == 0
    run = json.loads(capsys.readouterr().out)["run"]
    assert run["placement"] == "optimistic" and "--placement optimistic" in run["command"]
    assert main(["predict", "evaluate", small, "--predictors", "ema", "--per-layer", "none", "--json"]) == 0
    run = json.loads(capsys.readouterr().out)["run"]
    assert run["placement"] is None and "--placement" not in run["command"]   # the recorded command reruns


@pytest.mark.parametrize("flags, words", [
    (["--nodes", "2"], "--nodes 2 --groups 1: the hierarchical EPLB packs whole expert groups onto nodes"),
    (["--nodes", "2", "--groups", "3"], "--groups must be a multiple of --nodes"),
    (["--nodes", "2", "--groups", "6"], "--groups 6: the trace's 8 experts do not divide into 6 groups"),
    (["--nodes", "3", "--groups", "3"], "--gpus 4: 4 GPUs do not divide over --nodes 3"),
    (["--groups", "2"], "--groups 2: expert groups apply to the hierarchical EPLB only"),
])
def test_plan_refuses_node_and_group_settings_eplb_cannot_honour(small, tmp_path, capsys, flags, words):
    code = main(["plan", small, "--gpus", "4", "--redundant", "4", *flags, "-o", str(tmp_path / "p.yaml")])
    one_line(capsys, code, words)
    assert not (tmp_path / "p.yaml").exists()


def test_plan_hierarchical_runs_when_asked(small, tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert main(["plan", small, "--gpus", "4", "--redundant", "4", "--nodes", "2", "--groups", "4", "-o",
                 str(out)]) == 0
    assert "variant=hierarchical" in capsys.readouterr().out
    assert yaml.safe_load(out.read_text())["meta"]["options"]["variant"] == "hierarchical"
    assert "--groups a multiple of --nodes" in help_text(capsys, ["plan"])


# --------------------------------------------------------------------------- 8. help and config text

def test_serve_help_says_what_min_gain_and_window_do(capsys):
    text = help_text(capsys, ["serve"])
    gain = option_help(text, "--min-gain X")
    assert "0 with --assumptions paper)" not in gain and "the oracle keeping 1" in gain
    assert "iterations between re-plan checks" in text
    window = option_help(text, "--window W", 200)
    assert window.strip().startswith("trace steps of history")


@needs_torch
def test_calibrate_repeats_error_says_means(tmp_path, capsys, no_ranks):
    code = main(["calibrate", "--repeats", "2", "-o", str(tmp_path / "c.yaml")])
    err = one_line(capsys, code, "--repeats must be at least 3", "mean")
    assert "median" not in err
    assert "mean over them" in help_text(capsys, ["calibrate"])


def test_import_top_k_help_names_gate_csv(capsys):
    top_k = option_help(help_text(capsys, ["trace", "import"]), "--top-k TOP_K")
    assert "gate-csv" in top_k


def test_readme_command_table_lists_predict_list():
    table = (ROOT / "README.md").read_text().split("## Commands", 1)[1].split("\n\n", 2)[1]
    assert "| `moe-gps predict list`" in table


def test_serve_config_writes_cv_only_for_gamma_arrivals():
    from moe_gps.config.loader import to_dict
    from moe_gps.config.serving import ArrivalSpec, load_request_workload

    assert to_dict(ArrivalSpec()) == {"process": "poisson"}
    assert to_dict(load_request_workload("chat").arrival) == {"process": "poisson"}
    assert ArrivalSpec(process="gamma").cv == 2.0 and ArrivalSpec(process="gamma", cv=3.0).cv == 3.0
    assert to_dict(ArrivalSpec(process="gamma")) == {"process": "gamma", "cv": 2.0}


# --------------------------------------------------------------------------- 9. trace outputs end in .parquet

@pytest.mark.parametrize("argv, words", [
    (["trace", "synth", "--steps", "2", "--tokens", "8", "-o", "{tmp}/x.csv"], "-o {tmp}/x.csv: a trace is written"),
    (["trace", "rechunk", "{small}", "--tokens-per-step", "64", "-o", "{tmp}/x.csv"], "a trace is written as Parquet"),
    (["trace", "import", "--from", "popularity-json", "{tmp}/pop.json", "--top-k", "2", "-o", "{tmp}/x.csv"],
     "give a file name ending in .parquet"),
    (["plan", "{small}", "--gpus", "4", "-o", "{tmp}/x.csv"], "the placement is written as YAML"),
])
def test_outputs_must_be_named_for_their_format(small, tmp_path, capsys, argv, words):
    (tmp_path / "pop.json").write_text(json.dumps({"expert_popularity": [[3, 1, 2, 2]]}))
    code = main([a.replace("{small}", small).replace("{tmp}", str(tmp_path)) for a in argv])
    one_line(capsys, code, words.replace("{tmp}", str(tmp_path)))
    assert not (tmp_path / "x.csv").exists()


# --------------------------------------------------------------------------- 10. values named twice

def test_serve_notes_a_rate_named_twice(tmp_path, capsys):
    out = tmp_path / "sv"
    assert main(["serve", BUNDLED, "--rates", "5", "10", "5", "--requests", "5", "--strategies", "none",
                 "--no-plots", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert err == "moe-gps: note: --rates names 5 more than once; each rate runs once\n"
    assert yaml.safe_load((out / "config.yaml").read_text())["rates"] == [5.0, 10.0]
    # a config file's rates likewise: each runs once, with the note naming the file's key
    doc = yaml.safe_load((out / "config.yaml").read_text())
    doc["rates"] = [20.0, 20, 10]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    assert main(["serve", BUNDLED, "--config", str(tmp_path / "c.yaml"), "--no-plots", "-o", str(tmp_path / "c")]) == 0
    err = capsys.readouterr().err
    assert f"moe-gps: note: {tmp_path / 'c.yaml'}: rates names 20 more than once; each rate runs once" in err
    import pandas as pd
    summary = pd.read_csv(tmp_path / "c" / "summary.csv")
    assert sorted(summary.rate_rps) == [10.0, 20.0]


@pytest.mark.parametrize("steps, note", [
    ("0,0,0", "--steps names step 0 more than once"),
    ("0:4,2:6,5", "--steps names steps 2-3,5 more than once"),
])
def test_plan_notes_a_step_named_twice(small, tmp_path, capsys, steps, note):
    assert main(["plan", small, "--gpus", "4", "--steps", steps, "-o", str(tmp_path / "p.yaml")]) == 0
    assert capsys.readouterr().err == f"moe-gps: note: {note}; the loads of every step are summed once\n"
    assert main(["plan", small, "--gpus", "4", "--steps", "0:4,6", "-o", str(tmp_path / "q.yaml")]) == 0
    assert capsys.readouterr().err == ""


def test_simulate_train_steps_name_the_flag_and_strategies_named_twice_run_once(tmp_path, capsys):
    trace = BUNDLED
    assert main(["simulate", trace, "--train-steps", "64", "-o", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err == ("moe-gps: error: --train-steps 64 leaves no step to simulate: the trace has 64 "
                                       "steps; use at most 63\n")
    assert not (tmp_path / "a").exists()
    assert main(["simulate", trace, "--strategies", "none", "eplb", "none", "--no-plots", "--json",
                 "-o", str(tmp_path / "b")]) == 0
    out, err = capsys.readouterr()
    assert "moe-gps: note: --strategies names none more than once; each runs once" in err
    assert [s["strategy"] for s in json.loads(out)["strategies"]] == ["none", "eplb"]


@pytest.mark.parametrize("command", [["serve", BUNDLED, "--rates", "20", "--requests", "10"],
                                     ["simulate", BUNDLED, "-j", "1"]])
def test_a_run_without_none_says_why_there_is_no_verdict(tmp_path, capsys, command):
    assert main(command + ["--strategies", "eplb", "--no-plots", "-o", str(tmp_path / "sv")]) == 0
    out = capsys.readouterr().out
    assert "verdict" not in out.replace("no verdict", "")
    assert "note: no verdict: it compares every strategy with none (no duplication), which the strategies run " \
           "leave out (add none to --strategies)" in out


def test_serve_out_of_memory_names_the_request_count(tmp_path, capsys, monkeypatch):
    import sim.serving.run

    def short(*a, **k):
        raise MemoryError("Unable to allocate 7.45 GiB for an array")

    monkeypatch.setattr(sim.serving.run, "serve", short)
    code = main(["serve", BUNDLED, "--rates", "20", "--requests", "1000000000", "--strategies", "none", "--no-plots",
                 "-o", str(tmp_path / "sv")])
    err = capsys.readouterr().err
    assert code == 2 and err == ("moe-gps: error: 1000000000 requests per rate (--requests, workload.num_requests): "
                                 "out of memory (Unable to allocate 7.45 GiB for an array); make the input or the "
                                 "numbers that size it smaller\n")
    assert not (tmp_path / "sv").exists()


@pytest.mark.parametrize("argv, named", [
    (["recommend", BUNDLED, "-o", ""], "argument -o/--output"),
    (["recommend", BUNDLED, "--cluster="], "argument --cluster"),
    (["recommend", BUNDLED, "--model", " "], "argument --model"),
    (["serve", BUNDLED, "--workload="], "argument --workload"),
    (["simulate", ""], "argument trace"),
    (["serve", BUNDLED, "--strategies", "eplb", ""], "argument --strategies"),
])
def test_an_empty_value_is_a_usage_error_not_the_default(argv, named, capsys, tmp_path, monkeypatch):
    """-o '' wrote to the default folder and --cluster= ran the default sweep: an empty value read as absent."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as ex:
        main(argv)
    err = capsys.readouterr().err
    assert ex.value.code == 2 and err.count("\n") == 1 and f"{named}: an empty value" in err, err
    assert not list(tmp_path.iterdir())                        # nothing written, e.g. no moe-gps-out/


def test_a_previous_plan_of_another_shape_names_its_file(small, tmp_path, capsys):
    four = tmp_path / "p4.yaml"
    assert main(["plan", small, "--gpus", "4", "--redundant", "4", "-o", str(four)]) == 0
    capsys.readouterr()
    code = main(["plan", small, "--gpus", "8", "--redundant", "8", "--previous", str(four),
                 "-o", str(tmp_path / "p8.yaml")])
    one_line(capsys, code, f"--previous {four}: previous placement is for 4 layers, 8 experts, 4 GPUs")


def test_a_synthetic_accuracy_named_twice_runs_once(small, capsys):
    """Two identical synthetic rows, with the same label, could not be told apart in the CSVs."""
    assert main(["predict", "evaluate", small, "--predictors", "previous", "--synthetic", "0.9,0.9",
                 "--per-layer", "none", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "moe-gps: note: --synthetic names 0.9 more than once; each runs once" in err
    labels = [r["label"] for r in json.loads(out)["predictors"]]
    assert labels == ["previous", "synthetic(a=0.9,typical)"]
