"""``moe-gps calibrate`` (measure this machine, write a cluster file) and ``moe-gps validate``
(runtime against simulator). See docs/fidelity.md. torch is imported only by the ranks that
torchrun starts; this process needs numpy, the simulator and the runtime's config module.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from moe_gps.cli.run_cmd import NPROC_HELP, check_nproc, local_device
from moe_gps.errors import UserError
from runtime.config import DUPLICATION_MODES as MODES      # no torch


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "calibrate", help="measure this machine in the runtime's setting and write a cluster file for the simulator",
        description=("Start N ranks with torchrun (gloo on CPU, NCCL on GPUs, the runtime's threads per rank) and "
                     "measure: the expert FFN's FLOP rate and per-call overhead for the model's expert shapes, the "
                     "attention block's rate and overhead, memory and token-permutation bandwidth, "
                     "all_to_all_single latency and bandwidth (which weight copies use too), the collective skew "
                     "(time between the first and the last rank leaving a collective), and the fixed costs "
                     "of the runtime's MoE-layer phases. Means over repeats; writes a cluster YAML that "
                     "`moe-gps simulate --cluster` reads, and CSVs of the measurements. Formulas: docs/fidelity.md."))
    c.add_argument("-o", "--output", required=True, metavar="FILE", help="cluster YAML to write")
    c.add_argument("--nproc", type=int, default=2,
                   help=f"ranks, at least 2, as the runs the file will describe ({NPROC_HELP}; default: %(default)s)")
    c.add_argument("--config", metavar="RUN_YAML",
                   help="run config whose model shapes are measured (default: the runtime's default model)")
    c.add_argument("--repeats", type=int, default=20,
                   help="timed repeats per size, at least 3; every number is a mean over them (default: %(default)s)")
    c.add_argument("--quick", action="store_true",
                   help="fewer sizes and at most 5 repeats (about half a minute on 2 CPU ranks)")
    c.add_argument("--attempts", type=int, default=3,
                   help="measure again, at most this many times in all (at least 1), while other processes use more "
                        "than a quarter of a core; the quietest attempt is kept (default: %(default)s)")
    c.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: a GPU (NCCL) when torch sees one, else CPU (gloo) (default: %(default)s)")
    c.set_defaults(func=cmd_calibrate)

    v = sub.add_parser(
        "validate", help="run the runtime and the simulator on the same case; predicted vs measured time",
        description=("For each --nproc N: calibrate N ranks (or use --cluster), run the runtime under torchrun for "
                     "each strategy (duplication mode) with TRACE's token ids, replay the placements each run used, "
                     "simulate the run's own router trace with them, and report predicted against measured MoE time "
                     "per step (mean over steps) and per phase, with the error and the strategies' ranking. "
                     "Writes fidelity.csv, steps.csv, fidelity.png, summary.txt, summary.json and, without --cluster, "
                     "each round's calibration (cluster-N.yaml, cluster-N-R.yaml with --runs, each with its "
                     ".model.yaml, .measurements.csv and .samples.csv) to the output folder, and the runs and their "
                     "run configs in its runs/ folder. The runs and calibrations use the run config's run.device. "
                     "Method and reading the report: docs/fidelity.md."))
    v.add_argument("trace", help="tokens trace whose token_id column feeds the runtime "
                                 "(e.g. traces/mixtral_mmlu.parquet)")
    v.add_argument("--config", required=True, metavar="RUN_YAML", help="run config (model, input, duplication)")
    v.add_argument("--nproc", type=int, nargs="+", default=[2], metavar="N",
                   help=f"numbers of ranks, each at least 2 ({NPROC_HELP}; default: 2)")
    v.add_argument("--strategies", nargs="+", default=list(MODES), metavar="MODE",
                   help=f"duplication modes to compare ({', '.join(MODES)}), space or comma separated "
                        f"(default: all of them)")
    v.add_argument("--cluster", metavar="FILE", help="a cluster file from `moe-gps calibrate` instead of calibrating "
                                                     "(one --nproc only)")
    v.add_argument("--steps", type=int, help="override run.steps (default: the run config's run.steps, else 16)")
    v.add_argument("--skip", type=int, help="first compared step (default: duplication.warmup_steps, at least 2)")
    v.add_argument("--runs", type=int, default=1,
                   help="rounds: each calibrates (unless --cluster), then runs every strategy once; steps pooled, "
                        "each run predicted from its own round's calibration (default: %(default)s)")
    v.add_argument("--repeats", type=int,
                   help="calibration repeats per size, at least 3 (default: 20; not with --cluster)")
    v.add_argument("--quick", action="store_true",
                   help="quick calibration (fewer sizes and repeats; not with --cluster)")
    v.add_argument("--attempts", type=int,
                   help="calibration attempts while the machine is busy, at least 1 (see moe-gps calibrate; "
                        "default: 3; not with --cluster)")
    v.add_argument("--max-phase-error", type=float, metavar="PERCENT",
                   help="exit 1 when any phase that takes at least 5%% of the measured step is predicted more than "
                        "PERCENT %% of its measured mean outside the measurement's 95%% interval (e.g. 10; default: no "
                        "check)")
    v.add_argument("-o", "--output", metavar="DIR", help="output folder (default: moe-gps-out/validate-<config name>)")
    v.set_defaults(func=cmd_validate)


def _need_torch() -> None:
    if importlib.util.find_spec("torch") is None:
        raise UserError("this command runs the runtime and needs torch: pip install 'moe-gps[runtime]'")


def check_calibration_flags(repeats: int, attempts: int) -> None:
    """--repeats and --attempts of a calibration, as calibrate and validate take them."""
    if repeats < 3:
        raise UserError(f"--repeats must be at least 3 (every number is a mean over the repeats), got {repeats}")
    if attempts < 1:
        raise UserError(f"--attempts must be at least 1, got {attempts}")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from moe_gps.fidelity.calibrate import MeasurementFailed, calibrate
    from moe_gps.tables import format_table
    from runtime.config import load_run_config, parse_run_config

    _need_torch()
    if args.nproc < 2:
        raise UserError(f"--nproc must be at least 2 (the links are measured between ranks), got {args.nproc}")
    check_calibration_flags(args.repeats, args.attempts)
    device = local_device(args.device, "--device")
    check_nproc(args.nproc, device)
    from moe_gps.fidelity.calibrate import calibration_files
    from moe_gps.outputs import check_output_file, same_file
    out = check_output_file(args.output)
    if out.suffix not in (".yaml", ".yml"):
        raise UserError(f"{out}: the cluster file must end in .yaml or .yml")
    for path in calibration_files(out):
        check_output_file(path, None)
        if args.config and same_file(path, args.config):
            raise UserError(f"{path}: the calibration would write over its --config {args.config}; "
                            "write it to another file (-o)")
    run_cfg = load_run_config(args.config) if args.config else parse_run_config({}, "runtime defaults")
    try:
        cal = calibrate(run_cfg, args.nproc, out, repeats=args.repeats, quick=args.quick, device=device,
                        attempts=args.attempts)
    except MeasurementFailed as err:
        print(f"moe-gps: error: {err}", file=sys.stderr)
        return 1
    rows = [{"key": k, "value": f"{v:.4g}", "unit": u, "how": h} for k, (v, u, h) in cal.fits.items()]
    print(format_table(rows, [("key", "field", ""), ("value", "value", ""), ("unit", "unit", ""),
                              ("how", "measured as", "")], title=f"{cal.cluster.name}: {cal.cluster.description}"))
    stem = out.with_suffix("")
    print(f"\nwrote {out}, {stem}.model.yaml, {stem}.measurements.csv, {stem}.samples.csv\n"
          f"use it: moe-gps simulate TRACE --cluster {out} (a trace the runtime recorded with this model: "
          f"add --model {stem}.model.yaml)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from moe_gps.config.loader import split_strategy_names
    from moe_gps.fidelity.calibrate import MeasurementFailed
    from runtime.validate import REPORT_FILES, ValidateOptions, earlier_outputs, validate

    _need_torch()
    from moe_gps.outputs import check_output_dir, hold_output_dir
    from runtime.config import load_run_config
    from runtime.validate import check_inputs

    # every flag before anything is printed or created
    out = Path(args.output) if args.output else Path("moe-gps-out") / f"validate-{Path(args.config).stem}"
    if args.cluster:
        given = [flag for flag, v in (("--repeats", args.repeats), ("--quick", args.quick or None),
                                      ("--attempts", args.attempts)) if v is not None]
        if given:
            raise UserError(f"{given[0]} applies to the calibration, which --cluster replaces; drop "
                            f"{' and '.join(given)} or --cluster")
    repeats = 20 if args.repeats is None else args.repeats
    attempts = 3 if args.attempts is None else args.attempts
    check_calibration_flags(repeats, attempts)
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    mpe = args.max_phase_error       # checked with the other options by check_inputs()
    opt = ValidateOptions(trace=args.trace, config=args.config, out=out, nprocs=list(args.nproc),
                          strategies=split_strategy_names(args.strategies), cluster=args.cluster, steps=args.steps,
                          skip=args.skip,
                          repeats=repeats, runs=args.runs, quick=args.quick, attempts=attempts,
                          max_phase_error=None if mpe is None else mpe / 100.0)
    check_output_dir(out)
    opt.device = local_device(load_run_config(args.config).run.device, f"{args.config}: run.device")
    for n in opt.nprocs:
        check_nproc(n, opt.device)    # the runs' ranks, and the calibrations' on the same device
    check_inputs(opt)
    hold_output_dir(out)
    try:
        comparisons, _, text = validate(opt)
    except MeasurementFailed as err:
        print(f"moe-gps: error: {err}", file=sys.stderr)
        return 1
    print(text)
    print(f"\nwrote {out}/: {', '.join(REPORT_FILES)} (runs in {out}/runs/)")
    earlier = earlier_outputs(opt)
    if earlier:
        print(f"note: {out}/ also holds {', '.join(earlier)} from an earlier validation; this report does not use "
              "them")
    if opt.max_phase_error is not None:
        from runtime.validate import phase_check_line
        line = phase_check_line(comparisons, opt.max_phase_error)
        if line:
            print(f"moe-gps: error: {line}", file=sys.stderr)
            return 1
        print(f"every phase of at least 5% of the step is within {mpe:g}% of the measurement's 95% interval")
    return 0
