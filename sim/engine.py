"""The SimPy event model: every GPU is a process, every GPU's link is a pair of resources.

One :class:`EventModel` holds the SimPy environment of one strategy for the whole run and
is advanced one step at a time (:meth:`EventModel.run_step`), so that a strategy can
decide each step knowing what has happened so far (e.g. whether its background copies
have landed). Per (step, layer), each GPU process runs

    [re-plan host time, first layer only] -> [wait for the layer's copies, policy critical]
    -> predictor + attention -> | dispatch | -> [| correction |]
    -> [wait for copies into this GPU] -> expert FFN -> | combine |

A GPU's compute phases run one after another inside its process. ``| ... |`` is a
collective: it starts when the last GPU enters it and ends when every GPU's part is
done, so the slowest GPU (a straggler) delays everybody.

Weight copies follow the copy policy (docs/simulator.md, "How strategies re-plan and copy"):

* ``critical``: the layer's copies run first; the layer waits for them.
* ``overlap``: the layer's copies start with the layer, during predictor and attention, and
  each holds its source's ``tx`` and its destination's ``rx`` port; a GPU's dispatch part
  queues behind copies on its ports (first come, first served).
* ``async``: copies are a background job (given to :meth:`EventModel.run_step`) that runs
  across layers and steps on separate copy lanes at a share of the link bandwidth; while a
  copy uses a GPU's port, that GPU's dispatch and combine get the rest of the bandwidth:
  their link part takes ``link / (1 - share)`` instead of ``link``. Copies into one GPU, and
  out of one GPU, run one after another.
* ``hidden``: copies take no time (the caller passes none).

Work within one GPU (a copy row with source = destination: copies between its slots) uses
no link: it runs after the GPU's incoming transfers.

Event count: per (step, layer) about 2 timeouts per GPU (attention, FFN), 1 timeout per
collective for all the GPUs whose link is free, 1 timeout per contended GPU part and per
copy. No per-token or per-message events. A step without copies in flight needs no events
at all: nothing contends, so its marks are the closed form (every phase's maximum over GPUs,
one after another), computed with numpy, and the clock moves to its end in one event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import simpy

from moe_gps.config.schema import COPY_BANDWIDTH_SHARE, COPY_POLICIES
from sim.work import Copies, StepWork, phase_maxima

#: timestamps recorded per (step, layer), in this order
MARKS = ("start", "ready", "dispatched", "corrected", "computed", "end")
#: the collective that ends at each mark
COLLECTIVES = {2: "dispatch", 3: "correction", 5: "combine"}



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
    ``slowed(g)`` says whether a background copy uses g's port now; then g's link part
    ``links[g]`` is stretched by ``stretch``.
    """

    __slots__ = ("env", "n", "count", "done", "marks", "on_end", "slowed", "stretch", "log")

    def __init__(self, env: simpy.Environment, n: int, on_end, slowed, stretch: float) -> None:
        self.env, self.n, self.count = env, n, 0
        self.marks, self.on_end = None, on_end
        self.slowed, self.stretch = slowed, stretch
        self.log: list | None = None
        self.done = env.event()

    def enter(self, seconds: list[float], links: list[float] | None, contended: dict[int, _Countdown] | None,
              l: int, start_col: int, end_col: int) -> simpy.Event:
        """GPU arrives; returns the event of the collective's end. Records the start time in
        ``marks[l, start_col]`` (if >= 0) and the end in ``marks[l, end_col]``."""
        self.count += 1
        done = self.done
        if self.count < self.n:
            return done
        env = self.env
        self.count = 0
        self.done = env.event()
        marks = self.marks
        if start_col >= 0:
            marks[l, start_col] = env.now
        if links is not None:
            slowed = self.slowed
            seconds = [t + links[g] * self.stretch if slowed(g) else t for g, t in enumerate(seconds)]
        if self.log is not None:
            name = COLLECTIVES[end_col]
            self.log += [("gpu", g, name, env.now, env.now + t, l) for g, t in enumerate(seconds) if t > 0]

        def finish(_ev=None, done=done):
            marks[l, end_col] = env.now
            if end_col == len(MARKS) - 1:
                self.on_end(l)
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


class EventModel:
    """The event model of one strategy, advanced step by step (module docstring).

    num_gpus: G;  copy_policy: one of :data:`COPY_POLICIES`;  bandwidth_share: the share of the
    link that background copies get (policy ``async``; 0 < share < 1). ``closed_form``: steps without
    copies in flight take the closed form (the same numbers, no events); False runs every step as events.
    """

    closed_form = True

    def __init__(self, num_gpus: int, copy_policy: str = "overlap",
                 bandwidth_share: float = COPY_BANDWIDTH_SHARE) -> None:
        if copy_policy not in COPY_POLICIES:
            raise ValueError(f"copy policy must be one of {', '.join(COPY_POLICIES)}, got {copy_policy!r}")
        if not 0 < bandwidth_share < 1:
            raise ValueError(f"bandwidth share must be between 0 and 1, got {bandwidth_share}")
        G = num_gpus
        self.G, self.policy, self.share = G, copy_policy, bandwidth_share
        self.env = env = simpy.Environment()
        self.tx = [simpy.Resource(env, capacity=1) for _ in range(G)]
        self.rx = [simpy.Resource(env, capacity=1) for _ in range(G)]
        self.lane_tx = [simpy.Resource(env, capacity=1) for _ in range(G)]
        self.lane_rx = [simpy.Resource(env, capacity=1) for _ in range(G)]
        self.busy = [0] * G                 # background transfers using each GPU's port now
        self.job: simpy.Event | None = None
        self.layer = 0
        self.log: list | None = None         # when a list: the step's slices, (track, GPU, name, start, end, layer)
        self.coll = _Collective(env, G, self._end_layer, lambda g: self.busy[g] > 0,
                                bandwidth_share / (1 - bandwidth_share))

    @property
    def now(self) -> float:
        return self.env.now

    def job_pending(self) -> bool:
        """True while the last background job (policy async) has copies still in flight."""
        return self.job is not None and not self.job.triggered

    # -- background copies (policy async)
    def _bg_copy(self, src: int, dst: int, seconds: float):
        env = self.env
        with self.lane_tx[src].request() as a:
            yield a
            with self.lane_rx[dst].request() as b:
                yield b
                self.busy[src] += 1
                self.busy[dst] += 1
                self._log_copy("background copy", src, dst, seconds)
                yield env.timeout(seconds)
                self.busy[src] -= 1
                self.busy[dst] -= 1

    def _local(self, after: simpy.Event | None, seconds: float, g: int = -1):
        """Work within one GPU (copies between its slots): after the copies into it."""
        if after is not None:
            yield after
        self._log_copy("copies between slots", g, g, seconds)
        yield self.env.timeout(seconds)

    def _log_copy(self, name: str, src: int, dst: int, seconds: float) -> None:
        if self.log is not None and src >= 0:
            now = self.env.now
            self.log.append(("link", dst, f"{name} {src}->{dst}", now, now + seconds, self.layer))

    def _within(self, into: dict[int, list], local: list[tuple[int, int, float]], procs: list) -> dict:
        """Start the copies within each GPU (rows (g, g, seconds)) after the transfers into it (``into``:
        GPU -> its transfer events); add them to ``procs``. -> GPU -> the event of its last copy."""
        landed = {d: _latch(self.env, ps) for d, ps in into.items()}
        for g, _, t in local:
            p = self.env.process(self._local(landed.get(g), t, g))
            landed[g] = p
            procs.append(p)
        return landed

    def _start_job(self, copies: Copies) -> None:
        env = self.env
        into: dict[int, list] = {}
        procs = []
        rows = list(zip(copies.src.tolist(), copies.dst.tolist(), copies.seconds.tolist()))
        for src, dst, t in rows:
            if src != dst:
                p = env.process(self._bg_copy(src, dst, t))
                into.setdefault(dst, []).append(p)
                procs.append(p)
        self._within(into, [r for r in rows if r[0] == r[1]], procs)
        self.job = _latch(env, procs)

    # -- one step
    def _begin_layer(self, l: int) -> None:
        env = self.env
        self.layer = l
        self.marks[l, 0] = env.now if l else self.step_start
        copies = self.by_layer[l]
        if not copies:
            self.into, self.every, self.ports = {}, None, None
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
            # a copy whose ports no other copy of the layer uses cannot queue: a timeout is then
            # exactly what the resources would give, at a fraction of the events
            if uses[("tx", src)] > 1 or uses[("rx", dst)] > 1:
                p = env.process(self._copy(src, dst, t))
            else:
                p = env.timeout(t)
                self._log_copy("weight copy", src, dst, t)
            into.setdefault(dst, []).append(p)
            for g in (src, dst):
                if g not in ports:
                    ports[g] = _Countdown()
                ports[g].watch(p)
            procs.append(p)
        landed = self._within(into, [c for c in copies if c[0] == c[1]], procs)
        overlap = self.policy == "overlap"
        self.into = landed
        self.every = None if overlap else _latch(env, procs)
        self.ports = ports if overlap else None

    def _copy(self, src: int, dst: int, seconds: float):
        """A copy that shares a port with another copy of the layer: queue on the resources."""
        with self.tx[src].request() as a:
            yield a
            with self.rx[dst].request() as b:
                yield b
                self._log_copy("weight copy", src, dst, seconds)
                yield self.env.timeout(seconds)

    def _end_layer(self, l: int) -> None:
        if l + 1 < self.L:
            self._begin_layer(l + 1)
        else:
            self.step_done.succeed()

    def _gpu(self, g: int, plan):
        env = self.env
        timeout = env.timeout
        enter = self.coll.enter
        ready_t, disp, corr, ffn, comb, dlink, clink, has_corr = plan
        yield self.started
        for l in range(self.L):
            into, every, ports = self.into, self.every, self.ports
            if every is not None:
                yield every
            t = ready_t[l][g]
            if t > 0:
                if self.log is not None:
                    self.log.append(("gpu", g, "predictor + attention", env.now, env.now + t, l))
                yield timeout(t)
            yield enter(disp[l], dlink[l] if dlink is not None else None, ports, l, 1, 2)
            if has_corr:
                yield enter(corr[l], None, ports, l, -1, 3)
            if g in into:
                yield into[g]
            t = ffn[l][g]
            if t > 0:
                if self.log is not None:
                    self.log.append(("gpu", g, "expert FFN", env.now, env.now + t, l))
                yield timeout(t)
            # every copy of the layer landed before the last GPU's FFN, so the combine never
            # meets a copy of the layer on a link
            yield enter(comb[l], clink[l] if clink is not None else None, None, l, 4, 5)

    def run_step(self, work: StepWork, background: Copies | None = None) -> np.ndarray:
        """Simulate one step from now; ``background`` starts a job of background copies with it
        (policy async). Returns the step's marks, float [L, len(MARKS)] (absolute seconds)."""
        env = self.env
        L = work.attention.shape[0]
        self.L = L
        self.marks = marks = np.zeros((L, len(MARKS)))
        if L == 0:
            return marks
        if background is not None and len(background):
            self._start_job(background)
        c = work.copies if self.policy in ("critical", "overlap") else Copies.empty()
        if self.closed_form and not len(c) and not self.job_pending() and self.log is None:
            return self.closed_form_step(work)
        self.by_layer = by_layer = [[] for _ in range(L)]
        for l, s, d, t in zip(c.layer.tolist(), c.src.tolist(), c.dst.tolist(), c.seconds.tolist()):
            by_layer[l].append((s, d, t))
        stretch = self.policy == "async" and self.job_pending()
        plan = ((work.predictor + work.attention).tolist(), work.dispatch.tolist(), work.correction.tolist(),
                work.ffn.tolist(), work.combine.tolist(),
                work.dispatch_link.tolist() if stretch and work.dispatch_link is not None else None,
                work.combine_link.tolist() if stretch and work.combine_link is not None else None,
                work.has_correction)
        self.coll.marks = marks
        self.coll.log = self.log
        self.step_start = env.now
        if self.log is not None and work.replan_host and self.policy != "hidden":
            self.log += [("gpu", g, "applying the placement", env.now, env.now + work.replan_host, 0)
                         for g in range(self.G)]
        self.step_done = env.event()
        host = work.replan_host if self.policy != "hidden" else 0.0
        self.started = env.timeout(host)
        self.started.callbacks.append(lambda _ev: self._begin_layer(0))
        for g in range(self.G):
            env.process(self._gpu(g, plan))
        env.run(until=self.step_done)
        if not work.has_correction:
            marks[:, 3] = marks[:, 2]
        return marks


    def closed_form_step(self, work: StepWork) -> np.ndarray:
        """A step without copies in flight: nothing contends, so every mark is the previous one plus
        the phase's maximum over GPUs (the closed form the event model equals then; tested), and
        the clock moves to the step's end with one event."""
        env = self.env
        host = work.replan_host if self.policy != "hidden" else 0.0
        phases = phase_maxima(work)
        phases[0, 0] += host
        ends = env.now + np.cumsum(phases.ravel()).reshape(phases.shape)            # [L, 5]
        starts = np.concatenate([[env.now], ends[:-1, -1]])
        marks = np.concatenate([starts[:, None], ends], axis=1)
        if marks[-1, -1] > env.now:
            env.run(until=float(marks[-1, -1]))
        return marks


def run_events(works: list[StepWork], num_gpus: int, copy_policy: str = "overlap",
               on_step: Callable[[int], None] | None = None, background: dict[int, Copies] | None = None,
               bandwidth_share: float = COPY_BANDWIDTH_SHARE) -> Timeline:
    """Simulate ``works`` (one per step, in order) on ``num_gpus`` GPUs; return the timeline.
    ``background``: step -> a job of background copies started with that step (policy async)."""
    model = EventModel(num_gpus, copy_policy, bandwidth_share)
    L = works[0].attention.shape[0] if works else 0
    marks = np.zeros((len(works), L, len(MARKS)))
    for s, w in enumerate(works):
        marks[s] = model.run_step(w, (background or {}).get(s))
        if on_step is not None:
            on_step(s)
    return Timeline(marks)
