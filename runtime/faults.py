"""Which rank failed, and how: read from the group's key-value store when a collective fails.

Every rank writes under ``moe_gps/`` in the store (the one torchrun's agent hosts, or
rank 0's in a local group):

* ``pid/<rank>``: ``"<host> <pid>"``, when it joins (every rank also gathers all of them when
  the group starts, so that it can look at its host's peers without the store);
* ``progress/<rank>``: ``"<step> <phase>"``, as it goes (:data:`STEP_PHASES`);
* ``heartbeat/<rank>``: a counter its background thread bumps every second;
* ``exit/<rank>``: why it stopped, when it stops on an error it could catch.

A rank whose collective failed sorts every other rank with :func:`diagnose`:

* **exited**: its ``exit`` key is set, or its process (on this host) is gone or a zombie;
* **not responding**: its process is stopped (SIGSTOP), or its heartbeat did not advance
  for 2.5 s, or it is alive but at an earlier step or phase (a stall).

The first checks need no waiting, so a crashed rank is named before torchrun stops the
survivors (it sends them SIGTERM a fraction of a second after a rank exits); the
heartbeat wait runs only when they find nothing.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

PREFIX = "moe_gps/"
HEARTBEAT_S = 1.0
#: the phases of a step, in order (a rank at an earlier (step, phase) is behind)
STEP_PHASES = ("joined", "start", "plan", "move", "forward", "gather", "done")


def key(kind: str, rank: int) -> str:
    return f"{PREFIX}{kind}/{rank}"


def whoami() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


def process_state(pid: int) -> str | None:
    """'gone', 'zombie', 'stopped' or 'alive' for a process on this host; None without /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone" if os.path.isdir("/proc/self") else None
    except (OSError, IndexError):
        return None
    return {"Z": "zombie", "X": "gone", "T": "stopped", "t": "stopped"}.get(state, "alive")


def _progress_key(text: str) -> tuple[int, int]:
    s, _, ph = text.partition(" ")
    return int(s), STEP_PHASES.index(ph) if ph in STEP_PHASES else 0


@dataclass
class Diagnosis:
    """What one rank found out about the others (see the module docstring)."""

    exited: dict[int, str] = field(default_factory=dict)          # rank -> detail
    not_responding: dict[int, str] = field(default_factory=dict)  # rank -> detail
    progress: dict[int, str] = field(default_factory=dict)        # rank -> "step phase"
    store_ok: bool = True

    @property
    def found(self) -> bool:
        return bool(self.exited or self.not_responding)

    def text(self, world_size: int) -> str:
        """The ranks at fault and everybody's last progress, '; '-separated."""
        parts = []
        if not self.store_ok:
            parts.append("could not reach the key-value store to tell which rank failed (in a local group rank 0 "
                         "hosts it: it may be the rank that failed)")
        parts += [f"rank {r} exited{f' ({d})' if d else ''}" for r, d in sorted(self.exited.items())]
        parts += [f"rank {r} not responding ({d})" for r, d in sorted(self.not_responding.items())]
        if self.store_ok and not self.found:
            parts.append("no other rank is known to have failed")
        if self.progress:
            parts.append("last progress: " + ", ".join(f"rank {r}: {self.progress.get(r, 'never started')}"
                                                       for r in range(world_size)))
        return "; ".join(parts)


def diagnose(store: Any, rank: int, world_size: int, mine: tuple[int, str], wait_s: float = 0.0,
             poll_s: float = 0.3, peers: list[str] | None = None) -> Diagnosis:
    """Sort the other ranks into exited / not responding (see the module docstring).

    ``mine``: this rank's (step, phase). ``wait_s`` > 0 also watches the heartbeats that
    long; ``poll_s``: how long to look for a local peer's process to disappear (a peer's
    sockets close a moment before its process becomes a zombie); ``peers``: every rank's
    ``"<host> <pid>"``, gathered when the group started (None: read from the store). With
    them, the processes of this host are looked at even when the store cannot be reached.
    """
    d = Diagnosis()
    others = [r for r in range(world_size) if r != rank]
    host = socket.gethostname()
    known = None if peers is None else {r: peers[r] for r in others}
    deadline = time.monotonic() + poll_s

    def get(k: str) -> str | None:
        return store.get(k).decode() if store.check([k]) else None

    def look(pids: dict, exits: dict) -> None:
        for r in others:
            if r in d.exited:
                continue
            if exits.get(r):
                d.exited[r] = exits[r]
                continue
            h, _, pid = (pids.get(r) or "").partition(" ")
            state = process_state(int(pid)) if h == host and pid.isdigit() else None
            if state in ("gone", "zombie"):
                d.exited[r] = f"pid {pid}"
            elif state == "stopped":
                d.not_responding[r] = f"pid {pid} is stopped"

    def poll(pids: dict, read_exits) -> None:
        while True:
            look(pids, read_exits())
            if d.found or time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    try:
        if store is None:
            raise LookupError("no key-value store")
        pids = known if known is not None else {r: get(key("pid", r)) for r in others}
        d.progress = {r: p for r in range(world_size) if (p := get(key("progress", r))) is not None}
        poll(pids, lambda: {r: get(key("exit", r)) for r in others})
        if wait_s > 0 and not d.found:
            beats = [key("heartbeat", r) for r in others]
            first = [store.add(k, 0) for k in beats]
            time.sleep(wait_s)
            second = [store.add(k, 0) for k in beats]
            for r, a, b in zip(others, first, second):
                if a == b:
                    d.not_responding[r] = f"no heartbeat for {wait_s:g} s"
    except Exception:  # the store may be gone with the rank that hosted it
        d.store_ok = False
        if known is not None:
            poll(known, dict)
        return d
    me = _progress_key(f"{mine[0]} {mine[1]}")
    for r in others:
        if r in d.exited or r in d.not_responding:
            continue
        if r not in d.progress:
            d.not_responding[r] = "never started"
        elif _progress_key(d.progress[r]) < me:
            d.not_responding[r] = f"{'alive, ' if wait_s > 0 else ''}still at step {d.progress[r]}"
    return d
