"""Serving simulation tied to theory: M/D/1 waiting time, TTFT at low load, conservation of
tokens and requests, the event model and its closed-form shortcut, the KV-cache limit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moe_gps.config import (AttentionSpec, ClusterConfig, GPUSpec, LinkSpec, ModelConfig, SimulateConfig,
                            WorkloadConfig, load_cluster, strategy_from_name)
from moe_gps.config.serving import IterationParts, LengthSpec, RequestWorkload, SchedulerConfig, ServeConfig
from moe_gps.trace import TokensTrace, TraceMeta
from moe_gps.trace.synth import synthesize
from sim.cost import Hardware, attention_time, roofline
from sim.run import simulate
from sim.serving.iteration import DenseParts
from sim.serving.requests import Requests
from sim.serving.run import serve
from sim.serving.scheduler import Scheduler

SMALL = ModelConfig(name="tiny-moe", num_layers=2, num_experts=2, top_k=1, hidden_size=1024,
                    moe_intermediate_size=2048, attention=AttentionSpec(num_heads=8, num_kv_heads=8, head_dim=128))
MIXTRAL_4L = ModelConfig(name="mixtral-4l", num_layers=4, num_experts=8, top_k=2, hidden_size=4096,
                         moe_intermediate_size=14336,
                         attention=AttentionSpec(num_heads=32, num_kv_heads=8, head_dim=128))
PARTS = IterationParts(vocab_size=32000, overhead_us=100.0)


def one_gpu() -> ClusterConfig:
    return ClusterConfig(name="1xA100", num_gpus=1, gpus_per_node=1,
                         gpu=GPUSpec(name="A100", peak_tflops_bf16=312, hbm_bandwidth_gb_s=2039, hbm_capacity_gb=80,
                                     kernel_overhead_us=5),
                         intra_node=LinkSpec(bandwidth_gb_s=300, latency_us=3.4))


def constant_trace(steps: int = 8, tokens: int = 64) -> TokensTrace:
    """Every token of every layer routed to expert 0: every iteration of n tokens costs the same."""
    meta = TraceMeta(kind="tokens", num_layers=SMALL.num_layers, num_experts=SMALL.num_experts, top_k=1,
                     model=SMALL.name, dataset="constant", source="synthetic")
    experts = np.zeros((steps * tokens, SMALL.num_layers, 1), dtype=np.int16)
    return TokensTrace(meta, experts, np.arange(steps + 1, dtype=np.int64) * tokens)


def workload(prompt: LengthSpec, output: LengthSpec, n: int, rate: float = 1.0, **kw) -> RequestWorkload:
    return RequestWorkload(name="test", prompt_tokens=prompt, output_tokens=output, rate=rate, num_requests=n, **kw)


def fixed(v: int) -> LengthSpec:
    return LengthSpec(dist="fixed", value=v)


def serve_config(cluster, model, strategies, w, rates, **kw) -> ServeConfig:
    sim = SimulateConfig(cluster=cluster, model=model,
                         strategies=[strategy_from_name(s) if isinstance(s, str) else s for s in strategies],
                         train_steps=kw.pop("train_steps", 2), copy_policy=kw.pop("copy_policy", "async"))
    return ServeConfig(simulate=sim, workload=w, rates=rates, iteration=kw.pop("iteration", PARTS), **kw)


def test_md1_mean_waiting_time():
    """One GPU, one request at a time, a fixed service time S (a 32-token prompt, one output token),
    Poisson arrivals at load rho = 0.5: the mean wait matches M/D/1, rho S / (2 (1 - rho)), within 5%
    over 10^4 requests."""
    trace = constant_trace()
    sched = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=1)
    probe = serve(trace, serve_config(one_gpu(), SMALL, ["none"], workload(fixed(32), fixed(1), 5, rate=0.01), [0.01],
                                      scheduler=sched), progress=False)
    S = float(probe.rates[0].runs["none"].iterations[0, 1])
    rho = 0.5
    cfg = serve_config(one_gpu(), SMALL, ["none"], workload(fixed(32), fixed(1), 10_000), [rho / S], scheduler=sched)
    rr = serve(trace, cfg, progress=False).rates[0]
    run = rr.runs["none"]
    assert np.allclose(run.iterations[:, 1], S, rtol=1e-12)              # deterministic service
    assert len(run.iterations) == 10_000 and not np.isnan(run.finish).any()
    wait = rr.times["none"].queue
    expected = rho * S / (2 * (1 - rho))
    assert wait.mean() == pytest.approx(expected, rel=0.05)
    # request by request, the waits are Lindley's recursion W_k = max(0, W_{k-1} + S - (a_k - a_{k-1}))
    a = rr.requests.arrival_s
    lindley = np.zeros(len(a))
    for k in range(1, len(a)):
        lindley[k] = max(0.0, lindley[k - 1] + S - (a[k] - a[k - 1]))
    assert np.allclose(wait, lindley, rtol=0, atol=1e-12)
    assert np.allclose(rr.times["none"].ttft, wait + S, rtol=1e-9)       # TTFT = wait + service


def test_low_load_ttft_is_one_prefill():
    """Requests far apart on one GPU: every TTFT is one prefill iteration, i.e. the MoE layers of
    `simulate` for one step of the prompt's tokens + embeddings + LM head for one token + overhead."""
    trace = constant_trace()
    P = 48
    cfg = serve_config(one_gpu(), SMALL, ["none"], workload(fixed(P), fixed(4), 20, rate=0.01), [0.01])
    rr = serve(trace, cfg, progress=False).rates[0]
    ttft = rr.times["none"].ttft
    # the MoE layers as `simulate` times them: one step of P prompt tokens
    sim_cfg = SimulateConfig(cluster=one_gpu(), model=SMALL, strategies=[strategy_from_name("none")],
                             workload=WorkloadConfig(phase="prefill", seq_len=P, tokens_per_step=P), train_steps=2)
    moe = float(simulate(trace, sim_cfg, progress=False).get("none").step_latency[0])
    hw = Hardware.from_config(one_gpu(), SMALL)
    h, V = SMALL.hidden_size, PARTS.vocab_size
    embed = 2 * P * SMALL.token_bytes / hw.hbm + hw.overhead
    head = float(roofline(2 * h * V, V * h * 2 + SMALL.token_bytes + 4 * V, hw)) + hw.overhead
    assert np.allclose(ttft, moe + embed + head + PARTS.overhead_us * 1e-6, rtol=1e-9)
    # and each later token is one decode iteration: TPOT is constant too
    assert np.ptp(rr.times["none"].tpot) < 1e-12


@pytest.fixture(scope="module")
def mixtral_trace():
    return synthesize("mixtral-mmlu", num_steps=8, tokens_per_step=256, seed=5, num_layers=4)


def test_tokens_and_requests_are_conserved(mixtral_trace):
    """Chunked prefill (a small budget), a small KV cache (requests wait for memory), 4 GPUs: every
    request finishes, every token is computed once, every output token comes out once."""
    n = 120
    w = workload(LengthSpec(dist="uniform", min=16, max=700), LengthSpec(dist="uniform", min=1, max=40), n,
                 rate=40.0)
    sched = SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=8, kv_cache_gb=0.3)
    cfg = serve_config(load_cluster("4xA100-nvlink"), MIXTRAL_4L, ["none", "eplb"], w, [40.0], scheduler=sched)
    result = serve(mixtral_trace, cfg, progress=False)
    rr = result.rates[0]
    q = rr.requests
    for name, run in rr.runs.items():
        assert not np.isnan(run.finish).any() and not np.isnan(run.first).any(), name
        assert run.tokens == q.tokens == int(run.iterations[:, 4].sum())
        assert run.generated == int(q.output.sum())
        assert (run.admitted >= q.arrival_s - 1e-12).all() and (run.first > run.admitted).all()
        assert (run.finish >= run.first).all()
        assert (run.finish[q.output == 1] == run.first[q.output == 1]).all()
        its = run.iterations
        assert (its[:, 4] <= 4 * sched.max_num_batched_tokens).all()
        assert (its[:, 5] + its[:, 6] == its[:, 4]).all()
        assert (its[1:, 0] >= its[:-1, 0] + its[:-1, 1] - 1e-12).all()       # one iteration at a time
        # the KV cache of a GPU never holds more than its capacity (requests waited for memory)
        block = sched.block_size
        reserved = -(-(q.prompt + q.output) // block) * block
        for g in range(4):
            mine = run.rank == g
            events = sorted([(t, r) for t, r in zip(run.admitted[mine], reserved[mine])]
                            + [(t, -r) for t, r in zip(run.finish[mine], reserved[mine])], key=lambda e: (e[0], e[1]))
            held = np.cumsum([e[1] for e in events])
            assert held.max() <= run.kv_tokens
        assert (rr.times[name].queue > 0).any()                           # some waited for memory or a seat
    assert len(result.rows()) == 2


def test_closed_form_shortcut_equals_the_event_model(mixtral_trace):
    """Iterations without copies in closed form, the others in the event model, give the same times
    as the event model for every iteration; strategies that copy weights in the background included."""
    w = workload(LengthSpec(dist="uniform", min=32, max=300), LengthSpec(dist="uniform", min=1, max=30), 60,
                 rate=30.0)
    eplb = dataclasses.replace(strategy_from_name("eplb"), replan_interval=5, window=2)
    dist = dataclasses.replace(strategy_from_name("dist:ema"), replan_interval=4, min_gain=0.0)
    cfg = serve_config(load_cluster("4xA100-nvlink"), MIXTRAL_4L, ["none", eplb, dist], w, [30.0])
    fast = serve(mixtral_trace, cfg, progress=False).rates[0]
    full = serve(mixtral_trace, cfg, progress=False, fast=False).rates[0]
    for name in fast.runs:
        a, b = fast.runs[name], full.runs[name]
        assert np.allclose(a.finish, b.finish, rtol=1e-9, atol=0), name
        assert np.allclose(a.iterations, b.iterations, rtol=1e-9, atol=1e-12), name
    assert fast.runs["eplb"].copy_bytes > 0 and fast.runs["eplb"].event_iterations > 0
    assert fast.runs["none"].event_iterations == 0 and full.runs["none"].event_iterations == len(full.runs["none"].iterations)


def test_attention_of_a_mixed_batch_reduces_to_the_step_model():
    """A batch of decodes of equal context, or of whole prompts of equal length, costs what the step
    model's attention_time says for that workload."""
    model, hw = MIXTRAL_4L, Hardware.from_config(load_cluster("4xA100-nvlink"), MIXTRAL_4L)
    dense = DenseParts(model, IterationParts(vocab_size=32000), hw)
    n, ctx = 24, 700
    req = Requests(np.zeros(n), np.full(n, ctx - 5), np.full(n, 50))
    s = Scheduler(req, 1, 4096, 256, 10**7, 16)
    s.prefilled[:] = req.prompt
    s.generated[:] = 5
    s.running = np.arange(n)
    s.rank[:] = 0
    b = s.form(0.0)
    assert not b.prefill.any() and b.tokens == n
    want = attention_time(np.array([n]), model, WorkloadConfig(phase="decode", seq_len=ctx), hw)
    assert np.allclose(dense.attention(s.shape(b)), want, rtol=1e-12)
    # whole prompts of 300 tokens, prefilled in one iteration
    req = Requests(np.zeros(3), np.full(3, 300), np.full(3, 2))
    s = Scheduler(req, 1, 4096, 256, 10**7, 16)
    for k in range(3):
        s.arrive(k)
    b = s.form(0.0)
    assert b.prefill.all() and b.tokens == 900
    want = attention_time(np.array([900]), model, WorkloadConfig(phase="prefill", seq_len=300), hw)
    assert np.allclose(dense.attention(s.shape(b)), want, rtol=1e-12)


def test_scheduler_budget_decodes_first_then_chunks():
    """A 2-GPU scheduler: decodes take 1 token each, the rest of the budget goes to prefill chunks in
    admission order; the arrival goes to the GPU with fewer outstanding requests."""
    req = Requests(np.zeros(4), np.array([100, 30, 500, 10]), np.array([3, 3, 3, 3]))
    s = Scheduler(req, 2, 64, 8, 10**6, 16)
    for k in range(4):
        s.arrive(k)
    assert s.rank.tolist() == [0, 1, 0, 1]
    b = s.form(0.0)
    assert dict(zip(b.ids.tolist(), b.alloc.tolist())) == {0: 64, 1: 30, 3: 10}
    s.complete(b, 1.0)
    assert s.first[1] == 1.0 and s.first[3] == 1.0 and np.isnan(s.first[0])
    b = s.form(1.0)
    # GPU 0: request 0 still prefilling (36 left), then 2 takes the 28 left; GPU 1: two decodes
    assert dict(zip(b.ids.tolist(), b.alloc.tolist())) == {0: 36, 2: 28, 1: 1, 3: 1}
    assert b.prefill.tolist() == [True, True, False, False]


def test_the_serving_verdict_says_when_the_best_duplicating_strategy_changes_nothing():
    from sim.serving.metrics import verdict_line
    from sim.verdict import compare

    none = np.array([10.0, 10.2, 9.9, 10.1, 10.0, 10.3, 9.8, 10.0])
    same = compare({"none": none, "a": none.copy(), "b": none * 1.2}, "none", seed=0)
    assert verdict_line(same, on_goodput=False).startswith(
        "verdict (mean end-to-end latency): none (no duplication) is the best deployable strategy; no duplicating "
        "strategy is better: the best, a, gives the same on every one of the 8 requests")
    slower = compare({"none": none, "a": none * 1.01}, "none", seed=0)
    assert "the best duplicating one, a, is 0.990x none's speed (95% CI" in verdict_line(slower, on_goodput=False)


def test_the_serving_verdict_says_how_far_behind_the_next_strategy_is_when_it_has_no_tie():
    """Paired over the same requests: b misses the SLO on one request in every 5 that a meets it on, so every
    block of 5 requests tells them apart, and the line says by how much (20% fewer requests)."""
    from sim.serving.metrics import verdict_line
    from sim.verdict import compare

    none = np.zeros(20)
    none[::2] = 1.0                                   # none meets the SLO for 10 of 20 requests
    a = np.ones(20)
    b = a.copy()
    b[1::5] = 0.0
    v = compare({"none": none, "a": a, "b": b}, "none", seed=0, higher_is_better=True)
    assert v.strategy == "a" and v.ties == []
    line = verdict_line(v, on_goodput=True)
    assert line.endswith("; the next, b, meets the SLO for 20.00% fewer of the same requests (95% CI 20.00-20.00%)")


def test_the_serving_gap_is_of_the_shares_met_when_none_meets_the_slo_for_no_request():
    """Without a request of none's within the SLO the verdict compares shares + 1/n (a finite ratio); how far
    behind the next is stays a ratio of the shares themselves: 17 of 100 against 34 is 50% fewer (of the
    shifted shares it would be 48.6%)."""
    from types import SimpleNamespace

    from moe_gps.config.serving import SLOConfig
    from sim.serving.metrics import serving_verdict, verdict_line

    n = 100
    met = {"none": np.zeros(n), "a": np.zeros(n), "b": np.zeros(n)}
    met["a"][::3] = 1.0
    met["b"][::6] = 1.0
    times = {s: SimpleNamespace(met=lambda slo, m=m: m.astype(bool), e2e=np.ones(n)) for s, m in met.items()}
    v, on_goodput = serving_verdict(times, ["none", "a", "b"], "none", SLOConfig(ttft_ms=100.0), 0)
    assert on_goodput and v.strategy == "a"
    assert v.ties == [] and v.runner_up["vs_winner"][0] == pytest.approx(0.5)
    assert "the next, b, meets the SLO for 50.00% fewer of the same requests" in verdict_line(v, True)


def test_the_serving_line_names_the_ties_that_serve_every_request_as_the_winner():
    from sim.serving.metrics import verdict_line
    from sim.verdict import compare

    none = np.array([10.0, 10.2, 9.9, 10.1, 10.0, 10.3, 9.8, 10.0])
    v = compare({"none": none, "a": none / 1.1, "b": none / 1.1}, "none", seed=0)
    assert v.same_as_winner == ["b"]
    assert verdict_line(v, on_goodput=False).endswith(
        "ties within the interval: b (b takes its time on every one of the 8 requests: their plans route alike, so "
        "which is named is only the order they are listed in)")
