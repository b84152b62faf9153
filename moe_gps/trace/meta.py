"""Trace metadata and column names: the written contract of the trace format.

A trace is a Parquet file whose key-value metadata entry ``moe_gps`` holds the JSON of
:class:`TraceMeta`. Two kinds exist:

* ``tokens``: one row per (step, token, layer) with the chosen experts, highest gate
  weight first;
* ``counts``: one row per (step, layer, expert) with the number of (token, expert)
  assignments.

See ``docs/trace-format.md`` for the full specification.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from moe_gps.errors import UserError

SCHEMA_VERSION = 1
META_KEY = b"moe_gps"
KINDS = ("tokens", "counts")
SOURCES = ("collected", "imported", "synthetic")

# tokens kind: required key columns and optional per-token columns, with their types
# (numpy dtype names; the Parquet types follow from them).
TOKENS_KEY_COLUMNS = {"step": "int32", "token": "int32", "layer": "int16"}
TOKENS_OPTIONAL_COLUMNS = {"rank": "int16", "seq": "int32", "pos": "int32", "token_id": "int32"}
COUNTS_COLUMNS = {"step": "int32", "layer": "int16", "expert": "int16", "count": "int64"}


def expert_columns(top_k: int) -> list[str]:
    """``["expert_0", ..., "expert_{k-1}"]``."""
    return [f"expert_{j}" for j in range(top_k)]


def weight_columns(top_k: int) -> list[str]:
    """``["weight_0", ..., "weight_{k-1}"]``."""
    return [f"weight_{j}" for j in range(top_k)]


@dataclass
class TraceMeta:
    """What a trace describes. Stored as JSON under the Parquet metadata key ``moe_gps``.

    ``tokens_per_step`` is optional and only meaningful for counts traces (a tokens
    trace knows its tokens); when present, every layer of step ``s`` must sum to
    ``top_k * tokens_per_step[s]``.
    """

    kind: str
    num_layers: int
    num_experts: int
    top_k: int
    model: str = "unknown"
    dataset: str = "unknown"
    source: str = "synthetic"
    provenance: dict[str, Any] = field(default_factory=dict)
    tokens_per_step: list[int] | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        self.check()

    def check(self, where: str = "trace metadata") -> None:
        """Raise :class:`UserError` if a field is out of range."""
        if self.kind not in KINDS:
            raise UserError(f"{where}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.source not in SOURCES:
            raise UserError(f"{where}: source {self.source!r} is not one of {', '.join(SOURCES)}")
        for name in ("num_layers", "num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{where}: {name} must be a positive integer, got {value!r}")
        if self.num_experts > 32767:
            raise UserError(f"{where}: num_experts={self.num_experts} does not fit int16 expert ids")
        if self.top_k > self.num_experts:
            raise UserError(f"{where}: top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.schema_version != SCHEMA_VERSION:
            raise UserError(
                f"{where}: schema_version {self.schema_version!r} is not supported "
                f"(this moe-gps reads version {SCHEMA_VERSION})"
            )

    def to_json(self) -> str:
        data = asdict(self)
        if data["tokens_per_step"] is None:
            del data["tokens_per_step"]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> "TraceMeta":
        """Parse metadata JSON; ``where`` (the file name) prefixes error messages."""
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{where}: metadata entry 'moe_gps' is not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise UserError(f"{where}: metadata entry 'moe_gps' must be a JSON object")
        required = ("schema_version", "kind", "num_layers", "num_experts", "top_k",
                    "model", "dataset", "source", "provenance")
        missing = [k for k in required if k not in data]
        if missing:
            raise UserError(f"{where}: metadata entry 'moe_gps' lacks {', '.join(missing)}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{where}: metadata entry 'moe_gps' has unknown field(s) {', '.join(unknown)}")
        try:
            meta = cls(**data)
        except UserError as err:
            raise UserError(str(err).replace("trace metadata", where, 1)) from None
        return meta
