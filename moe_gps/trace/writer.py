"""Writing traces atomically: a temporary name beside the target, renamed when complete.

:class:`TraceWriter` appends one step at a time to a tokens trace, :class:`CountsWriter`
blocks of steps to a counts trace (for recorders and generators that produce more than
fits in memory); :func:`write_trace` writes a whole in-memory trace through them.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moe_gps.atomic import atomic_path
from moe_gps.outputs import arrow_path
from moe_gps.trace.data import OPTIONAL_TOKEN_FIELDS, CountsTrace, StepRouting, TokensTrace
from moe_gps.trace.meta import (
    COUNTS_COLUMNS,
    META_KEY,
    TOKENS_KEY_COLUMNS,
    TOKENS_OPTIONAL_COLUMNS,
    TraceMeta,
    expert_columns,
    weight_columns,
)

ROW_GROUP_ROWS = 1 << 20


def tokens_schema(meta: TraceMeta, with_weights: bool, optional: tuple[str, ...]) -> pa.Schema:
    fields = [pa.field(n, pa.from_numpy_dtype(np.dtype(t))) for n, t in TOKENS_KEY_COLUMNS.items()]
    fields += [pa.field(c, pa.int16()) for c in expert_columns(meta.top_k)]
    if with_weights:
        fields += [pa.field(c, pa.float32()) for c in weight_columns(meta.top_k)]
    fields += [pa.field(n, pa.from_numpy_dtype(np.dtype(TOKENS_OPTIONAL_COLUMNS[n]))) for n in optional]
    return pa.schema(fields, metadata={META_KEY: meta.to_json().encode()})


class _ParquetOut:
    """A Parquet file written under a temporary name and moved to ``path`` on :meth:`close`
    (:meth:`abort`, or leaving the ``with`` block on an exception, leaves nothing there)."""

    def __init__(self, path: str | os.PathLike, schema: pa.Schema):
        self.schema = schema
        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(atomic_path(arrow_path(path)))
        try:
            self._writer = pq.ParquetWriter(str(self._tmp), schema, compression="zstd")
        except BaseException as err:
            self._stack.__exit__(type(err), err, err.__traceback__)  # removes the temporary file
            raise

    def _flush(self) -> None:
        """Write what is buffered (subclasses that buffer)."""

    def close(self) -> None:
        """Finish the file and move it into place."""
        try:
            self._flush()
            self._writer.close()
        except BaseException as err:
            self._fail(err)
        self._stack.close()

    def _fail(self, err: BaseException) -> None:
        """A write failed: drop the temporary file and raise (a full disk becomes one UserError line)."""
        with contextlib.suppress(Exception):
            self._writer.close()
        self._stack.__exit__(type(err), err, err.__traceback__)   # raises the UserError of a file-system failure
        raise err

    def abort(self) -> None:
        """Drop the temporary file; nothing appears at ``path``."""
        with contextlib.suppress(Exception):
            self._writer.close()
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TraceWriter(_ParquetOut):
    """Append steps to a tokens trace; the file appears at ``path`` only on :meth:`close`.

    Use as a context manager. Steps are numbered 0, 1, 2, ... in the order written.
    ``optional`` names the per-token columns to write (subset of token_id, seq, pos, rank);
    every step must then provide them.
    """

    def __init__(self, path: str | os.PathLike, meta: TraceMeta, with_weights: bool = False,
                 optional: tuple[str, ...] = ()):
        if meta.kind != "tokens":
            raise ValueError("TraceWriter writes tokens traces; use write_trace for counts")
        unknown = set(optional) - set(OPTIONAL_TOKEN_FIELDS)
        if unknown:
            raise ValueError(f"unknown optional columns {sorted(unknown)}")
        self.meta, self.with_weights, self.optional = meta, with_weights, tuple(optional)
        super().__init__(path, tokens_schema(meta, with_weights, self.optional))
        self._buffer: list[pa.Table] = []
        self._buffered_rows = 0
        self.num_steps = 0

    def write_step(self, routing: StepRouting) -> None:
        """Append one step. routing.experts: int [tokens, layers, k]."""
        e = np.asarray(routing.experts)
        T, L, k = e.shape
        if (L, k) != (self.meta.num_layers, self.meta.top_k):
            raise ValueError(f"step has layers×k = {L}×{k}, trace has {self.meta.num_layers}×{self.meta.top_k}")
        cols = {
            "step": np.full(T * L, self.num_steps, dtype=np.int32),
            "token": np.repeat(np.arange(T, dtype=np.int32), L),
            "layer": np.tile(np.arange(L, dtype=np.int16), T),
        }
        for j, name in enumerate(expert_columns(k)):
            cols[name] = e[:, :, j].reshape(-1).astype(np.int16)
        if self.with_weights:
            w = np.asarray(routing.weights, dtype=np.float32)
            for j, name in enumerate(weight_columns(k)):
                cols[name] = w[:, :, j].reshape(-1)
        for name in self.optional:
            value = getattr(routing, name)
            if value is None:
                raise ValueError(f"step {self.num_steps} lacks column {name!r}")
            cols[name] = np.repeat(np.asarray(value, dtype=TOKENS_OPTIONAL_COLUMNS[name]), L)
        self._buffer.append(pa.table(cols, schema=self.schema))
        self._buffered_rows += T * L
        self.num_steps += 1
        if self._buffered_rows >= ROW_GROUP_ROWS:
            try:
                self._flush()
            except BaseException as err:
                self._fail(err)

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.concat_tables(self._buffer), row_group_size=ROW_GROUP_ROWS)
            self._buffer, self._buffered_rows = [], 0


class CountsWriter(_ParquetOut):
    """Append steps to a counts trace; the file appears at ``path`` only on :meth:`close`.

    Use as a context manager. :meth:`write_steps` takes int [steps, layers, experts] blocks,
    numbered on from the steps already written; one row per (step, layer, expert), zeros
    included, in (step, layer, expert) order, so the reader can stream the file.
    """

    def __init__(self, path: str | os.PathLike, meta: TraceMeta):
        if meta.kind != "counts":
            raise ValueError("CountsWriter writes counts traces; use TraceWriter for tokens")
        self.meta = meta
        super().__init__(path, pa.schema([pa.field(n, pa.from_numpy_dtype(np.dtype(t)))
                                          for n, t in COUNTS_COLUMNS.items()],
                                         metadata={META_KEY: meta.to_json().encode()}))
        L, E = meta.num_layers, meta.num_experts
        self._layer = np.repeat(np.arange(L, dtype=np.int16), E)  # [L * E], one step's rows
        self._expert = np.tile(np.arange(E, dtype=np.int16), L)
        self.num_steps = 0

    def write_steps(self, counts: np.ndarray) -> None:
        """Append steps. counts: int [steps, layers, experts]."""
        c = np.asarray(counts)
        L, E = self.meta.num_layers, self.meta.num_experts
        if c.ndim != 3 or c.shape[1:] != (L, E):
            raise ValueError(f"counts of shape {c.shape}, trace has [steps, {L}, {E}]")
        per_group = max(1, ROW_GROUP_ROWS // (L * E))
        for lo in range(0, len(c), per_group):
            block = c[lo:lo + per_group]
            n = len(block)
            cols = {"step": np.repeat(np.arange(self.num_steps, self.num_steps + n, dtype=np.int32), L * E),
                    "layer": np.tile(self._layer, n), "expert": np.tile(self._expert, n),
                    "count": block.reshape(-1).astype(np.int64, copy=False)}
            try:
                self._writer.write_table(pa.table(cols, schema=self.schema), row_group_size=ROW_GROUP_ROWS)
            except BaseException as err:
                self._fail(err)
            self.num_steps += n


def write_trace(path: str | os.PathLike, trace: TokensTrace | CountsTrace) -> None:
    """Write a whole trace atomically, in the layout the reader expects (sorted rows)."""
    if isinstance(trace, CountsTrace):
        with CountsWriter(path, trace.meta) as writer:
            for _, part in trace.chunks():
                writer.write_steps(part)
        return
    optional = tuple(f for f in OPTIONAL_TOKEN_FIELDS if getattr(trace, f) is not None)
    with TraceWriter(path, trace.meta, with_weights=trace.weights is not None, optional=optional) as writer:
        for routing in trace.steps():
            writer.write_step(routing)
