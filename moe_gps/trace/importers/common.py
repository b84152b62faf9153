"""Shared pieces of the trace importers: results, provenance, selections, trace assembly.

Every importer turns third-party files into an in-memory trace with
``source="imported"`` metadata and a provenance record saying which tool read which
files with which selection and what it inferred, so that a trace can always be traced
back to its origin.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from moe_gps.errors import UserError
from moe_gps.files import beyond_parser, input_file
from moe_gps.trace.data import CountsTrace, TokensTrace
from moe_gps.trace.meta import TraceMeta
from moe_gps.trace.validate import MAX_ASSIGNMENTS

TOOL = "moe-gps trace import"


@dataclass
class ImportResult:
    """What an importer produced.

    trace:   the imported trace (tokens or counts kind), ``meta.source == "imported"``
    summary: lines for the terminal (what was read, selected and inferred)
    """

    trace: TokensTrace | CountsTrace
    summary: list[str] = field(default_factory=list)


def now_iso() -> str:
    """The current UTC time, e.g. ``2025-11-23T15:40:00+00:00``."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def provenance(fmt: str, sources: Sequence[str | os.PathLike], **details: Any) -> dict[str, Any]:
    """The provenance record of an imported trace.

    ``details`` holds the format-specific part (selection flags, inferred values, ...).
    """
    prov: dict[str, Any] = {
        "tool": TOOL,
        "format": fmt,
        "sources": [str(s) for s in sources],
        "date": now_iso(),
    }
    prov.update(details)
    return prov


def make_meta(kind: str, num_layers: int, num_experts: int, top_k: int, model: str, dataset: str,
              prov: dict[str, Any], tokens_per_step: list[int] | None = None) -> TraceMeta:
    return TraceMeta(kind=kind, num_layers=int(num_layers), num_experts=int(num_experts), top_k=int(top_k),
                     model=model, dataset=dataset, source="imported", provenance=prov,
                     tokens_per_step=tokens_per_step)


def tokens_trace(meta: TraceMeta, step_experts: list[np.ndarray], step_weights: list[np.ndarray] | None,
                 step_token_ids: list[np.ndarray] | None = None) -> TokensTrace:
    """Assemble a tokens trace from per-step arrays.

    step_experts:   per step int [tokens, layers, k]
    step_weights:   per step float [tokens, layers, k], or None
    step_token_ids: per step int [tokens], or None
    """
    sizes = [len(e) for e in step_experts]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    experts = np.concatenate(step_experts).astype(np.int16, copy=False)
    weights = None if step_weights is None else np.concatenate(step_weights).astype(np.float32, copy=False)
    token_id = None if step_token_ids is None else np.concatenate(step_token_ids).astype(np.int32, copy=False)
    return TokensTrace(meta, experts, offsets, weights, token_id=token_id)


def counts_trace(meta: TraceMeta, counts: np.ndarray) -> CountsTrace:
    """counts: int [steps, layers, experts]."""
    return CountsTrace(meta, np.ascontiguousarray(counts, dtype=np.int64))


def check_sources(sources: Sequence[str | os.PathLike], allow_dirs: bool = False) -> list[Path]:
    """Paths that exist (files, or folders where ``allow_dirs``); UserError otherwise."""
    if not sources:
        raise UserError("no source file given")
    paths = []
    for s in sources:
        p = Path(s)
        if not (allow_dirs and p.is_dir()):
            input_file(p, what="a file (give the files in it)")
        paths.append(p)
    return paths


_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_passes(text: str) -> list[int]:
    """``"2,5-7"`` -> ``[2, 5, 6, 7]`` (0-based indices, sorted, unique)."""
    out: set[int] = set()
    for part in text.split(","):
        m = _RANGE.match(part)
        if not m:
            raise UserError(f"--passes: {part.strip()!r} is not a pass index or range (write e.g. 2,5-7)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise UserError(f"--passes: range {part.strip()!r} runs backwards")
        out.update(range(lo, hi + 1))
    return sorted(out)


def first_duplicate_in_rows(ids: np.ndarray) -> tuple[int, int] | None:
    """ids: int [rows, k]. (row, expert) of the first row holding an expert twice, or None."""
    if ids.shape[1] < 2 or len(ids) == 0:
        return None
    srt = np.sort(ids, axis=1)
    dup = (srt[:, 1:] == srt[:, :-1])
    rows = np.flatnonzero(dup.any(axis=1))
    if not len(rows):
        return None
    r = int(rows[0])
    return r, int(srt[r, 1:][dup[r]][0])


def first_out_of_range(ids: np.ndarray, num_experts: int) -> tuple[int, int] | None:
    """ids: int [rows, k]. (row, id) of the first id outside [0, num_experts), or None."""
    bad = (ids < 0) | (ids >= num_experts)
    if not bad.any():
        return None
    r, c = np.unravel_index(int(np.argmax(bad)), bad.shape)
    return int(r), int(ids[r, c])


def order_by_weight(experts: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder each token's top-k highest weight first (ties keep their order).

    experts, weights: [..., k]
    """
    order = np.argsort(-weights, axis=-1, kind="stable")
    return np.take_along_axis(experts, order, axis=-1), np.take_along_axis(weights, order, axis=-1)


def counts_tokens(counts: np.ndarray, top_k: int, where: str, row_name: str | None = "step",
                  row_ids: np.ndarray | None = None, layer_ids: np.ndarray | None = None) -> np.ndarray:
    """Tokens per step of an aggregated count array, after checking that its layers agree.

    counts: int [steps, layers, experts] -> int64 [steps] = layer sum / top_k.
    Every layer of a step sees the same tokens, so every layer must sum to the same number
    of (token, expert) assignments, a multiple of top_k, and no expert takes more than the
    step's tokens (a token picks distinct experts). ``where`` (the file) and ``row_name``
    (what a first-axis index is called there; None to leave it out) name the culprit in
    errors, with ``row_ids`` [steps] and ``layer_ids`` [layers] as the numbers the file
    gives its rows and layers (default: their indices).
    """
    row_no = (lambda s: int(row_ids[s])) if row_ids is not None else int
    layer_no = (lambda j: int(layer_ids[j])) if layer_ids is not None else int
    label = (lambda s: f"{row_name} {row_no(s)}, ") if row_name else (lambda s: "")
    fsums = counts.sum(axis=2, dtype=np.float64)  # cannot wrap, unlike the int64 sum
    over = np.argwhere(fsums >= MAX_ASSIGNMENTS)
    if len(over):
        s, layer = (int(x) for x in over[0])
        raise UserError(f"{where}: {label(s)}layer {layer_no(layer)} sums to {fsums[s, layer]:.4g} assignments, "
                        "more than the 2^40 per step and layer that a counts trace may hold")
    sums = counts.sum(axis=2)  # [steps, layers]
    bad = np.argwhere(sums != sums[:, :1])
    if len(bad):
        s, layer = (int(x) for x in bad[0])
        raise UserError(f"{where}: {label(s)}layer {layer_no(layer)} sums to {sums[s, layer]} assignments but "
                        f"layer {layer_no(0)} sums to {sums[s, 0]} (every layer sees the same tokens)")
    rem = np.flatnonzero(sums[:, 0] % top_k)
    if len(rem):
        s = int(rem[0])
        raise UserError(f"{where}: {label(s)}each layer sums to {sums[s, 0]} assignments, "
                        f"not a multiple of --top-k {top_k}")
    tokens = (sums[:, 0] // top_k).astype(np.int64)
    over = np.argwhere(counts > tokens[:, None, None])
    if len(over):
        s, layer, e = (int(x) for x in over[0])
        raise UserError(f"{where}: {label(s)}layer {layer_no(layer)}: expert {e} takes {counts[s, layer, e]} "
                        f"assignments, more than the {tokens[s]} tokens its layer's sum gives at --top-k {top_k} "
                        "(a token picks distinct experts)")
    return tokens


def torch_load(path: Path, needed_for: str) -> Any:
    """``torch.load`` a ``torch.save`` file safely (``weights_only``), on the CPU.

    UserError when torch is absent (naming ``needed_for``), or the file is not a
    ``torch.save`` file or holds objects other than tensors and plain containers.
    """
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    if not magic:
        raise UserError(f"{path}: empty file, expected a torch.save (.pt) file")
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise UserError(f"{path}: not a torch.save (.pt) file (it starts with {magic!r})")
    try:
        import torch
    except ImportError:
        raise UserError(f"{path}: {needed_for} needs PyTorch (pip install torch)") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many exception types for a bad file
        text = str(err)
        if "weights_only" in text or "Unsupported global" in text:
            raise UserError(f"{path}: holds Python objects other than tensors, numbers and plain "
                            "containers, which are not loaded (torch.load weights_only)") from None
        first = text.strip().splitlines()[0][:160] if text.strip() else type(err).__name__
        raise UserError(f"{path}: not a readable torch.save file ({first})") from None


def read_text(path: Path, expected: str) -> str:
    """The UTF-8 text of a file that must not be empty; ``expected`` says what it should hold."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text, expected {expected}") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    if not text.strip():
        raise UserError(f"{path}: empty file, expected {expected}")
    return text


def read_json_records(path: Path) -> list[tuple[str, Any]]:
    """The JSON values of a saved-responses file, each with where it is (for errors).

    Accepts one JSON value per line (``file:line``), a JSON array (``file[i]``) or one
    JSON object (``file``); a line holding an array (a batch response) gives its elements
    (``file:line[j]``). Blank lines are skipped.
    """
    text = read_text(path, "saved JSON responses")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    except (ValueError, RecursionError) as err:
        raise UserError(f"{path}: {beyond_parser(err, 'JSON')}") from None
    else:
        if isinstance(whole, list):
            return [(f"{path}[{i}]", v) for i, v in enumerate(whole)]
        lines = [i for i, line in enumerate(text.splitlines(), 1) if line.strip()]
        return [(f"{path}:{lines[0]}" if len(lines) == 1 else str(path), whole)]
    out: list[tuple[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{lineno}: not a JSON line ({err.msg} at column {err.colno})") from None
        except (ValueError, RecursionError) as err:
            raise UserError(f"{path}:{lineno}: {beyond_parser(err, 'JSON')}") from None
        if isinstance(value, list):
            out += [(f"{path}:{lineno}[{j}]", v) for j, v in enumerate(value)]
        else:
            out.append((f"{path}:{lineno}", value))
    return out
