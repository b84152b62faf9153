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
from typing import Any, Callable

from moe_gps.errors import UserError
from moe_gps.files import beyond_parser

SCHEMA_VERSION = 1
META_KEY = b"moe_gps"
KINDS = ("tokens", "counts")
SOURCES = ("collected", "imported", "synthetic")

# tokens kind: required key columns and optional per-token columns, with their types
# (numpy dtype names; the Parquet types follow from them).
TOKENS_KEY_COLUMNS = {"step": "int32", "token": "int32", "layer": "int16"}
TOKENS_OPTIONAL_COLUMNS = {"rank": "int16", "seq": "int32", "pos": "int32", "token_id": "int32"}
COUNTS_COLUMNS = {"step": "int32", "layer": "int16", "expert": "int16", "count": "int64"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _list_of(item: Callable[[Any], bool], what: str) -> tuple:
    return (lambda v: isinstance(v, list) and all(item(x) for x in v)), what, item


#: what each metadata field must be: (test, words for the message[, test of a list's entries])
_INTEGER = (_is_int, "an integer")
_STRING = (lambda v: isinstance(v, str), "a string")
_TOKENS = _list_of(lambda x: _is_int(x) and x >= 0, "a list of non-negative integers")
FIELD_TYPES = {
    "schema_version": _INTEGER, "kind": _STRING, "num_layers": _INTEGER, "num_experts": _INTEGER,
    "top_k": _INTEGER, "model": _STRING, "dataset": _STRING, "source": _STRING,
    "provenance": (lambda v: isinstance(v, dict), "a JSON object"),
    "tokens_per_step": ((lambda v: v is None or _TOKENS[0](v)), "null or " + _TOKENS[1], _TOKENS[2]),
}
#: the provenance entries that MoE-GPS reads (:mod:`moe_gps.trace.layer_ids`), when present
PROVENANCE_TYPES = {
    "original_layer_ids": _list_of(_is_int, "a list of integers"),
    "num_hidden_layers": _INTEGER,
    "moe_layers": _list_of(lambda x: isinstance(x, str), "a list of strings"),
    "dropped_zero_layers": _list_of(_is_int, "a list of integers"),
}


def json_kind(value: Any) -> str:
    """The JSON type of a parsed value, with a short copy of it: ``a number (123)``."""
    if value is None:
        return "null"
    kind = ("a boolean" if isinstance(value, bool) else "a number" if isinstance(value, (int, float))
            else "a string" if isinstance(value, str) else "a list" if isinstance(value, list) else "a JSON object")
    text = json.dumps(value)
    return f"{kind} ({text if len(text) <= 60 else text[:57] + '...'})"


def _check_type(name: str, value: Any, rule: tuple, where: str) -> None:
    if rule[0](value):
        return
    got = json_kind(value)
    if len(rule) == 3 and isinstance(value, list):
        i, bad = next((i, x) for i, x in enumerate(value) if not rule[2](x))
        got = f"a list whose entry {i} is {json_kind(bad)}"
    raise UserError(f"{where}: metadata field '{name}' must be {rule[1]}, got {got}")


def check_field_types(data: dict[str, Any], where: str) -> None:
    """Raise :class:`UserError` naming the first field of parsed metadata JSON (or of the provenance
    entries MoE-GPS reads) whose JSON type is not the one the format gives it."""
    for name, rule in FIELD_TYPES.items():
        if name in data:
            _check_type(name, data[name], rule, where)
    for name, rule in PROVENANCE_TYPES.items():
        if name in data["provenance"]:
            _check_type(f"provenance.{name}", data["provenance"][name], rule, where)


def expert_columns(top_k: int) -> list[str]:
    """``["expert_0", ..., "expert_{k-1}"]``."""
    return [f"expert_{j}" for j in range(top_k)]


def weight_columns(top_k: int) -> list[str]:
    """``["weight_0", ..., "weight_{k-1}"]``."""
    return [f"weight_{j}" for j in range(top_k)]


#: import formats whose steps each sum a whole run (:meth:`TraceMeta.aggregate_steps_warning`)
AGGREGATE_FORMATS = ("popularity-json",)


@dataclass
class TraceMeta:
    """What a trace describes. Stored as JSON under the Parquet metadata key ``moe_gps``.

    ``tokens_per_step`` is optional and for counts traces only (a tokens trace knows its
    tokens, and one that has it is refused); when present, every layer of step ``s`` must
    sum to ``top_k * tokens_per_step[s]``.
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
        for name in ("num_layers", "num_experts"):
            if getattr(self, name) > 32767:
                raise UserError(f"{where}: {name}={getattr(self, name)} does not fit the int16 "
                                f"{'layer' if name == 'num_layers' else 'expert'} ids of the trace format")
        if self.top_k > self.num_experts:
            raise UserError(f"{where}: top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.kind == "tokens" and self.tokens_per_step is not None:
            raise UserError(f"{where}: metadata field 'tokens_per_step' is for counts traces only (a tokens trace's "
                            "rows give the tokens of each step)")
        if self.schema_version != SCHEMA_VERSION:
            raise UserError(
                f"{where}: schema_version {self.schema_version!r} is not supported "
                f"(this moe-gps reads version {SCHEMA_VERSION})"
            )

    def aggregate_steps_warning(self) -> str | None:
        """A warning when every step sums a whole run's forward passes (a popularity file's counts, one step per
        file), not one batch the GPUs served; else None."""
        fmt = (self.provenance or {}).get("format")
        if fmt not in AGGREGATE_FORMATS:
            return None
        return (f"each step of this trace sums a whole run's forward passes ({fmt}, one step per file), not one "
                "batch: re-plan cadences, copies and the interval count these runs as steps; it shows the experts' "
                "popularity and skew (moe-gps trace inspect), and which strategy to deploy needs a trace of "
                "batches")

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
        except (ValueError, RecursionError) as err:
            raise UserError(f"{where}: metadata entry 'moe_gps' is {beyond_parser(err, 'JSON')}") from None
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
        check_field_types(data, where)
        try:
            meta = cls(**data)
        except UserError as err:
            raise UserError(str(err).replace("trace metadata", where, 1)) from None
        return meta
