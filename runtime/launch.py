"""``torchrun --nproc_per_node N -m runtime.launch --config run.yaml --duplication MODE``.

Each step: (maybe) plan and apply a new placement, run the model on every rank's
tokens, gather the routing and the timings to rank 0, which writes the router trace
(``source: collected``) and, at the end, the timings files. See docs/runtime.md.

Exit codes: 0 done; 2 a bad config, flag, input or output path, or a full disk (one
line from the rank that found it, and every rank exits 2); 1 a failed or timed-out
collective (one line per rank naming the rank(s) that exited or stopped responding), or
a failed weight check (one line per rank); 143 / 129 / 130 stopped by SIGTERM / SIGHUP /
Ctrl-C (the temporary trace file is removed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DESCRIPTION = ("Run expert-parallel MoE inference on torch.distributed, applying expert duplication "
               "planned by moe_gps, and record the router trace and timings. See docs/runtime.md.")


def build_parser() -> argparse.ArgumentParser:
    from moe_gps.argparsing import Parser
    from runtime.config import DUPLICATION_MODES, FLAG_HELP
    p = Parser(prog="python -m runtime.launch", description=DESCRIPTION, tag="runtime.launch")
    p.add_argument("--config", required=True, help="run config (YAML, see runtime/examples/run.yaml)")
    p.add_argument("--duplication", required=True, choices=DUPLICATION_MODES, help=FLAG_HELP["duplication"])
    p.add_argument("--steps", type=int, help=FLAG_HELP["steps"])
    p.add_argument("--out", metavar="DIR", help=FLAG_HELP["out"])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help=FLAG_HELP["device"])
    p.add_argument("--quiet", action="store_true", help="print only the final summary")
    return p


class SetupFailedElsewhere(Exception):
    """Another rank found a bad config, input or output during set-up (it printed the line)."""


def main(argv: list[str] | None = None) -> int:
    from moe_gps import signals
    from moe_gps.errors import report

    try:
        with signals.handled():
            return _main(argv)
    except KeyboardInterrupt as err:        # stopped while it loads its modules and config: one line too
        return report(err, "runtime.launch", f"rank {os.environ.get('RANK', 0)}: ")


def _main(argv: list[str] | None) -> int:
    from moe_gps.errors import UserError, report

    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    try:
        from runtime.config import load_run_config
        cfg = load_run_config(args.config)
        if args.steps is not None:
            if args.steps < 1:
                raise UserError("--steps must be at least 1")
            cfg.run.steps = args.steps
        if args.out is not None:
            if not args.out.strip():
                raise UserError(f"--out must name a folder, got {args.out!r}")
            cfg.output.dir = args.out
        if args.device:
            cfg.run.device = args.device
        from runtime.config import check_outputs_spare_inputs
        check_outputs_spare_inputs(cfg, cfg.output.dir, "--out" if args.out else "output.dir")
    except UserError as err:
        if rank == 0:
            print(f"runtime.launch: error: {err}", file=sys.stderr)
        return err.exit_code
    try:
        import torch  # noqa: F401
    except ImportError:
        print("runtime.launch: error: the runtime needs PyTorch: pip install 'moe-gps[runtime]'", file=sys.stderr)
        return 2
    from runtime.apply import WeightCheckFailed
    from runtime.dist import CollectiveFailure
    try:
        run(cfg, args.duplication, quiet=args.quiet, command=" ".join(["runtime.launch"] + sys.argv[1:]))
    except SetupFailedElsewhere:
        return 2                    # the rank that found the problem printed it
    except (CollectiveFailure, WeightCheckFailed) as err:
        print(f"runtime.launch: error: {err}", file=sys.stderr)
        return 1
    except (UserError, KeyboardInterrupt, OSError, MemoryError) as err:
        failed = report(err, "runtime.launch", f"rank {rank}: ")
        if failed is None:
            raise
        return failed
    except RuntimeError as err:
        line = _torch_failure(err, cfg)
        if line is None:
            raise
        print(f"runtime.launch: error: rank {rank}: {line}", file=sys.stderr)
        return 2
    return 0


def _torch_failure(err: RuntimeError, cfg) -> str | None:
    """One line for a torch failure a user can act on (out of memory, the ranks not reaching each other
    at start), else None."""
    import torch
    import torch.distributed as dist

    first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)[:300]
    if isinstance(err, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(err):
        return (f"out of memory ({first}); make the model (model.num_layers, hidden_size, intermediate_size, "
                f"num_experts) or the batch (input.batch_size x input.seq_len) smaller")
    if isinstance(err, (dist.DistNetworkError, dist.DistStoreError)):
        return (f"the ranks did not reach each other within run.timeout_s ({cfg.run.timeout_s:g} s): {first}; "
                f"give run.timeout_s more time")
    return None


def _fault(ctx, step: int) -> None:
    """Testing aid: ``MOE_GPS_FAULT=rank:step:exit|hang|stop`` kills one rank at one step, or stalls
    it for three collective timeouts and then kills it, or stops it (SIGSTOP) for three collective
    timeouts and then kills it."""
    spec = os.environ.get("MOE_GPS_FAULT")
    if not spec:
        return
    r, s, how = spec.split(":")
    if int(r) == ctx.rank and int(s) == step:
        if how == "stop":
            import signal
            import subprocess
            subprocess.Popen(["sh", "-c", f"sleep {3 * ctx.timeout_s:g}; kill -CONT {os.getpid()}"])
            os.kill(os.getpid(), signal.SIGSTOP)
        if how == "hang":
            time.sleep(3 * ctx.timeout_s)
        os._exit(3)


def run(cfg, mode: str, quiet: bool = False, command: str = "runtime.launch", ctx=None) -> dict | None:
    """Run a whole job on this rank; rank 0 returns the summary dict (other ranks None).

    Once it fails, the process ignores SIGTERM and SIGHUP: the error decides the exit, and the
    clean-up (the temporary trace, the group) finishes even when torchrun stops every rank.
    """
    import torch

    from runtime.apply import Fingerprints, apply_placement
    from runtime.background import BackgroundMove, all_landed, background_group
    from runtime.gain import gain_model_for
    from sim.work import moves_weights
    from runtime.build import build_model, forward
    from moe_gps import signals
    from moe_gps.errors import UserError
    from runtime.dist import CollectiveFailure, init_distributed
    from runtime.duplication import DuplicationPolicy
    from runtime.inputs import TokenSource
    from runtime.record import RunRecorder, gather_step

    own_ctx = ctx is None
    if ctx is None:
        ctx = init_distributed(cfg.run.device, cfg.run.timeout_s)
    recorder = None
    try:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
        threads = cfg.run.threads or max(1, (os.cpu_count() or 1) // max(1, local_world))
        if ctx.device.type == "cpu":
            torch.set_num_threads(threads)
        say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if (ctx.rank == 0 and not quiet) else \
            (lambda *a: None)
        say(f"runtime: {ctx.world_size} rank(s), backend {ctx.backend}, device {ctx.device.type}, "
            f"duplication {mode}, config {cfg.source}")
        # set-up without collectives; a bad config, input or output on any rank stops every rank (exit 2)
        setup_error = None
        try:
            handle = build_model(cfg.model, ctx)
            L, E, k = handle.num_layers, handle.num_experts, handle.top_k
            source = TokenSource(cfg.input, handle.vocab_size, ctx.world_size)
            T_rank = source.tokens_per_rank
            gain = gain_model_for(cfg, mode, ctx.world_size)
            policy = DuplicationPolicy(mode, cfg.duplication, ctx.world_size, L, E, k, T_rank * ctx.world_size, gain)
            placement = policy.initial()
            handle.install(placement, ctx)
            recorder = RunRecorder(cfg, mode, ctx, handle, source, command) if ctx.rank == 0 else None
        except UserError as err:
            setup_error = err
        _agree_on_setup(ctx, setup_error)
        fingerprints = Fingerprints(handle.experts, ctx) if cfg.duplication.verify else None
        async_copies = cfg.duplication.copy_policy == "async" and policy.due_ever()
        bg_group = background_group(ctx) if async_copies else None
        moving = None                 # async: the move in flight (a BackgroundMove)
        handle.set_record(True)
        say(f"runtime: model {handle.name}: {L} MoE layers, {E} experts, top-{k}; "
            f"{placement.slots_per_gpu} slots per rank; input {source.description}")
        P = placement.num_slots
        steps = range(cfg.run.steps)
        if ctx.rank == 0 and not quiet:
            from tqdm import tqdm
            steps = tqdm(steps, desc="steps", unit="step", file=sys.stderr, disable=not sys.stderr.isatty())
        try:
            for step in steps:
                t_step = time.perf_counter()
                ctx.progress(step, "start")
                _fault(ctx, step)
                move, info, events = None, None, {"switched": 0, "planned_at": -1, "check_skipped": 0}
                if moving is not None:
                    ctx.progress(step, "landed?")
                    if all_landed(ctx, moving):
                        ctx.progress(step, "install")
                        move = moving.install()
                        placement = policy.landed()
                        events.update(switched=1, planned_at=moving.started_at)
                        moving = None
                if ctx.rank == 0:
                    policy.before(step, *source.step_tokens(step))
                events["check_skipped"] = int(policy.skips_check(step))
                if policy.wants_plan(step):
                    ctx.progress(step, "plan")
                    new, info = _agree_on_plan(ctx, policy, step, cfg.duplication.algorithm, P, E)
                    if new is not None:
                        background = async_copies and moves_weights(placement, new)
                        policy.adopt(new, background)
                        if background:
                            ctx.progress(step, "start move")
                            moving = BackgroundMove(handle.experts, new.phy2log, new.replica_share, ctx, bg_group,
                                                    step, fingerprints)
                        else:
                            ctx.progress(step, "move")
                            done = apply_placement(handle.experts, new.phy2log, new.replica_share, ctx,
                                                   fingerprints)
                            move = done if move is None else _added(move, done)
                            placement = new
                            events.update(switched=1, planned_at=step)
                ctx.progress(step, "forward")
                batch = source.batch(step, ctx.rank)
                ids = torch.as_tensor(batch.token_id, device=ctx.device)
                t_fwd = time.perf_counter()
                forward(handle, ids)
                if ctx.device.type == "cuda":
                    torch.cuda.synchronize(ctx.device)
                forward_s = time.perf_counter() - t_fwd
                ctx.progress(step, "gather")
                gathered = gather_step(ctx, handle, batch, step_s=time.perf_counter() - t_step, forward_s=forward_s,
                                       move=move)
                if ctx.rank == 0:
                    routing = recorder.add_step(step, gathered, placement, info, move, events)
                    policy.observe(routing)
                    if info is not None:
                        say(f"runtime: step {step}: {'plan declined' if info.declined else 'new placement'} "
                            f"({info.note}); predicted max rank load "
                            f"{info.predicted_rank_tokens.max(axis=1).mean():.0f} pairs/layer"
                            + (" (its weights move in the background)" if moving is not None
                               and moving.started_at == step else ""))
                    if events["switched"] and events["planned_at"] != step:
                        say(f"runtime: step {step}: the placement planned at step {events['planned_at']} is in force")
            if moving is not None:            # still in flight at the end: let the transfers finish, keep the old
                ctx.progress(cfg.run.steps, "background transfers")
                moving.join()
                moving = None
            ctx.progress(cfg.run.steps, "done")
            summary = recorder.finish(placement) if recorder is not None else None
        except BaseException as err:
            if moving is not None:
                moving.join(quiet=True)
            if isinstance(err, KeyboardInterrupt) and (failure := ctx.stopped_by_peer(err)) is not None:
                raise failure from err
            if not isinstance(err, (CollectiveFailure, SetupFailedElsewhere)):
                ctx.mark_exit(type(err).__name__ if not str(err) else f"{type(err).__name__}: {str(err)[:200]}")
            signals.ignore()    # decided: torchrun's SIGTERM during the clean-up below must not replace this error
            raise
        if summary is not None:
            print(summary["table"], flush=True)
        ctx.barrier("final barrier")
        return summary
    finally:
        if recorder is not None:
            recorder.abort()          # nothing to do after finish(); else removes the temporary trace
        if own_ctx:
            ctx.close()


def _agree_on_plan(ctx, policy, step: int, algorithm: str, P: int, E: int):
    """Rank 0 plans before ``step`` and broadcasts the result: (the new placement, or None when
    ``min_gain`` keeps the one in force; rank 0's PlanInfo, None on the other ranks)."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from moe_gps.placement import Placement

    L = policy.L
    buf = torch.zeros(2 * L * P + 1, dtype=torch.float64, device=ctx.device)   # phy2log, shares, adopted
    new, info = None, None
    if ctx.rank == 0:
        new, info = policy.plan(step)
        if new is not None:
            buf[:L * P] = torch.as_tensor(new.phy2log.reshape(-1), dtype=torch.float64)
            buf[L * P:2 * L * P] = torch.as_tensor(new.replica_share.reshape(-1), dtype=torch.float64)
            buf[-1] = 1.0
    if ctx.distributed:
        with ctx.guard("broadcast of the new placement"):
            dist.broadcast(buf, src=0, group=ctx.group)
    arr = buf.cpu().numpy()
    if ctx.rank != 0 and arr[-1] == 1.0:
        new = Placement(arr[:L * P].reshape(L, P).astype(np.int64), ctx.world_size, E,
                        arr[L * P:2 * L * P].reshape(L, P), algorithm=algorithm, allow_colocated=True)
    return new, info


def _added(a, b):
    """Two moves of one step (an install, then a change of shares only) as one MoveStats."""
    a.seconds += b.seconds
    a.bytes_sent += b.bytes_sent
    a.bytes_received += b.bytes_received
    a.row_copies += b.row_copies
    a.counts = {k: a.counts.get(k, 0) + v for k, v in b.counts.items()}
    return a


def _agree_on_setup(ctx, error) -> None:
    """Every rank learns whether any rank's set-up failed: the failed rank raises its error, the
    others :class:`SetupFailedElsewhere` (one all_reduce; nothing in a one-rank run)."""
    import torch
    import torch.distributed as dist

    from moe_gps import signals

    failed = torch.tensor([int(error is not None)], dtype=torch.int64, device=ctx.device)
    if ctx.distributed:
        with ctx.guard("all_reduce of the set-up status"):
            dist.all_reduce(failed, group=ctx.group)
    if error is not None or int(failed.item()):
        signals.ignore()      # every rank exits 2, even when torchrun stops it because another exited first
    if error is not None:
        ctx.mark_exit(f"set-up failed: {str(error)[:200]}")
        raise error
    if int(failed.item()):
        raise SetupFailedElsewhere()


if __name__ == "__main__":
    exit_code = main()
    from moe_gps.signals import ignore
    ignore()          # decided: a SIGTERM from torchrun while the process shuts down must not change it
    sys.exit(exit_code)
