"""``moe-gps run`` (torchrun the expert-parallel runtime) and ``moe-gps record`` (HF router trace).

Both are thin wrappers around :mod:`runtime`: ``run`` checks the config here (so that a
bad config is one line, not one error per rank) and then starts
``torchrun --standalone --nproc_per_node N -m runtime.launch ...``; ``record`` calls
:func:`runtime.record_hf.run_from_args` in this process. torch is imported only when a
command runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from moe_gps.errors import UserError
from runtime.config import DUPLICATION_MODES as MODES, FLAG_HELP      # no torch

#: ranks per CPU core at most on CPU (gloo): each rank is a process with its own threads and memory, and more
#: only time-share the cores (``moe-gps run``, ``calibrate`` and ``validate`` refuse more)
RANKS_PER_CORE = 8
NPROC_HELP = (f"at most {RANKS_PER_CORE} per CPU core on CPU, at most the GPUs torch sees on GPUs")


def local_device(device: str, where: str) -> str:
    """``cuda`` or ``cpu``: what ``device`` (auto, cpu, cuda) means for ranks on this machine; a UserError
    naming ``where`` (the flag or config key) for cuda when torch sees no GPU."""
    from runtime.dist import choose_device

    return choose_device(device, where=where).type


def check_nproc(nproc: int, device: str, flag: str = "--nproc") -> None:
    """The one limit on local ranks (``run``, ``calibrate``, ``validate``): on GPUs (``device`` cuda) one rank per
    GPU torch sees; on CPU at most :data:`RANKS_PER_CORE` per core this process may use."""
    if device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise UserError(f"{flag} {nproc}: more ranks than the {gpus} GPU(s) torch sees (one rank per GPU); "
                            f"use at most {gpus}, or --device cpu")
        return
    from moe_gps.cli.common_args import cpu_cores

    cores = cpu_cores()
    if nproc > RANKS_PER_CORE * cores:
        raise UserError(f"{flag} {nproc}: more than {RANKS_PER_CORE} ranks per CPU core ({cores} core(s) here: at "
                        f"most {RANKS_PER_CORE * cores}); each rank is a process with its own threads and memory, "
                        "and more ranks only share the cores")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run expert-parallel MoE on N local ranks (torchrun), applying duplication; record trace+timings",
        description=("Start `torchrun --standalone --nproc_per_node N -m runtime.launch --config CONFIG "
                     "--duplication MODE`: an expert-parallel MoE model on N ranks (gloo on CPU, NCCL on GPUs) "
                     "that plans and applies expert duplication with the moe_gps predictors and planner, and "
                     "writes the router trace (source: collected) and per step/rank/layer timings. For several "
                     "nodes call torchrun yourself (docs/runtime.md)."))
    p.add_argument("--config", required=True, help="run config (YAML; example: runtime/examples/run.yaml)")
    p.add_argument("--duplication", required=True, choices=MODES, help=FLAG_HELP["duplication"])
    p.add_argument("--nproc", type=int, default=2,
                   help=f"ranks on this machine ({NPROC_HELP}; default: %(default)s)")
    p.add_argument("--steps", type=int, help=FLAG_HELP["steps"])
    p.add_argument("-o", "--output", "--out", dest="out", metavar="DIR", help=FLAG_HELP["out"])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help=FLAG_HELP["device"])
    p.add_argument("--quiet", action="store_true", help="print only the final summary")
    p.set_defaults(func=cmd_run)

    r = sub.add_parser(
        "record", help="record a router trace from a local HuggingFace MoE checkpoint (one process)",
        description=("Run forward passes of a local transformers MoE checkpoint (Mixtral, Qwen2/Qwen3-MoE, OLMoE) "
                     "with hooks on its routers and write the routing as a trace (source: collected). Needs "
                     "torch and transformers (pip install 'moe-gps[collect]'). See docs/runtime.md."))
    from runtime.record_hf import add_arguments  # numpy only at import time
    add_arguments(r)
    r.set_defaults(func=cmd_record)


def _need(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UserError(f"this command needs {module}: pip install 'moe-gps[{extra}]'")


def cmd_run(args: argparse.Namespace) -> int:
    _need("torch", "runtime")
    from moe_gps import signals
    from moe_gps.outputs import check_output_dir, locked_output_dir
    from runtime.config import check_outputs_spare_inputs, check_run_inputs, load_run_config
    cfg = load_run_config(args.config)
    out, out_name = (args.out, "--out") if args.out else (cfg.output.dir, "output.dir")
    where = out_name if args.out else f"{args.config}: output.dir"
    check_output_dir(out, where)
    check_outputs_spare_inputs(cfg, out, out_name)
    with locked_output_dir(out, where):
        pass                      # another run writing there is one line now, not an error on rank 0 later
    check_run_inputs(cfg)
    if args.nproc < 1:
        raise UserError("--nproc must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise UserError("--steps must be at least 1")
    steps = args.steps if args.steps is not None else cfg.run.steps
    if args.duplication != "off" and not cfg.duplication.placement and cfg.duplication.warmup_steps >= steps:
        print(f"moe-gps run: note: duplication.warmup_steps={cfg.duplication.warmup_steps} is not below the "
              f"{steps} steps of the run: it ends before its first plan, so --duplication {args.duplication} "
              f"runs as it started (lower warmup_steps, or run more steps)", file=sys.stderr)
    device = local_device(args.device or cfg.run.device, "--device" if args.device else f"{args.config}: run.device")
    check_nproc(args.nproc, device)
    if not cfg.model.checkpoint:
        # what every rank builds first: the min_gain cost model (its cluster file against the ranks), the
        # duplication policy (the slots dividing over the ranks, its predictor, its plan file) and step 0's
        # placement
        from runtime.duplication import DuplicationPolicy
        from runtime.gain import gain_model_for
        m, i = cfg.model, cfg.input
        try:
            gain = gain_model_for(cfg, args.duplication, args.nproc)
            DuplicationPolicy(args.duplication, cfg.duplication, args.nproc, m.num_layers, m.num_experts, m.top_k,
                              args.nproc * i.batch_size * i.seq_len, gain).initial()
        except UserError as err:
            raise UserError(f"{args.config}: {err}") from None
    cmd = [sys.executable, "-m", "runtime.torchrun", "--standalone", "--nproc_per_node", str(args.nproc),
           "-m", "runtime.launch", "--config", args.config, "--duplication", args.duplication]
    for flag, value in (("--steps", args.steps), ("--out", args.out), ("--device", args.device)):
        if value is not None:
            cmd += [flag, str(value)]
    if args.quiet:
        cmd.append("--quiet")
    print("moe-gps run: " + " ".join(cmd[1:]).replace("-m runtime.torchrun", "torchrun", 1), file=sys.stderr)
    code = signals.run_child(cmd).returncode
    if code:
        print(f"moe-gps run: torchrun exited with code {code}; the ranks' 'runtime.launch' lines above name the "
              "rank that failed (exited or not responding)", file=sys.stderr)
    return code


def cmd_record(args: argparse.Namespace) -> int:
    _need("torch", "collect")
    _need("transformers", "collect")
    from runtime.record_hf import print_summary, run_from_args
    print_summary(run_from_args(args, command="moe-gps record " + " ".join(sys.argv[2:])), "moe-gps")
    return 0
