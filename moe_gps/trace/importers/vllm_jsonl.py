"""JSON lines of ``topk_ids``, one MoE layer call per line: the format of a *patched* vLLM.

This is not what upstream vLLM returns (for that, see ``vllm-routed``): it is the dump
of a fork that patched vLLM's ``FusedMoE`` (``select_experts``) to append, on one rank,
one JSON object per layer call, ``{"topk_ids": [[k ids] x T], "topk_weights": ...}``
(the Qwen3-30B-A3B sample in ``shared/traces/real`` comes from GitHub soryxie/vllm,
``profile_json/``). ``topk_weights`` may hold the weights ``[[k floats] x T]`` or only
their shape ``[T, k]``. ``L`` consecutive lines (layers 0..L-1) make one forward pass,
which becomes one step of the trace.

The lines say neither how many MoE layers a pass has nor how many experts the model has,
so ``--num-layers`` and ``--num-experts`` are required; a missing one is refused with
what the file suggests (all layers of a pass see the same number of tokens T, so every
run of lines with equal T spans whole passes and L divides the greatest common divisor
of the run lengths; the largest id + 1 is a lower bound on the experts).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from moe_gps.errors import UserError
from moe_gps.files import beyond_parser
from moe_gps.tables import format_indices
from moe_gps.trace.importers.common import (
    ImportResult,
    check_sources,
    first_duplicate_in_rows,
    first_out_of_range,
    make_meta,
    order_by_weight,
    parse_passes,
    provenance,
    tokens_trace,
)

FORMAT = "vllm-jsonl"


@dataclass
class LayerCalls:
    """The MoE layer calls of one JSON-lines file, in file order.

    line:    int64 [calls], 1-based line number of each call
    tokens:  int64 [calls], T of each call
    ids:     per call int32 [T, k]
    weights: per call float32 [T, k], or None where the line holds only a shape
    """

    path: Path
    line: np.ndarray
    tokens: np.ndarray
    ids: list[np.ndarray]
    weights: list[np.ndarray | None]


def _is_shape(value: object) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value))


def read_layer_calls(path: Path) -> LayerCalls:
    """Parse every line of a file; UserError naming file and line for anything malformed."""
    lines, tokens, ids_all, weights_all = [], [], [], []
    k_first: tuple[int, int] | None = None  # (k, line)
    try:
        f = open(path, "rb")
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                msg = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8 text"
                raise UserError(f"{where}: not a JSON line ({msg}); expected one MoE layer call "
                                "per line with 'topk_ids'") from None
            except (ValueError, RecursionError) as err:
                raise UserError(f"{where}: {beyond_parser(err, 'JSON')}") from None
            if not isinstance(rec, dict) or "topk_ids" not in rec:
                raise UserError(f"{where}: no 'topk_ids' field; expected one MoE layer call per line "
                                "like {\"topk_ids\": [[ids] x T], \"topk_weights\": ...}")
            raw_ids = rec["topk_ids"]
            if not isinstance(raw_ids, list):
                raise UserError(f"{where}: 'topk_ids' must be a list of T lists of k expert ids")
            if len(raw_ids) == 0:
                ids = np.zeros((0, 0), dtype=np.int32)
            else:
                try:
                    arr = np.asarray(raw_ids)
                except ValueError:
                    raise UserError(f"{where}: 'topk_ids' rows have different lengths "
                                    "(every token needs the same k)") from None
                if arr.ndim != 2:
                    raise UserError(f"{where}: 'topk_ids' must be a list of T lists of k expert ids, "
                                    f"got an array of shape {list(arr.shape)}")
                if arr.shape[1] == 0:
                    raise UserError(f"{where}: 'topk_ids' has empty rows; every token needs its k >= 1 expert ids")
                # numpy reads true/false as 1/0: look for them where the line could hold them
                if (b"true" in raw or b"false" in raw) and any(type(x) is bool for row in raw_ids for x in row):
                    raise UserError(f"{where}: 'topk_ids' holds true/false where expert ids go")
                if arr.dtype.kind not in "iu":
                    raise UserError(f"{where}: 'topk_ids' must hold integer expert ids, found {arr.dtype} values")
                if (np.abs(arr) > np.iinfo(np.int32).max).any():
                    raise UserError(f"{where}: 'topk_ids' holds an expert id too large for any model")
                ids = arr.astype(np.int32)
                k = ids.shape[1]
                if k_first is None:
                    k_first = (k, lineno)
                elif k != k_first[0]:
                    raise UserError(f"{where}: 'topk_ids' has k={k} experts per token but line "
                                    f"{k_first[1]} has k={k_first[0]} (inconsistent top-k)")
                dup = first_duplicate_in_rows(ids)
                if dup is not None:
                    raise UserError(f"{where}: 'topk_ids' row {dup[0]} chooses expert {dup[1]} twice")
            T = len(ids)
            weights = None
            raw_w = rec.get("topk_weights")
            if raw_w is not None:
                if _is_shape(raw_w):
                    if T and list(raw_w) != [T, ids.shape[1]]:
                        raise UserError(f"{where}: 'topk_weights' gives shape {raw_w} but 'topk_ids' has "
                                        f"shape {[T, ids.shape[1]]}")
                elif T:
                    try:
                        w = np.asarray(raw_w, dtype=np.float32)
                    except (ValueError, TypeError):
                        raise UserError(f"{where}: 'topk_weights' is neither a shape [T, k] nor "
                                        "T lists of k numbers") from None
                    if w.shape != ids.shape:
                        raise UserError(f"{where}: 'topk_weights' has shape {list(w.shape)} but 'topk_ids' "
                                        f"has shape {list(ids.shape)}")
                    bad = ~np.isfinite(w) | (w < 0)
                    if bad.any():
                        r = int(np.argmax(bad.any(axis=1)))
                        raise UserError(f"{where}: 'topk_weights' row {r} holds a NaN, infinite or negative weight")
                    weights = w
            lines.append(lineno)
            tokens.append(T)
            ids_all.append(ids)
            weights_all.append(weights)
    if not lines:
        raise UserError(f"{path}: empty file (no MoE layer calls)")
    return LayerCalls(path, np.asarray(lines, np.int64), np.asarray(tokens, np.int64), ids_all, weights_all)


def _runs(tokens: np.ndarray) -> np.ndarray:
    """Lengths of the runs of equal values. tokens: [calls] -> [runs]."""
    change = np.flatnonzero(np.diff(tokens)) + 1
    return np.diff(np.concatenate([[0], change, [len(tokens)]]))


def num_layers_hint(files: Sequence[LayerCalls]) -> str:
    """What the line pattern says about L, for the message asking for --num-layers."""
    runs = [_runs(c.tokens) for c in files]
    if all(len(r) == 1 for r in runs):
        return "; the file cannot tell: " + ", ".join(f"{c.path}: {len(c.tokens)} lines, all with T={c.tokens[0]}"
                                                      for c in files)
    g = int(math.gcd(*(int(x) for r in runs for x in r)))
    return (f"; runs of lines with equal token counts have lengths divisible by {g}, so it is {g} or a divisor of it"
            if g > 1 else "; the line pattern allows only 1: check that the file holds one rank's layer calls")


def passes_per_real_pass(pass_tokens: Sequence[np.ndarray]) -> int:
    """How many of the passes cut with the given L likely make one real forward pass (1: no sign of more).

    pass_tokens: per file, int64 [passes], T of each pass. T changes between real passes and is the
    same on every layer of one, so when every run of passes with equal T (in files where T changes
    at all) is a multiple of g > 1 passes long, each real pass was likely cut into g and the model
    has g x L layers. A file with one T throughout says nothing of its own, but its pass count must
    divide by g too."""
    runs = [_runs(t) for t in pass_tokens if len(t)]
    if all(len(r) == 1 for r in runs):
        return 1
    return int(math.gcd(*(int(x) for r in runs for x in (r if len(r) > 1 else [r.sum()]))))


def _rle(values: list[int], limit: int = 12) -> str:
    """``[19, 4, 2050, 4, 4, 4]`` -> ``"19, 4, 2050, 4 x3"`` (at most ``limit`` groups shown)."""
    out, i = [], 0
    while i < len(values):
        if len(out) == limit:
            out.append(f"... ({len(values) - i} more passes)")
            break
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        out.append(f"{values[i]}" + (f" x{j - i + 1}" if j > i else ""))
        i = j + 1
    return ", ".join(out)


def import_vllm_jsonl(sources: Sequence[str | os.PathLike], *, model: str = "unknown",
                      dataset: str = "unknown", num_layers: int | None = None,
                      num_experts: int | None = None, min_tokens: int = 0,
                      passes: str | None = None) -> ImportResult:
    """Import the patched vLLM's JSON lines into a tokens trace, one step per selected forward pass.

    Passes are numbered from 0 in each file; a pass is kept when it is listed in
    ``passes`` (e.g. ``"2,5-7"``; all when None) and has at least ``min_tokens`` tokens
    (passes with no token are always dropped). Steps follow the files in the order given,
    then the passes in file order. ``num_layers`` and ``num_experts`` are required.
    """
    paths = check_sources(sources)
    files = [read_layer_calls(p) for p in paths]
    summary: list[str] = []
    if num_layers is None:
        raise UserError("--from vllm-jsonl needs --num-layers, the model's MoE layers (lines per forward pass)"
                        + num_layers_hint(files))
    L = int(num_layers)
    layers_note = "from --num-layers"
    wanted = None if passes is None else parse_passes(passes)
    ks = {c.ids[i].shape[1] for c in files for i in range(len(c.ids)) if c.tokens[i]}
    if not ks:
        raise UserError(f"{paths[0]}: no line has any token")
    if len(ks) > 1:
        raise UserError(f"files disagree on top-k: {sorted(ks)} experts per token")
    k = ks.pop()

    selected: list[tuple[LayerCalls, int]] = []  # (file, pass index)
    kept_per_file, passes_per_file, all_pass_tokens = {}, {}, []
    for c in files:
        n = len(c.tokens)
        if n % L:
            raise UserError(f"{c.path}: {n} layer calls is not a whole number of passes of {L} layers "
                            f"({layers_note}); the file ends mid-pass or --num-layers is wrong")
        T = c.tokens.reshape(-1, L)
        mismatch = np.argwhere(T != T[:, :1])
        if len(mismatch):
            p, layer = (int(x) for x in mismatch[0])
            i = p * L + layer
            raise UserError(f"{c.path}:{c.line[i]}: T={T[p, layer]} tokens but line {c.line[p * L]} "
                            f"(layer 0 of pass {p}) has T={T[p, 0]}; with {L} layers per pass "
                            f"({layers_note}) every layer of a pass needs the same tokens")
        pass_tokens = T[:, 0]
        all_pass_tokens.append(pass_tokens)
        num_passes = len(pass_tokens)
        if wanted is not None and wanted and wanted[-1] >= num_passes:
            raise UserError(f"{c.path}: --passes asks for pass {wanted[-1]} but the file has "
                            f"{num_passes} passes (0..{num_passes - 1})")
        keep = (pass_tokens >= max(min_tokens, 1))
        if wanted is not None:
            mask = np.zeros(num_passes, bool)
            mask[wanted] = True
            keep &= mask
        kept = np.flatnonzero(keep)
        selected += [(c, int(p)) for p in kept]
        kept_per_file[str(c.path)] = format_indices(kept)
        passes_per_file[str(c.path)] = num_passes
        summary.append(f"{c.path}: {n} lines = {num_passes} passes x {L} layers; tokens per pass: "
                       f"{_rle(pass_tokens.tolist())}")
        summary.append(f"  kept {len(kept)} pass(es): "
                       + (", ".join(f"{p} ({pass_tokens[p]} tokens)" for p in kept[:8])
                          + (" ..." if len(kept) > 8 else "") if len(kept) else "none"))
        sizes = pass_tokens[kept]
        if wanted is None and min_tokens <= 1 and len(kept) > 1 and sizes.max() >= 10 * sizes.min():
            summary.append(f"  warning: the kept passes hold {sizes.min()} to {sizes.max()} tokens; the small ones are "
                           "likely dummy or padding passes (a server's warm-up, graph capture): keep the real ones "
                           "with --min-tokens N or --passes")
    g = passes_per_real_pass(all_pass_tokens)
    if g > 1:
        print(f"moe-gps: warning: with --num-layers {L} the passes come in runs of {g} (or a multiple of {g}) with "
              f"the same token count, as if each real forward pass were cut into {g}: the model likely has {g * L} "
              f"MoE layers (give --num-layers {g * L} if so)", file=sys.stderr)
    if not selected:
        sizes = sorted({int(t) for c in files for t in c.tokens})
        raise UserError(f"no forward pass selected (passes hold {', '.join(map(str, sizes))} tokens; "
                        f"--min-tokens={min_tokens}, --passes={passes or 'all'})")

    if num_experts is None:
        max_id = max(int(c.ids[p * L + layer].max()) for c, p in selected for layer in range(L))
        raise UserError(f"--from vllm-jsonl needs --num-experts, the model's routed experts per layer; the largest "
                        f"id in the selected passes is {max_id}, so at least {max_id + 1}")
    E = int(num_experts)
    experts_note = "from --num-experts"
    with_weights = all(c.weights[p * L + layer] is not None for c, p in selected for layer in range(L))
    step_experts, step_weights = [], []
    for c, p in selected:
        calls = range(p * L, p * L + L)
        for i in calls:
            bad = first_out_of_range(c.ids[i], E)
            if bad is not None:
                raise UserError(f"{c.path}:{c.line[i]}: 'topk_ids' row {bad[0]}: expert id {bad[1]} outside "
                                f"[0, {E}) (num_experts {experts_note})")
        experts = np.stack([c.ids[i] for i in calls], axis=1)  # [T, L, k]
        if with_weights:
            weights = np.stack([c.weights[i] for i in calls], axis=1)
            experts, weights = order_by_weight(experts, weights)
            step_weights.append(weights)
        step_experts.append(experts)
    summary.append(f"num_layers={L} ({layers_note}), num_experts={E} ({experts_note}), top_k={k}")
    summary.append("gate weights: " + ("stored" if with_weights else "not stored (the lines hold only their shape)"))
    summary.append(f"steps: one per kept forward pass ({L} consecutive lines), files in the order given, passes in "
                   f"file order; {len(selected)} step(s)")
    prov = provenance(
        FORMAT, [str(p) for p in paths],
        selection={"passes": passes, "min_tokens": min_tokens},
        passes_in_file=passes_per_file, passes_kept=kept_per_file,
        step_grouping=f"one step per kept forward pass ({L} consecutive lines)",
        num_layers_source=layers_note, num_experts_source=experts_note,
        weights="stored" if with_weights else "not in the source (shape only)",
        expert_order="as recorded" if not with_weights else "sorted by gate weight, highest first",
    )
    meta = make_meta("tokens", L, E, k, model, dataset, prov)
    trace = tokens_trace(meta, step_experts, step_weights if with_weights else None)
    return ImportResult(trace, summary)
