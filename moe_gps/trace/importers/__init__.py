"""Importers: router traces that real systems emit -> MoE-GPS traces.

One module per source format (see ``docs/importers.md``):

=====================  ======================================================  ======
format                 source                                                  kind
=====================  ======================================================  ======
``vllm-jsonl``         JSON lines, one MoE layer call per line (``topk_ids``)  tokens
``gate-csv``           CSV gate-score matrices, one file per layer             tokens
``popularity-json``    aggregated per-layer expert popularity                  counts
``hf-router-logits``   HF transformers ``router_logits`` (.npz / .pt)          tokens
``sglang-dump``        SGLang expert-distribution recorder dump (.pt)          counts
=====================  ======================================================  ======

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
from moe_gps.trace.importers.vllm_jsonl import import_vllm_jsonl

IMPORTERS: dict[str, Callable[..., ImportResult]] = {
    "vllm-jsonl": import_vllm_jsonl,
    "gate-csv": import_gate_csv,
    "popularity-json": import_popularity_json,
    "hf-router-logits": import_hf_router_logits,
    "sglang-dump": import_sglang_dump,
}
FORMATS = tuple(IMPORTERS)


def import_trace(fmt: str, sources: Sequence[str | os.PathLike], output: str | os.PathLike,
                 command: str | None = None, **options: Any) -> ImportResult:
    """Import ``sources`` of format ``fmt`` and write the trace to ``output`` atomically.

    ``options`` are the keyword arguments of the format's ``import_<format>`` function;
    ``command`` (the command line) is added to the provenance.
    """
    from moe_gps.errors import UserError
    from moe_gps.trace.writer import write_trace

    if fmt not in IMPORTERS:
        raise UserError(f"unknown import format {fmt!r} (one of {', '.join(FORMATS)})")
    result = IMPORTERS[fmt](sources, **options)
    if command is not None:
        result.trace.meta.provenance["command"] = command
    write_trace(output, result.trace)
    return result


__all__ = ["FORMATS", "IMPORTERS", "ImportResult", "import_gate_csv", "import_hf_router_logits",
           "import_popularity_json", "import_sglang_dump", "import_trace", "import_vllm_jsonl",
           "routing_from_router_logits"]
