"""``moe-gps recommend --backend ray``: the same cache, resume and report as the local pool, on a
local Ray cluster started for the sweep and on a Ray head started here (2 CPUs); interrupts
cancel the tasks and leave no half-written file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from moe_gps.cli.main import main
from moe_gps.config.loader import dump_yaml
from moe_gps.trace import write_trace
from moe_gps.trace.synth import synthesize

from test_recommend import MODEL, TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray")
    write_trace(d / "t.parquet", synthesize("mixtral-mmlu", num_steps=10, tokens_per_step=256, seed=1, num_layers=4))
    (d / "model.yaml").write_text(dump_yaml(MODEL))
    (d / "sweep.yaml").write_text(yaml.safe_dump(TINY))
    long = {**TINY, "sim_steps": 60, "bandwidth_gb_s": [25, 50, 100, 200], "skew": [1.5, 2.0, 3.0]}
    write_trace(d / "long.parquet", synthesize("mixtral-mmlu", num_steps=64, tokens_per_step=256, seed=1,
                                               num_layers=4))
    (d / "long.yaml").write_text(yaml.safe_dump(long))
    return d


def _args(files, out, *extra, trace="t.parquet", sweep="sweep.yaml"):
    return ["recommend", str(files / trace), "--model", str(files / "model.yaml"), "--sweep", str(files / sweep),
            "-o", str(out), "-j", "2", *extra]


def _report(out: Path) -> tuple[pd.DataFrame, dict]:
    """runs.csv and recommendation.json without the wall times."""
    runs = pd.read_csv(out / "runs.csv").drop(columns=["wall_s"])
    rec = json.loads((out / "recommendation.json").read_text())
    rec.pop("timings_s")
    runs_info = rec.pop("runs")
    return runs, {**rec, "runs_total": runs_info["total"]}


def test_without_ray_the_backend_is_one_line_naming_the_extra(files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)           # import ray raises ImportError
    assert main(_args(files, files / "none", "--backend", "ray")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'moe-gps[distributed]'" in err
    assert main(_args(files, files / "none", "--address", "127.0.0.1:1")) == 2
    assert "--address names a Ray cluster: use it with --backend ray" in capsys.readouterr().err


def test_ray_backend_gives_the_local_pools_report(files, capsys):
    pytest.importorskip("ray")
    local, on_ray = files / "local", files / "on-ray"
    assert main(_args(files, local)) == 0
    capsys.readouterr()
    assert main(_args(files, on_ray, "--backend", "ray", "--json")) == 0     # a local Ray cluster of 2 CPUs
    data = json.loads(capsys.readouterr().out)
    assert data["runs"]["simulated"] == data["runs"]["total"] == len(pd.read_csv(local / "runs.csv"))
    a, b = _report(local), _report(on_ray)
    pd.testing.assert_frame_equal(a[0], b[0])
    assert a[1] == b[1]
    assert sorted(p.name for p in (local / "cache").iterdir()) == sorted(p.name for p in (on_ray / "cache").iterdir())
    assert not list(on_ray.rglob("*.tmp"))
    import ray
    assert not ray.is_initialized()                                         # the cluster started for it is down


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head of 2 CPUs on a free port, as `ray start --head` makes one; stopped at the end."""
    pytest.importorskip("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")
    ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen([ray, "start", "--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard",
                             "false", "--disable-usage-stats", "--block"], env=env, stdout=log, stderr=log)
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        proc.send_signal(signal.SIGTERM)                                   # --block stops what it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _cli(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moe_gps.cli.main", *args], cwd=ROOT,
                            env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_existing_cluster_resumes_the_local_pools_cache_and_interrupts_cleanly(files, head, tmp_path):
    address, env = head
    # resume: a cache the local pool wrote, with some runs missing, finished on the cluster
    (tmp_path / "r").mkdir()
    shutil.copytree(files / "local" / "cache", tmp_path / "r" / "cache")
    gone = sorted(p for p in (tmp_path / "r" / "cache").glob("*.json") if not p.name.startswith("skew-"))[:5]
    for p in gone:
        p.unlink()
    deadline = time.time() + 120
    while True:                                                                # the head takes a few seconds
        proc = _cli(_args(files, tmp_path / "r", "--backend", "ray", "--address", address, "--json"), env)
        out, err = proc.communicate(timeout=300)
        if proc.returncode == 0 or time.time() > deadline:
            break
        time.sleep(2)
    assert proc.returncode == 0, err[-2000:]
    data = json.loads(out)
    assert data["runs"]["simulated"] == 5 and data["runs"]["from_cache"] == data["runs"]["total"] - 5
    a, b = _report(files / "local"), _report(tmp_path / "r")
    pd.testing.assert_frame_equal(a[0], b[0])
    assert a[1] == b[1]

    # Ctrl-C and SIGTERM in the middle of a longer sweep: exit 130 / 143, tasks cancelled, no temporary file
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        out_dir = tmp_path / f"stop-{sig.name}"
        proc = _cli(_args(files, out_dir, "--backend", "ray", "--address", address, trace="long.parquet",
                          sweep="long.yaml"), env)
        cache = out_dir / "cache"
        while proc.poll() is None and len(list(cache.glob("*.json")) if cache.exists() else []) < 8:
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err[-2000:]
        assert "run the same command to resume" in err.splitlines()[-1]
        assert not list(out_dir.rglob("*.tmp"))
        for p in cache.glob("*.json"):
            json.loads(p.read_text())                                          # every cache file is whole
    probe = subprocess.run([sys.executable, "-c", f"import ray, time; ray.init(address='{address}', "
                            "log_to_driver=False); t = time.time()\n"
                            "while ray.available_resources().get('CPU', 0) < 2 and time.time() - t < 30: "
                            "time.sleep(0.2)\nprint(ray.available_resources().get('CPU', 0))"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip().splitlines()[-1] == "2.0", probe.stderr[-2000:]   # no task left running


def _long_sweep_under_way(files, out_dir: Path, cached: int) -> tuple[subprocess.Popen, Path]:
    """The long sweep on the local pool (-j 2), once ``cached`` records are in its cache: (process, cache)."""
    proc = _cli(_args(files, out_dir, trace="long.parquet", sweep="long.yaml"), dict(os.environ))
    cache = out_dir / "cache"
    while proc.poll() is None and len(list(cache.glob("*.json")) if cache.exists() else []) < cached:
        time.sleep(0.05)
    return proc, cache


def test_local_pool_stops_on_sigterm_like_ctrl_c(files, tmp_path):
    out_dir = tmp_path / "stop"
    proc, cache = _long_sweep_under_way(files, out_dir, 8)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.splitlines()[-1].startswith("moe-gps: terminated by SIGTERM; finished runs are cached in")
    assert not list(out_dir.rglob("*.tmp"))
    done = len(list(cache.glob("*.json")))
    proc = _cli(_args(files, out_dir, "--json", trace="long.parquet", sweep="long.yaml"), dict(os.environ))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert json.loads(out)["runs"]["from_cache"] >= done - 3        # skew-variant files are not runs


def _pool_workers(pid: int) -> list[int]:
    """The forked children of ``pid`` (its pool's workers: the same command line; not the resource tracker)."""
    own = Path(f"/proc/{pid}/cmdline").read_bytes()
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    out = []
    for c in kids:
        try:
            if Path(f"/proc/{c}/cmdline").read_bytes() == own:
                out.append(int(c))
        except OSError:                                # it has just ended
            pass
    return out


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
                    reason="finds the pool's workers in /proc")
def test_local_pool_reports_a_killed_worker_instead_of_waiting_for_ever(files, tmp_path):
    out_dir = tmp_path / "killed"
    proc, cache = _long_sweep_under_way(files, out_dir, 4)
    workers = _pool_workers(proc.pid)
    assert len(workers) == 2, workers                  # -j 2
    os.kill(workers[0], signal.SIGKILL)                # as the kernel's out-of-memory killer does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    assert "killed with SIGKILL" in err.splitlines()[-1] and "--jobs" in err.splitlines()[-1]
    assert not list(out_dir.rglob("*.tmp"))
    assert list(cache.glob("*.json"))                   # the finished runs stay cached for a rerun
