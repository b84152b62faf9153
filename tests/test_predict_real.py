"""Predictors on real router traces (Qwen3 vLLM, FLAME-MoE, Mixtral popularity) and on the
bundled traces/mixtral_mmlu.parquet: the evaluation runs and its numbers are sane.

The real traces are read with the project's importers from ../shared/traces/real; the
tests skip when that folder is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moe_gps.predict import (DEFAULT_DISTRIBUTION, DEFAULT_TOKEN, SyntheticTokenPredictor, evaluate, rollout_tokens,
                             token_hits)
from moe_gps.trace import load_trace

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "traces" / "mixtral_mmlu.parquet"
DECODE = ["1st", "2nd", "3rd", "4th", "5th", "6th", "7th", "8th", "9th", "10th"]


@pytest.fixture(scope="module")
def qwen(real_traces):
    from moe_gps.trace.importers import import_vllm_jsonl
    d = real_traces / "qwen3-30b-a3b-vllm-sharegpt"
    # the real prefill pass of each file (2050 and 2080 tokens): two steps
    return import_vllm_jsonl([d / "token_distri_8.jsonl", d / "token_distri_16.jsonl"], min_tokens=1000,
                             num_layers=48, num_experts=128).trace


@pytest.fixture(scope="module")
def flame(real_traces):
    from moe_gps.trace.importers import import_gate_csv
    d = real_traces / "flame-moe-290m"
    # step 0: prefill (2048 tokens); steps 1-10: the 1st..10th decode positions (64 tokens each)
    return import_gate_csv([d / "prefill"] + [d / "decode" / n for n in DECODE]).trace


@pytest.fixture(scope="module")
def popularity(real_traces):
    from moe_gps.trace.importers import import_popularity_json
    d = real_traces / "mixtral-8x7b-mmlu-popularity" / "mixtral_8x7b_instruct"
    return import_popularity_json(sorted(d.glob("*.json")), top_k=2).trace  # 7 subjects = 7 steps


def _sane(ev, expect_skipped: set[str]):
    skipped = {f"{r.kind}:{r.name}" for r in ev.reports if r.skipped}
    assert skipped == expect_skipped, skipped
    static = ev.reference["static_balancedness"]
    for r in ev.reports:
        if r.skipped:
            continue
        assert r.cost is not None
        o = r.overall
        assert 0 <= o["eps_mean"] <= o["eps_max"] <= o["eps_max_worst"] <= ev.trace["experts"]
        assert 0 <= r.overall["jsd"] <= 1
        assert 0 < r.overall["balancedness"] <= 1
        assert len(r.per_layer["eps_mean"]) == ev.trace["layers"]
        if r.kind == "token":
            assert 0 <= r.overall["exact"] <= r.overall["recall"] <= 1
    for kind in ("distribution", "token"):
        if f"{kind}:oracle" in skipped:
            continue
        o = ev.report("oracle", kind).overall
        assert o["eps_mean"] == 0 and o["eps_max"] == 0 and o["jsd"] == 0
        assert o["balancedness"] >= static
        if kind == "token":
            assert o["top1"] == o["recall"] == o["exact"] == 1


NO_IDS = {"distribution:token-hist", "token:token-id", "token:position"}


def test_qwen3_vllm(qwen):
    assert (qwen.num_steps, qwen.meta.num_layers, qwen.meta.num_experts, qwen.meta.top_k) == (2, 48, 128, 8)
    tok = [n for n in DEFAULT_TOKEN if n != "mlp"]  # the mlp runs in the FLAME test (time)
    ev = evaluate(qwen, DEFAULT_DISTRIBUTION, tok, train_steps=1, synthetic=[0.9])
    _sane(ev, NO_IDS)
    # measured: prev-layer top-k recall 0.23 vs 0.08 for the most frequent experts
    assert ev.report("prev-layer").overall["recall"] > 2 * ev.report("most-frequent").overall["recall"]
    assert abs(ev.report("synthetic").overall["recall"] - 0.9) <= 0.01


def test_flame(flame):
    assert (flame.num_steps, flame.meta.num_layers, flame.meta.num_experts, flame.meta.top_k) == (11, 8, 64, 6)
    pytest.importorskip("torch")
    ev = evaluate(flame, train_steps=1, synthetic=[0.6])
    _sane(ev, NO_IDS)
    recall = {r.name: r.overall.get("recall") for r in ev.reports if r.kind == "token" and not r.skipped}
    # measured: prev-layer 0.41, mlp 0.41, most-frequent 0.10
    assert recall["prev-layer"] > 2 * recall["most-frequent"]
    assert recall["mlp"] > 2 * recall["most-frequent"]
    assert abs(recall["synthetic"] - 0.6) <= 0.01


@pytest.mark.parametrize("placement", ["optimistic", "typical", "pessimistic"])
@pytest.mark.parametrize("accuracy", [0.5, 0.9])
def test_synthetic_accuracy_on_real_traces(qwen, flame, accuracy, placement):
    for trace in (qwen, flame):
        pred = rollout_tokens(SyntheticTokenPredictor(accuracy, placement=placement, seed=7), trace, 1)
        hits = token_hits(pred, trace.experts[trace.step_offsets[1]:])
        assert abs(hits["recall"].mean() - accuracy) <= 0.01
        srt = np.sort(pred, axis=-1)
        assert not (srt[..., 1:] == srt[..., :-1]).any()


def test_mixtral_popularity_counts(popularity):
    """A counts trace: distribution predictors run, token predictors are skipped."""
    ev = evaluate(popularity, train_steps=3)
    token_names = {f"token:{r.name}" for r in ev.reports if r.kind == "token"}
    _sane(ev, token_names | {"distribution:token-hist"})
    # a profile of three MMLU subjects predicts the other four better than any single subject does
    assert ev.report("profile").overall["eps_mean"] < ev.report("previous").overall["eps_mean"]


def test_bundled_mixtral_mmlu():
    if not BUNDLED.exists():
        pytest.skip(f"{BUNDLED} not present")
    pytest.importorskip("torch")
    trace = load_trace(BUNDLED)
    ev = evaluate(trace, train_steps=32, synthetic=[0.9])
    _sane(ev, set())
    r = {x.name + ":" + x.kind[0]: x.overall for x in ev.reports}
    # cross-layer correlation by construction (layer_affinity > 0): prev-layer beats most-frequent
    assert r["prev-layer:t"]["recall"] > r["most-frequent:t"]["recall"] + 0.03
    assert r["token-id:t"]["recall"] > r["most-frequent:t"]["recall"]
    assert abs(r["synthetic:t"]["recall"] - 0.9) <= 0.01
    # every real distribution predictor plans better than no duplication at all
    for name in ("profile", "previous", "window", "ema", "kalman", "token-hist"):
        assert r[name + ":d"]["balancedness"] > ev.reference["static_balancedness"]
