"""Request workloads (generator, file format, CSV) and the `moe-gps serve` command."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from moe_gps.cli.main import main
from moe_gps.config.serving import (ArrivalSpec, IterationParts, LengthSpec, RequestWorkload, SchedulerConfig,
                                    ServeConfig, SLOConfig, load_request_workload)
from moe_gps.errors import UserError
from moe_gps.trace import CountsTrace, TraceMeta, write_trace
from moe_gps.trace.synth import synthesize
from sim.serving.requests import generate_requests
from sim.verdict import compare, speedup_interval

ROOT = Path(__file__).resolve().parents[1]


def uniform(lo, hi) -> LengthSpec:
    return LengthSpec(dist="uniform", min=lo, max=hi)


def test_poisson_and_gamma_arrivals_have_the_asked_rate_and_burstiness():
    w = RequestWorkload(name="w", prompt_tokens=uniform(10, 20), output_tokens=LengthSpec(dist="fixed", value=7))
    r = generate_requests(w, 5.0, 20_000, seed=1)
    gaps = np.diff(np.concatenate([[0], r.arrival_s]))
    assert gaps.mean() == pytest.approx(0.2, rel=0.03) and gaps.std() / gaps.mean() == pytest.approx(1, rel=0.03)
    assert r.prompt.min() == 10 and r.prompt.max() == 20 and (r.output == 7).all()
    bursty = dataclasses.replace(w, arrival=ArrivalSpec(process="gamma", cv=3.0))
    g = np.diff(generate_requests(bursty, 5.0, 20_000, seed=1).arrival_s)
    assert g.mean() == pytest.approx(0.2, rel=0.05) and g.std() / g.mean() == pytest.approx(3, rel=0.08)
    # seeded, and every rate uses the same random numbers scaled
    again = generate_requests(w, 10.0, 20_000, seed=1)
    assert np.allclose(again.arrival_s * 2, r.arrival_s) and (again.prompt == r.prompt).all()


def test_csv_replay_and_empirical_lengths(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_text("arrival_s,prompt_tokens,output_tokens,user\n10.0,100,5,a\n10.5,200,6,b\n12.0,300,7,c\n")
    w = RequestWorkload(name="log", prompt_tokens=LengthSpec(dist="empirical"),
                        output_tokens=LengthSpec(dist="empirical"), arrival=ArrivalSpec(process="csv"),
                        requests_csv=str(csv))
    r = generate_requests(w, None, 5, seed=0)                       # the log's own timing, repeated end to end
    assert r.arrival_s.tolist() == [0.0, 0.5, 2.0, 3.0, 3.5] and r.prompt.tolist() == [100, 200, 300, 100, 200]
    assert r.output.tolist() == [5, 6, 7, 5, 6]
    assert r.rate == 1.0                                             # the log's mean rate: 2 gaps in 2 s
    fast = generate_requests(w, 2.0, 3, seed=0)                      # mean rate of the log: 1 per second
    assert fast.rate == 2.0
    assert fast.arrival_s.tolist() == [0.0, 0.25, 1.0]
    drawn = generate_requests(dataclasses.replace(w, arrival=ArrivalSpec()), 1.0, 500, seed=0)
    pairs = set(zip(drawn.prompt.tolist(), drawn.output.tolist()))
    assert pairs == {(100, 5), (200, 6), (300, 7)}                   # rows drawn whole: correlation kept


@pytest.mark.parametrize("content, message", [
    ("arrival_s,prompt_tokens\n1,2\n", r"missing column\(s\) output_tokens"),
    ("arrival_s,prompt_tokens,output_tokens\n1,2,0\n",
     r"row 2: output_tokens: must be an integer from 1 to 100000000, got .0."),
    ("arrival_s,prompt_tokens,output_tokens\n1,2.5,3\n", r"row 2: prompt_tokens: must be an integer from 1 to"),
    # past any model, and past int64 (it wrapped negative and failed far from the file)
    ("arrival_s,prompt_tokens,output_tokens\n0,100,10\n0.1,1e20,10\n", r"row 3: prompt_tokens: must be an integer "
                                                                         r"from 1 to 100000000, got .1e\+20."),
    ("arrival_s,prompt_tokens,output_tokens\n", r"no rows"),
])
def test_bad_requests_csv(tmp_path, content, message):
    csv = tmp_path / "bad.csv"
    csv.write_text(content)
    w = RequestWorkload(name="w", prompt_tokens=LengthSpec(dist="empirical"), output_tokens=uniform(1, 2),
                        requests_csv=str(csv), rate=1.0)
    with pytest.raises(UserError, match=message):
        generate_requests(w, None, 3, 0)


@pytest.mark.parametrize("text, message", [
    ("name: w\nprompt_tokens: {dist: fixed}\noutput_tokens: {dist: fixed, value: 3}\n",
     r"w\.yaml: prompt_tokens\.value: required for dist fixed"),
    ("name: w\nprompt_tokens: {dist: uniform, min: 9, max: 3}\noutput_tokens: {dist: fixed, value: 3}\n",
     r"prompt_tokens\.min: 9 is above max=3"),
    ("name: w\nprompt_tokens: {dist: empirical}\noutput_tokens: {dist: fixed, value: 3}\n",
     r"requests_csv: required by arrival process csv and empirical lengths"),
    ("name: w\nprompt_tokens: {dist: fixed, value: 3}\noutput_tokens: {dist: fixed, value: 3}\nrate: -1\n",
     r"rate: must be a number >= 0.001, got -1"),
    ("name: w\nprompt_tokens: {dist: fixed, value: 3}\noutput_tokens: {dist: fixed, value: 3}\narival: {}\n",
     r"arival: unknown key; did you mean 'arrival'\?"),
])
def test_bad_workload_files(tmp_path, text, message):
    path = tmp_path / "w.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_request_workload(str(path))


def test_workload_file_resolves_its_csv_next_to_it(tmp_path):
    (tmp_path / "r.csv").write_text("arrival_s,prompt_tokens,output_tokens\n0,5,5\n1,6,6\n")
    (tmp_path / "w.yaml").write_text("name: w\nprompt_tokens: {dist: empirical}\noutput_tokens: {dist: empirical}\n"
                                     "requests_csv: r.csv\nrate: 2\n")
    w = load_request_workload(str(tmp_path / "w.yaml"))
    assert Path(w.requests_csv) == tmp_path / "r.csv"
    assert load_request_workload("chat").prompt_tokens.dist == "uniform"


def test_block_bootstrap_and_ties_go_to_the_baseline():
    rng = np.random.default_rng(0)
    base = rng.gamma(2.0, 1.0, 400)
    other = base / 1.1
    point, lo, hi = speedup_interval(base, other, block=20)
    assert point == pytest.approx(1.1) and lo == pytest.approx(1.1) and hi == pytest.approx(1.1)
    noisy = base * rng.uniform(0.8, 1.1, 400)
    p1, lo1, hi1 = speedup_interval(base, noisy, seed=3, block=1)
    p20, lo20, hi20 = speedup_interval(base, noisy, seed=3, block=20)
    assert p1 == p20 and lo20 < p20 < hi20
    v = compare({"none": np.ones(10), "a": np.ones(10)}, "none", 0, higher_is_better=True)
    assert v.strategy == "none" and v.ties == ["a"]


def test_every_serving_field_is_documented():
    doc = (ROOT / "docs" / "serving.md").read_text(encoding="utf-8")
    classes = [ArrivalSpec, LengthSpec, RequestWorkload, SchedulerConfig, IterationParts, SLOConfig, ServeConfig]
    missing = [f"{c.__name__}.{f.name}" for c in classes for f in dataclasses.fields(c) if f"`{f.name}`" not in doc]
    assert not missing, f"fields missing from docs/serving.md: {missing}"


# ---------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def small_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "mixtral4.parquet"
    write_trace(path, synthesize("mixtral-mmlu", num_steps=8, tokens_per_step=256, seed=2, num_layers=4))
    return path


@pytest.fixture(scope="module")
def model_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "mixtral-4l.yaml"
    path.write_text("name: mixtral-4l\naliases: [mixtral-8x7b]\nnum_layers: 4\nnum_experts: 8\ntop_k: 2\n"
                    "hidden_size: 4096\nmoe_intermediate_size: 14336\n"
                    "attention: {num_heads: 32, num_kv_heads: 8, head_dim: 128}\n")
    return path


def test_serve_command_writes_everything_and_reruns_from_its_config(small_trace, model_yaml, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["serve", str(small_trace), "--model", str(model_yaml), "--vocab-size", "32000", "--requests", "40",
            "--rates", "5", "20", "--strategies", "none,eplb", "--slo-ttft-ms", "300", "--slo-tpot-ms", "30",
            "--train-steps", "2", "-o", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "rate 5 requests/s" in text and "rate 20 requests/s" in text and text.count("verdict (") == 2
    assert "highest rate served with >= 90% of requests within the SLO" in text
    for name in ("summary.csv", "requests.csv", "iterations.parquet", "config.yaml", "summary.txt",
                 "latency_cdf.png", "latency_throughput.png"):
        assert (out / name).is_file(), name
    summary = pd.read_csv(out / "summary.csv")
    assert summary.shape[0] == 4 and set(summary.strategy) == {"none", "eplb"}
    assert {"ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "tpot_p99_ms", "e2e_p90_ms", "throughput_rps",
            "goodput_rps", "slo_attainment"} <= set(summary.columns)
    reqs = pd.read_csv(out / "requests.csv")
    assert len(reqs) == 2 * 2 * 40 and reqs.e2e_ms.notna().all()
    config = (out / "config.yaml").read_text()
    assert "seed: 0" in config and "vocab_size: 32000" in config and "replan_interval: 3000" in config
    assert f"sha256 {hashlib.sha256(small_trace.read_bytes()).hexdigest()}" in config.splitlines()[1]
    again = tmp_path / "again"
    assert main(["serve", str(small_trace), "--config", str(out / "config.yaml"), "--no-plots", "-o", str(again)]) == 0
    capsys.readouterr()
    assert (again / "summary.csv").read_bytes() == (out / "summary.csv").read_bytes()
    assert main(["serve", str(small_trace), "--model", str(model_yaml), "--vocab-size", "32000", "--requests", "20",
                 "--rate", "7", "--strategies", "none,eplb", "--train-steps", "2", "--json", "--no-plots",
                 "-o", str(tmp_path / "j")]) == 0
    data = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert data["rates"][0]["rate_rps"] == 7.0 and data["rates"][0]["strategies"][0]["strategy"] == "none"
    verdict = data["rates"][0]["verdict"]
    assert verdict["requests"] == 20 and "steps" not in verdict and "distinct_steps" not in verdict


def _counts_trace(tmp_path) -> Path:
    meta = TraceMeta(kind="counts", num_layers=4, num_experts=8, top_k=2, model="mixtral-8x7b", dataset="d",
                     source="synthetic")
    path = tmp_path / "counts.parquet"
    write_trace(path, CountsTrace(meta, np.ones((4, 4, 8), np.int64)))
    return path


@pytest.mark.parametrize("extra, message", [
    (["--rate", "-1"], "--rate must be a finite number >= 0.001, got -1.0"),
    (["--rates", "3", "0"], "--rates must be a finite number >= 0.001, got 0.0"),
    (["--rate", "1e-300"], "--rate must be a finite number >= 0.001, got 1e-300"),   # was a SimPy traceback
    (["--iteration-overhead-us", "1e300"],
     "--iteration-overhead-us must be a finite number >= 0 and <= 1e+06, got 1e+300"),   # was 1e300 ms TTFTs
    (["--requests", "0"], "--requests must be >= 1, got 0"),
    (["--max-num-seqs", "0"], "--max-num-seqs must be an integer >= 1, got 0"),
    (["--slo-tpot-ms", "nan"], "--slo-tpot-ms must be a finite number > 0, got nan"),
    (["--workload", "nosuch"], "unknown workload preset 'nosuch'"),
    (["--kv-cache-gb", "0.0001"], "does not fit the KV cache of one GPU"),
    (["--strategies", "bogus"], "not a strategy name"),
    (["--config", "c.yaml", "--cluster", "4xA100-pcie"], "--config already holds the whole config; drop --cluster"),
])
def test_serve_errors_are_one_line_exit_2(small_trace, model_yaml, capsys, extra, message):
    argv = ["serve", str(small_trace), "--model", str(model_yaml), "--vocab-size", "32000", "--requests", "5",
            "--train-steps", "2", "--no-plots", "-o", "/nonexistent-dir-for-serve-test/x"]
    if "--config" in extra:
        argv = [a for a in argv if a not in ("--model", str(model_yaml))]
    code = main(argv + extra)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("where, text, message", [
    ("workload", "rate: 1.0e-300\n", "rate: must be a number >= 0.001, got 1e-300"),
    ("config", "rates: [5, 1.0e-300]\n", "rates[1]: must be a finite number >= 0.001, got 1e-300"),
    ("config", "iteration: {overhead_us: 1.0e+300}\n", "iteration.overhead_us: must be a number <= 1e+06, got 1e+300"),
])
def test_serve_files_with_rates_or_overheads_out_of_range_are_one_line_exit_2(small_trace, model_yaml, tmp_path,
                                                                              capsys, where, text, message):
    out = tmp_path / "o"
    base = ["serve", str(small_trace), "--requests", "5", "--no-plots", "-o", str(out)]
    assert main(base + ["--model", str(model_yaml), "--vocab-size", "32000", "--strategies", "none",
                        "--train-steps", "2", "--rate", "5"]) == 0
    capsys.readouterr()
    config = yaml.safe_load((out / "config.yaml").read_text())
    if where == "workload":
        workload = dict(config["workload"], **yaml.safe_load(text))
        (tmp_path / "w.yaml").write_text(yaml.safe_dump(workload))
        argv = base[:-1] + [str(tmp_path / "again"), "--model", str(model_yaml), "--vocab-size", "32000",
                            "--strategies", "none", "--train-steps", "2", "--workload", str(tmp_path / "w.yaml")]
    else:
        extra = yaml.safe_load(text)
        if "rates" in extra:
            config["rates"] = extra["rates"]
        else:
            config["iteration"].update(extra["iteration"])
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        argv = base[:-1] + [str(tmp_path / "again"), "--config", str(tmp_path / "c.yaml")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "again").exists()


def test_serve_needs_a_tokens_trace_and_a_known_vocabulary(tmp_path, model_yaml, capsys):
    assert main(["serve", str(_counts_trace(tmp_path)), "--model", str(model_yaml), "--vocab-size", "32000",
                 "--train-steps", "2", "-o", str(tmp_path / "o")]) == 2
    assert "serving needs a tokens trace" in capsys.readouterr().err
    trace = tmp_path / "t.parquet"
    write_trace(trace, synthesize("mixtral-mmlu", num_steps=4, tokens_per_step=64, seed=2, num_layers=4))
    assert main(["serve", str(trace), "--model", str(model_yaml), "--train-steps", "2", "-o", str(tmp_path / "o")]) == 2
    assert "give --vocab-size N" in capsys.readouterr().err


def test_a_replayed_log_reruns_from_its_config_anywhere_and_is_labelled_with_its_rate(small_trace, model_yaml,
                                                                                       tmp_path, capsys, monkeypatch):
    """The config stores the requests CSV's absolute path and its SHA-256; a run replaying a log with no rate
    is labelled with the log's mean rate (1 / its mean gap), not with the span of the requests replayed."""
    work = tmp_path / "w"
    work.mkdir()
    (work / "reqs.csv").write_text("arrival_s,prompt_tokens,output_tokens\n0,100,5\n0.5,200,6\n2.0,300,7\n")
    (work / "replay.yaml").write_text("name: replay\narrival: {process: csv}\nrequests_csv: reqs.csv\n"
                                      "prompt_tokens: {dist: empirical}\noutput_tokens: {dist: empirical}\n"
                                      "num_requests: 5\n")
    monkeypatch.chdir(work)
    out = tmp_path / "out"
    assert main(["serve", str(small_trace), "--model", str(model_yaml), "--vocab-size", "32000",
                 "--workload", "replay.yaml", "--strategies", "none", "--train-steps", "2", "--no-plots", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rate 1 requests/s" in text                         # 2 gaps over 2 s; the 5 replayed span 3.5 s
    config = (out / "config.yaml").read_text()
    digest = hashlib.sha256((work / "reqs.csv").read_bytes()).hexdigest()
    assert f"requests_csv {work / 'reqs.csv'}, sha256 {digest}" in config.splitlines()[1]
    monkeypatch.chdir(tmp_path)
    again = tmp_path / "again"
    assert main(["serve", str(small_trace), "--config", str(out / "config.yaml"), "--no-plots", "-o", str(again)]) == 0
    assert (again / "summary.csv").read_bytes() == (out / "summary.csv").read_bytes()


def test_the_goodput_note_names_a_higher_goodput_than_the_verdicts_winner():
    from sim.serving.report import goodput_note

    rows = [{"strategy": "none", "goodput_rps": 27.88}, {"strategy": "eplb", "goodput_rps": 27.02}]
    assert goodput_note("eplb", rows) == ("\n  (goodput: none 27.88 against eplb's 27.02 requests/s: eplb meets the "
                                          "SLO for more requests, but its run ends later)")
    assert goodput_note("none", rows) == ""
    # as many requests within the SLO: the verdict took the lower mean latency; the line does not say "more"
    rows = [{"strategy": "eplb", "goodput_rps": 30.10, "slo_attainment": 1.0},
            {"strategy": "dist:ema", "goodput_rps": 32.29, "slo_attainment": 1.0}]
    assert goodput_note("eplb", rows) == ("\n  (goodput: dist:ema 32.29 against eplb's 30.10 requests/s: eplb meets "
                                          "the SLO for as many requests at a lower mean latency, but its run ends "
                                          "later)")


def test_a_tie_in_slo_attainment_goes_to_the_lower_latency_whatever_the_order_of_strategies(tmp_path, capsys):
    """eplb and dist:ema both meet the SLO for all 500 requests at 48 requests/s (none for 97.8%): the verdict
    names the one with the lower mean latency, in either order of --strategies."""
    from pathlib import Path

    trace = str(Path(__file__).resolve().parents[1] / "traces" / "mixtral_mmlu.parquet")
    lines = []
    for i, order in enumerate((["none", "eplb", "dist:ema"], ["none", "dist:ema", "eplb"])):
        assert main(["serve", trace, "--requests", "500", "--rate", "48", "--slo-ttft-ms", "500", "--slo-tpot-ms",
                     "50", "--no-plots", "--strategies", *order, "-o", str(tmp_path / f"o{i}")]) == 0
        lines.append(next(x for x in capsys.readouterr().out.splitlines() if x.startswith("verdict")))
    assert lines[0] == lines[1] and lines[0].startswith("verdict (SLO attainment): dist:ema is the best")
