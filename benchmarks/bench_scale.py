"""Scale (not a test): DeepSeek-V3-scale runs through the CLI, long counts traces, and recommend
sweeps on both backends; wall time and peak memory of each command, and each as a ratio to its floor.

Every command runs under a wrapper that runs only it. Its peak memory is the larger of its
largest process's peak RSS (``getrusage(RUSAGE_CHILDREN)``) and the peak of its whole process
tree's PSS, sampled every 20 ms (``simulate`` splits its strategies over forked worker
processes, ``--jobs``, which share the trace's pages: PSS counts them once). Cases:

0. ``bundled``: ``moe-gps simulate traces/mixtral_mmlu.parquet`` (every default strategy, with and
   without the plots, and with the one strategy ``none`` and the plots: what the command and its plots
   cost without the strategies' work), its floor, and a floor that also works out the GPU loads of every default
   strategy's static placement at every step (the floor the goal for this case was stated against),
   once with the memory sampled, then five times each in turn without the sampler (the median wall
   time of each); and in memory,
   imports excluded, ``simulate()`` with one process and with ``--jobs``' default against a floor
   of loading the trace, counting its expert loads and working out the GPU loads of every
   strategy's static placement at every step.
1. ``deepseek-cli``: a tokens trace of 100 steps x 4096 tokens, 58 layers, 256 experts,
   top-8 (made with ``bench_sim.pool_trace``; the calibrated tokens generator needs minutes
   at that size), ``moe-gps simulate`` on 64 GPUs (the 2x8xH100-ib preset scaled to 8 nodes)
   with none, eplb, dist:profile, dist:ema and oracle (with the default ``--jobs``, the CPU cores
   available, and with ``--jobs 1``); also ``trace validate`` alone.
2. ``counts-1000`` and ``counts-10000``: ``moe-gps trace synth --profile deepseek-v3 --kind
   counts`` (timed too), then ``trace validate`` and ``moe-gps simulate`` with none, eplb (vLLM's
   cadence: window 1000, re-plan every 3000 steps) and dist:ema. Two step counts show what
   grows with the steps and what does not.
3. ``sweep``: the built-in ``moe-gps recommend`` sweep on traces/mixtral_mmlu.parquet
   (4xA100-nvlink, 2 workers) with the local pool, with ``--backend ray --address`` on a Ray
   head started here beforehand (2 CPUs), and with ``--backend ray`` starting its own local
   cluster; the reports must be identical (runs.csv without wall_s, recommendation.json
   without timings_s).

The floor of a case is a process that only loads its trace and bincounts the expert loads
(I/O plus bincount: what any simulation must do). Every command runs with its bytecode cached (in
:data:`PYCACHE`), as an installed package's is. ``--baseline DIR`` also measures
``trace validate`` and the floor with another source tree (e.g. ``git archive REV | tar -x -C
DIR``), for before/after figures.

Usage:  python benchmarks/bench_scale.py [--skip-10k] [--no-simulate-counts] [--skip-cli] [--skip-sweep]
                                        [--baseline DIR] [--work DIR]
Writes benchmarks/results/bench_scale.json; prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import save  # noqa: E402

STRATEGIES_CLI = "none,eplb,dist:profile,dist:ema,oracle"
#: runs of each bundled command (the case of about a second)
BUNDLED_ROUNDS = 5
STRATEGIES_LONG = "none,eplb,dist:ema"

# Runs a command (argv[2:]), then prints as JSON on the wrapper's stderr's last line: its wall time, its
# peak RSS (the largest of the process tree's waited-for processes, in KB on Linux), and, where argv[1] is
# "1", the peak of the whole tree's memory (the sum of its processes' PSS, so that pages forked workers
# share count once; sampled every 20 ms from /proc, 0 where /proc has no smaps_rollup). The sampling
# costs CPU (the kernel walks each process's pages), more for a command of several processes: wall
# times compared as ratios are measured without it.
_WRAPPER = (
    "import json, resource, subprocess, sys, threading, time\n"
    "def tree(pid):\n"
    "    out = [pid]\n"
    "    for p in out:\n"
    "        try:\n"
    "            with open(f'/proc/{p}/task/{p}/children') as f:\n"
    "                out += [int(c) for c in f.read().split()]\n"
    "        except OSError:\n"
    "            pass\n"
    "    return out\n"
    "def pss(pid):\n"
    "    try:\n"
    "        with open(f'/proc/{pid}/smaps_rollup') as f:\n"
    "            return next(int(l.split()[1]) for l in f if l.startswith('Pss:'))\n"
    "    except (OSError, StopIteration):\n"
    "        return 0\n"
    "t = time.perf_counter(); proc = subprocess.Popen(sys.argv[2:]); top = [0]\n"
    "def sample():\n"
    "    while proc.poll() is None and sys.argv[1] == '1':\n"
    "        top[0] = max(top[0], sum(pss(p) for p in tree(proc.pid)))\n"
    "        time.sleep(0.02)\n"
    "th = threading.Thread(target=sample, daemon=True); th.start(); rc = proc.wait(); th.join()\n"
    "wall = time.perf_counter() - t\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(json.dumps({'rc': rc, 'wall_s': wall, 'peak_rss_mb': peak / 1024, 'peak_tree_pss_mb': top[0] / 1024}),\n"
    "      file=sys.stderr)\n"
)

# The floor: load the trace and count its expert loads; a counts trace's steps are read a range at a
# time (a long one stays in its temporary file), as a simulation reads them.
_FLOOR = (
    "import sys; from moe_gps.trace import load_trace\n"
    "t = load_trace(sys.argv[1])\n"
    "if hasattr(t, 'counts_range'):\n"
    "    n = sum(int(t.counts_range(lo, lo + 256).sum()) for lo in range(0, t.num_steps, 256))\n"
    "else:\n"
    "    n = int(t.counts().sum())\n"
    "print(t.num_steps, n)\n"
)


# The bundled case's floor as the goal for it was stated: load, bincount, and the GPU loads of K strategies'
# static placements on G GPUs at every step (argv: trace, G, K).
_FLOOR_LOADS = (
    "import sys; import numpy as np\n"
    "from moe_gps.placement import plan_placement; from moe_gps.trace import load_trace\n"
    "c = load_trace(sys.argv[1]).counts().astype(np.float64)\n"
    "(L, E), G, K = c.shape[1:], int(sys.argv[2]), int(sys.argv[3])\n"
    "p = plan_placement(np.ones((L, E)), G, (-E) % G, 'none')\n"
    "print(len([p.gpu_loads(c[s]) for s in range(len(c)) for _ in range(K)]))\n"
)


#: where measured commands keep their compiled bytecode (outside the source trees), as an installed
#: package has it: a machine that sets PYTHONDONTWRITEBYTECODE would otherwise compile every module of
#: every command anew, which costs the CLI more than the floor (it imports more)
PYCACHE = Path(tempfile.gettempdir()) / "moe-gps-bench-pycache"


def measure(args: list[str], source: Path = ROOT, env: dict | None = None, quiet: bool = True,
            sample: bool = True) -> dict:
    """Wall time and peak RSS of ``python -m ...``/``python -c ...`` with ``source`` first on the path
    (and bytecode cached in :data:`PYCACHE`); ``sample``: also the peak of its process tree's PSS."""
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}, **(env or {}),
           "PYTHONPATH": str(source), "PYTHONPYCACHEPREFIX": str(PYCACHE)}
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, "1" if sample else "0", sys.executable, *args], cwd=source, env=env,
                          stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE, text=True)
    out = json.loads(proc.stderr.strip().splitlines()[-1])
    if out["rc"] != 0:
        raise SystemExit(f"failed ({out['rc']}): {' '.join(args)}\n{proc.stderr[-3000:]}")
    return out


def cli(*args: str) -> list[str]:
    return ["-m", "moe_gps.cli.main", *args]


def floor(trace: Path, source: Path = ROOT) -> dict:
    return measure(["-c", _FLOOR, str(trace)], source)


def with_ratio(fig: dict, base: dict) -> dict:
    return {**fig, "x_floor_wall": fig["wall_s"] / base["wall_s"], "x_floor_rss": peak_mb(fig) / peak_mb(base)}


def peak_mb(fig: dict) -> float:
    """The peak memory of a command: its largest process, or its process tree's PSS where that is more."""
    return max(fig["peak_rss_mb"], fig.get("peak_tree_pss_mb", 0.0))


def cluster_64(work: Path) -> Path:
    from moe_gps.config import load_cluster
    from moe_gps.config.loader import dump_yaml

    c = load_cluster("2x8xH100-ib")
    c = replace(c, name="8x8xH100-ib", num_gpus=64, description="8 nodes of 8 H100 (2x8xH100-ib scaled to 64 GPUs)")
    path = work / "8x8xH100-ib.yaml"
    path.write_text(dump_yaml(c))
    return path


def deepseek_case(work: Path, cluster: Path, baseline: Path | None) -> dict:
    from bench_sim import pool_trace

    from moe_gps.trace import write_trace

    path = work / "deepseek_100x4096.parquet"
    if not path.exists():
        write_trace(path, pool_trace(100, 4096, 58, 256, 8))
    fl = floor(path)
    out = {"trace": "tokens, 100 steps x 4096 tokens, 58 layers, 256 experts, top-8", "floor": fl,
           "validate": with_ratio(measure(cli("trace", "validate", str(path))), fl),
           "simulate": with_ratio(measure(cli("simulate", str(path), "--cluster", str(cluster), "--model",
                                              "deepseek-v3", "--strategies", STRATEGIES_CLI, "--train-steps", "20",
                                              "-o", str(work / "sim-deepseek"), "--no-plots")), fl),
           "simulate_serial": with_ratio(measure(cli("simulate", str(path), "--cluster", str(cluster), "--model",
                                                     "deepseek-v3", "--strategies", STRATEGIES_CLI, "--train-steps",
                                                     "20", "-o", str(work / "sim-deepseek-1"), "--no-plots", "-j",
                                                     "1")), fl),
           "strategies": STRATEGIES_CLI}
    if baseline is not None:
        out["baseline"] = {"source": str(baseline), "floor": floor(path, baseline),
                           "validate": measure(cli("trace", "validate", str(path)), baseline)}
    return out


# The bundled trace in memory, imports excluded: the floor (load, bincount, and the GPU loads of
# every strategy's static placement at every step) and simulate() with one process and with --jobs'
# default, the median of 3 runs of each.
_IN_MEMORY = (
    "import json, statistics, sys, time\n"
    "import numpy as np\n"
    "from moe_gps.cli.common_args import cpu_cores\n"
    "from moe_gps.cli.main import build_parser\n"
    "from moe_gps.cli.simulate_cmd import build_config\n"
    "from moe_gps.placement import plan_placement\n"
    "from moe_gps.trace import load_trace\n"
    "from sim.run import simulate\n"
    "args = build_parser().parse_args(['simulate', sys.argv[1]])\n"
    "cfg = build_config(args, load_trace(sys.argv[1]))[0]\n"
    "G, K = cfg.cluster.num_gpus, len(cfg.strategies)\n"
    "def floor():\n"
    "    c = load_trace(sys.argv[1]).counts().astype(np.float64)\n"
    "    L, E = c.shape[1:]\n"
    "    p = plan_placement(np.ones((L, E)), G, (-E) % G, 'none')\n"
    "    return [p.gpu_loads(c[s]) for s in range(len(c)) for _ in range(K)]\n"
    "def run(jobs):\n"
    "    return simulate(load_trace(sys.argv[1]), cfg, progress=False, jobs=jobs)\n"
    "def median(fn, *a):\n"
    "    t = []\n"
    "    for _ in range(3):\n"
    "        t0 = time.perf_counter(); fn(*a); t.append(time.perf_counter() - t0)\n"
    "    return statistics.median(t)\n"
    "f = median(floor); one = median(run, 1); par = median(run, cpu_cores())\n"
    "print(json.dumps({'floor_s': f, 'simulate_1_s': one, 'simulate_jobs_s': par, 'jobs': cpu_cores(),\n"
    "                  'x_floor_1': one / f, 'x_floor_jobs': par / f}))\n"
)


def bundled_case(work: Path, rounds: int = BUNDLED_ROUNDS) -> dict:
    """The floor and both simulate commands ``rounds`` times each, in turn (a command of about a second is
    at the mercy of the machine's other work): the median wall time of each, the largest peak memory."""
    trace = ROOT / "traces" / "mixtral_mmlu.parquet"
    done = subprocess.run([sys.executable, "-c", _IN_MEMORY, str(trace)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"the in-memory bundled case failed:\n{done.stderr[-3000:]}")
    from moe_gps.cli.main import build_parser
    from moe_gps.cli.simulate_cmd import build_config
    from moe_gps.trace import load_trace

    cfg = build_config(build_parser().parse_args(["simulate", str(trace)]), load_trace(trace))[0]
    sizes = [str(cfg.cluster.num_gpus), str(len(cfg.strategies))]
    commands = {"floor": lambda i: ["-c", _FLOOR, str(trace)],
                "floor_loads": lambda i: ["-c", _FLOOR_LOADS, str(trace), *sizes],
                "simulate": lambda i: cli("simulate", str(trace), "-o", str(work / f"sim-bundled-{i}")),
                "simulate_no_plots": lambda i: cli("simulate", str(trace), "-o", str(work / f"sim-bundled-np-{i}"),
                                                   "--no-plots"),
                # the command's cost without the strategies' work: one strategy, with the plots
                "simulate_none": lambda i: cli("simulate", str(trace), "-o", str(work / f"sim-bundled-none-{i}"),
                                               "--strategies", "none")}
    runs: dict[str, list[dict]] = {k: [] for k in commands}
    # first with the memory sampled (the bytecode cached, the files warm; its wall time is not counted),
    # then timed without the sampler, which would slow simulate's several processes more than the floor's one
    sampled = {k: measure(args(rounds)) for k, args in commands.items()}
    for i in range(rounds):
        for k, args in commands.items():
            runs[k].append(measure(args(i), sample=False))
    figs = {k: _median_run(v + [sampled[k]], walls=v) for k, v in runs.items()}
    fl = figs["floor"]
    loads = figs["floor_loads"]
    return {"trace": f"{trace.relative_to(ROOT)}, every default strategy (median of {rounds} runs each)",
            "floor": fl, "floor_loads": loads,
            "in_memory": json.loads(done.stdout.strip().splitlines()[-1]),
            **{k: {**with_ratio(figs[k], fl), "x_floor_loads_wall": figs[k]["wall_s"] / loads["wall_s"]}
               for k in ("simulate", "simulate_no_plots", "simulate_none")}}


def _median_run(runs: list[dict], walls: list[dict] | None = None) -> dict:
    """The run of median wall time (of ``walls``, default ``runs``), with those runs' wall times and the
    largest peak memory of ``runs``."""
    walls = runs if walls is None else walls
    mid = sorted(walls, key=lambda r: r["wall_s"])[len(walls) // 2]
    return {**mid, "walls_s": [r["wall_s"] for r in walls],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "peak_tree_pss_mb": max(r.get("peak_tree_pss_mb", 0.0) for r in runs)}


def counts_case(work: Path, cluster: Path, steps: int, baseline: Path | None, simulate: bool = True) -> dict:
    path = work / f"deepseek_counts_{steps}.parquet"
    synth = measure(cli("trace", "synth", "--profile", "deepseek-v3", "--kind", "counts", "--steps", str(steps),
                        "--tokens-per-step", "4096", "-o", str(path)))
    fl = floor(path)
    out = {"trace": f"counts, {steps} steps x 4096 tokens, 58 layers, 256 experts, top-8", "synth": synth,
           "file_mb": path.stat().st_size / 1e6, "counts_array_mb": steps * 58 * 256 * 8 / 1e6, "floor": fl,
           "validate": with_ratio(measure(cli("trace", "validate", str(path))), fl),
           "strategies": STRATEGIES_LONG + " (eplb at vLLM's cadence: window 1000, interval 3000)"}
    if simulate:
        out["simulate"] = with_ratio(measure(cli("simulate", str(path), "--cluster", str(cluster), "--model",
                                                 "deepseek-v3", "--strategies", STRATEGIES_LONG, "-o",
                                                 str(work / f"sim-counts-{steps}"), "--no-plots")), fl)
    if baseline is not None:
        out["baseline"] = {"source": str(baseline), "floor": floor(path, baseline),
                           "validate": measure(cli("trace", "validate", str(path)), baseline)}
    return out


def _same_report(a: Path, b: Path) -> bool:
    import pandas as pd

    ra, rb = (pd.read_csv(d / "runs.csv").drop(columns=["wall_s"]) for d in (a, b))
    ja, jb = (json.loads((d / "recommendation.json").read_text()) for d in (a, b))
    for j in (ja, jb):
        j.pop("timings_s")
    return bool(ra.equals(rb) and ja == jb)


def _ray_head(work: Path, env: dict) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    log = open(work / "ray-head.log", "w")
    proc = subprocess.Popen([ray, "start", "--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard",
                             "false", "--disable-usage-stats", "--block"], env=env, stdout=log, stderr=log,
                            start_new_session=True)
    address = f"127.0.0.1:{port}"
    probe = f"import ray; ray.init(address='{address}', log_to_driver=False); print(ray.cluster_resources())"
    for _ in range(60):
        if subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode == 0:
            return proc, address
        time.sleep(1)
    proc.terminate()
    raise SystemExit(f"the Ray head did not come up; see {work / 'ray-head.log'}")


def _stop_group(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM to the Ray head's session, then wait until all of it has exited (its GCS, raylet and
    workers shutting down would otherwise take CPU from the next measurement)."""
    os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def sweep_case(work: Path) -> dict:
    trace = ROOT / "traces" / "mixtral_mmlu.parquet"
    fl = floor(trace)
    env = {"RAY_AUTH_MODE": "disabled"}
    base = ["recommend", str(trace), "--cluster", "4xA100-nvlink", "-j", "2"]
    out: dict = {"trace": str(trace.relative_to(ROOT)), "sweep": "built-in", "jobs": 2, "floor": fl}
    out["local"] = with_ratio(measure(cli(*base, "-o", str(work / "rec-local"))), fl)
    head, address = _ray_head(work, {**os.environ, **env})
    try:
        out["ray_existing_cluster"] = with_ratio(
            measure(cli(*base, "--backend", "ray", "--address", address, "-o", str(work / "rec-ray-head")), env=env), fl)
    finally:
        _stop_group(head)
    out["ray_local_cluster"] = with_ratio(
        measure(cli(*base, "--backend", "ray", "-o", str(work / "rec-ray-local")), env=env), fl)
    runs = json.loads((work / "rec-local" / "recommendation.json").read_text())["runs"]["total"]
    out["runs"] = runs
    for k in ("ray_existing_cluster", "ray_local_cluster"):
        out[k]["x_local"] = out[k]["wall_s"] / out["local"]["wall_s"]
    out["identical_reports"] = (_same_report(work / "rec-local", work / "rec-ray-head")
                                and _same_report(work / "rec-local", work / "rec-ray-local"))
    return out


def _row(name: str, fig: dict) -> str:
    ratio = f"{fig['x_floor_wall']:6.1f}x {fig['x_floor_rss']:5.1f}x" if "x_floor_wall" in fig else " " * 14
    return f"  {name:34s} {fig['wall_s']:8.1f} s {peak_mb(fig):8.0f} MB   {ratio}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-10k", action="store_true", help="only 10^3 steps for the counts case")
    ap.add_argument("--no-simulate-counts", action="store_true",
                    help="counts traces: synth, validate and load only, no simulate")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-cli", action="store_true")
    ap.add_argument("--baseline", type=Path, help="another source tree to measure validation with (before/after)")
    ap.add_argument("--work", type=Path, help="folder for traces and outputs (default: a temporary one, removed)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {"cases": {}}
    try:
        cluster = cluster_64(work)
        figures["cases"]["bundled"] = bundled_case(work)
        if not args.skip_cli:
            figures["cases"]["deepseek-cli"] = deepseek_case(work, cluster, args.baseline)
        for steps in (1000,) if args.skip_10k else (1000, 10000):
            figures["cases"][f"counts-{steps}"] = counts_case(work, cluster, steps, args.baseline,
                                                              simulate=not args.no_simulate_counts)
        if not args.skip_sweep:
            figures["cases"]["sweep"] = sweep_case(work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    path = save("bench_scale", figures)
    print(f"{'case':36s} {'wall':>10s} {'peak mem':>11s}   x floor (wall, RSS)")
    for name, c in figures["cases"].items():
        print(f"{name}: {c['trace']}")
        for key in ("floor", "synth", "validate", "simulate", "simulate_no_plots", "simulate_none", "simulate_serial",
                    "local",
                    "ray_existing_cluster", "ray_local_cluster"):
            if key in c:
                print(_row(key, c[key]))
        if "floor_loads" in c:
            print(f"  against a floor with the GPU loads of every strategy ({c['floor_loads']['wall_s']:.2f} s): "
                  f"simulate {c['simulate']['x_floor_loads_wall']:.1f}x, without plots "
                  f"{c['simulate_no_plots']['x_floor_loads_wall']:.1f}x; the command and its plots with the one "
                  f"strategy none {c['simulate_none']['x_floor_loads_wall']:.1f}x")
        if "in_memory" in c:
            m = c["in_memory"]
            print(f"  in memory: floor {m['floor_s']:.2f} s; simulate() {m['simulate_1_s']:.2f} s with one process "
                  f"({m['x_floor_1']:.1f}x), {m['simulate_jobs_s']:.2f} s with {m['jobs']} ({m['x_floor_jobs']:.1f}x)")
        for key in ("floor", "validate"):
            if key in c.get("baseline", {}):
                print(_row(f"{key} (baseline)", c["baseline"][key]))
        if name == "sweep":
            print(f"  {c['runs']} runs; ray / local: existing cluster {c['ray_existing_cluster']['x_local']:.2f}x, "
                  f"cluster started for the run {c['ray_local_cluster']['x_local']:.2f}x; identical reports: "
                  f"{c['identical_reports']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
