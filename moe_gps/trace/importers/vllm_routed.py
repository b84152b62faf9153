"""vLLM's returned routing (``vllm serve --enable-return-routed-experts``) -> tokens kind.

What vLLM returns (read from ``vllm/outputs.py``, ``vllm/v1/engine/output_processor.py``,
``vllm/entrypoints/openai/chat_completion/protocol.py`` and
``vllm/model_executor/layers/fused_moe/routed_experts_capturer.py`` in vllm-project/vllm):
the capturer records, for every token that goes through a forward pass, the ``topk_ids``
of every MoE layer, ``[tokens, layers, num_experts_per_tok]``. The server returns them
per request in the completion or chat-completion response:

* ``prompt_routed_experts`` (on the response) for the prompt tokens and
  ``choices[i].routed_experts`` for each choice's generated tokens, when the response has
  a ``prompt_routed_experts`` array (vLLM splits them with ``split_routed_experts``);
* otherwise ``choices[i].routed_experts`` alone, from the first prompt token to the last
  generated token that was fed back (``num_tokens - 1`` rows).

Each array is either nested JSON lists or a base64 string of ``.npy`` bytes
(``np.load(io.BytesIO(base64.b64decode(s)))``), as vLLM versions differ. Token ids come
from ``prompt_token_ids`` and ``choices[i].token_ids`` when the request asked for them
(``return_token_ids``); the prompt length from them or ``usage.prompt_tokens``.

Save the responses as JSON lines (one response per line) or one JSON array. Grouping,
dense layers and what is required: :mod:`moe_gps.trace.importers.routed`.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import Any, Sequence

import numpy as np

from moe_gps.errors import UserError
from moe_gps.trace.importers.common import ImportResult, check_sources, read_json_records
from moe_gps.trace.importers.routed import RequestRouting, assemble, check_integer_array

FORMAT = "vllm-routed"


def decode_routed_experts(value: Any, where: str, key: str) -> np.ndarray:
    """A ``routed_experts`` value (nested lists, or base64 ``.npy``) -> int64 [tokens, layers, k]."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
        except (binascii.Error, ValueError, OSError, EOFError) as err:
            raise UserError(f"{where}: {key} is a string but not base64 .npy bytes ({str(err)[:80]})") from None
        if not isinstance(arr, np.ndarray):
            raise UserError(f"{where}: {key} decodes to {type(arr).__name__}, expected one array")
    elif isinstance(value, list):
        try:
            arr = np.asarray(value)
        except ValueError:
            arr = np.asarray([], dtype=object)
        if arr.dtype == object:
            raise UserError(f"{where}: {key} is a ragged list; expected [tokens][layers][top_k] integers")
        if arr.size == 0:
            return np.zeros((0, 0, 0), np.int64)
    else:
        raise UserError(f"{where}: {key} is a {type(value).__name__}; expected nested lists or a base64 .npy string")
    return check_integer_array(arr, where, key)


def _requests_of(rec: Any, where: str, request: int) -> list[RequestRouting]:
    if not isinstance(rec, dict) or not isinstance(rec.get("choices"), list):
        raise UserError(f"{where}: not a vLLM completion response (no 'choices' list)")
    prompt_ids = rec.get("prompt_token_ids") if isinstance(rec.get("prompt_token_ids"), list) else None
    usage = rec.get("usage") if isinstance(rec.get("usage"), dict) else {}
    prompt_len = len(prompt_ids) if prompt_ids is not None else usage.get("prompt_tokens")
    prompt_len = prompt_len if isinstance(prompt_len, int) else None
    out: list[RequestRouting] = []

    def seq(arr: np.ndarray, pos0: int, prompt_rows: int | None, choice: dict | None) -> RequestRouting:
        output = choice.get("token_ids") if choice is not None and isinstance(choice.get("token_ids"), list) else None
        return RequestRouting(where, request, arr, pos0, prompt_rows, prompt_ids, output, prompt_len)

    choices = [c for c in rec["choices"] if isinstance(c, dict)]
    if rec.get("prompt_routed_experts") is not None:
        prompt = decode_routed_experts(rec["prompt_routed_experts"], where, "prompt_routed_experts")
        if len(prompt):
            out.append(seq(prompt, 0, len(prompt), None))
        start = prompt_len if prompt_len is not None else len(prompt)
        for c in choices:
            if c.get("routed_experts") is None:
                continue
            arr = decode_routed_experts(c["routed_experts"], f"{where} choice {c.get('index', '?')}", "routed_experts")
            if len(arr):
                out.append(seq(arr, start, 0, c))
    else:
        for n, c in enumerate(c for c in choices if c.get("routed_experts") is not None):
            arr = decode_routed_experts(c["routed_experts"], f"{where} choice {c.get('index', '?')}", "routed_experts")
            if n == 0:
                out.append(seq(arr, 0, prompt_len, c))
            elif prompt_len is None:
                raise UserError(f"{where}: several choices each route the shared prompt, and the response does not "
                                "say how long it is (no prompt_token_ids or usage.prompt_tokens)")
            elif len(arr) > prompt_len:
                out.append(seq(arr[prompt_len:], prompt_len, 0, c))
    out = [r for r in out if r.experts.size]
    if not out:
        raise UserError(f"{where}: the response holds no routed experts (start vLLM with "
                        "--enable-return-routed-experts)")
    return out


def import_vllm_routed(sources: Sequence[str | os.PathLike], *, num_experts: int | None = None, part: str = "all",
                       requests_per_step: int = 1, model: str = "unknown", dataset: str = "unknown") -> ImportResult:
    """Import saved vLLM responses with routed experts into a tokens trace (see the module docstring)."""
    paths = check_sources(sources)
    requests: list[RequestRouting] = []
    summary: list[str] = []
    split = count = 0
    for p in paths:
        records = read_json_records(p)
        for where, rec in records:
            req = _requests_of(rec, where, count)
            split += any(r.prompt_rows == 0 for r in req)
            requests += req
            count += 1
        summary.append(f"{p}: {len(records)} response(s) with routed experts")
    summary.append("prompt/output split: " + (f"prompt_routed_experts + choices[].routed_experts in {split} "
                                              "response(s), " if split else "")
                   + "otherwise choices[].routed_experts from the first prompt token")
    trace = assemble(FORMAT, [str(p) for p in paths], requests, num_experts=num_experts, part=part,
                     requests_per_step=requests_per_step, model=model, dataset=dataset,
                     axis_is_decoder_layers=False, summary=summary, details={})
    return ImportResult(trace, summary)
