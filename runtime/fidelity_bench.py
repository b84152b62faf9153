"""Measurements for ``moe-gps calibrate``, run on every rank of a torchrun group.

``torchrun --nproc_per_node N -m runtime.fidelity_bench --spec spec.json --out samples.json``

Every benchmark runs on all ranks at once (each repeat starts after a barrier), in the
runtime's own setting: the same backend (gloo on CPU, NCCL on GPUs), the same threads per
rank as ``runtime.launch`` and, for the MoE layer, the runtime's own code
(:class:`runtime.moe_layer.ExpertParallelMoE`, the attention block of
:mod:`runtime.model`). Rank 0 writes every raw sample (seconds) to ``--out``; the fits
that turn them into a cluster file are in :mod:`moe_gps.fidelity.calibrate` (numpy).

Benchmarks (``name``: what one sample times; its size axis):

* ``ffn``: one SwiGLU expert (:func:`runtime.moe_layer.expert_ffn`) on ``n`` rows;
* ``crowd`` / ``crowd_solo``: ``n`` expert FFNs in a row (about 50 ms) on every rank at once,
  and on rank 0 alone while the others wait, alternately (the ratio tells how many ranks can
  compute at once without slowing each other: CPU cores shared by more ranks);
* ``memory``: copying a buffer of ``n`` bytes (read + write);
* ``permute``: gathering ``n`` hidden-state rows in a random order and scattering them back
  (``y = x[idx]; z[idx] = y``: two permutation passes, as the MoE layer does);
* ``alltoall``: ``all_to_all_single`` with ``n`` bytes to every peer;
* ``model_*``: the runtime's whole model (every layer, every expert weight a rank holds, so
  the caches see what they see in a run) on ``n`` tokens per rank with balanced routing
  (every expert gets the same pairs from every rank, so no rank waits for another), timed by
  the runtime's own phase timers (:func:`bench_model`);
* ``imbalance_*``: the same model at the run config's batch with a share of every rank's tokens
  routed to rank 0's experts, at several shares (:func:`bench_imbalance`): the collective skew
  as a function of how much later the last rank reaches the combine;
* ``move``: the runtime's own placement change (:func:`runtime.apply.apply_placement`) on that
  model, to placements planned from random skewed loads (irregular moves, like a real re-plan),
  and back (:func:`bench_moves`);
* ``install``: the same changes with the weights moved in the background, the install timed
  (also :func:`bench_moves`).

Samples are ``(size, rank, seconds)`` in repeat order per (benchmark, size, rank).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from moe_gps.fidelity import routing
from moe_gps.fidelity.calibrate import step_batch
from runtime.dist import DistContext, init_distributed


class Bench:
    """Runs timed repeats on every rank; collects ``samples[name] = [(size, rank, seconds), ...]``."""

    def __init__(self, ctx: DistContext, repeats: int, warmup: int, say) -> None:
        self.ctx, self.repeats, self.warmup, self.say = ctx, repeats, warmup, say
        self.samples: dict[str, list[tuple[float, int, float]]] = {}

    def sync(self) -> None:
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        if self.ctx.distributed:
            dist.barrier()

    def _now(self) -> float:
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        return time.perf_counter()

    def time(self, name: str, size: float, fn) -> None:
        """Time ``fn()`` ``repeats`` times on every rank (after ``warmup`` untimed calls)."""
        for _ in range(self.warmup):
            self.sync()
            fn()
        out = self.samples.setdefault(name, [])
        for _ in range(self.repeats):
            self.sync()
            t0 = self._now()
            fn()
            out.append((float(size), self.ctx.rank, self._now() - t0))

    def time_pair(self, name: str, solo: str, size: float, fn) -> None:
        """Alternate, repeat by repeat: ``fn`` on every rank at once (``name``), then on rank 0 alone while
        the others wait at the next barrier (``solo``); alternating makes a drifting machine hit both alike."""
        for rep in range(self.warmup + self.repeats):
            for alone in ((False, True) if self.ctx.distributed else (False,)):
                self.sync()
                if alone and self.ctx.rank != 0:
                    continue
                t0 = self._now()
                fn()
                if rep >= self.warmup:
                    self.samples.setdefault(solo if alone else name, []).append(
                        (float(size), self.ctx.rank, self._now() - t0))

    def record(self, name: str, size: float, seconds: float) -> None:
        self.samples.setdefault(name, []).append((float(size), self.ctx.rank, float(seconds)))


def bench_compute(b: Bench, spec: dict) -> None:
    from runtime.model import TORCH_DTYPES
    from runtime.moe_layer import expert_ffn

    dev, dtype = b.ctx.device, TORCH_DTYPES[spec["dtype"]]
    H, I = spec["hidden_size"], spec["intermediate_size"]
    g = torch.Generator().manual_seed(1234 + b.ctx.rank)
    w_gu = (torch.rand(2 * I, H, generator=g) - 0.5).to(dev, dtype)
    w_d = (torch.rand(H, I, generator=g) - 0.5).to(dev, dtype)
    with torch.inference_mode():
        for i, n in enumerate(spec["ffn_rows"]):
            b.say(f"expert FFN {H}x{I} on {n} rows ({i + 1}/{len(spec['ffn_rows'])})")
            x = (torch.rand(n, H, generator=g) - 0.5).to(dev, dtype)
            b.time("ffn", n, lambda: expert_ffn(x, w_gu, w_d))
        # processors the ranks share: a long compute loop (>= 50 ms, so that every rank's runs overlap
        # although they leave the barrier at different times) on every rank at once, then on rank 0 alone
        n = max(spec["ffn_rows"])
        x = (torch.rand(n, H, generator=g) - 0.5).to(dev, dtype)
        t0 = time.perf_counter()
        expert_ffn(x, w_gu, w_d)
        loops = torch.tensor([max(1, int(0.05 / max(time.perf_counter() - t0, 1e-6)))], device=dev)
        if b.ctx.distributed:
            dist.broadcast(loops, src=0)           # the same work on every rank
        loops = int(loops.item())
        b.say(f"{loops} expert FFNs of {n} rows on every rank at once, then on one rank alone")

        def many() -> None:
            for _ in range(loops):
                expert_ffn(x, w_gu, w_d)

        b.time_pair("crowd", "crowd_solo", loops, many)

        for i, n in enumerate(spec["permute_rows"]):
            b.say(f"token permutation of {n} rows of {H} ({i + 1}/{len(spec['permute_rows'])})")
            x = (torch.rand(n, H, generator=g) - 0.5).to(dev, dtype)
            z = torch.empty_like(x)
            idx = torch.randperm(n, generator=g).to(dev)

            def permute() -> None:
                y = x[idx]
                z[idx] = y

            b.time("permute", n, permute)

        for i, nbytes in enumerate(spec["memory_bytes"]):
            b.say(f"memory copy of {nbytes / 2**20:.0f} MiB ({i + 1}/{len(spec['memory_bytes'])})")
            src = torch.rand(nbytes // 4, generator=g).to(dev)
            dst = torch.empty_like(src)
            b.time("memory", nbytes, lambda: dst.copy_(src))


def bench_links(b: Bench, spec: dict) -> None:
    ctx = b.ctx
    N, dev = ctx.world_size, ctx.device
    if N < 2:
        return
    for i, nbytes in enumerate(spec["alltoall_bytes"]):
        b.say(f"all_to_all_single, {nbytes} B per peer ({i + 1}/{len(spec['alltoall_bytes'])})")
        n = max(1, nbytes // 4)
        send = torch.ones(N * n, device=dev)
        recv = torch.empty(N * n, device=dev)
        b.time("alltoall", n * 4, lambda: dist.all_to_all_single(recv, send, [n] * N, [n] * N))


def balanced_experts(T: int, k: int, E: int, rank: int, device) -> torch.Tensor:
    """experts [T, k]: :func:`moe_gps.fidelity.routing.balanced_experts` on ``device``."""
    return torch.as_tensor(routing.balanced_experts(T, k, E, rank), device=device)


def bench_model(b: Bench, spec: dict) -> None:
    """The runtime's own model (``runtime.build.build_model``: all layers, all the weights a rank
    holds) on balanced routing, timed with the runtime's own phase timers, per token count and
    placement layout. Samples: ``model_attention`` (attention sub-block + router, as
    ``attention_s + route_s``), ``model_dispatch/S`` (``counts_s + dispatch_s``),
    ``model_expert/S`` (``expert_s``), ``model_combine/S`` (``combine_s``) with S the slots per rank, and
    ``model_step/S``: the rank's own sum of all of them over the layers (the step, as validate measures it).
    Then :func:`bench_moves` on the model with the run config's slots."""
    from moe_gps.fidelity.calibrate import layout_placement, layouts
    from runtime.build import build_model
    from runtime.config import ModelSection
    from runtime.moe_layer import top_k_routing

    ctx = b.ctx
    dev = ctx.device
    L, E, k = spec["num_layers"], spec["num_experts"], spec["top_k"]
    N = ctx.world_size
    section = ModelSection(num_layers=L, hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
                           num_experts=E, top_k=k, num_heads=spec["num_heads"], vocab_size=spec["vocab_size"],
                           dtype=spec["dtype"], seed=0)
    S = spec["seq_len"]
    g = torch.Generator().manual_seed(7 + ctx.rank)
    models = []                 # one model per layout, run alternately so that drift hits both alike
    for R in layouts(spec, N):
        handle = build_model(section, ctx)
        placement = layout_placement(spec, N, R)
        handle.install(placement, ctx)
        models.append((handle, placement))

    def forward(model, ids, routing) -> list[dict[str, float]]:
        """DecoderLayer.forward and MoEBlock.forward with the given routing; the phase times of every layer."""
        out = []
        x = model.embed(ids)
        for layer in model.layers:
            t0 = b._now()
            x = x + layer.attn(layer.attn_norm(x))
            t1 = b._now()
            y = layer.moe_norm(x).reshape(-1, x.shape[-1])
            t2 = b._now()
            experts, weights = top_k_routing(layer.moe.gate(y).float() + layer.moe.router_bias, k)
            experts.to(torch.int16).cpu().numpy()
            weights.float().cpu().numpy()
            t3 = b._now()
            x = x + layer.moe.experts(y, routing, weights).reshape(x.shape)
            st = layer.moe.experts.stats
            out.append({"attention": (t1 - t0) + (t3 - t2), "dispatch": st["counts_s"] + st["dispatch_s"],
                        "expert": st["expert_s"], "combine": st["combine_s"]})
        return out

    for i, batch in enumerate(spec["model_batches"]):
        T = batch * S
        slots = " and ".join(str(p.slots_per_gpu) for _, p in models)
        b.say(f"the runtime's model, {L} layers, {slots} expert slots per rank, "
              f"{batch} x {S} tokens per rank, balanced routing ({i + 1}/{len(spec['model_batches'])})")
        ids = torch.randint(0, spec["vocab_size"], (batch, S), generator=g).to(dev)
        balanced = balanced_experts(T, k, E, ctx.rank, dev)
        with torch.inference_mode():
            for rep in range(b.warmup + b.repeats):
                for handle, placement in models:
                    slots = placement.slots_per_gpu
                    b.sync()
                    layers = forward(handle.module, ids, balanced)
                    if rep < b.warmup:
                        continue
                    for ph in layers:
                        for name, key in (("model_attention", "attention"), (f"model_dispatch/{slots}", "dispatch"),
                                          (f"model_expert/{slots}", "expert"), (f"model_combine/{slots}", "combine")):
                            b.record(name, T, ph[key])
                    b.record(f"model_step/{slots}", T, sum(sum(ph.values()) for ph in layers))
    bench_imbalance(b, spec, models[0][0], models[0][1], forward)
    handle = models[-1][0]
    batch = step_batch(spec)
    step_ids = torch.randint(0, spec["vocab_size"], (batch, S), generator=g).to(dev)
    step_routing = balanced_experts(batch * S, k, E, ctx.rank, dev)
    bench_moves(b, spec, *models[-1], lambda: forward(handle.module, step_ids, step_routing))


def imbalanced_experts(T: int, k: int, E: int, rank: int, fraction: float, hot: list[int], device) -> torch.Tensor:
    """experts [T, k]: :func:`moe_gps.fidelity.routing.imbalanced_experts` on ``device``."""
    return torch.as_tensor(routing.imbalanced_experts(T, k, E, rank, fraction, hot), device=device)


def bench_imbalance(b: Bench, spec: dict, handle, placement, forward) -> None:
    """The model of the first layout at the run config's batch, with a share ``fraction`` of every rank's
    tokens routed to rank 0's experts (rank 0 computes longer, the others wait for it in the combine), for
    every fraction of ``spec["imbalance_fractions"]`` (0: balanced), alternately repeat by repeat.
    Samples ``imbalance_attention``, ``imbalance_dispatch``, ``imbalance_expert``, ``imbalance_combine``
    (per layer, as the model's) and ``imbalance_step`` (the rank's own sum over the layers), size = the
    fraction. They give the collective skew as a function of the ranks' arrival gap."""
    fractions = spec.get("imbalance_fractions") or []
    if not fractions or b.ctx.world_size < 2:
        return
    ctx, S = b.ctx, spec["seq_len"]
    k, E = spec["top_k"], spec["num_experts"]
    batch = step_batch(spec)
    T = batch * S
    hot = routing.rank0_experts(placement)
    g = torch.Generator().manual_seed(11 + ctx.rank)
    ids = torch.randint(0, spec["vocab_size"], (batch, S), generator=g).to(ctx.device)
    routes = [(f, imbalanced_experts(T, k, E, ctx.rank, f, hot, ctx.device)) for f in fractions]
    b.say(f"the runtime's model, {batch} x {S} tokens per rank, a share {', '.join(f'{f:g}' for f in fractions)} "
          f"of every rank's tokens to rank 0's experts")
    with torch.inference_mode():
        for rep in range(b.warmup + b.repeats):
            for f, experts in routes:
                b.sync()
                layers = forward(handle.module, ids, experts)
                if rep < b.warmup:
                    continue
                for ph in layers:
                    for key, v in ph.items():
                        b.record(f"imbalance_{key}", f, v)
                b.record("imbalance_step", f, sum(sum(ph.values()) for ph in layers))


def bench_moves(b: Bench, spec: dict, handle, placement, step) -> None:
    """``move``: :func:`runtime.apply.apply_placement` (the runtime's own weight moves, snapshots and
    routing tables) between the placements of ``moe_gps.fidelity.calibrate.move_pairs``: size 0 applies
    ``placement`` again (the fixed cost of a re-plan), size 2 i + 1 goes to ``spec["move_targets"][i]`` (a
    re-plan of random skewed loads: irregular moves) and 2 i + 2 back. Each move follows ``step()`` (a
    forward pass of the model, untimed), as a run's re-plan follows a step: the weights it moves are
    not the last thing the rank touched. ``spec["move_repeats"]`` repeats. Samples: the rank's
    ``MoveStats.seconds``.

    ``install``: the same changes with ``copy_policy: async`` (:class:`runtime.background.BackgroundMove`):
    the transfers in the background, then, after ``step()`` and a barrier, the install (the staged rows
    and local copies written into the slots, the routing tables), timed."""
    from moe_gps.fidelity.calibrate import move_pairs
    from runtime.apply import apply_placement
    from runtime.background import BackgroundMove, background_group

    ctx = b.ctx
    pairs = move_pairs(spec, ctx.world_size)
    if not np.array_equal(pairs[0][0].phy2log, placement.phy2log):
        raise RuntimeError("the move benchmark's starting placement is not the model's")
    cycles = [[0, 0]] + [[2 * i + 1, 2 * i + 2] for i in range(len(spec.get("move_targets", [])))]
    repeats = int(spec.get("move_repeats", b.repeats))

    def timed_changes(name: str, what: str, start) -> None:
        """Every cycle's changes: ``start(after)`` (untimed) gives the function that makes the change,
        timed after ``step()`` and a barrier; samples ``name``."""
        for i, cycle in enumerate(cycles):
            b.say(f"{what(cycle)}, each after a forward pass ({i + 1}/{len(cycles)})")
            for rep in range(b.warmup + repeats):
                for size in cycle:
                    change = start(pairs[size][1])
                    with torch.inference_mode():
                        step()
                    b.sync()
                    stats = change()
                    if rep >= b.warmup:
                        b.record(name, size, stats.seconds)

    timed_changes("move", lambda c: f"applying a placement {'again' if c[0] == 0 else 'of a re-plan, and back'}",
                  lambda after: lambda: apply_placement(handle.experts, after.phy2log, after.replica_share, ctx))
    group = background_group(ctx)

    def in_background(after):
        move = BackgroundMove(handle.experts, after.phy2log, after.replica_share, ctx, group, 0)
        move.join()
        return lambda: move.install()

    timed_changes("install", lambda c: "switching in a placement whose weights moved in the background",
                  in_background)


def run(spec: dict, out: str, quiet: bool = False) -> None:
    ctx = init_distributed(spec.get("device", "auto"), float(spec.get("timeout_s", 120)))
    try:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
        threads = spec.get("threads") or max(1, (os.cpu_count() or 1) // max(1, local_world))
        if ctx.device.type == "cpu":
            torch.set_num_threads(int(threads))
        steps = ["compute", "links", "model"]
        say_rank0 = ctx.rank == 0 and not quiet
        state = {"part": ""}

        def say(msg: str) -> None:
            if say_rank0:
                print(f"calibrate: {state['part']}{msg}", file=sys.stderr, flush=True)

        b = Bench(ctx, int(spec["repeats"]), int(spec.get("warmup", 2)), say)
        for i, part in enumerate(steps):
            state["part"] = f"[{i + 1}/{len(steps)}] "
            {"compute": bench_compute, "links": bench_links, "model": bench_model}[part](b, spec)
        gathered = [None] * ctx.world_size
        if ctx.distributed:
            dist.all_gather_object(gathered, b.samples)
        else:
            gathered = [b.samples]
        if ctx.rank == 0:
            from moe_gps.atomic import write_text_atomic

            merged: dict[str, list] = {}
            for part in gathered:
                for name, rows in part.items():
                    merged.setdefault(name, []).extend(rows)
            info = {"world_size": ctx.world_size, "backend": ctx.backend, "device": str(ctx.device),
                    "threads_per_rank": int(threads) if ctx.device.type == "cpu" else None,
                    "torch": torch.__version__, "cpu_count": os.cpu_count()}
            if ctx.device.type == "cuda":
                info["device_name"] = torch.cuda.get_device_name(ctx.device)
                info["device_memory_gb"] = torch.cuda.get_device_properties(ctx.device).total_memory / 1e9
            write_text_atomic(out, json.dumps({"info": info, "spec": spec, "samples": merged}) + "\n")
        ctx.barrier("end of calibration")
    finally:
        ctx.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.fidelity_bench",
                                description="calibration measurements on every rank (started by moe-gps calibrate)")
    p.add_argument("--spec", required=True, help="JSON file: sizes, repeats, model shapes")
    p.add_argument("--out", required=True, help="JSON file for the raw samples (written by rank 0)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    from moe_gps import signals
    from moe_gps.errors import report

    with open(args.spec, encoding="utf-8") as f:
        spec = json.load(f)
    try:
        with signals.handled():     # a SIGTERM from torchrun removes the half-written samples file
            run(spec, args.out, args.quiet)
    except KeyboardInterrupt as err:
        return report(err, "runtime.fidelity_bench", f"rank {os.environ.get('RANK', 0)}: ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
