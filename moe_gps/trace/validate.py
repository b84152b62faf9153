"""Vectorised validation of trace rows, with one-line errors a user can act on.

Every error names the file, the column and the first bad row (0-based, in file order),
e.g. ``run.parquet: column 'expert_1', row 1042: expert id 9 outside [0, 8)``.
The functions here take the raw column arrays of a Parquet file (or of one streamed
chunk of it) and return validated numpy arrays; no Python loop runs over rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_gps.errors import UserError
from moe_gps.trace.meta import (
    COUNTS_COLUMNS,
    TOKENS_KEY_COLUMNS,
    TOKENS_OPTIONAL_COLUMNS,
    TraceMeta,
    expert_columns,
    weight_columns,
)


#: (token, expert) assignments a counts trace may hold per step and layer, and per layer in all:
#: far beyond any real batch, and small enough that no sum over experts or steps wraps int64
MAX_ASSIGNMENTS = 1 << 40
MAX_TOTAL = 1 << 62


def check_columns(names: list[str], meta: TraceMeta, where: str) -> bool:
    """Check a file's column names against its kind; returns whether weights are present."""
    if meta.kind == "counts":
        required, allowed = list(COUNTS_COLUMNS), set(COUNTS_COLUMNS)
        has_weights = False
    else:
        data_k = sum(1 for j in range(len(names)) if f"expert_{j}" in names)
        if data_k and data_k != meta.top_k:
            raise UserError(
                f"{where}: metadata says top_k={meta.top_k} but the file has {data_k} expert "
                f"column(s) (expert_0..expert_{data_k - 1})"
            )
        has_weights = any(n.startswith("weight_") for n in names)
        required = list(TOKENS_KEY_COLUMNS) + expert_columns(meta.top_k)
        if has_weights:
            required += weight_columns(meta.top_k)
        allowed = set(required) | set(TOKENS_OPTIONAL_COLUMNS)
    missing = [c for c in required if c not in names]
    if missing:
        raise UserError(f"{where}: missing required column(s) {', '.join(repr(c) for c in missing)}")
    extra = [c for c in names if c not in allowed]
    if extra:
        raise UserError(
            f"{where}: unexpected column(s) {', '.join(repr(c) for c in extra)} "
            f"for a {meta.kind} trace (allowed: {', '.join(sorted(allowed))})"
        )
    return has_weights


def _fail_at(where: str, column: str, row: int, problem: str) -> UserError:
    return UserError(f"{where}: column '{column}', row {row}: {problem}")


def _check_nonnegative(cols: dict[str, np.ndarray], names, where: str, row0: int) -> None:
    for name in names:
        bad = np.flatnonzero(cols[name] < 0)
        if len(bad):
            r = int(bad[0])
            raise _fail_at(where, name, row0 + r, f"negative value {cols[name][r]}")


def _check_expert_ids(ids: np.ndarray, column_names: list[str], num_experts: int,
                      where: str, row0: int) -> None:
    """ids: [rows, cols]; each must lie in [0, num_experts)."""
    bad = (ids < 0) | (ids >= num_experts)
    if bad.any():
        r, c = np.unravel_index(np.argmax(bad), bad.shape)
        raise _fail_at(
            where, column_names[c], row0 + int(r),
            f"expert id {ids[r, c]} outside [0, {num_experts}) (num_experts={num_experts} in the metadata)",
        )


def _check_layers(layer: np.ndarray, meta: TraceMeta, where: str, row0: int) -> None:
    """Layers must be 0..num_layers-1, with no gap and all present in ``layer``.

    ``layer`` holds whole steps (a chunk or the whole file). Every step that routes a token
    has rows for every layer, so a chunk that lacks a layer is wrong whatever other chunks hold.
    Layers are checked against num_layers before any array is sized by them.
    """
    over = np.flatnonzero(layer >= meta.num_layers)
    if len(over):
        r = int(over[0])
        raise _fail_at(where, "layer", row0 + r,
                       f"layer {layer[r]} but the metadata says num_layers={meta.num_layers}")
    present = np.bincount(layer.astype(np.int64), minlength=1) > 0  # [<= num_layers]
    top = len(present) - 1
    gaps = np.flatnonzero(~present)
    if len(gaps):
        gap = int(gaps[0])
        r = int(np.argmax(layer > gap))
        raise _fail_at(where, "layer", row0 + r,
                       f"gap in layer numbers: layer {gap} is missing but layer {layer[r]} is present")
    if top + 1 != meta.num_layers:
        raise UserError(
            f"{where}: column 'layer': the data has layers 0..{top} but the metadata says "
            f"num_layers={meta.num_layers}"
        )


class StepGap(UserError):
    """A step number is missing; read in chunks, the step may still come later in the file."""


class UnsortedRows(UserError):
    """Rows out of the order that reading in step chunks needs; loading the whole file sorts them."""

    def __init__(self, where: str):
        super().__init__(f"{where}: rows are not in (step, token, layer) order; streaming needs a sorted trace "
                         "(load it whole with load_trace, or rewrite it sorted with "
                         "write_trace(path, load_trace(path)))")


@dataclass
class TokenRows:
    """Validated rows of a tokens trace, grouped per token (see :class:`TokensTrace`)."""

    steps: np.ndarray          # int64 [steps_here], the step numbers present, ascending
    step_offsets: np.ndarray   # int64 [steps_here + 1]
    experts: np.ndarray        # int16 [n, L, k]
    weights: np.ndarray | None
    extras: dict[str, np.ndarray]


def token_rows(cols: dict[str, np.ndarray], meta: TraceMeta, where: str, row0: int = 0,
               first_step: int = 0, sort: bool = True) -> TokenRows:
    """Validate and group the rows of a tokens trace: the whole file, or a chunk of whole steps.

    cols: column name -> 1-D array in file order; ``row0`` is the file row of element 0;
    the steps must run ``first_step``, ``first_step + 1``, ... Rows out of (step, token,
    layer) order are sorted where ``sort``, else :class:`UnsortedRows` is raised.
    """
    k, L = meta.top_k, meta.num_layers
    _check_nonnegative(cols, TOKENS_KEY_COLUMNS, where, row0)
    for name, limit in (("step", 1 << 23), ("token", 1 << 24)):
        over = np.flatnonzero(cols[name] >= limit)
        if len(over):
            raise _fail_at(where, name, row0 + int(over[0]), f"value {cols[name][over[0]]} exceeds {limit - 1}")
    e_names = expert_columns(k)
    ids = np.stack([cols[c] for c in e_names], axis=1)
    _check_expert_ids(ids, e_names, meta.num_experts, where, row0)
    if k > 1:
        twice = np.zeros(len(ids), dtype=bool)  # column pairs, not a sort along rows: 3x faster for top-8
        for i in range(1, k):
            for j in range(i):
                twice |= cols[e_names[i]] == cols[e_names[j]]
        dup_rows = np.flatnonzero(twice)
        if len(dup_rows):
            r = int(dup_rows[0])
            row = ids[r]
            first = [j for j in range(k) if (row == row[j]).sum() > 1]
            raise _fail_at(where, e_names[first[1]], row0 + r,
                           f"expert {row[first[0]]} appears twice in one token's top-k "
                           f"({e_names[first[0]]} and {e_names[first[1]]})")
    weights = None
    if "weight_0" in cols:
        w_names = weight_columns(k)
        weights = np.stack([cols[c] for c in w_names], axis=1).astype(np.float32, copy=False)
        bad = ~np.isfinite(weights) | (weights < 0)
        if bad.any():
            r, c = np.unravel_index(np.argmax(bad), bad.shape)
            v = weights[r, c]
            kind = "NaN" if np.isnan(v) else "infinite" if np.isinf(v) else f"negative ({v})"
            raise _fail_at(where, w_names[c], row0 + int(r), f"gate weight is {kind}")
    layer = cols["layer"]
    _check_layers(layer, meta, where, row0)
    # rank, seq, pos and token_id count from 0, like step, token and layer
    _check_nonnegative(cols, [n for n in TOKENS_OPTIONAL_COLUMNS if n in cols], where, row0)

    order = None
    tokens = _tokens_in_order(cols["step"], cols["token"], layer, L)
    if tokens is None:
        order, tokens = _tokens_sorted(cols["step"], cols["token"], layer, L, where, row0, sort)
    tok_step, tok_token = tokens
    file_row = (lambda i: row0 + int(i)) if order is None else (lambda i: row0 + int(order[i]))
    # Steps: contiguous from first_step.
    starts = np.flatnonzero(np.diff(tok_step, prepend=-1)) if len(tok_step) else np.zeros(0, np.int64)
    steps = tok_step[starts]
    expect_steps = np.arange(len(steps)) + first_step
    bad = np.flatnonzero(steps != expect_steps)
    if len(bad):
        j = int(bad[0])
        raise StepGap(f"{where}: column 'step', row {file_row(int(starts[j]) * L)}: gap in step numbers: "
                      f"step {expect_steps[j]} is missing (found step {steps[j]})")
    offsets = np.append(starts, len(tok_step)).astype(np.int64)
    within = np.arange(len(tok_token)) - np.repeat(offsets[:-1], np.diff(offsets))
    bad = np.flatnonzero(tok_token != within)
    if len(bad):
        j = int(bad[0])
        raise _fail_at(where, "token", file_row(j * L),
                       f"token numbers in step {tok_step[j]} must run 0, 1, 2, ...; "
                       f"found {tok_token[j]} where {within[j]} was expected")

    def grouped(a: np.ndarray) -> np.ndarray:
        a = a if order is None else a[order]
        return a.reshape((-1, L) + a.shape[1:])

    experts = grouped(ids).astype(np.int16, copy=False)
    if weights is not None:
        weights = grouped(weights)
    extras = {}
    for name in TOKENS_OPTIONAL_COLUMNS:
        if name in cols:
            g = grouped(cols[name])
            varying = np.flatnonzero((g != g[:, :1]).any(axis=1))
            if len(varying):
                j = int(varying[0])
                c = int(np.argmax(g[j] != g[j, 0]))
                raise _fail_at(where, name, file_row(j * L + c),
                               f"differs between layers of one token (step {tok_step[j]}, token {tok_token[j]})")
            extras[name] = g[:, 0].astype(TOKENS_OPTIONAL_COLUMNS[name], copy=False)
    return TokenRows(steps, offsets, experts, weights, extras)


def _tokens_in_order(step: np.ndarray, token: np.ndarray, layer: np.ndarray,
                     L: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(step, token) int64 [tokens] of rows already grouped per token in (step, token, layer) order, every
    token with its L layers once; None where they are not (:func:`_tokens_sorted` then sorts, or says what
    is wrong). Comparisons of the columns as they are: no 64-bit key per row."""
    n = len(layer)
    if n % L:
        return None
    if not (layer.reshape(-1, L) == np.arange(L, dtype=layer.dtype)).all():
        return None
    s, t = step.reshape(-1, L), token.reshape(-1, L)
    if not ((s == s[:, :1]).all() and (t == t[:, :1]).all()):
        return None
    tok_step, tok_token = s[:, 0].astype(np.int64), t[:, 0].astype(np.int64)
    d_step = np.diff(tok_step)
    if (d_step < 0).any() or ((d_step == 0) & (np.diff(tok_token) <= 0)).any():
        return None
    return tok_step, tok_token


def _tokens_sorted(step: np.ndarray, token: np.ndarray, layer: np.ndarray, L: int, where: str, row0: int,
                   sort: bool) -> tuple[np.ndarray | None, tuple[np.ndarray, np.ndarray]]:
    """Rows sorted by (step, token, layer) where ``sort`` (else :class:`UnsortedRows`), checked for
    duplicates and for every token having its L layers: (the sorting order, None when already sorted;
    (step, token) int64 [tokens])."""
    key = (step.astype(np.int64) << 40) | (token.astype(np.int64) << 16) | layer.astype(np.int64)
    order = None
    if len(key) > 1 and not (key[1:] > key[:-1]).all():
        if not sort:
            raise UnsortedRows(where)
        order = np.argsort(key, kind="stable")
        key = key[order]
    file_row = (lambda i: row0 + int(i)) if order is None else (lambda i: row0 + int(order[i]))
    same = np.flatnonzero(key[1:] == key[:-1])
    if len(same):
        i = int(same[0]) + 1
        s, t, l_ = key[i] >> 40, (key[i] >> 16) & 0xFFFFFF, key[i] & 0xFFFF
        raise _fail_at(where, "layer", file_row(i), f"duplicate row for step {s}, token {t}, layer {l_}")
    # Every token must have exactly the rows for layers 0..L-1: sorted row i belongs to the
    # group starting at g0 = i - i % L and must hold layer i % L of g0's token.
    n_rows = len(key)
    tok_key = key >> 16
    idx = np.arange(n_rows, dtype=np.int64)
    g0 = idx - idx % L
    bad = np.flatnonzero(((key & 0xFFFF) != idx % L) | (tok_key != tok_key[g0]))
    if len(bad) or n_rows % L:
        owner, missing = (int(g0[bad[0]]), int(bad[0] % L)) if len(bad) else (n_rows - n_rows % L, n_rows % L)
        s, t = tok_key[owner] >> 24, tok_key[owner] & 0xFFFFFF
        raise _fail_at(where, "layer", file_row(owner),
                       f"step {s}, token {t} has no row for layer {missing} (every token needs all {L} layers)")
    tok_key = tok_key[::L]
    return order, (tok_key >> 24, tok_key & 0xFFFFFF)


class CountsChunks:
    """Validate the rows of a counts trace a chunk of whole steps at a time.

    :meth:`add` takes the rows of the next steps (in any order within the chunk; no step
    may continue in a later chunk) and returns their counts, int64 [steps here, layers,
    experts]; :meth:`finish` checks what only the whole file can tell. Missing (step,
    layer, expert) rows count as 0. Every layer of a step must sum to the same number of
    assignments, a multiple of top_k, and to ``top_k * tokens_per_step[s]`` where the
    metadata gives tokens_per_step; no expert may take more than the step's tokens. Memory grows
    with a chunk's rows, never with the file.
    """

    def __init__(self, meta: TraceMeta, where: str):
        self.meta, self.where = meta, where
        self.num_steps = 0  # steps validated so far (they run 0 .. num_steps - 1)
        self.tokens = None if meta.tokens_per_step is None else np.asarray(meta.tokens_per_step, np.int64)
        self.totals: np.ndarray | None = None  # float64 [L] assignments per layer so far

    def add(self, cols: dict[str, np.ndarray], row0: int = 0) -> np.ndarray:
        """cols: column name -> 1-D array, file rows ``row0``, ``row0 + 1``, ...  -> int64 [S_chunk, L, E]."""
        meta, where = self.meta, self.where
        _check_nonnegative(cols, COUNTS_COLUMNS, where, row0)
        _check_expert_ids(cols["expert"][:, None], ["expert"], meta.num_experts, where, row0)
        layer = cols["layer"]
        _check_layers(layer, meta, where, row0)
        step = cols["step"].astype(np.int64)
        # The distinct steps, not a bincount: memory grows with the rows, never with the largest step.
        if (step[1:] >= step[:-1]).all():
            steps = step[np.flatnonzero(np.diff(step, prepend=-1))]
        else:
            steps = np.unique(step)  # [S_chunk] ascending
        first = self.num_steps
        gaps = np.flatnonzero(steps != np.arange(first, first + len(steps)))
        if len(gaps):
            missing = first + int(gaps[0])
            r = int(np.argmax(step > missing))
            raise StepGap(f"{where}: column 'step', row {row0 + r}: gap in step numbers: step {missing} is missing "
                          f"(found step {step[r]})")
        S, L, E = len(steps), meta.num_layers, meta.num_experts
        flat = ((step - first) * L + layer) * E + cols["expert"]
        seen = np.bincount(flat, minlength=S * L * E)
        if (seen > 1).any():
            dup = int(np.argmax(seen > 1))
            r = int(np.flatnonzero(flat == dup)[1])
            raise _fail_at(where, "expert", row0 + r, f"duplicate row for step {step[r]}, layer {layer[r]}, "
                                                      f"expert {cols['expert'][r]}")
        del seen
        counts = np.zeros(S * L * E, dtype=np.int64)
        counts[flat] = cols["count"]
        counts = counts.reshape(S, L, E)
        # sums in float64 first, which cannot wrap, so that no integer sum below or later overflows
        fsums = counts.sum(axis=2, dtype=np.float64)  # [S, L]
        over = np.argwhere(fsums >= MAX_ASSIGNMENTS)
        if len(over):
            s, l_ = (int(x) for x in over[0])
            r = int(np.argmax((step == first + s) & (layer == l_)))
            raise _fail_at(where, "count", row0 + r, f"step {first + s}, layer {l_} sums to {fsums[s, l_]:.4g} "
                                                     "assignments, more than the 2^40 per step and layer that a "
                                                     "counts trace may hold")
        self.totals = fsums.sum(axis=0) + (0.0 if self.totals is None else self.totals)    # [L]
        if self.totals.max() >= MAX_TOTAL:
            raise UserError(f"{where}: column 'count': layer {int(self.totals.argmax())} sums to "
                            f"{self.totals.max():.4g} assignments over the whole trace, more than the 2^62 that a "
                            "counts trace may hold")
        tokens = self._check_sums(counts.sum(axis=2), step, layer, row0)
        over = np.argwhere(counts > tokens[:, None, None])
        if len(over):
            s, l_, e = (int(x) for x in over[0])
            r = int(np.flatnonzero(flat == (s * L + l_) * E + e)[0])
            raise _fail_at(where, "count", row0 + r, f"step {first + s}, layer {l_}: expert {e} takes "
                                                     f"{counts[s, l_, e]} assignments, more than the step's "
                                                     f"{tokens[s]} tokens (a token takes an expert once)")
        self.num_steps += S
        return counts

    def _check_sums(self, sums: np.ndarray, step: np.ndarray, layer: np.ndarray, row0: int) -> np.ndarray:
        """sums: [S_chunk, L] assignments per layer of this chunk's steps -> int64 [S_chunk] their tokens."""
        first, k, where = self.num_steps, self.meta.top_k, self.where
        S = len(sums)
        if self.tokens is not None:
            if first + S > len(self.tokens):
                r = int(np.argmax(step >= len(self.tokens)))
                raise UserError(f"{where}: metadata tokens_per_step has {len(self.tokens)} entries but the data "
                                f"has more steps (step {step[r]} at row {row0 + r})")
            tokens = self.tokens[first:first + S]
            bad = np.argwhere(sums != k * tokens[:, None])
        else:  # tokens per step inferred from layer 0, which must hold a multiple of top_k
            tokens = sums[:, 0] // k
            bad = np.argwhere((sums != k * tokens[:, None]) | (sums[:, :1] % k != 0))
        if len(bad):
            s, l_ = (int(x) for x in bad[0])
            r = int(np.argmax((step == first + s) & (layer == l_)))
            if self.tokens is None and sums[s, 0] % k:
                problem = (f"step {first + s}, layer {l_} sums to {sums[s, l_]} assignments, "
                           f"not a multiple of top_k={k}")
            else:
                problem = (f"step {first + s}, layer {l_} sums to {sums[s, l_]} assignments but top_k × tokens = "
                           f"{k} × {tokens[s]} = {k * tokens[s]}")
            raise _fail_at(where, "count", row0 + r, problem)
        return tokens

    def finish(self) -> None:
        """The checks of the whole file, after the last chunk."""
        if self.tokens is not None and len(self.tokens) != self.num_steps:
            raise UserError(f"{self.where}: metadata tokens_per_step has {len(self.tokens)} entries "
                            f"but the data has {self.num_steps} steps")


def counts_array(cols: dict[str, np.ndarray], meta: TraceMeta, where: str) -> np.ndarray:
    """Validate all the rows of a counts trace, in any order; returns int64 [steps, layers, experts]."""
    chunks = CountsChunks(meta, where)
    counts = chunks.add(cols)
    chunks.finish()
    return counts
