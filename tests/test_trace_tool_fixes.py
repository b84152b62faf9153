"""Traces and the tools around them: negative ids refused, a rank column the cluster cannot use said so,
synthetic traces at extreme skew, empty counts steps in inspect, the regrouping's record, the popularity
importer's counts, calibrate's header comment and validate's share column."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_gps.cli.main import main
from moe_gps.config import SimulateConfig, load_cluster, strategy_from_name
from moe_gps.errors import UserError
from moe_gps.trace import CountsTrace, TraceMeta, load_trace, write_trace
from moe_gps.trace.meta import META_KEY
from moe_gps.trace.stats import js_divergence, summarize
from moe_gps.trace.synth import synthesize
from moe_gps.trace.synth_counts import inclusion, synthesize_counts
from sim.loads import home_gpus
from sim.run import simulate
from test_sim_run import MODEL

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "t.parquet"
    write_trace(path, synthesize("mixtral-mmlu", num_steps=3, tokens_per_step=8, num_layers=2, seed=0))
    return path


def _with_column(src: Path, dst: Path, name: str, values: np.ndarray) -> Path:
    """A copy of ``src`` whose column ``name`` (added where absent) holds ``values`` (one per row)."""
    table = pq.read_table(src)
    arr = pa.array(values)
    table = table.set_column(table.column_names.index(name), name, arr) if name in table.column_names \
        else table.append_column(name, arr)
    pq.write_table(table, dst)
    return dst


# ----------------------------------------------------------------------------- 1: rank, seq, pos, token_id

@pytest.mark.parametrize("column, dtype", [("rank", np.int16), ("seq", np.int32), ("pos", np.int32),
                                           ("token_id", np.int32)])
def test_a_negative_id_or_position_is_refused_naming_column_and_row(tokens_file, tmp_path, capsys, column, dtype):
    rows = pq.read_metadata(tokens_file).num_rows
    values = np.zeros(rows, dtype=dtype)
    values[6:8] = -2                                         # token 3 (2 layers): rows 6 and 7
    bad = _with_column(tokens_file, tmp_path / "bad.parquet", column, values)
    assert main(["trace", "validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"moe-gps: error: {bad}: column '{column}', row 6: negative value -2"
    # simulate stops at the same line instead of a traceback, and writes nothing
    assert main(["simulate", str(bad), "-o", str(tmp_path / "out"), "--no-plots"]) == 2
    assert capsys.readouterr().err.strip() == err
    assert not (tmp_path / "out" / "summary.csv").exists()


def test_home_gpus_ignore_a_rank_column_with_a_rank_the_cluster_lacks():
    assert home_gpus(4, 2, np.array([1, 0, 1, 0], np.int16)).tolist() == [1, 0, 1, 0]
    assert home_gpus(4, 2, np.array([-1, 0, 1, 0], np.int16)).tolist() == [0, 0, 1, 1]
    assert home_gpus(4, 2, np.array([5, 0, 1, 0], np.int16)).tolist() == [0, 0, 1, 1]


def test_simulate_says_when_the_trace_rank_column_is_not_used():
    trace = synthesize("sst2", num_steps=6, tokens_per_step=64, seed=3, num_layers=4)
    cfg = SimulateConfig(cluster=load_cluster("4xA100-nvlink"), model=MODEL, train_steps=2,
                         strategies=[strategy_from_name("none"), strategy_from_name("dist:ema")])
    plain = simulate(trace, cfg, progress=False)
    on_99 = simulate(dataclasses.replace(trace, rank=np.full(trace.num_tokens, 99, np.int16)), cfg, progress=False)
    note = ("the trace's rank column was not used in any simulated step: it names rank 99, and the cluster has "
            "4 GPUs (ranks 0..3); those steps' tokens start on the GPUs in equal contiguous blocks, in trace order")
    assert plain.inferred == [] and on_99.inferred == [note]
    for a, b in zip(plain.strategies, on_99.strategies):            # the numbers are those of no rank column
        assert np.array_equal(a.step_latency, b.step_latency)
    # ranks the cluster has are used, and said nothing about; one step with rank 7 is named as one of 4
    rank = np.tile(np.arange(4, dtype=np.int16), trace.num_tokens // 4)
    assert simulate(dataclasses.replace(trace, rank=rank), cfg, progress=False).inferred == []
    rank = rank.copy()
    rank[3 * 64 + 5] = 7                                           # step 3, a simulated one
    r = simulate(dataclasses.replace(trace, rank=rank), cfg, progress=False)
    assert r.inferred == [note.replace("any simulated step", "1 of the 4 simulated steps").replace("99", "7")]


# ----------------------------------------------------------------------------- 2, 3: synth at extreme values

def test_inclusion_of_logits_far_apart_is_the_limit_not_nan():
    pi = inclusion(np.array([[1e300, 5e299, -1e300, 0.0], [0.0, -800.0, -900.0, -1000.0]]), 2)
    assert np.array_equal(pi[0], [1.0, 1.0, 0.0, 0.0])
    assert pi[1] == pytest.approx([1.0, 1.0, 0.0, 0.0], abs=1e-40)
    moderate = np.array([[0.3, -0.2, 0.1, 0.0]])
    w = np.exp(moderate) / np.exp(moderate).sum()
    assert inclusion(moderate, 2) == pytest.approx(2 * w)       # no expert above 1: c = k


@pytest.mark.parametrize("setting", ["popularity_sigma=400", "drift=1e300"])
def test_counts_synth_at_extreme_skew_writes_a_valid_trace(tmp_path, capsys, setting):
    out = tmp_path / "c.parquet"
    assert main(["trace", "synth", "--kind", "counts", "--steps", "4", "--tokens", "16", "--set", setting,
                 "-o", str(out)]) == 0
    assert main(["trace", "validate", str(out)]) == 0
    capsys.readouterr()


def test_counts_synth_at_extreme_skew_gives_every_token_the_top_k_experts():
    c = synthesize_counts("mixtral-mmlu", num_steps=3, tokens_per_step=16, seed=0, popularity_sigma=400.0).counts()
    assert np.array_equal(np.sort(c, axis=2)[:, :, -2:], np.full((3, 32, 2), 16))
    assert (np.sort(c, axis=2)[:, :, :-2] == 0).all()


@pytest.mark.parametrize("kind, setting, names", [
    ("counts", "sigma_spread=1000", "popularity_sigma=0.22, sigma_spread=1000"),
    ("tokens", "popularity_sigma=1e308", "popularity_sigma=1e+308, sigma_spread=0.22"),
    ("counts", "drift=1e308", "popularity_sigma=0.22, drift=1e+308"),
    ("tokens", "token_affinity=1e308", "popularity_sigma=0.22, token_affinity=1e+308, layer_affinity=2"),
])
def test_synth_refuses_values_whose_logits_overflow(tmp_path, capsys, kind, setting, names):
    out = tmp_path / "x.parquet"
    argv = ["trace", "synth", "--kind", kind, "--steps", "4", "--tokens", "16", "--set", setting, "-o", str(out)]
    assert main(argv + (["--weights"] if kind == "tokens" else [])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.fullmatch(rf"moe-gps: error: synthetic profile: the .* logits.* overflow floating point with "
                        rf"{re.escape(names)}; use smaller values\n", err)
    assert list(tmp_path.iterdir()) == []


def test_tokens_synth_with_weights_at_extreme_skew_is_valid(tmp_path, capsys):
    out = tmp_path / "w.parquet"
    assert main(["trace", "synth", "--steps", "2", "--tokens", "16", "--weights", "--set", "popularity_sigma=400",
                 "--set", "num_layers=3", "-o", str(out)]) == 0
    assert main(["trace", "validate", str(out)]) == 0
    w = load_trace(out).weights
    assert np.isfinite(w).all() and w[:, :, 0] == pytest.approx(1.0)
    capsys.readouterr()


# ----------------------------------------------------------------------------- 4: empty counts steps in inspect

@pytest.mark.filterwarnings("error")
def test_inspect_leaves_a_step_without_tokens_out_of_the_drift(tmp_path, capsys):
    trace = synthesize_counts("mixtral-mmlu", num_steps=5, tokens_per_step=64, seed=1, num_layers=3)
    c = trace.counts().copy()
    c[2] = 0
    path = tmp_path / "z.parquet"
    write_trace(path, CountsTrace(trace.meta, c))
    assert main(["trace", "validate", str(path)]) == 0
    s = summarize(load_trace(path))
    kept = c[[0, 1, 3, 4]]
    assert s.empty_steps == 1
    assert [x.drift_jsd for x in s.layers] == pytest.approx(js_divergence(kept[1:], kept[:-1]).mean(axis=0))
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["trace", "inspect", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "1 step routes no token; the per-step skew and the drift (between consecutive steps that route " \
           "tokens) leave it out" in captured.out
    row0 = next(line for line in captured.out.splitlines() if line.startswith("0 "))
    assert row0.split()[6] == f"{s.layers[0].drift_jsd:.4f}"


# ----------------------------------------------------------------------------- 5: validate's share column

def test_the_share_of_step_agrees_with_the_five_percent_test():
    from moe_gps.fidelity.compare import RunComparison
    from moe_gps.fidelity.report import phase_table

    t = np.full(4, 0.1)
    shares = {"attention": 0.5, "dispatch": 0.2, "ffn": 0.15042, "combine": 0.04996, "copy": 0.0, "sync": 0.0458}
    phases = {"total": t, **{p: t * f for p, f in shares.items()}}
    c = RunComparison(2, "off", np.arange(4), phases, phases, np.zeros(4, bool))
    rows = {line.split()[2]: line for line in phase_table([c]).splitlines() if line.split()[:2] == ["2", "off"]}
    assert rows["sync"].split()[3] == "4.6%" and rows["sync"].split()[-1] == "no"
    assert rows["combine"].split()[3] == "4.9%" and rows["combine"].split()[-1] == "no"
    assert rows["ffn"].split()[3] == "15.0%" and rows["ffn"].split()[-1] == "yes"


# ----------------------------------------------------------------------------- 6: calibrate's header comment

def test_calibration_comment_gives_the_value_the_file_holds_for_every_number(tmp_path):
    from moe_gps.config.loader import load_cluster as load
    from moe_gps.fidelity.calibrate import fit_cluster, make_spec, write_calibration
    from runtime.config import parse_run_config
    from test_fidelity import RUN, _samples_from, _truth

    run_cfg = parse_run_config(RUN)
    spec = make_spec(run_cfg, 4)
    result = {"spec": spec, "info": {"world_size": 4, "backend": "gloo", "device": "cpu", "threads_per_rank": 1,
                                     "torch": "x", "interference": 0.0},
              "samples": _samples_from(_truth(4, 2.674), spec, run_cfg, noise=0.0)}
    path = write_calibration(fit_cluster(result, run_cfg), tmp_path / "c.yaml")[0]
    cluster = load(str(path))
    assert cluster.compute_units_per_node == 2.674
    comment = {m.group(1): float(m.group(2)) for m in re.finditer(r"^#   (\S+) = (\S+) ", path.read_text(), re.M)}
    assert "gpu.hbm_capacity_gb" in comment and "compute_units_per_node" in comment
    for key, value in comment.items():
        obj = cluster
        for part in key.split("."):
            obj = getattr(obj, part)
        assert obj == value, key
    line = next(x for x in path.read_text().splitlines() if "gpu.hbm_capacity_gb" in x)
    assert re.search(r"this machine's memory, [\d.]+ GB, / 4 ranks", line)
    assert "= 4 x 0.6685; shared: compute phases measured on all ranks at once are scaled by 0.6685" in \
        path.read_text()


# ----------------------------------------------------------------------------- 7: popularity counts, tokens_per_step

@pytest.mark.parametrize("value, words", [("\"4\"", 'a string ("4")'), ("true", "a boolean (true)"),
                                          ("null", "null")])
def test_popularity_counts_must_be_json_numbers(tmp_path, capsys, value, words):
    src = tmp_path / "p.json"
    src.write_text('{"expert_popularity": [[4, 4, 4, 4], [4, 4, %s, 4]]}' % value)
    out = tmp_path / "p.parquet"
    assert main(["trace", "import", "--from", "popularity-json", str(src), "--top-k", "2", "-o", str(out)]) == 2
    assert capsys.readouterr().err == (f"moe-gps: error: {src}: 'expert_popularity' layer 1, expert 2: {words} is "
                                       "not a count (a non-negative integer below 2^40)\n")
    assert not out.exists()


def test_a_tokens_trace_with_tokens_per_step_metadata_is_refused(tokens_file, tmp_path, capsys):
    table = pq.read_table(tokens_file)
    meta = json.loads(table.schema.metadata[META_KEY])
    meta["tokens_per_step"] = [8, 8, 8]
    bad = tmp_path / "tps.parquet"
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()}), bad)
    assert main(["trace", "validate", str(bad)]) == 2
    assert capsys.readouterr().err == (f"moe-gps: error: {bad}: metadata field 'tokens_per_step' is for counts "
                                       "traces only (a tokens trace's rows give the tokens of each step)\n")
    with pytest.raises(UserError, match="'tokens_per_step' is for counts traces only"):
        TraceMeta("tokens", 2, 8, 2, tokens_per_step=[8])
    assert TraceMeta("counts", 2, 8, 2, tokens_per_step=[8]).tokens_per_step == [8]


# ----------------------------------------------------------------------------- 8: the regrouping's record

def test_rechunk_records_the_regrouping_in_numbers_and_moves_what_no_longer_holds(tmp_path, capsys):
    src, once, twice = tmp_path / "s.parquet", tmp_path / "r.parquet", tmp_path / "r2.parquet"
    write_trace(src, synthesize("mixtral-mmlu", num_steps=10, tokens_per_step=100, num_layers=2, seed=0))
    assert main(["trace", "rechunk", str(src), "--tokens-per-step", "300", "-o", str(once)]) == 0
    assert main(["trace", "rechunk", str(once), "--tokens-per-step", "600", "-o", str(twice)]) == 0
    assert "3 steps of 300 tokens regrouped into 1 step of 600" in capsys.readouterr().out
    prov = load_trace(twice).meta.provenance
    assert "num_steps" not in prov and "tokens_per_step" not in prov and prov["seed"] == 0
    assert prov["regrouped"] == {
        "tokens_per_step": 600, "num_steps": 1, "from_steps": 3,
        "from_tokens_per_step": {"min": 300, "median": 300, "max": 300}, "tokens_left_out": 300,
        "earlier": {"tokens_per_step": 300, "num_steps": 3, "from_steps": 10,
                    "from_tokens_per_step": {"min": 100, "median": 100, "max": 100}, "tokens_left_out": 100,
                    "from_provenance": {"num_steps": 10, "tokens_per_step": 100}}}


# ----------------------------------------------------------------------------- 9: the baseline, as documented

def test_the_baseline_is_cross_fitted_as_the_format_says():
    # top-1 expert per token, in order: even tokens mostly 0, odd tokens mostly 1; in the whole trace 0 and 1
    # are equally frequent, so a baseline fitted on all tokens would score 0.5, the cross-fitted one 0
    top1 = np.array([0, 1] * 8, dtype=np.int16)
    experts = np.stack([top1, (top1 + 1) % 4], axis=1)[:, None, :]           # [16 tokens, 1 layer, k=2]
    from moe_gps.trace import TokensTrace
    trace = TokensTrace(TraceMeta("tokens", 1, 4, 2), experts, np.array([0, 16]))
    assert summarize(trace).layers[0].affinity_baseline == 0.0
    text = " ".join((DOCS / "trace-format.md").read_text().split())
    assert "always guesses" not in text
    assert ("**baseline** is cross-fitted the same way: it guesses, for every odd token, the layer's most frequent "
            "top-1 expert among the even tokens, and for every even token the most frequent among the odd ones"
            in text)
