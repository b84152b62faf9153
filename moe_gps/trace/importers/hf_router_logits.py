"""HuggingFace transformers ``router_logits`` -> tokens kind.

A model called with ``output_router_logits=True`` (Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE, ...) returns ``router_logits``: a tuple with one ``[tokens, experts]`` tensor per
MoE layer (tokens = batch x sequence, padding included). The routing is recomputed the
way those models do it: softmax over the experts, the ``top_k`` most probable experts
(highest first) and, with ``normalize`` (Mixtral; Qwen-MoE with ``norm_topk_prob``),
their probabilities divided by their sum. Models that route otherwise (DeepSeek-V2/V3
group-limited or sigmoid routing with a bias) are not reproduced by this function.

:func:`routing_from_router_logits` is the reusable core (the runtime recorder calls it);
:func:`import_hf_router_logits` reads ``.npz`` / ``.pt`` files, one step per file.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from moe_gps.errors import UserError
from moe_gps.trace.importers.common import (
    ImportResult,
    check_sources,
    make_meta,
    provenance,
    tokens_trace,
    torch_load,
)

FORMAT = "hf-router-logits"
_EXTRA_KEYS = ("input_ids", "attention_mask")


def _to_numpy(x: Any) -> np.ndarray:
    """A numpy array from a numpy array, a list or a torch tensor (any device and dtype)."""
    if type(x).__module__.startswith("torch") and hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _layers(router_logits: Any, where: str) -> list[np.ndarray]:
    """Per-layer float32 [tokens, experts] arrays from a tuple/list or a stacked array."""
    if isinstance(router_logits, (tuple, list)):
        layers = [_to_numpy(x) for x in router_logits]
        if not layers:
            raise UserError(f"{where}: router_logits is empty (no MoE layer)")
        out = []
        for i, a in enumerate(layers):
            if a.ndim == 3:  # [batch, seq, experts]
                a = a.reshape(-1, a.shape[-1])
            if a.ndim != 2:
                raise UserError(f"{where}: layer {i} router logits have shape {list(a.shape)}, expected "
                                "[tokens, experts]")
            out.append(a)
        layers = out
    else:
        a = _to_numpy(router_logits)
        if a.ndim == 4:  # [layers, batch, seq, experts]
            a = a.reshape(a.shape[0], -1, a.shape[-1])
        if a.ndim != 3:
            raise UserError(f"{where}: stacked router logits have shape {list(a.shape)}, expected "
                            "[layers, tokens, experts] (or a tuple of [tokens, experts], one per layer)")
        layers = list(a)
    for i, a in enumerate(layers):
        if a.dtype.kind not in "fiu":
            raise UserError(f"{where}: layer {i} router logits are {a.dtype}, not numbers")
        if a.shape != layers[0].shape:
            raise UserError(f"{where}: layer {i} router logits have shape {list(a.shape)} but layer 0 has "
                            f"{list(layers[0].shape)} (every layer routes the same tokens over the same experts)")
    return [np.asarray(a, dtype=np.float32) for a in layers]


def routing_from_router_logits(router_logits: Any, top_k: int, normalize: bool = True,
                               where: str = "router_logits") -> tuple[np.ndarray, np.ndarray]:
    """Top-k routing from router logits, as Mixtral / Qwen-MoE compute it.

    router_logits: a tuple or list with one ``[tokens, experts]`` array or torch tensor per
        MoE layer (``[batch, seq, experts]`` is flattened), or one stacked
        ``[layers, tokens, experts]`` array/tensor. Any float dtype and device.
    top_k: experts per token.  normalize: divide the chosen probabilities by their sum.

    Returns ``experts`` int16 [tokens, layers, top_k] (most probable first; ties go to the
    lower expert id) and ``weights`` float32 [tokens, layers, top_k] with
    ``weights = softmax(logits)[experts]`` (over all experts), divided by their sum over
    the top-k when ``normalize``. Raises :class:`UserError` (prefixed by ``where``) for
    bad shapes, NaN/inf logits or ``top_k`` outside ``[1, experts]``.
    """
    layers = _layers(router_logits, where)
    T, E = layers[0].shape
    L = len(layers)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= E:
        raise UserError(f"{where}: top_k={top_k!r} must be an integer in [1, {E}] (the number of experts)")
    if E > 32767:
        raise UserError(f"{where}: {E} experts do not fit int16 expert ids")
    k = int(top_k)
    experts = np.empty((T, L, k), dtype=np.int16)
    weights = np.empty((T, L, k), dtype=np.float32)
    for i, x in enumerate(layers):
        bad = ~np.isfinite(x)
        if bad.any():
            t, e = np.unravel_index(int(np.argmax(bad)), bad.shape)
            raise UserError(f"{where}: layer {i}, token {t}, expert {e}: router logit is {x[t, e]}")
        if k < E:
            cand = np.argpartition(-x, k - 1, axis=1)[:, :k]
            cand.sort(axis=1)  # ascending ids, so the stable sort below breaks ties by lower id
        else:
            cand = np.broadcast_to(np.arange(E), (T, E)).copy()
        order = np.argsort(-np.take_along_axis(x, cand, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(cand, order, axis=1)
        shifted = np.exp(x - x.max(axis=1, keepdims=True))  # softmax numerator, max term = 1
        chosen = np.take_along_axis(shifted, top, axis=1)
        denom = chosen.sum(axis=1, keepdims=True) if normalize else shifted.sum(axis=1, keepdims=True)
        experts[:, i, :] = top
        weights[:, i, :] = chosen / denom
    return experts, weights


def _layer_index(key: str) -> int | None:
    m = re.search(r"(\d+)$", key)
    return int(m.group(1)) if m else None


def read_router_logits_file(path: Path) -> tuple[Any, dict[str, np.ndarray], str]:
    """-> (router_logits as a list or stacked array, extras {input_ids, attention_mask}, layout)."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            archive = np.load(path, allow_pickle=False)
            if not hasattr(archive, "files"):
                raise ValueError("it holds a single .npy array, not an archive of arrays")
            with archive:
                arrays = {k: archive[k] for k in archive.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"{path}: not a readable .npz archive ({first})") from None
        extras = {k: arrays.pop(k) for k in _EXTRA_KEYS if k in arrays}
        if not arrays:
            raise UserError(f"{path}: holds no router-logit array (keys: {', '.join(extras) or 'none'})")
        if len(arrays) == 1:
            (key, a), = arrays.items()
            if a.ndim == 2:
                return [a], extras, f"one array {key!r} [tokens, experts] (one layer)"
            return a, extras, f"one stacked array {key!r} {list(a.shape)}"
        idx = {k: _layer_index(k) for k in arrays}
        unnumbered = [k for k, v in idx.items() if v is None]
        if unnumbered:
            raise UserError(f"{path}: array(s) {', '.join(map(repr, unnumbered))} carry no layer number; name "
                            "the per-layer arrays with a trailing index (layer_0, layer_1, ... or numpy's "
                            "arr_0, arr_1, ...) or store one stacked [layers, tokens, experts] array")
        if len(set(idx.values())) != len(idx):
            raise UserError(f"{path}: two arrays carry the same layer number ({', '.join(sorted(arrays))})")
        keys = sorted(arrays, key=lambda k: idx[k])
        return [arrays[k] for k in keys], extras, f"{len(keys)} per-layer arrays {keys[0]!r}..{keys[-1]!r}"
    if suffix == ".pt":
        obj = torch_load(path, "reading .pt files (or save the router logits with numpy.savez as .npz)")
        import torch  # present: torch_load checked

        extras: dict[str, np.ndarray] = {}
        if isinstance(obj, dict):
            if "router_logits" not in obj:
                raise UserError(f"{path}: the saved dict has no 'router_logits' key (keys: "
                                f"{', '.join(map(str, obj))})")
            extras = {k: _to_numpy(obj[k]) for k in _EXTRA_KEYS if obj.get(k) is not None}
            obj = obj["router_logits"]
        if isinstance(obj, (tuple, list)):
            if not all(isinstance(t, torch.Tensor) for t in obj):
                raise UserError(f"{path}: router_logits must be a tuple/list of tensors, one per layer")
            return list(obj), extras, f"tuple of {len(obj)} per-layer tensors"
        if isinstance(obj, torch.Tensor):
            return obj, extras, f"one stacked tensor {list(obj.shape)}"
        raise UserError(f"{path}: holds a {type(obj).__name__}; expected the router_logits tuple, a stacked "
                        "tensor, or a dict with 'router_logits'")
    raise UserError(f"{path}: unknown file type {suffix or '(none)'!r}; hf-router-logits reads .npz and .pt")


def import_hf_router_logits(sources: Sequence[str | os.PathLike], *, top_k: int, normalize: bool = True,
                            model: str = "unknown", dataset: str = "unknown") -> ImportResult:
    """Import saved ``router_logits`` into a tokens trace, one step per file in the order given.

    Optional ``input_ids`` (written as token_id) and ``attention_mask`` (tokens where it is
    0 are dropped) may accompany the logits, flattened to the same number of tokens.
    """
    if top_k is None:
        raise UserError("hf-router-logits needs --top-k (the model's experts per token)")
    paths = check_sources(sources)
    step_experts, step_weights, step_ids, summary, layouts = [], [], [], [], {}
    shape_ref: tuple[int, int, Path] | None = None
    for s, p in enumerate(paths):
        logits, extras, layout = read_router_logits_file(p)
        experts, weights = routing_from_router_logits(logits, top_k, normalize, where=str(p))
        T, L, _ = experts.shape
        E = (logits[0] if isinstance(logits, list) else logits).shape[-1]
        if shape_ref is None:
            shape_ref = (L, int(E), p)
        elif (L, E) != shape_ref[:2]:
            raise UserError(f"{p}: {L} layers x {E} experts but {shape_ref[2]} has "
                            f"{shape_ref[0]} x {shape_ref[1]}")
        for name, a in extras.items():
            a = np.asarray(a).reshape(-1)
            if len(a) != T:
                raise UserError(f"{p}: {name} holds {len(a)} values but the router logits cover {T} tokens")
            extras[name] = a
        ids = extras.get("input_ids")
        if ids is not None and (ids.dtype.kind not in "iu" or (ids < 0).any() or (ids > 2**31 - 1).any()):
            raise UserError(f"{p}: input_ids must be non-negative int32 vocabulary ids")
        keep = None
        if "attention_mask" in extras:
            keep = np.asarray(extras["attention_mask"]) != 0
            experts, weights = experts[keep], weights[keep]
            ids = None if ids is None else ids[keep]
        if len(experts) == 0:
            raise UserError(f"{p}: no token left (the router logits are empty or fully masked)")
        step_experts.append(experts)
        step_weights.append(weights)
        step_ids.append(ids)
        layouts[str(p)] = layout
        masked = "" if keep is None else f", {int((~keep).sum())} padding tokens dropped"
        summary.append(f"step {s}: {p}: {len(experts)} tokens x {L} layers x {E} experts ({layout}{masked})")
    assert shape_ref is not None
    with_ids = all(i is not None for i in step_ids)
    L, E = shape_ref[0], shape_ref[1]
    rule = ("softmax over experts, top-k, divided by the top-k sum" if normalize
            else "softmax over experts, top-k (not renormalised)")
    summary.append(f"num_layers={L}, num_experts={E} (logit shapes), top_k={top_k} (from --top-k); weights: {rule}")
    summary.append(f"steps: one per file (one forward pass), in the order given; {len(step_ids)} step(s)")
    if not with_ids:
        some = any(i is not None for i in step_ids)
        summary.append("token_id: not stored (" + ("some files lack input_ids" if some else "no input_ids given") + ")")
    prov = provenance(FORMAT, [str(p) for p in paths], top_k_source="from --top-k", normalize=normalize,
                      step_grouping="one step per file (one forward pass), in the order given",
                      weights=rule, layouts=layouts,
                      token_id="from input_ids" if with_ids else "not stored")
    meta = make_meta("tokens", L, E, top_k, model, dataset, prov)
    trace = tokens_trace(meta, step_experts, step_weights, step_ids if with_ids else None)
    return ImportResult(trace, summary)
