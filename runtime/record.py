"""Gathering each step's routing and timings to rank 0, and writing the run's files.

Per step every rank packs its routing (``experts, weights [T, L, k]``), its per-layer
measurements (:data:`LAYER_FIELDS`) and its step measurements (:data:`STEP_FIELDS`)
into one float64 tensor and ``gather``s it to rank 0 (expert ids and float32 weights
are exact in float64). Rank 0 appends the step to the router trace (tokens kind, with
weights, ``token_id``, ``seq``, ``pos`` and ``rank`` columns, ``source: collected``)
through :class:`moe_gps.trace.TraceWriter`, and at the end writes:

* ``timings.csv``: one row per (step, rank, layer), columns ``LAYER_FIELDS`` plus
  ``share_tokens`` = the pairs the placement's shares give the rank for the step's true
  counts (``Placement.gpu_loads``), which the measured ``expert_tokens`` must match to
  within one pair per replica;
* ``steps.csv``: one row per (step, rank), columns ``STEP_FIELDS`` (``move_s``: seconds
  applying a placement on the critical path, under ``copy_policy: async`` the install;
  ``background_s``: async, from starting the transfers to their landing (and, with ``verify``,
  the check of the received rows) on the rank; counts such as bytes are integers, written exactly;
  ``row_copies``: expert rows the rank copied between its slots, old rows copied aside
  included; these, and the move's bytes and counts, on the row of the step the placement
  came into force)
  plus, for rank 0's row, ``replanned`` (a new placement was adopted: in force now, or its
  transfers started), ``declined`` (``min_gain`` kept the placement in force),
  ``check_skipped`` (a check fell while a move was in flight), ``switched`` (a new
  placement came into force at this step), ``planned_at`` (the step it was planned at; -1
  when none), ``predicted_max_rank_tokens`` (mean over layers of the plan's max pairs per
  rank under the predicted loads) and ``measured_max_rank_tokens``;
* ``placement.yaml``: the placement in force at the end.

Rank 0 writes them into a hidden staging folder inside ``output.dir``
(:func:`moe_gps.outputs.staged_outputs`); they move into the folder together when the run ends
well, so that a run that fails (a full disk, a rank lost, Ctrl-C) leaves an earlier run's files
as they were.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from moe_gps.atomic import write_csv_atomic, write_text_atomic
from moe_gps.placement import save_placement
from moe_gps.trace import TraceMeta, TraceWriter
from moe_gps.trace.data import StepRouting

LAYER_FIELDS = ("attention_s", "route_s", "counts_s", "dispatch_s", "expert_s", "combine_s", "expert_cpu_s",
                "pairs_local", "expert_tokens", "pairs_sent_remote")
STEP_FIELDS = ("step_s", "forward_s", "move_s", "background_s", "bytes_sent", "bytes_received", "row_copies",
               "transfers", "slots_kept", "local_copies", "slots_received")
#: the STEP_FIELDS that count things (bytes, rows, transfers, slots): integers, written exactly
STEP_COUNTS = STEP_FIELDS[4:]
#: float columns that hold (token, expert) pairs: written with every digit (the others with 6)
EXACT_FLOATS = ("share_tokens", "predicted_max_rank_tokens", "measured_max_rank_tokens")


def gather_step(ctx, handle, batch, step_s: float, forward_s: float, move) -> list[dict] | None:
    """Gather this step's routing and measurements; rank 0 gets one dict per rank, others None."""
    experts, weights = handle.routing()                                   # [T, L, k]
    T, L, k = experts.shape
    attn = handle.attention_seconds() if handle.attention_seconds else [float("nan")] * L
    layer = np.array([[attn[l]] + [float(b.experts.stats[f]) for f in LAYER_FIELDS[1:]]
                      for l, b in enumerate(handle.blocks)], dtype=np.float64)
    mv = move.counts if move is not None else {}
    step = np.array([step_s, forward_s, move.seconds if move else 0.0, move.background_s if move else 0.0,
                     move.bytes_sent if move else 0, move.bytes_received if move else 0, move.row_copies if move else 0]
                    + [mv.get(f, 0) for f in STEP_FIELDS[7:]], np.float64)
    flat = np.concatenate([experts.reshape(-1).astype(np.float64), weights.reshape(-1).astype(np.float64),
                           layer.reshape(-1), step])
    mine = torch.as_tensor(flat, device=ctx.device)
    if ctx.distributed:
        parts = [torch.empty_like(mine) for _ in range(ctx.world_size)] if ctx.rank == 0 else None
        with ctx.guard("gather of routing and timings"):
            dist.gather(mine, parts, dst=0, group=ctx.group)
    else:
        parts = [mine]
    if ctx.rank != 0:
        return None
    n = T * L * k
    out = []
    for r, t in enumerate(parts):
        a = t.cpu().numpy()
        out.append({"experts": a[:n].reshape(T, L, k).astype(np.int16),
                    "weights": a[n:2 * n].reshape(T, L, k).astype(np.float32),
                    "layer": a[2 * n:2 * n + L * len(LAYER_FIELDS)].reshape(L, len(LAYER_FIELDS)),
                    "step": a[2 * n + L * len(LAYER_FIELDS):]})
    return out


class RunAborted(Exception):
    """The run stopped before :meth:`RunRecorder.finish` (its staged files are removed)."""


class RunRecorder:
    """Rank 0's writer of the trace and the timings (see the module docstring)."""

    def __init__(self, cfg, mode: str, ctx, handle, source, command: str) -> None:
        from moe_gps.outputs import check_output_file, locked_output_dir, staged_outputs
        from runtime.config import run_outputs

        self.cfg, self.mode, self.ctx, self.handle, self.source = cfg, mode, ctx, handle, source
        self.dir = Path(cfg.output.dir)
        # the folder's lock and the staging folder the files are written into, closed by finish() (the files
        # move into the folder) or abort() (the staging folder is removed)
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(locked_output_dir(self.dir, "output.dir"))
        self.trace_path = self.dir / cfg.output.trace
        for name in run_outputs(cfg):
            check_output_file(self.dir / name, "output")
        try:
            self.stage = self._stack.enter_context(staged_outputs(self.dir)).path
        except BaseException:
            self._stack.close()
            raise
        model = "random-mixtral-style" if not cfg.model.checkpoint else Path(cfg.model.checkpoint).name
        dataset = Path(cfg.input.trace).name if cfg.input.trace else "seeded-zipf"
        prov = {"tool": "runtime.launch", "command": command,
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "world_size": ctx.world_size, "backend": ctx.backend, "device": str(ctx.device),
                "duplication": mode, "run_dir": str(self.dir.resolve()), "model": handle.name,
                "input": source.description,
                "torch": torch.__version__, "host": platform.node(), "config": cfg.to_dict()}
        meta = TraceMeta("tokens", handle.num_layers, handle.num_experts, handle.top_k, model=model,
                         dataset=dataset, source="collected", provenance=json.loads(json.dumps(prov, default=str)))
        try:
            self.writer = TraceWriter(self.stage / cfg.output.trace, meta, with_weights=True,
                                      optional=("token_id", "seq", "pos", "rank"))
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
        self.layer_rows: list[np.ndarray] = []
        self.step_rows: list[dict] = []

    def add_step(self, step: int, parts: list[dict], placement, info, move, events: dict | None = None) -> StepRouting:
        """Record one step; ``events``: ``switched``, ``planned_at``, ``check_skipped`` (see the module
        docstring)."""
        events = events or {}
        N = len(parts)
        L, E = self.handle.num_layers, self.handle.num_experts
        ids, seq, pos = self.source.step_tokens(step)
        experts = np.concatenate([p["experts"] for p in parts])
        T_rank = parts[0]["experts"].shape[0]
        routing = StepRouting(step, experts, np.concatenate([p["weights"] for p in parts]), token_id=ids, seq=seq,
                              pos=pos, rank=np.repeat(np.arange(N, dtype=np.int16), T_rank))
        self.writer.write_step(routing)
        counts = routing.counts(E)                                          # [L, E]
        share_tokens = placement.gpu_loads(counts)                          # [L, N]
        measured = np.stack([p["layer"][:, LAYER_FIELDS.index("expert_tokens")] for p in parts], axis=1)  # [L, N]
        for r, p in enumerate(parts):
            rows = np.column_stack([np.full(L, step), np.full(L, r), np.arange(L), p["layer"], share_tokens[:, r]])
            self.layer_rows.append(rows)
            row = {"step": step, "rank": r, **{f: int(v) if f in STEP_COUNTS else float(v)
                                               for f, v in zip(STEP_FIELDS, p["step"])}}
            if r == 0:
                row["replanned"] = int(info is not None and not info.declined)
                row["declined"] = int(info is not None and info.declined)
                row["check_skipped"] = int(events.get("check_skipped", 0))
                row["switched"] = int(events.get("switched", 0))
                row["planned_at"] = int(events.get("planned_at", -1))
                row["predicted_max_rank_tokens"] = (float(info.predicted_rank_tokens.max(axis=1).mean())
                                                    if info is not None else float("nan"))
                row["plan_s"] = info.seconds_predict + info.seconds_plan if info is not None else float("nan")
                row["measured_max_rank_tokens"] = float(measured.max(axis=1).mean())
                row["balancedness"] = float((measured.mean(axis=1) / np.maximum(measured.max(axis=1), 1)).mean())
            self.step_rows.append(row)
        return routing

    def abort(self) -> None:
        """Remove the staged files and release the folder (nothing to do after :meth:`finish`)."""
        if self._stack is None:
            return
        try:
            self.writer.abort()
        except Exception:
            pass
        finally:
            stack, self._stack = self._stack, None
            stack.__exit__(RunAborted, RunAborted(), None)        # an error: the staging folder is removed

    def finish(self, placement) -> dict:
        import pandas as pd

        from moe_gps.tables import format_table

        self.writer.close()
        cols = ["step", "rank", "layer", *LAYER_FIELDS, "share_tokens"]
        layers = pd.DataFrame(np.concatenate(self.layer_rows), columns=cols)
        for c in ("step", "rank", "layer", "pairs_local", "expert_tokens", "pairs_sent_remote"):
            layers[c] = layers[c].astype(np.int64)
        steps = pd.DataFrame(self.step_rows)
        timings_path, steps_path = self.dir / self.cfg.output.timings, self.dir / self.cfg.output.steps
        write_csv_atomic(self.stage / self.cfg.output.timings, layers, exact=EXACT_FLOATS)
        write_csv_atomic(self.stage / self.cfg.output.steps, steps, exact=EXACT_FLOATS)
        save_placement(placement, self.stage / "placement.yaml")

        w = self.cfg.duplication.warmup_steps if self.mode != "off" else 0
        post = layers[layers.step >= min(w, int(layers.step.max()))]
        per = post.groupby(["step", "layer"])
        per_layer = per.expert_tokens.max().groupby("layer").mean()
        mean_layer = per.expert_tokens.mean().groupby("layer").mean()
        t = post.groupby("layer")[["attention_s", "counts_s", "dispatch_s", "expert_s", "combine_s"]].mean() * 1e3
        rows = [{"layer": int(l), "max_tokens": per_layer[l], "mean_tokens": mean_layer[l],
                 "balancedness": mean_layer[l] / per_layer[l] if per_layer[l] else 1.0,
                 **{c: t.loc[l, c] for c in t.columns}} for l in per_layer.index]
        table = format_table(rows, [("layer", "layer", ""), ("max_tokens", "max rank pairs", ".1f"),
                                    ("mean_tokens", "mean rank pairs", ".1f"), ("balancedness", "balancedness", ".3f"),
                                    ("attention_s", "attention ms", ".2f"), ("counts_s", "counts ms", ".2f"),
                                    ("dispatch_s", "dispatch ms", ".2f"), ("expert_s", "experts ms", ".2f"),
                                    ("combine_s", "combine ms", ".2f")],
                             title=f"per layer, steps >= {min(w, int(layers.step.max()))} (means over steps; "
                                   f"pairs = (token, expert) assignments computed by a rank)")
        r0 = steps[steps["rank"] == 0]
        moved = steps.bytes_sent.sum()
        extra = "".join(f", {int(r0[c].sum())} {what}" for c, what in (("declined", "declined by min_gain"),
                                                                       ("check_skipped", "check(s) skipped in a move"))
                        if r0[c].sum())
        tail = (f"{len(r0)} steps, mean step {r0.step_s.mean() * 1e3:.1f} ms; {int(r0.replanned.sum())} re-plan(s)"
                f"{extra}, "
                f"{moved / 1e6:.2f} MB of expert weights moved\n"
                f"wrote {self.trace_path}, {timings_path}, {steps_path}, {self.dir / 'placement.yaml'}, "
                f"{self.dir / 'summary.json'}")
        # the table's rows (phase times in ms, as printed) and the totals
        summary = {"table": table + "\n" + tail, "trace": str(self.trace_path), "timings": str(timings_path),
                   "steps": str(steps_path), "max_rank_tokens": float(per_layer.mean()),
                   "balancedness": float((mean_layer / per_layer).mean()), "mean_step_s": float(r0.step_s.mean()),
                   "per_layer": [{(k[:-2] + "_ms" if k.endswith("_s") else k): (v if k == "layer" else float(v))
                                  for k, v in row.items()} for row in rows]}
        write_text_atomic(self.stage / "summary.json", json.dumps({k: v for k, v in summary.items() if k != "table"},
                                                                  indent=2) + "\n")
        stack, self._stack = self._stack, None
        stack.close()                   # the files move into the folder together, the lock is released
        return summary

