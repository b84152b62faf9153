"""Reading traces: whole (:func:`load_trace`), step by step (:func:`iter_steps`), or only
checked (:func:`validate_trace`).

All three read the file in chunks of whole steps and validate each chunk as it arrives
(:mod:`moe_gps.trace.validate`, vectorised), so memory beyond the arrays a trace keeps is
that of one chunk, and every bad file gets the same one-line error whichever way it is read.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moe_gps.errors import UserError, environment_error
from moe_gps.files import input_file
from moe_gps.outputs import arrow_path
from moe_gps.trace.data import CountsTrace, StepRouting, StepStore, TokensTrace
from moe_gps.trace.meta import META_KEY, TOKENS_OPTIONAL_COLUMNS, TraceMeta
from moe_gps.trace.sniff import import_hint
from moe_gps.trace.validate import (CountsChunks, StepGap, TokenRows, UnsortedRows, check_columns, counts_array,
                                    token_rows)


def _open(path: str | os.PathLike) -> tuple[pq.ParquetFile, TraceMeta, str]:
    where = str(path)
    p = input_file(path, what="a Parquet trace")
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
        pf = pq.ParquetFile(arrow_path(p), pre_buffer=False)  # read column pages as needed: less memory per chunk
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
        cols[name] = _numpy(col)
    return cols


def _numpy(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A null-free integer or floating-point column as a read-only NumPy view of its Arrow buffer (the
    chunks joined first, in Arrow's memory): Arrow's own conversion imports pandas on its first use, a
    third of a second that reading a trace need not wait for."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    dtype = np.dtype(col.type.to_pandas_dtype())
    if not len(col):
        return np.empty(0, dtype)
    return np.frombuffer(col.buffers()[1], dtype=dtype, count=len(col), offset=col.offset * dtype.itemsize)


#: rows read and validated at a time (whole steps: a step longer than this is read whole)
CHUNK_ROWS = 1 << 18
#: a counts trace whose array would take more bytes is kept in a temporary file, not in memory
SPILL_BYTES = 256 << 20


def load_trace(path: str | os.PathLike, chunk_rows: int = CHUNK_ROWS,
               spill_bytes: int | None = None) -> TokensTrace | CountsTrace:
    """Load and validate a whole trace (tokens or counts kind).

    Rows are read and validated ``chunk_rows`` at a time straight into the trace's arrays,
    so memory beyond those arrays stays that of a few chunks (one validated, the next ones
    decoded meanwhile) whatever the number of steps.
    A counts trace whose array would take more than ``spill_bytes`` (default :data:`SPILL_BYTES`)
    is kept in a temporary file instead (:class:`~moe_gps.trace.data.StepStore`), so that
    simulating it holds only the steps in use. A file whose rows are not in step order is read
    whole and sorted (more memory), and so is one with a missing step (which reading it whole
    reports, or finds later in the file).
    """
    pf, meta, where = _open(path)
    try:
        if meta.kind == "counts":
            spill = SPILL_BYTES if spill_bytes is None else spill_bytes
            return CountsTrace(meta, _gather_counts(_count_chunks(pf, meta, where, chunk_rows), pf, meta, spill))
        return _gather_tokens(_token_chunks(pf, meta, where, chunk_rows), pf, meta)
    except (UnsortedRows, StepGap):  # out of step order (a missing step may come later): read it whole
        pass                         # outside the handler, so that the partly filled arrays are freed first
    try:
        table = pf.read()
    except (pa.ArrowException, OSError) as err:
        raise _damaged(where, err) from None
    cols = _columns(table, where, 0)
    if meta.kind == "counts":
        return CountsTrace(meta, counts_array(cols, meta, where))
    rows = token_rows(cols, meta, where)
    return TokensTrace(meta, rows.experts, rows.step_offsets, rows.weights, **rows.extras)


def validate_trace(path: str | os.PathLike, chunk_rows: int = CHUNK_ROWS) -> tuple[TraceMeta, int]:
    """Fully validate a trace without keeping its arrays; returns (metadata, number of steps).

    Memory is that of one chunk of ``chunk_rows`` rows (a file out of step order is loaded whole).
    """
    pf, meta, where = _open(path)
    try:
        if meta.kind == "counts":
            return meta, sum(len(c) for c in _count_chunks(pf, meta, where, chunk_rows))
        return meta, sum(len(rows.steps) for rows in _token_chunks(pf, meta, where, chunk_rows))
    except (UnsortedRows, StepGap):
        pass
    return meta, load_trace(path).num_steps


def iter_steps(path: str | os.PathLike, batch_rows: int = CHUNK_ROWS) -> Iterator[StepRouting]:
    """Stream a sorted tokens trace one step at a time, holding about ``batch_rows`` rows.

    Each chunk of whole steps is validated as it arrives; a step may span batches.
    """
    pf, meta, where = _open(path)
    if meta.kind != "tokens":
        raise UserError(f"{where}: step-by-step streaming needs a tokens trace, this one is {meta.kind}")
    for rows in _token_chunks(pf, meta, where, batch_rows):
        whole = TokensTrace(meta, rows.experts, rows.step_offsets, rows.weights, **rows.extras)
        for i, s in enumerate(rows.steps):
            routing = whole.step(i)
            routing.step = int(s)
            yield routing


def _step_chunks(pf: pq.ParquetFile, where: str, batch_rows: int) -> Iterator[tuple[pa.Table, int]]:
    """(rows of whole steps, file row of the first) in file order; UnsortedRows where steps go back."""
    pending: list[pa.RecordBatch] = []
    row0, last = 0, -1
    for batch in _read_ahead(pf.iter_batches(batch_size=batch_rows), where):
        if not batch.num_rows:
            continue
        pending.append(batch)
        table = pa.Table.from_batches(pending)
        step = _numpy(table.column("step"))
        if step[0] < last or (step[1:] < step[:-1]).any():
            raise UnsortedRows(where)
        complete = int(np.searchsorted(step, step[-1], side="left"))  # rows before the last step
        if complete == 0:
            continue
        yield table.slice(0, complete), row0
        last = int(step[complete - 1])
        row0 += complete
        pending = table.slice(complete).to_batches()
    if pending:
        yield pa.Table.from_batches(pending), row0


def _damaged(where: str, err: BaseException) -> BaseException:
    """What to raise for an error reading a Parquet file's pages (its footer did read): the machine's one
    line for running out of memory or a failing disk (:func:`~moe_gps.errors.environment_error`), else
    that the file is damaged."""
    machine = environment_error(err, flag=where)
    if machine is not None:
        return machine
    first = (str(err).splitlines() or [type(err).__name__])[0]
    return UserError(f"{where}: damaged Parquet data, its rows cannot be read ({first})")


def _read_ahead(batches: Iterator[pa.RecordBatch], where: str, depth: int = 2) -> Iterator[pa.RecordBatch]:
    """``batches`` in order, up to ``depth`` of the next ones decoded in a thread meanwhile (Arrow decodes
    without holding the GIL, so that reading overlaps the validation of the chunk before). A batch that
    does not decode is a :func:`_damaged` error about ``where``."""
    ready: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def read() -> None:
        try:
            for b in batches:
                if not put((b, None)):
                    return
            put((end, None))
        except BaseException as err:             # handed to the reader of the batches
            put((None, err))

    thread = threading.Thread(target=read, name="moe-gps-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            b, err = ready.get()
            if isinstance(err, (pa.ArrowException, OSError)):
                raise _damaged(where, err) from None
            if err is not None:
                raise err
            if b is end:
                return
            yield b
    finally:
        stop.set()
        thread.join()


def _token_chunks(pf: pq.ParquetFile, meta: TraceMeta, where: str, batch_rows: int) -> Iterator[TokenRows]:
    next_step = 0
    for table, row0 in _step_chunks(pf, where, batch_rows):
        rows = token_rows(_columns(table, where, row0), meta, where, row0=row0, first_step=next_step, sort=False)
        next_step = int(rows.steps[-1]) + 1
        yield rows


def _count_chunks(pf: pq.ParquetFile, meta: TraceMeta, where: str, batch_rows: int) -> Iterator[np.ndarray]:
    """int64 [steps of the chunk, layers, experts] per chunk, validated; the whole file's checks at the end."""
    chunks = CountsChunks(meta, where)
    for table, row0 in _step_chunks(pf, where, batch_rows):
        yield chunks.add(_columns(table, where, row0), row0)
    chunks.finish()


def _gather_tokens(chunks: Iterator[TokenRows], pf: pq.ParquetFile, meta: TraceMeta) -> TokensTrace:
    """Copy validated chunks into arrays sized once from the file's row count (rows = tokens x layers)."""
    n_max = pf.metadata.num_rows // meta.num_layers
    names = set(pf.schema_arrow.names)
    shape = (n_max, meta.num_layers, meta.top_k)
    experts = np.empty(shape, np.int16)
    weights = np.empty(shape, np.float32) if "weight_0" in names else None
    extras = {f: np.empty(n_max, TOKENS_OPTIONAL_COLUMNS[f]) for f in TOKENS_OPTIONAL_COLUMNS if f in names}
    offsets, n = [np.zeros(1, np.int64)], 0
    for rows in chunks:
        m = len(rows.experts)
        experts[n:n + m] = rows.experts
        if weights is not None:
            weights[n:n + m] = rows.weights
        for f, a in extras.items():
            a[n:n + m] = rows.extras[f]
        offsets.append(n + rows.step_offsets[1:])
        n += m
    # every validated row belongs to a token with all its layers, so n == n_max here
    return TokensTrace(meta, experts[:n], np.concatenate(offsets), None if weights is None else weights[:n],
                       **{f: a[:n] for f, a in extras.items()})


def _no_room(what: str, err: OSError, nbytes: int) -> UserError:
    return UserError(f"cannot {what} a temporary file for the counts of a long trace in {tempfile.gettempdir()} "
                     f"({err.strerror or err}); set TMPDIR to a folder with room for {nbytes / 1e9:.1f} GB")


def _gather_counts(chunks: Iterator[np.ndarray], pf: pq.ParquetFile, meta: TraceMeta,
                   spill_bytes: int) -> np.ndarray | StepStore:
    """Copy validated chunks into one array, sized for a file with every (step, layer, expert) row and
    grown (doubling) for one that leaves out zero counts; or, when that array would take more than
    ``spill_bytes``, append them to a temporary file read back a range of steps at a time
    (:class:`StepStore`: memory stays that of one chunk whatever the number of steps)."""
    L, E = meta.num_layers, meta.num_experts
    if pf.metadata.num_rows * 8 > spill_bytes:
        try:
            f = tempfile.TemporaryFile(prefix="moe-gps-counts-")
        except OSError as err:
            raise _no_room("make", err, pf.metadata.num_rows * 8) from None
        try:
            n = 0
            for c in chunks:
                f.write(np.ascontiguousarray(c, dtype=np.int64).tobytes())
                n += len(c)
            f.flush()
        except OSError as err:
            f.close()
            raise _no_room("write", err, pf.metadata.num_rows * 8) from None
        except BaseException:
            f.close()
            raise
        return StepStore(f, n, L, E)
    counts = np.empty((max(1, -(-pf.metadata.num_rows // (L * E))), L, E), np.int64)
    n = 0
    for c in chunks:
        if n + len(c) > len(counts):
            grown = np.empty((max(2 * len(counts), n + len(c)), L, E), np.int64)
            grown[:n] = counts[:n]
            counts = grown
        counts[n:n + len(c)] = c
        n += len(c)
    return counts[:n] if n < len(counts) else counts
