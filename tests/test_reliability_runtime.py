"""Rank faults on real gloo groups: the weight check catches reordered weights, a stopped rank is 'not
responding', a crashed one 'exited' (also under torchrun, before it stops the survivors), a set-up error
on rank 0 stops every rank with exit 2 and one line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")

from moe_gps.placement import Placement  # noqa: E402
from runtime.apply import Fingerprints, digest  # noqa: E402
from runtime.config import parse_run_config  # noqa: E402
from runtime.dist import DistContext  # noqa: E402
from runtime.local import RankFailed, run_local  # noqa: E402
from runtime.moe_layer import ExpertParallelMoE  # noqa: E402
from runtime.routing import layer_tables  # noqa: E402

from test_runtime_launch import TINY, launch_worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def swap_halves_keeping_first(row: torch.Tensor) -> None:
    """Swap the two halves of row[1:] in place: the same values (so the same sum and sum of squares)
    and the same first element, in another order."""
    h = (row.numel() - 1) // 2
    seg = row[1:1 + 2 * h].clone()
    row[1:1 + h] = seg[h:]
    row[1 + h:1 + 2 * h] = seg[:h]


def old_checksum(rows: torch.Tensor) -> torch.Tensor:
    r = rows.double()
    return torch.stack([r.sum(dim=1), (r * r).sum(dim=1), r[:, 0]], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_digest_sees_every_byte_and_its_position(dtype):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 1001, generator=g).to(dtype)
    rows[2] = rows[0]
    d = digest(rows)
    assert d.dtype == torch.int64 and d[0] == d[2] and d[0] != d[1]
    swapped = rows.clone()
    swap_halves_keeping_first(swapped[0])
    assert torch.allclose(old_checksum(swapped[:1]), old_checksum(rows[:1]), rtol=1e-12, atol=0)  # missed
    assert digest(swapped)[0] != d[0]                                                              # caught
    flipped = rows.clone()
    flipped.view(-1)[500] = -flipped.view(-1)[500]           # one sign bit
    assert digest(flipped)[0] != d[0]
    assert torch.equal(digest(rows, chunk_elements=7), d)    # chunking changes nothing


def test_single_process_check_names_the_permuted_slot():
    ctx = DistContext()
    ep = ExpertParallelMoE(0, 4, 8, 6, ctx, dtype=torch.float32)
    phy = np.array([[0, 1, 2, 3, 1, 2]])
    share = Placement(phy, 1, 4, allow_colocated=True).replica_share
    w = torch.randn(4, ep.expert_numel)
    ep.set_slots(layer_tables(phy[0], share[0], 4, 6, ctx.device), w[phy[0]].clone())
    fp = Fingerprints([ep], ctx)
    assert fp.check([ep], ctx) == []
    swap_halves_keeping_first(ep.slot_weights[4])
    assert fp.check([ep], ctx) == ["layer 0, slot 4 should hold expert 1 but its bytes differ"]


def permuting_worker(ctx, doc: dict, folder: str):
    """The launcher's job on this rank; rank 1 permutes one of its slots right after the first re-plan
    moves the weights (before the check)."""
    from runtime.launch import run

    real = ExpertParallelMoE.set_slots
    calls = {"n": 0}

    def tampered(self, tables, slot_weights):
        real(self, tables, slot_weights)
        if self.layer == 0:
            calls["n"] += 1
            if ctx.rank == 1 and calls["n"] == 2:            # 1: install at start, 2: the first move
                swap_halves_keeping_first(self.slot_weights[1])

    ExpertParallelMoE.set_slots = tampered
    cfg = parse_run_config(doc)
    cfg.output.dir = folder
    return run(cfg, "dist-only", quiet=True, ctx=ctx)


def test_permuted_slot_weights_fail_the_check_with_one_line_per_rank(tmp_path):
    res = run_local(permuting_worker, 2, TINY, str(tmp_path / "perm"), timeout_s=90, return_errors=True)
    assert all(isinstance(r, RankFailed) for r in res)
    lines = [r.message.splitlines()[0] for r in res]
    assert all(line.startswith("WeightCheckFailed: ") for line in lines)
    head = "weight check after the placement change at step 2 found 1 slot(s) with the wrong weights in all ranks"
    assert lines[0] == f"WeightCheckFailed: rank 0: {head}; this rank's slots are all correct"
    assert re.fullmatch(rf"WeightCheckFailed: rank 1: {re.escape(head)}; 1 wrong slot\(s\) here: layer 0, slot 6 "
                        r"should hold expert \d but its bytes differ", lines[1]), lines[1]
    assert not (tmp_path / "perm").exists()              # no trace, no temporary file, no lock


def test_stopped_rank_is_not_responding_not_dead(tmp_path):
    doc = {**TINY, "run": {**TINY["run"], "timeout_s": 2}}
    res = run_local(launch_worker, 2, doc, [("off", str(tmp_path / "stopped"))], "1:2:stop",
                    timeout_s=60, collective_timeout_s=2, return_errors=True)
    msg = res[0].message.splitlines()[0]
    assert re.search(r"rank 1 not responding \(pid \d+ is stopped\);", msg), msg
    assert "exited" not in msg and "dead" not in msg


def stopped_by_torchrun_worker(ctx, doc: dict, folder: str):
    """Rank 1 exits at step 3; rank 0, not in a collective then, gets the SIGTERM torchrun would send."""
    import runtime.launch as launch
    from moe_gps.signals import Terminated

    def fault(c, step: int) -> None:
        if step == 3 and c.rank == 1:
            os._exit(3)
        if step == 3 and c.rank == 0:
            time.sleep(1.0)
            raise Terminated(signal.SIGTERM)

    launch._fault = fault
    cfg = parse_run_config(doc)
    cfg.output.dir = folder
    return launch.run(cfg, "off", quiet=True, ctx=ctx)


def test_rank_stopped_by_torchrun_names_the_rank_that_exited(tmp_path):
    res = run_local(stopped_by_torchrun_worker, 2, TINY, str(tmp_path / "out"), timeout_s=60, return_errors=True)
    line = res[0].message.splitlines()[0]
    assert re.fullmatch(r"CollectiveFailure: rank 0: terminated by SIGTERM at step 3 \(start\): rank 1 exited "
                        r"\(pid \d+\); last progress: .*", line), line
    assert not (tmp_path / "out").exists()


def sigterm_during_cleanup_worker(ctx, doc: dict, folder: str):
    """Rank 1 exits at step 3; rank 0's next collective fails, and torchrun's SIGTERM reaches it while
    it removes its temporary trace."""
    import runtime.launch as launch
    from runtime.record import RunRecorder

    def fault(c, step: int) -> None:
        if step == 3 and c.rank == 1:
            os._exit(3)

    abort = RunRecorder.abort

    def abort_under_sigterm(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        abort(self)

    launch._fault = fault
    RunRecorder.abort = abort_under_sigterm
    cfg = parse_run_config(doc)
    cfg.output.dir = folder
    return launch.run(cfg, "off", quiet=True, ctx=ctx)


def test_a_sigterm_during_the_clean_up_keeps_the_error_that_named_the_failed_rank(tmp_path):
    res = run_local(sigterm_during_cleanup_worker, 2, TINY, str(tmp_path / "out"), timeout_s=60,
                    return_errors=True)
    line = res[0].message.splitlines()[0]
    assert re.match(r"CollectiveFailure: rank 0: collective .* at step 3 .*: rank 1 exited", line), line
    assert not (tmp_path / "out").exists()


def test_setup_error_on_rank_0_stops_every_rank(tmp_path):
    (tmp_path / "afile").write_text("x")
    res = run_local(launch_worker, 2, TINY, [("off", str(tmp_path / "afile"))], timeout_s=60, return_errors=True)
    assert res[0].message.splitlines()[0] == f"UserError: output.dir {tmp_path / 'afile'}: exists and is a file, " \
                                             "not a folder"
    assert res[1].message.startswith("SetupFailedElsewhere")


def torchrun(tmp_path: Path, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**TINY, "run": {"steps": 6, "timeout_s": 20}}))
    env = {**ENV, **({"MOE_GPS_FAULT": fault} if fault else {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "runtime.launch", "--config", str(tmp_path / "run.yaml"), "--quiet", *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)


def test_raw_torchrun_config_error_is_one_line_and_exit_2_on_every_rank(tmp_path):
    """What torchrun itself adds (its ChildFailedError traceback and summary, its own exit code 1) is
    beyond the ranks' control; the ranks print one line and both exit 2."""
    (tmp_path / "afile").write_text("x")
    proc = torchrun(tmp_path, "--duplication", "off", "--out", "afile")
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith(("runtime:", "runtime.launch:", "[rank"))]
    assert ours == ["runtime.launch: error: rank 0: output.dir afile: exists and is a file, not a folder"], ours
    assert re.findall(r"^\s+exitcode\s+: (-?\d+)", proc.stderr, re.M) == ["2", "2"], proc.stderr
    assert proc.returncode == 1


def test_crashed_rank_is_named_under_torchrun_and_leaves_no_temporary_file(tmp_path):
    proc = torchrun(tmp_path, "--duplication", "dist-only", "--out", "out", fault="1:3:exit")
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("runtime.launch:")]
    # rank 0's collective fails, or torchrun stops it first: either way its one line names rank 1 (from its
    # process, gathered at start, even when the store has gone with torchrun's agent)
    assert len(errors) == 1 and re.search(r"rank 0: (collective .*|terminated by SIGTERM) at step 3 .*: rank 1 "
                                          r"exited \(pid \d+\)(;|$)", errors[0]), proc.stderr
    assert "[rank0]: Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_sigterm_to_a_running_rank_removes_its_temporary_trace(tmp_path):
    """One rank without torchrun, stopped as soon as its temporary trace file appears (in the staging folder
    inside the output folder), then SIGTERM: exit 143 with one line, and nothing left (the folder the run made
    goes too)."""
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**TINY, "run": {"steps": 400, "timeout_s": 20}}))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "runtime.launch", "--config", str(tmp_path / "run.yaml"),
                             "--duplication", "off", "--out", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not (out.is_dir() and any(p.name.endswith(".tmp") for p in out.rglob("*"))):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.002)
        proc.send_signal(signal.SIGSTOP)
        proc.send_signal(signal.SIGTERM)
    finally:
        proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err == "runtime.launch: rank 0: terminated by SIGTERM\n", err
    assert not out.exists()


def test_a_peer_that_exited_is_named_even_without_the_store():
    # the ranks' "<host> <pid>" are gathered when the group starts: a rank whose store is gone (the host that kept
    # it stopping first) still sees that a peer's process on its host has exited
    from runtime.faults import diagnose, whoami

    peer = subprocess.Popen([sys.executable, "-c", "pass"])
    peer.wait()
    host = whoami().split()[0]
    found = diagnose(None, 0, 2, (3, "gather"), peers=[whoami(), f"{host} {peer.pid}"])
    assert not found.store_ok and found.exited == {1: f"pid {peer.pid}"}
    assert "rank 1 exited" in found.text(2)
    alive = diagnose(None, 0, 2, (3, "gather"), poll_s=0.0, peers=[whoami(), whoami()])
    assert not alive.found and not alive.store_ok
