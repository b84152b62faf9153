"""The summary's `bound:` line: the oracle's speed-up over none and where it comes from."""

from __future__ import annotations

import re

from moe_gps.config import AttentionSpec, ModelConfig, SimulateConfig, load_cluster, strategy_from_name
from moe_gps.trace.synth import synthesize
from sim.report import format_summary, summary_rows
from sim.run import simulate
from sim.verdict import bound_lines, speedup_interval

MODEL = ModelConfig(name="moe-4l", num_layers=4, num_experts=8, top_k=2, hidden_size=2048,
                    moe_intermediate_size=8192, attention=AttentionSpec(num_heads=16, num_kv_heads=4, head_dim=128))


def _result(names, tokens):
    trace = synthesize("sst2", num_steps=12, tokens_per_step=tokens, seed=3, num_layers=4)
    cfg = SimulateConfig(cluster=load_cluster("4xA100-nvlink"), model=MODEL, train_steps=4,
                         strategies=[strategy_from_name(n) for n in names])
    return simulate(trace, cfg, progress=False)


def test_the_bound_line_gives_the_oracles_speedup_interval_ffn_and_dispatch():
    r = _result(["none", "eplb", "oracle"], 256)
    lines = bound_lines(r)
    assert len(lines) == 1 and lines[0] in format_summary(r).splitlines()
    rows = {row["strategy"]: row for row in summary_rows(r)}
    o, n = rows["oracle"], rows["none"]
    point, lo, hi = speedup_interval(r.get("none").step_latency, r.get("oracle").step_latency, r.config.seed)
    saved = n["layer_total_us"] - o["layer_total_us"]
    layout = 3 * 3.4           # the layout exchange on 4 GPUs of one NVLink node: 3 peers x 3.4 µs
    nums = [float(x) for x in re.findall(r"(?<!\d)-?\d+\.\d+", lines[0])]
    # speed-up, its interval, µs saved a layer, the layout exchange, the rest, FFN (oracle, none)
    assert nums == [round(v, 3) for v in (point, lo, hi)] + \
        [round(v, 1) for v in (saved, layout, saved - layout, o["layer_ffn_us"], n["layer_ffn_us"])]
    assert f"{o['speedup_vs_none']:.3f}x over none" in lines[0]
    assert f"oracle ({r.get('oracle').redundant_slots} redundant slots" in lines[0]
    # the layout exchange is what the oracle's dispatch skips: none's dispatch pays it, the oracle's not
    assert n["layer_dispatch_us"] - o["layer_dispatch_us"] >= layout - 1e-6


def test_no_bound_line_without_an_oracle_or_without_none():
    assert bound_lines(_result(["none", "eplb"], 256)) == []
    r = _result(["eplb", "oracle"], 256)
    assert bound_lines(r) == [] and "bound:" not in format_summary(r)


def test_a_placement_share_that_rounds_to_zero_is_not_printed_negative():
    """The oracle's saving less the layout exchange, when it is a hair below 0, prints 0.0, not -0.0."""
    from sim.verdict import oracle_gain_text

    from sim.cost import Hardware, layout_time

    cluster = load_cluster("4xA100-nvlink")
    layout = float(layout_time(Hardware.from_config(cluster, MODEL)).max() * 1e6)
    # a saving 0.02 µs short of the layout exchange
    text = oracle_gain_text({"total": 100.0, "ffn": 80.0}, {"total": 100.0 - layout + 0.02, "ffn": 80.0}, cluster,
                            MODEL)
    assert "the other 0.0 µs its placement" in text and "-0.0" not in text
    text = oracle_gain_text({"total": 100.0, "ffn": 80.0}, {"total": 100.0 - layout + 0.5, "ffn": 80.0}, cluster,
                            MODEL)
    assert "the other -0.5 µs its placement" in text
