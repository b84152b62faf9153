"""``moe-gps validate``: run the runtime and the simulator on the same case and compare.

For every number of ranks N:

1. a cluster file: ``--cluster`` or ``moe-gps calibrate`` on N ranks, written to
   ``DIR/cluster-N.yaml`` (with the run config's model shapes);
2. for every strategy (a runtime ``--duplication`` mode): ``torchrun --nproc_per_node N -m
   runtime.launch`` with the run config, its token ids taken from TRACE
   (``input.trace``), ``duplication.verify: false`` (the fingerprint check is not part of the
   strategy's cost) -> ``DIR/runs/N<N>-<mode>/``;
3. the run's placements replayed (:mod:`runtime.replay`), checked against what the
   run recorded, and the run's own trace simulated with them on the cluster file;
4. predicted against measured per step and phase (:mod:`moe_gps.fidelity.compare`).

Outputs in DIR: ``fidelity.csv`` (per N, strategy, phase: means and error),
``steps.csv`` (every compared step), ``fidelity.png``, ``summary.txt``, ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from moe_gps.errors import UserError
from moe_gps.jsonsafe import dumps_json
from moe_gps.fidelity.calibrate import MeasurementFailed, calibrate, torchrun_env
from moe_gps.fidelity.model import MODE_KINDS, model_for_run

MODES = tuple(MODE_KINDS)
#: runs during which other processes used more cores than this (on average) are left out when others qualify
BUSY_CORES = 0.25


@dataclass
class ValidateOptions:
    trace: str
    config: str
    out: Path
    nprocs: list[int] = field(default_factory=lambda: [2])
    strategies: list[str] = field(default_factory=lambda: list(MODES))
    cluster: str | None = None
    steps: int | None = None
    skip: int | None = None
    repeats: int = 20
    runs: int = 1
    quick: bool = False
    attempts: int = 3
    quiet: bool = False
    max_phase_error: float | None = None     # fraction (0.1 = 10%); None: no check
    device: str | None = None                # where the calibrations' ranks run; None: the runs' run.device


def check_inputs(opt: ValidateOptions):
    """Every input problem as one UserError line; returns (run config, trace)."""
    from moe_gps.trace import load_trace
    from moe_gps.trace.data import TokensTrace
    from runtime.config import load_run_config
    from runtime.duplication import DuplicationPolicy

    trace = load_trace(opt.trace)
    if not isinstance(trace, TokensTrace) or trace.token_id is None:
        raise UserError(f"{opt.trace}: has no token_id column; validate feeds the trace's token ids to the runtime "
                        "(use a tokens trace with token ids, e.g. traces/mixtral_mmlu.parquet)")
    run_cfg = load_run_config(opt.config)
    model_for_run(run_cfg, opt.config)
    if not opt.strategies:
        raise UserError("--strategies: no strategy named")
    bad = [s for s in opt.strategies if s not in MODES]
    if bad:
        raise UserError(f"--strategies: {bad[0]!r} is not a runtime duplication mode ({', '.join(MODES)})")
    if len(set(opt.strategies)) != len(opt.strategies):
        raise UserError("--strategies: a strategy is named twice")
    if any(n < 2 for n in opt.nprocs):
        raise UserError(f"--nproc: every value must be at least 2, got {min(opt.nprocs)}")
    if len(set(opt.nprocs)) != len(opt.nprocs):
        raise UserError("--nproc: a value is named twice")
    if opt.cluster and len(opt.nprocs) != 1:
        raise UserError("--cluster describes one number of ranks; give exactly one --nproc with it")
    m, d = run_cfg.model, run_cfg.duplication
    if d.min_gain > 0 and d.cluster:
        from moe_gps.config.loader import load_cluster
        g = load_cluster(d.cluster).num_gpus
        if any(n != g for n in opt.nprocs):
            raise UserError(f"{opt.config}: duplication.cluster {d.cluster} describes {g} GPUs, but --nproc asks "
                            f"for {' '.join(map(str, opt.nprocs))} ranks; the min_gain rule needs the cluster of the "
                            "run's ranks")
    for n in opt.nprocs:
        for mode in opt.strategies:
            try:
                DuplicationPolicy(mode, for_mode(run_cfg, mode).duplication, n, m.num_layers, m.num_experts, m.top_k,
                                  n * run_cfg.input.batch_size * run_cfg.input.seq_len)
            except UserError as err:
                raise UserError(f"{opt.config}: --nproc {n}, strategy {mode}: {err}") from None
    steps = opt.steps if opt.steps is not None else run_cfg.run.steps
    skip = first_step(opt, run_cfg)
    if steps - skip < 2:
        raise UserError(f"{steps} step(s) leave {max(0, steps - skip)} to compare after the first {skip} "
                        f"(warm-up); use --steps of at least {skip + 2}")
    if opt.runs < 1:
        raise UserError(f"--runs must be at least 1, got {opt.runs}")
    if opt.repeats < 3:
        raise UserError(f"--repeats must be at least 3, got {opt.repeats}")
    if opt.max_phase_error is not None and not (0 <= opt.max_phase_error < float("inf")):
        raise UserError(f"--max-phase-error must be a percentage >= 0 (e.g. 10), got {opt.max_phase_error * 100:g}")
    if opt.cluster:
        from moe_gps.config.loader import load_cluster, preset_names
        if opt.cluster in preset_names("clusters") and not Path(opt.cluster).is_file():
            raise UserError(f"--cluster {opt.cluster}: a preset describes GPUs, not the ranks validate runs; give a "
                            "cluster file from `moe-gps calibrate` on this machine")
        c = load_cluster(opt.cluster)
        if c.num_gpus != opt.nprocs[0]:
            raise UserError(f"{opt.cluster}: num_gpus is {c.num_gpus}, but --nproc is {opt.nprocs[0]}")
    return run_cfg, trace


#: the report validate writes into its output folder
REPORT_FILES = ("fidelity.csv", "steps.csv", "fidelity.png", "summary.txt", "summary.json")


def cluster_path(out: Path, n: int, r: int, runs: int) -> Path:
    """The calibration of round ``r`` (of ``runs``) for ``n`` ranks."""
    return out / (f"cluster-{n}.yaml" if runs == 1 else f"cluster-{n}-{r}.yaml")


def run_path(out: Path, n: int, mode: str, r: int, runs: int) -> Path:
    """The folder of round ``r``'s run of ``mode`` on ``n`` ranks."""
    return out / "runs" / (f"N{n}-{mode}" + (f"-{r}" if runs > 1 else ""))


def planned_outputs(opt: ValidateOptions) -> tuple[list[Path], list[Path]]:
    """(the files validate writes outside its runs' folders, the runs' folders), under ``opt.out``."""
    from moe_gps.fidelity.calibrate import calibration_files

    out = Path(opt.out)
    files = [out / "runs" / "run.yaml", out / "runs" / "run-without-plan.yaml", *(out / f for f in REPORT_FILES)]
    folders = []
    for n in opt.nprocs:
        for r in range(opt.runs):
            files += [] if opt.cluster else calibration_files(cluster_path(out, n, r, opt.runs))
            folders += [run_path(out, n, mode, r, opt.runs) for mode in opt.strategies]
    return files, folders


def earlier_outputs(opt: ValidateOptions) -> list[str]:
    """The run folders and calibrations in ``opt.out`` named as validate names them but not this validation's
    (an earlier one's, with more rounds, ranks or strategies): paths relative to ``opt.out``, sorted."""
    import re

    from moe_gps.outputs import same_file

    out = Path(opt.out)
    files, folders = planned_outputs(opt)
    mine = set(files + folders)
    runs = [p for p in (out / "runs").glob("N*-*") if p.is_dir() and re.fullmatch(r"N\d+-.+", p.name)]
    calibrations = [p for p in out.glob("cluster-*.yaml") if re.fullmatch(r"cluster-\d+(-\d+)?\.yaml", p.name)
                    and not (opt.cluster and same_file(p, opt.cluster))]            # --cluster: this one's
    return sorted(str(p.relative_to(out)) for p in runs + calibrations if p not in mine)


def check_outputs_spare_inputs(opt: ValidateOptions, run_cfg) -> None:
    """A UserError, before anything runs, when a file validate writes (a run's, a calibration's, the report)
    would replace one it reads: TRACE, the run config, --cluster, the plan or cluster file the config names."""
    from moe_gps.outputs import same_file
    from runtime.config import run_outputs

    d = run_cfg.duplication
    reads = [p for p in (opt.trace, opt.config, opt.cluster, d.placement, d.cluster) if p]
    files, folders = planned_outputs(opt)
    writes = files + [f / name for f in folders for name in run_outputs(run_cfg)]
    for path in writes:
        hit = next((p for p in reads if same_file(p, path)), None)
        if hit is not None:
            raise UserError(f"{path}: validate would write over its input {hit}; write to another folder (-o)")


def for_mode(run_cfg, mode: str):
    """The run config of one strategy: a plan file (``duplication.placement``) is ``static``'s alone, which
    the other modes refuse, so their runs go without it."""
    if mode == "static" or not run_cfg.duplication.placement:
        return run_cfg
    return dataclasses.replace(run_cfg, duplication=dataclasses.replace(run_cfg.duplication, placement=None))


def first_step(opt: ValidateOptions, run_cfg) -> int:
    """First compared step: --skip, else the duplication warm-up (at least 2, so that the step
    before it can be simulated and the copies into it charged)."""
    if opt.skip is not None:
        if opt.skip < 2:
            raise UserError(f"--skip must be at least 2, got {opt.skip}")
        return opt.skip
    return max(2, run_cfg.duplication.warmup_steps)


def write_run_config(run_cfg, opt: ValidateOptions, path: Path) -> Path:
    """The run config every run of the validation uses (YAML, absolute input paths)."""
    import yaml

    from moe_gps.atomic import write_text_atomic

    doc = run_cfg.to_dict()
    doc["input"]["trace"] = str(Path(opt.trace).resolve())
    doc["duplication"]["verify"] = False
    if doc["duplication"].get("placement"):
        doc["duplication"]["placement"] = str(Path(doc["duplication"]["placement"]).resolve())
    if opt.steps is not None:
        doc["run"]["steps"] = opt.steps
    doc["output"]["dir"] = str((opt.out / "runs").resolve())
    text = (f"# run config of moe-gps validate, from {run_cfg.source}: token ids from {opt.trace}, "
            "weight fingerprint check off\n" + yaml.safe_dump(doc, sort_keys=False))
    write_text_atomic(path, text)
    return path


def run_runtime(config_path: Path, mode: str, nproc: int, out: Path, threads: int | None):
    """One runtime run under torchrun; returns its :class:`~moe_gps.fidelity.quiet.Watched`."""
    from moe_gps.fidelity.quiet import run_watched

    cmd = [sys.executable, "-m", "runtime.torchrun", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "runtime.launch", "--config", str(config_path), "--duplication", mode, "--out", str(out), "--quiet"]
    w = run_watched(cmd, env=torchrun_env(threads, nproc), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if w.proc.returncode:
        err = w.proc.stderr.strip().splitlines()
        # a rank's own one-line error says why; torchrun's summary after it does not
        lines = ([ln for ln in err if "runtime.launch: error:" in ln][-1:]
                 or [ln for ln in err if "error" in ln.lower()] or err)
        raise MeasurementFailed(f"runtime run {out} failed (torchrun exit code {w.proc.returncode}): "
                                + " | ".join(lines[-2:]))
    return w


def validate(opt: ValidateOptions):
    """Run everything; returns (comparisons, ranking, text report). Writes the files in ``opt.out``."""
    from moe_gps.outputs import check_output_dir, set_aside

    run_cfg, _ = check_inputs(opt)
    check_outputs_spare_inputs(opt, run_cfg)
    out = check_output_dir(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    files, folders = planned_outputs(opt)
    # the runs record their own paths, so they are written in place: an earlier validation's files are set
    # aside meanwhile, and come back if this one fails or is stopped
    with set_aside(out, [p.relative_to(out) for p in files + folders]):
        return _validate(opt, run_cfg, out)


def _validate(opt: ValidateOptions, run_cfg, out: Path):
    """:func:`validate`'s work, in ``out``."""
    from moe_gps.atomic import write_csv_atomic, write_text_atomic
    from moe_gps.config.loader import load_cluster
    from moe_gps.fidelity.compare import compare_run, ranking
    from moe_gps.fidelity.measured import measured_phases, read_run
    from runtime.replay import check_replay, replay_run, simulate_run
    from moe_gps.fidelity.report import format_report, plot, step_rows, summary_rows
    from moe_gps.tables import rows_to_columns
    from moe_gps.trace import load_trace
    from runtime.config import load_run_config
    from runtime.dist import choose_device

    say = (lambda *a: None) if opt.quiet else (lambda msg: print(f"validate: {msg}", file=sys.stderr, flush=True))
    cfg_path = write_run_config(run_cfg, opt, out / "runs" / "run.yaml")
    run_cfg = load_run_config(cfg_path)
    # a plan file is static's: the other strategies run from the same config without it
    cfg_paths = {mode: cfg_path if for_mode(run_cfg, mode) is run_cfg else
                 write_run_config(for_mode(run_cfg, mode), opt, out / "runs" / "run-without-plan.yaml")
                 for mode in opt.strategies}
    first = first_step(opt, run_cfg)
    device = opt.device or choose_device(run_cfg.run.device, where=f"{opt.config}: run.device").type
    comparisons, clusters, loads = [], {}, []
    for n in opt.nprocs:
        made: dict[str, list] = {m: [] for m in opt.strategies}
        rounds: list = []               # the cluster of each round
        for r in range(opt.runs):
            # a round: a calibration, then one run of every strategy; the runs are predicted from the
            # calibration of their own round, so that both see the machine in the same state
            loads.append(os.getloadavg()[0])
            if opt.cluster:
                rounds.append(load_cluster(opt.cluster))
                clusters.setdefault(n, []).append(str(opt.cluster))
            else:
                path = cluster_path(out, n, r, opt.runs)
                say(f"calibrating {n} ranks -> {path}")
                cal = calibrate(run_cfg, n, path, repeats=opt.repeats, quick=opt.quick, device=device, quiet=True,
                                attempts=opt.attempts)
                rounds.append(cal.cluster)
                busy = cal.info.get("interference")
                clusters.setdefault(n, []).append(
                    str(path) + ("" if busy is None else f" (others used {busy:.2f} cores meanwhile)"))
            # round r starts with the r-th strategy: a machine that drifts within a round (e.g. faster
            # just after the calibration) does not favour the strategy that always runs first
            k = r % len(opt.strategies)
            for mode in opt.strategies[k:] + opt.strategies[:k]:
                run_dir = run_path(out, n, mode, r, opt.runs)
                loads.append(os.getloadavg()[0])
                say(f"running the runtime: {n} ranks, --duplication {mode}, {run_cfg.run.steps} steps"
                    + (f", round {r + 1}/{opt.runs}" if opt.runs > 1 else "") + f" -> {run_dir}")
                w = run_runtime(cfg_paths[mode], mode, n, run_dir, run_cfg.run.threads)
                made[mode].append((run_dir, w.interference, r))
        for mode in opt.strategies:
            # each run is replayed from its own trace and steps.csv: under copy_policy async a move
            # switches in when its weights have landed, which differs from run to run
            runs, problems = [], []
            for d, busy, r in made[mode]:
                timings, steps = read_run(d)
                trace = load_trace(d / run_cfg.output.trace)
                replay = replay_run(trace, for_mode(run_cfg, mode), mode, n, steps)
                problems += check_replay(replay.placements, trace, timings, d)
                runs.append((d, busy, r, measured_phases(timings, steps), trace, replay))
            # pool the runs during which other processes used at most BUSY_CORES cores (else the quietest)
            quiet = [x for x in runs if x[1] is None or x[1] <= BUSY_CORES] or \
                [min(runs, key=lambda x: x[1])]
            say(f"simulating the runs' traces with their placements ({n} ranks, {mode})")
            pairs = []
            for d, _, r, measured, trace, replay in quiet:
                trace_path = d / run_cfg.output.trace
                result, res = simulate_run(trace, for_mode(run_cfg, mode), mode, rounds[r], replay, first,
                                           str(trace_path))
                pairs.append((res, result.steps, measured))
            comp = compare_run(n, mode, pairs, first)
            known = [x[1] for x in quiet if x[1] is not None]
            comp.interference = max(known) if known else None
            comp.notes += problems[:3]
            if len(runs) > 1:
                comp.notes.append(f"{len(quiet)} of {len(runs)} runs pooled; run means "
                                  + ", ".join(f"{v * 1e3:.1f}" for v in comp.run_means) + " ms; other processes "
                                  + ", ".join("?" if x[1] is None else f"{x[1]:.2f}" for x in runs) + " cores")
            shares = [x[3].ffn_cpu_share for x in quiet if x[3].ffn_cpu_share is not None]
            if shares:
                comp.notes.append(f"the busiest rank's expert compute (each layer's): its CPU time "
                                  f"{sum(shares) / len(shares):.0%} of its time (on CPU ranks, the share of a processor "
                                  "it had)")
            comparisons.append(comp)
    loads.append(os.getloadavg()[0])
    ranks = ranking(comparisons)
    round_is = "one run per strategy" if opt.cluster else "a calibration, then one run per strategy"
    header = (f"moe-gps validate {opt.trace} --config {opt.config}: steps {first}..{run_cfg.run.steps - 1} of "
              f"{opt.runs} round(s) ({round_is}) compared; clusters: "
              + "; ".join(f"{n} ranks {', '.join(p)}" for n, p in clusters.items())
              + f"; 1-minute load average (this job's ranks included) {min(loads):.2f}-{max(loads):.2f} "
              f"on {os.cpu_count()} cores")
    text = format_report(comparisons, ranks, header)
    write_csv_atomic(out / "fidelity.csv", rows_to_columns(summary_rows(comparisons)))
    write_csv_atomic(out / "steps.csv", rows_to_columns(step_rows(comparisons)))
    plot(comparisons, out / "fidelity.png")
    write_text_atomic(out / "summary.txt", text + "\n")
    summary = {"trace": opt.trace, "config": opt.config, "first_step": first, "clusters": clusters,
               "runs": opt.runs, "load_average": [min(loads), max(loads)], "cpu_count": os.cpu_count(),
               "ranking": {str(k): v for k, v in ranks.items()}, "rows": summary_rows(comparisons)}
    write_text_atomic(out / "summary.json", dumps_json(summary, indent=2) + "\n")
    return comparisons, ranks, text


def phase_check_line(comparisons, max_error: float) -> str | None:
    """None when every phase that takes at least 5% of the step is within ``max_error`` (fraction) of the
    measurement's 95% interval, else one line naming the worst (ranks, strategy, phase) and how many fail."""
    from moe_gps.fidelity.compare import MIN_PHASE_SHARE, phase_failures

    bad = phase_failures(comparisons, max_error)
    if not bad:
        return None
    n, mode, phase, off, share = bad[0]
    more = f" (and {len(bad) - 1} more phase(s))" if len(bad) > 1 else ""
    return (f"phase {phase} ({n} ranks, {mode}; {share:.0%} of the step) is predicted {off * 100:.1f}% of its "
            f"measured mean outside the measurement's 95% interval, more than --max-phase-error "
            f"{max_error * 100:g}%{more}; phases under {MIN_PHASE_SHARE:.0%} of the step are not checked")
