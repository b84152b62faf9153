"""``moe-gps calibrate``: measure this machine in the runtime's setting, write a cluster file.

1. :func:`make_spec`: sizes and repeats for every benchmark, from the run config's model
   (hidden, intermediate, experts, top-k, heads, sequence length, dtype, redundant slots);
2. :func:`run_benchmarks`: ``torchrun --nproc_per_node N -m runtime.fidelity_bench`` (every
   rank measures at once, gloo on CPU / NCCL on GPUs, the runtime's threads per rank);
3. :func:`fit_cluster`: robust fits (:mod:`moe_gps.fidelity.fit`) -> a
   :class:`~moe_gps.config.ClusterConfig` the simulator reads;
4. :func:`write_calibration`: the cluster YAML (every number's source in a comment) and a
   CSV of the means behind it.

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

from moe_gps.config.schema import COPY_BANDWIDTH_SHARE, ClusterConfig, GPUSpec, LinkSpec
from moe_gps.errors import UserError
from moe_gps.fidelity.fit import (collective, collective_apart, collective_repeats, critical, fit_line,
                                  median_residual, typical)
from moe_gps.fidelity.model import DTYPE_BYTES, model_for_run


#: repeats of each weight move (each follows a forward pass of the model, so they cost more than other repeats)
MOVE_REPEATS = 6
#: the share of a combine's repeats that must have one rank clearly last to fit combine_together_us from them
APART_SHARE = 0.1


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
    moves = 6
    permute = sorted({max(1, T0 * k // 4), T0 * k, 4 * T0 * k, 16 * T0 * k})
    imbalance = [0.0, 0.15, 0.35, 0.7]
    if quick:
        imbalance = [0.0, 0.35, 0.7]
        ffn_rows, batches = ffn_rows[::2], sorted({batches[0], batches[-1]})
        a2a, moves, permute = [4, 2**20, 4 * 2**20], 3, permute[::2]
        repeats = min(repeats, 5)
    spec = {"dtype": m.dtype, "num_layers": m.num_layers, "hidden_size": m.hidden_size,
            "intermediate_size": m.intermediate_size, "num_experts": E, "top_k": k, "num_heads": m.num_heads,
            "vocab_size": m.vocab_size, "seq_len": inp.seq_len, "num_redundant": d.num_redundant,
            "algorithm": d.algorithm, "repeats": int(repeats), "move_repeats": min(int(repeats), MOVE_REPEATS),
            "warmup": 2, "threads": run_cfg.run.threads,
            "device": device, "timeout_s": max(60.0, run_cfg.run.timeout_s),
            "ffn_rows": ffn_rows, "model_batches": batches, "permute_rows": permute,
            "memory_bytes": [64 * 2**20], "alltoall_bytes": a2a, "expert_bytes": expert_bytes,
            "imbalance_fractions": imbalance, "imbalance_batch": inp.batch_size}
    targets = move_targets(spec, nproc, moves) + small_move_targets(spec, nproc, 2 if quick else 3)
    spec["move_targets"] = [[p.phy2log.tolist(), p.replica_share.tolist()] for p in targets]
    return spec


def step_batch(spec: dict) -> int:
    """Sequences per rank of the steps the imbalance and move benchmarks run: the run config's batch."""
    return spec.get("imbalance_batch") or spec["model_batches"][len(spec["model_batches"]) // 2]


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


def move_targets(spec: dict, num_ranks: int, count: int, seed: int = 0) -> list:
    """``count`` placements drawn like real re-plans, for the ``move`` benchmark: the run config's planner
    on random skewed loads (per layer and expert exp(sigma z), z standard normal, sigma cycling through
    0.3, 0.6, 1.0, 1.5), with the slots of the layout the moves start from (:func:`move_pairs`). Moving
    to them is irregular, as a real re-plan: some ranks receive several experts, others none."""
    from moe_gps.placement import plan_placement

    home = layout_placement(spec, num_ranks, layouts(spec, num_ranks)[-1])
    R = home.num_slots - spec["num_experts"]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count * 4):
        if len(out) == count:
            break
        sigma = (0.3, 0.6, 1.0, 1.5)[i % 4]
        loads = np.exp(sigma * rng.standard_normal((spec["num_layers"], spec["num_experts"])))
        p = plan_placement(loads, num_ranks, R, spec["algorithm"] if R else "eplb")
        if not np.array_equal(p.phy2log, home.phy2log):
            out.append(p)
    return out


def small_move_targets(spec: dict, num_ranks: int, count: int, seed: int = 1) -> list:
    """``count`` small re-plans for the ``move`` benchmark, like the re-plans after the first in a run
    (the planner keeps most slots where they are): the starting layout with the experts of two slots on
    different ranks swapped in 1, 2, ... layers (two transfers per layer), so that the fit covers the
    sizes of moves a run makes, not only the first big one."""
    from moe_gps.placement import Placement

    home = layout_placement(spec, num_ranks, layouts(spec, num_ranks)[-1])
    if num_ranks < 2:
        return []
    S, L = home.slots_per_gpu, home.num_layers
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        phy, share = home.phy2log.copy(), home.replica_share.copy()
        for layer in rng.choice(L, size=min(L, i + 1), replace=False):
            r1, r2 = rng.choice(num_ranks, size=2, replace=False)
            a, b = r1 * S + rng.integers(S), r2 * S + rng.integers(S)
            if phy[layer, a] == phy[layer, b] or phy[layer, a] in phy[layer, r2 * S:(r2 + 1) * S] \
                    or phy[layer, b] in phy[layer, r1 * S:(r1 + 1) * S]:
                continue                               # a swap that moves nothing, or makes a rank hold an expert twice
            phy[layer, [a, b]], share[layer, [a, b]] = phy[layer, [b, a]], share[layer, [b, a]]
        if not np.array_equal(phy, home.phy2log):
            out.append(Placement(phy, num_ranks, home.num_experts, share, allow_colocated=True))
    return out


def move_pairs(spec: dict, num_ranks: int) -> dict:
    """size of a ``move`` sample -> (placement before, placement after): 0 applies the starting layout
    (the last of :func:`layouts`) again; 2 i + 1 goes from it to ``spec["move_targets"][i]``, 2 i + 2 back."""
    from moe_gps.placement import Placement

    home = layout_placement(spec, num_ranks, layouts(spec, num_ranks)[-1])
    out = {0: (home, Placement(home.phy2log.copy(), num_ranks, home.num_experts, home.replica_share.copy(),
                               allow_colocated=True))}
    for i, (phy, share) in enumerate(spec.get("move_targets", [])):
        t = Placement(np.asarray(phy), num_ranks, home.num_experts, np.asarray(share, dtype=np.float64),
                      allow_colocated=True)
        out[2 * i + 1], out[2 * i + 2] = (home, t), (t, home)
    return out


def move_ports(before, after, expert_bytes: float, hw) -> tuple[np.ndarray, ...]:
    """What the simulator's copy model charges for going from ``before`` to ``after``
    (:func:`sim.work.weight_copies`), per layer and rank, split into its parts: bytes and transfers
    received, bytes and transfers sent, and seconds of copies within the rank (at ``hw``'s memory
    bandwidth). Each float [L, N]."""
    from sim.work import weight_copies

    L, N = after.num_layers, after.num_gpus
    c = weight_copies(before, after, expert_bytes, hw)
    link = c.src != c.dst
    parts = [np.zeros((L, N)) for _ in range(5)]
    n = c.bytes / expert_bytes
    np.add.at(parts[0], (c.layer[link], c.dst[link]), c.bytes[link])
    np.add.at(parts[1], (c.layer[link], c.dst[link]), n[link])
    np.add.at(parts[2], (c.layer[link], c.src[link]), c.bytes[link])
    np.add.at(parts[3], (c.layer[link], c.src[link]), n[link])
    np.add.at(parts[4], (c.layer[~link], c.dst[~link]), c.seconds[~link])
    return tuple(parts)


def move_model(ports: tuple[np.ndarray, ...], replan: float, inv_bw: float, lat: float) -> tuple[float, np.ndarray]:
    """The simulator's time of one placement change (copy policy critical, no contention):
    replan + sum over layers of max over ranks of max(received bytes / bw + received transfers x lat +
    copies within the rank, sent bytes / bw + sent transfers x lat); and float [3]: the coefficients of
    (1, 1 / bw, lat) on the critical ports (their bytes and transfers summed over layers), for a linear refit."""
    b_in, n_in, b_out, n_out, local = ports
    t_in = b_in * inv_bw + n_in * lat + local
    t_out = b_out * inv_bw + n_out * lat
    busy = np.maximum(t_in, t_out)                                # [L, N]
    L = busy.shape[0]
    g = np.argmax(busy, axis=1)
    rows = np.arange(L)
    use_in = t_in[rows, g] >= t_out[rows, g]
    has = busy[rows, g] > 0
    bytes_ = np.where(use_in, b_in[rows, g], b_out[rows, g]) * has
    n = np.where(use_in, n_in[rows, g], n_out[rows, g]) * has
    fixed = float((np.where(use_in, local[rows, g], 0.0) * has).sum())
    return replan + float(busy.max(axis=1).sum()), np.array([1.0, bytes_.sum(), n.sum(), fixed])


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
        cmd = [sys.executable, "-m", "runtime.torchrun", "--standalone", "--nproc_per_node", str(nproc),
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

    rows:   the means behind it, one dict per (benchmark, size)
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


def _ram_gb() -> float | None:
    """This machine's memory in GB, None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def _layouts(samples: dict, prefix: str) -> dict[int, list]:
    """slots per rank -> samples of ``prefix/S`` benchmarks."""
    return {int(name.split("/")[1]): rows for name, rows in samples.items() if name.startswith(prefix + "/")}


def _lstsq_nonneg(A: np.ndarray, y: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """Relative least squares (rows weighted by 1 / ``scale``, default y) with every coefficient >= 0:
    negative ones are fixed at 0 and the rest refitted."""
    w = 1.0 / np.maximum(y if scale is None else scale, 1e-12)
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
    from sim.work import install_time, returned_rows, route, weight_copies

    spec, info, samples = result["spec"], result["info"], result["samples"]
    N = int(info["world_size"])
    model = model_for_run(run_cfg)
    workload = workload_for_run(run_cfg)
    H, a, k, E = model.hidden_size, model.activation_bytes, model.top_k, model.num_experts
    rows: list[dict] = []
    us = 1e6

    def keep(name: str, sizes, med, unit: str) -> None:
        for s_, t in zip(sizes, med):
            rows.append({"benchmark": name, "size": float(s_), "size_unit": unit, "mean_s": float(t)})

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
    units = float(f"{N * share:.4g}")             # as the cluster file and its comment give it
    shared = units < N
    share = units / N
    scale = share if shared else 1.0              # time with all ranks computing -> time on a processor of its own
    # links: all_to_all_single with b bytes per peer: t = t0 + (N - 1) b / B;  latency per peer = t0 / (N - 1)
    xs, xt = collective(samples["alltoall"])
    keep("alltoall", xs, xt, "bytes per peer")
    a2a_line = fit_line((N - 1) * xs, xt)
    link_bw, link_lat = 1.0 / a2a_line.slope, a2a_line.intercept / (N - 1)
    # weight moves: the runtime's placement change to placements drawn like real re-plans and back (critical:
    # the last rank done is when the step can start), fitted with the simulator's own copy model for each
    # pattern (move_model): t = replan overhead + sum over layers of the busiest port's bytes / copy bandwidth
    # + its transfers x copy latency (+ copies within a rank at memory bandwidth). Every transfer carries one
    # expert, so bytes and transfers are proportional and cannot be told apart from moves of one model: the
    # bytes go at the link bandwidth the all-to-all measured over message sizes, and the latency is what
    # each transfer costs beyond that. The busiest port depends on the parameters: refit 6 rounds.
    ms_, mt_ = critical(samples["move"])
    keep("move", ms_, mt_, "pattern (0: the same placement; odd: to a re-plan; even: back)")
    mem_probe = Hardware.from_config(ClusterConfig(
        name="probe", num_gpus=N, gpus_per_node=N, gpu=GPUSpec(name="", peak_tflops_bf16=1.0,
                                                               hbm_bandwidth_gb_s=hbm / 1e9, hbm_capacity_gb=1.0),
        intra_node=LinkSpec(bandwidth_gb_s=1.0, latency_us=0.0)), model)
    pairs = move_pairs(spec, N)
    ports = [move_ports(*pairs[int(n)], spec["expert_bytes"], mem_probe) for n in ms_]
    replan_over, inv_copy_bw, copy_lat = 0.0, 1.0 / link_bw, link_lat
    for _ in range(6):
        rows_m = np.array([move_model(p, replan_over, inv_copy_bw, copy_lat)[1] for p in ports])
        target = mt_ - rows_m[:, 3] - rows_m[:, 1] * inv_copy_bw
        # relative to the move's measured time (a pattern whose bytes alone take about its time leaves
        # a target near 0, which must not outweigh the others)
        replan_over, copy_lat = _lstsq_nonneg(rows_m[:, [0, 2]], target, scale=mt_)
    move_pred = np.array([move_model(p, replan_over, inv_copy_bw, copy_lat)[0] for p in ports])
    move_rel = float(np.sqrt(np.mean((move_pred / mt_ - 1) ** 2)))
    keep("check: move predicted", ms_, move_pred, "pattern")
    # installs (copy_policy async: the same changes, the weights moved in the background): what the install
    # takes beyond the rows it writes (the staged rows and the copies between slots, at the memory bandwidth)
    install = None
    if samples.get("install"):
        is_, it_ = critical(samples["install"])
        keep("install", is_, it_, "pattern (as move)")
        rows_written = [install_time(weight_copies(*pairs[int(n)], spec["expert_bytes"], mem_probe,
                                                   COPY_BANDWIDTH_SHARE), N, mem_probe) for n in is_]
        install = median_residual(it_, rows_written)
    skew, skew_spread = collective_skew(samples, spec["num_layers"])
    curve = skew_curve(samples, spec["num_layers"], skew)
    if curve is not None:
        keep("imbalance: arrival gap at the combine", curve["fractions"], curve["gap_s"],
             "share of tokens to rank 0's experts")
        keep("imbalance: collective skew after the first dispatch", curve["fractions"], curve["skew_s"],
             "share of tokens to rank 0's experts")
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
    gpu.install_overhead_us = None if install is None else install[0] * us
    link = LinkSpec(bandwidth_gb_s=link_bw / 1e9, latency_us=link_lat * us,
                    copy_bandwidth_gb_s=1.0 / inv_copy_bw / 1e9, copy_latency_us=copy_lat * us)
    cluster = ClusterConfig(name="", num_gpus=N, gpus_per_node=N, gpu=gpu, intra_node=link,
                            compute_units_per_node=units if shared else None,
                            collective_skew_us=float(f"{skew * us:.4g}"),
                            collective_skew_floor=None if curve is None else float(f"{curve['floor']:.4g}"),
                            collective_skew_gap_us=None if curve is None else float(f"{curve['gap_scale_s'] * us:.4g}"))
    hw = Hardware.from_config(cluster, model)
    # the combine's cost per row a rank sends back (the rows it computed for the others): from the
    # imbalance benchmark, where rank 0 takes a growing share of the tokens, and the balanced one's batches
    ret = combine_return_row(samples, spec, N, model, hw)
    if ret is not None:
        keep("imbalance: rows the busiest rank sends back in the combine", ret["fractions"], ret["rows"],
             "share of tokens to rank 0's experts")
        gpu.combine_return_row_us = ret["per_row_s"] * us
        hw = dataclasses.replace(hw, combine_return_row=ret["per_row_s"])
    # dispatch and combine: what the phase takes beyond the link and permutation terms (median)
    meas_d, meas_c, mod_d, mod_c = [], [], [], []
    for name, meas in (("model_dispatch", meas_d), ("model_combine", meas_c)):
        for S, rows_ in sorted(_layouts(samples, name).items()):
            s_, t = collective(rows_)
            keep(f"{name}/{S}", s_, t, "tokens per rank")
            meas.extend(t)
    # the combine of the repeats where one rank reached it clearly last (its FFN ended more than the
    # collective skew after the others'), and what reaching it together added to the mean
    apart, apart_share = [], []
    for S, rows_ in sorted(_layouts(samples, "model_combine").items()):
        s_, t, share_ = collective_apart(rows_, samples[f"model_expert/{S}"], skew)
        keep(f"model_combine/{S}, a rank clearly last", s_, t, "tokens per rank")
        apart.extend(t)
        apart_share.extend(share_)
    apart, apart_share = np.array(apart), np.array(apart_share)
    split = skew > 0 and len(apart) == len(meas_c) and bool(np.all(apart_share >= APART_SHARE))
    for S, T, placement, src, _ in cases:
        traffic = route(src, placement)                                   # [1, N, N]
        sent = traffic.sum(axis=2)
        mod_d.append(float((layout_time(hw)[None] + alltoall_time(traffic, model.token_bytes, hw)
                            + dispatch_host_time(sent, model, hw)).max()))
        mod_c.append(float((alltoall_time(np.swapaxes(traffic, 1, 2), model.token_bytes, hw)
                            + combine_host_time(sent, model, hw, returned_rows(traffic))).max()))
    disp_over, disp_spread = median_residual(meas_d, mod_d)
    comb_over, comb_spread = median_residual(meas_c, mod_c)
    together = 0.0
    if split:       # the overhead of a rank clearly last, and what arriving together adds to it
        apart_over, apart_spread = median_residual(apart, mod_c)
        if apart_over < comb_over:
            comb_over, together, comb_spread = apart_over, comb_over - apart_over, apart_spread
    gpu.dispatch_overhead_us = disp_over * us
    gpu.combine_overhead_us = comb_over * us
    gpu.combine_together_us = together * us
    from sim.cost import shared_compute
    ffn_check = [float(shared_compute(ffn_time(p.slot_loads(src.sum(axis=1)), p.slots_per_gpu, model, hw),
                                      hw).max()) for _, _, p, src, _ in cases]

    cpu = info["device"].startswith("cpu")
    threads = info.get("threads_per_rank")
    gpu.name = (f"CPU rank, {threads} thread(s) of {_cpu_name()}" if cpu else info.get("device_name", "GPU"))
    ram_gb = _ram_gb()
    gpu.hbm_capacity_gb = round((ram_gb or 16.0) / N if cpu else float(info.get("device_memory_gb", 80.0)), 1)
    if cpu:
        memory_source = (f"this machine's memory, {ram_gb:.1f} GB, / {N} ranks" if ram_gb is not None else
                         f"16 GB assumed (the system does not say how much memory it has) / {N} ranks")
    else:
        memory_source = ("the device's total memory (torch.cuda.get_device_properties)" if "device_memory_gb" in info
                         else "80 GB assumed: the device did not report its memory")
    host = platform.node() or "this machine"
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    cluster.name = f"calibrated-{N}x{'cpu' if cpu else 'gpu'}-{info['backend']}"
    cluster.description = (f"measured by moe-gps calibrate on {host}, {date}: {N} ranks, backend {info['backend']}, "
                           f"device {info['device']}" + (f", {threads} thread(s) per rank" if cpu else "")
                           + f", torch {info['torch']}, model shapes of {run_cfg.source}, "
                           f"{spec['repeats']} repeats per size "
                           f"({spec.get('move_repeats', spec['repeats'])} per weight move)"
                           + (f", other processes used {info['interference']:.2f} cores meanwhile"
                              if info.get("interference") is not None else "") + " (docs/fidelity.md)")
    fits = {
        "compute_units_per_node": (units, "processors", f"{N} ranks x (a 50 ms compute loop on one rank alone / "
                                   f"on all ranks at once) = {N} x {share:.4g}; "
                                   + (f"shared: compute phases measured on all ranks at once are scaled by "
                                      f"{scale:.4g} to a processor of their own" if shared else
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
                                    f"median (+/- {comb_spread * us:.0f})" + (
                                        f", over the repeats where one rank reached it more than the collective "
                                        f"skew after the others ({np.min(apart_share):.0%} to "
                                        f"{np.max(apart_share):.0%} of them)" if split else "")),
        **({} if ret is None else {"gpu.combine_return_row_us": (ret["per_row_s"] * us, "us", (
            f"the imbalance and balanced model benchmarks' combine (per repeat the first rank done) - the "
            f"model's without its overhead and this term, over the rows the busiest rank sends back, an intercept "
            f"for each benchmark: slope {ret['slope_s'] * us:.3g} us +/- {ret['interval_s'] * us:.2g} (95%, "
            f"{ret['repeats']} repeats)" + (
                "" if ret["per_row_s"] else "; 0: not above its interval")))}),
        "gpu.combine_together_us": (together * us, "us", (
            "the combine overhead fitted on every repeat - the one above" if split else
            f"0: too few repeats where one rank reached the combine clearly last (fewer than {APART_SHARE:.0%})")),
        "intra_node.bandwidth_gb_s": (link_bw / 1e9, "GB/s", f"all_to_all_single: slope of time over (N-1) x bytes "
                                      f"per peer (rel. RMS {a2a_line.rel_rms:.1%})"),
        "intra_node.latency_us": (link_lat * us, "us", f"all_to_all_single: intercept {a2a_line.intercept * us:.0f} "
                                  f"us / {N - 1} peer(s)"),
        "intra_node.copy_bandwidth_gb_s": (1.0 / inv_copy_bw / 1e9, "GB/s", "the link bandwidth (all-to-all over "
                                           "message sizes): every weight transfer carries one expert, so moves "
                                           "alone cannot separate bytes from transfers"),
        "intra_node.copy_latency_us": (copy_lat * us, "us", f"the runtime's placement change to "
                                       f"{len(spec.get('move_targets', []))} re-plans (big ones from random skewed "
                                       f"loads, small ones swapping a few experts) and back: overhead + sum over "
                                       f"layers of the busiest port's [bytes / copy bandwidth + transfers x "
                                       f"latency], least squares (rel. RMS {move_rel:.1%}); per transfer (one "
                                       f"expert of one layer to one rank)"),
        "gpu.replan_overhead_us": (replan_over * us, "us", "the same fit: fixed part (a re-plan that moves "
                                   "nothing: planning the moves, routing tables)"),
        **({} if install is None else {"gpu.install_overhead_us": (
            install[0] * us, "us", f"the same changes with the weights moved in the background (copy_policy "
            f"async): the install (per repeat the last rank done) - the rows it writes (staged rows and copies "
            f"between slots, 2 x bytes / memory bandwidth), median over the patterns (+/- {install[1] * us:.0f})")}),
        "collective_skew_us": (skew * us, "us", f"the model's step (per repeat the last rank to start) - the sum "
                               f"of its phases (as validate composes them), per dispatch and combine: median over "
                               f"layouts and T (+/- {skew_spread * us:.0f})"),
    }
    if curve is not None:
        pts = ", ".join(f"{g * us:.0f} us: {c * us:.0f} us" for g, c in zip(curve["gap_s"], curve["skew_s"]))
        shares = ", ".join(f"{f:g}" for f in curve["fractions"])
        fits["collective_skew_floor"] = (curve["floor"], "", f"the model with a share {shares} of every rank's "
                                         f"tokens on rank 0's experts: the skew of each collective but the first "
                                         f"dispatch (step - phases, as (L x per layer / skew - 1) / (2 L - 1) of "
                                         f"the skew) at each arrival gap at the combine ({pts}) = "
                                         f"skew x (floor + (1 - floor) exp(-gap / gap scale)), least squares "
                                         f"(RMS {curve['rms']:.2f} of the skew)")
        fits["collective_skew_gap_us"] = (curve["gap_scale_s"] * us, "us", "the same fit: gap scale")
    fits["gpu.hbm_capacity_gb"] = (gpu.hbm_capacity_gb, "GB", memory_source)
    for obj in (gpu, link):               # plain floats, 4 significant digits (YAML, readability)
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, (float, np.floating)):
                setattr(obj, f.name, float(f"{float(v):.4g}"))
    for (S, T, *_), pred in zip(cases, ffn_check):
        rows.append({"benchmark": f"check: model_expert/{S} predicted", "size": float(T),
                     "size_unit": "tokens per rank", "mean_s": pred})
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


def _per_rank_means(rows: list, size: float) -> np.ndarray:
    """float [ranks]: each rank's mean over its samples of one size."""
    by: dict[int, list[float]] = {}
    for s_, rank, t in rows:
        if s_ == size:
            by.setdefault(int(rank), []).append(t)
    return np.array([np.mean(by[r]) for r in sorted(by)])


def fit_skew_curve(gaps: np.ndarray, ratios: np.ndarray) -> tuple[float, float, float]:
    """(floor, gap scale w, relative RMS) of ``ratio = floor + (1 - floor) exp(-gap / w)`` fitted to the
    collective skew over the balanced one, ``ratios`` float [n] (:func:`skew_curve`), at arrival gaps ``gaps`` float [n]
    (seconds): least squares, w on a grid from a tenth of the smallest positive gap to ten times the largest
    (geometric, 61 points), floor in [0, 1] solved for each w."""
    g, r = np.asarray(gaps, dtype=np.float64), np.asarray(ratios, dtype=np.float64)
    pos = g[g > 0]
    best = (1.0, 0.0, float("inf"))
    if len(pos) == 0:
        return best
    for w in np.geomspace(pos.min() / 10, pos.max() * 10, 61):
        x = np.exp(-g / w)
        den = float(np.sum((1 - x) ** 2))
        floor = float(np.clip(np.sum((1 - x) * (r - x)) / den, 0.0, 1.0)) if den > 0 else 1.0
        sse = float(np.sum((floor + (1 - floor) * x - r) ** 2))
        if sse < best[2]:
            best = (floor, float(w), sse)
    return best[0], best[1], float(np.sqrt(best[2] / len(r)))


def combine_return_row(samples: dict, spec: dict, num_ranks: int, model, hw) -> dict | None:
    """The combine's host cost per row a rank sends back (``gpu.combine_return_row_us``), from two
    benchmarks where the busiest rank's rows sent back grow in different ways: ``imbalance_combine``
    (runtime.fidelity_bench.bench_imbalance: a share f of every rank's tokens to rank 0's experts,
    :func:`moe_gps.fidelity.routing.imbalanced_experts`; the rows moved in all stay the same) and the
    balanced model benchmark's ``model_combine/S`` (every rank's rows grow with the batch). Per repeat
    of either:

        y = combine (the first rank done) - [all-to-all + 2 permutation passes] of the model
        x = the rows that the rank with the largest of these took from the others (and sends back)

    least squares y = a_b + c x over every repeat of both, an intercept a_b for each benchmark (what
    arriving together or apart adds; the overhead fits take it) and one slope c, kept where it is
    positive beyond its 95% interval (Student's t of repeats - parameters degrees of freedom times its
    standard error), else 0: the term is charged only where the benchmarks show it. None without them.
    Returns per_row_s (c or 0), slope_s (c), interval_s, repeats, and per f of the imbalance benchmark
    the fractions and x (``rows``)."""
    from moe_gps.fidelity.compare import t95
    from moe_gps.fidelity.routing import expert_counts, rank0_experts
    from sim.cost import alltoall_time, permute_time
    from sim.work import returned_rows, route

    def busiest(src: np.ndarray, placement) -> tuple[float, float]:
        """(the model's seconds, rows sent back) of the rank with the largest modelled combine."""
        traffic = route(src, placement)                                                     # [1, N, N]
        t = (alltoall_time(np.swapaxes(traffic, 1, 2), model.token_bytes, hw)
             + permute_time(traffic.sum(axis=2), 2, model, hw))[0]                          # [N]
        g = int(np.argmax(t))
        return float(t[g]), float(returned_rows(traffic)[0, g])

    k, E = spec["top_k"], spec["num_experts"]
    xs, ys, bench = [], [], []

    def add(bench_rows: list, placement, src_of, b: int) -> dict[float, tuple[float, float]]:
        """The (x, y) of every repeat of one benchmark (``src_of(size)``: its [1, N, E] counts) -> per size
        :func:`busiest`."""
        sizes, y_rep = collective_repeats(bench_rows)
        fit = {s: busiest(src_of(s), placement) for s in np.unique(sizes)}
        xs.append(np.array([fit[s][1] for s in sizes]))
        ys.append(y_rep - np.array([fit[s][0] for s in sizes]))
        bench.append(np.full(len(sizes), b))
        return fit

    fractions, rows = np.array([]), np.array([])
    if samples.get("imbalance_combine"):
        placement = layout_placement(spec, num_ranks, layouts(spec, num_ranks)[0], num_layers=1)
        hot = rank0_experts(placement)
        T = step_batch(spec) * spec["seq_len"]
        fit = add(samples["imbalance_combine"], placement,
                  lambda f: expert_counts(T, k, E, num_ranks, float(f), hot)[None], 0)
        fractions = np.array(sorted(fit))
        rows = np.array([fit[f][1] for f in fractions])
    for S, rows_ in sorted(_layouts(samples, "model_combine").items()):
        add(rows_, layout_placement(spec, num_ranks, S * num_ranks - E, num_layers=1),
            lambda T: np.full((1, num_ranks, E), T * k / E), 1)
    if not xs:
        return None
    x, y, b = np.concatenate(xs), np.concatenate(ys), np.concatenate(bench)
    groups = np.unique(b)
    A = np.column_stack([(b == g).astype(np.float64) for g in groups] + [x])
    n, params = A.shape
    if n <= params or np.linalg.matrix_rank(A) < params:
        return None
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    c = float(coef[-1])
    resid = y - A @ coef
    se = float(np.sqrt(resid @ resid / (n - params) * np.linalg.inv(A.T @ A)[-1, -1]))
    interval = t95(n - params) * se
    return {"per_row_s": c if c > interval else 0.0, "slope_s": c, "interval_s": interval,
            "repeats": n, "fractions": fractions, "rows": rows}


def skew_curve(samples: dict, num_layers: int, skew0: float) -> dict | None:
    """The collective skew as a function of the ranks' arrival gap at the combine, from the ``imbalance_*``
    benchmarks (runtime.fidelity_bench.bench_imbalance): per share f of the tokens sent to rank 0's experts,

        gap_f   = largest - second largest over ranks of the rank's mean expert FFN time
                  (:func:`sim.cost.arrival_gap`, as the simulator reads it)
        extra_f = [imbalance_step (collective) - L x (attention (critical) + dispatch (collective)
                   + FFN (critical) + combine (collective))] / L          (both collectives of a layer)
        ratio_f = (L x extra_f / skew0 - 1) / (2 L - 1)

    the share of skew0 left at every collective but the first layer's dispatch, as the simulator charges
    it (:func:`sim.work.placement_phases`): every combine from its gap, every later dispatch as the combine
    before it (the ranks leave that combine together), the first dispatch skew0 (attention is balanced).

    fitted with :func:`fit_skew_curve`. None without those samples or without a balanced skew."""
    from sim.cost import arrival_gap

    if "imbalance_step" not in samples or skew0 <= 0:
        return None
    fs, step = collective(samples["imbalance_step"])
    _, attn = critical(samples["imbalance_attention"])
    _, disp = collective(samples["imbalance_dispatch"])
    _, ffn = critical(samples["imbalance_expert"])
    _, comb = collective(samples["imbalance_combine"])
    extra = step / num_layers - (attn + disp + ffn + comb)
    gaps = np.array([float(arrival_gap(_per_rank_means(samples["imbalance_expert"], f))) for f in fs])
    L = num_layers
    ratio = (L * extra / skew0 - 1.0) / (2 * L - 1)
    floor, w, rel = fit_skew_curve(gaps, ratio)
    if w <= 0:
        return None
    return {"fractions": fs, "gap_s": gaps, "skew_s": skew0 * ratio, "floor": floor, "gap_scale_s": w,
            "rms": rel}


def header_comment(cal: Calibration) -> str:
    lines = ["Cluster measured by `moe-gps calibrate` (docs/fidelity.md). Where each number comes from:"]
    for key, (value, unit, how) in cal.fits.items():
        lines.append(f"  {key} = {value:.4g} {unit}: {how}")
    return "".join(f"# {ln}\n" for ln in lines)


def calibration_files(path: str | os.PathLike) -> tuple[Path, Path, Path, Path]:
    """The files a calibration written to ``path`` makes: the cluster YAML, ``<stem>.measurements.csv``,
    ``<stem>.samples.csv`` and ``<stem>.model.yaml``."""
    path = Path(path)
    return (path, *(path.with_name(path.stem + suffix) for suffix in (".measurements.csv", ".samples.csv",
                                                                       ".model.yaml")))


def write_calibration(cal: Calibration, path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """Write the cluster YAML (loadable with ``--cluster``), ``<stem>.measurements.csv`` (the means
    the fits used), ``<stem>.samples.csv`` (every raw sample) and ``<stem>.model.yaml`` (the measured
    model for ``--model``, so that a trace the runtime recorded can be simulated on this cluster)."""
    from moe_gps.atomic import write_csv_atomic, write_text_atomic
    from moe_gps.config.loader import dump_yaml
    from moe_gps.tables import rows_to_columns

    path, csv, raw, model = calibration_files(path)
    write_text_atomic(path, header_comment(cal) + dump_yaml(cal.cluster))
    write_csv_atomic(csv, rows_to_columns(cal.rows))
    write_csv_atomic(raw, rows_to_columns(cal.samples))
    if cal.model is not None:
        write_text_atomic(model,
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
        raise UserError(f"--repeats must be at least 3 (means over repeats), got {repeats}")
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
