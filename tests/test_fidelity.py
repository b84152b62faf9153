"""moe_gps.fidelity without torch: fits, calibration round trip, measured phases, comparison, ranking,
the new cost-model terms, and validate's input errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from moe_gps.cli.main import main
from moe_gps.config.schema import ClusterConfig, GPUSpec, LinkSpec, WorkloadConfig
from moe_gps.fidelity.compare import compare_run, ranking
from moe_gps.fidelity.fit import collective, critical, fit_line, median_residual, typical
from moe_gps.fidelity.measured import measured_phases
from moe_gps.fidelity.model import model_for_run, workload_for_run
from moe_gps.placement import plan_placement
from runtime.config import parse_run_config
from sim.cost import (Hardware, alltoall_time, attention_time, combine_host_time, dispatch_host_time, ffn_time,
                      layout_time, permute_time, shared_compute)
from sim.work import install_time, returned_rows, route, weight_copies

RUN = {"model": {"num_layers": 2, "hidden_size": 64, "intermediate_size": 96, "num_experts": 8, "top_k": 2,
                 "num_heads": 2},
       "input": {"batch_size": 4, "seq_len": 32}, "duplication": {"num_redundant": 4}}


# ----------------------------------------------------------------------------- fits

def test_typical_and_collective_statistics():
    rows = [(8, 0, 1.0), (8, 1, 3.0), (8, 0, 2.0), (8, 1, 5.0), (8, 0, 100.0), (8, 1, 4.0), (2, 0, 1.0)]
    sizes, mean = typical(rows)
    assert sizes.tolist() == [2, 8] and mean[1] == pytest.approx(115 / 6)      # mean of all six
    sizes, mean = collective(rows)
    # repeats: (1, 3) -> 1, (2, 5) -> 2, (100, 4) -> 4; mean of the per-repeat minima
    assert mean[1] == pytest.approx(7 / 3)
    sizes, mean = critical(rows)                    # maxima 3, 5, 100
    assert mean[1] == pytest.approx(36.0)


def test_fit_line_recovers_a_line_and_keeps_the_intercept_nonnegative():
    x = np.array([1.0, 10, 100, 1000])
    line = fit_line(x, 5.0 + 0.25 * x)
    assert line.intercept == pytest.approx(5.0) and line.slope == pytest.approx(0.25) and line.rel_rms < 1e-9
    line = fit_line(x[1:], -3.0 + 0.5 * x[1:])
    assert line.intercept == 0.0 and 0.2 < line.slope < 0.5   # relative weights favour the small sizes
    assert median_residual([10, 11, 12], [9, 9, 9]) == (2.0, 0.5)
    assert median_residual([1, 1], [5, 5])[0] == 0.0


# ----------------------------------------------------------------------------- calibration round trip

def _truth(N: int, units: float | None = None) -> ClusterConfig:
    gpu = GPUSpec(name="truth", peak_tflops_bf16=0.05, hbm_bandwidth_gb_s=10.0, hbm_capacity_gb=10.0,
                  compute_efficiency=0.8, attention_efficiency=0.5, kernel_overhead_us=150.0,
                  attention_overhead_us=700.0, expert_overhead_us=60.0, dispatch_overhead_us=900.0,
                  combine_overhead_us=300.0, permute_bandwidth_gb_s=4.0, replan_overhead_us=2000.0,
                  install_overhead_us=700.0)
    return ClusterConfig(name="truth", num_gpus=N, gpus_per_node=N, gpu=gpu,
                         intra_node=LinkSpec(bandwidth_gb_s=1.2, latency_us=200.0, copy_bandwidth_gb_s=0.6,
                                             copy_latency_us=300.0), compute_units_per_node=units,
                         collective_skew_us=150.0, collective_skew_floor=0.2, collective_skew_gap_us=1000.0)


def _samples_from(cluster: ClusterConfig, spec: dict, run_cfg, noise: float, seed: int = 0) -> dict:
    """What runtime.fidelity_bench would record on a machine that follows the cost model exactly."""
    from moe_gps.fidelity.calibrate import layouts, move_model, move_pairs, move_ports

    rng = np.random.default_rng(seed)
    N = cluster.num_gpus
    model = model_for_run(run_cfg)
    wl = workload_for_run(run_cfg)
    hw = Hardware.from_config(cluster, model)
    k, E = model.top_k, model.num_experts
    out: dict[str, list] = {}

    def add(name, size, t, reps=7):
        for r in range(reps):
            for rank in range(N):
                out.setdefault(name, []).append((float(size), rank, float(t) * (1 + noise * rng.standard_normal())))

    for b in spec["memory_bytes"]:
        add("memory", b, 2 * b / hw.hbm)
    for n in spec["permute_rows"]:
        add("permute", n, float(permute_time(n, 2, model, hw)))
    crowd = max(1.0, N / hw.compute_units) if hw.compute_units else 1.0     # all ranks computing at once
    for n in spec["ffn_rows"]:
        add("ffn", n, 40e-6 + 2 * n * model.expert_params / hw.flops)
    loop = 20 * (40e-6 + 2 * 64 * model.expert_params / hw.flops)
    add("crowd", 20, loop * crowd)
    out.setdefault("crowd_solo", []).extend((20.0, 0, loop) for _ in range(7))
    for b in spec["alltoall_bytes"]:
        add("alltoall", b, (N - 1) * (b / hw.intra_bw + hw.intra_lat))
    for n, pair in move_pairs(spec, N).items():   # irregular re-plans, as the simulator charges them
        add("move", n, move_model(move_ports(*pair, spec["expert_bytes"], hw), hw.replan_overhead,
                                  1 / hw.intra_copy_bw, hw.intra_copy_lat)[0])
        add("install", n, install_time(weight_copies(*pair, spec["expert_bytes"], hw, 0.5), N, hw))
    L = spec["num_layers"]
    for R in layouts(spec, N):
        p = plan_placement(np.ones((1, E)), N, R, "none" if R == 0 else "eplb")
        for batch in spec["model_batches"]:
            T = batch * spec["seq_len"]
            add("model_attention", T, float(attention_time(T, model, wl, hw)) * crowd)
            src = np.full((1, N, E), T * k / E)
            traffic = route(src, p)
            sent = traffic.sum(axis=2)
            S = p.slots_per_gpu
            phases = [float(attention_time(T, model, wl, hw)) * crowd,
                      shared_compute(ffn_time(p.slot_loads(src.sum(axis=1)), S, model, hw), hw).max(),
                      (layout_time(hw)[None] + alltoall_time(traffic, model.token_bytes, hw)
                       + dispatch_host_time(sent, model, hw)).max(),
                      (alltoall_time(np.swapaxes(traffic, 1, 2), model.token_bytes, hw)
                       + combine_host_time(sent, model, hw, returned_rows(traffic))).max()]
            add(f"model_expert/{S}", T, phases[1])
            add(f"model_dispatch/{S}", T, phases[2])
            add(f"model_combine/{S}", T, phases[3])
            # the step: every layer's phases + the collective skew of its dispatch and combine
            add(f"model_step/{S}", T, L * (sum(phases) + 2 * hw.collective_skew))
    # imbalance: rank 0's FFN longer by gap; the combine's skew falls with it as the cluster says, and every
    # dispatch after the first with it (the ranks leave the combine before it together)
    from sim.cost import collective_skew
    for f in spec["imbalance_fractions"]:
        gap = 4e-3 * f
        ffn = np.full(N, 2e-3)
        ffn[0] += gap
        comb_skew = float(collective_skew(ffn, hw))
        for name, t in (("attention", 1e-3), ("dispatch", 0.5e-3), ("combine", 0.4e-3)):
            add(f"imbalance_{name}", f, t, reps=7 * L)
        for r in range(7 * L):
            for rank in range(N):
                out.setdefault("imbalance_expert", []).append((float(f), rank, float(ffn[rank])))
        add("imbalance_step", f, L * (1e-3 + 0.5e-3 + ffn.max() + 0.4e-3) + hw.collective_skew
            + (2 * L - 1) * comb_skew)
    return out


@pytest.mark.parametrize("N, units", [(2, None), (4, None), (4, 2.0)])
def test_calibration_recovers_the_parameters_of_a_machine_that_follows_the_model(N, units):
    from moe_gps.fidelity.calibrate import fit_cluster, make_spec

    run_cfg = parse_run_config(RUN)
    spec = make_spec(run_cfg, N)
    truth = _truth(N, units)
    result = {"spec": spec, "info": {"world_size": N, "backend": "gloo", "device": "cpu", "threads_per_rank": 1,
                                     "torch": "x", "interference": 0.0},
              "samples": _samples_from(truth, spec, run_cfg, noise=0.0)}
    cal = fit_cluster(result, run_cfg)
    g, t = cal.cluster.gpu, truth.gpu
    rel = pytest.approx
    assert cal.cluster.compute_units_per_node == units          # 4 ranks sharing 2 processors are found
    assert g.peak_tflops_bf16 * g.compute_efficiency == rel(t.peak_tflops_bf16 * t.compute_efficiency, rel=1e-3)
    assert g.peak_tflops_bf16 * g.attention_efficiency == rel(t.peak_tflops_bf16 * t.attention_efficiency, rel=1e-3)
    assert g.hbm_bandwidth_gb_s == rel(t.hbm_bandwidth_gb_s, rel=1e-3)
    assert g.permute_bandwidth_gb_s == rel(t.permute_bandwidth_gb_s, rel=1e-3)
    assert cal.cluster.intra_node.bandwidth_gb_s == rel(1.2, rel=1e-3)
    assert cal.cluster.intra_node.latency_us == rel(200.0, rel=1e-3)
    # moves of one model cannot tell bytes from transfers: the bytes go at the link bandwidth, and the
    # latency takes the rest of what one expert's transfer costs
    eb = spec["expert_bytes"]
    assert cal.cluster.intra_node.copy_bandwidth_gb_s == rel(1.2, rel=1e-3)
    assert eb / 1.2e3 + cal.cluster.intra_node.copy_latency_us == rel(eb / 0.6e3 + 300.0, rel=1e-3)
    assert g.replan_overhead_us == rel(2000.0, rel=1e-3)
    assert g.install_overhead_us == rel(700.0, rel=1e-3)
    assert cal.cluster.collective_skew_us == rel(150.0, rel=1e-3)
    # the combine's skew over the arrival gap: floor and gap scale (w on a grid of 61 geometric points)
    assert cal.cluster.collective_skew_floor == rel(0.2, abs=0.02)
    assert cal.cluster.collective_skew_gap_us == rel(1000.0, rel=0.1)
    for f in ("attention_overhead_us", "expert_overhead_us", "kernel_overhead_us", "dispatch_overhead_us",
              "combine_overhead_us"):
        assert getattr(g, f) == rel(getattr(t, f), rel=2e-3, abs=0.5), f
    # every fitted number says where it comes from, and the file round-trips through the loader
    assert {"gpu.dispatch_overhead_us", "intra_node.latency_us"} <= set(cal.fits)


def test_calibration_with_noise_stays_close_and_writes_a_loadable_cluster(tmp_path):
    from moe_gps.config.loader import load_cluster
    from moe_gps.fidelity.calibrate import fit_cluster, make_spec, write_calibration

    run_cfg = parse_run_config(RUN)
    spec = make_spec(run_cfg, 2)
    truth = _truth(2)
    result = {"spec": spec, "info": {"world_size": 2, "backend": "gloo", "device": "cpu", "threads_per_rank": 1,
                                     "torch": "x", "interference": 0.1},
              "samples": _samples_from(truth, spec, run_cfg, noise=0.03, seed=4)}
    cal = fit_cluster(result, run_cfg)
    assert cal.cluster.gpu.permute_bandwidth_gb_s == pytest.approx(4.0, rel=0.1)
    assert cal.cluster.intra_node.latency_us == pytest.approx(200.0, rel=0.15)
    path, medians, raw = write_calibration(cal, tmp_path / "c.yaml")
    loaded = load_cluster(str(path))
    assert loaded == cal.cluster
    assert path.read_text().startswith("# Cluster measured by `moe-gps calibrate`")
    assert set(pd.read_csv(medians).benchmark) >= {"ffn", "alltoall", "model_expert/4", "model_expert/6"}
    assert len(pd.read_csv(raw)) == sum(len(v) for v in result["samples"].values())


def test_the_move_fit_weighs_each_pattern_by_its_measured_time():
    """The moves' fixed costs are fitted on what the bytes leave of each move's time. With the link
    bandwidth under-estimated, a pattern of big transfers leaves nothing (clipped at 1 ns); weighed by
    that remainder it outweighed every other pattern and drove both costs to 0 (4 of 6 calibrations on
    one day, moves then predicted a third low). Weighed by each move's own time, the fit predicts them."""
    from moe_gps.fidelity.calibrate import _lstsq_nonneg

    A = np.array([[1.0, 0.0], [1.0, 10.0], [1.0, 20.0], [1.0, 2.0], [1.0, 6.0]])   # (1, transfers) per pattern
    bytes_s = np.array([0.0, 8e-3, 12e-3, 15e-3, 6e-3])                          # the bytes' true time
    measured = A @ [1e-3, 5e-4] + bytes_s
    estimated = 1.25 * bytes_s                                                  # bandwidth 20% low
    target = measured - estimated
    assert target.min() <= 0
    old = _lstsq_nonneg(A, np.maximum(target, 1e-9))
    new = _lstsq_nonneg(A, target, scale=measured)
    def rms(c):
        return float(np.sqrt(np.mean(((A @ c + estimated) / measured - 1) ** 2)))
    assert old[0] == pytest.approx(0.0, abs=1e-6) and rms(old) > 0.2
    assert new[0] > 5e-4 and new[1] > 0 and rms(new) < 0.1


def test_a_combine_reached_together_is_fitted_apart_from_one_reached_with_a_rank_clearly_last():
    """Half the model bench's repeats have one rank clearly last at the combine (the others' FFNs end more
    than the collective skew earlier) and a plain combine; the others arrive together and their combine
    takes X more. The calibration finds the overhead of the first and, as combine_together_us, what the
    second add to the mean (X / 2); the simulator charges it at a zero arrival gap only."""
    from moe_gps.fidelity.calibrate import fit_cluster, make_spec
    from sim.cost import combine_together
    from sim.work import placement_phases

    N, X = 2, 400e-6
    run_cfg = parse_run_config(RUN)
    spec = make_spec(run_cfg, N)
    truth = _truth(N)
    samples = _samples_from(truth, spec, run_cfg, noise=0.0)
    apart = 3 * truth.collective_skew_us * 1e-6
    for name, rows in samples.items():
        if name.startswith(("model_expert/", "model_combine/")):
            for j, (size, rank, t) in enumerate(rows):
                together = (j % (7 * N)) // N % 2 == 1                # 7 repeats x N ranks per size, in order
                if name.startswith("model_expert/") and not together and rank > 0:
                    rows[j] = (size, rank, t - apart)                 # rank 0 clearly last; its time, the max, kept
                if name.startswith("model_combine/") and together:
                    rows[j] = (size, rank, t + X)
    result = {"spec": spec, "info": {"world_size": N, "backend": "gloo", "device": "cpu", "threads_per_rank": 1,
                                     "torch": "x", "interference": 0.0}, "samples": samples}
    cal = fit_cluster(result, run_cfg)
    g = cal.cluster.gpu
    assert g.combine_overhead_us == pytest.approx(truth.gpu.combine_overhead_us, rel=2e-3)
    reps = 7
    assert g.combine_together_us == pytest.approx(X * 1e6 * (reps // 2) / reps, rel=2e-3)
    assert g.expert_overhead_us == pytest.approx(truth.gpu.expert_overhead_us, rel=2e-3)
    assert "gpu.combine_together_us" in cal.fits
    # the simulator: the whole of it at a zero gap, e^-1 of it at a gap of one collective skew, none far apart
    hw = Hardware.from_config(cal.cluster, model_for_run(run_cfg))
    s0 = hw.collective_skew
    got = combine_together(np.array([[1e-3, 1e-3], [1e-3 + s0, 1e-3], [1e-3 + 100 * s0, 1e-3]]), hw)
    assert got == pytest.approx([hw.combine_together, hw.combine_together / np.e, 0.0], abs=1e-12)
    assert combine_together(np.zeros((1, 2)), dataclasses.replace(hw, collective_skew=0.0)) == pytest.approx(
        [hw.combine_together])
    # counted in the combine (as validate measures it), not in the collective skew
    p = plan_placement(np.ones((1, 8)), N, 0, "none")
    src = np.full((1, N, 8), 16.0)
    with_it = placement_phases(p, src, None, model_for_run(run_cfg), hw)
    without = placement_phases(p, src, None, model_for_run(run_cfg), dataclasses.replace(hw, combine_together=0.0))
    assert with_it.combine - without.combine == pytest.approx(np.full((1, N), hw.combine_together))
    assert np.array_equal(with_it.skew, without.skew)
    # a calibration whose ranks always arrive together (no jitter): no split, the old single overhead
    plain = fit_cluster({**result, "samples": _samples_from(truth, spec, run_cfg, noise=0.0)}, run_cfg)
    assert plain.cluster.gpu.combine_together_us == 0.0


@pytest.mark.parametrize("N", [2, 4])
def test_move_patterns_are_irregular_and_the_simulator_counts_the_runtimes_transfers(N):
    from moe_gps.fidelity.calibrate import make_spec, move_pairs, move_ports
    from moe_gps.placement.moves import move_plan

    run_cfg = parse_run_config(RUN)
    spec = make_spec(run_cfg, N)
    pairs = move_pairs(spec, N)
    assert len(pairs) == 1 + 2 * len(spec["move_targets"]) and len(spec["move_targets"]) == 6 + 3
    hw = Hardware.from_config(_truth(N), model_for_run(run_cfg))
    assert not move_ports(*pairs[0], spec["expert_bytes"], hw)[1].any()          # the same placement: nothing
    uneven = 0
    for size, (before, after) in pairs.items():
        plan = move_plan(before.phy2log, after.phy2log, N)
        want = np.zeros((before.num_layers, N))
        for t in plan.transfers:                                                # one per (layer, expert, dst)
            want[t.layer, t.dst_rank] += 1
        b_in, n_in, _, n_out, _ = move_ports(before, after, spec["expert_bytes"], hw)
        assert n_in == pytest.approx(want) and b_in == pytest.approx(want * spec["expert_bytes"])
        assert n_out.sum() == pytest.approx(len(plan.transfers))
        uneven += int((want.max(axis=1) > want.min(axis=1)).any())
    assert uneven >= len(pairs) // 2            # irregular: ranks receive different numbers of experts


# ----------------------------------------------------------------------------- new cost-model terms

def test_new_cost_terms_default_to_the_old_model_and_add_what_they_say():
    run_cfg = parse_run_config(RUN)
    model = model_for_run(run_cfg)
    base = _truth(2)
    plain = dataclasses.replace(base, gpu=GPUSpec(name="g", peak_tflops_bf16=0.05, hbm_bandwidth_gb_s=10.0,
                                                  hbm_capacity_gb=10.0, kernel_overhead_us=150.0))
    hw0 = Hardware.from_config(plain, model)
    hw = Hardware.from_config(base, model)
    slots = np.array([[10.0, 0.0, 30.0, 5.0]])
    # defaults: no permutation, no per-slot or host overhead, attention at the GEMM rate with kernel overhead
    assert float(permute_time(100, 2, model, hw0)) == 0.0
    assert dispatch_host_time(np.array([5.0]), model, hw0).tolist() == [0.0]
    assert float(attention_time(64, model, WorkloadConfig(), hw0)) == pytest.approx(
        float(attention_time(64, model, WorkloadConfig(), dataclasses.replace(hw0, attn_flops=hw0.flops))))
    # with the fields: 2 busy slots on GPU 0 (slot 1 is empty), permutation of 2 passes over its 10 rows
    t = ffn_time(slots, 2, model, hw) - ffn_time(slots, 2, model, dataclasses.replace(
        hw, expert_overhead=0.0, permute_bw=0.0))
    row = 2 * model.token_bytes / 4e9
    assert t[0, 0] == pytest.approx(1 * 60e-6 + 2 * 10 * row)
    assert t[0, 1] == pytest.approx(2 * 60e-6 + 2 * 35 * row)
    assert float(dispatch_host_time(10.0, model, hw)) == pytest.approx(900e-6 + 10 * row)
    assert float(combine_host_time(10.0, model, hw)) == pytest.approx(300e-6 + 2 * 10 * row)


def test_shared_compute_is_processor_sharing_per_node():
    from sim.cost import shared_compute
    hw = Hardware(1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, np.array([0, 0, 0, 0, 1, 1, 1, 1]), compute_units=2.0)
    t = shared_compute(np.array([[1.0, 1, 1, 1, 4, 1, 1, 1]]), hw)
    # node 0: four equal works on 2 processors take twice as long; node 1: the three short ones end at 2,
    # then the long one runs alone for its remaining 3
    assert t.tolist() == [[2.0, 2.0, 2.0, 2.0, 5.0, 2.0, 2.0, 2.0]]
    assert shared_compute(np.array([3.0, 0, 0, 0, 0, 0, 0, 0]), hw).tolist() == [3.0] + [0.0] * 7
    alone = Hardware(1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, np.zeros(4, dtype=int))
    assert shared_compute(np.array([4.0, 1, 1, 1]), alone).tolist() == [4.0, 1, 1, 1]


# ----------------------------------------------------------------------------- measured phases

def _timings(rows):
    cols = ["step", "rank", "layer", "attention_s", "route_s", "counts_s", "dispatch_s", "expert_s", "combine_s"]
    return pd.DataFrame(rows, columns=cols)


def test_measured_phases_follow_the_critical_path():
    # step 0, two ranks, two layers; rank 1 arrives late at layer 0 (rank 0 waits in counts)
    t = _timings([
        [0, 0, 0, 1.0, 0.1, 0.9, 0.2, 2.0, 0.5],
        [0, 1, 0, 1.5, 0.1, 0.3, 0.2, 3.0, 0.2],
        [0, 0, 1, 1.0, 0.1, 0.2, 0.2, 1.0, 0.9],
        [0, 1, 1, 1.0, 0.1, 0.2, 0.3, 2.0, 0.1],
    ])
    s = pd.DataFrame({"step": [0, 0], "rank": [0, 1], "move_s": [0.4, 0.6], "replanned": [1, np.nan]})
    m = measured_phases(t, s)
    assert m.phases["attention"][0] == pytest.approx(1.6 + 1.1)
    assert m.phases["dispatch"][0] == pytest.approx(0.5 + 0.4)
    assert m.phases["ffn"][0] == pytest.approx(3.0 + 2.0)
    assert m.phases["combine"][0] == pytest.approx(0.2 + 0.1)
    assert m.phases["copy"][0] == pytest.approx(0.6)
    own0 = 1.1 + 1.1 + 2.0 + 0.5 + 1.1 + 0.4 + 1.0 + 0.9
    own1 = 1.6 + 0.5 + 3.0 + 0.2 + 1.1 + 0.5 + 2.0 + 0.1
    assert m.total[0] == pytest.approx(min(own0, own1) + 0.6)
    # what the total has beyond the phases: ranks leaving collectives at different times
    assert m.phases["sync"][0] == pytest.approx(min(own0, own1) - (2.7 + 0.9 + 5.0 + 0.3))
    assert m.replanned.tolist() == [True]
    assert m.ffn_cpu_share is None                     # a run recorded without expert_cpu_s
    # the busiest rank of each layer (rank 1 both times): its CPU time over its time in the expert compute
    t["expert_cpu_s"] = [2.0, 1.5, 1.0, 1.0]
    assert measured_phases(t, s).ffn_cpu_share == pytest.approx((1.5 + 1.0) / (3.0 + 2.0))


# ----------------------------------------------------------------------------- comparison and ranking

class _Sim:
    def __init__(self, per_step_ms):
        x = np.asarray(per_step_ms, dtype=float)[:, None] * 1e-3
        z = np.zeros_like(x)
        self.phases = {"predictor": z, "attention": x * 0.5, "copy": z, "dispatch": x * 0.2, "correction": z,
                       "ffn": x * 0.2, "combine": x * 0.05, "sync": x * 0.05}
        self.step_latency = x[:, 0]


def _measured(steps, total_ms):
    from moe_gps.fidelity.measured import MeasuredRun
    t = np.asarray(total_ms, dtype=float) * 1e-3
    phases = {"attention": t * 0.5, "dispatch": t * 0.25, "ffn": t * 0.15, "combine": t * 0.06, "copy": t * 0,
              "sync": t * 0.04}
    return MeasuredRun(np.asarray(steps), phases, t, np.zeros(len(t), bool))


def test_error_is_the_ratio_of_medians_over_the_compared_steps():
    steps = np.arange(1, 9)
    c = compare_run(2, "off", [(_Sim([99, 11, 11, 11, 11, 11, 11, 11]), steps, _measured(steps, [5] + [10] * 7))], 2)
    assert c.steps.tolist() == list(range(2, 9))            # step 1 is only simulated, not compared
    assert c.error("total") == pytest.approx(0.1)
    assert c.error("attention") == pytest.approx(0.1)
    assert c.error("dispatch") == pytest.approx(0.2 * 11 / 2.5 - 1)
    assert c.error("sync") == pytest.approx(0.05 * 11 / 0.4 - 1)
    row = {r["phase"]: r for r in c.rows()}
    assert row["total"]["predicted_ms"] == pytest.approx(11) and row["total"]["measured_ms"] == pytest.approx(10)
    assert np.isnan(row["copy"]["error"])                    # no step moved weights


def test_runs_are_pooled_each_with_its_own_prediction():
    steps = np.arange(2, 6)
    pairs = [(_Sim([10, 10, 10, 10]), steps, _measured(steps, [9, 9, 9, 9])),
             (_Sim([12, 12, 12, 12]), steps, _measured(steps, [13, 13, 13, 13]))]
    c = compare_run(2, "static", pairs, 2)
    assert len(c.steps) == 8 and c.run_means == pytest.approx([9e-3, 13e-3])
    assert c.mean("predicted", "total") == pytest.approx(11e-3)
    assert c.mean("measured", "total") == pytest.approx(11e-3)
    assert c.error("total") == pytest.approx(0.0)
    # the standard error takes the spread between runs: std(9, 13) / sqrt(2)
    assert c.stderr == pytest.approx(np.std([9e-3, 13e-3], ddof=1) / np.sqrt(2))


def test_ranking_agrees_disagrees_and_leaves_close_pairs_unresolved():
    steps = np.arange(2, 30)
    rng = np.random.default_rng(0)

    def comp(name, pred, meas, spread=0.1):
        m = _measured(steps, meas + spread * rng.standard_normal(len(steps)))
        return compare_run(4, name, [(_Sim(np.full(len(steps), pred)), steps, m)], 2)

    same = ranking([comp("off", 30, 30), comp("dist-only", 20, 21), comp("static", 25, 26)])[4]
    assert same["agrees"] and same["resolved_agrees"] and same["measured"] == ["dist-only", "static", "off"]
    wrong = ranking([comp("off", 20, 30), comp("dist-only", 25, 20)])[4]
    assert not wrong["agrees"] and not wrong["resolved_agrees"] and wrong["misordered"] == [("off", "dist-only")]
    close = ranking([comp("off", 20, 25.0, 3.0), comp("static", 21, 24.9, 3.0)])[4]
    assert close["resolved_agrees"] and close["unresolved"] == [("off", "static")] and not close["misordered"]


# ----------------------------------------------------------------------------- validate's input errors

@pytest.mark.parametrize("args, message", [
    (["/no/such.parquet"], "no such file"),
    (["TRACE", "--strategies", "off", "eplb"], "'eplb' is not a runtime duplication mode"),
    (["TRACE", "--nproc", "3"], "--nproc 3, strategy off"),
    (["TRACE", "--nproc", "1"], "at least 2"),
    (["TRACE", "--steps", "5"], "use --steps of at least 6"),
    (["TRACE", "--nproc", "2", "4", "--cluster", "x.yaml"], "exactly one --nproc"),
])
def test_validate_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    args = [a.replace("TRACE", "traces/mixtral_mmlu.parquet") for a in args]
    pytest.importorskip("torch")                 # the command refuses to start without it
    code = main(["validate", *args, "--config", "runtime/examples/run.yaml", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("moe-gps: error: ") and message in err[0], err


def test_validate_refuses_a_trace_without_token_ids_and_a_checkpoint_model(tmp_path, capsys):
    pytest.importorskip("torch")
    from moe_gps.trace import load_trace, write_trace
    from moe_gps.trace.data import CountsTrace

    tr = load_trace("traces/mixtral_mmlu.parquet")
    counts = CountsTrace(dataclasses.replace(tr.meta, kind="counts", tokens_per_step=None), tr.counts())
    write_trace(tmp_path / "c.parquet", counts)
    assert main(["validate", str(tmp_path / "c.parquet"), "--config", "runtime/examples/run.yaml"]) == 2
    assert "has no token_id column" in capsys.readouterr().err
    cfg = tmp_path / "ck.yaml"
    cfg.write_text(f"model: {{checkpoint: {tmp_path}}}\n")
    assert main(["validate", "traces/mixtral_mmlu.parquet", "--config", str(cfg)]) == 2
    assert "model.checkpoint is set" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the new terms in whole simulations

def test_new_terms_in_the_event_model_match_the_closed_form_and_add_exactly_their_cost(event_steps, queued_layers):
    from moe_gps.config import SimulateConfig, strategy_from_name
    from moe_gps.trace.synth import synthesize
    from sim.run import simulate
    from sim.work import closed_form_layer_times

    run_cfg = parse_run_config({**RUN, "model": {**RUN["model"], "num_layers": 4}})
    model = model_for_run(run_cfg)
    trace = synthesize("sst2", num_steps=10, tokens_per_step=256, seed=1, num_layers=4)
    trace = dataclasses.replace(trace, meta=dataclasses.replace(trace.meta, model=model.name))
    cluster = _truth(4, units=2.0)
    names = [dataclasses.replace(strategy_from_name(n), min_gain=0.0, replan_interval=1, window=1)
             for n in ("dist:ema", "eplb")]

    def run(c):
        cfg = SimulateConfig(cluster=c, model=model, workload=workload_for_run(run_cfg),
                             strategies=[strategy_from_name("none"), *names], train_steps=3, copy_policy="critical")
        return simulate(trace, cfg, progress=False)

    r = run(cluster)
    exact = 0
    for policy, work, marks in event_steps:
        closed = closed_form_layer_times(work, policy)
        took = marks[:, -1] - marks[:, 0]
        # the closed form is exact unless a port serves two transfers of a layer (then they queue)
        queued = queued_layers(work.copies, len(took))
        assert np.allclose(took[~queued], closed[~queued], rtol=1e-9)
        assert (took[queued] >= closed[queued] - 1e-12).all()
        exact += int((~queued).sum())
    assert exact >= 10
    more = run(dataclasses.replace(cluster, gpu=dataclasses.replace(cluster.gpu, dispatch_overhead_us=1900.0)))
    for a, b in zip(r.strategies, more.strategies):
        assert np.allclose(b.phases["dispatch"] - a.phases["dispatch"], 1e-3), a.name     # +1000 us per layer
    # four GPUs on two processors: shared compute makes the FFN of the busiest GPU no faster than alone
    alone = run(dataclasses.replace(cluster, compute_units_per_node=None))
    for a, s in zip(alone.strategies, r.strategies):
        assert (s.phases["ffn"] >= a.phases["ffn"] - 1e-12).all() and (s.phases["ffn"] > a.phases["ffn"]).any()


def test_the_imbalance_benchmark_routes_as_the_calibration_models_it():
    """runtime.fidelity_bench sends the very tokens moe_gps.fidelity.routing describes (the calibration
    prices them): balanced, every expert T k / E times; with a share f, rank 0's experts take it."""
    torch = pytest.importorskip("torch")
    from moe_gps.fidelity.routing import expert_counts
    from runtime.fidelity_bench import balanced_experts, imbalanced_experts

    T, k, E = 64, 2, 8
    assert np.array_equal(expert_counts(T, k, E, 2), np.full((2, E), T * k / E))
    hot = [0, 1]
    counts = expert_counts(T, k, E, 2, 0.5, hot)
    assert counts[:, hot].sum(axis=1).tolist() == [32 * 2 + 32 * 2 * 2 / 8] * 2     # 32 tokens x 2, + their share
    for rank in range(2):
        ex = imbalanced_experts(T, k, E, rank, 0.5, hot, "cpu")
        assert ex.dtype == torch.int64
        assert np.array_equal(np.bincount(ex.numpy().ravel(), minlength=E), counts[rank])
        assert (ex.numpy() != np.roll(ex.numpy(), 1, axis=1)).all()                     # distinct per token
    assert np.array_equal(balanced_experts(T, k, E, 1, "cpu").numpy(), imbalanced_experts(T, k, E, 1, 0.0, hot, "cpu"))


@pytest.mark.parametrize("per_row_us", [0.0, 3.0])
def test_the_combine_cost_per_row_sent_back_is_fitted_where_the_benchmarks_show_it(per_row_us):
    """The imbalance and balanced model benchmarks' combine on a machine whose combine costs per_row_us
    for every row the busiest rank sends back (plus noise in the imbalance benchmark): the calibration
    finds it (within its interval), or 0 where there is none; the simulator charges it per GPU for the
    rows that GPU took from the others, in the event model's phases and in the planner's time model
    alike."""
    from moe_gps.fidelity.calibrate import combine_return_row, fit_cluster, layout_placement, layouts, make_spec
    from moe_gps.fidelity.routing import expert_counts, rank0_experts
    from sim.planning import time_model
    from sim.work import placement_phases

    N = 4
    run_cfg = parse_run_config(RUN)
    spec = make_spec(run_cfg, N)
    truth = _truth(N)
    truth.gpu.combine_return_row_us = per_row_us
    model = model_for_run(run_cfg)
    hw = Hardware.from_config(truth, model)
    samples = _samples_from(truth, spec, run_cfg, noise=0.0)
    p = layout_placement(spec, N, layouts(spec, N)[0], num_layers=1)
    hot = rank0_experts(p)
    T = spec["imbalance_batch"] * spec["seq_len"]
    rng = np.random.default_rng(3)
    rows = []
    for f in spec["imbalance_fractions"]:
        traffic = route(expert_counts(T, model.top_k, model.num_experts, N, f, hot)[None], p)
        back = traffic[0].sum(axis=0) - np.diag(traffic[0])                       # rows each rank sends back
        t = (alltoall_time(np.swapaxes(traffic, 1, 2), model.token_bytes, hw)
             + combine_host_time(traffic.sum(axis=2), model, hw, back[None]))[0]
        for _ in range(7 * spec["num_layers"]):
            # a rank clearly last does not pay what reaching the combine together costs: each benchmark
            # has an intercept of its own, which must not tilt the slope
            noisy = (t.max() - 3e-4) * (1 + 0.03 * rng.standard_normal())
            rows.extend((float(f), rank, noisy + 1e-4 * rank) for rank in range(N))
    samples["imbalance_combine"] = rows
    got = combine_return_row(samples, spec, N, model, hw)
    assert got["slope_s"] == pytest.approx(per_row_us * 1e-6, abs=got["interval_s"])
    assert got["per_row_s"] == (got["slope_s"] if per_row_us else 0.0)
    cal = fit_cluster({"spec": spec, "info": {"world_size": N, "backend": "gloo", "device": "cpu",
                                              "threads_per_rank": 1, "torch": "x", "interference": 0.0},
                       "samples": samples}, run_cfg)
    assert cal.cluster.gpu.combine_return_row_us == pytest.approx(got["per_row_s"] * 1e6, rel=1e-3)   # 4 digits
    assert "gpu.combine_return_row_us" in cal.fits
    # the simulator: c x (rows g took from the others) in g's combine, nothing else
    c = 2e-6
    src = np.random.default_rng(0).gamma(0.7, 40.0, size=(2, N, 8))
    plan = plan_placement(src.sum(axis=1), N, 4, "eplb")
    with_it, without = (placement_phases(plan, src, None, model, dataclasses.replace(hw, combine_return_row=x))
                        for x in (c, 0.0))
    traffic = route(src, plan)
    back = traffic.sum(axis=1) - np.diagonal(traffic, axis1=1, axis2=2)
    assert with_it.combine - without.combine == pytest.approx(c * back)
    assert np.array_equal(with_it.dispatch, without.dispatch) and np.array_equal(with_it.ffn, without.ffn)
    # one expert mix on every GPU (priced from its counts): the same rows as routing that mix token by token
    mix = np.array([0.4, 0.3, 0.2, 0.1])
    counts = src.sum(axis=1)
    one = [placement_phases(plan, None, None, model, dataclasses.replace(hw, combine_return_row=x), mix,
                            counts=counts) for x in (c, 0.0)]
    full = route(counts[:, None, :] * mix[None, :, None], plan)
    back_mix = full.sum(axis=1) - np.diagonal(full, axis1=1, axis2=2)
    assert one[0].combine - one[1].combine == pytest.approx(c * back_mix)
    layers = np.arange(2)
    tok = plan.slot_loads(src.sum(axis=1))
    per_gpu = [time_model(src, plan.slots_per_gpu, model, dataclasses.replace(hw, combine_return_row=x))
               .evaluate(plan.phy2log, tok, layers)[1] for x in (c, 0.0)]
    assert per_gpu[0] - per_gpu[1] == pytest.approx(c * back)
