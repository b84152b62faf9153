"""Every cost term against values worked out by hand (docs/simulator.md, "Cost model").

The test cluster has round numbers: 4 GPUs, 2 per node; 100 TFLOP/s; 1000 GB/s HBM;
2 µs kernel overhead; NVLink 100 GB/s and 1 µs per message; network 10 GB/s and 5 µs.
The test model: hidden 1000, expert FFN 2000 (3 matrices, so 6M weights = 12 MB per
expert), 8 query heads, 2 KV heads, head dim 125 (2.5M attention weights, KV 1000 B per
token per layer).
"""

from __future__ import annotations

import numpy as np
import pytest

from moe_gps.predict import PredictorCost

from moe_gps.config.schema import (AttentionSpec, ClusterConfig, GPUSpec, LinkSpec, ModelConfig,
                                   WorkloadConfig)
from moe_gps.placement import Placement
from sim.cost import (Hardware, alltoall_time, attention_time, expert_slot_time, ffn_time, layout_time,
                      predictor_time, transfer_time)
from sim.loads import source_counts
from sim.work import moves_weights, route, share_by_gpu, weight_copies

US = 1e-6

CLUSTER = ClusterConfig(
    name="test", num_gpus=4, gpus_per_node=2,
    gpu=GPUSpec(name="t", peak_tflops_bf16=100, hbm_bandwidth_gb_s=1000, hbm_capacity_gb=80,
                kernel_overhead_us=2, peak_tflops_fp8=200),
    intra_node=LinkSpec(bandwidth_gb_s=100, latency_us=1), inter_node=LinkSpec(bandwidth_gb_s=10, latency_us=5))
MODEL = ModelConfig(name="t", num_layers=2, num_experts=4, top_k=2, hidden_size=1000,
                    moe_intermediate_size=2000, attention=AttentionSpec(num_heads=8, num_kv_heads=2, head_dim=125))
HW = Hardware.from_config(CLUSTER, MODEL)


def test_hardware_rates():
    assert HW.flops == 1e14 and HW.hbm == 1e12 and HW.overhead == 2 * US
    assert (HW.intra_bw, HW.intra_lat, HW.inter_bw, HW.inter_lat) == (1e11, 1 * US, 1e10, 5 * US)
    assert HW.node_of_gpu.tolist() == [0, 0, 1, 1]
    fp8 = Hardware.from_config(CLUSTER, ModelConfig(**{**MODEL.__dict__, "compute_dtype": "fp8"}))
    assert fp8.flops == 2e14


def test_model_sizes():
    assert MODEL.expert_params == 6_000_000 and MODEL.expert_bytes == 12e6
    assert MODEL.attention_params == 1000 * 125 * (16 + 4) == 2_500_000
    assert MODEL.kv_bytes_per_token == 1000.0
    assert MODEL.token_bytes == 2000.0


def test_attention_prefill_and_decode():
    # prefill, seq_len 99 -> mean context 50:
    #   FLOPs = 2*100*2.5e6 + 4*100*50*8*125 = 5.2e8 -> 5.2 us
    #   bytes = 2.5e6*2 + 100*1000 (KV written) + 2*100*2000 = 5.5e6 -> 5.5 us;  + 2 us overhead
    t = attention_time(np.array([100.0, 0.0]), MODEL, WorkloadConfig(phase="prefill", seq_len=99), HW)
    assert t == pytest.approx([7.5 * US, 0.0])
    # decode, 1000 tokens of context: FLOPs = 5e8 + 4*100*1000*1000 = 9e8 -> 9 us;
    #   bytes = 5e6 + 100*1000*1000 (KV read) + 4e5 = 1.054e8 -> 105.4 us;  + 2 us
    t = attention_time(100.0, MODEL, WorkloadConfig(phase="decode", seq_len=1000), HW)
    assert t == pytest.approx(107.4 * US)


def test_shared_expert_adds_to_attention():
    shared = ModelConfig(**{**MODEL.__dict__, "num_shared_experts": 1})
    assert shared.shared_params == 6_000_000
    # prefill seq 99, n = 1000: FLOPs = 2*1000*(2.5e6 + 6e6) + 4*1000*50*1000 = 1.72e10 -> 172 us;
    # bytes = 8.5e6*2 + 1000*1000 + 2*1000*2000 = 2.2e7 -> 22 us; + 2 us
    t = attention_time(1000.0, shared, WorkloadConfig(seq_len=99), HW)
    assert t == pytest.approx(174 * US)


def test_expert_ffn_roofline():
    # 100 tokens: FLOPs 2*100*6e6 = 1.2e9 -> 12 us; bytes 12e6 + 2*100*2000 = 1.24e7 -> 12.4 us (memory bound)
    # 1000 tokens: FLOPs 1.2e10 -> 120 us; bytes 1.6e7 -> 16 us (compute bound)
    assert expert_slot_time(np.array([100.0, 1000.0, 0.0]), MODEL, HW) == pytest.approx([12.4 * US, 120 * US, 0])
    # two slots per GPU: GPU 0 holds slots with 100 and 1000 tokens, GPU 1 holds two idle slots
    t = ffn_time(np.array([[100.0, 1000.0, 0.0, 0.0]]), 2, MODEL, HW)
    assert t[0] == pytest.approx([(12.4 + 120 + 2) * US, 0.0])


def test_alltoall_per_gpu():
    # tokens from row GPU to column GPU; 2000 bytes per token; GPUs 0,1 on node 0 and 2,3 on node 1
    traffic = np.array([[1000, 10, 20, 0],
                        [0, 0, 0, 0],
                        [0, 0, 0, 0],
                        [5, 0, 0, 0]], dtype=float)
    t = alltoall_time(traffic, 2000.0, HW)
    # GPU 0: NVLink 10 tokens -> 0.2 us + 1 peer x 1 us = 1.2;  network: max(send 20, recv 5) = 20 tokens
    #        -> 4 us + 2 peers x 5 us = 14;  the fabrics overlap -> 14 us (its own 1000 tokens stay local)
    # GPU 1: receives 10 over NVLink -> 1.2 us;  GPU 2: receives 20 -> 4 + 5 = 9 us;  GPU 3: sends 5 -> 1 + 5 = 6 us
    assert t == pytest.approx([14 * US, 1.2 * US, 9 * US, 6 * US])
    assert alltoall_time(np.stack([traffic, traffic.T]), 2000.0, HW).shape == (2, 4)
    # the layout exchange: 1 NVLink peer x 1 us + 2 network peers x 5 us
    assert layout_time(HW) == pytest.approx([11 * US] * 4)


def test_transfer_and_predictor():
    # one expert (12 MB): over NVLink 120 us + 1 us; over the network 1200 us + 5 us
    assert transfer_time(np.array([12e6, 12e6, 0.0]), np.array([True, False, True]), HW) == \
        pytest.approx([121 * US, 1205 * US, 0.0])
    # 100 tokens x 1e6 FLOPs = 1e8 -> 1 us; bytes 1e6 + 100 x 1e3 = 1.1e6 -> 1.1 us; + 2 us
    cost = PredictorCost(flops_per_token=1e6, bytes_per_token=1e3, fixed_bytes_per_step=1e6)
    assert predictor_time(np.array([100.0, 0.0]), cost, HW) == pytest.approx([3.1 * US, 0.0])
    assert predictor_time(np.array([100.0]), PredictorCost(), HW) == pytest.approx([0.0])
    # a fixed 1e9 FLOPs per step on top: 1.1e9 FLOPs -> 11 us (now compute bound), + 2 us
    more = PredictorCost(flops_per_token=1e6, bytes_per_token=1e3, fixed_bytes_per_step=1e6, fixed_flops_per_step=1e9)
    assert predictor_time(np.array([100.0]), more, HW) == pytest.approx([13 * US])
    # the latency term: 512 serial steps of 5 us (an LSTM over a 512-token prompt) add 2.56 ms
    lstm = PredictorCost(flops_per_token=1e6, bytes_per_token=1e3, fixed_bytes_per_step=1e6, serial_steps=512,
                         step_latency_s=5 * US)
    assert lstm.latency_s == pytest.approx(2560 * US)
    assert predictor_time(np.array([100.0, 0.0]), lstm, HW) == pytest.approx([(3.1 + 2560) * US, 0.0])
    assert lstm.time_s(100, 1e14, 1e12) == pytest.approx(1.1e-6 + 2560 * US)
    assert predictor_time(np.array([100.0]), PredictorCost(serial_steps=1, step_latency_s=50 * US), HW) \
        == pytest.approx([52 * US])                             # a host predictor: one round trip


def test_route_splits_by_replica_share():
    # 2 GPUs, every expert on both: GPU 0 slots hold experts (0, 1), GPU 1 slots hold (1, 0)
    p = Placement(np.array([[0, 1, 1, 0]]), num_gpus=2, num_experts=2)
    src = np.array([[[10.0, 4.0], [6.0, 0.0]]])          # [L=1, home GPU, expert]
    t = route(src, p)
    # each expert's tokens split half/half: GPU 0 sends 5+2 to each GPU, GPU 1 sends 3 to each
    assert t[0].tolist() == [[7.0, 7.0], [3.0, 3.0]]
    assert np.allclose(t, src @ share_by_gpu(p))
    uneven = Placement(np.array([[0, 1, 1, 0]]), 2, 2, replica_share=np.array([[0.9, 0.5, 0.5, 0.1]]))
    # expert 0 goes 0.9/0.1, expert 1 0.5/0.5
    assert route(src, uneven)[0].ravel() == pytest.approx([9 + 2, 1 + 2, 5.4, 0.6])



def test_route_of_random_placements_equals_the_matrix_product():
    rng = np.random.default_rng(4)
    L, G, E, S = 3, 4, 10, 3
    src = rng.integers(0, 20, (L, G, E)).astype(np.float64)
    phy2log = np.stack([rng.permutation(np.r_[np.arange(E), rng.integers(0, E, G * S - E)]) for _ in range(L)])
    share = rng.random(phy2log.shape)
    total = np.stack([np.bincount(phy2log[layer], weights=share[layer], minlength=E) for layer in range(L)])
    p = Placement(phy2log, G, E, replica_share=share / np.take_along_axis(total, phy2log, axis=1))
    for counts in (src, np.ascontiguousarray(np.swapaxes(src, 1, 2)).swapaxes(1, 2)):   # either memory layout
        assert np.allclose(route(counts, p), counts @ share_by_gpu(p))


def test_source_counts_by_home_gpu_in_any_token_order_and_with_a_mask():
    rng = np.random.default_rng(5)
    T, L, k, G, E = 40, 3, 2, 4, 6
    experts = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(L)]) for _ in range(T)])
    for home in (np.repeat(np.arange(G), T // G), rng.integers(0, G, T), np.full(T, 2)):
        for mask in (None, rng.random((T, L, k)) < 0.6):
            want = np.zeros((L, G, E))
            for t in range(T):
                for layer in range(L):
                    for j in range(k):
                        if mask is None or mask[t, layer, j]:
                            want[layer, home[t], experts[t, layer, j]] += 1
            got = source_counts(experts, home, G, E, mask)
            assert np.array_equal(got, want)
            assert got.strides[1] < got.strides[2]               # laid out by expert: route reads its rows

def test_weight_copies_prefer_the_same_node():
    # 4 GPUs x 2 slots; before: GPU0 (0,1) GPU1 (2,3) GPU2 (0,1) GPU3 (2,3); layer 1 unchanged
    before = Placement(np.array([[0, 1, 2, 3, 0, 1, 2, 3]] * 2), 4, 4)
    after = Placement(np.array([[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1, 2, 3]]), 4, 4)
    c = weight_copies(before, after, MODEL.expert_bytes, HW)
    # GPU 3 now hosts expert 0: holders were GPUs 0 and 2; GPU 2 shares its node -> one NVLink copy
    assert (c.layer.tolist(), c.src.tolist(), c.dst.tolist()) == ([0], [2], [3])
    assert c.bytes.tolist() == [12e6] and c.seconds == pytest.approx([121 * US])
    assert len(weight_copies(None, after, MODEL.expert_bytes, HW)) == 0
    assert len(weight_copies(after, after, MODEL.expert_bytes, HW)) == 0


def test_weight_copies_within_a_gpu_and_moves():
    before = Placement(np.array([[0, 1, 2, 3, 0, 1, 2, 3]]), 4, 4)
    # GPU 0 swaps its two slots (both old rows copied aside, then each copied into the other slot: 4 copies
    # between slots); GPU 3 gets expert 1 in both slots: one transfer (from GPU 2, same node) and one copy
    # between its slots
    after = Placement(np.array([[1, 0, 2, 3, 0, 1, 1, 1]]), 4, 4, allow_colocated=True)
    c = weight_copies(before, after, MODEL.expert_bytes, HW)
    rows = sorted(zip(c.layer.tolist(), c.src.tolist(), c.dst.tolist(), c.bytes.tolist(), c.seconds.tolist()))
    local = 2 * 12e6 / 1e12                                              # read + write at 1000 GB/s: 24 us
    assert [r[:4] for r in rows] == [(0, 0, 0, 0.0), (0, 2, 3, 12e6), (0, 3, 3, 0.0)]
    assert [r[4] for r in rows] == pytest.approx([4 * local, 121 * US, local])
    # a re-plan to the same slots (a new object) copies nothing and moves no weights
    same = Placement(before.phy2log.copy(), 4, 4)
    assert len(weight_copies(before, same, MODEL.expert_bytes, HW)) == 0
    assert not moves_weights(before, same) and moves_weights(before, after)
    # background copies at half the copy bandwidth: the transfer takes twice as long, plus the latency
    half = weight_copies(before, after, MODEL.expert_bytes, HW, background_share=0.5)
    link = half.src != half.dst
    assert half.seconds[link] == pytest.approx([2 * 12e6 / 1e11 + 1 * US])
    # slots per GPU changed: every slot is rewritten (a new buffer)
    grown = Placement(np.array([[0, 1, 2, 2, 3, 3, 0, 1, 1, 2, 3, 0]]), 4, 4, allow_colocated=True)
    c = weight_copies(before, grown, MODEL.expert_bytes, HW)
    link = c.src != c.dst
    per_gpu = np.bincount(c.dst[~link], weights=c.seconds[~link], minlength=4)
    received = np.bincount(c.dst[link], weights=c.bytes[link], minlength=4) / 12e6
    assert per_gpu == pytest.approx((3 - received) * local)


def test_weight_copies_count_the_rows_copied_aside_before_they_are_overwritten():
    # 4 GPUs x 2 slots: GPU 0 and GPU 1 swap the experts of their slot 0 (one transfer each way). Each slot 0 is
    # sent and overwritten: moved with the slot writes (critical), each GPU copies it aside first (one row);
    # in the background (async), the sends are done before the install: no row is copied
    before = Placement(np.array([[0, 1, 2, 3, 4, 5, 6, 7]]), 4, 8)
    after = Placement(np.array([[2, 1, 0, 3, 4, 5, 6, 7]]), 4, 8)
    local = 2 * 12e6 / 1e12
    for share, rows in ((None, 1), (0.5, 0)):
        c = weight_copies(before, after, MODEL.expert_bytes, HW, background_share=share)
        link = c.src != c.dst
        assert sorted(zip(c.src[link].tolist(), c.dst[link].tolist())) == [(0, 1), (1, 0)]
        per_gpu = np.bincount(c.dst[~link], weights=c.seconds[~link], minlength=4)
        assert per_gpu == pytest.approx([rows * local] * 2 + [0, 0])


def test_collective_skew_falls_with_the_arrival_gap_and_defaults_to_a_constant():
    import dataclasses

    from sim.cost import arrival_gap, collective_skew

    arrival = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 3.0, 1.0, 2.5], [0.0, 0.0, 0.0, 9.0]]) * 1e-3     # [L, G]
    assert arrival_gap(arrival) == pytest.approx([0.0, 0.5e-3, 9e-3])
    const = dataclasses.replace(HW, collective_skew=200 * US)
    assert collective_skew(arrival, const) == pytest.approx([200 * US] * 3)   # no floor / gap: the old constant
    hw = dataclasses.replace(HW, collective_skew=200 * US, skew_floor=0.25, skew_gap=1e-3)
    want = 200 * US * (0.25 + 0.75 * np.exp(-np.array([0.0, 0.5, 9.0])))
    assert collective_skew(arrival, hw) == pytest.approx(want)
    c = dataclasses.replace(CLUSTER, collective_skew_us=200.0, collective_skew_floor=0.25,
                            collective_skew_gap_us=1000.0)
    h = Hardware.from_config(c, MODEL)
    assert (h.skew_floor, h.skew_gap) == (0.25, pytest.approx(1e-3))


def test_a_dispatch_keeps_no_more_skew_than_the_combine_before_it():
    """GPUs that all waited in a combine for one last GPU leave it together: the next layer's dispatch
    has that combine's skew, not the balanced one; the first layer's dispatch keeps the balanced skew."""
    import dataclasses

    from sim.cost import collective_skew
    from sim.work import placement_phases

    hw = dataclasses.replace(HW, collective_skew=200 * US, skew_floor=0.0, skew_gap=5 * US)
    p = Placement(np.array([[0, 1, 2, 3]] * 2), 4, 4)          # expert e on GPU e, 2 layers
    src = np.zeros((2, 4, 4))
    src[:, :, 0] = 400.0                      # every GPU's tokens to expert 0: GPU 0 computes, the others wait
    src[:, :, 1:] = 1.0
    ph = placement_phases(p, src, None, MODEL, hw)
    comb = collective_skew(ph.ffn, hw)        # [L]: GPU 0 far last, so far below the balanced skew
    assert comb.max() < 0.1 * hw.collective_skew
    assert ph.skew[:, 2] == pytest.approx(comb)
    assert ph.skew[:, 0] == pytest.approx([hw.collective_skew, comb[0]])
    # balanced routing: every collective at the balanced skew, as before
    even = placement_phases(p, np.full((2, 4, 4), 8.0), None, MODEL, hw)
    assert even.skew[:, [0, 2]] == pytest.approx(np.full((2, 2), hw.collective_skew))


def test_a_predictor_beside_the_attention_shares_its_compute():
    """What a predictor run beside the attention adds: nothing while both fit in the attention's time,
    what it sticks out when it is the longer, and at least their compute times added when the two
    together need more compute than the attention's time holds."""
    from sim.cost import beside_attention

    ovh = HW.attn_overhead
    # a light predictor beside a memory-bound attention (100 us, 20 us of it compute): hidden
    assert beside_attention(100e-6, 20e-6, 30e-6, 10e-6, HW) == pytest.approx(0.0)
    # a predictor longer than the attention: what sticks out
    assert beside_attention(100e-6, 20e-6, 150e-6, 40e-6, HW) == pytest.approx(50e-6)
    # both compute bound: 90 + 80 us of compute (+ the attention's fixed time) do not fit in 100 us
    assert beside_attention(100e-6, 90e-6, 85e-6, 80e-6, HW) == pytest.approx(90e-6 + ovh + 80e-6 - 100e-6)
    # elementwise, and nothing on a GPU without tokens
    got = beside_attention(np.array([0.0, 100e-6]), np.array([0.0, 90e-6]), np.array([0.0, 85e-6]),
                           np.array([0.0, 80e-6]), HW)
    assert got == pytest.approx([0.0, 70e-6 + ovh])


def test_copies_charge_one_latency_per_expert_transferred():
    assert transfer_time(np.array([24e6]), np.array([True]), HW, transfers=np.array([2])) == \
        pytest.approx(24e6 / HW.intra_copy_bw + 2 * HW.intra_copy_lat)
