"""CSV gate-score matrices, one file per MoE layer (the FLAME-MoE trace layout).

Header ``layer_id,token_id,expert_0,...,expert_{E-1}``; each row is one token and holds
the gate score of every expert, 0 where the expert was not chosen, so each row has
exactly k non-zero scores. ``token_id`` is the token's index in the batch (not a
vocabulary id): rows are matched across the layer files by it and it is not written.

One step is one folder of such files (every ``*.csv`` in it) or a run of files given
one after another from the same folder. The layer of a file comes from its
``layer_id`` column when those differ between the files of a step, else from a
``layerN`` in the file name; the layer ids found are renumbered 0..L-1 in increasing
order and recorded in the provenance.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from moe_gps.errors import UserError
from moe_gps.trace.importers.common import (
    ImportResult,
    check_sources,
    make_meta,
    order_by_weight,
    provenance,
    tokens_trace,
)

FORMAT = "gate-csv"
_LAYER_IN_NAME = re.compile(r"layer[_-]?(\d+)", re.IGNORECASE)


@dataclass
class LayerScores:
    """One CSV file.

    layer_col:  the value of its layer_id column
    name_layer: the N of ``layerN`` in its name, or None
    token:      int64 [T], token_id of each row, ascending
    scores:     float64 [T, E], gate scores, rows sorted by token_id
    k:          non-zero scores per row
    """

    path: Path
    layer_col: int
    name_layer: int | None
    token: np.ndarray
    scores: np.ndarray
    k: int


def read_layer_scores(path: Path) -> LayerScores:
    """Read and check one gate-score CSV; UserError naming file and line for bad rows."""
    import pandas as pd

    try:
        df = pd.read_csv(path, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: empty file, expected a CSV header layer_id,token_id,expert_0,...") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a readable CSV file ({first})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    cols = [str(c).strip() for c in df.columns]
    num_experts = len(cols) - 2
    expected = ["layer_id", "token_id"] + [f"expert_{j}" for j in range(max(num_experts, 0))]
    if num_experts < 1 or cols != expected:
        got = ",".join(cols[:4]) + (",..." if len(cols) > 4 else "")
        raise UserError(f"{path}: line 1: header is {got!r}; expected layer_id,token_id,expert_0,...,"
                        "expert_{E-1} (one column per expert, in order)")
    if len(df) == 0:
        raise UserError(f"{path}: no data rows after the header")
    # Columns with text in them come as object dtype: find the first value that is no number.
    for j, name in enumerate(df.columns):
        if df.dtypes.iloc[j].kind not in "iuf":
            col = df.iloc[:, j]
            num = pd.to_numeric(col, errors="coerce")
            bad = (num.isna() & col.notna()).to_numpy()
            if bad.any():
                r = int(np.argmax(bad))
                raise UserError(f"{path}: line {r + 2}, column {cols[j]!r}: {col.iloc[r]!r} is not a number")
            df[name] = num
    values = df.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    bad[:, :2] |= values[:, :2] != np.round(values[:, :2])
    if bad.any():
        r, c = np.unravel_index(int(np.argmax(bad)), bad.shape)
        what = "an integer id" if c < 2 else "a finite gate score"
        problem = "empty or NaN cell" if np.isnan(values[r, c]) else f"{values[r, c]} is not {what}"
        raise UserError(f"{path}: line {r + 2}, column {cols[c]!r}: {problem}")
    ids = values[:, :2].astype(np.int64)
    scores = values[:, 2:]
    neg = np.argwhere(scores < 0)
    if len(neg):
        r, c = (int(x) for x in neg[0])
        raise UserError(f"{path}: line {r + 2}, column 'expert_{c}': negative gate score {scores[r, c]}")
    layer_vals = np.unique(ids[:, 0])
    if len(layer_vals) > 1:
        r = int(np.argmax(ids[:, 0] != ids[0, 0]))
        raise UserError(f"{path}: line {r + 2}: layer_id {ids[r, 0]} but line 2 has {ids[0, 0]}; "
                        "expected one file per layer")
    nonzero = (scores > 0).sum(axis=1)
    k = int(nonzero[0])
    bad = np.flatnonzero(nonzero != k)
    if len(bad):
        r = int(bad[0])
        raise UserError(f"{path}: line {r + 2}: {nonzero[r]} non-zero gate scores but line 2 has {k} "
                        "(every token must choose the same number of experts)")
    if k == 0:
        raise UserError(f"{path}: line 2: no non-zero gate score (the token chose no expert)")
    token = ids[:, 1]
    order = np.argsort(token, kind="stable")
    token = token[order]
    dup = np.flatnonzero(token[1:] == token[:-1])
    if len(dup):
        r = int(order[dup[0] + 1])
        raise UserError(f"{path}: line {r + 2}: token_id {token[dup[0]]} appears twice in one layer file")
    m = _LAYER_IN_NAME.search(path.name)
    return LayerScores(path, int(ids[0, 0]), int(m.group(1)) if m else None, token, scores[order], k)


def group_steps(sources: Sequence[str | os.PathLike]) -> list[tuple[str, list[Path]]]:
    """Steps in the order given: a folder is one step (its ``*.csv``), and consecutive files
    from the same folder are one step. Returns (label, files) per step."""
    paths = check_sources(sources, allow_dirs=True)
    steps: list[tuple[str, list[Path]]] = []
    last_parent: Path | None = None
    for src, p in zip(sources, paths):
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix.lower() == ".csv" and f.is_file())
            if not files:
                raise UserError(f"{src}: folder holds no .csv file")
            steps.append((str(src), files))
            last_parent = None
        else:
            if last_parent is not None and p.parent == last_parent:
                steps[-1][1].append(p)
            else:
                steps.append((str(p.parent), [p]))
                last_parent = p.parent
    return steps


def _layer_ids(label: str, layers: list[LayerScores]) -> tuple[list[int], str]:
    """Original layer id of each file and where it came from."""
    col = [s.layer_col for s in layers]
    names = [s.name_layer for s in layers]
    if len(set(col)) == len(col) and (len(col) > 1 or None in names):
        return col, "layer_id column"
    if None not in names and len(set(names)) == len(names):
        return names, "'layerN' in the file names"
    raise UserError(f"{label}: cannot tell the layers apart: the layer_id columns hold {sorted(set(col))} "
                    "and the file names do not each carry a distinct 'layerN'")


def import_gate_csv(sources: Sequence[str | os.PathLike], *, model: str = "unknown",
                    dataset: str = "unknown", top_k: int | None = None) -> ImportResult:
    """Import CSV gate-score matrices into a tokens trace (one step per folder, in order).

    Each token's experts are its non-zero scores, highest first; the scores become the
    gate weights. ``top_k``, when given, must match the data.
    """
    steps = group_steps(sources)
    step_experts, step_weights, summary, step_records = [], [], [], []
    ref: dict | None = None
    for s, (label, files) in enumerate(steps):
        layers = [read_layer_scores(f) for f in files]
        ids, id_source = _layer_ids(label, layers)
        order = np.argsort(ids, kind="stable")
        layers = [layers[i] for i in order]
        ids = [int(ids[i]) for i in order]
        first = layers[0]
        for lay in layers[1:]:
            if lay.scores.shape[1] != first.scores.shape[1]:
                raise UserError(f"{lay.path}: {lay.scores.shape[1]} expert columns but {first.path} has "
                                f"{first.scores.shape[1]}")
            if lay.k != first.k:
                raise UserError(f"{lay.path}: {lay.k} non-zero scores per row but {first.path} has {first.k} "
                                "(inconsistent top-k)")
            if len(lay.token) != len(first.token) or (lay.token != first.token).any():
                raise UserError(f"{lay.path}: its token_id values differ from those of {first.path} "
                                f"({len(lay.token)} vs {len(first.token)} rows); every layer file of a "
                                "step must hold the same tokens")
        this = {"num_experts": first.scores.shape[1], "k": first.k, "layer_ids": ids}
        if ref is None:
            ref = dict(this, where=label)
            if top_k is not None and top_k != first.k:
                raise UserError(f"{first.path}: rows hold {first.k} non-zero gate scores but --top-k is {top_k}")
        else:
            for key, what in (("num_experts", "expert columns"), ("k", "non-zero scores per row"),
                              ("layer_ids", "layer ids")):
                if this[key] != ref[key]:
                    raise UserError(f"{label}: {what} {this[key]} but {ref['where']} has {ref[key]}")
        k = first.k
        scores = np.stack([lay.scores for lay in layers], axis=1)  # [T, L, E]
        part = np.argsort(-scores, axis=2, kind="stable")[:, :, :k]
        weights = np.take_along_axis(scores, part, axis=2).astype(np.float32)
        experts, weights = order_by_weight(part, weights)
        step_experts.append(experts)
        step_weights.append(weights)
        step_records.append({"source": label, "files": [lay.path.name for lay in layers]})
        summary.append(f"step {s}: {label}: {len(layers)} layer files, {len(first.token)} tokens "
                       f"(layer ids {ids[0]}..{ids[-1]} from the {id_source})")
    assert ref is not None
    L, E, k = len(ref["layer_ids"]), ref["num_experts"], ref["k"]
    summary.append(f"num_layers={L} (original layer ids {ref['layer_ids']} renumbered 0..{L - 1}), "
                   f"num_experts={E} (expert columns), top_k={k} (non-zero scores per row)")
    summary.append(f"steps: one per folder (or run of files from one folder), in the order given; "
                   f"{len(step_experts)} step(s)")
    numbers = [re.search(r"\d+", Path(r["source"]).name) for r in step_records]
    if len(numbers) > 1 and all(numbers) and any(int(b.group()) < int(a.group()) for a, b in zip(numbers, numbers[1:])):
        summary.append("warning: the steps are not in the numeric order of their names ("
                       + ", ".join(Path(r["source"]).name for r in step_records[:4])
                       + (", ..." if len(step_records) > 4 else "") + "): they follow the order given; a shell "
                       "glob sorts 10th before 1st, list the folders in numeric order (`ls -v`) if that is the order "
                       "the steps ran in")
    prov = provenance(
        FORMAT, [str(s) for s in sources],
        step_grouping="one step per folder (or run of files from one folder), in the order given",
        steps=step_records,
        original_layer_ids=ref["layer_ids"],
        layer_renumbering=f"original layer ids {ref['layer_ids']} -> 0..{L - 1} in increasing order",
        token_order="rows sorted by the CSV token_id (a batch index, not written as token_id)",
        weights="the CSV gate scores of the chosen experts",
    )
    meta = make_meta("tokens", L, E, k, model, dataset, prov)
    return ImportResult(tokens_trace(meta, step_experts, step_weights), summary)
