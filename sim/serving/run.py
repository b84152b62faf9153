"""Serve a request workload under every strategy of a :class:`ServeConfig`: :func:`serve`.

1. check the model against the trace; make every default explicit (strategies and their
   re-plan policies as ``simulate`` does, vocabulary and dense layers, the rates);
2. per rate: draw the requests (the same for every strategy); per strategy: prepare it on
   the trace's training steps, compute its GPUs' KV capacity, and run the SimPy server
   (:func:`sim.serving.server.run_server`) on the trace's test tokens;
3. per rate: latencies, throughput, goodput (:mod:`sim.serving.metrics`) and the verdict.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field


from moe_gps.config.loader import check_combination, check_model_matches_trace
from moe_gps.config.schema import VLLM_STEP_INTERVAL, VLLM_WINDOW_SIZE, WorkloadConfig
from moe_gps.config.serving import ServeConfig
from moe_gps.errors import StrategyError, UserError
from moe_gps.trace.data import CountsTrace, TokensTrace
from moe_gps.workers import fork_map, forking
from sim.cost import Hardware
from sim.loads import counts_view
from sim.run import STRATEGY_WORK, default_train_steps, resolve_config
from sim.serving.iteration import DenseParts, MoELayers, kv_capacity, resolve_parts
from sim.serving.metrics import RequestTimes, latency_row, serving_verdict
from sim.serving.requests import Requests, generate_requests
from sim.serving.server import ServerRun, run_server
from sim.serving.stream import TokenStream
from sim.strategies import SimContext, make_strategy
from sim.verdict import Verdict


@dataclass
class RateResult:
    """One rate: its requests, every strategy's run and request times, the verdict (``on_goodput``: it
    compared SLO attainment, else mean end-to-end latency)."""

    rate: float
    requests: Requests
    runs: dict[str, ServerRun]
    times: dict[str, RequestTimes]
    verdict: Verdict | None
    on_goodput: bool = False
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class ServeResult:
    config: ServeConfig
    rates: list[RateResult]
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """One row per (rate, strategy): :func:`sim.serving.metrics.latency_row` and run facts."""
        out = []
        slo = self.config.slo
        for rr in self.rates:
            for s in self.config.simulate.strategies:
                name = s.name
                run = rr.runs[name]
                row = {"rate_rps": rr.rate, "strategy": name, "kind": s.kind, "requests": len(rr.requests)}
                row.update(latency_row(rr.times[name], rr.requests, slo))
                its = run.iterations
                row.update(iterations=len(its), mean_batch_tokens=float(its[:, 4].mean()) if len(its) else 0.0,
                           mean_iteration_ms=float(its[:, 1].mean() * 1e3) if len(its) else 0.0,
                           moe_share=float(its[:, 2].sum() / its[:, 1].sum()) if len(its) else 0.0,
                           kv_tokens_per_gpu=run.kv_tokens, copied_gb=run.copy_bytes / 1e9,
                           event_iterations=run.event_iterations, stream_laps=run.stream_laps,
                           sim_seconds=rr.seconds.get(name, 0.0))
                out.append(row)
        return out


def resolve_serve_config(config: ServeConfig, trace, trace_name: str) -> tuple[ServeConfig, int, list[str]]:
    """Every default made explicit, so that the config.yaml beside the results reruns the same
    simulation -> (config, training steps, notes)."""
    sim_cfg = config.simulate
    if not sim_cfg.strategies:
        raise UserError("no strategies to serve")
    m = trace.meta
    check_model_matches_trace(sim_cfg.model, m.num_layers, m.num_experts, m.top_k, trace_name)
    train = default_train_steps(sim_cfg, trace.num_steps)
    # EPLB re-plans as vLLM does, counting iterations (its window counts the trace steps seen, docs/serving.md)
    sim_cfg = dataclasses.replace(sim_cfg, strategies=[
        dataclasses.replace(s, replan_interval=VLLM_STEP_INTERVAL if s.replan_interval is None else s.replan_interval,
                            window=VLLM_WINDOW_SIZE if s.window is None else s.window) if s.kind == "static" else s
        for s in sim_cfg.strategies])
    sim_cfg, notes = resolve_config(sim_cfg, train, trace_name)
    rates = list(config.rates) or ([config.workload.rate] if config.workload.rate is not None else [])
    if not rates and config.workload.arrival.process != "csv":
        raise UserError(f"workload {config.workload.name}: no request rate; give --rate R (requests/s) or set rate:")
    parts = resolve_parts(config.iteration, sim_cfg.model)
    return dataclasses.replace(config, simulate=sim_cfg, rates=rates, iteration=parts), train, notes


def _run_one(job: tuple[int, int], sh: dict) -> tuple[int, int, ServerRun, float]:
    """Run strategy ``job[1]`` on the requests of rate ``job[0]`` (in this process or a forked worker;
    ``sh``: what the runs of one :func:`serve` call share)."""
    from tqdm import tqdm

    r, k = job
    config, req, ctx = sh["config"], sh["requests"][r], sh["ctx"][r]
    sim_cfg, sched, parts = config.simulate, config.scheduler, config.iteration
    cfg = sim_cfg.strategies[k]
    t0 = time.perf_counter()
    try:
        st = make_strategy(cfg, ctx, sim_cfg.seed, cfg.resolved_policy(sh["train"]))
        st.prepare(sh["trace"], sh["train"], sh["counts"])
    except UserError as err:                  # a predictor's or planner's option: say whose (as simulate does)
        raise StrategyError(k, cfg.resolved_name(), str(err)) from None
    bar = tqdm(total=len(req), desc=f"serve {sh['rates'][r]:g} req/s {cfg.name}", unit="req",
               disable=not sh["bars"], file=sys.stderr)
    run = run_server(req, TokenStream(sh["trace"], sh["train"]), MoELayers(st, ctx, sh["fast"]), sh["dense"],
                     ctx.num_gpus, sched.max_num_batched_tokens, sched.max_num_seqs, sh["kv"][k], sched.block_size,
                     parts.overhead_us * 1e-6, on_finish=bar.update)
    bar.close()
    return r, k, run, time.perf_counter() - t0


def serve(trace: TokensTrace | CountsTrace, config: ServeConfig, progress: bool | None = None,
          trace_name: str = "trace", fast: bool = True, jobs: int = 1) -> ServeResult:
    """Serve ``config.workload`` at each of ``config.rates`` under every strategy; deterministic for
    the seed, whatever ``jobs`` (processes running (rate, strategy) runs at once). ``fast=False`` runs
    the event model for every iteration (no closed-form shortcut)."""
    config, train, notes = resolve_serve_config(config, trace, trace_name)
    sim_cfg, sched, parts = config.simulate, config.scheduler, config.iteration
    cluster, model = sim_cfg.cluster, sim_cfg.model
    G, E = cluster.num_gpus, model.num_experts
    TokenStream(trace, train, trace_name)                      # a tokens trace with test tokens, or a clear error
    check_combination(cluster, model, WorkloadConfig(), sim_cfg.strategies, float(sched.max_num_batched_tokens * G))
    hw = dataclasses.replace(Hardware.from_config(cluster, model), weight_reads=sim_cfg.ffn_weight_reads,
                             predictor_overlap=sim_cfg.predictor_overlap)
    kv = [kv_capacity(cluster, model, parts, sched, (E + s.resolved_redundant(G, E)) // G) for s in sim_cfg.strategies]
    requests, rates, ctxs = [], [], []
    for rate in (config.rates or [None]):
        req = generate_requests(config.workload, rate, config.workload.num_requests, sim_cfg.seed)
        longest = int((req.prompt + req.output).max())
        need = int(-(-longest // sched.block_size) * sched.block_size)
        for s, cap in zip(sim_cfg.strategies, kv):
            if need > cap:
                raise UserError(f"strategy {s.name}: a request of {longest} tokens (prompt + output; {need} in whole "
                                f"KV blocks of {sched.block_size}) does not fit the KV cache of one GPU ({cap} tokens "
                                f"with {(E + s.resolved_redundant(G, E)) // G} expert slots per GPU); shorten the "
                                "workload's lengths or give a larger KV cache (scheduler.kv_cache_gb, --kv-cache-gb)")
        requests.append(req)
        rates.append(float(req.rate))
        # the attention time re-plans assume when they price their copies: decodes at the mean context
        mean_ctx = max(1, int(round(float((req.prompt + req.output / 2).mean()))))
        ctxs.append(SimContext(G, E, model.top_k, hw, model, WorkloadConfig(phase="decode", seq_len=mean_ctx),
                               sim_cfg.copy_policy, sim_cfg.copy_bandwidth_share))
    # the slowest runs first (the strategies with the most work per step; low rates have the most
    # iterations), so that parallel workers finish together
    todo = sorted(((r, k) for r in range(len(rates)) for k in range(len(sim_cfg.strategies))),
                  key=lambda j: (-STRATEGY_WORK.get(sim_cfg.strategies[j[1]].kind, 1), rates[j[0]]))
    show = sys.stderr.isatty() if progress is None else bool(progress)
    shared = dict(config=config, trace=trace, train=train, counts=counts_view(trace), requests=requests, rates=rates,
                  ctx=ctxs, kv=kv, fast=fast, dense=DenseParts(model, parts, hw))
    with forking(min(int(jobs), len(todo))) as workers:
        shared["bars"] = show and workers == 1
        done = list(_map(_run_one, todo, workers, show, shared))
    runs = {(r, k): (run, sec) for r, k, run, sec in done}
    results = []
    names = [s.name for s in sim_cfg.strategies]
    deployable = [s.name for s in sim_cfg.strategies if s.deployable]
    base = next((s.name for s in sim_cfg.strategies if s.kind == "none"), None)
    for r, (rate, req) in enumerate(zip(rates, requests)):
        mine = {names[k]: runs[(r, k)][0] for k in range(len(names))}
        times = {n: RequestTimes.of(req, x.admitted, x.first, x.finish) for n, x in mine.items()}
        verdict, on_goodput = serving_verdict(times, deployable, base, config.slo, sim_cfg.seed)
        results.append(RateResult(rate, req, mine, times, verdict, on_goodput,
                                  {names[k]: runs[(r, k)][1] for k in range(len(names))}))
    laps = max(x.stream_laps for rr in results for x in rr.runs.values())
    if laps > 1:
        notes.append(f"the trace's test tokens ({TokenStream(trace, train).size:,}) were not enough for the requests: "
                     f"the stream started again from its first token (up to {laps:.1f} passes)")
    if any(s.kind == "oracle" for s in sim_cfg.strategies):
        notes.append("oracle: it knows each iteration's routing, but plans ahead over trace steps, which serving "
                     "iterations do not follow; a reference, not a bound, in serving")
    return ServeResult(config, results, notes)


def _map(fn, items: list, jobs: int, progress: bool, shared: dict):
    """``fn(item, shared)`` over ``items``, in this process or in ``jobs`` forked processes (a bar over
    items then; in one process, each run has its own bars)."""
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc="serve", unit="run", disable=not progress or jobs == 1, file=sys.stderr)
    try:
        for res in fork_map(fn, items, jobs, shared):
            bar.update(1)
            yield res
    finally:
        bar.close()
