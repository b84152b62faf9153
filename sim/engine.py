"""The SimPy event model: every GPU is a process, every GPU's link is a pair of resources.

Per (step, layer), each GPU process runs

    [wait for the layer's copies, if they do not overlap] -> predictor + attention
    -> | dispatch | -> [| correction |] -> [wait for copies into this GPU] -> expert FFN
    -> | combine |

A GPU's compute phases run one after another inside its process (so its compute is
used by one phase at a time). ``| ... |`` is a collective: it starts when the last GPU
enters it and ends when every GPU's part is done, so the slowest GPU (a straggler)
delays everybody. GPU g's part lasts its all-to-all time (sim.cost.alltoall_time); when
a weight copy uses g's link in the same layer, the part must hold g's ``tx`` and ``rx``
resources, queuing behind the copy. Weight copies are processes started at the layer's
start; each holds the source's ``tx`` and the destination's ``rx`` resource for
bytes / bandwidth + latency. With ``overlap_copies`` they run during predictor and
attention and compete with the dispatch; without it the layer first waits for them. Work
within one GPU (a copy row with source = destination: copies between its slots, applying
a placement) uses no link: it runs after the GPU's incoming transfers of the layer.

Event count: per (step, layer) about 2 timeouts per GPU (attention, FFN), 1 timeout per
collective for all the GPUs whose link is free, 1 timeout per contended GPU part and per
copy (a process with resource requests for copies that share a port with another copy).
No per-token or per-message events; one process per GPU for the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import simpy

from sim.work import StepWork

#: timestamps recorded per (step, layer), in this order
MARKS = ("start", "ready", "dispatched", "corrected", "computed", "end")


@dataclass
class Timeline:
    """Times in seconds, float [steps, layers, len(MARKS)]."""

    marks: np.ndarray

    def column(self, name: str) -> np.ndarray:
        return self.marks[..., MARKS.index(name)]


def _latch(env: simpy.Environment, events: list[simpy.Event]) -> simpy.Event:
    """An event that succeeds once every event in ``events`` has been processed (a lighter
    ``AllOf``: one counter and one callback per event)."""
    done = env.event()
    pending = [0]

    def tick(_ev) -> None:
        pending[0] -= 1
        if pending[0] == 0:
            done.succeed()

    for ev in events:
        if ev.callbacks is not None:        # not yet processed
            pending[0] += 1
            ev.callbacks.append(tick)
    if pending[0] == 0:
        done.succeed()
    return done


class _Countdown:
    """Runs its waiters once ``pending`` events have been processed; no event of its own."""

    __slots__ = ("pending", "waiters")

    def __init__(self) -> None:
        self.pending, self.waiters = 0, []

    def watch(self, ev: simpy.Event) -> None:
        if ev.callbacks is not None:        # not yet processed
            self.pending += 1
            ev.callbacks.append(self.tick)

    def tick(self, _ev=None) -> None:
        self.pending -= 1
        if self.pending == 0:
            for fn in self.waiters:
                fn()
            self.waiters = []

    def when_done(self, fn) -> None:
        if self.pending == 0:
            fn()
        else:
            self.waiters.append(fn)


class _Collective:
    """One collective at a time for ``n`` GPUs: :meth:`enter` returns the event of its end.

    When the last GPU enters, every GPU's part starts: one timeout covers all GPUs whose
    link is free (they all start now; the longest sets the end), and each GPU in
    ``contended`` (GPU -> a countdown of the copies using its link) starts its own timeout
    when those copies are done: they queued on the link first (first come, first served).
    """

    __slots__ = ("env", "n", "count", "done", "marks", "on_end")

    def __init__(self, env: simpy.Environment, n: int, marks: np.ndarray, on_end) -> None:
        self.env, self.n, self.count = env, n, 0
        self.marks, self.on_end = marks, on_end
        self.done = env.event()

    def enter(self, seconds: list[float], contended: dict[int, _Countdown] | None, s: int, l: int,
              start_col: int, end_col: int) -> simpy.Event:
        """GPU arrives; returns the event of the collective's end. Records the start time in
        ``marks[s, l, start_col]`` (if >= 0) and the end in ``marks[s, l, end_col]``."""
        self.count += 1
        done = self.done
        if self.count < self.n:
            return done
        env = self.env
        self.count = 0
        self.done = env.event()
        if start_col >= 0:
            self.marks[s, l, start_col] = env.now

        def finish(_ev=None, done=done):
            self.marks[s, l, end_col] = env.now
            if end_col == len(MARKS) - 1:
                self.on_end(s, l)
            done.succeed()

        if not contended:
            env.timeout(max(seconds)).callbacks.append(finish)
            return done
        end = _Countdown()
        end.pending = 1                      # held until every part is registered
        free = [t for g, t in enumerate(seconds) if g not in contended]
        if free:
            end.watch(env.timeout(max(free)))
        for g, port in contended.items():
            end.pending += 1
            port.when_done(lambda t=seconds[g]: env.timeout(t).callbacks.append(end.tick))
        end.waiters.append(finish)
        end.tick()
        return done


def run_events(works: list[StepWork], num_gpus: int, overlap_copies: bool,
               on_step: Callable[[int], None] | None = None) -> Timeline:
    """Simulate ``works`` (one per step, in order) on ``num_gpus`` GPUs; return the timeline."""
    G = num_gpus
    S = len(works)
    L = works[0].attention.shape[0] if S else 0
    marks = np.zeros((S, L, len(MARKS)))
    if not (S and L):
        return Timeline(marks)
    env = simpy.Environment()
    tx = [simpy.Resource(env, capacity=1) for _ in range(G)]
    rx = [simpy.Resource(env, capacity=1) for _ in range(G)]

    def copy(src: int, dst: int, seconds: float):
        """A copy that shares a port with another copy of the layer: queue on the resources."""
        with tx[src].request() as a:
            yield a
            with rx[dst].request() as b:
                yield b
                yield env.timeout(seconds)

    def local(after: simpy.Event | None, seconds: float):
        """Work within one GPU (copies between its slots, applying the placement): after the copies into it."""
        if after is not None:
            yield after
        yield env.timeout(seconds)

    # Plain Python lists: much faster to index inside the processes than numpy arrays.
    plans = []
    for w in works:
        c = w.copies
        by_layer: list[list[tuple[int, int, float]]] = [[] for _ in range(L)]
        for l, s, d, t in zip(c.layer.tolist(), c.src.tolist(), c.dst.tolist(), c.seconds.tolist()):
            by_layer[l].append((s, d, t))
        plans.append(((w.predictor + w.attention).tolist(), w.dispatch.tolist(), w.correction.tolist(),
                      w.ffn.tolist(), w.combine.tolist(), by_layer, w.has_correction))

    # The layer's copies start when the previous layer ends (in the callback that ends
    # its combine), so every GPU process sees the same copy events.
    # A copy whose ports no other copy of the layer uses cannot queue: a timeout is then
    # exactly what the resources would give, at a fraction of the events.
    state: dict[str, object] = {"into": {}, "all": None, "ports": None}

    def begin_layer(s: int, l: int) -> None:
        marks[s, l, 0] = env.now
        copies = plans[s][5][l]
        if not copies:
            state["into"], state["all"], state["ports"] = {}, None, None
            return
        links = [c for c in copies if c[0] != c[1]]
        uses: dict[tuple[str, int], int] = {}
        for src, dst, _ in links:
            uses[("tx", src)] = uses.get(("tx", src), 0) + 1
            uses[("rx", dst)] = uses.get(("rx", dst), 0) + 1
        into: dict[int, list] = {}
        ports: dict[int, _Countdown] = {}
        procs = []
        for src, dst, t in links:
            if uses[("tx", src)] > 1 or uses[("rx", dst)] > 1:
                p = env.process(copy(src, dst, t))
            else:
                p = env.timeout(t)
            into.setdefault(dst, []).append(p)
            for g in (src, dst):
                if g not in ports:
                    ports[g] = _Countdown()
                ports[g].watch(p)
            procs.append(p)
        landed = {d: _latch(env, ps) for d, ps in into.items()}
        for g, _, t in (c for c in copies if c[0] == c[1]):     # no link: after g's incoming transfers
            p = env.process(local(landed.get(g), t))
            landed[g] = p
            procs.append(p)
        state["into"] = landed
        state["all"] = None if overlap_copies else _latch(env, procs)
        state["ports"] = ports if overlap_copies else None

    def end_layer(s: int, l: int) -> None:
        if l + 1 < L:
            begin_layer(s, l + 1)
            return
        if on_step is not None:
            on_step(s)
        if s + 1 < S:
            begin_layer(s + 1, 0)

    coll = _Collective(env, G, marks, end_layer)

    def gpu(g: int):
        timeout = env.timeout
        enter = coll.enter
        for s in range(S):
            ready_t, disp, corr, ffn, comb, _, has_corr = plans[s]
            for l in range(L):
                into, every, ports = state["into"], state["all"], state["ports"]
                if every is not None:
                    yield every
                t = ready_t[l][g]
                if t > 0:
                    yield timeout(t)
                yield enter(disp[l], ports, s, l, 1, 2)
                if has_corr:
                    yield enter(corr[l], ports, s, l, -1, 3)
                if g in into:
                    yield into[g]
                t = ffn[l][g]
                if t > 0:
                    yield timeout(t)
                # every copy of the layer landed before the last GPU's FFN, so the combine
                # never meets a copy on a link
                yield enter(comb[l], None, s, l, 4, 5)

    begin_layer(0, 0)
    for g in range(G):
        env.process(gpu(g))
    env.run()
    for s, w in enumerate(works):
        if not w.has_correction:
            marks[s, :, 3] = marks[s, :, 2]
    return Timeline(marks)
