"""What a user sees is true and traceable: predict evaluate's provenance, simulate --json's warnings,
the scaling warning's noise clause, the timeline figure's title, and a --num-layers that cuts passes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex

import numpy as np
import pytest
import yaml

from moe_gps.cli.main import main
from moe_gps.config import AttentionSpec, ModelConfig, dump_yaml
from moe_gps.trace import write_trace
from moe_gps.trace.importers import import_vllm_jsonl
from moe_gps.trace.regroup import regroup_or_scale
from moe_gps.trace.synth import synthesize

MODEL = ModelConfig(name="mixtral-4l", num_layers=4, num_experts=8, top_k=2, hidden_size=4096,
                    moe_intermediate_size=14336, attention=AttentionSpec(num_heads=32, num_kv_heads=8, head_dim=128))


@pytest.fixture(scope="module")
def trace():
    return synthesize("mixtral-mmlu", num_steps=10, tokens_per_step=100, seed=2, num_layers=4)


@pytest.fixture
def trace_file(trace, tmp_path):
    path = tmp_path / "small.parquet"
    write_trace(path, trace)
    return path


# --------------------------------------------------------------------------- predict evaluate: provenance

def test_predict_outputs_record_where_their_numbers_come_from(trace_file, tmp_path, capsys):
    out = tmp_path / "res"
    argv = ["predict", "evaluate", str(trace_file), "--tokens-per-step", "200", "--predictors", "ema,token:oracle",
            "--synthetic", "0.7", "--seed", "5", "--per-layer", "none", "-o", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    note = "regrouped the trace's 10 steps of 100 tokens into 5 steps of 200, in trace order"
    assert note in text and "predict_config.yaml" in text
    data = json.loads((out / "predict.json").read_text())
    run = data["run"]
    assert run["trace"] == str(trace_file)
    assert run["trace_sha256"] == hashlib.sha256(trace_file.read_bytes()).hexdigest()
    assert run["seed"] == 5 and run["tokens_per_step"] == 200 and run["regrouped"] == note
    assert run["predictors"] == "ema,token:oracle" and run["synthetic"] == "0.7" and run["gpus"] == 4
    assert run["moe_gps_version"] and len(run["code_digest"]) == 16
    assert data["trace"]["steps"] == 5 and data["trace"]["tokens"] == 1000
    # the config file: the same record, under the rerun command and the version, code and trace checksum
    config = (out / "predict_config.yaml").read_text()
    first, second = config.splitlines()[:2]
    assert first.startswith("# moe-gps predict evaluate") and run["command"] in first
    assert f"sha256 {run['trace_sha256']}" in second and run["code_digest"] in second
    assert yaml.safe_load(config) == run
    # the recorded command reruns it to the same numbers
    words = shlex.split(run["command"])
    assert words[:3] == ["moe-gps", "predict", "evaluate"] and "--tokens-per-step" in words
    words[words.index("-o") + 1] = str(tmp_path / "again")
    assert main(words[1:] + ["--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [(p["label"], p["overall"], p["per_layer"]) for p in again["predictors"]] == [
        (p["label"], p["overall"], p["per_layer"]) for p in data["predictors"]]
    assert again["run"]["trace_sha256"] == run["trace_sha256"]


# --------------------------------------------------------------------------- simulate --json: warnings

def test_simulate_json_keeps_the_warnings(trace_file, tmp_path, capsys):
    model = tmp_path / "m.yaml"
    model.write_text(dump_yaml(MODEL))
    argv = ["simulate", str(trace_file), "--model", str(model), "--strategies", "none,eplb", "--no-plots",
            "--tokens-per-step", "200"]                  # 1000 tokens: 5 steps of 200, too few to regroup
    assert main(argv + ["-o", str(tmp_path / "t")]) == 0
    table = capsys.readouterr().out
    assert "warning: --tokens-per-step 200: the trace holds 1000 tokens" in table
    assert main(argv + ["--json", "-o", str(tmp_path / "j")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["warnings"]) == 1 and doc["warnings"][0].startswith("--tokens-per-step 200: the trace holds")
    assert doc["assumptions"] == "realistic"
    assert f"warning: {doc['warnings'][0]}" in table


# --------------------------------------------------------------------------- scaling: sampling noise

def test_scaling_warning_speaks_of_the_small_and_the_large_steps(trace):
    # 20, 20 and 960 tokens (mean 333) scaled to 100: the small steps keep their noise, the large one has less
    uneven = dataclasses.replace(trace, step_offsets=np.array([0, 20, 40, 1000]))
    same, note, warning = regroup_or_scale(uneven, 100)
    assert same is uneven and note is None
    assert "keeps the sampling noise of the steps smaller than 100 tokens" in warning
    assert "the larger ones less sampling noise than a real step of 100 tokens" in warning
    _, _, up = regroup_or_scale(uneven, 5000)                         # every step smaller
    assert "keeps the sampling noise of the smaller step" in up and "less sampling noise" not in up
    larger = dataclasses.replace(trace, step_offsets=np.array([0, 100, 250, 1000]))
    _, _, down = regroup_or_scale(larger, 90)                         # every step larger (11 steps of 90)
    assert "less sampling noise than a real step of 90 tokens" in down and "keeps" not in down


# --------------------------------------------------------------------------- timeline.png: the title

def _timeline_data(panels: int, gpus: int = 4):
    from sim.plots import PlotData

    timeline = {}
    for s in range(panels):
        rows = [("link", g, "copy", 0.0, 3e-4, 0, 0) for g in range(gpus)]
        for g in range(gpus):
            t = 0.0
            for layer in range(4):
                for what in ("predictor + attention", "dispatch", "expert FFN", "combine"):
                    rows.append(("gpu", g, what, t, t + 1e-4, layer, 0))
                    t += 1e-4
        timeline[f"strategy {s}"] = rows
    return PlotData(names=list(timeline), kinds=["none"] * panels, phase_means={}, gpu_skew=np.zeros((panels, 1)),
                    expert_skew=np.zeros(1), step_latency=np.zeros((panels, 1)), title="", model="mixtral-8x7b",
                    cluster="4xA100-nvlink", num_gpus=gpus, timeline=timeline)


@pytest.mark.parametrize("panels", [1, 8])
def test_timeline_title_and_legend_stay_clear_of_the_panels(panels, tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import sim.plots as plots

    boxes = {}
    save = plots.save_png

    def spy(fig, path):                                   # the figure as saved, before it is closed
        written = save(fig, path)
        renderer = fig.canvas.get_renderer()
        boxes.update(title=fig._suptitle.get_window_extent(renderer),
                     legend=fig.legends[0].get_window_extent(renderer),
                     panels=[ax.get_tightbbox(renderer) for ax in fig.axes])   # with titles and tick labels
        return written

    monkeypatch.setattr(plots, "save_png", spy)
    assert plots._timeline(_timeline_data(panels), tmp_path / "timeline.png").is_file()
    assert len(boxes["panels"]) == panels
    for box in boxes["panels"]:
        assert not boxes["title"].overlaps(box) and boxes["title"].y0 >= box.y1
        assert not boxes["legend"].overlaps(box) and boxes["legend"].y1 <= box.y0


# --------------------------------------------------------------------------- vllm-jsonl: --num-layers too small

def _write_passes(path, tokens: list[int], layers: int, experts: int = 6):
    rng = np.random.default_rng(0)
    lines = [json.dumps({"topk_ids": np.argsort(rng.random((t, experts)), axis=1)[:, :2].tolist()})
             for t in tokens for _ in range(layers)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_vllm_jsonl_warns_when_num_layers_cuts_every_pass(tmp_path, capsys):
    src = _write_passes(tmp_path / "calls.jsonl", [3, 5, 3, 7], layers=4)
    out = tmp_path / "t.parquet"
    assert main(["trace", "import", "--from", "vllm-jsonl", str(src), "--num-layers", "2", "--num-experts", "6",
                 "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moe-gps: warning: with --num-layers 2 ")
    assert "the model likely has 4 MoE layers (give --num-layers 4 if so)" in err
    import_vllm_jsonl([src], num_layers=1, num_experts=6)          # each pass cut into 4
    assert "likely has 4 MoE layers" in capsys.readouterr().err
    import_vllm_jsonl([src], num_layers=4, num_experts=6)          # the true count: no warning
    assert capsys.readouterr().err == ""
    same = _write_passes(tmp_path / "same.jsonl", [4, 4], layers=4)
    import_vllm_jsonl([same], num_layers=2, num_experts=6)         # one T throughout: the file cannot tell
    assert capsys.readouterr().err == ""
