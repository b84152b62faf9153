"""Reading traces: whole (:func:`load_trace`) or step by step (:func:`iter_steps`).

Both go through the same vectorised validation (:mod:`moe_gps.trace.validate`), so
every bad file gets the same one-line error whichever way it is read.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moe_gps.errors import UserError
from moe_gps.files import input_file
from moe_gps.trace.data import CountsTrace, StepRouting, TokensTrace
from moe_gps.trace.meta import META_KEY, TraceMeta
from moe_gps.trace.sniff import import_hint
from moe_gps.trace.validate import check_columns, counts_array, token_rows


def _open(path: str | os.PathLike) -> tuple[pq.ParquetFile, TraceMeta, str]:
    where = str(path)
    p = input_file(path, what="a trace file")
    if p.stat().st_size == 0:
        raise UserError(f"{where}: empty file (0 bytes), not a Parquet trace")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise UserError(f"{where}: cannot read ({err.strerror or err})") from None
    if magic != b"PAR1":
        raise UserError(f"{where}: not a Parquet file; {import_hint(p)}")
    try:
        pf = pq.ParquetFile(p)
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"{where}: not a Parquet file ({str(err).splitlines()[0]})") from None
    kv = pf.schema_arrow.metadata or {}
    if META_KEY not in kv:
        raise UserError(f"{where}: Parquet file has no 'moe_gps' metadata entry, so it is not a MoE-GPS "
                        "trace (convert other formats with `moe-gps trace import`)")
    meta = TraceMeta.from_json(kv[META_KEY], where)
    check_columns(pf.schema_arrow.names, meta, where)
    if pf.metadata.num_rows == 0:
        raise UserError(f"{where}: the trace has no rows")
    return pf, meta, where


def read_meta(path: str | os.PathLike) -> TraceMeta:
    """The metadata of a trace, after checking that the file opens and its columns fit."""
    return _open(path)[1]


def _columns(batch: pa.Table | pa.RecordBatch, where: str, row0: int) -> dict[str, np.ndarray]:
    cols = {}
    for name, col in zip(batch.column_names, batch.columns):
        if col.null_count:
            mask = col.is_null()
            if isinstance(mask, pa.ChunkedArray):
                mask = mask.combine_chunks()
            r = int(np.argmax(mask.to_numpy(zero_copy_only=False)))
            raise UserError(f"{where}: column '{name}', row {row0 + r}: missing (null) value")
        is_weight = name.startswith("weight_")
        ok = pa.types.is_floating(col.type) if is_weight else pa.types.is_integer(col.type)
        if not ok:
            want = "a floating-point" if is_weight else "an integer"
            raise UserError(f"{where}: column '{name}' has type {col.type}, expected {want} type")
        cols[name] = col.to_numpy() if isinstance(col, pa.ChunkedArray) else col.to_numpy(zero_copy_only=False)
    return cols


def load_trace(path: str | os.PathLike) -> TokensTrace | CountsTrace:
    """Load and validate a whole trace (tokens or counts kind)."""
    pf, meta, where = _open(path)
    cols = _columns(pf.read(), where, 0)
    if meta.kind == "counts":
        return CountsTrace(meta, counts_array(cols, meta, where))
    rows = token_rows(cols, meta, where)
    return TokensTrace(meta, rows.experts, rows.step_offsets, rows.weights, **rows.extras)


def iter_steps(path: str | os.PathLike, batch_rows: int = 1 << 20) -> Iterator[StepRouting]:
    """Stream a sorted tokens trace one step at a time, holding about ``batch_rows`` rows.

    Each chunk of whole steps is validated as it arrives; a step may span batches.
    """
    pf, meta, where = _open(path)
    if meta.kind != "tokens":
        raise UserError(f"{where}: step-by-step streaming needs a tokens trace, this one is {meta.kind}")
    pending: list[pa.RecordBatch] = []
    row0, next_step = 0, 0
    for batch in pf.iter_batches(batch_size=batch_rows):
        pending.append(batch)
        last_step = batch.column("step")[-1].as_py()
        table = pa.Table.from_batches(pending)
        step_col = table.column("step").to_numpy()
        complete = int(np.searchsorted(step_col, last_step, side="left")) if (np.diff(step_col) >= 0).all() \
            else len(step_col)  # unsorted: let validation report it
        if complete == 0:
            continue
        yield from _emit(table.slice(0, complete), meta, where, row0, next_step)
        next_step = int(step_col[complete - 1]) + 1
        row0 += complete
        pending = table.slice(complete).to_batches()
    if pending:
        yield from _emit(pa.Table.from_batches(pending), meta, where, row0, next_step)


def _emit(table: pa.Table, meta: TraceMeta, where: str, row0: int, first_step: int) -> Iterator[StepRouting]:
    rows = token_rows(_columns(table, where, row0), meta, where, row0=row0, whole=False, first_step=first_step)
    whole = TokensTrace(meta, rows.experts, rows.step_offsets, rows.weights, **rows.extras)
    for i, s in enumerate(rows.steps):
        routing = whole.step(i)
        routing.step = int(s)
        yield routing
