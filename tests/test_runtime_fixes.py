"""The runtime's weight check and `moe-gps run`'s pre-checks: a move checks only the slots it wrote, async
copies check the received experts in the background before the switch, a `cuda` device without a GPU, a
cluster file for other ranks, a plan file outside `static` and an output folder the file system refuses are
one line before torchrun, and steps.csv holds its counts exactly."""

from __future__ import annotations

import csv
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")

from moe_gps.cli.main import main  # noqa: E402
from moe_gps.errors import UserError  # noqa: E402
from moe_gps.placement import Placement, plan_placement, save_placement  # noqa: E402
from runtime.apply import Fingerprints, apply_placement, digest  # noqa: E402
from runtime.config import parse_run_config  # noqa: E402
from runtime.dist import DistContext  # noqa: E402
from runtime.local import run_local  # noqa: E402
from runtime.moe_layer import ExpertParallelMoE  # noqa: E402
from runtime.routing import layer_tables  # noqa: E402

from conftest import one_line  # noqa: E402
from test_runtime_launch import TINY  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
E, H, I = 4, 8, 6


def _layer(ctx, phy: np.ndarray, weights: torch.Tensor) -> ExpertParallelMoE:
    """One MoE layer whose slots on this rank hold ``weights [E, numel]`` as ``phy [P]`` says."""
    S = len(phy) // ctx.world_size
    ep = ExpertParallelMoE(0, E, H, I, ctx, dtype=torch.float32)
    share = Placement(phy[None], ctx.world_size, E, allow_colocated=True).replica_share[0]
    ep.set_slots(layer_tables(phy, share, E, S, ctx.device), weights[phy[ctx.rank * S:(ctx.rank + 1) * S]].clone())
    return ep


def _counting_digests(monkeypatch=None) -> list[tuple[str, int]]:
    """Make runtime.apply's digest record (thread name, rows) per call; returns the record."""
    import runtime.apply as apply

    calls: list[tuple[str, int]] = []
    real = apply.digest

    def counting(rows, *a, **k):
        calls.append((threading.current_thread().name, int(rows.shape[0])))
        return real(rows, *a, **k)

    if monkeypatch is not None:
        monkeypatch.setattr(apply, "digest", counting)
    else:
        apply.digest = counting
    return calls


def _swap_halves(row: torch.Tensor) -> None:
    h = row.numel() // 2
    seg = row[:2 * h].clone()
    row[:h], row[h:2 * h] = seg[h:], seg[:h]


# ----------------------------------------------------------------------------- the weight check

def test_digest_leaves_float64_rows_as_they_are():
    """The digest mixes a copy in place; for 8-byte values the bit view is the same dtype, which must
    still be copied, not mixed in the weights themselves."""
    rows = torch.randn(3, 1001, dtype=torch.float64)
    before = rows.clone()
    d = digest(rows)
    assert torch.equal(rows, before)
    assert torch.equal(digest(rows, chunk_elements=7), d) and d[0] != d[1]


def test_a_move_checks_only_the_slots_it_wrote(monkeypatch):
    ctx = DistContext()
    w = torch.randn(E, ExpertParallelMoE(0, E, H, I, ctx).expert_numel)
    ep = _layer(ctx, np.array([0, 1, 2, 3, 1, 2]), w)
    fp = Fingerprints([ep], ctx)
    calls = _counting_digests(monkeypatch)
    new = np.array([[0, 1, 2, 3, 3, 2]])                      # slot 4: a local copy of expert 3; the rest kept
    st = apply_placement([ep], new, Placement(new, 1, E, allow_colocated=True).replica_share, ctx, fp)
    assert st.counts["slots_kept"] == 5 and st.counts["local_copies"] == 1
    assert sum(n for _, n in calls) == 1                     # the written slot, not all six
    assert torch.equal(ep.slot_weights[4], w[3])
    # a wrong write is still caught
    real_fill = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, *a, **k: real_fill(self, src.flip(0), *a, **k))
    back = np.array([[0, 1, 2, 3, 1, 2]])
    from runtime.apply import WeightCheckFailed
    with pytest.raises(WeightCheckFailed, match="1 slot\\(s\\) with the wrong weights.*slot 4 should hold expert 1"):
        apply_placement([ep], back, Placement(back, 1, E, allow_colocated=True).replica_share, ctx, fp)


OLD = np.array([0, 1, 2, 3, 1, 2])        # rank 0: 0 1 2, rank 1: 3 1 2
NEW = np.array([0, 2, 2, 3, 1, 0])        # rank 0: slot 1 copies expert 2 (local); rank 1: slot 2 receives expert 0


def background_worker(ctx, corrupt: bool):
    """Start an async move OLD -> NEW with the weight check; per rank: the digested rows in the background
    thread and at the install, or the one-line failure and the placement then in force."""
    from runtime.apply import WeightCheckFailed
    from runtime.background import BackgroundMove, all_landed, background_group

    g = torch.Generator().manual_seed(0)
    w = torch.randn(E, ExpertParallelMoE(0, E, H, I, ctx).expert_numel, generator=g)
    ep = _layer(ctx, OLD, w)
    fp = Fingerprints([ep], ctx)
    if corrupt and ctx.rank == 0:
        _swap_halves(ep.slot_weights[0])                     # the row rank 0 sends for expert 0
    group = background_group(ctx)
    calls = _counting_digests()
    move = BackgroundMove([ep], NEW[None], Placement(NEW[None], 2, E, allow_colocated=True).replica_share, ctx,
                          group, 7, fp)
    try:
        while not all_landed(ctx, move):
            time.sleep(0.01)
    except WeightCheckFailed as err:
        move.join(quiet=True)
        return {"error": str(err), "phy2log": ep.tables.phy2log.tolist()}
    landed = list(calls)
    move.install()
    S = len(NEW) // 2
    return {"background": sum(n for t, n in landed if t == "moe-gps-background-move"),
            "before_install": sum(n for _, n in landed),
            "install": sum(n for t, n in calls[len(landed):]),
            "right": bool(torch.equal(ep.slot_weights, w[NEW[ctx.rank * S:(ctx.rank + 1) * S]]))}


def test_async_checks_the_received_experts_in_the_background_and_the_local_copies_at_the_switch():
    r0, r1 = run_local(background_worker, 2, False, timeout_s=90)
    # rank 1 received expert 0: digested in the background thread, before the switch; rank 0 received nothing
    assert (r0["background"], r0["before_install"]) == (0, 0)
    assert (r1["background"], r1["before_install"]) == (1, 1)
    # the install checks only the slot its local copy wrote (rank 0's slot 1), not the received or kept ones
    assert (r0["install"], r1["install"]) == (1, 0)
    assert r0["right"] and r1["right"]


def test_a_wrong_received_expert_fails_every_rank_before_the_switch():
    r0, r1 = run_local(background_worker, 2, True, timeout_s=90)
    head = ("weight check of the experts received in the background for the placement of step 7 found 1 "
            "received expert(s) with the wrong weights in all ranks; ")
    assert r0["error"] == f"rank 0: {head}this rank's received experts are all correct"
    assert r1["error"] == (f"rank 1: {head}1 wrong received expert(s) here: layer 0, expert 0 received from rank 0 "
                           "but its bytes differ")
    assert r0["phy2log"] == r1["phy2log"] == OLD.tolist()          # not switched


# ----------------------------------------------------------------------------- steps.csv counts

def counts_worker(ctx, doc: dict, folder: str):
    from runtime.launch import run

    cfg = parse_run_config(doc)
    cfg.output.dir = folder
    return run(cfg, "dist-only", quiet=True, ctx=ctx)


def test_steps_csv_writes_byte_counts_exactly(tmp_path):
    """Experts of 1,572,864 bytes (7 digits): 6 significant digits would write 1.57286e+06."""
    doc = {**TINY, "model": {**TINY["model"], "hidden_size": 256, "intermediate_size": 512, "num_layers": 1},
           "run": {**TINY["run"], "steps": 3}}
    run_local(counts_worker, 2, doc, str(tmp_path / "run"), timeout_s=120)
    expert_bytes = 3 * 256 * 512 * 4
    with open(tmp_path / "run" / "steps.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    moved = [r for r in rows if r["bytes_received"] not in ("0", "")]
    assert moved, "the run moved no weights"
    for r in rows:
        for col in ("bytes_sent", "bytes_received", "row_copies", "transfers", "slots_kept", "local_copies",
                    "slots_received"):
            assert r[col].isdigit(), (col, r[col])
        assert int(r["bytes_received"]) % expert_bytes == 0 and int(r["bytes_sent"]) % expert_bytes == 0
    assert sum(int(r["bytes_sent"]) for r in rows) == sum(int(r["bytes_received"]) for r in rows)


# ----------------------------------------------------------------------------- moe-gps run's pre-checks

@pytest.fixture
def no_torchrun(monkeypatch):
    """`moe-gps run` never starts torchrun here; the list records the commands it would have run."""
    from moe_gps import signals

    started: list = []

    def fake(cmd, *a, **k):
        started.append(cmd)
        import subprocess
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(signals, "run_child", fake)
    return started


def _config(tmp_path: Path, **dup) -> str:
    doc = {**TINY, "duplication": {**TINY["duplication"], **dup}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_cuda_without_a_gpu_is_one_line_before_torchrun(tmp_path, capsys, monkeypatch, no_torchrun):
    from runtime.dist import choose_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="torch sees no GPU"):          # what every rank does too
        choose_device("cuda")
    cfg = _config(tmp_path)
    err = one_line(capsys, main(["run", "--config", cfg, "--duplication", "off", "--device", "cuda",
                                 "--out", str(tmp_path / "out")]))
    assert err.startswith("moe-gps: error: --device cuda: torch sees no GPU")
    doc = yaml.safe_load(Path(cfg).read_text())
    doc["run"]["device"] = "cuda"
    Path(cfg).write_text(yaml.safe_dump(doc))
    err = one_line(capsys, main(["run", "--config", cfg, "--duplication", "off", "--out", str(tmp_path / "out")]))
    assert err.startswith(f"moe-gps: error: {cfg}: run.device cuda: torch sees no GPU")
    assert no_torchrun == [] and not (tmp_path / "out").exists()


def test_a_cluster_file_for_other_ranks_is_one_line_before_torchrun(tmp_path, capsys, no_torchrun):
    cluster = ROOT / "moe_gps/config/presets/clusters/4xA100-nvlink.yaml"
    cfg = _config(tmp_path, min_gain=1.0, cluster=str(cluster))
    err = one_line(capsys, main(["run", "--config", cfg, "--duplication", "dist-only", "--nproc", "2",
                                 "--out", str(tmp_path / "out")]))
    assert "duplication.cluster: " in err and "the cluster has 4 GPUs, this run 2 ranks" in err
    assert no_torchrun == []
    assert main(["run", "--config", cfg, "--duplication", "off", "--nproc", "2",       # off: no cost model
                 "--out", str(tmp_path / "out")]) == 0 and len(no_torchrun) == 1


def test_a_plan_file_outside_static_is_refused_naming_the_mode(tmp_path, capsys, no_torchrun):
    from runtime.duplication import DuplicationPolicy

    plan = tmp_path / "plan.yaml"
    save_placement(plan_placement(np.array([[9.0, 1, 1, 5, 1, 1, 1, 1]] * 2), 2, 2, algorithm="greedy"), plan)
    cfg = _config(tmp_path, placement=str(plan))
    d = parse_run_config(yaml.safe_load(Path(cfg).read_text())).duplication
    for mode in ("off", "dist-only", "token-to-expert"):
        with pytest.raises(UserError, match=f"is a plan for --duplication static, which --duplication {mode} "
                                            "would not use"):
            DuplicationPolicy(mode, d, 2, 2, 8, 2, 64)
        err = one_line(capsys, main(["run", "--config", cfg, "--duplication", mode, "--out", str(tmp_path / "o")]))
        assert f"--duplication {mode} would not use" in err
    assert DuplicationPolicy("static", d, 2, 2, 8, 2, 64).initial().num_redundant == 2
    assert no_torchrun == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_an_output_folder_the_file_system_refuses_is_one_line_though_access_says_yes(tmp_path, capsys, monkeypatch,
                                                                                   no_torchrun):
    from moe_gps.outputs import check_output_dir, check_output_file

    monkeypatch.setattr(os, "access", lambda *a, **k: True)      # as for root
    with pytest.raises(UserError, match=r"^--out /proc/x/y: cannot write in /proc/ \("):
        check_output_dir("/proc/x/y", "--out")
    err = one_line(capsys, main(["run", "--config", _config(tmp_path), "--duplication", "off",
                                 "--out", "/proc/x/y"]))
    assert "cannot write in /proc/" in err and no_torchrun == []
    # the checks leave nothing behind where they can write
    check_output_dir(tmp_path / "a" / "b" / "c")
    check_output_file(tmp_path / "f.csv")
    check_output_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_validate_runs_the_plan_file_for_static_only(tmp_path):
    """validate runs every strategy from one config: a plan file there is static's, and the other strategies
    run without it (they would refuse it)."""
    from runtime.config import load_run_config
    from runtime.validate import ValidateOptions, check_inputs, for_mode

    plan = tmp_path / "plan.yaml"
    save_placement(plan_placement(np.array([[9.0, 1, 1, 5, 1, 1, 1, 1]] * 2), 2, 2, algorithm="greedy"), plan)
    cfg = _config(tmp_path, placement=str(plan))
    trace = str(Path(__file__).resolve().parents[1] / "traces" / "mixtral_mmlu.parquet")
    run_cfg, _ = check_inputs(ValidateOptions(trace, cfg, tmp_path / "v", nprocs=[2], steps=8))
    assert for_mode(run_cfg, "static") is run_cfg
    for mode in ("off", "dist-only", "token-to-expert"):
        assert for_mode(run_cfg, mode).duplication.placement is None
        assert for_mode(run_cfg, mode).duplication.copy_policy == run_cfg.duplication.copy_policy
    assert load_run_config(cfg).duplication.placement == str(plan)


@pytest.mark.parametrize("raised, line", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 51539607552 bytes. Error code 12 (Cannot allocate memory)"),
     "runtime.launch: error: rank 0: out of memory ([enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
     "can't allocate memory: you tried to allocate 51539607552 bytes. Error code 12 (Cannot allocate memory)); make "
     "the model (model.num_layers, hidden_size, intermediate_size, num_experts) or the batch (input.batch_size x "
     "input.seq_len) smaller"),
    ("dist", "runtime.launch: error: rank 0: the ranks did not reach each other within run.timeout_s (60 s): The "
             "client socket has timed out after 1ms while trying to connect to (127.0.0.1, 29500).; give "
             "run.timeout_s more time"),
])
def test_torch_failures_a_user_can_act_on_are_one_line(tmp_path, capsys, monkeypatch, raised, line):
    """Out of memory while building the model, and ranks that cannot reach each other at the rendezvous
    (a run.timeout_s too short): one line naming what to change, exit 2, instead of a traceback per rank."""
    import torch.distributed as dist

    import runtime.launch as launch

    if raised == "dist":
        raised = dist.DistNetworkError("The client socket has timed out after 1ms while trying to connect to "
                                       "(127.0.0.1, 29500).")

    def fail(*a, **k):
        raise raised

    monkeypatch.setattr(launch, "run", fail)
    (tmp_path / "r.yaml").write_text("run:\n  steps: 2\n")
    code = launch._main(["--config", str(tmp_path / "r.yaml"), "--duplication", "off", "--out", str(tmp_path / "o")])
    assert code == 2 and capsys.readouterr().err == line + "\n"
    monkeypatch.setattr(launch, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        launch._main(["--config", str(tmp_path / "r.yaml"), "--duplication", "off", "--out", str(tmp_path / "o")])
