"""Flags shared by ``moe-gps simulate``, ``recommend`` and ``serve``, and how they become configs.

Both commands describe the deployment the same way: a cluster, a model and a workload
(``--cluster``, ``--model``, ``--workload``), with the workload's fields overridable by
``--phase``, ``--seq-len`` and ``--tokens-per-step``. :func:`add_deployment_args` adds
those flags; :func:`deployment_from_args` turns them into
``(ClusterConfig, ModelConfig, WorkloadConfig)``.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

from moe_gps.errors import StrategyError, UserError

DEFAULT_CLUSTER = "4xA100-nvlink"

# argparse destinations of the deployment flags, in the order they are added.
DEPLOYMENT_DESTS = ("cluster", "model", "workload", "phase", "seq_len", "tokens_per_step")


@contextmanager
def named_by(flag: str, value, quote: bool = True):
    """Where the flag was given (``value``, its value, not None or empty), a UserError raised inside starts with
    it (``--cluster: unknown cluster preset ...``), with its value where the message does not quote it and
    ``quote``. The functions that raise it also read config files, whose messages name the file instead, so
    the flag is added here."""
    try:
        yield
    except UserError as err:
        if value:
            text = str(err)
            head = flag if not quote or str(value) in text else f"{flag} {value}"
            err.args = (f"{head}: {text}",)
        raise


@contextmanager
def strategies_named(args: argparse.Namespace):
    """A :class:`~moe_gps.errors.StrategyError` raised inside (from a strategy's predictor or planner options)
    says where the strategy was given: the ``--config`` file, or ``--strategies NAME``."""
    try:
        yield
    except StrategyError as err:
        if getattr(args, "config", None):
            raise UserError(f"{args.config}: {err}") from None
        if getattr(args, "strategies", None):
            raise UserError(f"--strategies {err.name}: {err.reason}") from None
        raise


def whole_number(least: int):
    """An argparse ``type``: a whole number >= ``least``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{text} must be at least {least}")
        return value
    return parse


#: argparse types: counts of at least 1 (steps, repeats, experts) and of at least 0
positive_int, nonnegative_int = whole_number(1), whole_number(0)


def no_verdict_note(strategies: list) -> list[str]:
    """The note of a run without ``none``, which the verdict needs (nothing when it has it)."""
    if any(s.kind == "none" for s in strategies):
        return []
    return ["no verdict: it compares every strategy with none (no duplication), which the strategies run leave "
            "out (add none to --strategies)"]


#: the arguments that name files a command reads
INPUT_ARGS = ("trace", "config", "sweep", "cluster", "model", "workload")


def input_paths(args: argparse.Namespace) -> tuple:
    """The files the command's arguments name for it to read (None where not given; a preset's name is
    not a file), for :func:`moe_gps.outputs.staged_outputs`' check that no output replaces one."""
    return tuple(getattr(args, name, None) for name in INPUT_ARGS)


def output_folder(args: argparse.Namespace, command: str):
    """The output folder, -o DIR or moe-gps-out/<command>-<trace name>, locked for this command
    (:func:`moe_gps.outputs.hold_output_dir`: a UserError if it is a file or another command holds it)."""
    from pathlib import Path

    from moe_gps.outputs import hold_output_dir

    out = Path(args.output) if args.output else Path("moe-gps-out") / f"{command}-{Path(args.trace).stem}"
    return hold_output_dir(out)


def print_written(written: list, stage) -> None:
    """The last line of a command that wrote an output folder, ``stage`` (a :class:`moe_gps.outputs.Staged`),
    and what it did with files there it did not make."""
    print(f"\nwrote {len(written)} files to {stage.out}/: " + ", ".join(p.name for p in written))
    print_removed(stage)


def print_removed(stage) -> None:
    """The lines naming an earlier run's files removed from the output folder of ``stage`` (a
    :class:`moe_gps.outputs.Staged`) because this run did not make them, and the files of those names
    kept because no earlier run is recorded to have written them."""
    from pathlib import Path

    out = stage.out

    def names(paths: list) -> str:
        return ", ".join(Path(p).relative_to(out).as_posix() for p in paths)

    if stage.removed:
        print(f"removed an earlier run's {names(stage.removed)} from {out}/ (not made by this run)")
    if stage.kept:
        print(f"kept {names(stage.kept)} in {out}/: not made by this run, nor recorded as an earlier run's "
              f"(delete any that are out of date)")


def note_repeated(flag: str, values: list, what: str = "each runs once") -> None:
    """A note on stderr naming the values ``flag`` gives more than once (they count once)."""
    import sys

    seen, repeated = [], []
    for v in values:
        if v in seen and v not in repeated:
            repeated.append(v)
        seen.append(v)
    if repeated:
        print(f"moe-gps: note: {flag} names {', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in repeated)}"
              f" more than once; {what}", file=sys.stderr)


def add_jobs_arg(p, help: str) -> None:
    """``-j/--jobs N``: worker processes (``help`` says what runs in them)."""
    p.add_argument("-j", "--jobs", type=int, metavar="N", help=help)


def jobs_from_args(args) -> int:
    """``--jobs``, checked (>= 1); default: :func:`cpu_cores`."""
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    return args.jobs or cpu_cores()


def plot_drawer(args, jobs: int):
    """The process the command's plots are drawn by (:class:`moe_gps.workers.Warm`): forked now, it
    imports matplotlib while the command loads and simulates; none with ``--no-plots`` or one job
    (the plots are then drawn in this process). Use as a context manager around the command."""
    from moe_gps.workers import Warm

    return Warm(("matplotlib.pyplot",), fork=not args.no_plots and jobs > 1)


def cpu_cores() -> int:
    """CPU cores this process may run on (the default of --jobs)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def add_cluster_model_args(p: argparse.ArgumentParser) -> None:
    """Add --cluster and --model to ``p``."""
    from moe_gps.config.loader import preset_names

    p.add_argument("--cluster", metavar="PRESET|FILE",
                   help=f"the cluster: preset ({', '.join(preset_names('clusters'))}) or YAML file "
                        f"(default: {DEFAULT_CLUSTER})")
    p.add_argument("--model", metavar="PRESET|FILE",
                   help=f"model preset ({', '.join(preset_names('models'))}), model YAML, or a Hugging Face "
                        "config.json / checkpoint folder (default: the preset named by the trace's metadata)")


def add_deployment_args(p: argparse.ArgumentParser) -> None:
    """Add --cluster, --model, --workload, --phase, --seq-len and --tokens-per-step to ``p``."""
    add_cluster_model_args(p)
    p.add_argument("--workload", metavar="FILE",
                   help="workload YAML (phase, seq_len, tokens_per_step; docs/configs.md; default: the built-in "
                        "prefill workload of 512-token prompts)")
    p.add_argument("--phase", choices=("prefill", "decode"),
                   help="override the workload's phase (default: the workload's, else prefill, or decode when the "
                        "trace looks like decode, which the output then says)")
    p.add_argument("--seq-len", type=int, metavar="N",
                   help="override the workload's seq_len (prefill: prompt length; decode: context length; default: "
                        "the workload's, else 512 tokens)")
    p.add_argument("--tokens-per-step", type=int, metavar="N",
                   help="tokens per forward pass over all GPUs: the trace's tokens are regrouped, in order, into "
                        "steps of N where that leaves at least 12 steps, and more than the training steps; "
                        "otherwise each step's expert loads are scaled to N, and the output says so (default: "
                        "the trace's steps as they are)")


def model_from_args(args: argparse.Namespace, trace):
    """The ModelConfig of --model (checked against ``trace`` where one is given), or else the preset the
    trace's metadata names."""
    from moe_gps.config import check_model_matches_trace, infer_model, load_model
    from moe_gps.config.loader import presets_of_shape

    if args.model:
        with named_by("--model", args.model):
            model = load_model(args.model)
        if trace is not None:
            m = trace.meta
            check_model_matches_trace(model, m.num_layers, m.num_experts, m.top_k, str(args.trace),
                                      f"--model {args.model}")
        return model
    m = trace.meta
    model = infer_model(m.model, m.num_layers, m.num_experts, m.top_k)
    if model is None:
        same = presets_of_shape(m.num_layers, m.num_experts, m.top_k)
        hint = f" (the preset {' or '.join(same)} has that shape)" if same else ""
        raise UserError(f"{args.trace}: cannot tell the model from the trace metadata (model '{m.model}', "
                        f"{m.num_layers} layers, {m.num_experts} experts, top-{m.top_k}); give --model PRESET|FILE"
                        + hint)
    return model


def workload_from_args(args: argparse.Namespace, workload):
    """``workload`` with --phase, --seq-len and --tokens-per-step applied (each when given)."""
    from dataclasses import replace

    if args.phase:
        workload = replace(workload, phase=args.phase)
    if args.seq_len is not None:
        from moe_gps.config.schema import MAX_SEQ_LEN

        if not 1 <= args.seq_len <= MAX_SEQ_LEN:
            raise UserError(f"--seq-len must be in [1, {MAX_SEQ_LEN}] tokens, got {args.seq_len}")
        workload = replace(workload, seq_len=args.seq_len)
    if args.tokens_per_step is not None:
        if args.tokens_per_step < 1:
            raise UserError(f"--tokens-per-step must be >= 1, got {args.tokens_per_step}")
        workload = replace(workload, tokens_per_step=args.tokens_per_step)
    return workload


def deployment_from_args(args: argparse.Namespace, trace) -> tuple:
    """(ClusterConfig, ModelConfig, WorkloadConfig, phase note) that the deployment flags describe for
    ``trace``. When neither --phase nor the workload file sets the phase and the trace looks like
    decode (:func:`moe_gps.trace.regroup.decode_shaped`), the phase is decode and the note says why."""
    from dataclasses import replace

    from moe_gps.config import WorkloadConfig, load_cluster, load_workload
    from moe_gps.files import read_yaml
    from moe_gps.trace.regroup import decode_shaped

    with named_by("--cluster", args.cluster):
        cluster = load_cluster(args.cluster or DEFAULT_CLUSTER)
    model = model_from_args(args, trace)
    with named_by("--workload", args.workload):
        workload = load_workload(args.workload) if args.workload else WorkloadConfig()
    note = None
    file_sets_phase = bool(args.workload) and "phase" in (read_yaml(args.workload) or {})
    if not args.phase and not file_sets_phase:
        why = decode_shaped(trace)
        if why:
            workload, note = replace(workload, phase="decode"), f"phase decode, from the trace: {why}"
    return cluster, model, workload_from_args(args, workload), note


def add_assumptions_arg(p: argparse.ArgumentParser) -> None:
    """Add --assumptions (the bundle of modelling choices) to ``p``."""
    from moe_gps.config.schema import ASSUMPTIONS

    p.add_argument("--assumptions", choices=ASSUMPTIONS,
                   help="a bundle of modelling choices: realistic (what deployments do; the default) or paper (the "
                        "MoE-GPS paper's model: copies hidden, the predicting strategies re-planned every batch by "
                        "its greedy planner and the oracle every batch too (eplb keeps vLLM's cadence), FFN "
                        "time in proportion to tokens, predictors before attention)")
