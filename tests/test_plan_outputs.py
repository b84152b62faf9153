"""``moe-gps plan``: output paths that would overwrite the trace or each other, and non-finite numbers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from moe_gps.cli.main import main
from moe_gps.trace import CountsTrace, TraceMeta, write_trace


@pytest.fixture(scope="module")
def source_trace(tmp_path_factory) -> Path:
    """4 steps x 4 layers x 8 experts, top-2, skewed loads."""
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.full(8, 2.0), size=4)
    counts = np.stack([[rng.multinomial(512, p[l]) for l in range(4)] for _ in range(4)])
    meta = TraceMeta(kind="counts", num_layers=4, num_experts=8, top_k=2, model="test-moe", dataset="unit",
                     source="synthetic")
    path = tmp_path_factory.mktemp("source") / "counts.parquet"
    write_trace(path, CountsTrace(meta, counts.astype(np.int64)))
    return path


@pytest.fixture
def trace(source_trace, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the trace in the test's folder, which is also the working folder."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "trace.parquet"
    shutil.copyfile(source_trace, path)
    return path


def refused(args: list[str], capsys, *words: str) -> str:
    """Run ``moe-gps plan``; assert exit 2 and one stderr line holding ``words``; return that line."""
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for w in words:
        assert w in err[0], err[0]
    return err[0]


def test_plan_refuses_output_over_the_trace(trace, capsys):
    before = trace.read_bytes()
    refused(["trace.parquet", "--gpus", "4", "-o", "trace.parquet"], capsys, "-o trace.parquet", "input trace")
    assert trace.read_bytes() == before


def test_plan_refuses_export_over_the_trace_in_another_spelling(trace, tmp_path, capsys):
    before = trace.read_bytes()
    (tmp_path / "sub").mkdir()
    refused([str(trace), "--gpus", "4", "--num-hidden-layers", "4", "--sglang", "sub/../trace.parquet",
             "-o", "p.yaml"], capsys, "--sglang sub/../trace.parquet", "input trace")
    assert trace.read_bytes() == before
    assert not (tmp_path / "p.yaml").exists()


def test_plan_refuses_output_hard_linked_to_the_trace(trace, tmp_path, capsys):
    os.link(trace, tmp_path / "link.parquet")
    before = trace.read_bytes()
    refused(["trace.parquet", "--gpus", "4", "-o", "link.parquet"], capsys, "-o link.parquet", "input trace")
    assert trace.read_bytes() == before


def test_plan_refuses_export_over_the_plan(trace, tmp_path, capsys):
    before = trace.read_bytes()
    refused(["trace.parquet", "--gpus", "4", "--num-hidden-layers", "4", "--sglang", "p.yaml",
             "-o", str(tmp_path / "p.yaml")], capsys, "--sglang p.yaml", "-o")
    assert trace.read_bytes() == before
    assert not (tmp_path / "p.yaml").exists()


def test_plan_refuses_two_exports_to_one_file(trace, tmp_path, capsys):
    (tmp_path / "ex.json").write_text("kept\n")
    refused(["trace.parquet", "--gpus", "4", "--vllm", "ex.json", "--vllm-ascend", "ex.json", "-o", "p.yaml"],
            capsys, "--vllm-ascend ex.json", "--vllm")
    assert (tmp_path / "ex.json").read_text() == "kept\n"
    assert not (tmp_path / "p.yaml").exists()


def test_plan_refuses_export_over_the_previous_plan(trace, tmp_path, capsys):
    assert main(["plan", "trace.parquet", "--gpus", "4", "-o", "first.yaml"]) == 0
    capsys.readouterr()
    before = (tmp_path / "first.yaml").read_bytes()
    refused(["trace.parquet", "--gpus", "4", "--previous", "first.yaml", "--vllm", "first.yaml", "-o", "p.yaml"],
            capsys, "--vllm first.yaml", "--previous")
    assert (tmp_path / "first.yaml").read_bytes() == before


def test_plan_output_may_be_the_previous_plan_which_it_replaces(trace, tmp_path, capsys):
    """-o naming the --previous plan re-plans in place: the placement in force is read first."""
    assert main(["plan", "trace.parquet", "--gpus", "4", "--redundant", "4", "--steps", "0:1", "-o", "p.yaml"]) == 0
    before = (tmp_path / "p.yaml").read_bytes()
    assert main(["plan", "trace.parquet", "--gpus", "4", "--redundant", "4", "--algorithm", "waterfill",
                 "--previous", "p.yaml", "-o", "p.yaml"]) == 0
    assert "experts moved vs --previous" in capsys.readouterr().out
    after = (tmp_path / "p.yaml").read_bytes()
    assert after != before
    assert main(["plan", "trace.parquet", "--gpus", "4", "--redundant", "4", "--algorithm", "waterfill",
                 "--previous", "p.yaml", "-o", "again.yaml"]) == 0


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e308", "1e-12", "0"])
def test_plan_refuses_expert_mib_that_is_not_a_size(trace, tmp_path, capsys, value):
    before = trace.read_bytes()
    refused(["trace.parquet", "--gpus", "4", f"--expert-mib={value}", "-o", "p.yaml"], capsys, "--expert-mib")
    assert trace.read_bytes() == before
    assert not (tmp_path / "p.yaml").exists()


@pytest.mark.parametrize("algorithm", ["greedy", "waterfill"])
@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_plan_refuses_threshold_that_is_not_finite(trace, tmp_path, capsys, algorithm, value):
    before = trace.read_bytes()
    refused(["trace.parquet", "--gpus", "4", "--redundant", "4", "--algorithm", algorithm, f"--threshold={value}",
             "-o", "p.yaml"], capsys, "--threshold", "must be >= 0 and finite")
    assert trace.read_bytes() == before
    assert not (tmp_path / "p.yaml").exists()


def test_plan_still_writes_every_output_to_its_own_file(trace, tmp_path, capsys):
    assert main(["plan", "trace.parquet", "--gpus", "4", "--redundant", "4", "--algorithm", "greedy",
                 "--threshold", "0.1", "--expert-mib", "336", "--vllm", "v.json", "--vllm-ascend", "a.json",
                 "-o", "p.yaml"]) == 0
    assert all((tmp_path / f).is_file() for f in ("p.yaml", "v.json", "a.json"))
    assert "wrote p.yaml, v.json (vllm), a.json (vllm-ascend)" in capsys.readouterr().out


def test_plan_yaml_records_the_traces_contents_and_the_version(trace, capsys):
    """Like every other output, plan.yaml names the trace's sha256 and the moe-gps version, not only its path."""
    import hashlib

    import yaml

    from moe_gps import __version__

    assert main(["plan", str(trace), "--gpus", "2", "--redundant", "2", "-o", "plan.yaml"]) == 0
    meta = yaml.safe_load(Path("plan.yaml").read_text())["meta"]
    assert meta["trace_sha256"] == hashlib.sha256(trace.read_bytes()).hexdigest()
    assert meta["moe_gps_version"] == __version__
