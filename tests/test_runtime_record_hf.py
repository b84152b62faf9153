"""HuggingFace MoE models: the router-hook trace recorder and the expert-parallel runtime on a checkpoint.

Tiny randomly initialised Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE models are built in the
test (no downloads).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moe_gps.trace import load_trace  # noqa: E402
from moe_gps.trace.importers.hf_router_logits import routing_from_router_logits  # noqa: E402
from runtime.config import InputSection  # noqa: E402
from runtime.inputs import TokenSource  # noqa: E402
from runtime.local import run_local  # noqa: E402
from runtime.record_hf import RouterRecorder, record_trace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_config(kind: str):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig
    if kind == "mixtral":
        return MixtralConfig(num_hidden_layers=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                             **COMMON)
    if kind == "qwen2_moe":   # layer 1 is dense: 2 MoE layers out of 3; a shared expert
        return Qwen2MoeConfig(num_hidden_layers=3, mlp_only_layers=[1], intermediate_size=48,
                              moe_intermediate_size=24, shared_expert_intermediate_size=48, num_experts=4,
                              num_experts_per_tok=2, **COMMON)
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                              num_experts_per_tok=2, head_dim=8, norm_topk_prob=True, **COMMON)
    return OlmoeConfig(num_hidden_layers=2, intermediate_size=48, num_experts=4, num_experts_per_tok=2, **COMMON)


def tiny_model(kind: str, seed: int = 0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(kind)).eval()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_recorded_routing_is_the_models_routing(kind, tmp_path):
    model = tiny_model(kind)
    out = tmp_path / f"{kind}.parquet"
    s = record_trace(model, out, steps=2, batch=2, seq_len=8, seed=4, model_name=kind)
    trace = load_trace(out)
    m = trace.meta
    moe_layers = 2
    assert (m.kind, m.source, m.num_layers, m.num_experts, m.top_k) == ("tokens", "collected", moe_layers, 4, 2)
    assert trace.num_steps == 2 and set(trace.tokens_per_step.tolist()) == {16}
    assert "top-k indices" in m.provenance["router_output"] and s["router_output"] == m.provenance["router_output"]
    if kind == "qwen2_moe":
        assert m.provenance["moe_layers"] == ["model.layers.0.mlp", "model.layers.2.mlp"]
        assert m.provenance["num_hidden_layers"] == 3
        # what plan --sglang reads from it: the MoE layers' decoder ids and the model's layer count
        from moe_gps.trace.layer_ids import decoder_layers
        layers = decoder_layers(m.num_layers, m.provenance)
        assert (layers.ids, layers.total) == ([0, 2], 3)
    normalize = model.config.model_type == "mixtral" or bool(model.config.norm_topk_prob)
    src = TokenSource(InputSection(batch_size=2, seq_len=8, seed=4), 96, 1)
    for step in range(2):
        ids = src.batch(step, 0).token_id
        assert np.array_equal(trace.step(step).token_id, ids.reshape(-1))
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(ids), output_router_logits=True).router_logits
        experts, weights = routing_from_router_logits(logits, 2, normalize)
        assert np.array_equal(trace.step(step).experts, experts)
        assert np.allclose(trace.step(step).weights, weights, atol=1e-5)


def test_logits_only_router_goes_through_routing_from_router_logits():
    """A transformers v4 style block: the gate is a linear layer returning logits only."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(8, 6, bias=False)
            self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(6))

        def forward(self, x):
            self.gate(x.reshape(-1, 8))
            return x

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(model_type="qwen2_moe", num_experts=6, num_experts_per_tok=3,
                                          norm_topk_prob=False)
            self.blocks = torch.nn.ModuleList(Block() for _ in range(2))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    torch.manual_seed(0)
    model = Model()
    rec = RouterRecorder(model)
    x = torch.randn(2, 5, 8)
    model(x)
    experts, weights = rec.take()
    want = routing_from_router_logits([b.gate(x.reshape(-1, 8)).detach() for b in model.blocks], 3, False)
    assert np.array_equal(experts, want[0]) and np.allclose(weights, want[1])
    assert "routing_from_router_logits" in rec.router_output


def test_moe_gps_record_command_on_a_saved_checkpoint(tmp_path):
    from moe_gps.cli.main import main
    ckpt = tmp_path / "tiny-mixtral"
    tiny_model("mixtral").save_pretrained(ckpt)
    out = tmp_path / "rec.parquet"
    src_trace = ROOT / "traces" / "mixtral_mmlu.parquet"
    assert main(["record", "--model", str(ckpt), "-o", str(out), "--input-trace", str(src_trace), "--steps", "2",
                 "--batch", "2", "--seq-len", "8", "--device", "cpu"]) == 0
    trace = load_trace(out)
    assert trace.meta.model == "tiny-mixtral" and trace.meta.source == "collected"
    ids = load_trace(src_trace).token_id[:16] % 96
    assert np.array_equal(trace.step(0).token_id, ids)
    assert main(["trace", "inspect", str(out)]) == 0
    assert main(["record", "--model", str(tmp_path / "nowhere"), "-o", str(out)]) == 2


# ----------------------------------------------------------------------------- expert parallel on a checkpoint

def hf_ep_worker(ctx, checkpoints: dict, out_dir: str):
    """On each rank: the EP model from the checkpoint equals the unmodified model, before and after a move."""
    from moe_gps.placement import plan_placement
    from runtime.apply import Fingerprints, apply_placement
    from runtime.build import build_model, forward
    from runtime.config import ModelSection, parse_run_config
    from runtime.hf import load_hf_model
    from runtime.launch import run

    errors = {}
    for kind, path in checkpoints.items():
        handle = build_model(ModelSection(checkpoint=path), ctx)
        ref = load_hf_model(path, torch.float32)
        L = handle.num_layers
        p = plan_placement(np.array([[9.0, 1, 1, 1]] * L), ctx.world_size, 2, algorithm="eplb")
        handle.install(p, ctx)
        fp = Fingerprints(handle.experts, ctx)
        ids = torch.as_tensor(np.random.default_rng(ctx.rank).integers(0, 96, (2, 12)))
        with torch.no_grad():
            want = ref.model(input_ids=ids).last_hidden_state
        errs = [float((forward(handle, ids) - want).abs().max())]
        q = plan_placement(np.array([[1.0, 1, 1, 9]] * L), ctx.world_size, 2, algorithm="greedy")
        apply_placement(handle.experts, q.phy2log, q.replica_share, ctx, fp)
        errs.append(float((forward(handle, ids) - want).abs().max()))
        errors[kind] = errs
    cfg = parse_run_config({"model": {"checkpoint": checkpoints["mixtral"]},
                            "input": {"batch_size": 1, "seq_len": 8},
                            "run": {"steps": 3},
                            "duplication": {"num_redundant": 2, "warmup_steps": 1, "replan_interval": 1},
                            "output": {"dir": out_dir}})
    summary = run(cfg, "dist-only", quiet=True, ctx=ctx)
    return errors, summary


def test_expert_parallel_checkpoint_equals_the_model_on_2_ranks(tmp_path):
    ckpts = {}
    for kind in ("mixtral", "qwen2_moe"):
        ckpts[kind] = str(tmp_path / kind)
        tiny_model(kind, seed=1).save_pretrained(ckpts[kind])
    res = run_local(hf_ep_worker, 2, ckpts, str(tmp_path / "run"), timeout_s=120)
    for errors, _ in res:
        for kind, errs in errors.items():
            assert max(errs) < 1e-5, (kind, errs)
    trace = load_trace(tmp_path / "run" / "trace.parquet")
    assert trace.meta.model == "mixtral" and trace.meta.num_layers == 2 and trace.num_steps == 3
    assert trace.meta.provenance["model"].startswith(str(tmp_path / "mixtral"))


def test_record_checks_its_inputs_before_loading_and_names_what_it_repeats(tmp_path, capsys):
    """--device cuda without CUDA and a missing --input-trace are one line before the checkpoint loads; a
    snapshot of the Hugging Face cache is named ORG/NAME; input shorter than the run is cycled, with a warning."""
    import torch

    from moe_gps.cli.main import main
    from runtime.record_hf import checkpoint_name
    if not torch.cuda.is_available():
        assert main(["record", "--model", str(tmp_path / "nowhere"), "--device", "cuda",
                     "-o", str(tmp_path / "t.parquet")]) == 2
        assert "--device cuda: no CUDA device visible" in capsys.readouterr().err
    assert main(["record", "--model", str(tmp_path / "nowhere"), "--input-trace", str(tmp_path / "none.parquet"),
                 "-o", str(tmp_path / "t.parquet")]) == 2
    assert "none.parquet: no such trace" in capsys.readouterr().err        # not "no config.json": checked first
    snap = tmp_path / "hub" / "models--org--Tiny-MoE" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    assert checkpoint_name(snap) == "org/Tiny-MoE" and checkpoint_name(tmp_path / "hub") == "hub"
    s = record_trace(tiny_model("mixtral"), tmp_path / "r.parquet", steps=2, batch=2, seq_len=8,
                     token_stream=np.arange(9))
    assert s["warnings"] == ["the input holds 9 tokens, fewer than the 32 of 2 steps x 2 x 8: they are cycled "
                             "3.6 times"]


# ----------------------------------------------------------------------------- what record refuses, and when

def _saved(tmp_path, name: str = "tiny-mixtral") -> Path:
    ckpt = tmp_path / name
    tiny_model("mixtral").save_pretrained(ckpt)
    return ckpt


def _record(*argv) -> int:
    from moe_gps.cli.main import main
    return main(["record", *map(str, argv), "--steps", "1", "--batch", "1", "--seq-len", "4", "--device", "cpu"])


def test_record_refuses_an_output_that_would_overwrite_an_input(tmp_path, capsys):
    """The output must be a .parquet file that is not --input-trace, not --text, not a file of the checkpoint
    (a hard link included) and not inside the checkpoint folder."""
    import os

    ckpt = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    src = tmp_path / "src.parquet"
    src.write_bytes((ROOT / "traces" / "mixtral_mmlu.parquet").read_bytes())
    text = tmp_path / "prompts.parquet"
    text.write_text("w1 w2 w3\n")
    os.link(ckpt / "model.safetensors", tmp_path / "link.parquet")
    cases = [(["-o", ckpt / "config.json"], "ending in .parquet"),
             (["-o", ckpt / "new.parquet"], "inside the checkpoint folder"),
             (["-o", ckpt / "sub" / ".." / "new.parquet"], "inside the checkpoint folder"),
             (["-o", src, "--input-trace", src], "would overwrite the --input-trace file"),
             (["-o", text, "--text", text], "would overwrite the --text file"),
             (["-o", tmp_path / "link.parquet"], "the same file as")]
    (ckpt / "sub").mkdir()
    capsys.readouterr()
    for flags, message in cases:
        assert _record("--model", ckpt, *flags) == 2, flags
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (flags, err)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()} == before
    assert text.read_text() == "w1 w2 w3\n"


def _drop_router_weights(ckpt: Path) -> None:
    from safetensors.torch import load_file, save_file
    weights = load_file(ckpt / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".gate." not in k}, ckpt / "model.safetensors",
              metadata={"format": "pt"})


def test_a_checkpoint_without_some_weights_is_refused_not_run_with_random_ones(tmp_path, capsys):
    """transformers initialises missing weights at random (a random router); record and the runtime's
    checkpoint loader refuse such a checkpoint, naming the missing keys."""
    from moe_gps.errors import UserError
    from runtime.hf import load_hf_model

    ckpt = _saved(tmp_path)
    _drop_router_weights(ckpt)
    assert _record("--model", ckpt, "-o", tmp_path / "t.parquet") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"moe-gps: error: {ckpt}: the checkpoint lacks weights")
    assert "model.layers.0.mlp.gate.weight" in err and not (tmp_path / "t.parquet").exists()
    with pytest.raises(UserError, match="mlp.gate.weight"):
        load_hf_model(ckpt, torch.float32)


def test_record_input_problems_are_one_line_before_the_checkpoint_loads(tmp_path, capsys, monkeypatch):
    """A --text file that is not UTF-8, a counts trace or a trace without token ids, a file that is not a
    trace, and a --model without config.json are one line each, found before the checkpoint loads."""
    from moe_gps.trace import TraceMeta, write_trace
    from moe_gps.trace.data import CountsTrace, TokensTrace

    import runtime.hf

    def no_loading(*_):
        raise AssertionError("the checkpoint loaded before its inputs were checked")
    monkeypatch.setattr(runtime.hf, "load_hf_model", no_loading)
    ckpt = tmp_path / "ckpt"
    tiny_config("mixtral").save_pretrained(ckpt)           # config.json only
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    write_trace(tmp_path / "counts.parquet", CountsTrace(TraceMeta("counts", 1, 4, 1), np.ones((2, 1, 4), np.int64)))
    meta = TraceMeta("tokens", 1, 4, 1)
    write_trace(tmp_path / "noids.parquet", TokensTrace(meta, np.zeros((4, 1, 1), np.int16), np.array([0, 4])))
    (tmp_path / "bad.parquet").write_text("step,layer\n")
    out = tmp_path / "t.parquet"
    no_ids = "the trace has no token ids"
    cases = [(["--model", ckpt, "--text", tmp_path / "latin1.txt"], "latin1.txt: not UTF-8 text (invalid"),
             (["--model", ckpt, "--input-trace", tmp_path / "counts.parquet"], f"counts.parquet: {no_ids}"),
             (["--model", ckpt, "--input-trace", tmp_path / "noids.parquet"], f"noids.parquet: {no_ids}"),
             (["--model", ckpt, "--input-trace", tmp_path / "bad.parquet"], "bad.parquet: not a Parquet file"),
             (["--model", tmp_path / "nowhere", "--text", tmp_path / "latin1.txt"],
              "nowhere: not a HuggingFace checkpoint folder (no config.json)")]
    capsys.readouterr()
    for flags, message in cases:
        assert _record(*flags, "-o", out) == 2, flags
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (flags, err)
    assert not out.exists()


def test_record_provenance_and_the_modulo_warning(tmp_path, capsys):
    """The provenance holds the checkpoint path, dtype and resolved device; token ids beyond the vocabulary are
    a warning on stderr and in the provenance."""
    from runtime.record_hf import add_arguments

    ckpt = _saved(tmp_path)
    out = tmp_path / "rec.parquet"
    assert _record("--model", ckpt, "-o", out, "--input-trace", ROOT / "traces" / "mixtral_mmlu.parquet") == 0
    captured = capsys.readouterr()
    prov = load_trace(out).meta.provenance
    assert (prov["checkpoint"], prov["dtype"], prov["device"]) == (str(ckpt), "float32", "cpu")
    ids = load_trace(ROOT / "traces" / "mixtral_mmlu.parquet").token_id
    over = int((ids >= 96).sum())
    assert over and prov["warnings"] == [f"{over} of the {len(ids)} input token ids are at or above the model's "
                                         "vocabulary of 96: they are taken modulo 96"]
    assert f"moe-gps: warning: {prov['warnings'][0]}\n" in captured.err and "warning" not in captured.out
    helps = {a.dest: a.help for a in _parser_actions(add_arguments)}
    assert "CUDA when PyTorch sees a CUDA device, else the CPU" in helps["device"]
    assert "only without --text and --input-trace" in helps["seed"]


def _parser_actions(add):
    import argparse
    p = argparse.ArgumentParser()
    add(p)
    return p._actions
