"""In-memory traces: numpy arrays, no per-row Python objects.

A tokens trace keeps every token of every step in one array ``experts [N, L, k]``
(N = tokens over all steps) with CSR-style ``step_offsets [S + 1]``: step ``s`` is
rows ``step_offsets[s]:step_offsets[s + 1]``. :meth:`TokensTrace.step` returns that
step as a :class:`StepRouting` of views, i.e. the per-step ``[tokens, layers, k]``
array of the format.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import BinaryIO, Iterator

import numpy as np

from moe_gps.trace.meta import TraceMeta


@dataclass
class StepRouting:
    """The routing of one step (forward pass).

    experts:  int16 [tokens, layers, k], chosen logical experts, highest gate weight first
    weights:  float32 [tokens, layers, k] or None, gate weights
    token_id: int32 [tokens] or None, vocabulary ids
    seq, pos: int32 [tokens] or None, request id and position in it
    rank:     int16 [tokens] or None, EP/DP rank that holds the token before dispatch
    """

    step: int
    experts: np.ndarray
    weights: np.ndarray | None = None
    token_id: np.ndarray | None = None
    seq: np.ndarray | None = None
    pos: np.ndarray | None = None
    rank: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    def counts(self, num_experts: int) -> np.ndarray:
        """Tokens per expert, int64 [layers, experts]."""
        return expert_counts(self.experts, np.array([0, self.num_tokens]), num_experts)[0]


OPTIONAL_TOKEN_FIELDS = ("token_id", "seq", "pos", "rank")


@dataclass
class TokensTrace:
    """Per-token routing of a whole trace.

    experts:      int16 [N, layers, k] over all steps, step-major
    step_offsets: int64 [steps + 1], step s = rows step_offsets[s]:step_offsets[s+1]
    weights:      float32 [N, layers, k] or None
    token_id, seq, pos: int32 [N] or None;  rank: int16 [N] or None
    """

    meta: TraceMeta
    experts: np.ndarray
    step_offsets: np.ndarray
    weights: np.ndarray | None = None
    token_id: np.ndarray | None = None
    seq: np.ndarray | None = None
    pos: np.ndarray | None = None
    rank: np.ndarray | None = None

    @property
    def num_steps(self) -> int:
        return len(self.step_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def tokens_per_step(self) -> np.ndarray:
        """int64 [steps]."""
        return np.diff(self.step_offsets)

    def step(self, s: int) -> StepRouting:
        lo, hi = int(self.step_offsets[s]), int(self.step_offsets[s + 1])
        extra = {f: (None if getattr(self, f) is None else getattr(self, f)[lo:hi])
                 for f in OPTIONAL_TOKEN_FIELDS}
        weights = None if self.weights is None else self.weights[lo:hi]
        return StepRouting(s, self.experts[lo:hi], weights, **extra)

    def steps(self):
        """Iterate :class:`StepRouting` in step order."""
        for s in range(self.num_steps):
            yield self.step(s)

    def counts(self) -> np.ndarray:
        """Tokens per expert, int64 [steps, layers, experts]."""
        return expert_counts(self.experts, self.step_offsets, self.meta.num_experts)

    def select_steps(self, steps: np.ndarray | list[int]) -> "TokensTrace":
        """A new trace holding the given steps (renumbered from 0, in the given order)."""
        steps = np.asarray(steps, dtype=np.int64)
        lo, hi = self.step_offsets[steps], self.step_offsets[steps + 1]
        rows = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)]) if len(steps) else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(hi - lo)]).astype(np.int64)
        take = lambda a: None if a is None else a[rows]  # noqa: E731
        return TokensTrace(self.meta, self.experts[rows], offsets, take(self.weights),
                           **{f: take(getattr(self, f)) for f in OPTIONAL_TOKEN_FIELDS})


#: counts read at a time from a :class:`StepStore` (elements)
COUNT_CHUNK_ELEMENTS = 1 << 22


class StepReader:
    """int64 counts [steps, layers, experts] read a range of steps at a time (:meth:`read`) instead of
    held as one array. Indexing takes one step or a range of steps; ``np.asarray`` reads the whole
    array; a pickled or copied reader arrives as the whole array (an ndarray)."""

    dtype = np.dtype(np.int64)
    ndim = 3
    shape: tuple[int, int, int]

    def read(self, lo: int, hi: int) -> np.ndarray:
        """int64 [hi - lo, layers, experts]: steps lo..hi-1 (clipped to the reader's steps)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __getitem__(self, key: int | np.integer | slice) -> np.ndarray:
        if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"step {key} out of range for {len(self)} steps")
            return self.read(i, i + 1)[0]
        if isinstance(key, slice) and key.step in (None, 1):
            lo, hi, _ = key.indices(len(self))
            return self.read(lo, max(lo, hi))
        raise TypeError(f"{type(self).__name__} takes one step or a range of steps (start:stop)")

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self.read(0, len(self))              # a new array (TokenCounts, whose reads are views, copies it)
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)

    def __reduce__(self) -> tuple:
        return (np.asarray, (self.read(0, len(self)),))


class StepStore(StepReader):
    """Counts kept in a file rather than in memory (a long counts trace,
    :func:`moe_gps.trace.reader.load_trace`); a read is a copy.

    ``file``: an open binary file holding the array in C order from offset 0 (a temporary file:
    it goes away when closed).
    """

    def __init__(self, file: BinaryIO, num_steps: int, num_layers: int, num_experts: int) -> None:
        self.file, self.shape = file, (int(num_steps), int(num_layers), int(num_experts))
        self._lock = threading.Lock()             # for the seek + read fallback where pread is missing

    def read(self, lo: int, hi: int) -> np.ndarray:
        lo, hi = max(0, int(lo)), min(len(self), int(hi))
        out = np.empty((max(0, hi - lo),) + self.shape[1:], dtype=self.dtype)
        if not out.size:
            return out
        view, offset = memoryview(out.reshape(-1)).cast("B"), lo * out[0].nbytes
        done = 0
        while done < len(view):
            if hasattr(os, "preadv"):
                n = os.preadv(self.file.fileno(), [view[done:]], offset + done)
            else:
                with self._lock:
                    self.file.seek(offset + done)
                    n = self.file.readinto(view[done:])
            if not n:
                raise OSError(f"step store: the file ended after {offset + done} bytes")
            done += n
        return out


class TokenCounts(StepReader):
    """The expert counts of a tokens trace's steps, each step counted the first time it is read (a
    read of a few steps counts only those); a read is a read-only view of the counts kept."""

    def __init__(self, trace: "TokensTrace") -> None:
        self.trace = trace
        self.shape = (trace.num_steps, trace.meta.num_layers, trace.meta.num_experts)
        self._counts = np.empty(self.shape, dtype=np.int64)
        self._done = np.zeros(trace.num_steps, dtype=bool)

    def read(self, lo: int, hi: int) -> np.ndarray:
        lo = max(0, int(lo))
        hi = max(lo, min(len(self), int(hi)))
        t = self.trace
        for s in lo + np.flatnonzero(~self._done[lo:hi]):
            a, b = int(t.step_offsets[s]), int(t.step_offsets[s + 1])
            self._counts[s] = expert_counts(t.experts[a:b], np.array([0, b - a]), self.shape[2])[0]
            self._done[s] = True
        out = self._counts[lo:hi]
        out.flags.writeable = False                  # a view: what one reader changed, all would see
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self.read(0, len(self))                  # a view of the counts kept: copied where asked to
        if dtype is not None and a.dtype != dtype:
            return a.astype(dtype)
        return a.copy() if copy else a


@dataclass
class CountsTrace:
    """Per-expert load only.

    count_array: int64 [steps, layers, experts], (token, expert) assignments per expert, in memory
    or in a :class:`StepReader` (a :class:`StepStore`: a long trace in a file; :class:`TokenCounts`:
    a tokens trace's, counted as read); :meth:`counts_range` reads some steps of any.
    """

    meta: TraceMeta
    count_array: np.ndarray | StepReader

    @property
    def num_steps(self) -> int:
        return int(self.count_array.shape[0])

    @cached_property
    def tokens_per_step(self) -> np.ndarray:
        """int64 [steps]: layer 0's assignments / top_k (all layers agree after validation)."""
        if isinstance(self.count_array, np.ndarray):
            return self.count_array[:, 0, :].sum(axis=1) // self.meta.top_k
        out = np.zeros(self.num_steps, dtype=np.int64)
        for lo, part in self.chunks():
            out[lo:lo + len(part)] = part[:, 0, :].sum(axis=1)
        return out // self.meta.top_k

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first step, int64 [steps, layers, experts]) over the whole trace, about
        :data:`COUNT_CHUNK_ELEMENTS` counts at a time (a spilled trace stays in its file)."""
        step = max(1, COUNT_CHUNK_ELEMENTS // max(1, self.meta.num_layers * self.meta.num_experts))
        for lo in range(0, self.num_steps, step):
            yield lo, self.counts_range(lo, lo + step)

    def counts(self) -> np.ndarray:
        """int64 [steps, layers, experts], the whole array (read from its file for a spilled trace)."""
        return np.asarray(self.count_array)

    def counts_range(self, lo: int, hi: int) -> np.ndarray:
        """int64 [hi - lo, layers, experts]: the counts of steps lo..hi-1 only, the range clipped to the
        trace (a negative ``lo`` means step 0, not a step from the end); a view of an in-memory array,
        a copy read from the file of a spilled one."""
        return self.count_array[max(0, lo):max(0, hi)]


Trace = TokensTrace | CountsTrace


def slot_major(experts: np.ndarray) -> np.ndarray:
    """intp [k, T, L]: a copy of ``experts`` int [T, L, k] laid out slot by slot, for index sums (numpy
    adds int16 ids to intp offsets several times slower with the short k axis last and mixed dtypes)."""
    out = np.empty((experts.shape[2],) + experts.shape[:2], dtype=np.intp)
    out[...] = experts.transpose(2, 0, 1)
    return out


#: tokens per bincount in :func:`expert_counts` (its key array is tokens x layers x k int64)
COUNT_TOKENS = 1 << 14


def expert_counts(experts: np.ndarray, step_offsets: np.ndarray, num_experts: int) -> np.ndarray:
    """Bincount of expert ids per (step, layer).

    experts: int [N, layers, k];  step_offsets: [steps + 1]  ->  int64 [steps, layers, experts]

    Counted a group of whole steps (about ``COUNT_TOKENS`` tokens, fewer where their keys would
    pass 2**17, a cache-sized array) at a time, so the temporary keys stay small whatever the
    trace's size; the keys are made in the routing's own layout ([tokens, layers k]: a cast,
    then sums in one dtype along whole rows).
    """
    _, num_layers, k = experts.shape
    group = max(1, min(COUNT_TOKENS, (1 << 17) // max(1, num_layers * k)))    # tokens per bincount
    num_steps = len(step_offsets) - 1
    cells = num_layers * num_experts
    out = np.empty((num_steps, num_layers, num_experts), dtype=np.int64)
    layer = (np.arange(num_layers, dtype=np.intp) * num_experts).repeat(k)     # [L k]
    s0 = 0
    while s0 < num_steps:
        s1 = int(np.searchsorted(step_offsets, step_offsets[s0] + group, side="right")) - 1
        s1 = min(max(s1, s0 + 1), num_steps)
        lo, hi = int(step_offsets[s0]), int(step_offsets[s1])
        step_key = np.repeat(np.arange(s1 - s0, dtype=np.intp) * cells, np.diff(step_offsets[s0:s1 + 1]))
        key = experts[lo:hi].astype(np.intp).reshape(hi - lo, num_layers * k)  # [n, L k]
        key += layer
        key += step_key[:, None]
        out[s0:s1] = np.bincount(key.ravel(), minlength=(s1 - s0) * cells).reshape(s1 - s0, num_layers, num_experts)
        s0 = s1
    return out
