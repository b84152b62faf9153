"""``moe-gps recommend`` on a tiny sweep: the headline is the fastest run, the report is complete
and self-contained, the cache resumes an interrupted sweep, parallel equals serial."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from moe_gps.config import AttentionSpec, ModelConfig, WorkloadConfig, load_cluster
from moe_gps.config.loader import load_simulate_config
from moe_gps.errors import UserError
from moe_gps.recommend import runner as runner_mod
from moe_gps.recommend.analysis import at_point, fastest_first
from moe_gps.recommend.core import recommend
from moe_gps.recommend.plan import TRACE_SKEW, Point
from moe_gps.recommend.report import write_report
from moe_gps.recommend.sweep import load_sweep, parse_sweep
from moe_gps.trace.synth import synthesize

# Mixtral-sized layers, 4 of them, so that every run takes milliseconds.
MODEL = ModelConfig(name="mixtral-4l", num_layers=4, num_experts=8, top_k=2, hidden_size=4096,
                    moe_intermediate_size=14336, attention=AttentionSpec(num_heads=32, num_kv_heads=8, head_dim=128))

TINY = {
    "seed": 0, "train_steps": 4, "sim_steps": 5,
    "bandwidth_gb_s": [50], "skew": [2.0], "num_gpus": [2],
    "workloads": [{"phase": "prefill", "tokens_per_step": 8192}],
    "redundant_slots_per_gpu": [1, 2],
    "strategies": ["none", "eplb", "dist:profile", "dist:ema", "token:most-frequent", "oracle"],
    "map_strategies": ["none", "eplb", "dist:profile"],
    "map_token_predictor": {"accuracy": 0.9, "overhead_flops": "8.4e6"},
    "predictor_accuracy": [0.8, 1.0], "predictor_overhead_flops": [0, 8.4e+6],
}


@pytest.fixture(scope="module")
def trace():
    return synthesize("mixtral-mmlu", num_steps=10, tokens_per_step=256, seed=1, num_layers=4)


@pytest.fixture(scope="module")
def sweep():
    return parse_sweep(TINY, "tiny sweep")


@pytest.fixture(scope="module")
def cluster():
    return load_cluster("4xA100-nvlink")


@pytest.fixture(scope="module")
def result(trace, sweep, cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("rec")
    r = recommend(trace, cluster, MODEL, WorkloadConfig(), sweep, out_dir=out, jobs=1, progress=False,
                  trace_name="tiny.parquet")
    files = write_report(r, out, command="moe-gps recommend tiny.parquet")
    return r, out, files


def _fastest_at_user(r) -> pd.DataFrame:
    here = at_point(r.df, r.plan, r.plan.user)
    labels = {c.label for c in r.plan.headline_candidates}
    return fastest_first(here[here["candidate"].isin(labels) & here["deployable"].astype(bool)])


def _check_headline(r) -> None:
    cands = _fastest_at_user(r)
    assert len(cands) >= 5
    best = cands.iloc[0]
    w = r.headline.winner
    if r.headline.not_separated is not None:
        # the fastest is not faster than no duplication beyond its interval: none is recommended
        fast, c = r.headline.not_separated
        assert fast["candidate"] == best["candidate"] and w["candidate"] == "none" and c.ci_low <= 1.0
    elif r.headline.more_slots is not None:
        # the same strategy with fewer slots is not slower beyond the interval: the fewer slots are recommended
        big, c = r.headline.more_slots
        assert big["candidate"] == best["candidate"] and c.ci_low <= 1.0
        assert w["strategy"] == big["strategy"] and w["redundant_slots"] < big["redundant_slots"]
    else:
        assert w["candidate"] == best["candidate"]
        assert w["latency_mean_ms"] == pytest.approx(float(cands["latency_mean_ms"].min()))
    # every deployable strategy at the user's point, each slot budget, was simulated and is not faster
    assert set(cands["candidate"]) == {c.label for c in r.plan.headline_candidates if c.deployable}
    none = cands[cands["candidate"] == "none"].iloc[0]
    if r.headline.vs_none is not None:
        assert r.headline.vs_none.speedup == pytest.approx(none["latency_mean_ms"] / w["latency_mean_ms"])
        assert r.headline.vs_none.ci_low > 1.0 and r.headline.vs_none.speedup > 1.0
    runner = cands[(cands["strategy"] != w["strategy"]) & (cands["candidate"] != w["candidate"])].iloc[0]
    assert r.headline.runner_up["candidate"] == runner["candidate"]
    assert r.headline.vs_runner_up.speedup == pytest.approx(runner["latency_mean_ms"] / w["latency_mean_ms"])
    # the oracle and the synthetic predictors are bounds and what-ifs, never the recommendation
    assert w["family"] not in ("oracle", "token (hypothetical)")


def test_headline_is_the_fastest_strategy_at_the_users_cluster(result):
    r, _, _ = result
    _check_headline(r)
    # the trace's own 256 tokens per step: weight-read bound FFN, as docs/simulator.md says; the
    # recommendation must come out of the sweep, so only check that the reasons say which regime it is
    g = r.headline.regime
    assert g["tokens_per_expert"] == pytest.approx(256 * 2 / 8)
    assert g["compute_bound_above"] == pytest.approx(312e12 * 2 / (2 * 2039e9))
    assert "memory" in r.headline.reasons[0]
    # every reason is a whole sentence, even when the runner-up's phases equal the winner's
    assert all(not line.rstrip(". ").endswith(":") for line in r.headline.reasons)


def test_headline_when_duplication_pays(trace, sweep, cluster, tmp_path):
    """At 8192 tokens per step the FFN is compute bound: whatever wins must still be the fastest run."""
    r = recommend(trace, cluster, MODEL, WorkloadConfig(tokens_per_step=8192), sweep, out_dir=tmp_path, jobs=1,
                  progress=False)
    _check_headline(r)
    assert r.headline.regime["tokens_per_expert"] == pytest.approx(2048)
    assert "compute bound" in r.headline.reasons[0]
    if r.headline.duplicates:
        assert r.headline.vs_none.speedup > 1.0
        assert r.headline.winner["redundant_slots"] in (4, 8)


def test_paper_assumptions_explain_without_weight_reads(trace, sweep, cluster, tmp_path):
    """Under --assumptions paper the FFN has no per-replica weight read: the first reason says so."""
    from dataclasses import replace

    r = recommend(trace, cluster, MODEL, WorkloadConfig(), replace(sweep, assumptions="paper"), out_dir=tmp_path,
                  jobs=1, progress=False)
    _check_headline(r)
    assert r.headline.regime["weight_reads"] is False
    assert "--assumptions paper" in r.headline.reasons[0] and "weight read" in r.headline.reasons[0]
    from moe_gps.recommend.report import _title_line, summary
    # the report says which model it answers under, where the recommendation is read
    assert summary(r)["assumptions"] == "paper" and _title_line(r).endswith("; paper assumptions")


def test_a_change_is_recommended_only_beyond_its_interval(result):
    """Make the fastest duplicating run only noise-faster than none: the recommendation is none, the
    report names the fastest with its interval and never prints nan; 5 simulated steps are thin."""
    from moe_gps.recommend import analysis as an
    from moe_gps.recommend.report import key_numbers, summary

    r, _, _ = result
    df = r.df.copy()
    here = at_point(df, r.plan, r.plan.user)
    none_row = here[here["candidate"] == "none"].iloc[0]
    base = np.asarray(none_row["step_latency_ms"], dtype=float)
    fake = list(base + np.array([-0.3, 0.2, -0.25, 0.3, -0.2])[:len(base)] * base.mean() / 100)
    idx = here[here["candidate"] == "eplb +1/GPU"].index[0]
    df.at[idx, "step_latency_ms"] = fake
    df.at[idx, "latency_mean_ms"] = float(np.mean(fake))
    assert float(np.mean(fake)) < none_row["latency_mean_ms"]            # faster, but within noise
    h = an.headline(df, r.plan)
    assert h.winner["candidate"] == "none" and h.not_separated[0]["candidate"] == "eplb +1/GPU"
    assert h.not_separated[1].ci_low <= 1.0 <= h.not_separated[1].ci_high and h.thin
    assert "not faster beyond that interval" in " ".join(h.reasons)
    r2 = dataclasses.replace(r, headline=h, df=df)
    text = " ".join(f"{k} {v}" for k, v in key_numbers(r2))
    assert "nan" not in text and "95% CI" in text and "thin" in text
    s = summary(r2)["recommendation"]
    assert s["duplicate"] is False and s["thin_evidence"] is True
    assert s["fastest_not_separated"]["candidate"] == "eplb +1/GPU"


def test_the_fewest_slots_not_beaten_beyond_the_interval_are_recommended(result):
    """Make eplb +2/GPU noise-faster than eplb +1/GPU, both clearly faster than none: the recommendation
    is eplb +1/GPU (less memory, as fast), and the report says why and how much memory it saves."""
    from moe_gps.recommend import analysis as an

    r, _, _ = result
    df = r.df.copy()
    here = at_point(df, r.plan, r.plan.user)
    none = np.asarray(here[here["candidate"] == "none"].iloc[0]["step_latency_ms"], dtype=float)
    one = none * 0.8
    two = one * (1 - np.array([0.003, -0.002, 0.0025, -0.003, 0.002])[:len(one)])
    for label, x in (("eplb +1/GPU", one), ("eplb +2/GPU", two)):
        idx = here[here["candidate"] == label].index[0]
        df.at[idx, "step_latency_ms"] = list(x)
        df.at[idx, "latency_mean_ms"] = float(np.mean(x))
    for label in set(here["candidate"]) - {"none", "eplb +1/GPU", "eplb +2/GPU"}:
        idx = here[here["candidate"] == label].index[0]                      # the others: slower than none
        df.at[idx, "step_latency_ms"] = list(none * 1.1)
        df.at[idx, "latency_mean_ms"] = float(np.mean(none * 1.1))
    assert np.mean(two) < np.mean(one)
    h = an.headline(df, r.plan)
    assert h.winner["candidate"] == "eplb +1/GPU" and h.more_slots[0]["candidate"] == "eplb +2/GPU"
    assert h.more_slots[1].ci_low <= 1.0 and h.vs_none.ci_low > 1.0
    assert "so the recommendation takes the fewer slots" in " ".join(h.reasons)


def test_decision_maps_pick_the_fastest_deployable_in_every_cell(result):
    r, _, _ = result
    labels = set(r.map_labels)
    m = r.maps["map-tokens-bw"]
    u = r.plan.user
    assert m.user_cell == (m.rows.index(u.workload), m.cols.index(u.bandwidth_gb_s))
    for i, w in enumerate(m.rows):
        for j, b in enumerate(m.cols):
            sub = at_point(r.df, r.plan, Point(u.num_gpus, b, w, TRACE_SKEW))
            sub = sub[sub["candidate"].isin(labels) & sub["deployable"].astype(bool)]
            assert m.winner[i][j] == fastest_first(sub).iloc[0]["candidate"]
            none = sub[sub["candidate"] == "none"]["latency_mean_ms"].iloc[0]
            assert m.speedup[i, j] == pytest.approx(none / sub["latency_mean_ms"].min())
    # the headline's winner and runner-up are in every map
    assert r.headline.winner["candidate"] in labels and r.headline.runner_up["candidate"] in labels
    # the user's cell of the bandwidth x skew map is the headline (the winner is in the map set)
    mb = r.maps["map-bw-skew"]
    assert mb.winner[mb.user_cell[0]][mb.user_cell[1]] == r.headline.winner["candidate"]
    # skew rows: the trace's own and the variant, by achieved skew
    assert len(mb.rows) == 2 and r.plan.skews[mb.rows[1]].achieved > r.plan.skews[mb.rows[0]].achieved


def test_sensitivity_walks_the_maps(result):
    r, _, _ = result
    rec = r.headline.winner["candidate"]
    for s in r.sensitivities:
        assert s.winners[s.user_index] == rec
        lo, hi = s.values.index(s.holds_from), s.values.index(s.holds_to)
        assert lo <= s.user_index <= hi and all(w == rec for w in s.winners[lo:hi + 1])
        if s.change_below is not None:
            assert s.change_below[0] == s.values[lo - 1] and s.change_below[1] != rec
            assert s.change_below[2] > 1.0      # the new winner is faster there
        else:
            assert lo == 0
        if s.change_above is not None:
            assert s.change_above[0] == s.values[hi + 1] and s.change_above[1] != rec
        else:
            assert hi == len(s.values) - 1
        assert s.sentence(rec).startswith(s.axis)


def test_predictor_study_knee_and_break_even(result):
    r, _, _ = result
    assert [st.point for st in r.predictor] == [r.plan.user, dataclasses.replace(r.plan.user, workload=1)]
    for st in r.predictor:
        assert st.speedup.shape == (2, 2) and not np.isnan(st.speedup).any()
        for i, knee in enumerate(st.knee):
            row = dict(zip(st.accuracies, st.speedup[i]))
            best = max(row.values())
            assert row[knee] >= best / 1.01
            assert all(v < best / 1.01 for a, v in row.items() if a < knee)
            be = st.break_even[i]
            if be is None:
                assert all(v <= st.reference[1] for v in row.values())
            else:
                assert row[be] > st.reference[1]
    # accuracy 1.0, free, beats accuracy 0.8, free (same overhead, better plans, no correction)
    st = r.predictor[1]
    assert st.speedup[0, 1] > st.speedup[0, 0]


def test_report_folder_is_complete_and_self_contained(result, sweep):
    r, out, files = result
    names = {p.relative_to(out).as_posix() for p in files}
    for f in ("report.html", "report.md", "runs.csv", "sweep.yaml", "simulate_config.yaml", "recommendation.json",
              "plots/decision_bw_skew.png", "plots/decision_gpus_tokens.png", "plots/predictor.png",
              "plots/sensitivity.png", "plots/headline.png"):
        assert f in names and (out / f).stat().st_size > 0, f
    assert not list(out.rglob("*.tmp"))
    page = (out / "report.html").read_text()
    srcs = re.findall(r"""src=['"]([^'"]*)""", page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    verdict = page.index("Recommendation for your cluster")
    assert verdict < page.index("<img")
    assert r.headline.winner["candidate"] in page[verdict:page.index("<img")]
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == len(r.records) and set(runs["status"]) <= {"ok", "infeasible"}
    assert {"bandwidth_gb_s", "skew", "candidate", "latency_mean_ms", "speedup_vs_none"} <= set(runs.columns)
    assert load_sweep(str(out / "sweep.yaml")) == sweep
    cfg = load_simulate_config(str(out / "simulate_config.yaml"))
    assert [s.name for s in cfg.strategies][0] == "none" and cfg.seed == 0
    data = json.loads((out / "recommendation.json").read_text())
    assert data["recommendation"]["candidate"] == r.headline.winner["candidate"]
    assert data["runs"]["total"] == len(r.records) and data["seed"] == 0
    md = (out / "report.md").read_text()
    for img in re.findall(r"\]\((plots/[^)]+)\)", md):
        assert (out / img).exists()
    assert md.index("Recommendation for your cluster") < md.index("![")


def test_cache_resumes_and_parallel_equals_serial(result, trace, sweep, cluster, tmp_path):
    r, out, _ = result
    again = recommend(trace, cluster, MODEL, WorkloadConfig(), sweep, out_dir=out, jobs=1, progress=False)
    assert again.simulated == 0 and again.from_cache == len(r.records)
    assert again.headline.winner["latency_mean_ms"] == r.headline.winner["latency_mean_ms"]
    # an interrupted sweep: some results missing -> only those are simulated again
    copy = tmp_path / "copy"
    shutil.copytree(out / "cache", copy / "cache")
    gone = sorted(p for p in (copy / "cache").glob("*.json") if not p.name.startswith("skew-"))[:6]
    for p in gone:
        p.unlink()
    part = recommend(trace, cluster, MODEL, WorkloadConfig(), sweep, out_dir=copy, jobs=2, progress=False)
    assert part.simulated == 6 and part.from_cache == len(r.records) - 6
    # two worker processes give the very same numbers as one
    a = {x["key"]: x["latency_mean_ms"] for x in r.records}
    b = {x["key"]: x["latency_mean_ms"] for x in part.records}
    assert a == b


def test_interrupted_sweep_resumes_where_it_stopped(trace, sweep, cluster, tmp_path, monkeypatch):
    small = dataclasses.replace(sweep, predictor_accuracy=[1.0], predictor_overhead_flops=[0.0])
    real = runner_mod.run_one
    calls = []

    def flaky(job):
        if len(calls) == 7:
            raise KeyboardInterrupt
        calls.append(job["key"])
        return real(job)

    monkeypatch.setattr(runner_mod, "run_one", flaky)
    with pytest.raises(KeyboardInterrupt):
        recommend(trace, cluster, MODEL, WorkloadConfig(), small, out_dir=tmp_path, jobs=1, progress=False)
    cached = [p for p in (tmp_path / "cache").glob("*.json") if not p.name.startswith("skew-")]
    assert sorted(p.stem for p in cached) == sorted(calls)
    monkeypatch.setattr(runner_mod, "run_one", real)
    done = recommend(trace, cluster, MODEL, WorkloadConfig(), small, out_dir=tmp_path, jobs=1, progress=False)
    assert done.from_cache == 7 and done.simulated == len(done.records) - 7


def test_infeasible_runs_are_recorded_not_recommended(trace, tmp_path):
    """A GPU with little memory: 2 extra slots per GPU do not fit, nor does anything on 2 GPUs."""
    small = dataclasses.replace(load_cluster("4xA100-nvlink"), name="small-hbm")
    small.gpu = dataclasses.replace(small.gpu, hbm_capacity_gb=5.5, reserved_memory_gb=0)
    sw = parse_sweep({**TINY, "strategies": ["none", "dist:profile"], "map_strategies": ["none"],
                      "map_token_predictor": None, "predictor_accuracy": [1.0], "predictor_overhead_flops": [0]},
                     "tiny")
    r = recommend(trace, small, MODEL, WorkloadConfig(), sw, out_dir=tmp_path, jobs=1, progress=False)
    bad = [x for x in r.records if x["status"] == "infeasible"]
    assert bad and all("does not fit" in x["reason"] for x in bad)
    assert any(x["candidate"] == "dist:profile +2/GPU" and x["num_gpus"] == 4 for x in bad)
    assert r.headline.winner["candidate"] in ("none", "dist:profile +1/GPU")
    assert any("dist:profile +2/GPU" in x for x in r.headline.infeasible)
    m = r.maps["map-gpus-bw"]
    assert m.winner[m.rows.index(2)] == [None] * len(m.cols)       # nothing fits on 2 GPUs
    assert math.isnan(m.speedup[m.rows.index(2), 0])
    write_report(r, tmp_path)                                        # n/a cells still render


def test_users_point_must_fit(trace, sweep, tmp_path):
    tiny = dataclasses.replace(load_cluster("4xA100-nvlink"), name="tiny-hbm")
    tiny.gpu = dataclasses.replace(tiny.gpu, hbm_capacity_gb=1.0, reserved_memory_gb=0)
    with pytest.raises(UserError, match="does not fit cluster tiny-hbm"):
        recommend(trace, tiny, MODEL, WorkloadConfig(), sweep, out_dir=tmp_path, jobs=1, progress=False)


def test_figures_drawn_in_forked_processes_are_the_serial_ones_in_report_order(result):
    from moe_gps.recommend.report import CAPTIONS, figures

    r, out, files = result
    serial, forked = figures(r, jobs=1), figures(r, jobs=2)
    assert list(forked) == list(serial) == [n for n in CAPTIONS if n in serial] and len(serial) >= 5
    assert all(forked[n] == serial[n] for n in serial)
    pngs = [p.name for p in files if p.suffix == ".png"]
    assert pngs == [f"{n}.png" for n in serial]


def test_sensitivity_sentences_say_what_was_swept_and_name_ties():
    from moe_gps.recommend.analysis import Sensitivity
    one = Sensitivity("GPU count", "GPUs", ["4"], ["none"], 0, "4", "4", None, None)
    assert one.sentence("none") == "GPU count: only 4 GPUs swept."
    tie = Sensitivity("GPU count", "GPUs", ["4", "8"], ["dist:ema +2/GPU", "none"], 0, "4", "4", None,
                      ("8", "none", 1.0))
    assert tie.sentence("dist:ema +2/GPU") == ("GPU count: dist:ema +2/GPU stays the fastest only at 4 GPUs; at 8 GPUs "
                                               "none ties it (the same time) and comes first on a tie.")
    win = Sensitivity("GPU count", "GPUs", ["4", "8"], ["none", "eplb +1/GPU"], 0, "4", "4", None,
                      ("8", "eplb +1/GPU", 1.25))
    assert win.sentence("none").endswith("at 8 GPUs eplb +1/GPU wins (1.250x faster than none).")
    near = Sensitivity("GPU count", "GPUs", ["4", "8"], ["none", "eplb +1/GPU"], 0, "4", "4", None,
                       ("8", "eplb +1/GPU", 1.00014))
    assert near.sentence("none").endswith("at 8 GPUs eplb +1/GPU comes first by 0.01% (a near tie).")
    # every candidate at 1000000 GPUs infeasible: the range ends there, not "the whole swept range"
    none_ran = Sensitivity("GPU count", "GPUs", ["4", "1000000"], ["none", None], 0, "4", "4", None,
                           ("1000000", None, float("nan")))
    assert none_ran.sentence("none") == ("GPU count: none stays the fastest only at 4 GPUs; at 1000000 GPUs nothing "
                                         "could be simulated (runs.csv says why).")
    # none recommended at the user's 4 GPUs while dist:ema has the best mean there (not separated): one clause
    # for the user's value, not "none stays the fastest only at 4 GPUs; at 4 GPUs dist:ema comes first"
    unseparated = Sensitivity("GPU count", "GPUs", ["4", "8"], ["dist:ema +1/GPU", "dist:ema +1/GPU"], 0, "4", "4",
                              ("4", "dist:ema +1/GPU", 1.001), None)
    assert unseparated.sentence("none") == ("GPU count: at 4 GPUs (yours) none is recommended though dist:ema +1/GPU "
                                            "comes first by 0.10% (a near tie); dist:ema +1/GPU is the fastest at 8 "
                                            "GPUs.")
    scaled = Sensitivity("workload", "tokens/step", ["512", "4096"], ["dist:ema", "dist:ema"], 0, "512", "512",
                         ("512", "dist:ema", 1.001), None, {"512": "steps scaled"})
    assert scaled.sentence("none") == ("workload: at 512 tokens/step (yours; steps scaled) none is recommended though "
                                       "dist:ema comes first by 0.10% (a near tie); dist:ema is the fastest at 4096 "
                                       "tokens/step.")                  # its caveat said once


def test_the_accuracy_lines_say_when_accuracy_makes_no_difference_or_still_pays(result):
    from moe_gps.recommend.report import hypothetical_lines

    r, _, _ = result
    st = r.predictor[0]
    A = len(st.accuracies)
    flat = dataclasses.replace(st, speedup=np.full((len(st.overheads), A), 1.0),
                               knee=[min(st.accuracies)] * len(st.overheads),
                               reference=(st.reference[0], 2.0) if st.reference else ("none", 2.0))
    text = " ".join(hypothetical_lines(dataclasses.replace(r, predictor=[flat])))
    assert "accuracy makes no difference" in text and "stops paying" not in text
    if A > 1:
        rising = dataclasses.replace(flat, speedup=np.tile(np.linspace(1.0, 1.5, A), (len(st.overheads), 1)),
                                     knee=[max(st.accuracies)] * len(st.overheads))
        text = " ".join(hypothetical_lines(dataclasses.replace(r, predictor=[rising])))
        assert f"still pays at the highest swept ({max(st.accuracies):g})" in text


def test_the_oracle_line_splits_its_gain_into_the_layout_exchange_and_its_placement(result):
    from moe_gps.recommend.report import hypothetical_lines

    r, _, _ = result
    h = r.headline
    assert h.oracle is not None and h.none is not None
    line = next(x for x in hypothetical_lines(r) if x.startswith("The oracle ("))
    saved = h.none["layer_total_us"] - h.oracle["layer_total_us"]
    # 4 GPUs of one NVLink node: the layout exchange is 3 peers x 3.4 µs
    assert (f"it saves {saved:.1f} µs a MoE layer: 10.2 µs is the layout exchange it skips" in line
            and f"the other {saved - 10.2:.1f} µs its placement" in line)
    assert f"{h.none['latency_mean_ms'] / h.oracle['latency_mean_ms']:.3f}x vs none" in line


def test_a_predictor_that_beats_the_reference_by_less_than_one_percent_is_a_near_tie(result):
    from moe_gps.recommend.report import hypothetical_lines

    r, _, _ = result
    st = r.predictor[0]
    A, O = len(st.accuracies), len(st.overheads)
    row = np.linspace(1.10798, 1.11528, A)
    close = dataclasses.replace(st, speedup=np.tile(row, (O, 1)), reference=("dist:ema +1/GPU", 1.10877),
                                break_even=[max(st.accuracies)] * O, knee=[max(st.accuracies)] * O)
    line = next(x for x in hypothetical_lines(dataclasses.replace(r, predictor=[close])) if "would beat" in x)
    assert line.endswith("(best: 1.115x, 0.59% faster: a near tie).")
