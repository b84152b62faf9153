"""The launcher on real gloo groups: duplication modes, recorded trace and timings, failures, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pandas as pd  # noqa: E402

from moe_gps.errors import UserError  # noqa: E402
from moe_gps.trace import load_trace  # noqa: E402
from runtime.config import load_run_config, parse_run_config  # noqa: E402
from runtime.local import RankFailed, run_local  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "model": {"num_layers": 2, "hidden_size": 32, "intermediate_size": 48, "num_experts": 8, "top_k": 2,
              "num_heads": 2, "vocab_size": 512, "router_bias_std": 1.0, "seed": 1},
    "input": {"batch_size": 2, "seq_len": 16, "seed": 3},
    "run": {"steps": 8, "timeout_s": 20},
    "duplication": {"num_redundant": 2, "warmup_steps": 2, "replan_interval": 2, "distribution_predictor": "ema",
                    "token_predictor": "token-id"},
}


def launch_worker(ctx, doc: dict, runs: list[tuple], fault: str | None = None):
    """Run the launcher's job for each (mode, output dir[, plan file]) on this rank; rank 0 returns the summaries."""
    from runtime.launch import run
    if fault:
        os.environ["MOE_GPS_FAULT"] = fault
    out = []
    for mode, folder, *plan in runs:
        cfg = parse_run_config(doc)
        cfg.output.dir = folder
        cfg.duplication.placement = plan[0] if plan else None
        out.append(run(cfg, mode, quiet=True, ctx=ctx))
    return out


def _plan_file(path: Path) -> str:
    from moe_gps.placement import plan_placement, save_placement
    save_placement(plan_placement(np.array([[9.0, 1, 1, 5, 1, 1, 1, 1]] * 2), 2, 4, algorithm="greedy"), path)
    return str(path)


@pytest.fixture(scope="module")
def modes_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    names = ["off", "dist-only", "token-to-expert", "static", "static-file"]
    runs = [(m, str(base / m)) for m in names[:4]]
    runs.append(("static", str(base / "static-file"), _plan_file(base / "plan.yaml")))
    summaries = run_local(launch_worker, 2, TINY, runs, timeout_s=120)[0]
    return {name: (Path(r[1]), s) for name, r, s in zip(names, runs, summaries)}


def test_trace_is_collected_and_matches_inputs(modes_run):
    from runtime.config import InputSection
    from runtime.inputs import TokenSource

    folder, summary = modes_run["dist-only"]
    trace = load_trace(folder / "trace.parquet")
    m = trace.meta
    assert (m.kind, m.source, m.num_layers, m.num_experts, m.top_k) == ("tokens", "collected", 2, 8, 2)
    assert m.provenance["duplication"] == "dist-only" and m.provenance["world_size"] == 2
    assert trace.num_steps == 8 and set(trace.tokens_per_step.tolist()) == {64}
    assert trace.rank[:64].tolist() == [0] * 32 + [1] * 32
    src = TokenSource(InputSection(**TINY["input"]), 512, 2)
    for s in (0, 5):
        assert np.array_equal(trace.step(s).token_id, src.step_tokens(s)[0])
    w = trace.weights
    assert np.allclose(w.sum(axis=2), 1.0, atol=1e-5) and (np.diff(w, axis=2) <= 0).all()


def test_timings_account_for_every_pair_and_follow_the_plan(modes_run):
    folder, _ = modes_run["dist-only"]
    t = pd.read_csv(folder / "timings.csv")
    assert len(t) == 8 * 2 * 2                                       # steps x ranks x layers
    for col in ("attention_s", "dispatch_s", "expert_s", "combine_s"):
        assert (t[col] > 0).all(), col
    per = t.groupby(["step", "layer"]).expert_tokens.sum()
    assert (per == 64 * 2).all()                                     # every (token, expert) pair computed once
    S = (8 + 2) // 2
    assert (np.abs(t.expert_tokens - t.share_tokens) <= S).all()     # the plan's shares, to rounding
    counts = load_trace(folder / "trace.parquet").counts()           # [steps, layers, experts]
    assert np.array_equal(counts.sum(axis=2), np.full((8, 2), 128))


def test_replanning_schedule_and_moves(modes_run):
    def steps(mode):
        s = pd.read_csv(modes_run[mode][0] / "steps.csv")
        return s[s["rank"] == 0].set_index("step")

    assert steps("off").replanned.sum() == 0
    assert steps("dist-only").replanned[lambda x: x == 1].index.tolist() == [2, 4, 6]
    assert steps("token-to-expert").replanned[lambda x: x == 1].index.tolist() == [2, 4, 6]
    # static re-plans at every check too, from the mean counts of all steps so far (window absent)
    assert steps("static").replanned[lambda x: x == 1].index.tolist() == [2, 4, 6]
    # a plan file given for --duplication static is used for the whole run, unchanged
    from moe_gps.placement import load_placement
    assert steps("static-file").replanned.sum() == 0
    folder = modes_run["static-file"][0]
    assert load_placement(folder / "placement.yaml") == load_placement(folder.parent / "plan.yaml")
    moved = pd.read_csv(modes_run["dist-only"][0] / "steps.csv")
    assert moved.bytes_sent.sum() == moved.bytes_received.sum() > 0
    # duplication from measured or predicted loads lowers the busiest rank's pairs after the warm-up
    # (skewed router, 2 spare slots); the token-id predictor, fitted on 2 steps, is not held to it
    off = steps("off").measured_max_rank_tokens.loc[3:].mean()
    for mode in ("dist-only", "static"):
        assert steps(mode).measured_max_rank_tokens.loc[3:].mean() < 0.97 * off, mode
    assert np.isfinite(steps("token-to-expert").predicted_max_rank_tokens.loc[[2, 4, 6]]).all()


def test_dead_rank_gives_an_error_naming_it(tmp_path):
    res = run_local(launch_worker, 2, TINY, [("dist-only", str(tmp_path / "dead"))], "1:3:exit",
                    timeout_s=60, return_errors=True)
    assert isinstance(res[0], RankFailed) and isinstance(res[1], RankFailed)
    msg = res[0].message
    assert "CollectiveFailure" in msg and "rank 0: collective" in msg
    assert "rank 1 exited (pid " in msg and "not responding" not in msg
    assert not (tmp_path / "dead").exists()     # no half-written trace, temporary file or lock: the folder
                                                # the run made is removed again


def _worker_with_a_full_disk_at_the_end(ctx, doc: dict, runs: list[tuple]):
    """launch_worker, with rank 0's last file (summary.json) failing to write as on a full disk."""
    import errno

    import runtime.record

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    runtime.record.write_text_atomic = full
    return launch_worker(ctx, doc, runs)


def test_a_run_that_fails_at_its_last_file_leaves_the_earlier_runs_files(tmp_path):
    """The run's files are staged and move into the folder together: a run that fails writing its last
    one (a full disk) leaves the earlier run's five files as they were, and no staging folder."""
    out = tmp_path / "out"
    run_local(launch_worker, 2, TINY, [("dist-only", str(out))], timeout_s=120)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"trace.parquet", "timings.csv", "steps.csv", "placement.yaml", "summary.json"} <= set(before)
    res = run_local(_worker_with_a_full_disk_at_the_end, 2, {**TINY, "run": {**TINY["run"], "steps": 5}},
                    [("off", str(out))], timeout_s=120, return_errors=True)
    assert isinstance(res[0], RankFailed) and "No space left on device" in res[0].message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_stuck_rank_times_out_with_an_error_naming_it(tmp_path):
    doc = {**TINY, "run": {**TINY["run"], "timeout_s": 2}}
    res = run_local(launch_worker, 2, doc, [("off", str(tmp_path / "stuck"))], "1:2:hang",
                    timeout_s=60, collective_timeout_s=2, return_errors=True)
    msg = res[0].message
    assert "CollectiveFailure" in msg and "timeout 2 s" in msg
    assert "rank 1 not responding (alive, still at step 2 start);" in msg and "rank 1: 2 start" in msg
    assert "exited" not in msg


def test_token_source_uses_trace_ids_else_the_seeded_generator(tmp_path):
    from moe_gps.trace import TraceMeta, write_trace
    from moe_gps.trace.data import TokensTrace
    from runtime.config import InputSection
    from runtime.inputs import TokenSource

    meta = TraceMeta("tokens", 1, 4, 1)
    experts = np.zeros((10, 1, 1), np.int16)
    write_trace(tmp_path / "ids.parquet", TokensTrace(meta, experts, np.array([0, 10]),
                                                      token_id=np.arange(100, 110, dtype=np.int32)))
    write_trace(tmp_path / "noids.parquet", TokensTrace(meta, experts, np.array([0, 10])))
    src = TokenSource(InputSection(trace=str(tmp_path / "ids.parquet"), batch_size=1, seq_len=4), 105, 2)
    assert src.batch(0, 1).token_id.tolist() == [[104, 0, 1, 2]]       # chunk 1, ids modulo the vocabulary
    assert src.batch(1, 0).token_id.tolist() == [[3, 4, 100, 101]]     # chunk 2 wraps around
    gen = TokenSource(InputSection(trace=str(tmp_path / "noids.parquet"), batch_size=2, seq_len=4, seed=5), 50, 2)
    assert "has no token ids" in gen.description
    a, b = gen.batch(3, 1).token_id, gen.batch(3, 1).token_id
    assert np.array_equal(a, b) and not np.array_equal(a, gen.batch(3, 0).token_id) and (a < 50).all()


def test_config_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_experts: 0\n")
    with pytest.raises(UserError, match=r"bad.yaml: model.num_experts must be at least 1"):
        load_run_config(bad)
    bad.write_text("model:\n  hidden: 3\n")
    with pytest.raises(UserError, match=r"model: unknown key\(s\) hidden"):
        load_run_config(bad)
    bad.write_text("input:\n  trace: nowhere.parquet\n")
    with pytest.raises(UserError, match=r"input.trace: .*nowhere.parquet: no such file"):
        load_run_config(bad)
    from runtime.duplication import DuplicationPolicy
    cfg = parse_run_config({})
    cfg.duplication.placement = _plan_file(tmp_path / "p.yaml")          # a plan for 2 GPUs
    with pytest.raises(UserError, match=r"duplication.placement: .*p.yaml: the plan is for 2 layers, 8 experts, 2 GPUs; this run has 2 MoE "
                                        r"layers, 8 experts, 4 ranks"):
        DuplicationPolicy("static", cfg.duplication, 4, 2, 8, 2, 64)
    with pytest.raises(UserError, match="reads the routing of the step itself"):
        cfg.duplication.token_predictor = "prev-layer"
        DuplicationPolicy("token-to-expert", cfg.duplication, 2, 2, 8, 2, 64)
    from moe_gps.cli.main import main
    bad.write_text("duplication:\n  num_redundant: 1\n")
    assert main(["run", "--config", str(bad), "--duplication", "dist-only", "--nproc", "2"]) == 2


def test_example_config_through_moe_gps_run(tmp_path):
    """The documented command (2 ranks, 4 steps here): torchrun, trace readable by `trace inspect`."""
    example = ROOT / "runtime" / "examples" / "run.yaml"
    assert load_run_config(example).input.trace
    out = tmp_path / "example"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "moe_gps.cli.main", "run", "--config", str(example),
                           "--duplication", "dist-only", "--nproc", "2", "--steps", "6", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "max rank pairs" in proc.stdout
    from moe_gps.cli.main import main
    assert main(["trace", "inspect", str(out / "trace.parquet")]) == 0
    steps = pd.read_csv(out / "steps.csv")
    assert len(steps) == 6 * 2 and steps.replanned.sum() == 1        # warm-up 4, re-plan every 4: step 4
