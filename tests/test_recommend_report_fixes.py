"""What the recommend report says about its own evidence: workloads whose steps are scaled rather than
regrouped, margins at the predictor's break-even, hidden predictor costs, the steps each run simulated, a cut
terminal table, near ties at the headline, the figures, an unreachable Ray address, one timing in the docs."""

from __future__ import annotations

import dataclasses
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from moe_gps.cli.main import main
from moe_gps.config import WorkloadConfig, load_cluster
from moe_gps.config.loader import dump_yaml
from moe_gps.errors import UserError
from moe_gps.recommend import plots
from moe_gps.recommend import ray_pool
from moe_gps.recommend.analysis import NEAR_TIE, Comparison, PredictorStudy, Sensitivity, at_point
from moe_gps.recommend.core import recommend
from moe_gps.recommend.plan import Point
from moe_gps.recommend.report import CAPTIONS, hypothetical_lines, key_numbers, summary, terminal, write_report
from moe_gps.recommend.sweep import parse_sweep
from moe_gps.trace import write_trace
from moe_gps.trace.regroup import MIN_STEPS, regrouped_steps
from moe_gps.trace.synth import synthesize

from test_recommend import MODEL, TINY

ROOT = Path(__file__).resolve().parents[1]

# the user's point: the trace's 256 tokens per step; 4 + 5 steps kept = 2304 tokens: 8192 cannot be regrouped
# (0 steps, fewer than MIN_STEPS), decode 128 can (18 steps of 128)
SWEEP = {**TINY, "workloads": [{"phase": "prefill", "tokens_per_step": 8192},
                               {"phase": "decode", "tokens_per_step": 128, "seq_len": 512}]}


@pytest.fixture(scope="module")
def trace():
    return synthesize("mixtral-mmlu", num_steps=10, tokens_per_step=256, seed=1, num_layers=4)


@pytest.fixture(scope="module")
def result(trace, tmp_path_factory):
    out = tmp_path_factory.mktemp("fixes")
    r = recommend(trace, load_cluster("4xA100-nvlink"), MODEL, WorkloadConfig(), parse_sweep(SWEEP, "sweep"),
                  out_dir=out, jobs=1, progress=False, trace_name="tiny.parquet")
    write_report(r, out, command="moe-gps recommend tiny.parquet")
    return r, out


# ---------------------------------------------------------------------------- 1. scaled workloads

def test_a_workload_whose_steps_are_scaled_says_so_where_it_is_named(result, trace):
    r, _ = result
    kept = trace.select_steps(list(range(4 + 5)))
    assert regrouped_steps(kept, 8192) < MIN_STEPS <= regrouped_steps(kept, 128)     # simulate's rule
    note = next(n for n in r.notes if "workload prefill 8192" in n)
    assert "scale each step's expert counts from its 256 tokens to 8192, as simulate does" in note
    assert "(the 9 steps hold 2304 tokens, 0 steps of 8192, fewer than the 12 that regrouping needs)" in note
    assert "to 8192, as simulate does" in note and "which keeps the sampling noise of the smaller step" in note
    assert not any("workload decode 128" in n and "scale" in n for n in r.notes)       # that one regroups
    assert set(r.scaled) == {"prefill 8192"}
    # the evidence the note gives: the GPU skew before duplication is the trace's steps' at 256 and at 8192
    none = r.df[(r.df["candidate"] == "none") & (r.df["num_gpus"] == 4) & (r.df["bandwidth_gb_s"] == 300)
                & (r.df["skew_variant"] == "trace")].set_index("workload")["gpu_skew_before"]
    assert none["prefill 8192"] == pytest.approx(none["prefill 256 (trace)"])
    clause = r.scaled["prefill 8192"]
    assert clause.startswith("steps scaled up from the trace's 256 tokens")
    line = next(s.sentence(r.headline.winner["candidate"]) for s in r.sensitivities if s.axis == "workload")
    assert clause in line
    pred = [x for x in hypothetical_lines(r) if x.startswith("At prefill 8192 tokens/step")]
    assert pred and clause in pred[0] and all(clause not in x for x in pred[1:])     # once, on the first line
    assert all(clause not in x for x in hypothetical_lines(r) if x.startswith("At your point"))


def test_sensitivity_names_the_caveat_of_the_value_it_names():
    cav = {"prefill 2048": "steps scaled up"}
    s = Sensitivity("workload", "", ["prefill 512 (trace)", "prefill 2048"], ["none", "eplb +1/GPU"], 0,
                    "prefill 512 (trace)", "prefill 512 (trace)", None, ("prefill 2048", "eplb +1/GPU", 1.107), cav)
    assert s.sentence("none") == ("workload: none stays the fastest only at prefill 512 (trace); at prefill 2048 "
                                  "(steps scaled up) eplb +1/GPU wins (1.107x faster than none).")   # named once
    # past the first change, every value's winner: the recommendation can be the fastest again
    more = dataclasses.replace(s, values=s.values + ["prefill 8192", "prefill 16384", "decode 256"],
                               winners=s.winners + ["dist:ema +1/GPU", "dist:ema +1/GPU", "none"],
                               caveats={**cav, "prefill 8192": "steps scaled up"})
    assert more.sentence("none").endswith("eplb +1/GPU wins (1.107x faster than none); dist:ema +1/GPU is the "
                                          "fastest at prefill 8192 and prefill 16384 (likewise); none is the "
                                          "fastest at decode 256.")
    held = dataclasses.replace(s, values=s.values + ["prefill 8192"], winners=["none", "none", "none"],
                               holds_to="prefill 8192", change_above=None,
                               caveats={**cav, "prefill 8192": "steps scaled up"})
    assert held.sentence("none") == ("workload: none stays the fastest from prefill 512 (trace) to prefill 8192 (the "
                                     "whole swept range); at prefill 2048 and prefill 8192, steps scaled up.")


# ---------------------------------------------------------------------------- 2. break-even margins

def _study(r, speedup, reference, predictor_us=None, attention_us=1161.44):
    acc = [0.5, 0.9, 0.95, 0.99]
    ovh = [0.0, 8.4e6, 6.7e7, 3.5e8][:len(speedup)]
    sp = np.asarray(speedup, float)
    be = [next((a for a, v in zip(acc, row) if v > reference[1]), None) for row in sp]
    st = PredictorStudy(Point(4, 300.0, 9, "trace"), "prefill 16384", acc, ovh, sp, reference, reference,
                        [acc[-1]] * len(ovh), be)
    if predictor_us is None:
        return st
    return dataclasses.replace(st, predictor_us=np.asarray(predictor_us, float), attention_us=attention_us)


def test_the_margin_at_each_break_even_accuracy_is_said_and_a_near_tie_named(result):
    r, _ = result
    row = [1.0430, 1.11244, 1.11663, 1.12568]
    st = _study(r, [row, row, row], ("dist:ema +1/GPU", 1.1118))
    line = next(x for x in hypothetical_lines(dataclasses.replace(r, predictor=[st])) if "would beat" in x)
    assert ("with accuracy >= 0.9 at 0, 8.4 and 67 MFLOP/token, by only 0.06% there (1.1124x against 1.1118x): "
            "a near tie, by 1% or more from accuracy 0.99 (best: 1.126x).") in line
    # a break-even that is a clear win is not called a near tie
    clear = _study(r, [[1.0, 1.13, 1.14, 1.15]], ("dist:ema +1/GPU", 1.1118))
    line = next(x for x in hypothetical_lines(dataclasses.replace(r, predictor=[clear])) if "would beat" in x)
    assert "accuracy >= 0.9 at 0 MFLOP/token, by 1.64% there (1.1300x)" in line and "near tie" not in line


# ---------------------------------------------------------------------------- 3. hidden predictor cost

def test_overheads_hidden_beside_the_attention_are_explained(result):
    from moe_gps.recommend.report import caption

    r, _ = result
    row = [1.04, 1.11, 1.12, 1.13]
    st = _study(r, [row, row, row, [0.81, 0.85, 0.86, 0.86]], ("dist:ema +1/GPU", 1.1118),
                predictor_us=[[0] * 4, [0] * 4, [0] * 4, [3438.43] * 4])
    lines = hypothetical_lines(dataclasses.replace(r, predictor=[st]))
    line = next(x for x in lines if "beside the attention" in x)
    assert line.startswith("At prefill 16384 tokens/step, overheads 0, 8.4 and 67 MFLOP/token give the same "
                           "speed-ups: a token predictor runs beside the attention (1161 µs per MoE layer here)")
    assert "the two sharing the GPU's compute" in line
    assert "0 up to 67 MFLOP/token; at 350 MFLOP/token it no longer fits and adds 3438 µs a layer" in line
    assert "the same speed-ups at prefill 16384 tokens/step, 0, 8.4 and 67 MFLOP/token" in \
        caption("predictor", dataclasses.replace(r, predictor=[st]))
    # a predictor that shows up at every overhead above 0 (predictors before the attention): nothing to explain
    shown = dataclasses.replace(st, predictor_us=np.array([[0] * 4, [5] * 4, [40] * 4, [3438.43] * 4]))
    assert not any("beside the attention" in x for x in hypothetical_lines(dataclasses.replace(r, predictor=[shown])))
    assert caption("predictor", dataclasses.replace(r, predictor=[shown])) == CAPTIONS["predictor"]


def test_the_sweeps_hidden_predictor_is_read_from_the_runs(result):
    r, _ = result
    for st in r.predictor:
        here = at_point(r.df, r.plan, st.point)
        syn = here[here["family"] == "token (hypothetical)"]
        for i, o in enumerate(st.overheads):
            us = syn[syn["synthetic_overhead_flops"] == o]["layer_predictor_us"]
            assert (i in st.hidden()) == bool((us == 0).all())
    # the user's 256 tokens/step: 8.4 MFLOP/token fits beside the memory-bound attention; 8192 tokens/step: the
    # attention is compute bound, and the predictor's FLOPs add to it
    small, big = r.predictor[0], r.predictor[-1]
    assert 1 in small.hidden() and np.array_equal(small.speedup[0], small.speedup[1])
    assert any(x.startswith("At your point, overheads 0 and 8.4 MFLOP/token give the same speed-ups")
               for x in hypothetical_lines(r))
    assert big.hidden() == [0] and np.nanmax(big.predictor_us[1]) > 0
    assert (big.speedup[1] < big.speedup[0]).all()


# ---------------------------------------------------------------------------- 4. steps per run

def test_the_report_gives_the_steps_each_run_simulated(result):
    r, out = result
    steps = sorted({int(x["sim_steps"]) for x in r.records if x["status"] == "ok"})
    assert steps[0] == 5 and steps[-1] == 14            # decode 128 regroups the 9 kept steps into 18
    for name in ("report.html", "report.md"):
        text = out.joinpath(name).read_text()
        assert "5 to 14 steps each after 4 training steps, each run's count in runs.csv's sim_steps" in text
        assert "(5 steps each" not in text


# ---------------------------------------------------------------------------- 5. the terminal's table

def test_a_cut_terminal_table_says_how_many_rows_it_shows(result):
    r, _ = result
    h = r.headline
    assert "strategies at your cluster (fastest first):" in terminal(r) and len(h.ranking) <= 15
    long = dataclasses.replace(r, headline=dataclasses.replace(h, ranking=h.ranking * 3))
    n = len(h.ranking) * 3
    text = terminal(long)
    assert f"strategies at your cluster (fastest first; 15 of {n}, every one in runs.csv and report.html):" in text


# ---------------------------------------------------------------------------- 6. near tie at the headline

def _vs(speedup, lo, hi, won=5, steps=12, b="dist:ema +1/GPU"):
    return Comparison("eplb +1/GPU", b, speedup, lo, hi, won, steps, 0.03, {}, (1.07, 1.07), (0.0, 0.0))


def test_a_recommendation_within_one_percent_of_the_runner_up_is_a_near_tie(result):
    r, _ = result
    h = r.headline
    win = {**h.winner, "candidate": "eplb +1/GPU", "strategy": "eplb", "family": "static", "redundant_slots": 4,
           "slots_per_gpu_extra": 1}
    tie = dataclasses.replace(r, headline=dataclasses.replace(h, winner=win, vs_runner_up=_vs(1.0006, 0.999, 1.002)))
    text = terminal(tie)
    verdict = next(x for x in text.splitlines() if x.startswith("RECOMMENDATION:"))
    assert verdict.endswith("; a near tie (0.06% faster than dist:ema +1/GPU): either is as good")
    assert dict(key_numbers(tie))["speed-up vs runner-up"].endswith(
        "over dist:ema +1/GPU: a near tie, either is as good")
    assert summary(tie)["recommendation"]["near_tie_with_runner_up"] is True
    # 3% faster but within its interval: not separated
    loose = dataclasses.replace(r, headline=dataclasses.replace(h, winner=win, vs_runner_up=_vs(1.03, 0.99, 1.07)))
    assert "not separated from dist:ema +1/GPU (3.00% faster than dist:ema +1/GPU, within the 95% interval): " \
           "either is as good" in terminal(loose)
    # a clear lead says nothing of the kind
    lead = dataclasses.replace(r, headline=dataclasses.replace(h, winner=win, vs_runner_up=_vs(1.05, 1.03, 1.07)))
    assert "tie" not in terminal(lead).splitlines()[2] and NEAR_TIE < 1.05
    assert summary(lead)["recommendation"]["near_tie_with_runner_up"] is False


def test_a_runner_up_whose_phases_do_not_differ_is_said_so(result):
    """The reasons against the runner-up name the phases that differ; when none does (a tie on every step),
    the line says so instead of ending on an empty list."""
    from moe_gps.recommend.analysis import _reasons

    r, _ = result
    h = r.headline
    win = {**h.winner, "candidate": "eplb +1/GPU", "strategy": "eplb", "family": "static", "redundant_slots": 4,
           "slots_per_gpu_extra": 1}
    same = dataclasses.replace(h, winner=win, vs_runner_up=dataclasses.replace(_vs(1.0, 1.0, 1.0, won=0), diff_ms=0.0))
    line = next(x for x in _reasons(same, r.plan) if x.startswith("Against the runner-up"))
    assert line == ("Against the runner-up dist:ema +1/GPU: the same time on every step, no phase of their MoE "
                    "layers differs by 0.05 µs or more.")
    differs = dataclasses.replace(h, winner=win, vs_runner_up=dataclasses.replace(
        _vs(1.02, 1.01, 1.03), phases_us={"ffn": (350.0, 380.0)}))
    line = next(x for x in _reasons(differs, r.plan) if x.startswith("Against the runner-up"))
    assert line == "Against the runner-up dist:ema +1/GPU: ffn 380.0 µs (dist:ema +1/GPU) vs 350.0 µs (eplb +1/GPU) " \
                   "per MoE layer."


# ---------------------------------------------------------------------------- 7. figures

def _capture(monkeypatch) -> list:
    figs = []
    real = plots._png

    def keep(fig):
        fig.canvas.draw()
        fig.kept_renderer = fig.canvas.get_renderer()      # before the figure is closed
        figs.append(fig)
        return real(fig)

    monkeypatch.setattr(plots, "_png", keep)
    return figs


def test_predictor_titles_do_not_overlap(result, monkeypatch):
    r, _ = result
    figs = _capture(monkeypatch)
    # the labels of the default sweep's two studies, the longest the titles get there
    studies = [dataclasses.replace(st, label=lab) for st, lab in zip(r.predictor, ["prefill 512 (trace)",
                                                                                 "prefill 16384"])]
    plots.predictor_png(studies, 1)
    fig = figs[0]
    renderer = fig.kept_renderer
    a, b = (ax.title.get_window_extent(renderer) for ax in fig.axes[:2])
    assert b.x0 - a.x1 > 0.05 * fig.bbox.width             # a clear gap between the two titles, not a touch


def test_the_headline_figure_draws_what_its_caption_says(result, monkeypatch):
    from moe_gps.recommend.report import _figure

    r, _ = result
    figs = _capture(monkeypatch)
    _figure("headline", r)
    drawn = [t.get_text() for t in figs[0].axes[0].get_yticklabels()]
    oracles = sorted(x["candidate"] for x in r.records if x["family"] == "oracle"
                     and x["num_gpus"] == 4 and x["bandwidth_gb_s"] == 300 and x["skew_variant"] == "trace"
                     and x["workload"] == "prefill 256 (trace)" and x["status"] == "ok")
    assert oracles == ["oracle +1/GPU", "oracle +2/GPU"]
    assert drawn == [x["candidate"] for x in r.headline.ranking] + sorted(
        oracles, key=lambda o: next(x["latency_mean_ms"] for x in r.records if x["candidate"] == o
                                    and x["workload"] == "prefill 256 (trace)" and x["num_gpus"] == 4
                                    and x["bandwidth_gb_s"] == 300 and x["skew_variant"] == "trace"))
    assert not any(d.startswith("token:synthetic") for d in drawn)
    assert "oracle at each slot budget" in CAPTIONS["headline"]
    assert "synthetic predictors are in the predictor study" in CAPTIONS["headline"]


@pytest.mark.parametrize("span", [0.01, 0.05, 0.2])
def test_a_narrow_colour_scale_has_readable_ticks(span):
    ticks, labels = plots.ratio_ticks(span)
    assert len(ticks) >= 3 and len(set(labels)) == len(labels) and 0.0 in [round(t, 12) for t in ticks]
    assert all(-span <= t <= span for t in ticks)
    assert [float(x) for x in labels] == pytest.approx([2 ** t for t in ticks], rel=1e-3)


def test_the_gpu_skew_column_says_it_is_after_duplication(result):
    from moe_gps.recommend.render import RANK_COLUMNS, TABLE_COLUMNS

    r, out = result
    for cols in (RANK_COLUMNS, TABLE_COLUMNS):
        assert dict((k, h) for k, h, _ in cols)["gpu_skew_after"] == "GPU skew after dup."
    assert "GPU skew after dup." in terminal(r) and "GPU skew after dup." in out.joinpath("report.md").read_text()


# ---------------------------------------------------------------------------- 8. unreachable Ray address

def test_an_unreachable_ray_address_is_one_line_before_ray_starts(tmp_path, capsys, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(is_initialized=lambda: False, init=lambda **kw: calls.append(kw) or time_out())

    def time_out():
        raise AssertionError("ray.init must not be reached for an address that cannot be reached")

    monkeypatch.setattr(ray_pool, "import_ray", lambda: fake)
    write_trace(tmp_path / "t.parquet", synthesize("mixtral-mmlu", num_steps=10, tokens_per_step=256, seed=1,
                                                   num_layers=4))
    (tmp_path / "model.yaml").write_text(dump_yaml(MODEL))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({**TINY, "strategies": ["none", "eplb"],
                                                         "redundant_slots_per_gpu": [1]}))
    code = main(["recommend", str(tmp_path / "t.parquet"), "--model", str(tmp_path / "model.yaml"), "--sweep",
                 str(tmp_path / "sweep.yaml"), "-o", str(tmp_path / "out"), "--backend", "ray", "--address",
                 "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 2 and not calls
    assert err.count("\n") == 1 and "--address 127.0.0.1:1: cannot reach a Ray cluster there" in err
    with pytest.raises(UserError, match="--address host:x: not HOST:PORT"):
        ray_pool.check_address("host:x")
    ray_pool.check_address("auto")                      # no port: left to Ray


# ---------------------------------------------------------------------------- 9. the docs' timing

def test_the_docs_give_one_time_for_the_default_sweep():
    text = (ROOT / "docs" / "recommend.md").read_text()
    times = set(re.findall(r"536 runs in \**([0-9.]+) s", text))
    assert len(times) == 1, times
    assert "KVM virtual machine with 2 Intel Xeon vCPUs" in text


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_a_run_this_machine_lacks_the_memory_for_is_not_cached_and_a_rerun_simulates_it(trace, tmp_path,
                                                                                       monkeypatch):
    """The host-memory check depends on the machine at that moment: its refusal was cached as infeasible, and
    a rerun on a quieter or bigger machine read it back and reported the 8-GPU point as impossible."""
    import moe_gps.trace.synth as synth_mod
    from sim.run import TRAFFIC_ARRAYS

    sweep = parse_sweep({**TINY, "num_gpus": [4, 8], "workloads": []}, "sweep")
    cluster = load_cluster("4xA100-nvlink")
    monkeypatch.setattr(synth_mod, "available_memory", lambda: TRAFFIC_ARRAYS * 8 * MODEL.num_layers * 6 ** 2)
    first = recommend(trace, cluster, MODEL, WorkloadConfig(), sweep, out_dir=tmp_path, jobs=1, progress=False,
                      trace_name="tiny.parquet")
    big = [x for x in first.records if x["num_gpus"] == 8]
    assert big and all(x["status"] == "too big here" for x in big)
    assert all(x["status"] == "ok" for x in first.records if x["num_gpus"] == 4)
    counts = summary(first)["runs"]
    assert counts["too_big_here"] == len(big) and counts["infeasible"] == 0
    assert f"{len(big)} too big for this machine's memory (not cached: a rerun tries them again)" in terminal(first)
    assert "GPU count: none stays the fastest only at 4 GPUs; at 8 GPUs nothing could be simulated" in \
        " ".join(summary(first)["sensitivity"])
    monkeypatch.undo()
    again = recommend(trace, cluster, MODEL, WorkloadConfig(), sweep, out_dir=tmp_path, jobs=1, progress=False,
                      trace_name="tiny.parquet")
    assert again.simulated == len(big) and all(x["status"] == "ok" for x in again.records)
