"""Importers of what vLLM and SGLang return or dump: ``vllm-routed``, ``sglang-routed`` and
``sglang-dump``'s ``per_pass`` / ``per_token`` modes, each on fixtures written the way the
engine's own code writes them (cited per fixture), then through ``trace validate`` and
``plan --sglang``."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest

from moe_gps.cli.main import main
from moe_gps.errors import UserError
from moe_gps.trace import CountsTrace, TokensTrace, load_trace
from moe_gps.trace.importers import import_sglang_dump, import_sglang_routed, import_trace, import_vllm_routed

HIDDEN_LAYERS, DENSE, EXPERTS, K = 4, (0,), 8, 2          # a DeepSeek-like model: decoder layer 0 is dense
MOE_LAYERS = [layer for layer in range(HIDDEN_LAYERS) if layer not in DENSE]


def routing(tokens: int, seed: int, experts: int = EXPERTS, k: int = K) -> np.ndarray:
    """Logical top-k ids of every MoE layer: int [tokens, len(MOE_LAYERS), k], distinct per token."""
    rng = np.random.default_rng(seed)
    popularity = rng.dirichlet(np.full(experts, 0.7))
    out = np.empty((tokens, len(MOE_LAYERS), k), np.int64)
    for j in range(len(MOE_LAYERS)):
        for t in range(tokens):
            out[t, j] = rng.choice(experts, k, replace=False, p=popularity)
    return out


def capture_buffer(route: np.ndarray, num_hidden_layers: int = HIDDEN_LAYERS) -> np.ndarray:
    """The routed-experts capturer's rows for a request's tokens: ``[tokens, num_hidden_layers, k]``
    zeros, and ``capture(layer_id, topk_ids)`` writes each MoE layer's row (dense layers never
    call it). vLLM: ``RoutedExpertsCapturer`` in
    vllm/model_executor/layers/fused_moe/routed_experts_capturer.py (buffer of
    hf_text_config.num_hidden_layers x num_experts_per_tok); SGLang: ``_RoutedExpertsHostCache``
    in python/sglang/srt/layers/moe/routed_experts_capturer.py (int32, the same shape)."""
    buf = np.zeros((len(route), num_hidden_layers, route.shape[2]), np.int32)
    buf[:, MOE_LAYERS, :] = route
    return buf


def npy_base64(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, a)
    return base64.b64encode(buf.getvalue()).decode()


# --------------------------------------------------------------------------- vLLM

def vllm_chat_response(prompt_ids: list[int], output_ids: list[int], route: np.ndarray, split: bool,
                       encode: str = "list") -> dict:
    """A /v1/chat/completions response as vLLM serialises it with --enable-return-routed-experts.

    route covers the request's forwarded tokens: prompt + output but the last (num_tokens - 1
    rows). split=True follows vllm/v1/engine/output_processor.py (``split_routed_experts``:
    ``prompt_routed_experts`` = rows[:prompt_len] on the response (vllm/outputs.py
    RequestOutput), the rest on the choice, ``list[list[list[int]]]`` in
    entrypoints/openai/chat_completion/protocol.py); split=False follows the protocol whose
    ``ChatCompletionResponseChoice.routed_experts`` is base64 ``.npy`` bytes of shape
    (num_tokens - 1, layers, top_k) from the first prompt token."""
    full = capture_buffer(route).astype(np.int16)
    P = len(prompt_ids)
    enc = (lambda a: a.tolist()) if encode == "list" else npy_base64
    choice = {"index": 0, "message": {"role": "assistant", "content": "..."}, "finish_reason": "length",
              "stop_reason": None, "token_ids": output_ids}
    resp = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m", "usage":
            {"prompt_tokens": P, "completion_tokens": len(output_ids), "total_tokens": P + len(output_ids)},
            "prompt_token_ids": prompt_ids, "prompt_logprobs": None, "kv_transfer_params": None}
    if split:
        resp["prompt_routed_experts"] = enc(full[:P])
        choice["routed_experts"] = enc(full[P:])
    else:
        choice["routed_experts"] = enc(full)
    resp["choices"] = [choice]
    return resp


@pytest.fixture
def vllm_files(tmp_path):
    """Three responses (JSON lines), then two more (a JSON array), different prompt/output lengths."""
    rng = np.random.default_rng(5)
    reqs = []
    for i, (P, G) in enumerate([(6, 3), (4, 5), (9, 2), (3, 3), (5, 4)]):
        prompt, out = rng.integers(10, 1000, P).tolist(), rng.integers(10, 1000, G).tolist()
        reqs.append((prompt, out, routing(P + G - 1, seed=i)))
    lines = [json.dumps(vllm_chat_response(p, o, r, split=True)) for p, o, r in reqs[:3]]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([vllm_chat_response(p, o, r, split=False, encode="npy")
                                                 for p, o, r in reqs[3:]]))
    return tmp_path, reqs


def test_vllm_routed_both_protocols_tokens_positions_and_steps(vllm_files):
    d, reqs = vllm_files
    res = import_vllm_routed([d / "a.jsonl", d / "b.json"], num_experts=EXPERTS, model="M")
    t = res.trace
    assert isinstance(t, TokensTrace)
    assert (t.meta.num_layers, t.meta.num_experts, t.meta.top_k) == (len(MOE_LAYERS), EXPERTS, K)
    assert t.num_steps == 5 and t.tokens_per_step.tolist() == [len(r) for _, _, r in reqs]
    for s, (prompt, out, route) in enumerate(reqs):
        step = t.step(s)
        assert (step.experts == route).all()                       # dense layer 0 dropped, ids as returned
        assert step.pos.tolist() == list(range(len(route)))
        assert step.token_id.tolist() == (prompt + out)[:len(route)]
    prov = t.meta.provenance
    assert prov["original_layer_ids"] == MOE_LAYERS and prov["num_hidden_layers"] == HIDDEN_LAYERS
    assert prov["dense_layers"] == [0] and prov["selection"] == {"part": "all", "requests_per_step": 1}
    assert any(line.startswith("steps: one step = 1 consecutive request(s), all tokens") for line in res.summary)


def test_vllm_routed_parts_and_grouping(vllm_files):
    d, reqs = vllm_files
    src = [d / "a.jsonl", d / "b.json"]
    prompt = import_vllm_routed(src, num_experts=EXPERTS, part="prompt", requests_per_step=2).trace
    assert prompt.tokens_per_step.tolist() == [6 + 4, 9 + 3, 5]
    assert (prompt.step(0).experts[:6] == reqs[0][2][:6]).all() and prompt.step(0).seq.tolist() == [0] * 6 + [2] * 4
    out = import_vllm_routed(src, num_experts=EXPERTS, part="output").trace
    assert out.tokens_per_step.tolist() == [G - 1 for _, G in [(6, 3), (4, 5), (9, 2), (3, 3), (5, 4)]]
    assert out.step(1).pos.tolist() == [4, 5, 6, 7]


def test_vllm_routed_round_trip_validate_and_plan_sglang_rows(vllm_files, tmp_path, capsys):
    d, _ = vllm_files
    trace = tmp_path / "v.parquet"
    assert main(["trace", "import", "--from", "vllm-routed", str(d / "a.jsonl"), str(d / "b.json"),
                 "--num-experts", str(EXPERTS), "-o", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "steps: one step = 1 consecutive request(s)" in out and "layers 0 never routed (dense)" in out
    assert main(["trace", "validate", str(trace)]) == 0
    assert main(["plan", str(trace), "--gpus", "2", "--redundant", "2", "-o", str(tmp_path / "p.yaml"),
                 "--sglang", str(tmp_path / "s.json")]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())["physical_to_logical_map"]
    assert len(rows) == HIDDEN_LAYERS


def test_vllm_routed_moe_only_axis_needs_the_layer_flags(tmp_path, capsys):
    """vLLM versions whose capturer counts MoE layers only (``_count_moe_layers``) return no
    dense rows: the trace cannot know the decoder layers and plan --sglang asks for them."""
    route = routing(7, seed=3)
    resp = {"choices": [{"index": 0, "routed_experts": route.tolist(), "token_ids": [1, 2, 3]}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3}}
    (tmp_path / "r.jsonl").write_text(json.dumps(resp) + "\n")
    res = import_trace("vllm-routed", [tmp_path / "r.jsonl"], tmp_path / "t.parquet", num_experts=EXPERTS)
    assert "original_layer_ids" not in res.trace.meta.provenance
    assert res.trace.token_id is None                             # prompt token ids were not returned
    argv = ["plan", str(tmp_path / "t.parquet"), "--gpus", "2", "-o", str(tmp_path / "p.yaml"),
            "--sglang", str(tmp_path / "s.json")]
    assert main(argv) == 2
    assert "pass --num-hidden-layers" in capsys.readouterr().err
    assert main(argv + ["--num-hidden-layers", "4", "--first-moe-layer", "1"]) == 0
    assert len(json.loads((tmp_path / "s.json").read_text())["physical_to_logical_map"]) == 4


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("choices"), "not a vLLM completion response (no 'choices' list)"),
    (lambda r: r["choices"][0].pop("routed_experts"), "holds no routed experts (start vLLM with "
                                                      "--enable-return-routed-experts)"),
    (lambda r: r["choices"][0].update(routed_experts="not base64!"), "routed_experts is a string but not base64"),
    (lambda r: r["choices"][0].update(routed_experts=[[[1, 2]], [[3]]]), "routed_experts is a ragged list"),
    (lambda r: r["choices"][0].update(routed_experts=[[1.5, 2.0]]), "holds float64 values"),
])
def test_vllm_routed_bad_responses(tmp_path, edit, message):
    resp = vllm_chat_response([1, 2, 3], [4, 5], routing(4, 0), split=False)
    edit(resp)
    (tmp_path / "r.jsonl").write_text(json.dumps(resp) + "\n")
    with pytest.raises(UserError, match=re.escape(message)) as err:
        import_vllm_routed([tmp_path / "r.jsonl"], num_experts=EXPERTS)
    assert "r.jsonl:1" in str(err.value)


def test_vllm_routed_never_guesses_the_expert_count(tmp_path):
    resp = vllm_chat_response([1, 2, 3], [4, 5], routing(4, 0), split=False)
    (tmp_path / "r.jsonl").write_text(json.dumps(resp) + "\n")
    top = int(routing(4, 0).max())
    with pytest.raises(UserError, match=rf"needs --num-experts, .*; the largest id in the file is {top}, so at least {top + 1}$"):
        import_vllm_routed([tmp_path / "r.jsonl"])
    with pytest.raises(UserError, match=r"expert id \d+ is not below --num-experts 2"):
        import_vllm_routed([tmp_path / "r.jsonl"], num_experts=2)


def test_vllm_routed_refuses_negative_ids_other_than_not_captured(tmp_path):
    """-1 marks a token whose routing was not captured (dropped and counted); -5 is damage, not a gap."""
    route = routing(4, 0)
    route[2, 0, 1] = -5
    resp = vllm_chat_response([1, 2, 3], [4, 5], route, split=False)
    (tmp_path / "r.jsonl").write_text(json.dumps(resp) + "\n")
    with pytest.raises(UserError, match=r"r.jsonl:1: .*expert id -5 in layer \d+ is negative \(only -1 marks"):
        import_vllm_routed([tmp_path / "r.jsonl"], num_experts=EXPERTS)
    route[2, 0, 1] = -1
    resp = vllm_chat_response([1, 2, 3], [4, 5], route, split=False)
    (tmp_path / "r.jsonl").write_text(json.dumps(resp) + "\n")
    result = import_vllm_routed([tmp_path / "r.jsonl"], num_experts=EXPERTS)
    assert "dropped 1 token(s) whose routing was not captured (-1 ids)" in result.summary


# --------------------------------------------------------------------------- SGLang routed

def sglang_generate_response(prompt_len: int, output_ids: list[int], route: np.ndarray) -> dict:
    """A /generate response with "return_routed_experts": true. The rows are the host cache's
    for the request's first seqlen - 1 tokens (``get_routed_experts``,
    python/sglang/srt/layers/moe/routed_experts_capturer.py), sent as
    ``pybase64.b64encode(routed_experts.numpy().tobytes())`` by
    ``DetokenizerManager._extract_routed_experts`` (python/sglang/srt/managers/detokenizer_manager.py)."""
    rows = capture_buffer(route).astype(np.int32)
    return {"text": "...", "output_ids": output_ids,
            "meta_info": {"id": "r", "finish_reason": {"type": "length"}, "prompt_tokens": prompt_len,
                          "completion_tokens": len(output_ids), "cached_tokens": 0,
                          "routed_experts": base64.b64encode(rows.tobytes()).decode("utf-8")}}


def test_sglang_routed_flat_base64_needs_top_k_and_keeps_decoder_layers(tmp_path, capsys):
    r0, r1, r2 = routing(7, 10), routing(4, 11), routing(9, 12)
    batch = [sglang_generate_response(5, [7, 8, 9], r0), sglang_generate_response(2, [1, 2, 3], r1)]
    (tmp_path / "g.jsonl").write_text(json.dumps(batch) + "\n" + json.dumps(sglang_generate_response(8, [4, 4], r2))
                                      + "\n")
    with pytest.raises(UserError, match=r"needs --top-k \(the model's num_experts_per_tok\) or --num-layers .* "
                                        r"holds 8 ids per token = layers x top_k"):
        import_sglang_routed([tmp_path / "g.jsonl"], num_experts=EXPERTS)
    res = import_sglang_routed([tmp_path / "g.jsonl"], num_experts=EXPERTS, top_k=K)
    t = res.trace
    assert t.tokens_per_step.tolist() == [7, 4, 9]
    assert (t.step(0).experts == r0).all() and (t.step(2).experts == r2).all()
    assert t.token_id is None                                   # /generate does not return the prompt's ids
    assert any(f"top_k={K} (from --top-k)" in line for line in res.summary)   # not "(from the arrays)"
    prov = t.meta.provenance
    assert prov["original_layer_ids"] == MOE_LAYERS and prov["num_hidden_layers"] == HIDDEN_LAYERS
    by_layers = import_sglang_routed([tmp_path / "g.jsonl"], num_experts=EXPERTS, num_layers=HIDDEN_LAYERS).trace
    assert (by_layers.experts == t.experts).all()
    with pytest.raises(UserError, match=r"8 ids per token do not split into layers x top_k with --top-k 3"):
        import_sglang_routed([tmp_path / "g.jsonl"], num_experts=EXPERTS, top_k=3)
    out = import_sglang_routed([tmp_path / "g.jsonl"], num_experts=EXPERTS, top_k=K, part="output").trace
    assert out.tokens_per_step.tolist() == [2, 2, 1] and out.token_id.tolist() == [7, 8, 1, 2, 4]
    # round trip and plan --sglang: one row per decoder layer, with nothing but the trace
    assert main(["trace", "import", "--from", "sglang-routed", str(tmp_path / "g.jsonl"), "--num-experts", "8",
                 "--top-k", "2", "--requests-per-step", "3", "-o", str(tmp_path / "g.parquet")]) == 0
    assert main(["trace", "validate", str(tmp_path / "g.parquet")]) == 0
    assert load_trace(tmp_path / "g.parquet").tokens_per_step.tolist() == [20]
    assert main(["plan", str(tmp_path / "g.parquet"), "--gpus", "4", "-o", str(tmp_path / "p.yaml"),
                 "--sglang", str(tmp_path / "s.json")]) == 0
    assert len(json.loads((tmp_path / "s.json").read_text())["physical_to_logical_map"]) == HIDDEN_LAYERS
    assert "run SGLang with: --ep-size 4 --ep-num-redundant-experts 0 --init-expert-location" in \
        capsys.readouterr().out


def test_sglang_routed_bad_responses(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(UserError, match=r"a.jsonl:1: not an SGLang /generate response \(no 'meta_info' object\)"):
        import_sglang_routed([tmp_path / "a.jsonl"], num_experts=8, top_k=2)
    (tmp_path / "b.jsonl").write_text(json.dumps({"meta_info": {"prompt_tokens": 3}}) + "\n")
    with pytest.raises(UserError, match=r"no response holds meta_info.routed_experts \(start SGLang with "
                                        r"--enable-return-routed-experts"):
        import_sglang_routed([tmp_path / "b.jsonl"], num_experts=8, top_k=2)
    resp = sglang_generate_response(3, [1, 2], routing(4, 0))
    resp["meta_info"]["completion_tokens"] = 3                   # 5 tokens claimed, 4 rows sent
    (tmp_path / "c.jsonl").write_text(json.dumps(resp) + "\n")
    with pytest.raises(UserError, match=r"c.jsonl:1: 32 ids do not divide over prompt_tokens \+ completion_tokens "
                                        r"- 1 = 5 tokens"):
        import_sglang_routed([tmp_path / "c.jsonl"], num_experts=8, top_k=2)


# --------------------------------------------------------------------------- SGLang per_pass / per_token

PHYSICAL = EXPERTS + 4                                             # 4 redundant slots


def physical_map() -> np.ndarray:
    """last_physical_to_logical_map [layers, physical]: slot % experts, then 4 replicas of hot experts."""
    m = np.tile(np.arange(PHYSICAL) % EXPERTS, (HIDDEN_LAYERS, 1))
    m[:, EXPERTS:] = [[3, 5, 3, 1]] * HIDDEN_LAYERS
    return m


def sglang_detail_dumps(tmp_path, passes: list[tuple[int, int, int]], mode: str, seed: int = 0):
    """Per-rank dumps as SGLang's ``_DetailAccumulator`` writes them
    (python/sglang/srt/eplb/expert_distribution.py): each forward pass appends
    ``dict(forward_pass_id=..., rank=..., gatherer_key="primary", **single_pass_data)``; for
    per_token the data is ``_DetailSinglePassGatherer.collect()`` (input_ids, positions,
    extend_seq_lens, forward_mode, topk_ids_of_layer [layers, tokens, 8] of *physical* ids,
    -1 where unused, global_physical_count), for per_pass ``_SelectExpertsSinglePassGatherer``'s
    global_physical_count; ``dump`` saves ``dict(records=..., last_physical_to_logical_map=...)``
    to ``expert_distribution_recorder_<time>_<rank>.pt``.

    passes: (forward_pass_id, rank, tokens). Returns the files and, per pass id, the logical
    routing [tokens, MoE layers, k] of its ranks in rank order.
    """
    import torch

    rng = np.random.default_rng(seed)
    m = physical_map()
    replicas = {(layer, e): np.flatnonzero(m[layer] == e) for layer in range(HIDDEN_LAYERS) for e in range(EXPERTS)}
    records: dict[int, list] = {}
    truth: dict[int, list] = {}
    for pid, rank, n in passes:
        logical = routing(n, seed=pid * 10 + rank)
        topk = torch.full((HIDDEN_LAYERS, n + 3, 8), -1, dtype=torch.int32)   # buffer longer than the pass
        for j, layer in enumerate(MOE_LAYERS):                                 # dense layers never call the hook
            phys = np.vectorize(lambda e: rng.choice(replicas[(layer, e)]))(logical[:, j, :])
            topk[layer, :n, :K] = torch.as_tensor(phys, dtype=torch.int32)
        t = topk[:, :n, :]
        mask = t != -1
        count = torch.zeros((HIDDEN_LAYERS, PHYSICAL), dtype=torch.int32)
        count.scatter_add_(1, t.reshape(HIDDEN_LAYERS, -1).masked_fill(~mask.reshape(HIDDEN_LAYERS, -1), 0).long(),
                           mask.reshape(HIDDEN_LAYERS, -1).int())
        data = {"global_physical_count": count}
        if mode == "per_token":
            data.update(input_ids=rng.integers(0, 5000, n).tolist(), positions=list(range(pid, pid + n)),
                        extend_seq_lens=[n], forward_mode=1, topk_ids_of_layer=t.clone(), misc_objects=[])
        records.setdefault(rank, []).append(dict(forward_pass_id=pid, rank=rank, gatherer_key="primary", **data))
        truth.setdefault(pid, []).append((rank, logical))
    files = []
    for rank, recs in records.items():
        path = tmp_path / f"expert_distribution_recorder_1700000000.{rank}_{rank}.pt"
        torch.save(dict(records=recs, last_physical_to_logical_map=torch.as_tensor(m)), path)
        files.append(path)
    order = {pid: np.concatenate([lg for _, lg in sorted(v, key=lambda x: x[0])]) for pid, v in truth.items()}
    return files, order


def test_sglang_per_token_physical_to_logical_time_order_and_ranks(tmp_path):
    pytest.importorskip("torch")
    # two DP-attention ranks with their own tokens; records out of order across the files
    passes = [(3, 0, 5), (1, 0, 4), (1, 1, 6), (3, 1, 2), (2, 1, 3)]
    files, truth = sglang_detail_dumps(tmp_path, passes, "per_token")
    res = import_sglang_dump(files)                                       # per_token needs no --top-k
    t = res.trace
    assert isinstance(t, TokensTrace) and (t.meta.num_layers, t.meta.num_experts, t.meta.top_k) == (3, EXPERTS, K)
    assert t.tokens_per_step.tolist() == [10, 3, 7]                       # passes 1, 2, 3
    for s, pid in enumerate([1, 2, 3]):
        assert (t.step(s).experts == truth[pid]).all()                    # logical ids through the map
    assert t.step(0).rank.tolist() == [0] * 4 + [1] * 6
    assert t.step(2).pos.tolist() == [3, 4, 5, 6, 7, 3, 4]
    prov = t.meta.provenance
    assert prov["recorder_mode"] == "per_token" and prov["original_layer_ids"] == MOE_LAYERS
    assert prov["num_hidden_layers"] == HIDDEN_LAYERS and prov["forward_pass_ids"] == "1-3"
    with pytest.raises(UserError, match="the dumps hold top-2 routing .* but --top-k is 4"):
        import_sglang_dump(files, top_k=4)


def test_sglang_per_pass_equals_per_token_counts_and_plans_all_layers(tmp_path, capsys):
    pytest.importorskip("torch")
    passes = [(0, 0, 6), (0, 1, 5), (1, 0, 3), (2, 1, 7)]
    (tmp_path / "tok").mkdir()
    (tmp_path / "pass").mkdir()
    tok_files, _ = sglang_detail_dumps(tmp_path / "tok", passes, "per_token")
    pass_files, _ = sglang_detail_dumps(tmp_path / "pass", passes, "per_pass")
    with pytest.raises(UserError, match="per_pass records need --top-k"):
        import_sglang_dump(pass_files)
    counts = import_sglang_dump(pass_files, top_k=K).trace
    tokens = import_sglang_dump(tok_files).trace
    assert isinstance(counts, CountsTrace)
    assert (counts.counts() == tokens.counts()).all() and counts.tokens_per_step.tolist() == [11, 3, 7]
    out = tmp_path / "pp.parquet"
    assert main(["trace", "import", "--from", "sglang-dump", *map(str, pass_files), "--top-k", "2",
                 "-o", str(out)]) == 0
    assert "steps: one per forward pass with counts (per_pass records), in forward_pass_id order, ranks summed; " \
           "3 step(s)" in capsys.readouterr().out
    assert main(["trace", "validate", str(out)]) == 0
    assert main(["plan", str(out), "--gpus", "4", "--redundant", "4", "-o", str(tmp_path / "p.yaml"),
                 "--sglang", str(tmp_path / "s.json"), "--sglang-logical-count", str(tmp_path / "lc.json")]) == 0
    assert len(json.loads((tmp_path / "s.json").read_text())["physical_to_logical_map"]) == HIDDEN_LAYERS
    lc = json.loads((tmp_path / "lc.json").read_text())["logical_count"]
    assert len(lc) == HIDDEN_LAYERS and lc[0] == [0] * EXPERTS
    assert lc[1:] == counts.counts().sum(axis=0).tolist()


def test_sglang_detail_dumps_refuse_duplicate_ranks_and_mixed_modes(tmp_path):
    torch = pytest.importorskip("torch")
    files, _ = sglang_detail_dumps(tmp_path, [(0, 0, 4)], "per_token")
    obj = torch.load(files[0], weights_only=True)
    twin = dict(obj, records=[dict(r, rank=1) for r in obj["records"]])   # rank 1 routed the same tokens
    torch.save(twin, tmp_path / "twin.pt")
    with pytest.raises(UserError, match=r"rank 1 recorded the same tokens as rank 0 in forward pass 0 \(attention "
                                        r"tensor parallelism\); give one rank's file"):
        import_sglang_dump([files[0], tmp_path / "twin.pt"])
    with pytest.raises(UserError, match="forward pass 0 of rank 0 is also in"):
        import_sglang_dump([files[0], files[0]])
    torch.save(dict(logical_count=torch.ones(2, 3, 4, dtype=torch.int32)), tmp_path / "stat.pt")
    with pytest.raises(UserError, match="is a per_pass/per_token dump but .*stat.pt a stat dump"):
        import_sglang_dump([files[0], tmp_path / "stat.pt"], top_k=2)
    bad = dict(obj, last_physical_to_logical_map=torch.zeros(HIDDEN_LAYERS, PHYSICAL, dtype=torch.int64) + 1)
    torch.save(bad, tmp_path / "badmap.pt")
    with pytest.raises(UserError, match="is not a map of physical slots to logical experts"):
        import_sglang_dump([tmp_path / "badmap.pt"])


def test_sglang_stat_dump_says_how_many_decoder_layers(tmp_path):
    """stat dumps count every decoder layer: plan --sglang needs no flag for them."""
    torch = pytest.importorskip("torch")
    lc = torch.zeros(8, HIDDEN_LAYERS, EXPERTS, dtype=torch.int32)
    for row in range(3):
        for layer in MOE_LAYERS:
            lc[row, layer] = torch.as_tensor(np.bincount(routing(5, row).ravel()[:10], minlength=EXPERTS))
    torch.save(dict(rank=0, logical_count=lc, average_utilization_rate_over_window=None), tmp_path / "s.pt")
    t = import_sglang_dump([tmp_path / "s.pt"], top_k=K).trace
    assert t.meta.provenance["num_hidden_layers"] == HIDDEN_LAYERS
    assert main(["trace", "import", "--from", "sglang-dump", str(tmp_path / "s.pt"), "--top-k", "2",
                 "-o", str(tmp_path / "s.parquet")]) == 0
    assert main(["plan", str(tmp_path / "s.parquet"), "--gpus", "2", "-o", str(tmp_path / "p.yaml"),
                 "--sglang", str(tmp_path / "m.json")]) == 0
    assert len(json.loads((tmp_path / "m.json").read_text())["physical_to_logical_map"]) == HIDDEN_LAYERS


def test_vllm_balancedness_differs_from_the_mean_over_layers_on_real_qwen3(real_traces, tmp_path, capsys):
    """The real Qwen3-30B-A3B prefill pass on 8 GPUs without copies: vLLM's sum-over-layers
    balancedness (what its EPLB logs) is lower than the mean over layers of mean/max."""
    from moe_gps.placement import balancedness, plan_placement, vllm_balancedness
    from moe_gps.trace.importers import import_vllm_jsonl

    t = import_vllm_jsonl([real_traces / "qwen3-30b-a3b-vllm-sharegpt" / "token_distri_8.jsonl"], num_layers=48,
                          num_experts=128, min_tokens=100).trace
    loads = t.counts()[0]
    gpu = plan_placement(loads, 8, 0, "none").gpu_loads(loads)
    assert balancedness(gpu).mean() == pytest.approx(0.6635, abs=5e-5)
    assert vllm_balancedness(gpu) == pytest.approx(0.6522, abs=5e-5)


def _other_importer_inputs(tmp_path):
    """Small inputs of the importers whose files do not say how many decoder layers the model has."""
    rng = np.random.default_rng(0)
    L, E, k = 3, 8, 2
    ids = [[np.argsort(rng.random((5, E)), axis=1)[:, :k].tolist() for _ in range(L)] for _ in range(2)]
    (tmp_path / "v.jsonl").write_text("".join(json.dumps({"topk_ids": c}) + "\n" for p in ids for c in p))
    (tmp_path / "p.json").write_text(json.dumps({"expert_popularity": np.full((L, E), 4).tolist()}))
    np.savez(tmp_path / "h.npz", *[rng.normal(size=(6, E)) for _ in range(L)])
    step = tmp_path / "csv"
    step.mkdir()
    for layer in (2, 4, 5):                                   # file names say decoder layers 2, 4, 5
        scores = np.zeros((4, E))
        np.put_along_axis(scores, np.argsort(rng.random((4, E)), axis=1)[:, :k], 0.5, axis=1)
        rows = [f"0,{t}," + ",".join(f"{v:g}" for v in r) for t, r in enumerate(scores)]
        (step / f"layer{layer}.csv").write_text("layer_id,token_id," + ",".join(f"expert_{j}" for j in range(E))
                                                + "\n" + "\n".join(rows) + "\n")
    return {"vllm-jsonl": ([tmp_path / "v.jsonl"], ["--num-layers", "3", "--num-experts", "8"]),
            "popularity-json": ([tmp_path / "p.json"], ["--top-k", "2"]),
            "hf-router-logits": ([tmp_path / "h.npz"], ["--top-k", "2"]),
            "gate-csv": ([step], [])}


@pytest.mark.parametrize("fmt", ["vllm-jsonl", "popularity-json", "hf-router-logits", "gate-csv"])
def test_plan_sglang_rows_equal_the_model_layers_for_the_other_importers(tmp_path, capsys, fmt):
    src, flags = _other_importer_inputs(tmp_path)[fmt]
    trace = tmp_path / "t.parquet"
    assert main(["trace", "import", "--from", fmt, *map(str, src), *flags, "-o", str(trace)]) == 0
    assert "steps: one per" in capsys.readouterr().out
    assert main(["trace", "validate", str(trace)]) == 0
    plan = ["plan", str(trace), "--gpus", "2", "-o", str(tmp_path / "p.yaml"), "--sglang", str(tmp_path / "s.json")]
    assert main(plan) == 2                                    # the file cannot say: refused, nothing written
    assert "pass --num-hidden-layers" in capsys.readouterr().err and not (tmp_path / "s.json").exists()
    extra = [] if fmt == "gate-csv" else ["--first-moe-layer", "2"]   # gate-csv: ids 2, 4, 5 from its file names
    assert main(plan + ["--num-hidden-layers", "6", *extra]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())["physical_to_logical_map"]
    assert len(rows) == 6


def test_plan_sglang_rows_from_a_per_token_dump(tmp_path):
    pytest.importorskip("torch")
    files, _ = sglang_detail_dumps(tmp_path, [(0, 0, 5), (1, 0, 4)], "per_token")
    assert main(["trace", "import", "--from", "sglang-dump", *map(str, files), "-o", str(tmp_path / "t.parquet")]) == 0
    assert main(["trace", "validate", str(tmp_path / "t.parquet")]) == 0
    assert main(["plan", str(tmp_path / "t.parquet"), "--gpus", "2", "-o", str(tmp_path / "p.yaml"),
                 "--sglang", str(tmp_path / "s.json")]) == 0
    assert len(json.loads((tmp_path / "s.json").read_text())["physical_to_logical_map"]) == HIDDEN_LAYERS


@pytest.mark.parametrize("field, value", [("rank", -1), ("rank", 1.5), ("forward_pass_id", -3), ("rank", True)])
def test_sglang_records_with_a_bad_rank_or_pass_id_are_one_line(tmp_path, field, value):
    torch = pytest.importorskip("torch")
    files, _ = sglang_detail_dumps(tmp_path, [(1, 0, 4)], "per_token")
    dump = torch.load(files[0], weights_only=False)
    dump["records"][0][field] = value
    torch.save(dump, files[0])
    with pytest.raises(UserError, match=rf"records\[0\]\.{field}: must be an integer >= 0, got {value!r}"):
        import_sglang_dump(files)
