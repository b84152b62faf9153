"""SGLang's returned routing (``--enable-return-routed-experts``) -> tokens kind.

What SGLang returns (read from ``python/sglang/srt/layers/moe/routed_experts_capturer.py``
and ``python/sglang/srt/managers/detokenizer_manager.py`` in sgl-project/sglang): the
capturer keeps, per KV-cache slot, an int32 row ``[num_hidden_layers,
num_experts_per_tok]`` written by every MoE layer (``layer_id`` = decoder layer; dense
layers stay 0). For a request asking for it (``"return_routed_experts": true``), the
rows of its first ``seqlen - 1`` tokens (prompt, then generated tokens but the last) are
returned in ``meta_info.routed_experts`` as ``base64(array.tobytes())``: flat int32,
no shape (``extract_routed_experts_from_meta_info`` decodes it).

The shape is therefore ``[prompt_tokens + completion_tokens - 1, layers, top_k]`` with
the two token counts from ``meta_info``: the product ``layers x top_k`` is certain, one
of them must be given (``--top-k``, the config's ``num_experts_per_tok``, or
``--num-layers``, its ``num_hidden_layers``); with both, they are checked. The layer axis
counts every decoder layer, so the kept layers' indices are decoder layer ids.
Generated token ids come from ``output_ids`` when present.

Save the ``/generate`` responses as JSON lines or one JSON array (a batch response, a
list, counts one response per element). Grouping, dense layers and what is required:
:mod:`moe_gps.trace.importers.routed`.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Any, Sequence

import numpy as np

from moe_gps.errors import UserError
from moe_gps.trace.importers.common import ImportResult, check_sources, read_json_records
from moe_gps.trace.importers.routed import RequestRouting, assemble

FORMAT = "sglang-routed"


def _shape(n: int, tokens: int | None, top_k: int | None, num_layers: int | None, where: str) -> tuple[int, int, int]:
    """[tokens, layers, k] of ``n`` int32 values, from what is known; UserError when unsure."""
    if tokens is None:
        if top_k is None or num_layers is None:
            raise UserError(f"{where}: meta_info has no prompt_tokens / completion_tokens, so the flat array of {n} "
                            "ids needs both --num-layers and --top-k")
        if n % (top_k * num_layers):
            raise UserError(f"{where}: {n} ids are not a whole number of tokens x {num_layers} layers x top-{top_k}")
        return n // (top_k * num_layers), num_layers, top_k
    if tokens <= 0 or n % tokens:
        raise UserError(f"{where}: {n} ids do not divide over prompt_tokens + completion_tokens - 1 = {tokens} "
                        "tokens")
    per_token = n // tokens                                       # layers x top_k
    if top_k is None and num_layers is None:
        raise UserError(f"--from {FORMAT} needs --top-k (the model's num_experts_per_tok) or --num-layers (its "
                        f"num_hidden_layers): {where} holds {per_token} ids per token = layers x top_k")
    k = top_k if top_k is not None else per_token // num_layers
    layers = num_layers if num_layers is not None else per_token // top_k
    if k * layers != per_token or k < 1 or layers < 1:
        given = ", ".join(f"{f} {v}" for f, v in (("--top-k", top_k), ("--num-layers", num_layers)) if v is not None)
        raise UserError(f"{where}: {per_token} ids per token do not split into layers x top_k with {given}")
    return tokens, layers, k


def _request_of(rec: Any, where: str, request: int, top_k: int | None,
                num_layers: int | None) -> RequestRouting | None:
    meta = rec.get("meta_info") if isinstance(rec, dict) else None
    if not isinstance(meta, dict):
        raise UserError(f"{where}: not an SGLang /generate response (no 'meta_info' object)")
    value = meta.get("routed_experts")
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserError(f"{where}: meta_info.routed_experts is a {type(value).__name__}, expected a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{where}: meta_info.routed_experts is not base64") from None
    if len(raw) % 4:
        raise UserError(f"{where}: meta_info.routed_experts holds {len(raw)} bytes, not whole int32 values")
    flat = np.frombuffer(raw, dtype="<i4")
    p, c = meta.get("prompt_tokens"), meta.get("completion_tokens")
    tokens = p + c - 1 if isinstance(p, int) and isinstance(c, int) else None
    if not flat.size:
        return None
    shape = _shape(int(flat.size), tokens, top_k, num_layers, where)
    experts = flat.reshape(shape).astype(np.int64)
    ids = {key: rec.get(key) if isinstance(rec.get(key), list) else None for key in ("input_ids", "output_ids")}
    prompt_len = p if isinstance(p, int) else None
    return RequestRouting(where, request, experts, 0, prompt_len, ids["input_ids"], ids["output_ids"], prompt_len)


def import_sglang_routed(sources: Sequence[str | os.PathLike], *, num_experts: int | None = None,
                         top_k: int | None = None, num_layers: int | None = None, part: str = "all",
                         requests_per_step: int = 1, model: str = "unknown", dataset: str = "unknown") -> ImportResult:
    """Import saved SGLang /generate responses with routed experts into a tokens trace."""
    paths = check_sources(sources)
    requests: list[RequestRouting] = []
    summary: list[str] = []
    for p in paths:
        records = read_json_records(p)
        before = len(requests)
        for where, rec in records:
            r = _request_of(rec, where, len(requests), top_k, num_layers)
            if r is not None:
                requests.append(r)
        summary.append(f"{p}: {len(records)} response(s), {len(requests) - before} with meta_info.routed_experts")
    if not requests:
        raise UserError(f"{paths[0]}: no response holds meta_info.routed_experts (start SGLang with "
                        "--enable-return-routed-experts and send \"return_routed_experts\": true)")
    shape_note = {"top_k_source": "from --top-k" if top_k is not None else "prompt_tokens + completion_tokens "
                  "and --num-layers", "num_layers_source": "from --num-layers" if num_layers is not None else
                  "prompt_tokens + completion_tokens and --top-k"}
    trace = assemble(FORMAT, [str(p) for p in paths], requests, num_experts=num_experts, part=part,
                     requests_per_step=requests_per_step, model=model, dataset=dataset,
                     axis_is_decoder_layers=True, summary=summary, details=shape_note)
    return ImportResult(trace, summary)
