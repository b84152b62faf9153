"""The figures show what the tables say, in the degenerate cases too: one step, phases too small to see,
strategies that tie with no duplication, timelines of different lengths."""

from __future__ import annotations

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _data(latency: np.ndarray, phases: dict[str, float] | None = None, timeline=None):
    from sim.plots import PlotData
    from sim.run import PHASES

    K = latency.shape[0]
    means = {p: np.full(K, (phases or {}).get(p, 0.0)) for p in PHASES}
    return PlotData(names=[f"s{k}" for k in range(K)], kinds=["none"] + ["distribution"] * (K - 1),
                    phase_means=means, gpu_skew=np.ones((K, 2)), expert_skew=np.ones(2), step_latency=latency,
                    title="t", model="m", cluster="c", num_gpus=2, timeline=timeline or {})


def _figure(draw, data, tmp_path, monkeypatch):
    """The figure ``draw`` makes of ``data``, as it was saved."""
    import sim.plots as plots

    seen = []
    monkeypatch.setattr(plots, "save_png", lambda fig, path: seen.append(fig) or path)
    monkeypatch.setattr(plt, "close", lambda fig: None)                  # kept open to be looked at
    draw(data, tmp_path / "f.png")
    return seen[0]


def test_the_latency_cdf_of_one_step_rises_from_0_to_1(tmp_path, monkeypatch):
    from sim.plots import _latency_cdf

    fig = _figure(_latency_cdf, _data(np.array([[0.015], [0.0152]])), tmp_path, monkeypatch)
    ax = fig.axes[0]
    for line in ax.get_lines():
        y = np.asarray(line.get_ydata())
        assert y[0] == 0.0 and y[-1] == 1.0                       # a visible step, not one lone point
    assert ax.get_ylim()[0] == 0.0


def test_no_duplication_is_drawn_under_the_strategies_that_tie_with_it(tmp_path, monkeypatch):
    from sim.plots import _latency_cdf

    lat = np.array([[0.015, 0.016], [0.015, 0.016]])          # s1 takes none's time on every step
    none, same = _figure(_latency_cdf, _data(lat), tmp_path, monkeypatch).axes[0].get_lines()
    assert none.get_linewidth() > same.get_linewidth() and none.get_zorder() < same.get_zorder()


def test_the_breakdown_starts_at_0_and_leaves_out_phases_too_small_to_see(tmp_path, monkeypatch):
    from sim.plots import _breakdown

    data = _data(np.ones((2, 2)), {"predictor": 4.7e-16, "attention": 1e-3, "ffn": 1e-2})
    ax = _figure(_breakdown, data, tmp_path, monkeypatch).axes[0]
    assert ax.get_xlim()[0] == 0.0
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["attention", "ffn"]


def test_the_timeline_panels_share_one_time_axis(tmp_path, monkeypatch):
    from sim.plots import _timeline

    slices = {"short": [("gpu", g, "expert FFN", 0.0, 1e-3, 0, 0) for g in range(2)],
              "long": [("gpu", g, "expert FFN", 0.0, 3e-3, 0, 0) for g in range(2)]}
    fig = _figure(_timeline, _data(np.ones((2, 1)), timeline=slices), tmp_path, monkeypatch)
    a, b = fig.axes[:2]
    assert a.get_xlim() == b.get_xlim() and a.get_xlim()[1] >= 3.0
    assert a.get_ylim() == (3.5, -0.5)                        # GPU 0 on top, no empty row under the last


def test_the_chrome_trace_orders_each_gpu_before_its_copies():
    from sim.timeline import COPY_TRACK, chrome_trace

    events = chrome_trace({"none": [("gpu", 0, "expert FFN", 0.0, 1e-3, 0, 0)]}, 2)["traceEvents"]
    order = {e["tid"]: e["args"]["sort_index"] for e in events if e["name"] == "thread_sort_index"}
    assert order == {0: 0, COPY_TRACK: 1, 1: 2, COPY_TRACK + 1: 3}
    names = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names[COPY_TRACK + 1] == "GPU 1 copies in"


def test_serve_names_each_slo_line_in_its_panels_legend(tmp_path, monkeypatch):
    """With only a TPOT SLO its panel has the SLO line, and a legend that names it."""
    from types import SimpleNamespace

    import sim.serving.plots as splots
    from moe_gps.config.serving import SLOConfig
    from sim.serving.metrics import RequestTimes

    n = 20
    t = RequestTimes(ttft=np.linspace(0.01, 0.05, n), tpot=np.linspace(0.01, 0.02, n), e2e=np.linspace(1, 2, n),
                     queue=np.zeros(n), span=10.0)
    strategies = [SimpleNamespace(name="none", kind="none"), SimpleNamespace(name="eplb", kind="static")]
    cfg = SimpleNamespace(slo=SLOConfig(tpot_ms=15.0), workload=SimpleNamespace(name="w"),
                          simulate=SimpleNamespace(strategies=strategies, model=SimpleNamespace(name="m"),
                                                   cluster=SimpleNamespace(name="c")))
    result = SimpleNamespace(config=cfg, rates=[SimpleNamespace(rate=10.0, times={"none": t, "eplb": t})])
    seen = []
    monkeypatch.setattr(splots, "save_png", lambda fig, path: seen.append(fig) or path)
    monkeypatch.setattr(plt, "close", lambda fig: None)
    splots.write_plots(result, tmp_path)
    ttft, tpot, _ = seen[0].axes
    assert "SLO" in [x.get_text() for x in tpot.get_legend().get_texts()]
    assert [x.get_text() for x in ttft.get_legend().get_texts()] == ["none", "eplb"]


def test_a_strategy_keeps_its_colour_from_run_to_run_and_colours_differ_within_a_run():
    from sim.plots import strategy_colors

    every = ["none", "eplb", "dist:profile", "dist:previous", "dist:window", "dist:ema", "dist:kalman",
             "dist:token-hist", "token:most-frequent", "token:token-id", "token:position", "token:prev-layer", "oracle"]
    colors = strategy_colors(every)
    assert len(set(colors)) == len(every)
    assert strategy_colors(["dist:ema", "eplb"]) == [colors[5], colors[1]]       # the order of listing aside
