"""Importers: router traces that real systems emit -> MoE-GPS traces.

One module per source format (see ``docs/importers.md``):

* ``vllm-routed`` (tokens): vLLM responses holding ``routed_experts``
* ``sglang-routed`` (tokens): SGLang responses holding ``meta_info.routed_experts``
* ``sglang-dump`` (counts, or tokens for ``per_token``): SGLang expert-distribution
  recorder dumps (.pt) of the ``stat``, ``per_pass`` and ``per_token`` modes
* ``vllm-jsonl`` (tokens): a patched vLLM's JSON lines, one MoE layer call per line
* ``gate-csv`` (tokens): CSV gate-score matrices, one file per layer
* ``popularity-json`` (counts): aggregated per-layer expert popularity
* ``hf-router-logits`` (tokens): HF transformers ``router_logits`` (.npz / .pt)

Each ``import_<format>(sources, **options)`` returns an :class:`ImportResult` holding an
in-memory trace (``source="imported"``, with provenance); :func:`import_trace` runs one
and writes the result atomically. :func:`routing_from_router_logits` is the reusable
core of the HF importer.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from moe_gps.trace.importers.common import ImportResult
from moe_gps.trace.importers.gate_csv import import_gate_csv
from moe_gps.trace.importers.hf_router_logits import import_hf_router_logits, routing_from_router_logits
from moe_gps.trace.importers.popularity_json import import_popularity_json
from moe_gps.trace.importers.sglang_dump import import_sglang_dump
from moe_gps.trace.importers.sglang_routed import import_sglang_routed
from moe_gps.trace.importers.vllm_jsonl import import_vllm_jsonl
from moe_gps.trace.importers.vllm_routed import import_vllm_routed

IMPORTERS: dict[str, Callable[..., ImportResult]] = {
    "vllm-routed": import_vllm_routed,
    "sglang-routed": import_sglang_routed,
    "vllm-jsonl": import_vllm_jsonl,
    "gate-csv": import_gate_csv,
    "popularity-json": import_popularity_json,
    "hf-router-logits": import_hf_router_logits,
    "sglang-dump": import_sglang_dump,
}
FORMATS = tuple(IMPORTERS)


def import_trace(fmt: str, sources: Sequence[str | os.PathLike], output: str | os.PathLike,
                 command: str | None = None, phase: str | None = None, **options: Any) -> ImportResult:
    """Import ``sources`` of format ``fmt`` and write the trace to ``output`` atomically.

    ``options`` are the keyword arguments of the format's ``import_<format>`` function;
    ``command`` (the command line) and ``phase`` (prefill or decode: what the steps are) are added to the
    provenance.
    """
    from moe_gps.errors import UserError
    from moe_gps.trace.writer import write_trace

    if fmt not in IMPORTERS:
        raise UserError(f"unknown import format {fmt!r} (one of {', '.join(FORMATS)})")
    result = IMPORTERS[fmt](sources, **options)
    if command is not None:
        result.trace.meta.provenance["command"] = command
    if phase is not None:
        result.trace.meta.provenance["phase"] = phase
    write_trace(output, result.trace)
    return result


__all__ = ["FORMATS", "IMPORTERS", "ImportResult", "import_gate_csv", "import_hf_router_logits",
           "import_popularity_json", "import_sglang_dump", "import_sglang_routed", "import_trace", "import_vllm_jsonl",
           "import_vllm_routed", "routing_from_router_logits"]
