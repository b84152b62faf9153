"""``moe-gps plan``: the command line, files it writes, and its one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe_gps.cli.main import main
from moe_gps.cli.plan_cmd import parse_steps
from moe_gps.errors import UserError
from moe_gps.placement import Placement, balancedness
from moe_gps.trace import CountsTrace, TraceMeta, write_trace


@pytest.fixture(scope="module")
def counts_trace(tmp_path_factory):
    """8 steps x 4 layers x 8 experts, top-2, 256 tokens per step, skewed loads."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(8, 2.0), size=4)                       # per-layer popularity
    counts = np.stack([[rng.multinomial(512, p[l]) for l in range(4)] for _ in range(8)])
    meta = TraceMeta(kind="counts", num_layers=4, num_experts=8, top_k=2, model="test-moe", dataset="unit",
                     source="synthetic")
    path = tmp_path_factory.mktemp("trace") / "counts.parquet"
    write_trace(path, CountsTrace(meta, counts.astype(np.int64)))
    return path, counts


def test_plan_writes_yaml_and_exports(counts_trace, tmp_path, capsys):
    path, counts = counts_trace
    out = tmp_path / "plan.yaml"
    rc = main(["plan", str(path), "--gpus", "4", "--redundant", "4", "--algorithm", "eplb", "--steps", "0:4",
               "-o", str(out), "--sglang", str(tmp_path / "s.json"), "--vllm", str(tmp_path / "v.json"),
               "--vllm-ascend", str(tmp_path / "a.json"), "--expert-mib", "336", "--per-layer"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "balancedness (mean over layers)" in text and "static (none)" in text and "wrote" in text
    p = Placement.load(out)
    loads = counts[:4].sum(axis=0)
    assert p.num_gpus == 4 and p.slots_per_gpu == 3 and p.algorithm == "eplb"
    assert p.meta["steps"] == "0:4" and p.meta["num_steps_used"] == 4 and p.meta["model"] == "test-moe"
    assert p.meta["predicted"]["balancedness"] == pytest.approx(balancedness(p.gpu_loads(loads)).mean())
    assert p.capacity.expert_bytes == 336 * 2**20
    assert json.loads((tmp_path / "s.json").read_text())["physical_to_logical_map"] == p.phy2log.tolist()
    assert json.loads((tmp_path / "v.json").read_text()) == p.phy2log.tolist()
    assert json.loads((tmp_path / "a.json").read_text())["moe_layer_count"] == 4


def test_plan_waterfill_with_previous_json_and_export_note(counts_trace, tmp_path, capsys):
    path, counts = counts_trace
    first = tmp_path / "first.yaml"
    assert main(["plan", str(path), "--gpus", "4", "--redundant", "4", "--steps", "0:4", "-o", str(first)]) == 0
    capsys.readouterr()
    second = tmp_path / "second.yaml"
    rc = main(["plan", str(path), "--gpus", "4", "--redundant", "4", "--algorithm", "waterfill", "--steps", "4:",
               "--previous", str(first), "--expert-mib", "1", "-o", str(second), "--json",
               "--sglang", str(tmp_path / "s.json")])
    assert rc == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["plan"]["experts_moved"] is not None and report["plan"]["bytes_moved"] is not None
    assert report["plan"]["balancedness"] >= report["static"]["balancedness"]
    assert len(report["balancedness_per_layer"]) == 4
    p = Placement.load(second)
    if not p.shares_are_even:
        assert "uneven shares are not in the exported map" in captured.err


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "3"], "8 experts + 0 redundant = 8 slots per layer do not divide evenly over 3 GPUs"),
    (["--gpus", "4", "--steps", "9"], "--steps: step 9 is out of range"),
    (["--gpus", "4", "--steps", "x"], "--steps: cannot read 'x'"),
    (["--gpus", "4", "--algorithm", "none", "--nodes", "2"], "--nodes and --groups apply to --algorithm eplb only"),
    (["--gpus", "4", "--threshold", "0.1"], "--threshold and --max-copies apply to"),
    (["--gpus", "4", "--expert-mib", "-1"], "--expert-mib must be > 0"),
    (["--gpus", "4", "--redundant", "4", "--max-slots-per-gpu", "2"], "more than the capacity of 2"),
    (["--gpus", "4", "--previous", "/nonexistent/plan.yaml"], "no such file"),
])
def test_plan_errors_are_one_line_exit_2(counts_trace, tmp_path, capsys, argv, message):
    path, _ = counts_trace
    rc = main(["plan", str(path), "-o", str(tmp_path / "p.yaml"), *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("moe-gps: error: ") and err.count("\n") == 1
    assert message in err
    assert not (tmp_path / "p.yaml").exists()


def test_plan_missing_trace(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "nope.parquet"), "--gpus", "2", "-o", str(tmp_path / "p.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_parse_steps():
    assert parse_steps("all", 5) == [0, 1, 2, 3, 4]
    assert parse_steps("1:3", 5) == [1, 2]
    assert parse_steps("-2:", 5) == [3, 4]
    assert parse_steps("0,4,0:2", 5) == [0, 1, 4]
    assert parse_steps("-1", 5) == [4]
    with pytest.raises(UserError, match="selects no step"):
        parse_steps("3:3", 5)


def test_plan_bad_export_flags_write_nothing(counts_trace, tmp_path, capsys):
    """An export that cannot be made is a user error found before any file is written."""
    path, _ = counts_trace
    out, vllm = tmp_path / "p.yaml", tmp_path / "v.json"
    rc = main(["plan", str(path), "--gpus", "4", "--redundant", "4", "-o", str(out), "--vllm", str(vllm),
               "--sglang", str(tmp_path / "s.json"), "--num-hidden-layers", "3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("moe-gps: error: sglang export: 4 MoE layers") and err.count("\n") == 1
    assert not out.exists() and not vllm.exists() and not (tmp_path / "s.json").exists()
