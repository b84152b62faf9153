"""Aggregated expert-popularity JSON (the Fiddler benchmark layout) -> counts kind.

One file ``{"total_input_tokens": N, "expert_popularity": [[E counts] x L]}`` holds the
number of (token, expert) assignments of every expert of every layer, summed over a
whole run. Each file becomes one step, in the order given. The counts cannot tell top-k,
so ``--top-k`` is required; tokens per step = (sum of a layer's counts) / top_k, and every
layer must give the same figure. ``total_input_tokens`` (prompt tokens only, in Fiddler)
is recorded in the provenance, not used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from moe_gps.errors import UserError
from moe_gps.files import beyond_parser
from moe_gps.trace.importers.common import (
    ImportResult,
    check_sources,
    counts_trace,
    counts_tokens,
    make_meta,
    provenance,
    read_text,
)
from moe_gps.trace.meta import json_kind
from moe_gps.trace.validate import MAX_ASSIGNMENTS

FORMAT = "popularity-json"


def read_popularity(path: Path) -> tuple[np.ndarray, int | None]:
    """-> (counts int64 [layers, experts], total_input_tokens or None)."""
    text = read_text(path, '{"expert_popularity": [[counts] x layers]}')
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
    except (ValueError, RecursionError) as err:
        raise UserError(f"{path}: {beyond_parser(err, 'JSON')}") from None
    if not isinstance(data, dict) or "expert_popularity" not in data:
        raise UserError(f"{path}: no 'expert_popularity' field; expected "
                        "{\"total_input_tokens\": N, \"expert_popularity\": [[E counts] x L]}")
    rows = data["expert_popularity"]
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise UserError(f"{path}: 'expert_popularity' must be a list of layers, each a list of E counts")
    lengths = [len(r) for r in rows]
    if len(set(lengths)) > 1:
        layer = int(np.argmax(np.asarray(lengths) != lengths[0]))
        raise UserError(f"{path}: 'expert_popularity' layer {layer} has {lengths[layer]} experts but "
                        f"layer 0 has {lengths[0]}")
    for layer, row in enumerate(rows):
        for e, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"{path}: 'expert_popularity' layer {layer}, expert {e}: {json_kind(value)} is not a "
                                "count (a non-negative integer below 2^40)")
    try:
        counts = np.asarray(rows, dtype=np.float64)
    except OverflowError:                   # an integer too large for a float: infinite, far beyond 2^40
        counts = np.asarray([[float(v) if abs(v) < 2 ** 64 else np.inf if v > 0 else -np.inf for v in row]
                             for row in rows])
    if counts.ndim != 2 or counts.shape[1] == 0:
        raise UserError(f"{path}: 'expert_popularity' must be [layers][experts], got shape {list(counts.shape)}")
    bad = ~np.isfinite(counts) | (counts < 0) | (counts != np.round(counts)) | (counts >= MAX_ASSIGNMENTS)
    if bad.any():
        layer, e = np.unravel_index(int(np.argmax(bad)), bad.shape)
        raise UserError(f"{path}: 'expert_popularity' layer {layer}, expert {e}: {counts[layer, e]} is not a "
                        "count (a non-negative integer below 2^40)")
    total = data.get("total_input_tokens")
    if total is not None and (not isinstance(total, int) or isinstance(total, bool) or total < 0):
        raise UserError(f"{path}: 'total_input_tokens' must be a non-negative integer, got {total!r}")
    return counts.astype(np.int64), total


def import_popularity_json(sources: Sequence[str | os.PathLike], *, top_k: int, model: str = "unknown",
                           dataset: str = "unknown") -> ImportResult:
    """Import popularity JSON files into a counts trace, one step per file in the order given.

    counts: [steps, layers, experts]; tokens_per_step[s] = sum of any layer of step s / top_k.
    """
    if top_k is None or top_k < 1:
        raise UserError("popularity-json needs --top-k (the counts cannot tell how many experts each "
                        "token chose)")
    paths = check_sources(sources)
    arrays, totals, summary = [], {}, []
    for p in paths:
        counts, total = read_popularity(p)
        if top_k > counts.shape[1]:
            raise UserError(f"--top-k {top_k} exceeds the {counts.shape[1]} experts of {p}")
        if arrays and counts.shape != arrays[0].shape:
            raise UserError(f"{p}: {counts.shape[0]} layers x {counts.shape[1]} experts but {paths[0]} has "
                            f"{arrays[0].shape[0]} x {arrays[0].shape[1]}")
        tokens = int(counts_tokens(counts[None], top_k, str(p), row_name=None)[0])
        if tokens == 0:
            raise UserError(f"{p}: every count is 0 (no token)")
        arrays.append(counts)
        totals[str(p)] = total
        note = "" if total is None else f" (file says total_input_tokens={total})"
        summary.append(f"step {len(arrays) - 1}: {p}: {tokens} tokens = layer sum {tokens * top_k} / top_k "
                       f"{top_k}{note}")
    counts = np.stack(arrays)
    S, L, E = counts.shape
    tokens_per_step = (counts[:, 0, :].sum(axis=1) // top_k).astype(int).tolist()
    summary.append(f"num_layers={L}, num_experts={E} (array shape), top_k={top_k} (from --top-k)")
    summary.append(f"steps: one per file, in the order given; {S} step(s)")
    prov = provenance(
        FORMAT, [str(p) for p in paths],
        top_k_source="from --top-k",
        step_grouping="one step per file, in the order given",
        tokens_per_step_formula="sum of one layer's counts / top_k (all layers agree)",
        total_input_tokens=totals,
    )
    meta = make_meta("counts", L, E, top_k, model, dataset, prov, tokens_per_step=tokens_per_step)
    return ImportResult(counts_trace(meta, counts), summary)
