"""SGLang ``per_pass`` and ``per_token`` expert-distribution dumps (``sglang-dump``).

What SGLang writes (read from ``python/sglang/srt/eplb/expert_distribution.py`` in
sgl-project/sglang, ``_DetailAccumulator``): with ``--expert-distribution-recorder-mode
per_pass`` or ``per_token``, every rank appends one record per forward pass and, on
``/dump_expert_distribution_record``, saves its own
``expert_distribution_recorder_<time>_<rank>.pt`` (``torch.save``)::

    {"records": [{"forward_pass_id": int, "rank": int, "gatherer_key": "primary",
                  "global_physical_count": int tensor [layers, physical experts], ...}, ...],
     "last_physical_to_logical_map": int tensor [layers, physical experts]}

``per_token`` records also hold the pass's ``input_ids`` and ``positions`` (lists, one
per token on that rank), ``extend_seq_lens``, ``forward_mode`` and
``topk_ids_of_layer``: int32 ``[layers, tokens, 8]``, the *physical* expert slots each
token was sent to (SGLang maps logical to physical before recording), -1 where unused
(columns past top-k, padding tokens, dense layers). ``layers`` counts every decoder layer.

The importer reads every file given (one per rank), orders the passes by
``forward_pass_id`` (time order; a pass's ranks in rank order) and maps physical slots to
logical experts through ``last_physical_to_logical_map`` ("last": if EPLB re-planned
during the recording, earlier passes used another map; the files cannot say). Layers
that never routed are dense and dropped (``original_layer_ids``). ``per_pass`` gives a
counts trace (``--top-k`` required, as for ``stat``); ``per_token`` a tokens trace with
the token ids, positions and ranks, top-k from the columns that hold ids. Two ranks that
recorded the same tokens in a pass (attention tensor parallelism without DP attention)
would count them twice: that is refused, give one rank's file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moe_gps.errors import UserError
from moe_gps.tables import format_indices
from moe_gps.trace.data import TokensTrace
from moe_gps.trace.importers.common import ImportResult, counts_tokens, counts_trace, make_meta, provenance

FORMAT = "sglang-dump"


def _array(value: Any, where: str, name: str, ndim: int) -> np.ndarray:
    import torch

    if isinstance(value, torch.Tensor):
        arr = value.detach().cpu().numpy()
    else:
        try:
            arr = np.asarray(value)
        except ValueError:
            arr = np.asarray([], dtype=object)
    if arr.dtype.kind not in "iu" or arr.ndim != ndim:
        raise UserError(f"{where}: '{name}' must be an integer array of {ndim} dimensions, got "
                        f"{arr.dtype} of shape {list(arr.shape)}")
    return arr.astype(np.int64, copy=False)


def _map_of(obj: dict, where: str) -> np.ndarray:
    if "last_physical_to_logical_map" not in obj:
        raise UserError(f"{where}: a per_pass/per_token dump without 'last_physical_to_logical_map'")
    m = _array(obj["last_physical_to_logical_map"], where, "last_physical_to_logical_map", 2)
    logical = int(m.max()) + 1 if m.size else 0
    missing = sorted(set(range(logical)) - set(np.unique(m).tolist()))
    if (m < 0).any() or missing:
        raise UserError(f"{where}: 'last_physical_to_logical_map' is not a map of physical slots to logical "
                        "experts " + (f"(logical expert {missing[0]} has no slot)" if missing else "(negative ids)"))
    return m


def _records_of(obj: dict, where: str) -> list[dict]:
    recs = obj.get("records")
    if not isinstance(recs, list):
        raise UserError(f"{where}: 'records' is a {type(recs).__name__}, expected a list")
    for i, r in enumerate(recs):
        if not isinstance(r, dict) or not isinstance(r.get("forward_pass_id"), int):
            raise UserError(f"{where}: records[{i}] has no integer 'forward_pass_id'")
    return recs


def import_sglang_records(paths: list[Path], objs: list[dict], *, top_k: int | None, model: str,
                          dataset: str) -> ImportResult:
    """per_pass / per_token dumps (already loaded) -> counts / tokens trace (see the module docstring)."""
    maps = [_map_of(o, str(p)) for p, o in zip(paths, objs)]
    for p, m in zip(paths[1:], maps[1:]):
        if m.shape != maps[0].shape or (m != maps[0]).any():
            raise UserError(f"{p}: its last_physical_to_logical_map differs from {paths[0]}'s (dumps of one "
                            "recording share the map)")
    phys2log = maps[0]
    layers, physical = phys2log.shape
    logical = int(phys2log.max()) + 1
    records = []                                                   # (pass id, rank, file, index, record)
    for p, o in zip(paths, objs):
        for i, r in enumerate(_records_of(o, str(p))):
            records.append((_count(r["forward_pass_id"], f"{p}: records[{i}].forward_pass_id"),
                            _count(r.get("rank", 0), f"{p}: records[{i}].rank"), p, i, r))
    if not records:
        raise UserError(f"{paths[0]}: the dump holds no records (start and stop the recorder around the requests)")
    records.sort(key=lambda t: (t[0], t[1]))
    seen: dict[tuple[int, int], str] = {}
    for pid, rank, p, i, _ in records:
        key = (pid, rank)
        if key in seen:
            raise UserError(f"{p}: records[{i}]: forward pass {pid} of rank {rank} is also in {seen[key]}; give "
                            "each rank's dump once")
        seen[key] = f"{p} records"
    per_token = "topk_ids_of_layer" in records[0][4]
    if any(("topk_ids_of_layer" in r) != per_token for *_, r in records):
        raise UserError(f"{paths[0]}: mixes per_token records (with topk_ids_of_layer) and per_pass ones")
    summary = [f"{p}: {len(_records_of(o, str(p)))} record(s) of forward passes "
               f"{_pass_range(o)}; map {layers} layers x {physical} physical slots -> {logical} logical experts"
               for p, o in zip(paths, objs)]
    common = dict(ranks=sorted({r for _, r, *_ in records}), forward_passes=len({t[0] for t in records}),
                  physical_to_logical="last_physical_to_logical_map (the map at dump time)",
                  num_hidden_layers=int(layers))
    if per_token:
        return _per_token(paths, records, phys2log, logical, top_k, model, dataset, summary, common)
    return _per_pass(paths, records, phys2log, logical, top_k, model, dataset, summary, common)


def _pass_range(obj: dict) -> str:
    ids = [r["forward_pass_id"] for r in obj["records"]]
    return f"{min(ids)}..{max(ids)}" if ids else "(none)"


def _same_tokens(a: Any, b: Any) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def _per_pass(paths, records, phys2log, logical, top_k, model, dataset, summary, common) -> ImportResult:
    if top_k is None or top_k < 1:
        raise UserError("sglang-dump per_pass records need --top-k (counts cannot tell how many experts each token "
                        "chose)")
    layers, physical = phys2log.shape
    pass_ids = sorted({t[0] for t in records})
    index = {pid: s for s, pid in enumerate(pass_ids)}
    counts = np.zeros((len(pass_ids), layers, logical), np.int64)
    first: dict[int, tuple] = {}
    key = (np.arange(layers)[:, None] * logical + phys2log).ravel()   # [layers * physical] -> layer*E + logical
    for pid, rank, p, i, r in records:
        where = f"{p}: records[{i}]"
        if "global_physical_count" not in r:
            raise UserError(f"{where}: no 'global_physical_count'")
        c = _array(r["global_physical_count"], where, "global_physical_count", 2)
        if c.shape != (layers, physical):
            raise UserError(f"{where}: 'global_physical_count' has shape {list(c.shape)}, the map "
                            f"[{layers}, {physical}]")
        if (c < 0).any():
            raise UserError(f"{where}: negative count in 'global_physical_count'")
        if pid in first and c.any() and _same_tokens(c, first[pid][1]):
            raise UserError(f"{where}: rank {rank} counted exactly what rank {first[pid][0]} counted in forward pass "
                            f"{pid}: both routed the same tokens (attention tensor parallelism); give one rank's file")
        first.setdefault(pid, (rank, c))
        counts[index[pid]] += np.bincount(key, weights=c.ravel(), minlength=layers * logical).reshape(
            layers, logical).astype(np.int64)
    busy = counts.sum(axis=(1, 2)) > 0
    counts, kept_passes = counts[busy], [pid for pid, b in zip(pass_ids, busy) if b]
    if not len(counts):
        raise UserError(f"{paths[0]}: every count is 0 (nothing was recorded)")
    moe = np.flatnonzero(counts.sum(axis=(0, 2)) > 0)
    counts = counts[:, moe, :]
    tokens = counts_tokens(counts, top_k, str(paths[0]), row_name=None if len(counts) == 1 else "step")
    dense = sorted(set(range(layers)) - set(moe.tolist()))
    summary.append(f"steps: one per forward pass with counts (per_pass records), in forward_pass_id order, ranks "
                   f"summed; {len(kept_passes)} step(s), {len(pass_ids) - len(kept_passes)} empty pass(es) dropped")
    summary.append(f"num_layers={len(moe)} (of {layers}; " + (f"layers {format_indices(dense)} never routed, dropped"
                                                               if dense else "none dropped")
                   + f"), num_experts={logical} (logical, from the map), top_k={top_k} (from --top-k)")
    prov = provenance(FORMAT, [str(p) for p in paths], recorder_mode="per_pass", **common,
                      forward_pass_ids=format_indices(kept_passes), original_layer_ids=moe.tolist(),
                      dropped_zero_layers=dense, top_k_source="from --top-k",
                      step_grouping="one step per forward pass (forward_pass_id order), ranks summed")
    meta = make_meta("counts", len(moe), logical, top_k, model, dataset, prov, tokens_per_step=tokens.tolist())
    return ImportResult(counts_trace(meta, counts), summary)


def _per_token(paths, records, phys2log, logical, top_k, model, dataset, summary, common) -> ImportResult:
    layers = phys2log.shape[0]
    step_rows: dict[int, list] = {}
    modes: dict[str, int] = {}
    first: dict[int, tuple] = {}
    for pid, rank, p, i, r in records:
        where = f"{p}: records[{i}]"
        t = _array(r["topk_ids_of_layer"], where, "topk_ids_of_layer", 3)
        ids, pos = r.get("input_ids"), r.get("positions")
        if not isinstance(ids, list) or not isinstance(pos, list) or len(ids) != len(pos) or t.shape[1] != len(ids):
            raise UserError(f"{where}: input_ids, positions and topk_ids_of_layer disagree on the token count")
        if t.shape[0] != layers:
            raise UserError(f"{where}: topk_ids_of_layer has {t.shape[0]} layers, the map {layers}")
        if (t >= phys2log.shape[1]).any():
            raise UserError(f"{where}: a physical slot id is not below the map's {phys2log.shape[1]} slots")
        if pid in first and len(ids) and ids == first[pid][1] and _same_tokens(t, first[pid][2]):
            raise UserError(f"{where}: rank {rank} recorded the same tokens as rank {first[pid][0]} in forward pass "
                            f"{pid} (attention tensor parallelism); give one rank's file")
        first.setdefault(pid, (rank, ids, t))
        modes[str(r.get("forward_mode"))] = modes.get(str(r.get("forward_mode")), 0) + 1
        if len(ids):
            step_rows.setdefault(pid, []).append((np.transpose(t, (1, 0, 2)), np.asarray(ids), np.asarray(pos), rank))
    if not step_rows:
        raise UserError(f"{paths[0]}: no record holds a token")
    pass_ids = sorted(step_rows)
    experts = np.concatenate([e for pid in pass_ids for e, *_ in step_rows[pid]])   # [N, layers, 8] physical
    cols = np.flatnonzero((experts >= 0).any(axis=(0, 1)))
    k = len(cols)
    if k == 0:
        raise UserError(f"{paths[0]}: no token was routed (every topk id is -1)")
    if cols.tolist() != list(range(k)):
        raise UserError(f"{paths[0]}: topk_ids_of_layer columns {cols.tolist()} hold ids but not as the first {k}")
    if top_k is not None and top_k != k:
        raise UserError(f"the dumps hold top-{k} routing (columns with ids) but --top-k is {top_k}")
    experts = experts[:, :, :k]
    moe = np.flatnonzero((experts >= 0).any(axis=(0, 2)))
    experts = experts[:, moe, :]
    routed = (experts >= 0).all(axis=(1, 2))
    logical_ids = phys2log[moe][np.arange(len(moe))[None, :, None], np.where(experts >= 0, experts, 0)]
    sizes = np.array([sum(len(ids) for _, ids, _, _ in step_rows[pid]) for pid in pass_ids])
    step_of = np.repeat(np.arange(len(pass_ids)), sizes)[routed]
    _, per_step = np.unique(step_of, return_counts=True)
    offsets = np.concatenate([[0], np.cumsum(per_step)]).astype(np.int64)
    cat = lambda j: np.concatenate([row[j] for pid in pass_ids for row in step_rows[pid]])  # noqa: E731
    rank = np.concatenate([np.full(len(row[1]), row[3]) for pid in pass_ids for row in step_rows[pid]])
    dense = sorted(set(range(layers)) - set(moe.tolist()))
    dropped = int((~routed).sum())
    kept_passes = sorted(set(np.asarray(pass_ids)[np.unique(step_of)].tolist()))
    summary.append(f"steps: one per forward pass (per_token records), in forward_pass_id order, a pass's ranks in "
                   f"rank order; {len(kept_passes)} step(s), {len(experts)} tokens"
                   + (f", {dropped} without routing (padding) dropped" if dropped else ""))
    summary.append(f"num_layers={len(moe)} (of {layers}; " + (f"layers {format_indices(dense)} never routed, dropped"
                                                               if dense else "none dropped")
                   + f"), num_experts={logical} (logical, from the map), top_k={k} (columns holding ids); token "
                     "ids, positions and ranks stored")
    prov = provenance(FORMAT, [str(p) for p in paths], recorder_mode="per_token", **common,
                      forward_pass_ids=format_indices(kept_passes), forward_modes=modes,
                      original_layer_ids=moe.tolist(), dropped_zero_layers=dense,
                      tokens_dropped_no_routing=dropped, top_k_source="columns of topk_ids_of_layer that hold ids",
                      expert_order="as SGLang recorded them (its top-k order)",
                      step_grouping="one step per forward pass (forward_pass_id order), ranks in rank order")
    meta = make_meta("tokens", len(moe), logical, k, model, dataset, prov)
    trace = TokensTrace(meta, logical_ids[routed].astype(np.int16), offsets, None,
                        token_id=cat(1)[routed].astype(np.int32), pos=cat(2)[routed].astype(np.int32),
                        rank=rank[routed].astype(np.int16))
    return ImportResult(trace, summary)


def _count(value, where: str) -> int:
    """An integer >= 0 of a record (a rank, a pass id), else a UserError naming ``where``."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise UserError(f"{where}: must be an integer >= 0, got {value!r}")
    return int(value)
