"""Importers: every real sample set in ../shared/traces/real, synthetic HF / SGLang files,
and one test per bad input asserting its message."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_gps.cli.trace_import_cmd import FORMATS as CLI_FORMATS
from moe_gps.cli.trace_import_cmd import register_import
from moe_gps.errors import UserError
from moe_gps.trace import CountsTrace, TokensTrace, load_trace
from moe_gps.trace.importers import (
    FORMATS,
    import_gate_csv,
    import_hf_router_logits,
    import_popularity_json,
    import_sglang_dump,
    import_trace,
    import_vllm_jsonl,
    routing_from_router_logits,
)

QWEN = "qwen3-30b-a3b-vllm-sharegpt"
FLAME = "flame-moe-290m"
MIXTRAL = "mixtral-8x7b-mmlu-popularity"


def skew(counts: np.ndarray) -> np.ndarray:
    """max/mean expert load. counts: [..., experts] -> [...]."""
    return counts.max(axis=-1) / counts.mean(axis=-1)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Call the import handler through a tiny parser, as the `trace` group does."""
    parser = argparse.ArgumentParser(prog="moe-gps trace")
    register_import(parser.add_subparsers())
    args = parser.parse_args(["import", *argv])
    try:
        code = args.func(args)
    except UserError as err:
        print(f"moe-gps: error: {err}", file=sys.stderr)
        code = 2
    out = capsys.readouterr()
    return code, out.out, out.err


def import_wired() -> bool:
    """Whether the lead's `trace` group has registered `import` yet."""
    try:
        from moe_gps.cli.main import build_parser
        build_parser().parse_args(["trace", "import", "--from", "gate-csv", "x", "-o", "y"])
    except (ImportError, SystemExit):
        return False
    return True


def test_cli_formats_match_the_library():
    assert CLI_FORMATS == FORMATS


# --------------------------------------------------------------------------- real traces

@pytest.fixture(scope="module")
def qwen_prefill(real_traces, tmp_path_factory):
    """Both Qwen3 files imported with --min-tokens 100 (the prefill pass only), via the file."""
    out = {}
    for name in ("token_distri_8.jsonl", "token_distri_16.jsonl"):
        path = tmp_path_factory.mktemp("qwen") / "prefill.parquet"
        import_trace("vllm-jsonl", [real_traces / QWEN / name], path, min_tokens=100, model="Qwen3-30B-A3B",
                     num_layers=48, num_experts=128)   # SOURCES.md: 48 MoE layers, 128 experts
        out[name] = load_trace(path)
    return out


@pytest.mark.parametrize("name,tokens", [("token_distri_8.jsonl", 2050), ("token_distri_16.jsonl", 2080)])
def test_qwen3_prefill_shape_matches_sources(qwen_prefill, name, tokens):
    trace = qwen_prefill[name]
    assert isinstance(trace, TokensTrace)
    m = trace.meta
    assert (m.num_layers, m.num_experts, m.top_k) == (48, 128, 8)
    assert trace.tokens_per_step.tolist() == [tokens]
    assert m.source == "imported" and m.model == "Qwen3-30B-A3B"
    assert m.provenance["passes_kept"] == {str(next(iter(m.provenance["passes_in_file"]))): "2"}
    assert m.provenance["num_layers_source"] == "from --num-layers"
    assert trace.weights is None  # the file holds only the weights' shape


@pytest.mark.parametrize("name", ["token_distri_8.jsonl", "token_distri_16.jsonl"])
def test_qwen3_prefill_counts_equal_the_raw_lines(real_traces, qwen_prefill, name):
    """Lines 97..144 (1-based) are the prefill pass: count them independently of the importer."""
    lines = (real_traces / QWEN / name).read_text().splitlines()[96:144]
    expect = np.stack([np.bincount(np.ravel(json.loads(line)["topk_ids"]), minlength=128) for line in lines])
    assert (qwen_prefill[name].counts()[0] == expect).all()
    first = np.asarray(json.loads(lines[0])["topk_ids"])
    assert (qwen_prefill[name].experts[:, 0, :] == first).all()  # layer 0, order as recorded


def test_qwen3_prefill_skew_matches_sources(qwen_prefill):
    """SOURCES.md: per-layer max/mean of about 3x to 8.6x. token_distri_16 lies wholly in
    that range; token_distri_8 has 3 of 48 layers above it (10.3, 11.0, 11.7)."""
    s16 = skew(qwen_prefill["token_distri_16.jsonl"].counts()[0])
    assert 3.0 <= s16.min() and s16.max() <= 8.6
    s8 = skew(qwen_prefill["token_distri_8.jsonl"].counts()[0])
    assert s8.min() >= 3.0
    assert np.mean((s8 >= 3.0) & (s8 <= 8.6)) >= 0.9
    assert 3.0 <= np.median(s8) <= 8.6


def test_qwen3_pass_selection_by_index_and_all_passes(real_traces):
    src = [real_traces / QWEN / "token_distri_8.jsonl"]
    shape = {"num_layers": 48, "num_experts": 128}
    by_index = import_vllm_jsonl(src, passes="2", **shape).trace
    by_size = import_vllm_jsonl(src, min_tokens=100, **shape).trace
    assert (by_index.experts == by_size.experts).all()
    everything = import_vllm_jsonl(src, **shape).trace
    assert everything.tokens_per_step.tolist() == [19, 4, 2050] + [4] * 29
    several = import_vllm_jsonl(src, passes="0,2-3", min_tokens=5, **shape).trace
    with pytest.raises(UserError, match=r"needs --num-layers, the model's MoE layers \(lines per forward pass\); "
                                        r"runs of lines with equal token counts have lengths divisible by 48, so it "
                                        r"is 48 or a divisor of it"):
        import_vllm_jsonl(src, num_experts=128)
    with pytest.raises(UserError, match=r"needs --num-experts, .*; the largest id in the selected passes is 127, so "
                                        r"at least 128"):
        import_vllm_jsonl(src, num_layers=48)
    assert several.tokens_per_step.tolist() == [19, 2050]  # pass 3 has 4 tokens < 5
    assert several.meta.provenance["passes_kept"] == {str(src[0]): "0,2"}


def test_flame_prefill(real_traces, tmp_path):
    out = tmp_path / "flame.parquet"
    import_trace("gate-csv", [real_traces / FLAME / "prefill"], out, model="FLAME-MoE-290M")
    trace = load_trace(out)
    m = trace.meta
    assert (m.num_layers, m.num_experts, m.top_k) == (8, 64, 6)
    assert trace.tokens_per_step.tolist() == [2048]
    assert m.provenance["original_layer_ids"] == [2, 3, 4, 5, 6, 7, 8, 9]
    assert trace.token_id is None  # the CSV token_id is a batch index, not a vocabulary id
    assert (np.diff(trace.weights, axis=2) <= 0).all()  # highest score first
    # Layer 5 (index 3) against the raw CSV: the experts with a non-zero score and their scores.
    csv = next((real_traces / FLAME / "prefill").glob("*layer5_*.csv"))
    raw = np.loadtxt(csv, delimiter=",", skiprows=1)
    raw = raw[np.argsort(raw[:, 1])]
    scores = raw[:, 2:]
    got = np.zeros_like(scores)
    np.put_along_axis(got, trace.experts[:, 3, :].astype(np.int64), trace.weights[:, 3, :], axis=1)
    assert np.allclose(got, scores, atol=1e-6)


def test_flame_decode_steps_in_the_order_given(real_traces):
    names = ["1st", "2nd", "3rd", "4th", "5th", "6th", "7th", "8th", "9th", "10th"]
    trace = import_gate_csv([real_traces / FLAME / "decode" / n for n in names]).trace
    assert trace.tokens_per_step.tolist() == [64] * 10
    assert (trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k) == (8, 64, 6)
    assert [s["source"].rsplit("/", 1)[-1] for s in trace.meta.provenance["steps"]] == names


def test_mixtral_popularity(real_traces, tmp_path):
    for model in ("mixtral_8x7b_original", "mixtral_8x7b_instruct"):
        files = sorted((real_traces / MIXTRAL / model).glob("*.json"))
        out = tmp_path / f"{model}.parquet"
        import_trace("popularity-json", files, out, top_k=2, model=model)
        trace = load_trace(out)
        assert isinstance(trace, CountsTrace)
        m = trace.meta
        assert (m.num_layers, m.num_experts, m.top_k, trace.num_steps) == (32, 8, 2, 7)
        raw = [np.asarray(json.loads(f.read_text())["expert_popularity"]) for f in files]
        assert (trace.counts() == np.stack(raw)).all()
        assert trace.tokens_per_step.tolist() == [int(r[0].sum()) // 2 for r in raw]
        assert m.tokens_per_step == trace.tokens_per_step.tolist()
        assert m.provenance["total_input_tokens"][str(files[0])] == json.loads(files[0].read_text())[
            "total_input_tokens"]
        per_layer = skew(trace.counts())  # [subjects, layers]
        # SOURCES.md: mean per-layer skew 1.22..1.45 per subject, worst layer 1.4..2.0
        assert (per_layer.mean(axis=1) >= 1.215).all() and (per_layer.mean(axis=1) <= 1.455).all()
        assert (per_layer.max(axis=1) >= 1.395).all() and (per_layer.max(axis=1) <= 2.0).all()


# --------------------------------------------------------------------------- HF router logits

def torch_reference(logits: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mixtral's routing in torch: softmax in float, topk, renormalise. logits [L, T, E]."""
    import torch

    p = torch.softmax(torch.from_numpy(logits).float(), dim=-1)
    w, e = torch.topk(p, k, dim=-1)
    if normalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return e.numpy().transpose(1, 0, 2), w.numpy().transpose(1, 0, 2)


@pytest.fixture
def logits() -> np.ndarray:
    """[layers=3, tokens=40, experts=8]"""
    return np.random.default_rng(1).normal(size=(3, 40, 8)).astype(np.float32)


@pytest.mark.parametrize("normalize", [True, False])
def test_routing_from_router_logits_matches_torch(logits, normalize):
    import torch

    e_ref, w_ref = torch_reference(logits, 2, normalize)
    for form in (logits, list(logits), tuple(torch.from_numpy(x) for x in logits), torch.from_numpy(logits)):
        experts, weights = routing_from_router_logits(form, 2, normalize=normalize)
        assert experts.dtype == np.int16 and weights.dtype == np.float32
        assert experts.shape == (40, 3, 2)
        assert (experts == e_ref).all()
        assert np.allclose(weights, w_ref, atol=1e-6)
    if normalize:
        assert np.allclose(weights.sum(axis=2), 1.0, atol=1e-6)


def test_routing_from_router_logits_ties_and_batch_shape():
    x = np.zeros((1, 4), np.float32)  # all equal: lower ids first, equal weights
    experts, weights = routing_from_router_logits([x], 2)
    assert experts[0, 0].tolist() == [0, 1] and np.allclose(weights, 0.5)
    batched = np.random.default_rng(0).normal(size=(2, 3, 5, 8))  # [layers, batch, seq, experts]
    e4, _ = routing_from_router_logits(batched, 2)
    e2, _ = routing_from_router_logits(batched.reshape(2, 15, 8), 2)
    assert e4.shape == (15, 2, 2) and (e4 == e2).all()


def test_routing_from_router_logits_errors():
    x = np.zeros((4, 8), np.float32)
    with pytest.raises(UserError, match=r"top_k=9 must be an integer in \[1, 8\]"):
        routing_from_router_logits([x], 9)
    bad = x.copy()
    bad[2, 5] = np.nan
    with pytest.raises(UserError, match="layer 1, token 2, expert 5: router logit is nan"):
        routing_from_router_logits([x, bad], 2)
    with pytest.raises(UserError, match=r"layer 1 router logits have shape \[3, 8\] but layer 0 has \[4, 8\]"):
        routing_from_router_logits([x, x[:3]], 2)


def test_hf_npz_per_layer_and_stacked_with_input_ids(logits, tmp_path):
    np.savez(tmp_path / "a.npz", *logits, input_ids=np.arange(100, 140).reshape(2, 20))
    np.savez(tmp_path / "b.npz", router_logits=logits[:, :10])
    out = tmp_path / "hf.parquet"
    result = import_trace("hf-router-logits", [tmp_path / "a.npz", tmp_path / "b.npz"], out, top_k=2)
    trace = load_trace(out)
    assert trace.tokens_per_step.tolist() == [40, 10]
    assert (trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k) == (3, 8, 2)
    e_ref, w_ref = torch_reference(logits, 2, True)
    assert (trace.experts[:40] == e_ref).all() and (trace.experts[40:] == e_ref[:10]).all()
    assert np.allclose(trace.weights[:40], w_ref, atol=1e-6)
    assert trace.token_id is None  # b.npz has no input_ids
    assert "some files lack input_ids" in "\n".join(result.summary)
    alone = import_hf_router_logits([tmp_path / "a.npz"], top_k=2).trace
    assert alone.token_id.tolist() == list(range(100, 140))


def test_hf_pt_tuple_bf16_and_attention_mask(logits, tmp_path):
    import torch

    mask = np.ones(40, np.int64)
    mask[[3, 7]] = 0
    torch.save({"router_logits": tuple(torch.from_numpy(x) for x in logits),
                "input_ids": torch.arange(40), "attention_mask": torch.from_numpy(mask)}, tmp_path / "a.pt")
    torch.save(torch.from_numpy(logits).to(torch.bfloat16), tmp_path / "b.pt")
    trace = import_hf_router_logits([tmp_path / "a.pt", tmp_path / "b.pt"], top_k=3, normalize=False).trace
    assert trace.tokens_per_step.tolist() == [38, 40]
    e_ref, w_ref = torch_reference(logits, 3, False)
    keep = mask != 0
    assert (trace.experts[:38] == e_ref[keep]).all()
    assert np.allclose(trace.weights[:38], w_ref[keep], atol=1e-6)
    assert trace.meta.provenance["normalize"] is False
    assert trace.meta.provenance["step_grouping"] == "one step per file (one forward pass), in the order given"


def test_hf_errors(logits, tmp_path, monkeypatch):
    np.savez(tmp_path / "names.npz", gate=logits[0], up=logits[1])
    with pytest.raises(UserError, match=r"names.npz: array\(s\) 'gate', 'up' carry no layer number"):
        import_hf_router_logits([tmp_path / "names.npz"], top_k=2)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(UserError, match=r"x.txt: unknown file type '.txt'; hf-router-logits reads .npz and .pt"):
        import_hf_router_logits([tmp_path / "x.txt"], top_k=2)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="bad.npz: not a readable .npz archive"):
        import_hf_router_logits([tmp_path / "bad.npz"], top_k=2)
    np.savez(tmp_path / "ids.npz", logits, input_ids=np.arange(7))
    with pytest.raises(UserError, match="ids.npz: input_ids holds 7 values but the router logits cover 40 tokens"):
        import_hf_router_logits([tmp_path / "ids.npz"], top_k=2)
    import torch

    torch.save(tuple(torch.from_numpy(x) for x in logits), tmp_path / "a.pt")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(UserError, match=r"a.pt: reading .pt files .* needs PyTorch \(pip install torch\)"):
        import_hf_router_logits([tmp_path / "a.pt"], top_k=2)


# --------------------------------------------------------------------------- SGLang dumps

def sglang_stat_dump(path: Path, counts: np.ndarray, buffer_size: int) -> None:
    """Write a dump the way SGLang's _StatAccumulator.dump does (stat mode, rank 0):
    a circular buffer [buffer_size, layers, logical experts] of int32, zero where unused."""
    import torch

    buf = torch.zeros((buffer_size, *counts.shape[1:]), dtype=torch.int32)
    buf[: len(counts)] = torch.from_numpy(counts.astype(np.int32))
    torch.save(dict(rank=0, logical_count=buf, average_utilization_rate_over_window=None), path)


def routed_counts(tokens: list[int], layers: int, experts: int, k: int, seed: int = 0) -> np.ndarray:
    """[passes, layers, experts] counts of random top-k routing; layer 0 dense (all zero)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(tokens), layers, experts), np.int64)
    for s, t in enumerate(tokens):
        for layer in range(1, layers):
            chosen = np.argsort(rng.random((t, experts)), axis=1)[:, :k]
            out[s, layer] = np.bincount(chosen.ravel(), minlength=experts)
    return out


def test_sglang_stat_dump(tmp_path):
    a, b = routed_counts([30, 12, 7], 5, 16, 4), routed_counts([9], 5, 16, 4, seed=1)
    sglang_stat_dump(tmp_path / "expert_distribution_recorder_1.pt", a, buffer_size=8)
    sglang_stat_dump(tmp_path / "expert_distribution_recorder_2.pt", b, buffer_size=8)
    out = tmp_path / "sg.parquet"
    import_trace("sglang-dump", [tmp_path / "expert_distribution_recorder_1.pt",
                                 tmp_path / "expert_distribution_recorder_2.pt"], out, top_k=4)
    trace = load_trace(out)
    assert isinstance(trace, CountsTrace)
    assert (trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k) == (4, 16, 4)
    assert trace.tokens_per_step.tolist() == [30, 12, 7, 9]
    assert (trace.counts() == np.concatenate([a, b])[:, 1:, :]).all()
    prov = trace.meta.provenance
    assert prov["dropped_zero_layers"] == [0] and prov["original_layer_ids"] == [1, 2, 3, 4]
    assert prov["buffer_rows_kept"][str(tmp_path / "expert_distribution_recorder_1.pt")] == "0-2"


def test_sglang_errors(tmp_path):
    import torch

    bad = routed_counts([10, 10], 3, 8, 2)
    bad[1, 2, 0] += 1
    sglang_stat_dump(tmp_path / "d.pt", bad, buffer_size=4)
    with pytest.raises(UserError, match=r"d.pt: buffer row 1, layer 2 sums to 21 assignments but layer 1 sums "
                                        r"to 20"):
        import_sglang_dump([tmp_path / "d.pt"], top_k=2)
    with pytest.raises(UserError, match=r"d.pt: buffer row 0, each layer sums to 20 assignments, not a "
                                        r"multiple of --top-k 3"):
        sglang_stat_dump(tmp_path / "d.pt", bad[:1], buffer_size=4)
        import_sglang_dump([tmp_path / "d.pt"], top_k=3)
    over = routed_counts([10, 10], 3, 8, 2)
    over[1, 1:] = [11, 1, 1, 1, 1, 1, 2, 2]     # 20 assignments of 10 tokens at top-2, 11 to expert 0 (layer 0: dense)
    sglang_stat_dump(tmp_path / "d.pt", over, buffer_size=4)
    with pytest.raises(UserError, match=r"d.pt: buffer row 1, layer \d: expert 0 takes 11 assignments, more than the "
                                        r"10 tokens"):
        import_sglang_dump([tmp_path / "d.pt"], top_k=2)
    torch.save(dict(records=[], last_physical_to_logical_map=torch.zeros(2, 2, dtype=torch.int64)), tmp_path / "pp.pt")
    with pytest.raises(UserError, match="pp.pt: the dump holds no records"):
        import_sglang_dump([tmp_path / "pp.pt"], top_k=2)
    (tmp_path / "j.pt").write_text("{}")
    with pytest.raises(UserError, match=r"j.pt: not a torch.save \(.pt\) file"):
        import_sglang_dump([tmp_path / "j.pt"], top_k=2)
    torch.save(dict(logical_count=torch.zeros(3, 4)), tmp_path / "s.pt")
    with pytest.raises(UserError, match=r"s.pt: 'logical_count' has shape \[3, 4\], expected \[buffer, layers, "):
        import_sglang_dump([tmp_path / "s.pt"], top_k=2)


# --------------------------------------------------------------------------- vLLM JSON lines: errors

def write_jsonl(path: Path, calls: list, extra_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps({"topk_weights": [len(c), len(c[0]) if c else 0], "topk_ids": c}) for c in calls]
    for i, text in (extra_lines or {}).items():
        lines[i] = text
    path.write_text("\n".join(lines) + "\n")
    return path


def passes_of(tokens: list[int], layers: int, k: int = 2, experts: int = 6, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [np.argsort(rng.random((t, experts)), axis=1)[:, :k].tolist() for t in tokens for _ in range(layers)]


def test_vllm_synthetic_round_trip_with_weights(tmp_path):
    calls = passes_of([3, 5, 3], layers=4)
    rng = np.random.default_rng(2)
    lines = []
    for c in calls:
        w = rng.random((len(c), 2)).round(3)
        lines.append(json.dumps({"topk_ids": c, "topk_weights": w.tolist()}))
    (tmp_path / "w.jsonl").write_text("\n".join(lines))
    trace = import_vllm_jsonl([tmp_path / "w.jsonl"], num_layers=4, num_experts=6).trace
    assert trace.tokens_per_step.tolist() == [3, 5, 3] and trace.meta.num_layers == 4
    assert (np.diff(trace.weights, axis=2) <= 0).all()  # re-ordered highest weight first
    assert set(map(tuple, np.sort(trace.experts[:3, 1], axis=1))) == set(map(tuple, np.sort(calls[1], axis=1)))


@pytest.mark.parametrize("case,message", [
    ("json", r"v.jsonl:3: not a JSON line"),
    ("field", r"v.jsonl:2: no 'topk_ids' field"),
    ("k", r"v.jsonl:5: 'topk_ids' has k=3 experts per token but line 1 has k=2 \(inconsistent top-k\)"),
    ("dup", r"v.jsonl:4: 'topk_ids' row 1 chooses expert 3 twice"),
    ("ragged", r"v.jsonl:2: 'topk_ids' rows have different lengths"),
    ("float", r"v.jsonl:1: 'topk_ids' must hold integer expert ids, found float64 values"),
    ("bool", r"v.jsonl:2: 'topk_ids' holds true/false where expert ids go"),
    ("k0", r"v.jsonl:1: 'topk_ids' has empty rows; every token needs its k >= 1 expert ids"),
])
def test_vllm_malformed_lines(tmp_path, case, message):
    calls = passes_of([3, 4], layers=3)
    edits = {
        "json": {2: '{"topk_ids": [[1, 2]'},
        "field": {1: '{"ids": [[1, 2]]}'},
        "k": {4: json.dumps({"topk_ids": [[0, 1, 2]] * 4})},
        "dup": {3: json.dumps({"topk_ids": [[0, 1], [3, 3], [4, 5], [1, 2]]})},
        "ragged": {1: json.dumps({"topk_ids": [[0, 1], [2], [3, 4]]})},
        "float": {0: json.dumps({"topk_ids": [[0.5, 1], [2, 3], [3, 4]]})},
        "bool": {1: json.dumps({"topk_ids": [[True, 2], [1, 2], [3, 4]]})},
        "k0": {0: json.dumps({"topk_ids": [[], [], []]})},
    }[case]
    src = write_jsonl(tmp_path / "v.jsonl", calls, edits)
    with pytest.raises(UserError, match=message):
        import_vllm_jsonl([src], num_layers=3, num_experts=6)


def test_vllm_layer_count_is_required_and_selection_errors(tmp_path):
    same = write_jsonl(tmp_path / "same.jsonl", passes_of([4, 4], layers=3))
    with pytest.raises(UserError, match=r"needs --num-layers, .*; the file cannot tell: .*same.jsonl: 6 lines, all "
                                        r"with T=4"):
        import_vllm_jsonl([same], num_experts=6)
    assert import_vllm_jsonl([same], num_layers=3, num_experts=6).trace.num_steps == 2
    with pytest.raises(UserError, match=r"same.jsonl: 6 layer calls is not a whole number of passes of 4 layers"):
        import_vllm_jsonl([same], num_layers=4, num_experts=6)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", passes_of([4, 5], layers=3))
    with pytest.raises(UserError, match=r"mixed.jsonl:4: T=5 tokens but line 3 \(layer 0 of pass 1\) has T=4"):
        import_vllm_jsonl([mixed], num_layers=2, num_experts=6)
    with pytest.raises(UserError, match=r"no forward pass selected \(passes hold 4, 5 tokens; --min-tokens=6"):
        import_vllm_jsonl([mixed], min_tokens=6, num_layers=3, num_experts=6)
    with pytest.raises(UserError, match=r"mixed.jsonl:1: 'topk_ids' row \d+: expert id 5 outside \[0, 5\) "
                                        r"\(num_experts from --num-experts\)"):
        import_vllm_jsonl([write_jsonl(tmp_path / "mixed.jsonl", [[[5, 0]] * 4] * 3 + passes_of([5], 3))],
                          num_layers=3, num_experts=5)
    with pytest.raises(UserError, match=r"--passes: '5-x' is not a pass index or range \(write e.g. 2,5-7\)"):
        import_vllm_jsonl([mixed], passes="1,5-x", num_layers=3, num_experts=6)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="empty.jsonl: empty file"):
        import_vllm_jsonl([tmp_path / "empty.jsonl"], num_layers=3, num_experts=6)
    with pytest.raises(UserError, match="nothere.jsonl: no such file"):
        import_vllm_jsonl([tmp_path / "nothere.jsonl"], num_layers=3, num_experts=6)


def test_vllm_jsonl_never_guesses_the_expert_count(tmp_path):
    src = write_jsonl(tmp_path / "v.jsonl", passes_of([3, 4], layers=2, experts=6))
    top = max(max(max(row) for row in call) for call in passes_of([3, 4], layers=2, experts=6))
    with pytest.raises(UserError, match=rf"needs --num-experts, .* is {top}, so at least {top + 1}"):
        import_vllm_jsonl([src], num_layers=2)
    trace = import_vllm_jsonl([src], num_layers=2, num_experts=6).trace
    assert trace.meta.num_experts == 6 and trace.meta.provenance["num_experts_source"] == "from --num-experts"


# --------------------------------------------------------------------------- gate CSV: errors

def write_gate_csv(path: Path, scores: np.ndarray, layer_id: int = 0, token_ids=None) -> Path:
    T, E = scores.shape
    token_ids = np.arange(T) if token_ids is None else token_ids
    header = "layer_id,token_id," + ",".join(f"expert_{j}" for j in range(E))
    rows = [f"{layer_id},{t}," + ",".join(f"{v:.6f}" for v in row) for t, row in zip(token_ids, scores)]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def gate_scores(T: int, E: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scores = np.zeros((T, E))
    chosen = np.argsort(rng.random((T, E)), axis=1)[:, :k]
    np.put_along_axis(scores, chosen, rng.uniform(0.05, 0.5, (T, k)), axis=1)
    return scores


def test_gate_csv_layer_ids_from_column_and_shuffled_rows(tmp_path):
    step = tmp_path / "step0"
    step.mkdir()
    s7, s3 = gate_scores(5, 8, 2, 1), gate_scores(5, 8, 2, 2)
    write_gate_csv(step / "b.csv", s7, layer_id=7)
    perm = np.array([4, 2, 0, 1, 3])
    write_gate_csv(step / "a.csv", s3[perm], layer_id=3, token_ids=perm)
    trace = import_gate_csv([step], top_k=2).trace
    assert trace.meta.provenance["original_layer_ids"] == [3, 7]
    assert trace.meta.provenance["step_grouping"].startswith("one step per folder")
    assert (np.sort(trace.experts[:, 0], axis=1) == np.sort(np.argsort(-s3, axis=1)[:, :2], axis=1)).all()
    assert (trace.experts[:, 1, 0] == np.argmax(s7, axis=1)).all()


@pytest.mark.parametrize("case,message", [
    ("header", r"a.csv: line 1: header is 'layer,token,e0,e1,\.\.\.'; expected layer_id,token_id,expert_0"),
    ("k", r"a.csv: line 4: 3 non-zero gate scores but line 2 has 2"),
    ("negative", r"a.csv: line 3, column 'expert_1': negative gate score -0.5"),
    ("text", r"a.csv: line 3, column 'expert_2': 'abc' is not a number"),
    ("nan", r"a.csv: line 3, column 'expert_2': empty or NaN cell"),
    ("empty", r"a.csv: empty file"),
    ("token", r"b.csv: its token_id values differ from those of .*a.csv"),
    ("layers", r"cannot tell the layers apart: the layer_id columns hold \[0\]"),
])
def test_gate_csv_errors(tmp_path, case, message):
    step = tmp_path / "s"
    step.mkdir()
    scores = gate_scores(4, 6, 2)
    a = write_gate_csv(step / "a.csv", scores, layer_id=0)
    b = write_gate_csv(step / "b.csv", gate_scores(4, 6, 2, 1), layer_id=1)
    text = a.read_text().splitlines()
    if case == "header":
        a.write_text("layer,token,e0,e1,e2,e3,e4,e5\n" + "\n".join(text[1:]))
    elif case == "k":
        s = scores.copy()
        s[2, np.flatnonzero(s[2] == 0)[0]] = 0.1
        write_gate_csv(a, s)
    elif case == "negative":
        s = scores.copy()
        s[1, 1] = -0.5
        write_gate_csv(a, s)
    elif case == "text":
        fields = text[2].split(",")
        fields[4] = "abc"
        text[2] = ",".join(fields)
        a.write_text("\n".join(text))
    elif case == "nan":
        fields = text[2].split(",")
        fields[4] = "nan"
        text[2] = ",".join(fields)
        a.write_text("\n".join(text))
    elif case == "empty":
        a.write_text("")
    elif case == "token":
        write_gate_csv(b, gate_scores(4, 6, 2, 1), layer_id=1, token_ids=[0, 1, 2, 9])
    elif case == "layers":
        write_gate_csv(b, gate_scores(4, 6, 2, 1), layer_id=0)
    with pytest.raises(UserError, match=message):
        import_gate_csv([step])


def test_gate_csv_empty_folder_and_top_k_mismatch(tmp_path):
    (tmp_path / "none").mkdir()
    with pytest.raises(UserError, match="none: folder holds no .csv file"):
        import_gate_csv([tmp_path / "none"])
    write_gate_csv(tmp_path / "a_layer1.csv", gate_scores(3, 6, 2))
    with pytest.raises(UserError, match=r"a_layer1.csv: rows hold 2 non-zero gate scores but --top-k is 3"):
        import_gate_csv([tmp_path / "a_layer1.csv"], top_k=3)


# --------------------------------------------------------------------------- popularity JSON: errors

@pytest.mark.parametrize("content,message", [
    ('{"expert_popularity": [[1, 2, 3], [3, 2, 2]]}', r"p.json: layer 1 sums to 7 assignments but layer 0 "
                                                       r"sums to 6"),
    ('{"expert_popularity": [[1, 2, 2], [3, 1, 1]]}', r"p.json: each layer sums to 5 assignments, not a "
                                                       r"multiple of --top-k 2"),
    ('{"expert_popularity": [[2, 0], [1, 1]]}', r"p.json: layer 0: expert 0 takes 2 assignments, more than the 1 "
                                               r"tokens"),            # the trace validate refused what it wrote
    ('{"expert_popularity": [[1, -1, 2]]}', r"p.json: 'expert_popularity' layer 0, expert 1: -1.0 is not a count"),
    ('{"expert_popularity": [[1, 1], [1, 1, 0]]}', r"p.json: 'expert_popularity' layer 1 has 3 experts but "
                                                   r"layer 0 has 2"),
    ('{"popularity": []}', r"p.json: no 'expert_popularity' field"),
    ('{"expert_popularity": [[1, 1]', r"p.json: line 1: not valid JSON"),
])
def test_popularity_errors(tmp_path, content, message):
    (tmp_path / "p.json").write_text(content)
    with pytest.raises(UserError, match=message):
        import_popularity_json([tmp_path / "p.json"], top_k=2)


def test_popularity_needs_top_k(tmp_path):
    (tmp_path / "p.json").write_text('{"expert_popularity": [[1, 1]]}')
    with pytest.raises(UserError, match="popularity-json needs --top-k"):
        import_popularity_json([tmp_path / "p.json"], top_k=None)
    with pytest.raises(UserError, match=r"--top-k 4 exceeds the 2 experts of .*p.json"):
        import_popularity_json([tmp_path / "p.json"], top_k=4)


# --------------------------------------------------------------------------- the command

def test_cli_import_summary_and_provenance(tmp_path, capsys):
    (tmp_path / "p.json").write_text('{"total_input_tokens": 3, "expert_popularity": [[2, 2, 0], [1, 1, 2]]}')
    out = tmp_path / "o.parquet"
    code, stdout, err = run_cli(["--from", "popularity-json", str(tmp_path / "p.json"), "--top-k", "2",
                                 "-o", str(out), "--model", "M", "--dataset", "D"], capsys)
    assert code == 0, err
    assert f"wrote {out}: counts trace, 1 step(s), 2 tokens" in stdout
    trace = load_trace(out)
    prov = trace.meta.provenance
    assert (trace.meta.model, trace.meta.dataset, trace.meta.source) == ("M", "D", "imported")
    assert prov["tool"] == "moe-gps trace import" and prov["format"] == "popularity-json"
    assert prov["sources"] == [str(tmp_path / "p.json")] and "date" in prov
    assert prov["command"].startswith("moe-gps trace import --from popularity-json ")
    assert "--top-k 2" in prov["command"]
    assert prov["step_grouping"] == "one step per file, in the order given"


def test_cli_flag_errors_leave_no_output(tmp_path, capsys):
    (tmp_path / "p.json").write_text('{"expert_popularity": [[2, 2, 0], [1, 1, 1]]}')
    out = tmp_path / "o.parquet"
    code, _, err = run_cli(["--from", "popularity-json", str(tmp_path / "p.json"), "-o", str(out)], capsys)
    assert code == 2 and "--from popularity-json needs --top-k" in err
    code, _, err = run_cli(["--from", "popularity-json", str(tmp_path / "p.json"), "--top-k", "2",
                            "--min-tokens", "3", "-o", str(out)], capsys)
    assert code == 2 and "--min-tokens does not apply to --from popularity-json" in err
    code, _, err = run_cli(["--from", "popularity-json", str(tmp_path / "p.json"), "--top-k", "2",
                            "-o", str(out)], capsys)
    assert code == 2 and "p.json: layer 1 sums to 3 assignments but layer 0 sums to 4" in err
    assert err.count("\n") == 1  # one line, no traceback
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "p.json"]  # nothing half-written


@pytest.mark.skipif(not import_wired(), reason="`trace import` not yet registered in moe_gps/cli/trace_cmd.py")
def test_moe_gps_main_trace_import(real_traces, tmp_path, capsys):
    from moe_gps.cli.main import main

    files = sorted((real_traces / MIXTRAL / "mixtral_8x7b_instruct").glob("*.json"))
    out = tmp_path / "mixtral.parquet"
    code = main(["trace", "import", "--from", "popularity-json", *map(str, files), "--top-k", "2",
                 "-o", str(out), "--model", "Mixtral-8x7B-Instruct-v0.1", "--dataset", "MMLU"])
    assert code == 0, capsys.readouterr().err
    assert load_trace(out).counts().shape == (7, 32, 8)
    assert main(["trace", "inspect", str(out)]) == 0
    capsys.readouterr()
    assert main(["trace", "import", "--from", "gate-csv", str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert "missing: no such file" in capsys.readouterr().err


def test_console_script_help():
    """`moe-gps trace import --help` works from a fresh interpreter once wired."""
    if not import_wired():
        pytest.skip("`trace import` not yet registered in moe_gps/cli/trace_cmd.py")
    done = subprocess.run([sys.executable, "-m", "moe_gps.cli.main", "trace", "import", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "vllm-jsonl" in done.stdout and "--min-tokens" in done.stdout


def test_gate_csv_warns_when_folders_are_not_in_the_numeric_order_of_their_names(tmp_path):
    """A shell glob lists 10th before 1st: the import keeps the order given and says so."""
    folders = []
    for n in ("10th", "1st", "2nd"):
        d = tmp_path / n
        d.mkdir()
        write_gate_csv(d / "layer0.csv", gate_scores(4, 8, 2, len(folders)), layer_id=0)
        folders.append(d)
    r = import_gate_csv([str(d) for d in folders])
    assert any(line.startswith("warning: the steps are not in the numeric order of their names (10th, 1st, 2nd)")
               for line in r.summary)
    r = import_gate_csv([str(tmp_path / n) for n in ("1st", "2nd", "10th")])
    assert not any("warning" in line for line in r.summary)
    # the command prints it on stderr, as its other warnings, not among the summary lines on stdout
    done = subprocess.run([sys.executable, "-m", "moe_gps.cli.main", "trace", "import", "--from", "gate-csv",
                           *map(str, folders), "-o", str(tmp_path / "g.parquet")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stdout
    assert done.stderr.startswith("moe-gps: warning: the steps are not in the numeric order of their names")
    done = subprocess.run([sys.executable, "-m", "moe_gps.cli.main", "trace", "import", "--from", "gate-csv",
                           str(folders[0]), str(folders[1]), str(folders[0]) + "/", "-o", str(tmp_path / "h.parquet")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "the same source as" in done.stderr and "named twice" in done.stderr
    assert not (tmp_path / "h.parquet").exists()           # its steps were counted twice


def test_a_popularity_trace_is_simulated_with_a_warning_that_its_steps_are_whole_runs(tmp_path, capsys):
    """Each popularity file sums a whole run: simulate says that its steps are not batches (recommend and predict
    evaluate print the same warning of the trace's metadata)."""
    from moe_gps.cli.main import main

    rng = np.random.default_rng(0)
    files = []
    for i in range(6):
        counts = [rng.multinomial(1000, [1 / 8] * 8).tolist() for _ in range(32)]   # top_k x 500 tokens a layer
        (tmp_path / f"s{i}.json").write_text(json.dumps({"expert_popularity": counts}))
        files.append(str(tmp_path / f"s{i}.json"))
    trace = import_popularity_json(files, top_k=2, model="Mixtral-8x7B-v0.1").trace
    assert "sums a whole run's forward passes (popularity-json, one step per file)" in \
        trace.meta.aggregate_steps_warning()
    out = tmp_path / "pop.parquet"
    code, _, err = run_cli(["--from", "popularity-json", *files, "--top-k", "2", "--model", "Mixtral-8x7B-v0.1",
                            "-o", str(out)], capsys)
    assert code == 0, err
    assert main(["simulate", str(out), "--strategies", "none,eplb", "--no-plots", "-o", str(tmp_path / "s")]) == 0
    assert "warning: each step of this trace sums a whole run's forward passes" in capsys.readouterr().out
    assert main(["predict", "evaluate", str(out), "--predictors", "ema"]) == 0
    assert "each step of this trace sums a whole run's forward passes" in "".join(capsys.readouterr())
    assert load_trace(out).meta.aggregate_steps_warning() is not None
    assert load_trace(Path(__file__).resolve().parents[1] / "traces" / "mixtral_mmlu.parquet").meta \
        .aggregate_steps_warning() is None


def test_phase_records_what_the_steps_are_and_simulate_reads_it(tmp_path, capsys):
    """Gate CSVs carry no sequence ids, so decode steps cannot be told by their shape: --phase decode records
    it in the provenance (and the command), and the simulator takes the steps as decode."""
    from moe_gps.trace.regroup import decode_shaped

    for step in range(2):
        (tmp_path / f"d{step}").mkdir()
        for layer in range(2):
            write_gate_csv(tmp_path / f"d{step}" / f"layer{layer}.csv", gate_scores(8, 6, 2, seed=step + layer))
    out = tmp_path / "decode.parquet"
    code, _, err = run_cli(["--from", "gate-csv", str(tmp_path / "d0"), str(tmp_path / "d1"), "--phase", "decode",
                            "-o", str(out)], capsys)
    assert code == 0, err
    trace = load_trace(out)
    assert trace.meta.provenance["phase"] == "decode" and "--phase decode" in trace.meta.provenance["command"]
    assert decode_shaped(trace) == "its metadata says phase: decode"
    code, _, err = run_cli(["--from", "gate-csv", str(tmp_path / "d0"), "-o", str(tmp_path / "p.parquet")], capsys)
    assert code == 0 and "phase" not in load_trace(tmp_path / "p.parquet").meta.provenance
