"""Configs: presets load, every field is documented, bad files fail with one clear line."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moe_gps.config import (ClusterConfig, ModelConfig, SimulateConfig, StrategyConfig, WorkloadConfig,
                            check_combination, infer_model, load_cluster, load_model, load_simulate_config,
                            preset_names, strategy_from_name)
from moe_gps.config.loader import dump_yaml, memory_use, to_dict
from moe_gps.config.schema import AttentionSpec, GPUSpec, LinkSpec
from moe_gps.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, name: str, data) -> str:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return str(p)


def cluster_dict(**over) -> dict:
    d = to_dict(load_cluster("4xA100-nvlink"))
    d.update(over)
    return d


def test_presets_are_the_ones_the_issue_names():
    assert preset_names("clusters") == ["2x8xH100-ib", "4xA100-nvlink", "4xA100-pcie", "8xH100-nvlink"]
    assert preset_names("models") == ["deepseek-v3", "mixtral-8x7b", "qwen3-30b-a3b"]


def test_preset_numbers():
    nv, pcie = load_cluster("4xA100-nvlink"), load_cluster("4xA100-pcie")
    assert (nv.num_gpus, nv.intra_node.bandwidth_gb_s) == (4, 300.0)
    assert (pcie.num_gpus, pcie.intra_node.bandwidth_gb_s) == (4, 32.0)
    ib = load_cluster("2x8xH100-ib")
    assert (ib.num_gpus, ib.gpus_per_node, ib.num_nodes) == (16, 8, 2) and ib.inter_node is not None
    mix = load_model("mixtral-8x7b")
    # 3 x 4096 x 14336 weights of 2 bytes per expert; 46.7B parameters in total
    assert mix.expert_bytes == 3 * 4096 * 14336 * 2
    total = mix.num_layers * (mix.num_experts * mix.expert_params + mix.attention_params)
    assert 45.5e9 < total < 46.7e9           # + embeddings (0.26B) = 46.7B
    ds = load_model("deepseek-v3")
    assert (ds.num_layers, ds.num_experts, ds.top_k, ds.weight_bytes) == (58, 256, 8, 1.0)
    routed = ds.num_layers * ds.num_experts * ds.expert_params
    assert 650e9 < routed < 660e9            # of 671B total
    q = load_model("qwen3-30b-a3b")
    assert (q.num_layers, q.num_experts, q.top_k, q.moe_intermediate_size) == (48, 128, 8, 768)


def test_every_field_is_documented():
    doc = (ROOT / "docs" / "configs.md").read_text(encoding="utf-8")
    classes = [ClusterConfig, GPUSpec, LinkSpec, ModelConfig, AttentionSpec, WorkloadConfig, StrategyConfig,
               SimulateConfig]
    missing = [f"{c.__name__}.{f.name}" for c in classes for f in dataclasses.fields(c)
               if f"`{f.name}`" not in doc]
    assert not missing, f"fields missing from docs/configs.md: {missing}"
    for c in classes:
        for f in dataclasses.fields(c):
            assert f.metadata.get("doc"), f"{c.__name__}.{f.name} has no doc string"


def test_round_trip_through_yaml(tmp_path):
    for name in preset_names("clusters"):
        c = load_cluster(name)
        assert load_cluster(write(tmp_path, f"{name}.yaml", dump_yaml(c))) == c
    for name in preset_names("models"):
        m = load_model(name)
        assert load_model(write(tmp_path, f"{name}.yaml", dump_yaml(m))) == m


@pytest.mark.parametrize("change, message", [
    ({"gpu": {"peak_tflop_bf16": 1}}, r"c\.yaml: gpu\.peak_tflop_bf16: unknown key; did you mean 'peak_tflops_bf16'\?"),
    ({"bogus": 1}, r"c\.yaml: bogus: unknown key \(known keys: name, num_gpus"),
    ({"num_gpus": 0}, r"c\.yaml: num_gpus: must be an integer >= 1, got 0"),
    ({"num_gpus": 2.5}, r"c\.yaml: num_gpus: must be an integer, got 2\.5"),
    ({"num_gpus": True}, r"c\.yaml: num_gpus: must be an integer, got True"),
    ({"intra_node": {"bandwidth_gb_s": -3, "latency_us": 1}},
     r"c\.yaml: intra_node\.bandwidth_gb_s: must be a number > 0, got -3"),
    ({"intra_node": {"bandwidth_gb_s": "fast", "latency_us": 1}},
     r"c\.yaml: intra_node\.bandwidth_gb_s: must be a number, got 'fast'"),
    ({"intra_node": {"bandwidth_gb_s": 10}}, r"c\.yaml: intra_node\.latency_us: missing"),
    ({"num_gpus": 6, "gpus_per_node": 4}, r"c\.yaml: gpus_per_node: 4 does not divide num_gpus=6"),
    ({"num_gpus": 8, "gpus_per_node": 4}, r"c\.yaml: inter_node: required, the cluster has 2 nodes"),
    ({"gpu": {"reserved_memory_gb": 90}}, r"c\.yaml: gpu\.reserved_memory_gb: 90 GB leaves nothing of the GPU's "
                                          r"hbm_capacity_gb=80"),     # was "> -10.0 GB available" on a strategy
])
def test_bad_cluster_messages(tmp_path, change, message):
    d = cluster_dict()
    for k, v in change.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict) and k != "intra_node":
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    with pytest.raises(UserError, match=message):
        load_cluster(write(tmp_path, "c.yaml", d))


def test_gpu_compute_efficiency_range(tmp_path):
    d = cluster_dict()
    d["gpu"]["compute_efficiency"] = 1.5
    with pytest.raises(UserError, match=r"gpu\.compute_efficiency: must be a number <= 1, got 1\.5"):
        load_cluster(write(tmp_path, "c.yaml", d))


def test_bad_model_messages(tmp_path):
    d = to_dict(load_model("mixtral-8x7b"))
    d["top_k"] = 9
    with pytest.raises(UserError, match=r"m\.yaml: top_k: 9 exceeds num_experts=8"):
        load_model(write(tmp_path, "m.yaml", d))
    d["top_k"] = 2
    d["compute_dtype"] = "fp4"
    with pytest.raises(UserError, match=r"m\.yaml: compute_dtype: must be one of bf16, fp8, got 'fp4'"):
        load_model(write(tmp_path, "m.yaml", d))
    d["compute_dtype"] = "bf16"
    d["attention"]["num_kv_heads"] = 5
    with pytest.raises(UserError, match=r"m\.yaml: attention\.num_kv_heads: 5 does not divide num_heads=32"):
        load_model(write(tmp_path, "m.yaml", d))


def test_yaml_syntax_and_missing_files(tmp_path):
    with pytest.raises(UserError, match=r"bad\.yaml: not valid YAML at line 2"):
        load_cluster(write(tmp_path, "bad.yaml", "name: x\n  num_gpus: [4\n"))
    with pytest.raises(UserError, match=r"nope\.yaml: no such file"):
        load_cluster(str(tmp_path / "nope.yaml"))
    with pytest.raises(UserError, match=r"unknown cluster preset '8xB200' \(presets: 2x8xH100-ib, 4xA100-nvlink"):
        load_cluster("8xB200")
    with pytest.raises(UserError, match=r"e\.yaml: empty YAML file"):
        load_cluster(write(tmp_path, "e.yaml", ""))
    with pytest.raises(UserError, match=r"l\.yaml: top level: must be a mapping"):
        load_cluster(write(tmp_path, "l.yaml", "- 1\n- 2\n"))


def test_strategy_rules():
    with pytest.raises(UserError, match=r"predictor: required for kind distribution"):
        StrategyConfig(kind="distribution").check("s")
    with pytest.raises(UserError, match=r"s: predictor: kind oracle uses no predictor"):
        StrategyConfig(kind="oracle", predictor="ema").check("s")
    with pytest.raises(UserError, match=r"s: direct_routing: only meaningful for kind token"):
        StrategyConfig(kind="oracle", direct_routing=False).check("s")
    with pytest.raises(UserError, match=r"strategy 'dist': not a strategy name"):
        strategy_from_name("dist")
    assert strategy_from_name("eplb").resolved_planner() == "eplb"
    assert strategy_from_name("dist:ema").resolved_planner() == "timeaware"
    assert strategy_from_name("token:prev-layer").resolved_name() == "token:prev-layer"
    # eplb follows vLLM's EPLB cadence (window_size 1000, step_interval 3000), scaled down with a
    # note when fewer steps were seen; the predicting kinds check every 16 steps
    full = strategy_from_name("eplb").resolved_policy(5000)
    assert (full.interval, full.window, full.min_gain, full.notes) == (3000, 1000, 0.0, [])
    short = strategy_from_name("eplb").resolved_policy(16)
    assert (short.interval, short.window) == (48, 16) and "scaled" in short.notes[0]
    dist = strategy_from_name("dist:ema").resolved_policy(16)
    assert (dist.interval, dist.window, dist.min_gain) == (16, 16, 1.0)
    assert strategy_from_name("oracle").resolved_policy(16).window == 1
    with pytest.raises(UserError, match=r"s: min_gain: kind none never re-plans"):
        StrategyConfig(kind="none", min_gain=1.0).check("s")
    s = strategy_from_name("token:synthetic(accuracy=0.95, overhead=8.4e6, placement=typical)")
    assert s.predictor_options == {"accuracy": 0.95, "overhead": 8.4e6, "placement": "typical"}
    assert s.resolved_name() == "token:synthetic(accuracy=0.95, overhead=8.4e6, placement=typical)"
    with pytest.raises(UserError, match=r"options must be key=value pairs"):
        strategy_from_name("dist:ema(0.3)")
    with pytest.raises(UserError, match=r"only dist:PREDICTOR, token:PREDICTOR and eplb"):
        strategy_from_name("none(x=1)")
    with pytest.raises(UserError, match=r"eplb_config: unknown key 'x'"):
        strategy_from_name("eplb(x=1)")


def test_eplb_takes_vllms_own_knobs(tmp_path):
    """vLLM's --eplb-config names, as eplb(...) options and as a strategy's eplb_config."""
    s = strategy_from_name("eplb(window_size=100, step_interval=300, num_redundant_experts=8, log_balancedness=true)")
    assert (s.window, s.replan_interval, s.redundant_slots, s.eplb_config) == (100, 300, 8, None)
    assert s.resolved_name() == "eplb(window_size=100, step_interval=300, num_redundant_experts=8, log_balancedness=true)"
    pol = s.resolved_policy(16)
    assert (pol.interval, pol.window, pol.min_gain, pol.notes) == (300, 100, 0.0, [])
    with pytest.raises(UserError, match=r"eplb_config: step_interval must be an integer >= 1, got 0"):
        strategy_from_name("eplb(step_interval=0)")
    with pytest.raises(UserError, match=r"eplb_config: only for kind static"):
        StrategyConfig(kind="distribution", predictor="ema", eplb_config={"window_size": 10}).check("s")
    with pytest.raises(UserError, match=r"eplb_config: window_size and window both given"):
        StrategyConfig(kind="static", window=5, eplb_config={"window_size": 10}).check("s")
    path = write(tmp_path, "s.yaml", "kind: static\neplb_config: {window_size: 64, step_interval: 192}\n")
    from moe_gps.config.loader import build
    from moe_gps.files import read_yaml
    cfg = build(StrategyConfig, read_yaml(path), str(path))
    assert (cfg.window, cfg.replan_interval, cfg.eplb_config) == (64, 192, None)


def test_impossible_combinations():
    cluster, model, w = load_cluster("4xA100-nvlink"), load_model("mixtral-8x7b"), WorkloadConfig()
    uneven = dataclasses.replace(strategy_from_name("eplb"), redundant_slots=3)
    with pytest.raises(UserError, match=r"strategies\[0\] \(eplb\): redundant_slots: num_experts \(8\) \+ "
                                        r"redundant_slots \(3\) = 11 slots do not divide evenly over 4 GPUs "
                                        r"\(use 0 plus a multiple of 4, e.g. 4\)"):
        check_combination(cluster, model, w, [uneven], 512)
    # 8 slots per GPU x 32 layers x 0.352 GB = 90 GB > 72 GB
    big = dataclasses.replace(strategy_from_name("oracle"), redundant_slots=24)
    with pytest.raises(UserError, match=r"model mixtral-8x7b does not fit cluster 4xA100-nvlink: per GPU 8 "
                                        r"expert slots x 32 layers x 0.352 GB = 90.2 GB of experts"):
        check_combination(cluster, model, w, [big], 512)
    h8 = load_cluster("8xH100-nvlink")
    few = ModelConfig(name="tiny", num_layers=2, num_experts=4, top_k=1, hidden_size=64,
                      moe_intermediate_size=64, attention=AttentionSpec(num_heads=2, num_kv_heads=2, head_dim=32))
    with pytest.raises(UserError, match=r"4 slots for 8 GPUs; every GPU needs at least one expert slot"):
        check_combination(h8, few, w, [dataclasses.replace(strategy_from_name("eplb"), redundant_slots=0)], 64)
    check_combination(h8, few, w, [strategy_from_name("none")], 64)      # 4 spare slots fill the GPUs
    with pytest.raises(UserError, match=r"\(none\): redundant_slots: kind none duplicates nothing; it may only "
                                        r"hold the 0 spare slot\(s\) that make 8 experts divide over 4 GPUs, got 4"):
        check_combination(cluster, model, w, [StrategyConfig(kind="none", redundant_slots=4)], 512)
    with pytest.raises(UserError, match=r"names must be unique, 'eplb' appears twice"):
        check_combination(cluster, model, w, [strategy_from_name("eplb")] * 2, 512)
    check_combination(cluster, model, w, [strategy_from_name("none"), strategy_from_name("eplb")], 512)


def test_memory_use_formula():
    cluster, model = load_cluster("4xA100-nvlink"), load_model("mixtral-8x7b")
    m = memory_use(cluster, model, WorkloadConfig(phase="decode", seq_len=1000), slots_per_gpu=3,
                   tokens_per_step=400)
    assert m.expert_weights == 3 * 32 * 3 * 4096 * 14336 * 2
    assert m.dense_weights == 32 * 4096 * 128 * (64 + 16) * 2
    assert m.kv_cache == 100 * 1000 * 32 * (2 * 8 * 128 * 2)   # 100 sequences per GPU, 1000 tokens each
    assert m.available == 72e9


def test_infer_model_from_trace_metadata():
    assert infer_model("mixtral-8x7b", 32, 8, 2).name == "mixtral-8x7b"
    assert infer_model("mistralai/Mixtral-8x7B-Instruct-v0.1", 32, 8, 2).name == "mixtral-8x7b"
    assert infer_model("Qwen3-30B-A3B-Instruct-2507", 48, 128, 8).name == "qwen3-30b-a3b"
    assert infer_model("mixtral-8x7b", 8, 8, 2) is None          # shape does not match
    assert infer_model("flame-moe-290m", 8, 64, 6) is None


def test_simulate_config_file(tmp_path):
    data = {"cluster": to_dict(load_cluster("4xA100-pcie")), "model": to_dict(load_model("mixtral-8x7b")),
            "strategies": [{"kind": "none"}, {"kind": "distribution", "predictor": "ema", "replan_interval": 0}]}
    with pytest.raises(UserError, match=r"s\.yaml: strategies\[1\]\.replan_interval: must be an integer >= 1"):
        load_simulate_config(write(tmp_path, "s.yaml", data))
    data["strategies"][1]["replan_interval"] = 2
    cfg = load_simulate_config(write(tmp_path, "s.yaml", data))
    assert cfg.strategies[1].resolved_name() == "dist:ema" and cfg.seed == 0
    data["strategies"][1]["kind"] = "token"
    data["strategies"][1]["predictor"] = None
    with pytest.raises(UserError, match=r"s\.yaml: strategies\[1\]: predictor: required for kind token"):
        load_simulate_config(write(tmp_path, "s.yaml", data))


def test_cli_bad_cluster_is_one_line_exit_2(tmp_path):
    bad = write(tmp_path, "c.yaml", {"name": "x"})
    trace = ROOT / "traces" / "mixtral_mmlu.parquet"
    proc = subprocess.run([sys.executable, "-m", "moe_gps.cli.main", "simulate", str(trace), "--cluster", bad,
                           "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert re.fullmatch(r"moe-gps: error: .*c\.yaml: num_gpus: missing \(required: .*\)", proc.stderr.strip())
    assert not (tmp_path / "out").exists()


def test_split_strategy_names():
    from moe_gps.config.loader import split_strategy_names
    assert split_strategy_names(["none,eplb", "token:synthetic(accuracy=0.9,overhead=1e6) oracle"]) == [
        "none", "eplb", "token:synthetic(accuracy=0.9,overhead=1e6)", "oracle"]
    with pytest.raises(UserError, match=r"strategy 'token:synthetic\(accuracy=': '\(' without '\)'"):
        split_strategy_names(["none,token:synthetic(accuracy="])
    with pytest.raises(UserError, match=r"strategy 'eplb\)': '\)' without '\('"):
        split_strategy_names(["eplb),none"])


def test_cli_unbalanced_strategy_is_named(capsys):
    from moe_gps.cli.main import main
    trace = ROOT / "traces" / "mixtral_mmlu.parquet"
    assert main(["simulate", str(trace), "--strategies", "token:synthetic(accuracy=", "--no-plots"]) == 2
    assert "moe-gps: error: --strategies: strategy 'token:synthetic(accuracy=': '(' without ')'" in capsys.readouterr().err


def test_default_redundant_slots_divide_when_experts_do_not_fill_the_gpus():
    """By default a duplicating strategy has one slot per GPU beyond the spares that make the experts divide
    over the GPUs; none only those spares (8 experts on 16 GPUs: 8 spares, 24 for the others)."""
    for E, G, none, dup in ((8, 4, 0, 4), (8, 16, 8, 24), (60, 8, 4, 12), (256, 64, 0, 64)):
        assert strategy_from_name("none").resolved_redundant(G, E) == none
        for name in ("eplb", "dist:ema", "token:prev-layer", "oracle"):
            assert strategy_from_name(name).resolved_redundant(G, E) == dup
            assert (E + dup) % G == 0
    cluster, model = load_cluster("2x8xH100-ib"), load_model("mixtral-8x7b")
    check_combination(cluster, model, WorkloadConfig(), [strategy_from_name(n) for n in ("none", "eplb", "oracle")],
                      512)
