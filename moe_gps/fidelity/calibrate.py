"""``moe-gps calibrate``: measure this machine in the runtime's setting, write a cluster file.

1. :func:`make_spec`: sizes and repeats for every benchmark, from the run config's model
   (hidden, intermediate, experts, top-k, heads, sequence length, dtype, redundant slots);
2. :func:`run_benchmarks`: ``torchrun --nproc_per_node N -m runtime.fidelity_bench`` (every
   rank measures at once, gloo on CPU / NCCL on GPUs, the runtime's threads per rank);
3. :func:`fit_cluster`: robust fits (:mod:`moe_gps.fidelity.fit`) -> a
   :class:`~moe_gps.config.ClusterConfig` the simulator reads;
4. :func:`write_calibration`: the cluster YAML (every number's source in a comment) and a
   CSV of the medians behind it.

The formulas of every fitted number are in docs/fidelity.md ("Calibration").
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moe_gps.config.schema import ClusterConfig, GPUSpec, LinkSpec
from moe_gps.errors import UserError
from moe_gps.fidelity.fit import collective, critical, fit_line, median_residual, typical
from moe_gps.fidelity.model import DTYPE_BYTES, model_for_run


class MeasurementFailed(RuntimeError):
    """The measuring ranks failed (not the user's input); the message says where to look."""


def _round_to(x: float, m: int) -> int:
    return max(m, int(round(x / m)) * m)


def make_spec(run_cfg, nproc: int, repeats: int = 20, quick: bool = False, device: str = "cpu") -> dict:
    """Benchmark sizes around the run config's own sizes (see runtime.fidelity_bench)."""
    m, inp, d = run_cfg.model, run_cfg.input, run_cfg.duplication
    T0 = inp.batch_size * inp.seq_len                        # tokens per rank per step
    E, k = m.num_experts, m.top_k
    rows_per_slot = max(1, T0 * k * nproc // (E + d.num_redundant))
    ffn_rows = sorted({1, *(max(1, int(rows_per_slot * f)) for f in (0.25, 0.5, 1, 2, 4))})
    batches = sorted({max(1, int(round(inp.batch_size * f))) for f in (0.25, 0.5, 1, 2)})
    row = m.hidden_size * DTYPE_BYTES[m.dtype]
    # messages from a few bytes to 4 MiB per peer, so that the bandwidth term is well above the noise
    a2a = sorted({4, 4096, *(_round_to(T0 * k * row * f / nproc, 4) for f in (0.25, 1, 4)), 2**20, 4 * 2**20})
    expert_bytes = 3 * m.hidden_size * m.intermediate_size * DTYPE_BYTES[m.dtype]
    moves = [0, 1, 2, 4, 8]
    permute = sorted({max(1, T0 * k // 4), T0 * k, 4 * T0 * k, 16 * T0 * k})
    if quick:
        ffn_rows, batches = ffn_rows[::2], sorted({batches[0], batches[-1]})
        a2a, moves, permute = [4, 2**20, 4 * 2**20], [0, 1, 4], permute[::2]
        repeats = min(repeats, 5)
    return {"dtype": m.dtype, "num_layers": m.num_layers, "hidden_size": m.hidden_size,
            "intermediate_size": m.intermediate_size, "num_experts": E, "top_k": k, "num_heads": m.num_heads,
            "vocab_size": m.vocab_size, "seq_len": inp.seq_len, "num_redundant": d.num_redundant,
            "algorithm": d.algorithm, "repeats": int(repeats), "warmup": 2, "threads": run_cfg.run.threads,
            "device": device, "timeout_s": max(60.0, run_cfg.run.timeout_s),
            "ffn_rows": ffn_rows, "model_batches": batches, "permute_rows": permute,
            "memory_bytes": [64 * 2**20], "alltoall_bytes": a2a, "move_experts": moves, "expert_bytes": expert_bytes}


def layouts(spec: dict, num_ranks: int) -> list[int]:
    """Redundant slots of the placements the model is profiled with: none (E / N experts per rank,
    when N divides E) and the run config's, so that the per-slot and per-phase fixed costs separate."""
    E, R = spec["num_experts"], spec["num_redundant"]
    out = [0] if E % num_ranks == 0 else []
    if (E + R) % num_ranks == 0 and R not in out:
        out.append(R)
    return out or [(-E) % num_ranks]


def layout_placement(spec: dict, num_ranks: int, redundant: int, num_layers: int | None = None):
    """The placement a slot layout of :func:`layouts` is profiled with: balanced loads, the run
    config's planner (contiguous experts without redundant slots), ``num_layers`` layers (default: the
    model's)."""
    from moe_gps.placement import plan_placement

    L = spec["num_layers"] if num_layers is None else num_layers
    return plan_placement(np.ones((L, spec["num_experts"])), num_ranks, redundant,
                          "none" if redundant == 0 else spec["algorithm"])


def moved_placement(phy2log: np.ndarray, share: np.ndarray, num_ranks: int,
                    n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A placement ([L, P] experts and shares) that every rank reaches from ``phy2log`` by receiving
    ``n`` experts it does not hold: slot q of n (layer, q) pairs rotates one rank onward (rank r's
    expert goes to rank r + 1's slot q), taking only pairs where no rank already holds what it gets.
    ``n = 0``: the same placement. None when fewer than n such pairs exist."""
    phy, sh = np.array(phy2log, dtype=np.int64), np.array(share, dtype=np.float64)
    L, P = phy.shape
    N = num_ranks
    S = P // N
    done = 0
    for q in range(S):
        for l in range(L):
            if done == n:
                return phy, sh
            rows, shares = phy[l].reshape(N, S), sh[l].reshape(N, S)
            incoming = np.roll(rows[:, q], 1)
            if any(incoming[r] in rows[r] for r in range(N)):
                continue
            rows[:, q] = incoming
            shares[:, q] = np.roll(shares[:, q], 1)
            done += 1
    return (phy, sh) if done == n else None


def moved_layers(spec: dict, num_ranks: int, n: int) -> int:
    """Transfers into each rank, as the simulator counts them (one per layer and source), when
    :func:`moved_placement` moves ``n`` experts into every rank of the model ``runtime.fidelity_bench``
    moves them on (its last layout)."""
    home = layout_placement(spec, num_ranks, layouts(spec, num_ranks)[-1])
    moved = moved_placement(home.phy2log, home.replica_share, num_ranks, n)
    return 0 if moved is None else int((moved[0] != home.phy2log).any(axis=1).sum())


def torchrun_env(threads: int | None, nproc: int) -> dict[str, str]:
    """Environment for a torchrun child: OMP threads as the runtime sets them (no torchrun banner)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads or max(1, (os.cpu_count() or 1) // max(1, nproc))))
    return env


def run_benchmarks(spec: dict, nproc: int, quiet: bool = False) -> dict:
    """Start the measuring ranks under torchrun and return their samples (see runtime.fidelity_bench);
    ``info["interference"]`` is the cores other processes used meanwhile (moe_gps.fidelity.quiet)."""
    from moe_gps.fidelity.quiet import run_watched

    with tempfile.TemporaryDirectory(prefix="moe-gps-calibrate-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "samples.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "runtime.fidelity_bench", "--spec", str(spec_path), "--out", str(out_path)]
        if quiet:
            cmd.append("--quiet")
        w = run_watched(cmd, env=torchrun_env(spec.get("threads"), nproc), stdout=subprocess.PIPE,
                        stderr=None if not quiet else subprocess.PIPE, text=True)
        proc = w.proc
        if proc.returncode or not out_path.exists():
            tail = (proc.stderr or "").strip().splitlines()[-3:] if quiet else []
            raise MeasurementFailed(f"the measuring ranks failed (torchrun exit code {proc.returncode})"
                                    + (": " + " | ".join(tail) if tail else "; see the ranks' messages above"))
        result = json.loads(out_path.read_text(encoding="utf-8"))
        result["info"]["interference"] = w.interference
        result["info"]["wall_s"] = w.wall_s
        return result


@dataclass
class Calibration:
    """A fitted cluster and what it was fitted from.

    rows:   the medians behind it, one dict per (benchmark, size)
    samples: every raw sample, one dict per (benchmark, size, rank, repeat)
    fits:   name -> (value, unit, how it was obtained), in the order of docs/fidelity.md
    """

    cluster: ClusterConfig
    rows: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    fits: dict[str, tuple[float, str, str]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    model: object = None                  # the run config's model as the simulator sees it (ModelConfig)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 16.0


def _layouts(samples: dict, prefix: str) -> dict[int, list]:
    """slots per rank -> samples of ``prefix/S`` benchmarks."""
    return {int(name.split("/")[1]): rows for name, rows in samples.items() if name.startswith(prefix + "/")}


def _lstsq_nonneg(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Relative least squares (rows weighted by 1 / y) with every coefficient >= 0: negative ones are
    fixed at 0 and the rest refitted."""
    w = 1.0 / np.maximum(y, 1e-12)
    free = np.ones(A.shape[1], dtype=bool)
    while True:
        coef = np.zeros(A.shape[1])
        sol, *_ = np.linalg.lstsq(A[:, free] * w[:, None], y * w, rcond=None)
        coef[free] = sol
        if (coef >= 0).all() or not free.any():
            return np.maximum(coef, 0.0)
        free &= coef > 0


def fit_cluster(result: dict, run_cfg) -> Calibration:
    """Turn the samples of :func:`run_benchmarks` into a cluster config (docs/fidelity.md, "Calibration")."""
    from moe_gps.fidelity.model import workload_for_run
    from sim.cost import (Hardware, alltoall_time, combine_host_time, dispatch_host_time, ffn_time, layout_time,
                          permute_time)
    from sim.work import route

    spec, info, samples = result["spec"], result["info"], result["samples"]
    N = int(info["world_size"])
    model = model_for_run(run_cfg)
    workload = workload_for_run(run_cfg)
    H, a, k, E = model.hidden_size, model.activation_bytes, model.top_k, model.num_experts
    rows: list[dict] = []
    us = 1e6

    def keep(name: str, sizes, med, unit: str) -> None:
        for s_, t in zip(sizes, med):
            rows.append({"benchmark": name, "size": float(s_), "size_unit": unit, "median_s": float(t)})

    # memory: copy of a large buffer, read + write
    ms, mt = typical(samples["memory"])
    keep("memory", ms, mt, "bytes")
    hbm = float(np.median(2 * ms / mt))
    # token permutation: gather + scatter = 2 passes of 2 h a bytes per row
    ps, pt = typical(samples["permute"])
    keep("permute", ps, pt, "rows")
    perm_line = fit_line(2 * ps * 2 * H * a, pt)
    permute_bw = 1.0 / perm_line.slope
    # one expert alone (weights hot in cache): its per-call time and rate
    fs, ft = typical(samples["ffn"])
    keep("ffn", fs, ft, "rows")
    alone = fit_line(2 * fs * model.expert_params, ft)
    # a long compute loop on every rank at once and on one rank while the others wait: the ratio is the
    # share of a processor a rank gets when all compute; N x share = the processors the ranks share
    # (when fewer than N, the simulator shares them: cluster.compute_units_per_node)
    if "crowd_solo" in samples:
        cs, ct = typical(samples["crowd"])
        _, st = typical(samples["crowd_solo"])
        keep("crowd", cs, ct, "expert FFNs in a row")
        keep("crowd_solo", cs, st, "expert FFNs in a row")
        share = float(min(1.0, np.median(st / ct)))
    else:
        share = 1.0
    units = N * share
    shared = share < 1.0
    scale = units / N if shared else 1.0          # time with all ranks computing -> time on a processor of its own
    # links: all_to_all_single with b bytes per peer: t = t0 + (N - 1) b / B;  latency per peer = t0 / (N - 1)
    xs, xt = collective(samples["alltoall"])
    keep("alltoall", xs, xt, "bytes per peer")
    a2a_line = fit_line((N - 1) * xs, xt)
    link_bw, link_lat = 1.0 / a2a_line.slope, a2a_line.intercept / (N - 1)
    # weight moves: the runtime's placement change with n experts into and out of every rank (critical:
    # the last rank done is when the step can start), fitted with the simulator's own formula for that
    # pattern: t = replan overhead + n x expert bytes / copy bandwidth + (transfers: layers moved) x latency
    ms_, mt_ = critical(samples["move"])
    keep("move", ms_, mt_, "experts into and out of every rank")
    move_design = np.array([[1.0, n * spec["expert_bytes"], moved_layers(spec, N, int(n))] for n in ms_])
    replan_over, inv_copy_bw, copy_lat = _lstsq_nonneg(move_design, mt_)
    if inv_copy_bw <= 0:            # noise swamped the bytes term: charge the time per expert as bytes
        copy_lat = 0.0
        replan_over, inv_copy_bw = _lstsq_nonneg(move_design[:, :2], mt_)
        if inv_copy_bw <= 0:
            inv_copy_bw = float(np.max(mt_ / np.maximum(move_design[:, 1], 1.0)))
    move_rel = float(np.sqrt(np.mean((move_design @ [replan_over, inv_copy_bw, copy_lat] / mt_ - 1) ** 2)))
    skew, skew_spread = collective_skew(samples, spec["num_layers"])
    for S, rows_ in sorted(_layouts(samples, "model_step").items()):
        keep(f"model_step/{S}", *collective(rows_), "tokens per rank")

    # the runtime's model on balanced routing
    as_, at = critical(samples["model_attention"])
    keep("model_attention", as_, at, "tokens per rank")
    at = at * scale
    c = (workload.seq_len + 1) / 2
    attn_flops = 2 * as_ * model.attention_params + 4 * as_ * c * model.attention.num_heads * model.attention.head_dim
    attn_line = fit_line(attn_flops, at)
    attn_rate = 1.0 / attn_line.slope
    perm_probe = Hardware.from_config(ClusterConfig(
        name="probe", num_gpus=N, gpus_per_node=N, gpu=GPUSpec(name="", peak_tflops_bf16=1.0, hbm_bandwidth_gb_s=1.0,
                                                               hbm_capacity_gb=1.0,
                                                               permute_bandwidth_gb_s=permute_bw / 1e9),
        intra_node=LinkSpec(bandwidth_gb_s=1.0, latency_us=0.0)), model)
    cases = []                      # (slots per rank, T, placement, src counts [1, N, E])
    design, target = [], []
    for S, rows_ in sorted(_layouts(samples, "model_expert").items()):
        R = S * N - E
        placement = layout_placement(spec, N, R, num_layers=1)
        ts, tt = critical(rows_)
        keep(f"model_expert/{S}", ts, tt, "tokens per rank")
        tt = tt * scale
        for T, t in zip(ts, tt):
            src = np.full((1, N, E), T * k / E)
            slot = placement.slot_loads(src.sum(axis=1))[0].reshape(N, S)       # [N, S] pairs per slot
            g = int(np.argmax(slot.sum(axis=1)))
            perm = float(permute_time(slot[g].sum(), 2, model, perm_probe))
            design.append([float((slot[g] > 0).sum()), 1.0, 2 * slot[g].sum() * model.expert_params])
            target.append(t - perm)
            cases.append((S, T, placement, src, slot[g]))
    A, y0 = np.array(design), np.array(target)
    # the roofline's memory term (a slot reads its weights: max(F / rate, Q / HBM)) depends on the rate:
    # subtract what it adds beyond F / rate at the current rate estimate and refit (converges in a few rounds)
    inv_rate = alone.slope
    for _ in range(4):
        excess = np.array([np.maximum(0.0, np.where(sl > 0, model.expert_bytes + 2 * sl * model.token_bytes, 0) / hbm
                                      - 2 * sl * model.expert_params * inv_rate).sum() for *_, sl in cases])
        y = y0 - excess
        if len({row[0] for row in design}) > 1:
            expert_over, ffn_over, inv_rate = _lstsq_nonneg(A, y)
            how_split = "per-slot and per-phase terms separated by the two slot layouts"
        else:                           # one layout: the per-slot time of one expert alone
            expert_over = max(0.0, alone.intercept)
            ffn_over, inv_rate = _lstsq_nonneg(A[:, 1:], y - A[:, 0] * expert_over)
            how_split = "per-slot term from one expert alone"
        if inv_rate <= 0:
            inv_rate = alone.slope
    ffn_rate = 1.0 / inv_rate
    ffn_rel = float(np.sqrt(np.mean(((A @ [expert_over, ffn_over, 1 / ffn_rate]) - y) ** 2 / y ** 2)))
    peak = max(ffn_rate, attn_rate)

    gpu = GPUSpec(name="", peak_tflops_bf16=peak / 1e12, hbm_bandwidth_gb_s=hbm / 1e9, hbm_capacity_gb=1.0,
                  compute_efficiency=min(1.0, ffn_rate / peak), attention_efficiency=min(1.0, attn_rate / peak),
                  kernel_overhead_us=ffn_over * us, attention_overhead_us=attn_line.intercept * us,
                  expert_overhead_us=expert_over * us, permute_bandwidth_gb_s=permute_bw / 1e9)
    gpu.replan_overhead_us = replan_over * us
    link = LinkSpec(bandwidth_gb_s=link_bw / 1e9, latency_us=link_lat * us,
                    copy_bandwidth_gb_s=1.0 / inv_copy_bw / 1e9, copy_latency_us=copy_lat * us)
    cluster = ClusterConfig(name="", num_gpus=N, gpus_per_node=N, gpu=gpu, intra_node=link,
                            compute_units_per_node=float(f"{units:.3g}") if shared else None,
                            collective_skew_us=float(f"{skew * us:.4g}"))
    hw = Hardware.from_config(cluster, model)
    # dispatch and combine: what the phase takes beyond the link and permutation terms (median)
    meas_d, meas_c, mod_d, mod_c = [], [], [], []
    for name, meas in (("model_dispatch", meas_d), ("model_combine", meas_c)):
        for S, rows_ in sorted(_layouts(samples, name).items()):
            s_, t = collective(rows_)
            keep(f"{name}/{S}", s_, t, "tokens per rank")
            meas.extend(t)
    for S, T, placement, src, _ in cases:
        traffic = route(src, placement)                                   # [1, N, N]
        sent = traffic.sum(axis=2)
        mod_d.append(float((layout_time(hw)[None] + alltoall_time(traffic, model.token_bytes, hw)
                            + dispatch_host_time(sent, model, hw)).max()))
        mod_c.append(float((alltoall_time(np.swapaxes(traffic, 1, 2), model.token_bytes, hw)
                            + combine_host_time(sent, model, hw)).max()))
    disp_over, disp_spread = median_residual(meas_d, mod_d)
    comb_over, comb_spread = median_residual(meas_c, mod_c)
    gpu.dispatch_overhead_us = disp_over * us
    gpu.combine_overhead_us = comb_over * us
    from sim.cost import shared_compute
    ffn_check = [float(shared_compute(ffn_time(p.slot_loads(src.sum(axis=1)), p.slots_per_gpu, model, hw),
                                      hw).max()) for _, _, p, src, _ in cases]

    cpu = info["device"].startswith("cpu")
    threads = info.get("threads_per_rank")
    gpu.name = (f"CPU rank, {threads} thread(s) of {_cpu_name()}" if cpu else info.get("device_name", "GPU"))
    gpu.hbm_capacity_gb = round(_ram_gb() / N if cpu else float(info.get("device_memory_gb", 80.0)), 1)
    host = platform.node() or "this machine"
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    cluster.name = f"calibrated-{N}x{'cpu' if cpu else 'gpu'}-{info['backend']}"
    cluster.description = (f"measured by moe-gps calibrate on {host}, {date}: {N} ranks, backend {info['backend']}, "
                           f"device {info['device']}" + (f", {threads} thread(s) per rank" if cpu else "")
                           + f", torch {info['torch']}, model shapes of {run_cfg.source}, "
                           f"{spec['repeats']} repeats per size"
                           + (f", other processes used {info['interference']:.2f} cores meanwhile"
                              if info.get("interference") is not None else "") + " (docs/fidelity.md)")
    fits = {
        "compute_units_per_node": (units, "processors", f"{N} ranks x (a 50 ms compute loop on one rank alone / "
                                   f"on all ranks at once) = {N} x {share:.3f}; "
                                   + (f"shared: compute phases measured on all ranks at once are scaled by "
                                      f"{scale:.3f} to a processor of their own" if shared else
                                      "not written (every rank has a processor of its own)")),
        "gpu.peak_tflops_bf16": (peak / 1e12, "TFLOP/s", "the faster of the expert-FFN and attention FLOP rates"),
        "gpu.compute_efficiency": (gpu.compute_efficiency, "", f"expert FFN rate {ffn_rate / 1e9:.2f} GFLOP/s in the "
                                   f"model / peak (one expert on one rank, weights in cache: "
                                   f"{1 / alone.slope / 1e9:.2f})"),
        "gpu.attention_efficiency": (gpu.attention_efficiency, "", f"attention+router rate {attn_rate / 1e9:.2f} "
                                     f"GFLOP/s in the model (rel. RMS {attn_line.rel_rms:.1%}) / peak"),
        "gpu.attention_overhead_us": (gpu.attention_overhead_us, "us", "intercept of attention+router time over "
                                      "its FLOPs in the model"),
        "gpu.expert_overhead_us": (expert_over * us, "us", f"FFN phase of the model: per expert slot with tokens "
                                   f"({how_split}; one expert on one rank: {alone.intercept * us:.0f} us)"),
        "gpu.kernel_overhead_us": (ffn_over * us, "us", f"FFN phase of the model: fixed part (fit rel. RMS "
                                   f"{ffn_rel:.1%})"),
        "gpu.hbm_bandwidth_gb_s": (hbm / 1e9, "GB/s", "2 x bytes / time of a 64 MiB copy"),
        "gpu.permute_bandwidth_gb_s": (permute_bw / 1e9, "GB/s", f"gather+scatter of rows in random order, "
                                       f"slope over 4 h a bytes per row (rel. RMS {perm_line.rel_rms:.1%})"),
        "gpu.dispatch_overhead_us": (disp_over * us, "us", f"counts+dispatch phase of the model - layout - "
                                     f"all-to-all - permutation, median (+/- {disp_spread * us:.0f})"),
        "gpu.combine_overhead_us": (comb_over * us, "us", f"combine phase of the model - all-to-all - permutation, "
                                    f"median (+/- {comb_spread * us:.0f})"),
        "intra_node.bandwidth_gb_s": (link_bw / 1e9, "GB/s", f"all_to_all_single: slope of time over (N-1) x bytes "
                                      f"per peer (rel. RMS {a2a_line.rel_rms:.1%})"),
        "intra_node.latency_us": (link_lat * us, "us", f"all_to_all_single: intercept {a2a_line.intercept * us:.0f} "
                                  f"us / {N - 1} peer(s)"),
        "intra_node.copy_bandwidth_gb_s": (1.0 / inv_copy_bw / 1e9, "GB/s", f"the runtime's placement change "
                                           f"moving 0-8 experts into and out of every rank: bytes term of "
                                           f"overhead + bytes / bandwidth + transfers x latency (rel. RMS "
                                           f"{move_rel:.1%})"),
        "intra_node.copy_latency_us": (copy_lat * us, "us", "the same fit: per transfer (layer, source, "
                                       "destination)"),
        "gpu.replan_overhead_us": (replan_over * us, "us", "the same fit: fixed part (a re-plan that moves "
                                   "nothing: planning the moves, routing tables)"),
        "collective_skew_us": (skew * us, "us", f"the model's step (per repeat the last rank to start) - the sum "
                               f"of its phases (as validate composes them), per dispatch and combine: median over "
                               f"layouts and T (+/- {skew_spread * us:.0f})"),
    }
    for obj in (gpu, link):               # plain floats, 4 significant digits (YAML, readability)
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, (float, np.floating)):
                setattr(obj, f.name, float(f"{float(v):.4g}"))
    for (S, T, *_), pred in zip(cases, ffn_check):
        rows.append({"benchmark": f"check: model_expert/{S} predicted", "size": float(T),
                     "size_unit": "tokens per rank", "median_s": pred})
    raw = []
    for name, rows_ in samples.items():
        seen: dict[tuple[float, int], int] = {}
        for size, rank, t in rows_:
            j = seen.get((size, rank), 0)
            seen[(size, rank)] = j + 1
            raw.append({"benchmark": name, "size": size, "rank": rank, "repeat": j, "seconds": t})
    return Calibration(cluster, rows, raw, fits, info, model_for_run(run_cfg))


def collective_skew(samples: dict, num_layers: int) -> tuple[float, float]:
    """(collective skew in seconds, its spread): per slot layout and tokens T, the model's step
    (``model_step/S``: per repeat the minimum over ranks of the rank's own sum, as validate measures a
    step) minus L x the phases as validate composes them (max over ranks of attention and expert FFN,
    min over ranks of dispatch and combine, measured, not scaled), over the 2 L collectives the
    simulator charges it on (dispatch and combine of every layer). Median over cases, clipped at 0."""
    _, attn = critical(samples["model_attention"])
    gaps = []
    for S, rows_ in sorted(_layouts(samples, "model_step").items()):
        _, step = collective(rows_)
        _, d = collective(samples[f"model_dispatch/{S}"])
        _, f = critical(samples[f"model_expert/{S}"])
        _, c = collective(samples[f"model_combine/{S}"])
        gaps.extend((step - num_layers * (attn + d + f + c)) / (2 * num_layers))
    return median_residual(gaps, np.zeros(len(gaps)))


def header_comment(cal: Calibration) -> str:
    lines = ["Cluster measured by `moe-gps calibrate` (docs/fidelity.md). Where each number comes from:"]
    for key, (value, unit, how) in cal.fits.items():
        lines.append(f"  {key} = {value:.4g} {unit}: {how}")
    return "".join(f"# {ln}\n" for ln in lines)


def write_calibration(cal: Calibration, path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """Write the cluster YAML (loadable with ``--cluster``), ``<stem>.measurements.csv`` (the means
    the fits used), ``<stem>.samples.csv`` (every raw sample) and ``<stem>.model.yaml`` (the measured
    model for ``--model``, so that a trace the runtime recorded can be simulated on this cluster)."""
    import pandas as pd

    from moe_gps.atomic import atomic_path, write_text_atomic
    from moe_gps.config.loader import dump_yaml

    path = Path(path)
    write_text_atomic(path, header_comment(cal) + dump_yaml(cal.cluster))
    csv = path.with_name(path.stem + ".measurements.csv")
    with atomic_path(csv) as tmp:
        pd.DataFrame(cal.rows).to_csv(tmp, index=False, float_format="%.6g")
    raw = path.with_name(path.stem + ".samples.csv")
    with atomic_path(raw) as tmp:
        pd.DataFrame(cal.samples).to_csv(tmp, index=False, float_format="%.6g")
    if cal.model is not None:
        write_text_atomic(path.with_name(path.stem + ".model.yaml"),
                          "# The model these measurements are for, as the simulator describes it (moe-gps calibrate)\n"
                          + dump_yaml(cal.model))
    return path, csv, raw


def calibrate(run_cfg, nproc: int, out: str | os.PathLike, repeats: int = 20, quick: bool = False,
              device: str = "cpu", quiet: bool = False, attempts: int = 3, busy_cores: float = 0.25) -> Calibration:
    """Measure on ``nproc`` local ranks and write the cluster file; returns the calibration.

    When other processes used more than ``busy_cores`` cores on average during the
    measurement, it is repeated (at most ``attempts`` times in all) and the quietest kept.
    """
    if nproc < 2:
        raise UserError(f"--nproc must be at least 2 (the links are measured between ranks), got {nproc}")
    if repeats < 3:
        raise UserError(f"--repeats must be at least 3 (medians), got {repeats}")
    if attempts < 1:
        raise UserError(f"--attempts must be at least 1, got {attempts}")
    model_for_run(run_cfg)
    spec = make_spec(run_cfg, nproc, repeats, quick, device)
    best = None
    for i in range(max(1, attempts)):
        result = run_benchmarks(spec, nproc, quiet=quiet)
        busy = result["info"]["interference"]
        if best is None or (busy is not None and busy < best["info"]["interference"]):
            best = result
        if busy is None or busy <= busy_cores:
            break
        if i + 1 < attempts:
            print(f"calibrate: other processes used {busy:.2f} cores meanwhile; measuring again "
                  f"({i + 2}/{attempts})", file=sys.stderr, flush=True)
    cal = fit_cluster(best, run_cfg)
    write_calibration(cal, out)
    return cal
