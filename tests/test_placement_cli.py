"""``moe-gps plan``: the command line, files it writes, and its one-line errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from moe_gps.cli.main import main
from moe_gps.cli.plan_cmd import parse_steps
from moe_gps.errors import UserError
from moe_gps.placement import balancedness, load_placement
from moe_gps.trace import CountsTrace, TraceMeta, load_trace, write_trace


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
               "--expert-mib", "336", "--per-layer", "--num-hidden-layers", "4"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "balancedness (mean over layers)" in text and "static (none)" in text and "wrote" in text
    assert "balancedness (vLLM: sum mean / sum max)" in text
    assert f"run SGLang with: --ep-size 4 --ep-num-redundant-experts 4 --init-expert-location {tmp_path / 's.json'}" \
        in text
    assert "run vLLM with pull request #49572 (in no vLLM release yet) with: --enable-expert-parallel --enable-eplb " \
           "--eplb-config '{\"num_redundant_experts\": 4, \"initial_expert_map_path\": " in text
    p = load_placement(out)
    loads = counts[:4].sum(axis=0)
    assert p.num_gpus == 4 and p.slots_per_gpu == 3 and p.algorithm == "eplb"
    assert p.meta["steps"] == "0:4" and p.meta["num_steps_used"] == 4 and p.meta["model"] == "test-moe"
    assert p.meta["predicted"]["balancedness"] == pytest.approx(balancedness(p.gpu_loads(loads)).mean())
    assert p.capacity.expert_bytes == 336 * 2**20
    assert json.loads((tmp_path / "s.json").read_text())["physical_to_logical_map"] == p.phy2log.tolist()
    assert json.loads((tmp_path / "v.json").read_text()) == p.phy2log.tolist()
    # vLLM Ascend: from a plan that never puts an expert twice on a GPU, with its eplb_config flags
    capsys.readouterr()
    assert main(["plan", str(path), "--gpus", "4", "--redundant", "4", "--algorithm", "waterfill", "--steps", "0:4",
                 "-o", str(tmp_path / "w.yaml"), "--vllm-ascend", str(tmp_path / "a.json")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["moe_layer_count"] == 4
    assert ("--additional-config '{\"eplb_config\": {\"expert_map_path\": " + json.dumps(str(tmp_path / "a.json"))
            + ', \"num_redundant_experts\": 4}}\'') in capsys.readouterr().out


def test_plan_waterfill_with_previous_json_and_export_note(counts_trace, tmp_path, capsys):
    path, counts = counts_trace
    first = tmp_path / "first.yaml"
    assert main(["plan", str(path), "--gpus", "4", "--redundant", "4", "--steps", "0:4", "-o", str(first)]) == 0
    capsys.readouterr()
    second = tmp_path / "second.yaml"
    rc = main(["plan", str(path), "--gpus", "4", "--redundant", "4", "--algorithm", "waterfill", "--steps", "4:",
               "--previous", str(first), "--expert-mib", "1", "-o", str(second), "--json",
               "--sglang", str(tmp_path / "s.json"), "--first-moe-layer", "1", "--num-hidden-layers", "5"])
    assert rc == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["plan"]["experts_moved"] is not None and report["plan"]["bytes_moved"] is not None
    assert report["plan"]["balancedness"] >= report["static"]["balancedness"]
    assert len(report["balancedness_per_layer"]) == 4
    assert report["decoder_layers"] == {"moe_layer_ids": [1, 2, 3, 4], "num_hidden_layers": 5,
                                        "source": "--first-moe-layer"}
    assert report["exports"][0]["server_flags"].startswith("--ep-size 4 --ep-num-redundant-experts 4 ")
    assert len(json.loads((tmp_path / "s.json").read_text())["physical_to_logical_map"]) == 5
    # an SGLang export: the balancedness under SGLang's static dispatch (a rank's own replica first)
    assert "moe-gps: note: SGLang's static dispatch (on with --init-expert-location) sends a rank's tokens" \
        in captured.err and "this layout gives balancedness " in captured.err
    rc = main(["plan", str(path), "--gpus", "4", "--redundant", "4", "--algorithm", "waterfill", "--steps", "4:",
               "-o", str(tmp_path / "third.yaml"), "--vllm", str(tmp_path / "v.json")])
    err = capsys.readouterr().err
    assert rc == 0 and (("vLLM splits an expert's tokens evenly over its replicas" in err)
                        == (not load_placement(tmp_path / "third.yaml").shares_are_even))
    assert "SGLang" not in err


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
    cut: list[str] = []
    assert parse_steps("0:100,1:3", 5, cut=cut) == [0, 1, 2, 3, 4] and cut == ["0:100"]    # said in a note


def test_plan_says_when_a_step_range_runs_past_the_trace(counts_trace, tmp_path, capsys):
    path, _ = counts_trace
    assert main(["plan", str(path), "--gpus", "4", "--redundant", "4", "--steps", "0:100",
                 "-o", str(tmp_path / "p.yaml")]) == 0
    assert "--steps 0:100 runs past the trace's" in capsys.readouterr().err


def test_plan_bad_export_flags_write_nothing(counts_trace, tmp_path, capsys):
    """An export that cannot be made is a user error found before any file is written."""
    path, _ = counts_trace
    out, vllm = tmp_path / "p.yaml", tmp_path / "v.json"
    rc = main(["plan", str(path), "--gpus", "4", "--redundant", "4", "-o", str(out), "--vllm", str(vllm),
               "--sglang", str(tmp_path / "s.json"), "--num-hidden-layers", "3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == "moe-gps: error: the trace's 4 MoE layers do not fit in 3 decoder layers (--num-hidden-layers " \
                  "is the model's num_hidden_layers, dense layers included)\n"
    assert not out.exists() and not vllm.exists() and not (tmp_path / "s.json").exists()


def _meta_trace(tmp_path, provenance: dict, layers: int = 4):
    rng = np.random.default_rng(1)
    counts = rng.multinomial(64, np.full(8, 1 / 8), size=(2, layers)).astype(np.int64)
    meta = TraceMeta(kind="counts", num_layers=layers, num_experts=8, top_k=2, model="m", dataset="d",
                     source="imported", provenance=provenance)
    path = tmp_path / "t.parquet"
    write_trace(path, CountsTrace(meta, counts))
    return path, counts


def test_plan_sglang_rows_come_from_the_trace_provenance(tmp_path, capsys):
    """A trace that knows its decoder layers (sglang-dump: original_layer_ids of a 6-layer model
    with dense layers 0 and 3) gets one row per decoder layer, each MoE row on its own layer."""
    path, counts = _meta_trace(tmp_path, {"original_layer_ids": [1, 2, 4, 5], "num_hidden_layers": 6})
    rc = main(["plan", str(path), "--gpus", "4", "--redundant", "4", "-o", str(tmp_path / "p.yaml"),
               "--sglang", str(tmp_path / "s.json"), "--sglang-logical-count", str(tmp_path / "lc.json"),
               "--ep-num-redundant-experts", "4"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "sglang rows: 6 decoder layers, the plan's 4 MoE layers on 1-2,4-5 (original_layer_ids" in text
    assert "run SGLang (runs its own EPLB on the counts) with: --ep-size 4 --ep-num-redundant-experts 4 " \
           f"--init-expert-location {tmp_path / 'lc.json'}" in text
    p = load_placement(tmp_path / "p.yaml")
    rows = json.loads((tmp_path / "s.json").read_text())["physical_to_logical_map"]
    assert len(rows) == 6 and [rows[i] for i in (1, 2, 4, 5)] == p.phy2log.tolist()
    assert rows[0] == rows[3] == [s % 8 for s in range(12)]
    lc = json.loads((tmp_path / "lc.json").read_text())
    assert list(lc) == ["logical_count"] and len(lc["logical_count"]) == 6
    assert [lc["logical_count"][i] for i in (1, 2, 4, 5)] == counts.sum(axis=0).tolist()
    assert lc["logical_count"][0] == [0] * 8


@pytest.mark.parametrize("provenance, argv, message", [
    ({}, [], "cannot tell which decoder layers the trace's 4 MoE layers are (its provenance does not say): pass "
             "--num-hidden-layers"),
    ({}, ["--num-hidden-layers", "6"], "the model has 6 decoder layers but the trace 4 MoE layers, and nothing says "
                                       "which ones: pass --first-moe-layer"),
    ({"original_layer_ids": [1, 2, 4, 5]}, [], "are decoder layers 1-2,4-5 (original_layer_ids in the trace's "
                                               "provenance) but nothing says how many"),
    ({"original_layer_ids": [1, 2, 4, 5], "num_hidden_layers": 6}, ["--first-moe-layer", "2"],
     "--first-moe-layer 2 puts the trace's 4 MoE layers on decoder layers 2-5, but the trace says 1-2,4-5"),
    ({"original_layer_ids": [1, 2, 4, 5], "num_hidden_layers": 6}, ["--num-hidden-layers", "7"],
     "--num-hidden-layers 7 differs from the trace's provenance, which says the model has 6 decoder layers"),
    ({"num_hidden_layers": 4}, ["--ep-num-redundant-experts", "8"],
     "--ep-num-redundant-experts 8 differs from the plan's 4 redundant slots per layer"),
])
def test_plan_sglang_refuses_when_it_cannot_know_the_rows(tmp_path, capsys, provenance, argv, message):
    path, _ = _meta_trace(tmp_path, provenance)
    rc = main(["plan", str(path), "--gpus", "4", "--redundant", "4", "-o", str(tmp_path / "p.yaml"),
               "--sglang", str(tmp_path / "s.json"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "p.yaml").exists() and not (tmp_path / "s.json").exists()


def test_plan_record_traces_name_their_moe_modules(tmp_path, capsys):
    """runtime.record_hf writes the MoE modules' names (moe_layers) and num_hidden_layers."""
    path, _ = _meta_trace(tmp_path, {"moe_layers": [f"model.layers.{i}.mlp" for i in (0, 2, 3, 5)],
                                     "num_hidden_layers": 6})
    assert main(["plan", str(path), "--gpus", "4", "-o", str(tmp_path / "p.yaml"),
                 "--sglang", str(tmp_path / "s.json")]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())["physical_to_logical_map"]
    assert len(rows) == 6 and rows[1] == rows[4] == list(range(8))
    assert "(moe_layers (module names) in the trace's provenance)" in capsys.readouterr().out


def test_plan_none_round_robin_layout_and_flag_checks(counts_trace, tmp_path, capsys):
    path, _ = counts_trace
    assert main(["plan", str(path), "--gpus", "4", "--algorithm", "none", "--layout", "round_robin",
                 "-o", str(tmp_path / "p.yaml")]) == 0
    assert load_placement(tmp_path / "p.yaml").phy2log[0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    capsys.readouterr()
    assert main(["plan", str(path), "--gpus", "4", "--layout", "round_robin", "-o", str(tmp_path / "q.yaml")]) == 2
    assert "--layout applies to --algorithm none only" in capsys.readouterr().err
    assert main(["plan", str(path), "--gpus", "4", "--first-moe-layer", "1", "-o", str(tmp_path / "q.yaml")]) == 2
    assert "apply to the --sglang and --sglang-logical-count exports only" in capsys.readouterr().err


def test_plan_says_which_sglang_model_classes_read_the_file_and_warns_for_mixtral(tmp_path, capsys):
    path, _ = _meta_trace(tmp_path, {"num_hidden_layers": 4})
    argv = ["plan", str(path), "--gpus", "4", "--redundant", "4", "-o", str(tmp_path / "p.yaml"),
            "--sglang", str(tmp_path / "s.json")]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "only for a model class that describes its expert layout to SGLang" in out and "warning" not in err
    t = load_trace(path)
    write_trace(path, CountsTrace(dataclasses.replace(t.meta, model="Mixtral-8x7B-v0.1"), t.counts()))
    assert main(argv) == 0
    assert "warning: Mixtral-8x7B-v0.1: SGLang's Mixtral class did not describe its expert layout" in \
        capsys.readouterr().err
