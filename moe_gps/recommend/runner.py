"""Running a sweep: one ``simulate`` call per run, in parallel, cached by config hash.

Every run is one strategy at one point (:mod:`moe_gps.recommend.plan`). Its key is the
SHA-256 of: the trace's content, the steps used, the seed, the skew variant (its
gamma), the full simulate config (cluster, model, workload, strategy), and a digest of
the simulator's source code (so that a changed cost model never reads stale results).
The result is one small JSON file ``cache/<key>.json`` in the output folder, written
atomically by this process as soon as a run's record comes back; a sweep that is
interrupted and started again reads those files and simulates only what is missing.

Workers are local processes (``multiprocessing``, fork where the platform has it), or Ray
tasks on a cluster (``backend="ray"``, :mod:`moe_gps.recommend.ray_pool`); each worker
holds the trace once and makes skew variants on first use. Records come back in the
order of the runs whatever the backend, so both give the same report. Nothing is
plotted per run.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from moe_gps.atomic import write_text_atomic
from moe_gps.config.loader import to_dict
from moe_gps.config.schema import SimulateConfig
from moe_gps.errors import HostLimit, UserError
from moe_gps.provenance import code_digest
from moe_gps.recommend.plan import (Candidate, Point, RunSpec, SweepPlan, workload_label, workload_tokens)
from moe_gps.recommend.skew import SkewVariant, search_gamma, variant_maker
from moe_gps.signals import held, second_ctrl_c
from moe_gps.workers import kill_pool, unordered, watch

#: bump when the record format changes
CACHE_VERSION = 2


def trace_fingerprint(trace) -> str:
    """SHA-256 (16 hex digits) of the trace's routing and metadata shape."""
    h = hashlib.sha256()
    m = trace.meta
    h.update(json.dumps([m.kind, m.num_layers, m.num_experts, m.top_k]).encode())
    arrays = ([trace.experts, trace.step_offsets, trace.token_id, trace.seq, trace.pos, trace.rank]
              if hasattr(trace, "experts") else [trace.counts()])
    for a in arrays:
        h.update(b"-" if a is None else np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def seal(rec: dict[str, Any]) -> str:
    """A cache file's text: the JSON record with a ``check`` field, the hash of the rest."""
    return json.dumps({**rec, "check": _hash(rec)}) + "\n"


def unseal(text: str) -> dict[str, Any] | None:
    """The record of a cache file, or None when it is damaged, edited or not a record (then the run is
    simulated again)."""
    try:
        rec = json.loads(text)
    except ValueError:
        return None
    if not isinstance(rec, dict):
        return None
    check = rec.pop("check", None)
    return rec if check == _hash(rec) else None


# ---------------------------------------------------------------------------- payloads

def simulate_config(plan: SweepPlan, spec: RunSpec) -> SimulateConfig:
    p, c = spec.point, spec.candidate
    cluster = plan.point_cluster(p)
    strategy = c.config(p.num_gpus, plan.model.num_experts, plan.sweep.predictor_placement)
    return SimulateConfig(cluster=cluster, model=plan.model, workload=plan.workloads[p.workload],
                          strategies=[strategy], seed=plan.sweep.seed, train_steps=plan.sweep.train_steps,
                          trace="sweep", assumptions=plan.sweep.assumptions)


def describe(plan: SweepPlan, spec: RunSpec) -> dict[str, Any]:
    """The run's coordinates, as record fields."""
    p, c = spec.point, spec.candidate
    w = plan.workloads[p.workload]
    v = plan.skews[p.skew]
    return {
        "num_gpus": p.num_gpus, "bandwidth_gb_s": p.bandwidth_gb_s, "fabric": plan.fabric_of(p.num_gpus),
        "workload": workload_label(w, plan.trace_tokens), "phase": w.phase, "seq_len": w.seq_len,
        "tokens_per_step": workload_tokens(w, plan.trace_tokens), "skew_variant": p.skew,
        "skew_target": v.target, "skew_gamma": v.gamma,
        "strategy": c.name, "candidate": c.label, "family": c.family, "deployable": c.deployable,
        "slots_per_gpu_extra": c.per_gpu,
        "synthetic_accuracy": c.accuracy, "synthetic_overhead_flops": c.overhead,
    }


def payload(plan: SweepPlan, spec: RunSpec, fingerprint: str, digest: str) -> dict[str, Any]:
    cfg = simulate_config(plan, spec)
    gamma = plan.skews[spec.point.skew].gamma
    key = _hash({"v": CACHE_VERSION, "code": digest, "trace": fingerprint, "gamma": gamma,
                 "steps": [plan.sweep.train_steps, plan.sweep.sim_steps], "config": to_dict(cfg)})
    return {"key": key, "config": cfg, "gamma": gamma, "describe": describe(plan, spec)}


# ---------------------------------------------------------------------------- worker side

#: the backends a sweep runs on
BACKENDS = ("local", "ray")

_W: dict[str, Any] = {}


def _init(trace, seed: int, stop=None) -> None:
    """Worker state: the trace (once per worker), the skew variants made from it, and the pool's stop
    flag (None in this process and on Ray, which stops submitting instead)."""
    _W.clear()
    _W.update(trace=trace, seed=seed, variants={}, stop=stop)


def _init_worker(trace, seed: int, stop) -> None:
    """Pool worker start: Ctrl-C, SIGTERM and SIGHUP are the parent's to handle. It sets ``stop``
    and the worker skips the tasks still queued, so the pool ends between two runs (the records
    that reached the parent are already in the cache)."""
    from moe_gps.signals import install_worker

    install_worker()
    _init(trace, seed, stop)


def _stopped() -> bool:
    stop = _W.get("stop")
    return stop is not None and stop.is_set()


def _maker():
    if "maker" not in _W:
        _W["maker"] = variant_maker(_W["trace"], _W["seed"])
    return _W["maker"]


def _variant(gamma: float):
    vs = _W["variants"]
    if gamma not in vs:
        if len(vs) >= 8:
            vs.pop(next(iter(vs)))
        vs[gamma] = _maker()(gamma)
    return vs[gamma]


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Simulate one run in this process; return its record."""
    from sim.report import summary_rows
    from sim.run import simulate

    if _stopped():
        return {"key": job["key"], "status": "skipped"}
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"key": job["key"], **job["describe"]}
    cfg: SimulateConfig = job["config"]
    try:
        result = simulate(_variant(job["gamma"]), cfg, progress=False, trace_name="sweep")
    except HostLimit as err:              # this machine, now: not cached, so that a rerun tries again
        rec.update(status="too big here", reason=str(err))
    except UserError as err:
        rec.update(status="infeasible", reason=str(err))
    except Exception as err:  # noqa: BLE001 - recorded, reported, and not cached
        rec.update(status="error", reason=f"{type(err).__name__}: {err}")
    else:
        row = summary_rows(result)[0]
        row.pop("speedup_vs_none", None)          # single-strategy run: computed in the analysis
        rec.update(status="ok", reason="", **{k: v for k, v in row.items() if k not in ("strategy",)})
        rec["redundant_slots"] = int(result.strategies[0].redundant_slots)
        rec["skew"] = float(np.nanmean(result.expert_skew))
        rec["sim_steps"] = int(len(result.steps))
        rec["tokens_mean"] = float(result.tokens.mean())
        rec["step_latency_ms"] = [float(x) for x in result.strategies[0].step_latency * 1e3]
    rec["wall_s"] = time.perf_counter() - t0
    return _clean(rec)


def _search(args: tuple[float, int]) -> dict[str, Any] | None:
    if _stopped():
        return None
    target, first = args
    v = search_gamma(_W["trace"], target, first, _W["seed"], make=_maker())
    return v.__dict__


def _clean(rec: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe: numpy scalars to Python, NaN to None."""
    out = {}
    for k, v in rec.items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and v != v:
            v = None
        out[k] = v
    return out


# ---------------------------------------------------------------------------- parent side

#: seconds the local workers get to finish the runs under way after Ctrl-C or SIGTERM
STOP_GRACE_S = 60.0


def _stop_local(pool, stop) -> None:
    """Stop a local pool between two runs: the workers skip the tasks still queued and exit once the
    runs under way end; a worker still busy after :data:`STOP_GRACE_S`, or at a second Ctrl-C, is killed
    (it writes no file)."""
    stop.set()
    pool.close()
    joiner = threading.Thread(target=pool.join, daemon=True)
    joiner.start()
    try:
        with second_ctrl_c():
            joiner.join(STOP_GRACE_S)
    except KeyboardInterrupt:               # a second Ctrl-C: stop the runs under way now
        pass
    if joiner.is_alive():
        kill_pool(pool)
        joiner.join(5.0)


class Runner:
    """Runs payloads in ``jobs`` local processes (in this process when jobs == 1), or as Ray tasks
    (``backend="ray"``: on the cluster at ``address``, or on a local one of ``jobs`` CPUs started
    for the sweep), skipping cached ones.

    Use as a context manager; the pool is closed at the end. On an exception (Ctrl-C, SIGTERM)
    the local workers skip the tasks still queued and the pool ends when the runs under way
    finish; on Ray nothing more is submitted and the sweep's tasks end with the driver.
    """

    def __init__(self, trace, seed: int, out_dir: str | os.PathLike | None, jobs: int, progress: bool | None,
                 backend: str = "local", address: str | None = None):
        if backend not in BACKENDS:
            raise UserError(f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
        self.trace, self.seed, self.jobs = trace, seed, max(1, int(jobs))
        self.backend, self.address = backend, address
        self.cache = None if out_dir is None else Path(out_dir) / "cache"
        if self.cache is not None:
            if self.cache.exists() and not self.cache.is_dir():
                raise UserError(f"{self.cache}: a file where the sweep keeps its cache folder; move it")
            self.cache.mkdir(parents=True, exist_ok=True)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.pool = None
        self.stop = None                   # the local pool's stop flag
        self._check = None                 # the local pool's check for a killed worker (workers.watch)
        self.fingerprint = trace_fingerprint(trace)
        self.digest = code_digest()
        self._done: set[str] = set()       # keys simulated by this runner
        self._cached: set[str] = set()     # keys read from the cache

    def __enter__(self) -> "Runner":
        if self.backend == "ray":
            from moe_gps.recommend.ray_pool import RayPool

            self.pool = RayPool(self.trace, _init, (self.seed,), self.address, self.jobs)
            self.jobs = self.pool.cpus
        elif self.jobs > 1:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self.stop = ctx.Event()
            try:
                with held():            # a signal during the start waits until the pool is named, to be killed
                    self.pool = ctx.Pool(self.jobs, initializer=_init_worker,
                                         initargs=(self.trace, self.seed, self.stop))
            except BaseException:
                if self.pool is not None:
                    kill_pool(self.pool)
                    self.pool = None
                raise
            self._check = watch(self.pool)
        _init(self.trace, self.seed)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.pool is not None:
            if exc_type is None:
                self.pool.close()
                self.pool.join()
            elif self.stop is not None and issubclass(exc_type, KeyboardInterrupt):
                _stop_local(self.pool, self.stop)      # Ctrl-C, SIGTERM: the runs under way finish
            elif self.stop is not None:
                kill_pool(self.pool)                    # a failure, e.g. a worker killed: stop at once
            else:
                self.pool.terminate()          # Ray: disconnect; a cluster started here is shut down
            self.pool = None

    def _map(self, fn, items: list, desc: str, unit: str) -> Iterable:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=desc, unit=unit, disable=not self.progress, file=sys.stderr,
                   dynamic_ncols=True)
        try:
            if self.pool is None:
                for it in items:
                    yield fn(it)
                    bar.update(1)
            else:
                chunk = max(1, min(8, len(items) // (self.jobs * 8)))
                # the local pool's results: stoppable by Ctrl-C and SIGTERM; a killed worker raises
                results = (self.pool.imap_unordered(fn, items, chunksize=chunk) if self.backend == "ray"
                           else unordered(self.pool, fn, items, chunk, waiting=self._check))
                for res in results:
                    yield res
                    bar.update(1)
        finally:
            bar.close()

    # -- skew variants
    def skew_variants(self, targets: list[float], first_step: int) -> list[SkewVariant]:
        """Search gamma for every target (in parallel); cached under cache/skew-<key>.json."""
        out: dict[float, SkewVariant] = {}
        todo = []
        for t in targets:
            path = self._skew_path(t, first_step)
            v = self._read(path)
            if v is not None:
                out[t] = SkewVariant(**v)
            else:
                todo.append(t)
        for d in self._map(_search, [(t, first_step) for t in todo], "skew variants", "variant"):
            v = SkewVariant(**d)
            out[v.target] = v
            if self.cache is not None:
                write_text_atomic(self._skew_path(v.target, first_step), seal(_clean(v.__dict__)))
        return [out[t] for t in targets]

    def _skew_path(self, target: float, first_step: int) -> Path | None:
        if self.cache is None:
            return None
        key = _hash({"v": CACHE_VERSION, "code": self.digest, "trace": self.fingerprint, "target": target,
                     "first": first_step, "seed": self.seed})
        return self.cache / f"skew-{key}.json"

    @staticmethod
    def _read(path: Path | None) -> dict | None:
        if path is None or not path.exists():
            return None
        try:
            return unseal(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None            # a damaged file is simulated again

    # -- runs
    def run(self, plan: SweepPlan, specs: list[RunSpec], desc: str) -> list[dict[str, Any]]:
        """Records of ``specs`` (deduplicated), from the cache or simulated now."""
        jobs, seen = [], set()
        for s in specs:
            j = payload(plan, s, self.fingerprint, self.digest)
            if j["key"] not in seen:
                seen.add(j["key"])
                jobs.append(j)
        records, todo = [], []
        for j in jobs:
            rec = self._read(None if self.cache is None else self.cache / f"{j['key']}.json")
            if rec is not None and rec.get("key") == j["key"] and rec.get("status") in ("ok", "infeasible"):
                rec.update(j["describe"])        # the coordinates as this sweep names them
                records.append(rec)
            else:
                todo.append(j)
        self._cached |= {rec["key"] for rec in records}
        for rec in self._map(run_one, todo, desc, "run"):
            if self.cache is not None and rec["status"] in ("ok", "infeasible"):   # errors are retried by a rerun
                write_text_atomic(self.cache / f"{rec['key']}.json", seal(rec))
            records.append(rec)
            self._done.add(rec["key"])
        order = {j["key"]: i for i, j in enumerate(jobs)}
        return sorted(records, key=lambda rec: order[rec["key"]])       # the same order on every backend

    @property
    def simulated(self) -> int:
        """Distinct runs simulated by this runner."""
        return len(self._done)

    @property
    def from_cache(self) -> int:
        """Distinct runs read from cache files written before this runner started."""
        return len(self._cached - self._done)


def key_of(rec: dict[str, Any]) -> tuple:
    """(Point, Candidate label) of a record, for lookups in the analysis."""
    return (rec["num_gpus"], rec["bandwidth_gb_s"], rec["workload"], rec["skew_variant"], rec["candidate"])


__all__ = ["Runner", "payload", "run_one", "simulate_config", "code_digest", "trace_fingerprint", "key_of",
           "Candidate", "Point"]
