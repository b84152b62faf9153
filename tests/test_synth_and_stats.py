"""Synthetic profiles have the statistics they claim; trace statistics match hand computations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe_gps.cli.main import main
from moe_gps.errors import UserError
from moe_gps.trace import load_trace
from moe_gps.trace.stats import gini, js_divergence, mode_hit_rate, skewness, summarize, top_share
from moe_gps.trace.synth import synthesize


def test_skewness_gini_share_by_hand():
    c = np.array([1, 1, 2])
    assert skewness(c) == pytest.approx(2 / (4 / 3))
    assert top_share(c) == pytest.approx(0.5)
    # Gini of (1, 1, 2): mean absolute difference / (2 * mean) = (2 * (0 + 1 + 1)) / 9 / (2 * 4/3)
    pairs = np.abs(c[:, None] - c[None, :]).sum() / 9
    assert gini(c) == pytest.approx(pairs / (2 * c.mean()))
    assert gini(np.array([5, 5, 5, 5])) == pytest.approx(0.0)


def test_js_divergence_bounds():
    assert js_divergence([1, 0], [1, 0]) == pytest.approx(0.0)
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    # hand value: p=(1/2,1/2), q=(1,0): m=(3/4,1/4)
    p, q, m = np.array([.5, .5]), np.array([1., 0.]), np.array([.75, .25])
    want = 0.5 * (p * np.log2(p / m)).sum() + 0.5 * (1 * np.log2(1 / .75))
    assert js_divergence(p, q) == pytest.approx(want)


def test_mode_hit_rate_perfect_and_none():
    g = np.random.default_rng(0).integers(0, 4, size=(400, 1))
    hit, base = mode_hit_rate(g, (g + 1) % 4)
    assert hit[0] == pytest.approx(1.0)
    assert base[0] == pytest.approx(np.bincount(g[:, 0]).max() / 400, abs=0.05)
    # a target unrelated to the group: no better than the baseline
    noise = np.random.default_rng(1).integers(0, 4, size=(400, 1))
    hit, base = mode_hit_rate(g, noise)
    assert hit[0] < base[0] + 0.05


def layer_stats(trace):
    return summarize(trace).overall()


@pytest.fixture(scope="module")
def mixtral_runs():
    return [layer_stats(synthesize("mixtral-mmlu", num_steps=32, seed=s)) for s in range(3)]


def test_mixtral_profile_skew_matches_published(mixtral_runs):
    for o in mixtral_runs:
        # Mixtral 8x7B on MMLU: paper 1.39; fiddler per-subject mean 1.22-1.45, worst layer 1.4-2.0
        assert 1.28 <= o["skewness"] <= 1.45
        assert 1.5 <= o["skewness_worst_layer"] <= 2.1


def test_mixtral_profile_shape_and_label():
    t = synthesize("mixtral-mmlu", num_steps=2, tokens_per_step=64)
    assert (t.meta.num_layers, t.meta.num_experts, t.meta.top_k) == (32, 8, 2)
    assert t.meta.source == "synthetic"
    assert "SYNTHETIC" in t.meta.provenance["note"]
    assert t.token_id is not None and t.seq is not None and t.pos is not None


def test_sst2_profile_is_more_skewed():
    o = layer_stats(synthesize("sst2", num_steps=32, seed=0))
    assert 1.8 <= o["skewness"] <= 2.2   # paper: 1.99 on SST2


def test_layer_affinity_parameter_controls_correlation(mixtral_runs):
    for o in mixtral_runs:
        assert o["affinity_next"] > o["affinity_baseline"] + 0.1
    off = layer_stats(synthesize("mixtral-mmlu", num_steps=16, layer_affinity=0.0))
    assert off["affinity_next"] < off["affinity_baseline"] + 0.05


def test_token_affinity_parameter_controls_predictability(mixtral_runs):
    for o in mixtral_runs:
        assert o["affinity_token_id"] > o["affinity_baseline"] + 0.1
    off = layer_stats(synthesize("mixtral-mmlu", num_steps=16, token_affinity=0.0, layer_affinity=0.0))
    assert off["affinity_token_id"] < off["affinity_baseline"] + 0.05


def test_drift_parameter_controls_step_to_step_change():
    calm = layer_stats(synthesize("mixtral-mmlu", num_steps=16, drift=0.0))["drift_jsd"]
    moving = layer_stats(synthesize("mixtral-mmlu", num_steps=16, drift=0.5))["drift_jsd"]
    assert moving > 3 * calm


def test_deterministic_per_seed():
    a = synthesize("mixtral-mmlu", num_steps=3, tokens_per_step=100, seed=7)
    b = synthesize("mixtral-mmlu", num_steps=3, tokens_per_step=100, seed=7)
    c = synthesize("mixtral-mmlu", num_steps=3, tokens_per_step=100, seed=8)
    np.testing.assert_array_equal(a.experts, b.experts)
    assert not np.array_equal(a.experts, c.experts)


def test_bad_profile_parameters():
    with pytest.raises(UserError, match="unknown synthetic profile 'nope'"):
        synthesize("nope")
    with pytest.raises(UserError, match="unknown synthetic profile parameter"):
        synthesize("mixtral-mmlu", colour=3)
    with pytest.raises(UserError, match="drift_memory must be in"):
        synthesize("mixtral-mmlu", drift_memory=1.0)


def test_synth_and_inspect_cli(tmp_path, capsys):
    out = tmp_path / "s.parquet"
    assert main(["trace", "synth", "--profile", "sst2", "--steps", "4", "--tokens", "128",
                 "--set", "layer_affinity=0", "-o", str(out)]) == 0
    trace = load_trace(out)
    assert trace.meta.provenance["profile"]["layer_affinity"] == 0
    capsys.readouterr()
    assert main(["trace", "inspect", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_steps"] == 4 and data["num_layers"] == 32 and len(data["layers"]) == 32
    counts = trace.counts().sum(axis=0)
    assert data["layers"][5]["skewness"] == pytest.approx(counts[5].max() / counts[5].mean())
    assert main(["trace", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "32 layers x 8 experts, top-2; 4 steps, 512 tokens" in text


def test_synth_bad_set_flag(tmp_path, capsys):
    assert main(["trace", "synth", "--set", "drift", "-o", str(tmp_path / "x.parquet")]) == 2
    assert "expected PARAM=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists()


def test_bundled_default_trace_is_labelled_synthetic():
    from pathlib import Path
    trace = load_trace(Path(__file__).resolve().parents[1] / "traces" / "mixtral_mmlu.parquet")
    assert trace.meta.source == "synthetic"
    assert trace.num_steps >= 64 and trace.tokens_per_step.min() >= 512
    o = summarize(trace).overall()
    assert 1.28 <= o["skewness"] <= 1.45


@pytest.mark.parametrize("setting, message", [
    ("num_layers=2.5", "num_layers must be an integer"),
    ("drift=nan", "drift must be a finite number"),
    ("popularity_sigma=inf", "popularity_sigma must be a finite number"),
    ("num_layers=four", "--set 'num_layers=four': num_layers must be an integer, got 'four'"),
    ("drift=fast", "--set 'drift=fast': drift must be a number, got 'fast'"),
    ("model=", "synthetic profile: model must be a non-empty string, got ''"),
    ("colour=3", "unknown synthetic profile parameter(s) colour (parameters: name, model"),
])
def test_synth_bad_set_values_are_one_line(tmp_path, capsys, setting, message):
    assert main(["trace", "synth", "--steps", "2", "--tokens", "8", "--set", setting,
                 "-o", str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-gps: error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "x.parquet").exists()


def test_synth_set_text_fields_stay_text(tmp_path, capsys):
    out = tmp_path / "t.parquet"
    assert main(["trace", "synth", "--steps", "2", "--tokens", "8", "--set", "model=3", "--set", "dataset=1e3",
                 "--set", "num_layers=2", "-o", str(out)]) == 0
    meta = load_trace(out).meta
    assert meta.model == "3" and meta.dataset == "1e3" and meta.num_layers == 2
    assert meta.provenance["profile"]["model"] == "3"
    assert "mixtral" not in capsys.readouterr().err


def test_synth_set_numbers_take_the_field_type():
    from moe_gps.trace.synth import parse_setting
    assert parse_setting("model=3") == ("model", "3")
    assert parse_setting("num_layers=4") == ("num_layers", 4)
    assert parse_setting("drift=1") == ("drift", 1.0) and isinstance(parse_setting("drift=1")[1], float)
    assert parse_setting("calibrated_to=a=b") == ("calibrated_to", "a=b")


def test_synthesize_rejects_a_non_string_text_field():
    with pytest.raises(UserError, match=r"synthetic profile: model must be a non-empty string, got 3$"):
        synthesize("mixtral-mmlu", num_steps=1, tokens_per_step=4, model=3)
    with pytest.raises(UserError, match="dataset must be a non-empty string, got ''"):
        synthesize("mixtral-mmlu", num_steps=1, tokens_per_step=4, dataset="")

