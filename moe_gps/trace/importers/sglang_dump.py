"""SGLang expert-distribution recorder dumps -> counts kind.

SGLang started with ``--expert-distribution-recorder-mode stat`` records, for every
forward pass, how many tokens each *physical* expert slot received on each rank; on
``/dump_expert_distribution_record`` rank 0 maps slots to logical experts, sums over
ranks and writes ``expert_distribution_recorder_<time>.pt`` (``torch.save``) in
``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR``, a dict::

    {"rank": 0,
     "logical_count": int32 tensor [buffer_size, num_layers, num_logical_experts],
     "average_utilization_rate_over_window": float or None}

Row i of ``logical_count`` is one forward pass. The buffer is circular
(``--expert-distribution-recorder-buffer-size``, by default the EPLB rebalance interval,
1000): rows never written are 0, and once more passes than rows were recorded the rows
are no longer in time order (SGLang does not save the write position). ``num_layers``
counts all decoder layers, so dense layers (e.g. DeepSeek's first three) are all zero.

The importer keeps the rows with any count (one step each, in row order, files in the
order given), drops layers that are zero in every kept row (recording the original
layer ids) and requires ``--top-k``: tokens per step = (sum of a layer's counts) / top_k.
The ``per_pass`` and ``per_token`` recorder modes write a different dict (``records``),
read by :mod:`moe_gps.trace.importers.sglang_records`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from moe_gps.errors import UserError
from moe_gps.tables import format_indices
from moe_gps.trace.importers.common import (
    ImportResult,
    check_sources,
    counts_tokens,
    counts_trace,
    make_meta,
    provenance,
    torch_load,
)

FORMAT = "sglang-dump"


def load_sglang_dump(path: Path) -> dict:
    """The dict of an SGLang expert-distribution dump: ``logical_count`` (stat) or ``records``."""
    obj = torch_load(path, "reading SGLang .pt dumps")
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}; an SGLang expert-distribution dump is a dict "
                        "with 'logical_count' or 'records'")
    if "logical_count" not in obj and "records" not in obj:
        raise UserError(f"{path}: no 'logical_count' or 'records' key (keys: {', '.join(map(str, obj))}); expected "
                        "an SGLang expert-distribution dump")
    return obj


def read_sglang_dump(path: Path, obj: dict) -> tuple[np.ndarray, dict[str, Any]]:
    """A stat dump -> (logical_count int64 [buffer, layers, experts], the other scalar fields)."""
    import torch  # present: torch_load checked

    lc = obj["logical_count"]
    if not isinstance(lc, torch.Tensor):
        raise UserError(f"{path}: 'logical_count' is a {type(lc).__name__}, expected a tensor")
    if lc.ndim != 3:
        raise UserError(f"{path}: 'logical_count' has shape {list(lc.shape)}, expected "
                        "[buffer, layers, experts]")
    if lc.is_floating_point() or lc.is_complex() or lc.dtype == torch.bool:
        raise UserError(f"{path}: 'logical_count' holds {lc.dtype} values, expected integer counts")
    counts = lc.to(torch.int64).numpy()
    neg = np.argwhere(counts < 0)
    if len(neg):
        r, layer, e = (int(x) for x in neg[0])
        raise UserError(f"{path}: 'logical_count' buffer row {r}, layer {layer}, expert {e}: negative count "
                        f"{counts[r, layer, e]}")
    others = {k: (v if isinstance(v, (int, float, str, type(None))) else repr(v)[:80])
              for k, v in obj.items() if k != "logical_count"}
    return counts, others


def import_sglang_dump(sources: Sequence[str | os.PathLike], *, top_k: int | None = None, model: str = "unknown",
                       dataset: str = "unknown") -> ImportResult:
    """Import SGLang expert-distribution dumps: ``stat`` ones into a counts trace (see the
    module docstring), ``per_pass`` / ``per_token`` ones through
    :func:`~moe_gps.trace.importers.sglang_records.import_sglang_records`.

    counts: [steps, moe layers, experts]; tokens_per_step = layer sum / top_k.
    """
    paths = check_sources(sources)
    objs = [load_sglang_dump(p) for p in paths]
    modes = ["records" if "records" in o else "stat" for o in objs]
    if len(set(modes)) > 1:
        raise UserError(f"{paths[modes.index('records')]} is a per_pass/per_token dump but {paths[modes.index('stat')]}"
                        " a stat dump; import them separately")
    if modes[0] == "records":
        from moe_gps.trace.importers.sglang_records import import_sglang_records
        return import_sglang_records(paths, objs, top_k=top_k, model=model, dataset=dataset)
    if top_k is None or top_k < 1:
        raise UserError("sglang-dump needs --top-k (the counts cannot tell how many experts each token chose)")
    arrays, kept_rows, fields, summary = [], [], {}, []
    for p, obj in zip(paths, objs):
        counts, others = read_sglang_dump(p, obj)
        if arrays and counts.shape[1:] != arrays[0].shape[1:]:
            raise UserError(f"{p}: {counts.shape[1]} layers x {counts.shape[2]} experts but {paths[0]} has "
                            f"{arrays[0].shape[1]} x {arrays[0].shape[2]}")
        rows = np.flatnonzero(counts.sum(axis=(1, 2)) > 0)
        arrays.append(counts[rows])
        kept_rows.append(rows)
        fields[str(p)] = others
        first = sum(len(x) for x in arrays[:-1])
        summary.append(f"{p}: buffer of {len(counts)} rows, {len(rows)} with counts"
                       + (f" (steps {first}..{first + len(rows) - 1})" if len(rows) else ""))
    counts = np.concatenate(arrays)
    if len(counts) == 0:
        raise UserError(f"{paths[0]}: every count is 0 (nothing was recorded)")
    moe_layers = np.flatnonzero(counts.sum(axis=(0, 2)) > 0)
    counts = counts[:, moe_layers, :]
    for p, a, rows in zip(paths, arrays, kept_rows):  # check per file to name file and buffer row
        counts_tokens(a[:, moe_layers, :], top_k, str(p), row_name="buffer row", row_ids=rows, layer_ids=moe_layers)
    tokens_per_step = (counts[:, 0, :].sum(axis=1) // top_k).astype(int).tolist()
    S, L, E = counts.shape
    dropped = sorted(set(range(arrays[0].shape[1])) - set(moe_layers.tolist()))
    summary.append(f"num_layers={L} (of {arrays[0].shape[1]} recorded; "
                   + (f"layers {format_indices(dropped)} are all zero and dropped" if dropped else "none dropped")
                   + f"), num_experts={E} (logical experts), top_k={top_k} (from --top-k)")
    summary.append(f"steps: one per buffer row with counts, in row order, files in the order given; {S} step(s) "
                   "(rows are in time order only while the buffer has not wrapped)")
    prov = provenance(
        FORMAT, [str(p) for p in paths],
        recorder_mode="stat",
        step_grouping="one step per non-empty buffer row, in row order",
        num_hidden_layers=int(arrays[0].shape[1]),
        top_k_source="from --top-k",
        buffer_rows_kept={str(p): format_indices(r) for p, r in zip(paths, kept_rows)},
        original_layer_ids=moe_layers.tolist(),
        dropped_zero_layers=dropped,
        tokens_per_step_formula="sum of one layer's counts / top_k (all layers agree)",
        dump_fields=fields,
    )
    meta = make_meta("counts", L, E, top_k, model, dataset, prov, tokens_per_step=tokens_per_step)
    return ImportResult(counts_trace(meta, counts), summary)

