"""Export a placement to the expert-location files of SGLang and vLLM.

All of them carry only the physical-to-logical map (which logical expert each
physical slot holds); the servers split an expert's tokens over its replicas
themselves, evenly or by their own dispatch rule. A plan with uneven shares
therefore loses its shares on export: :func:`even_share_balancedness` says what
balance the exported layout gets with an even split. What each format is, and where
it comes from, is documented in docs/placement.md ("Exporting to SGLang and vLLM").

* ``sglang``: JSON ``{"physical_to_logical_map": [[...], ...]}``, one row per decoder
  layer of the model (``config.num_hidden_layers``), each row ``num_gpus *
  slots_per_gpu`` long. Given to ``--init-expert-location FILE.json`` together with
  ``--ep-num-redundant-experts`` (= our ``num_redundant``) and an EP size equal to our
  ``num_gpus``. Rows of layers without experts (e.g. DeepSeek-V3's first 3 dense
  layers) get the trivial map ``slot % experts``. SGLang passes the JSON keys as
  arguments, so the file holds exactly that one key.
* ``vllm``: a JSON list of rows ``[moe_layer][physical_slot]`` -- the layout of vLLM's
  ``EplbState.physical_to_logical_map`` (MoE layers only), as accepted by the proposed
  ``eplb_config.initial_expert_map_path`` (vLLM pull request #49572, not in a vLLM
  release at the time of writing).
* ``vllm-ascend``: the ``expert_map_path`` file of the vLLM Ascend plugin:
  ``{"moe_layer_count": L, "layer_list": [{"layer_id": l, "device_count": N,
  "device_list": [{"device_id": g, "device_expert": [logical experts of GPU g in slot
  order]}]}]}``, MoE layers only.
"""

from __future__ import annotations

import json
import os
import numpy as np

from moe_gps.atomic import write_text_atomic
from moe_gps.errors import UserError
from moe_gps.placement.placement import Placement, balancedness

EXPORT_FORMATS = ("sglang", "vllm", "vllm-ascend")


def _rows_text(rows: list[list[int]], indent: str) -> str:
    return ",\n".join(indent + json.dumps(r) for r in rows)


def sglang_expert_location(p: Placement, num_hidden_layers: int | None = None, first_moe_layer: int = 0) -> str:
    """SGLang ``--init-expert-location`` JSON text (see the module docstring)."""
    total = p.num_layers + first_moe_layer if num_hidden_layers is None else int(num_hidden_layers)
    if first_moe_layer < 0:
        raise UserError(f"sglang export: first MoE layer must be >= 0, got {first_moe_layer}")
    if first_moe_layer + p.num_layers > total:
        raise UserError(f"sglang export: {p.num_layers} MoE layers from layer {first_moe_layer} do not fit in "
                        f"{total} hidden layers")
    trivial = (np.arange(p.num_slots) % p.num_experts).tolist()
    rows = [trivial] * total
    rows[first_moe_layer:first_moe_layer + p.num_layers] = p.phy2log.tolist()
    return '{"physical_to_logical_map": [\n' + _rows_text(rows, "  ") + "\n]}\n"


def vllm_expert_map(p: Placement) -> str:
    """JSON list [moe_layer][physical_slot] (vLLM's physical_to_logical_map layout)."""
    return "[\n" + _rows_text(p.phy2log.tolist(), "  ") + "\n]\n"


def vllm_ascend_expert_map(p: Placement) -> str:
    """vLLM Ascend ``expert_map_path`` JSON text (one device per line)."""
    S = p.slots_per_gpu
    layers = []
    for l in range(p.num_layers):
        devices = ",\n".join(
            "      " + json.dumps({"device_id": g, "device_expert": p.phy2log[l, g * S:(g + 1) * S].tolist()})
            for g in range(p.num_gpus))
        layers.append(f'    {{"layer_id": {l}, "device_count": {p.num_gpus}, "device_list": [\n{devices}\n    ]}}')
    return (f'{{"moe_layer_count": {p.num_layers}, "layer_list": [\n' + ",\n".join(layers) + "\n]}\n")


def export_text(p: Placement, fmt: str, num_hidden_layers: int | None = None, first_moe_layer: int = 0) -> str:
    """The text of ``p`` in format ``fmt`` (one of :data:`EXPORT_FORMATS`); UserError if it cannot be made."""
    if fmt == "sglang":
        return sglang_expert_location(p, num_hidden_layers, first_moe_layer)
    if fmt == "vllm":
        return vllm_expert_map(p)
    if fmt == "vllm-ascend":
        return vllm_ascend_expert_map(p)
    raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")


def export_placement(p: Placement, fmt: str, path: str | os.PathLike, num_hidden_layers: int | None = None,
                     first_moe_layer: int = 0) -> None:
    """Write ``p`` in format ``fmt`` (one of :data:`EXPORT_FORMATS`) to ``path``, atomically."""
    write_text_atomic(path, export_text(p, fmt, num_hidden_layers, first_moe_layer))


def even_share_balancedness(p: Placement, loads: np.ndarray) -> np.ndarray:
    """Balancedness per layer [L] of ``p``'s layout if the server splits tokens evenly over replicas."""
    even = Placement(p.phy2log, p.num_gpus, p.num_experts, None, allow_colocated=True)
    return balancedness(even.gpu_loads(loads))
