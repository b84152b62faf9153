"""Which decoder layers of the model a trace's MoE layers are.

A trace numbers its MoE layers 0..L-1. Servers number *decoder* layers: SGLang's
expert-location files have one row per decoder layer (``num_hidden_layers``, dense
layers included), so a file made from a trace must put row ``l`` of the trace on the
right decoder layer. The trace's provenance says so when the source did:

* ``original_layer_ids`` (list of L ints): the decoder layer of each MoE layer, written
  by the importers that see all decoder layers (``sglang-dump``, ``vllm-routed`` and
  ``sglang-routed`` when dense layers show as empty, ``gate-csv`` from the file names);
* ``moe_layers`` (list of L module names such as ``model.layers.3.mlp``), written by
  ``runtime.record_hf``;
* ``num_hidden_layers`` (int): the model's decoder layers; older ``sglang-dump`` traces
  instead list the empty layers they dropped (``dropped_zero_layers``).

:func:`decoder_layers` combines that with what the user passes and refuses, with one
line naming the flag, whenever it cannot be sure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from moe_gps.errors import UserError
from moe_gps.tables import format_indices

_LAYER_NAME = re.compile(r"(?:^|\.)layers?\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class DecoderLayers:
    """ids: decoder layer of each MoE layer of the trace, ascending; total: num_hidden_layers;
    source: where they came from, for the terminal."""

    ids: list[int]
    total: int
    source: str


def _ids_from_provenance(prov: dict[str, Any], num_layers: int) -> tuple[list[int] | None, str]:
    ids = prov.get("original_layer_ids")
    if isinstance(ids, list) and len(ids) == num_layers and all(isinstance(i, int) for i in ids):
        return [int(i) for i in ids], "original_layer_ids in the trace's provenance"
    names = prov.get("moe_layers")
    if isinstance(names, list) and len(names) == num_layers:
        found = [_LAYER_NAME.search(str(n)) for n in names]
        if all(found):
            return [int(m.group(1)) for m in found], "moe_layers (module names) in the trace's provenance"
    return None, ""


def _total_from_provenance(prov: dict[str, Any], ids: list[int] | None) -> int | None:
    total = prov.get("num_hidden_layers")
    if isinstance(total, int) and not isinstance(total, bool):
        return total
    dropped = prov.get("dropped_zero_layers")
    if ids is not None and isinstance(dropped, list) and "original_layer_ids" in prov:
        return len(ids) + len(dropped)      # sglang-dump: every recorded layer is kept or dropped
    return None


def decoder_layers(num_layers: int, provenance: dict[str, Any] | None, num_hidden_layers: int | None = None,
                   first_moe_layer: int | None = None) -> DecoderLayers:
    """The decoder layers of a trace's ``num_layers`` MoE layers (see the module docstring).

    ``num_hidden_layers`` / ``first_moe_layer`` are the user's flags (None when not given);
    they must agree with the provenance where both say something.
    """
    prov = provenance or {}
    known_ids, where = _ids_from_provenance(prov, num_layers)
    known_total = _total_from_provenance(prov, known_ids)
    if num_hidden_layers is not None and num_hidden_layers < 1:
        raise UserError(f"--num-hidden-layers must be >= 1, got {num_hidden_layers}")
    if first_moe_layer is not None and first_moe_layer < 0:
        raise UserError(f"--first-moe-layer must be >= 0, got {first_moe_layer}")
    ids, source = known_ids, where
    if first_moe_layer is not None:
        flag_ids = list(range(first_moe_layer, first_moe_layer + num_layers))
        if known_ids is not None and known_ids != flag_ids:
            raise UserError(f"--first-moe-layer {first_moe_layer} puts the trace's {num_layers} MoE layers on "
                            f"decoder layers {format_indices(flag_ids)}, but the trace says {format_indices(known_ids)} ({where})")
        ids, source = flag_ids, "--first-moe-layer"
    total = known_total
    if num_hidden_layers is not None:
        if known_total is not None and known_total != num_hidden_layers:
            raise UserError(f"--num-hidden-layers {num_hidden_layers} differs from the trace's provenance, which "
                            f"says the model has {known_total} decoder layers")
        total = num_hidden_layers
    if total is not None and total < num_layers:
        raise UserError(f"the trace's {num_layers} MoE layers do not fit in {total} decoder layers "
                        "(--num-hidden-layers is the model's num_hidden_layers, dense layers included)")
    if ids is None:
        if total == num_layers:
            ids, source = list(range(num_layers)), "every decoder layer is an MoE layer"
        elif total is None:
            raise UserError(f"cannot tell which decoder layers the trace's {num_layers} MoE layers are (its "
                            "provenance does not say): pass --num-hidden-layers (the model's num_hidden_layers) "
                            "and, if the model has dense layers, --first-moe-layer")
        else:
            raise UserError(f"the model has {total} decoder layers but the trace {num_layers} MoE layers, and "
                            "nothing says which ones: pass --first-moe-layer (e.g. 3 for DeepSeek-V3)")
    if total is None:
        raise UserError(f"the trace's MoE layers are decoder layers {format_indices(ids)} ({source}) but nothing says how "
                        "many decoder layers the model has: pass --num-hidden-layers (the model's "
                        "num_hidden_layers)")
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise UserError(f"the trace's MoE layer ids {ids} ({source}) are not increasing")
    if ids[-1] >= total:
        raise UserError(f"MoE layers {format_indices(ids)} ({source}) do not fit in {total} decoder layers")
    return DecoderLayers(ids, int(total), source)
