"""SIGTERM and SIGHUP stop every command like Ctrl-C: temporary files removed, workers stopped without
tracebacks, exit 143 (SIGTERM) or 129 (SIGHUP)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from moe_gps.cli.main import main
from moe_gps.config.loader import dump_yaml
from moe_gps.trace import write_trace
from moe_gps.trace.synth import synthesize

from test_recommend import MODEL, TINY

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
CLI = [sys.executable, "-m", "moe_gps.cli.main"]


def _wait_for(found, proc: subprocess.Popen, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not found():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"never happened; the command exited {proc.returncode}: {proc.communicate()}")
        time.sleep(0.002)


def _temporary(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_signal_during_trace_synth_removes_the_temporary_file(tmp_path, sig, code):
    """Stopped (SIGSTOP) as soon as its temporary file appears, then signalled: exit 128 + signal, one
    line, no temporary file, no output."""
    out = tmp_path / "t.parquet"
    proc = subprocess.Popen(CLI + ["trace", "synth", "--steps", "256", "--tokens", "512", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait_for(lambda: _temporary(tmp_path), proc)
        proc.send_signal(signal.SIGSTOP)
        proc.send_signal(sig)
    finally:
        proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert err == f"moe-gps: terminated by {signal.Signals(sig).name}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def sweep_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("recsig")
    write_trace(d / "t.parquet", synthesize("mixtral-mmlu", num_steps=10, tokens_per_step=256, seed=1, num_layers=4))
    (d / "model.yaml").write_text(dump_yaml(MODEL))
    (d / "sweep.yaml").write_text(yaml.safe_dump({**TINY, "bandwidth_gb_s": [10, 25, 50, 100, 200, 400],
                                                  "num_gpus": [2, 4]}))
    return d


def test_sigterm_during_recommend_stops_the_pool_cleanly_and_the_rerun_resumes(sweep_files, tmp_path, capsys):
    """SIGTERM to the whole process group (what `timeout` sends) while the 2 workers run: exit 143, one
    line, no traceback from any process, no temporary file, no process left; the same command then
    resumes from the cache."""
    out = tmp_path / "report"
    args = ["recommend", str(sweep_files / "t.parquet"), "--model", str(sweep_files / "model.yaml"), "--sweep",
            str(sweep_files / "sweep.yaml"), "-o", str(out), "-j", "2"]
    proc = subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    group = proc.pid
    try:
        _wait_for(lambda: (out / "cache").is_dir() and any(not p.name.startswith(("skew-", "."))
                                                           for p in (out / "cache").iterdir()), proc)
        os.killpg(group, signal.SIGSTOP)
        cached = len(list((out / "cache").glob("*.json")))
        os.killpg(group, signal.SIGTERM)
    finally:
        os.killpg(group, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err == (f"moe-gps: terminated by SIGTERM; finished runs are cached in {out / 'cache'}: run the same "
                   "command to resume\n")
    assert _temporary(out) == [] and not (out / ".moe-gps.lock").exists() and not (out / "report.html").exists()
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)                                  # every worker has gone
    assert main(args) == 0
    assert "read from the cache" in capsys.readouterr().out and len(list((out / "cache").glob("*.json"))) >= cached


def _waiting_for_child(child: str) -> subprocess.Popen:
    """A process that runs the script ``child`` with run_child (as `moe-gps run` waits for torchrun) and exits
    with the code of the signal that stopped it, once the child has printed 'ready'."""
    parent = ("import sys\nfrom moe_gps import signals\n"
              "try:\n    with signals.handled():\n"
              f"        signals.run_child([sys.executable, '-c', {child!r}])\n"
              "except KeyboardInterrupt as err:\n    sys.exit(signals.exit_code(err))\n")
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline() == "ready\n"
    return proc


def test_signals_are_passed_to_a_child_and_handlers_restored(tmp_path):
    """run_child (how `moe-gps run` waits for torchrun) passes SIGTERM on to the child and lets it clean
    up; the parent exits 143. In-process, main() leaves the handlers as it found them."""
    marker = tmp_path / "child-cleaned-up"
    child = (f"import signal, sys, time\n"
             f"signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, 'w').close(), sys.exit(5)))\n"
             f"print('ready', flush=True)\ntime.sleep(60)\n")
    proc = _waiting_for_child(child)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143 and marker.exists()
    before = signal.getsignal(signal.SIGTERM)
    assert main(["trace", "synth", "--steps", "2", "--tokens", "8", "-o", str(tmp_path / "t.parquet")]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_held_holds_a_signal_the_kernel_hands_to_another_thread(sig):
    """With other threads alive (Ray's, a pool's), a signal the main thread blocks is delivered to one of
    them, and its Python handler would run in the main thread at once: held() must still hold it until the
    block ends (else a temporary file can be created and not yet named when the interruption lands)."""
    import threading

    from moe_gps.signals import Terminated, handled, held

    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    reached = False
    try:
        with handled(), pytest.raises(KeyboardInterrupt) as caught:
            with held():
                signal.pthread_kill(other.ident, sig)   # as the kernel does when the main thread blocks it
                deadline = time.monotonic() + 0.2
                while time.monotonic() < deadline:  # bytecodes, where a pending handler would run
                    pass
                reached = True
    finally:
        stop.set()
        other.join()
    assert reached
    assert isinstance(caught.value, Terminated) == (sig == signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handlers as they were


def test_a_second_ctrl_c_does_not_cut_the_clean_up_of_the_first_short():
    """`timeout -s INT` signals the process and again its group, and users press Ctrl-C twice: the second
    arrived while fork_map killed its pool, left the pool to the clean-up at exit, which printed an
    AssertionError or waited for ever. Now the first Ctrl-C's clean-up runs to its end and the exit is 130."""
    script = ("import os, signal, sys, time\n"
              "from moe_gps import signals, workers\n"
              "real = workers.kill_pool\n"
              "def kill_pool(pool, *args):\n"
              "    os.kill(os.getpid(), signal.SIGINT)          # the second Ctrl-C, during the clean-up\n"
              "    time.sleep(0.2)\n"
              "    real(pool, *args)\n"
              "    print('cleaned up', flush=True)\n"
              "workers.kill_pool = kill_pool\n"
              "def slow(i, ctx):\n    time.sleep(30)\n"
              "try:\n"
              "    with signals.handled(), workers.forking(2) as jobs:\n"
              "        print('ready', flush=True)\n"
              "        for _ in workers.fork_map(slow, range(4), jobs):\n            pass\n"
              "except KeyboardInterrupt as err:\n"
              "    sys.exit(signals.exit_code(err))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    assert proc.stdout.readline() == "ready\n"
    time.sleep(0.5)                                    # the pool is up and its workers sleep
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and out == "cleaned up\n" and err == ""


def test_a_second_ctrl_c_cuts_the_wait_for_a_child_short():
    """Ctrl-C gives a child (torchrun) its grace period to clean up; a second Ctrl-C still ends the wait at
    once (the first one's clean-up otherwise ignores later signals)."""
    child = ("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
             "print('ready', flush=True)\ntime.sleep(60)\n")
    proc = _waiting_for_child(child)
    proc.send_signal(signal.SIGINT)                 # the child ignores it: its grace period begins
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 130 and time.monotonic() - t0 < 10


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_torchrun_stopped_by_a_signal_ends_without_its_traceback(tmp_path, sig, code):
    """The commands start torchrun as `python -m runtime.torchrun`: stopped by a signal, torchrun stops its
    ranks and exits 128 + signal without the SignalException traceback it printed after the ranks' lines."""
    pytest.importorskip("torch")
    rank = tmp_path / "rank.py"
    rank.write_text("import time\ntry:\n    print('ready', flush=True)\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
                    "    pass\n")                     # a rank that ends quietly, as runtime.launch's do
    proc = subprocess.Popen([sys.executable, "-m", "runtime.torchrun", "--standalone", "--nproc_per_node", "1",
                             str(rank)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=ROOT)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code and "Traceback" not in err, err


@pytest.mark.parametrize("body, code, line", [
    ("sys.exit(2)", 2, "torchrun: rank 0 exited with code 2"),                 # a user error the rank explained
    ("os.kill(os.getpid(), signal.SIGSEGV)", 1, "torchrun: rank 0 was killed by SIGSEGV"),
])
def test_torchrun_names_each_failed_rank_in_one_line(tmp_path, body, code, line):
    """A failed rank: torchrun's ChildFailedError traceback and summary become one line per run, and exit 2 when
    every failed rank exited 2 (its own line said why), else 1."""
    pytest.importorskip("torch")
    rank = tmp_path / "rank.py"
    rank.write_text(f"import os, signal, sys\n{body}\n")
    done = subprocess.run([sys.executable, "-m", "runtime.torchrun", "--standalone", "--nproc_per_node", "1",
                           str(rank)], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert done.returncode == code and "Traceback" not in done.stderr and line in done.stderr, done.stderr


def test_a_ctrl_c_to_the_parent_alone_reaches_the_child(tmp_path):
    """A SIGINT to `moe-gps run` alone (an IDE's stop button, `kill -INT`) was not passed on: torchrun was killed
    after its grace period and its ranks ran on, replacing the earlier output folder. The child (in a session
    of its own) now gets it once, from the parent."""
    marker = tmp_path / "child-stopped"
    child = (f"import sys, time\ntry:\n    print('ready', flush=True)\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
             f"    open({str(marker)!r}, 'w').close()\n    sys.exit(130)\n")
    proc = _waiting_for_child(child)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)                   # to the parent's pid only, not its group
    assert proc.wait(timeout=20) == 130 and marker.exists() and time.monotonic() - t0 < 10


def test_a_rank_stopped_with_its_peers_by_one_signal_is_not_a_failure(monkeypatch):
    """Ctrl-C or SIGTERM to the whole run: the rank that learns the other was stopped first says only that it was
    interrupted (it printed `error: rank 1: interrupted at step 288 (gather): rank 0 exited (KeyboardInterrupt)`,
    a user's stop read as a failure of rank 0); a peer that exited otherwise is still named."""
    pytest.importorskip("torch")
    from types import SimpleNamespace

    from runtime import dist, faults

    ctx = SimpleNamespace(distributed=True, store=None, rank=1, world_size=2, _last=(288, "gather"), peers=None)
    for detail, named in (("KeyboardInterrupt", False), ("Terminated: SIGTERM", False), ("pid 4242", True),
                          ("RuntimeError: boom", True)):
        monkeypatch.setattr(faults, "diagnose", lambda *a, **k: faults.Diagnosis(exited={0: detail}))
        failure = dist.DistContext.stopped_by_peer(ctx, KeyboardInterrupt())
        assert (failure is not None) == named, detail
        if named:
            assert str(failure) == f"rank 1: interrupted at step 288 (gather): rank 0 exited ({detail})"
