"""Per-request routing that serving engines return -> a tokens trace (shared by
``vllm-routed`` and ``sglang-routed``).

Both engines return, per request, an integer array ``[tokens, layers, top_k]``: row ``i``
is the experts the token at position ``i`` of the request's sequence was routed to,
one row per token that went through a forward pass (prompt tokens, then generated
tokens but the last). The readers turn each response into :class:`RequestRouting`
objects; :func:`assemble` applies the user's selection and grouping and builds the
trace.

What the arrays cannot say, and how it is handled (printed, and kept in the provenance):

* **which tokens shared a forward pass.** A response is one request; the server batched
  it with others that are not in the file. One step of the trace is
  ``requests_per_step`` consecutive requests (default 1), in input order (files as
  given, responses in file order, a response's choices in order), restricted to the
  ``part`` chosen: ``prompt`` rows, ``output`` rows, or ``all``.
* **dense layers.** The layer axis counts decoder layers in SGLang and in some vLLM
  versions (others count MoE layers only); layers that never routed (every id 0, or -1)
  are dense and dropped, and then their positions give ``original_layer_ids``.
* **tokens not captured** (-1 ids in a kept layer) are dropped and counted.
* **num_experts** is not in the arrays: ``--num-experts`` is required.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_gps.errors import UserError
from moe_gps.tables import format_indices
from moe_gps.trace.data import TokensTrace
from moe_gps.trace.importers.common import first_duplicate_in_rows, make_meta, provenance
from moe_gps.trace.meta import TraceMeta

PARTS = ("all", "prompt", "output")


@dataclass
class RequestRouting:
    """The routed experts of one sequence of one request.

    where:       the response in the file (``file:line``), for messages
    request:     index of the request (response) in input order
    experts:     int [rows, layer axis, k], the ids as returned (-1 where not captured)
    pos0:        position of row 0 in the sequence
    prompt_rows: how many leading rows are prompt tokens; None when the response does not say
    prompt_ids, output_ids: the request's prompt and generated vocabulary ids, where returned
    prompt_len:  the prompt's token count, where known
    """

    where: str
    request: int
    experts: np.ndarray
    pos0: int
    prompt_rows: int | None
    prompt_ids: list | None = None
    output_ids: list | None = None
    prompt_len: int | None = None

    def part(self, part: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(experts, positions, token ids) of the rows in ``part``."""
        n = len(self.experts)
        if part == "all":
            lo, hi = 0, n
        elif self.prompt_rows is None:
            raise UserError(f"{self.where}: cannot tell the prompt rows from the output rows (the response has "
                            "neither prompt_token_ids nor a prompt token count); use --part all")
        elif part == "prompt":
            lo, hi = 0, min(self.prompt_rows, n)
        else:
            lo, hi = min(self.prompt_rows, n), n
        ids = token_ids_of(hi - lo, self.pos0 + lo, self.prompt_ids, self.output_ids, self.prompt_len)
        return self.experts[lo:hi], np.arange(self.pos0 + lo, self.pos0 + hi, dtype=np.int64), ids


def token_ids_of(rows: int, pos0: int, prompt_ids: list | None, output_ids: list | None,
                 prompt_len: int | None) -> np.ndarray | None:
    """Vocabulary id of each of ``rows`` rows from position ``pos0``, or None if any is unknown.

    Position q holds prompt_ids[q] below the prompt length, output_ids[q - prompt_len] after.
    """
    pos = np.arange(pos0, pos0 + rows)
    n_prompt = len(prompt_ids) if prompt_ids is not None else (prompt_len or 0)
    out = np.full(rows, -1, dtype=np.int64)
    if prompt_ids is not None:
        inside = pos < len(prompt_ids)
        out[inside] = np.asarray(prompt_ids, dtype=np.int64)[pos[inside]]
    if output_ids is not None and (prompt_ids is not None or prompt_len is not None):
        j = pos - n_prompt
        inside = (j >= 0) & (j < len(output_ids))
        out[inside] = np.asarray(output_ids, dtype=np.int64)[j[inside]]
    return out if (out >= 0).all() else None


def check_integer_array(value: np.ndarray, where: str, what: str) -> np.ndarray:
    """value as int64 [rows, layers, k], or UserError naming ``where`` and ``what``."""
    if value.dtype.kind not in "iu":
        raise UserError(f"{where}: {what} holds {value.dtype} values, expected integer expert ids")
    if value.ndim != 3:
        raise UserError(f"{where}: {what} has shape {list(value.shape)}, expected [tokens, layers, top_k]")
    return value.astype(np.int64, copy=False)


def assemble(fmt: str, sources: list[str], requests: list[RequestRouting], *, num_experts: int | None,
             part: str, requests_per_step: int, model: str, dataset: str, axis_is_decoder_layers: bool,
             summary: list[str], details: dict) -> TokensTrace:
    """Select, group and check the requests' routing; build the trace (see the module docstring).

    axis_is_decoder_layers: whether the engine's layer axis is known to count every decoder
    layer (then the kept layers' positions are decoder layer ids even with no dense layer).
    """
    if num_experts is None:
        ids = [int(r.experts.max()) for r in requests if r.experts.size]
        hint = f"; the largest id in the file is {max(ids)}, so at least {max(ids) + 1}" if ids else ""
        raise UserError(f"--from {fmt} needs --num-experts, the model's routed experts per layer (num_experts, "
                        f"num_local_experts or n_routed_experts in its config.json){hint}")
    if part not in PARTS:
        raise UserError(f"--part must be one of {', '.join(PARTS)}, got {part!r}")
    if requests_per_step < 1:
        raise UserError(f"--requests-per-step must be >= 1, got {requests_per_step}")
    if not requests:
        raise UserError(f"{sources[0]}: no response holds routed experts")
    axis, k = requests[0].experts.shape[1:]
    for r in requests:
        if r.experts.shape[1:] != (axis, k):
            raise UserError(f"{r.where}: routed experts have {r.experts.shape[1]} layers x top-{r.experts.shape[2]} "
                            f"but {requests[0].where} has {axis} x top-{k}")
    picked = [(r, *r.part(part)) for r in requests]
    experts = np.concatenate([e for _, e, _, _ in picked]) if picked else np.zeros((0, axis, k), np.int64)
    if len(experts) == 0:
        raise UserError(f"no token selected (--part {part} leaves no row in any response)")

    below = np.argwhere(experts < -1)
    if len(below):
        row, layer, j = (int(x) for x in below[0])
        raise UserError(f"{_where_of_row(picked, row)}: expert id {int(experts[row, layer, j])} in layer {layer} is "
                        "negative (only -1 marks a token whose routing was not captured)")
    empty = (experts <= 0).all(axis=(0, 2))                      # [axis]: never routed: a dense layer
    kept = np.flatnonzero(~empty)
    if len(kept) == 0:
        raise UserError(f"{sources[0]}: every routed expert id is 0 or -1 (nothing was captured)")
    experts = experts[:, kept, :]
    captured = (experts >= 0).all(axis=(1, 2))                    # [rows]
    dup = first_duplicate_in_rows(experts[captured].reshape(-1, k))
    if dup is not None:
        row = int(np.flatnonzero(captured)[dup[0] // len(kept)])
        raise UserError(f"{_where_of_row(picked, row)}: a token chooses expert {dup[1]} twice in one layer "
                        "(not a top-k routing)")
    too_big = experts[captured] >= num_experts
    if too_big.any():
        row = int(np.flatnonzero(captured)[np.argwhere(too_big)[0][0]])
        raise UserError(f"{_where_of_row(picked, row)}: expert id {int(experts[row].max())} is not below "
                        f"--num-experts {num_experts} (with redundant experts the server may return physical "
                        "slot ids)")

    # rows -> steps of requests_per_step requests
    request_of_row = np.concatenate([np.full(len(e), r.request) for r, e, _, _ in picked])
    seq_of_row = np.concatenate([np.full(len(e), i) for i, (_, e, _, _) in enumerate(picked)])
    pos = np.concatenate([p for _, _, p, _ in picked])
    ids_known = all(t is not None for _, _, _, t in picked)
    token_id = np.concatenate([t for _, _, _, t in picked]) if ids_known else None
    keep = captured
    step_of_row = request_of_row // requests_per_step
    order = np.flatnonzero(keep)                                  # input order is step order already
    step_ids, sizes = np.unique(step_of_row[order], return_counts=True)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    take = lambda a: None if a is None else a[order]  # noqa: E731

    dropped_rows = int((~captured).sum())
    num_requests = len({r.request for r in requests})
    dense = [int(i) for i in np.flatnonzero(empty)]
    layer_note = (f"layer axis of {axis}: " + (f"layers {format_indices(dense)} never routed (dense) and dropped"
                                                if dense else "every layer routed"))
    if k == 1 and dense:
        layer_note += " (with top-1 routing a layer where every token chose expert 0 looks the same)"
    summary.append(f"{num_requests} request(s), {len(requests)} sequence(s); {layer_note}")
    summary.append(f"steps: one step = {requests_per_step} consecutive request(s), {part} tokens "
                   f"({'prompt and output' if part == 'all' else part} rows of each response); order: files as "
                   f"given, responses in file order, a response's choices in order; {len(step_ids)} step(s)")
    if dropped_rows:
        summary.append(f"dropped {dropped_rows} token(s) whose routing was not captured (-1 ids)")
    ids = "stored" if ids_known else "not stored (the responses do not hold them all)"
    summary.append(f"num_layers={len(kept)}, num_experts={num_experts} (from --num-experts), top_k={k} "
                   f"({details.get('top_k_source', 'from the arrays')}); token ids {ids}")
    prov_layers: dict = {}
    if dense or axis_is_decoder_layers:
        prov_layers = {"original_layer_ids": [int(i) for i in kept], "num_hidden_layers": int(axis)}
    else:
        summary.append(f"note: the {axis}-layer axis may count MoE layers only (vLLM versions differ), so the "
                       "trace does not say which decoder layers they are; plan --sglang will ask for "
                       "--num-hidden-layers / --first-moe-layer")
    prov = provenance(fmt, sources, selection={"part": part, "requests_per_step": requests_per_step},
                      requests=num_requests, sequences=len(requests), layer_axis=int(axis), dense_layers=dense,
                      tokens_dropped_not_captured=dropped_rows, num_experts_source="from --num-experts",
                      step_grouping=f"{requests_per_step} request(s) per step, input order",
                      expert_order="as the server returned them (its top-k order)", **prov_layers, **details)
    meta: TraceMeta = make_meta("tokens", len(kept), num_experts, k, model, dataset, prov)
    return TokensTrace(meta, experts[order].astype(np.int16), offsets, None,
                       token_id=None if token_id is None else take(token_id).astype(np.int32),
                       seq=take(seq_of_row).astype(np.int32), pos=take(pos).astype(np.int32))


def _where_of_row(picked: list, row: int) -> str:
    sizes = np.cumsum([len(e) for _, e, _, _ in picked])
    i = int(np.searchsorted(sizes, row, side="right"))
    r, _, p, _ = picked[i]
    return f"{r.where}: token at position {int(p[row - (sizes[i - 1] if i else 0)])}"
