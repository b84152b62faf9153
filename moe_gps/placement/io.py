"""Placement files: YAML with the plan's metadata, one flow list per layer.

```yaml
moe_gps_placement: 1          # schema version
algorithm: eplb
num_layers: 2
num_experts: 12
num_gpus: 8
slots_per_gpu: 2
num_redundant: 4
allow_colocated: false
shares: even                  # or: uneven (then replica_share is given)
capacity: {max_slots_per_gpu: null, expert_bytes: null, max_expert_bytes_per_gpu: null}
meta: {...}                   # free-form: options, source trace, steps, predicted metrics
phy2log:                      # [layers, slots], slot = gpu * slots_per_gpu + i
- [5, 6, 5, 7, ...]
replica_share: null           # or [layers, slots] of floats
```

Files are written through :func:`moe_gps.atomic.atomic_path`; arrays are written as
JSON-style flow lists (valid YAML) because PyYAML's emitter is slow on large lists.
"""

from __future__ import annotations

import json
import os

import numpy as np
import yaml

from moe_gps.atomic import atomic_path
from moe_gps.errors import UserError
from moe_gps.files import read_yaml
from moe_gps.placement.placement import SCHEMA_VERSION, Capacity, Placement

_SCALARS = ("moe_gps_placement", "algorithm", "num_layers", "num_experts", "num_gpus", "slots_per_gpu",
            "num_redundant", "allow_colocated", "shares")


def placement_yaml(p: Placement) -> str:
    d = p.to_dict()
    head = {k: d[k] for k in _SCALARS}
    lines = ["# MoE-GPS expert placement. slot = gpu * slots_per_gpu + i; see docs/placement.md",
             yaml.safe_dump(head, sort_keys=False).rstrip(),
             yaml.safe_dump({"capacity": d["capacity"]}, sort_keys=False, default_flow_style=None).rstrip(),
             yaml.safe_dump({"meta": d["meta"]}, sort_keys=False, default_flow_style=None, width=100).rstrip(),
             "phy2log:"]
    lines += ["- " + json.dumps(row) for row in d["phy2log"]]
    if d["replica_share"] is None:
        lines.append("replica_share: null")
    else:
        lines.append("replica_share:")
        lines += ["- " + json.dumps(row) for row in d["replica_share"]]
    return "\n".join(lines) + "\n"


def save_placement(p: Placement, path: str | os.PathLike) -> None:
    """Write the plan as YAML (atomically: temporary name, then rename)."""
    text = placement_yaml(p)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def load_placement(path: str | os.PathLike) -> Placement:
    """Read and validate a plan written by :func:`save_placement`; UserError naming the file on any problem."""
    where = str(path)
    doc = read_yaml(path, what="a placement file")
    if not isinstance(doc, dict) or "moe_gps_placement" not in doc:
        raise UserError(f"{where}: not a MoE-GPS placement (no 'moe_gps_placement' key); "
                        "write one with `moe-gps plan`")
    if doc["moe_gps_placement"] != SCHEMA_VERSION:
        raise UserError(f"{where}: placement schema version {doc['moe_gps_placement']!r} is not supported "
                        f"(this moe-gps reads version {SCHEMA_VERSION})")
    for key in ("num_experts", "num_gpus", "phy2log"):
        if key not in doc:
            raise UserError(f"{where}: missing key '{key}'")
    for key in ("num_experts", "num_gpus", "num_layers", "slots_per_gpu", "num_redundant"):
        if key in doc and (isinstance(doc[key], bool) or not isinstance(doc[key], int)):
            raise UserError(f"{where}: {key} must be an integer, got {doc[key]!r}")
    if not isinstance(doc.get("allow_colocated", False), bool):
        raise UserError(f"{where}: allow_colocated must be true or false, got {doc['allow_colocated']!r}")
    try:
        phy2log = np.asarray(doc["phy2log"])
        share = doc.get("replica_share")
        share = None if share is None else np.asarray(share, dtype=np.float64)
    except (ValueError, TypeError) as err:
        raise UserError(f"{where}: phy2log/replica_share are not rectangular numeric arrays ({err})") from None
    cap = doc.get("capacity") or {}
    try:
        capacity = Capacity(**{k: cap.get(k) for k in ("max_slots_per_gpu", "expert_bytes",
                                                        "max_expert_bytes_per_gpu")})
        p = Placement(phy2log, int(doc["num_gpus"]), int(doc["num_experts"]), share,
                      algorithm=str(doc.get("algorithm", "custom")),
                      allow_colocated=bool(doc.get("allow_colocated", False)),
                      capacity=capacity, meta=doc.get("meta") or {})
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    for key in ("num_layers", "slots_per_gpu"):
        if key in doc and int(doc[key]) != getattr(p, key):
            raise UserError(f"{where}: {key} says {doc[key]} but phy2log gives {getattr(p, key)}")
    if "shares" in doc and doc["shares"] != ("even" if p.shares_are_even else "uneven"):
        raise UserError(f"{where}: shares says {doc['shares']!r} but replica_share gives "
                        f"{'even' if p.shares_are_even else 'uneven'} shares")
    return p
