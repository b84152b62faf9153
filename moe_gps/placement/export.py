"""Export a placement to the expert-location files of SGLang and vLLM.

All of them carry only the physical-to-logical map (which logical expert each
physical slot holds); the servers split an expert's tokens over its replicas
themselves, evenly (vLLM) or by their own dispatch rule (SGLang: a rank's own replica
first). A plan with uneven shares therefore loses its shares on export:
:func:`even_share_balancedness` and :func:`sglang_static_balancedness` say what balance the
exported layout gets there. What each format is, and where
it comes from, is documented in docs/placement.md ("Exporting to SGLang and vLLM").

* ``sglang``: JSON ``{"physical_to_logical_map": [[...], ...]}``, one row per decoder
  layer of the model (``config.num_hidden_layers``), each row ``num_gpus *
  slots_per_gpu`` long. Given to ``--init-expert-location FILE.json`` together with
  ``--ep-num-redundant-experts`` (= our ``num_redundant``) and ``--ep-size`` equal to our
  ``num_gpus``. Which row each MoE layer of the plan goes to is a
  :class:`~moe_gps.trace.layer_ids.DecoderLayers` (from the trace's provenance or the
  user's flags); rows of layers without experts (e.g. DeepSeek-V3's first 3 dense
  layers) get the trivial map ``slot % experts``. SGLang passes the JSON keys as
  arguments, so the file holds exactly that one key.
* ``sglang-logical-count``: JSON ``{"logical_count": [[...], ...]}``, the loads the plan
  was made from, ``[num_hidden_layers, experts]`` (0 on dense layers); SGLang runs its
  own EPLB on it at start-up (same ``--init-expert-location`` flag).
* ``vllm``: a JSON list of rows ``[moe_layer][physical_slot]`` -- the layout of vLLM's
  ``EplbState.physical_to_logical_map`` (MoE layers only), as accepted by the proposed
  ``eplb_config.initial_expert_map_path`` (vLLM pull request #49572, not in a vLLM
  release at the time of writing).
* ``vllm-ascend``: the ``eplb_config.expert_map_path`` file of the vLLM Ascend plugin (a
  top-level ``expert_map_path`` before its v0.14); no device may hold an expert twice:
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
from moe_gps.placement.placement import Placement, balancedness, first_copies
from moe_gps.trace.layer_ids import DecoderLayers

EXPORT_FORMATS = ("sglang", "vllm", "vllm-ascend")
# The pull request whose proposed vLLM option reads the ``vllm`` export.
VLLM_MAP_PR = "vLLM pull request #49572 (eplb_config.initial_expert_map_path, not in a vLLM release yet)"


def _rows_text(rows: list[list[int]], indent: str) -> str:
    return ",\n".join(indent + json.dumps(r) for r in rows)


def _decoder_rows(layers: DecoderLayers | None, num_moe_layers: int, what: str) -> DecoderLayers:
    if layers is None:
        raise UserError(f"{what}: SGLang needs one row per decoder layer; say which decoder layers the "
                        f"{num_moe_layers} MoE layers are (moe_gps.trace.layer_ids.decoder_layers)")
    if len(layers.ids) != num_moe_layers:
        raise UserError(f"{what}: {len(layers.ids)} decoder layer ids for {num_moe_layers} MoE layers")
    return layers


def sglang_expert_location(p: Placement, layers: DecoderLayers | None) -> str:
    """SGLang ``--init-expert-location`` JSON text (see the module docstring)."""
    layers = _decoder_rows(layers, p.num_layers, "sglang export")
    trivial = (np.arange(p.num_slots) % p.num_experts).tolist()
    rows = [trivial] * layers.total
    for row, layer in zip(p.phy2log.tolist(), layers.ids):
        rows[layer] = row
    return '{"physical_to_logical_map": [\n' + _rows_text(rows, "  ") + "\n]}\n"


def sglang_logical_count(loads: np.ndarray, layers: DecoderLayers | None) -> str:
    """SGLang ``--init-expert-location`` JSON text holding ``logical_count`` (SGLang runs its EPLB on it).

    loads: [moe layers, experts] tokens per expert, whole numbers (counts summed over steps).
    """
    loads = np.asarray(loads)
    layers = _decoder_rows(layers, loads.shape[0], "sglang logical-count export")
    counts = np.rint(loads).astype(np.int64)
    rows = [[0] * loads.shape[1]] * layers.total
    for row, layer in zip(counts.tolist(), layers.ids):
        rows[layer] = row
    return '{"logical_count": [\n' + _rows_text(rows, "  ") + "\n]}\n"


def vllm_expert_map(p: Placement) -> str:
    """JSON list [moe_layer][physical_slot] (vLLM's physical_to_logical_map layout)."""
    return "[\n" + _rows_text(p.phy2log.tolist(), "  ") + "\n]\n"


def vllm_ascend_expert_map(p: Placement) -> str:
    """vLLM Ascend ``expert_map_path`` JSON text (one device per line). UserError where a device holds one
    expert twice: vLLM Ascend maps each expert of a device to one slot, and numbers the other devices'
    slots by the count of distinct experts, so such a map would send tokens to the wrong experts."""
    S = p.slots_per_gpu
    blocks = p.phy2log.reshape(p.num_layers, p.num_gpus, S)
    twice = np.argwhere(~np.stack(first_copies(blocks), axis=-1))              # [l, g, slot] of a second copy
    if len(twice):
        l, g, i = (int(x) for x in twice[0])
        raise UserError(f"--vllm-ascend: layer {l}, device {g} holds expert {int(blocks[l, g, i])} twice, which vLLM "
                        f"Ascend's expert map cannot express; plan with --algorithm waterfill or greedy, which "
                        f"never put two replicas of an expert on one GPU")
    layers = []
    for l in range(p.num_layers):
        devices = ",\n".join(
            "      " + json.dumps({"device_id": g, "device_expert": p.phy2log[l, g * S:(g + 1) * S].tolist()})
            for g in range(p.num_gpus))
        layers.append(f'    {{"layer_id": {l}, "device_count": {p.num_gpus}, "device_list": [\n{devices}\n    ]}}')
    return (f'{{"moe_layer_count": {p.num_layers}, "layer_list": [\n' + ",\n".join(layers) + "\n]}\n")


def export_text(p: Placement, fmt: str, layers: DecoderLayers | None = None) -> str:
    """The text of ``p`` in format ``fmt`` (one of :data:`EXPORT_FORMATS`); UserError if it cannot be made.

    ``layers`` (the decoder layer of each MoE layer) is needed by ``sglang`` only.
    """
    if fmt == "sglang":
        return sglang_expert_location(p, layers)
    if fmt == "vllm":
        return vllm_expert_map(p)
    if fmt == "vllm-ascend":
        return vllm_ascend_expert_map(p)
    raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")


def export_placement(p: Placement, fmt: str, path: str | os.PathLike, layers: DecoderLayers | None = None) -> None:
    """Write ``p`` in format ``fmt`` (one of :data:`EXPORT_FORMATS`) to ``path``, atomically."""
    write_text_atomic(path, export_text(p, fmt, layers))


def even_share_balancedness(p: Placement, loads: np.ndarray) -> np.ndarray:
    """Balancedness per layer [L] of ``p``'s layout if the server splits tokens evenly over replicas."""
    even = Placement(p.phy2log, p.num_gpus, p.num_experts, None, allow_colocated=True)
    return balancedness(even.gpu_loads(loads))


def sglang_static_balancedness(p: Placement, loads: np.ndarray) -> np.ndarray:
    """Balancedness per layer [L] of ``p``'s layout under SGLang's static dispatch, which an
    ``--init-expert-location`` file turns on: each rank sends all its tokens of an expert to one replica,
    its own when it holds one, else one that SGLang picks so that the ranks without a replica spread
    over the replicas as evenly as their number allows (at random; here in rank and slot order). Tokens
    start evenly over the ranks, c_e / G of expert e on each.  loads: float [L, E] -> float [L]
    """
    L, G, E = p.num_layers, p.num_gpus, p.num_experts
    c = np.asarray(loads, dtype=np.float64) / G
    gpu = np.zeros((L, G))
    slot_gpu = p.gpu_of_slot
    for layer in range(L):
        for e in range(E):
            on = slot_gpu[p.phy2log[layer] == e]             # the GPU of each replica, in slot order
            holders = np.unique(on)
            others = np.setdiff1d(np.arange(G), holders)
            gpu[layer, holders] += c[layer, e]
            np.add.at(gpu[layer], on[np.arange(len(others)) % len(on)], c[layer, e])
    return balancedness(gpu)


def server_flags(p: Placement, fmt: str, path: str) -> str:
    """The server flags that go with an export of ``p`` written to ``path`` (one line).

    ``fmt``: ``sglang`` or ``sglang-logical-count`` (both are ``--init-expert-location``
    files), ``vllm`` (the format of :data:`VLLM_MAP_PR`) or ``vllm-ascend``.
    """
    import shlex

    if fmt in ("sglang", "sglang-logical-count"):
        return (f"--ep-size {p.num_gpus} --ep-num-redundant-experts {p.num_redundant} "
                f"--init-expert-location {shlex.quote(path)}")
    if fmt == "vllm":
        cfg = json.dumps({"num_redundant_experts": p.num_redundant, "initial_expert_map_path": path})
        return f"--enable-expert-parallel --enable-eplb --eplb-config {shlex.quote(cfg)}"
    if fmt == "vllm-ascend":
        cfg = {"eplb_config": {"expert_map_path": path, "num_redundant_experts": p.num_redundant}}
        return f"--enable-expert-parallel --additional-config {shlex.quote(json.dumps(cfg))}"
    raise UserError(f"unknown export format {fmt!r}")
