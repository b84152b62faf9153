"""One strategy serving one request stream: the SimPy model of arrivals, queueing and batching.

Two processes share one SimPy environment: *arrivals* hands each request to the scheduler
at its arrival time and wakes the server if it is idle; the *server* forms a batch
(:class:`~sim.serving.scheduler.Scheduler`), takes the iteration's tokens from the trace
stream (:class:`~sim.serving.stream.TokenStream`), asks the strategy and the cost model
how long the iteration takes (:mod:`sim.serving.iteration`), lets that time pass, and
advances the requests. It stops when every request has finished: none is lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import simpy

from sim.serving.iteration import DenseParts, MoELayers
from sim.serving.requests import Requests
from sim.serving.scheduler import Scheduler
from sim.serving.stream import TokenStream

#: per-iteration columns recorded (seconds and counts)
ITERATION_COLUMNS = ("start_s", "time_s", "moe_s", "dense_s", "tokens", "prefill_tokens", "decode_tokens",
                     "running", "waiting")


@dataclass
class ServerRun:
    """What one strategy did with one request stream.

    admitted, first, finish: float [n] seconds (admission, first token, last token) per request;
    rank: int [n] the GPU of each request;  iterations: float [I, len(ITERATION_COLUMNS)];
    tokens: tokens computed (prefill and fed-back tokens);  generated: output tokens produced;
    stream_laps: passes over the trace's test tokens;  kv_tokens: KV capacity of one GPU;
    event_iterations: iterations run by the event model (the rest in closed form)
    """

    admitted: np.ndarray
    first: np.ndarray
    finish: np.ndarray
    rank: np.ndarray
    iterations: np.ndarray
    tokens: int
    generated: int
    stream_laps: float
    kv_tokens: int
    event_iterations: int
    copy_bytes: float


def run_server(requests: Requests, stream: TokenStream, moe: MoELayers, dense: DenseParts, num_gpus: int,
               max_num_batched_tokens: int, max_num_seqs: int, kv_tokens: int, block_size: int,
               overhead_s: float, on_finish=None) -> ServerRun:
    """Serve ``requests`` until the last one finishes (module docstring); ``on_finish(k)`` is called
    with the number of requests each iteration finished (progress)."""
    env = simpy.Environment()
    G = num_gpus
    sched = Scheduler(requests, G, max_num_batched_tokens, max_num_seqs, kv_tokens, block_size)
    n = len(requests)
    wake: list[simpy.Event | None] = [None]
    rows_out: list[tuple] = []
    totals = {"tokens": 0, "generated": 0}

    def arrivals():
        for k, t in enumerate(requests.arrival_s.tolist()):
            if t > env.now:
                yield env.timeout(t - env.now)
            sched.arrive(k)
            ev = wake[0]
            if ev is not None and not ev.triggered:
                ev.succeed()

    def server():
        while sched.done < n:
            if not sched.has_work():
                idle_from = env.now
                wake[0] = env.event()
                yield wake[0]
                moe.outside(env.now - idle_from)
            start = env.now
            batch = sched.form(start)
            shape = sched.shape(batch)
            rows = stream.take(batch.tokens)
            home = np.repeat(batch.rank, batch.alloc)
            loads = stream.loads(rows, home, G)
            attention = dense.attention(shape)
            before = float(dense.before(shape, attention).max())
            after = float(dense.after(shape).max())
            moe_s = moe.run(stream.test_step(int(rows[0])), loads, attention, dense.attention_compute(shape))
            rest = before + after + overhead_s
            moe.outside(rest)
            t = moe_s + rest
            prefill = int(batch.alloc[batch.prefill].sum())
            totals["tokens"] += batch.tokens
            totals["generated"] += int(shape.sampled.sum())
            rows_out.append((start, t, moe_s, before + after, batch.tokens, prefill, batch.tokens - prefill,
                             len(sched.running), sched.waiting_count()))
            yield env.timeout(t)
            finished = sched.complete(batch, env.now)
            if on_finish is not None and finished:
                on_finish(finished)

    env.process(arrivals())
    done = env.process(server())
    env.run(until=done)
    its = np.array(rows_out, dtype=np.float64).reshape(-1, len(ITERATION_COLUMNS))
    return ServerRun(sched.admitted, sched.first, sched.finish, sched.rank, its, totals["tokens"],
                     totals["generated"], stream.laps, kv_tokens, moe.event_iterations, moe.copy_bytes)
