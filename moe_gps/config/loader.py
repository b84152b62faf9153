"""YAML -> validated config dataclasses, presets, and the checks that span several configs.

Every problem is one :class:`~moe_gps.errors.UserError` line naming the file and the key,
e.g. ``my-cluster.yaml: gpu.peak_tflops_bf16: must be a number > 0, got -3``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from moe_gps.config.schema import (
    ClusterConfig, ModelConfig, SimulateConfig, StrategyConfig, WorkloadConfig,
)
from moe_gps.errors import UserError
from moe_gps.files import parse_yaml, read_yaml

T = TypeVar("T")
PRESET_KINDS = ("clusters", "models", "workloads")
#: the range of a non-zero physical quantity in its unit (bandwidths, FLOP rates, capacities,
#: latencies, efficiencies, bytes per value)
SANE_RANGE = (1e-6, 1e12)


# ---------------------------------------------------------------------------- generic builder

def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def shown(value: Any) -> str:
    """``repr(value)`` cut short (a few levels, items and characters), for an error message: a config value can
    be nested deeper than ``repr`` goes, or long."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 3, 8, 8, 80, 80
    return r.repr(value)


def _convert(value: Any, tp: Any, where: str, key: str, meta: dict | None) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], where, key, meta)
    if value is None:
        raise UserError(f"{where}: {key}: must be {_describe(tp)}, got nothing (null)")
    if is_dataclass(tp):
        return build(tp, value, where, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"{where}: {key}: must be a list, got {shown(value)}")
        return [_convert(v, item, where, f"{key}[{i}]", None) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise UserError(f"{where}: {key}: must be a mapping of names to values, got {shown(value)}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: {key}: must be true or false, got {shown(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: {key}: must be an integer, got {shown(value)}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: {key}: must be a number, got {shown(value)}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise UserError(f"{where}: {key}: must be a finite number, got {shown(value)}")
    elif tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: {key}: must be a string, got {shown(value)}")
    if meta:
        _check_range(value, meta, where, key)
    return value


def _describe(tp: Any) -> str:
    if is_dataclass(tp):
        return "a mapping"
    if typing.get_origin(tp) is list:
        return "a list"
    return _type_name(tp)


def _check_range(value: Any, meta: dict, where: str, key: str) -> None:
    choices = meta.get("choices")
    if choices and value not in choices:
        raise UserError(f"{where}: {key}: must be one of {', '.join(map(str, choices))}, got {value!r}")
    what = "an integer" if isinstance(value, int) else "a number"
    for bound, op, ok in (("gt", ">", lambda v, b: v > b), ("ge", ">=", lambda v, b: v >= b),
                          ("le", "<=", lambda v, b: v <= b)):
        b = meta.get(bound)
        if b is not None and not ok(value, b):
            raise UserError(f"{where}: {key}: must be {what} {op} {b:g}, got {value!r}")
    physical = isinstance(value, float) and (meta.get("unit") or meta.get("gt") is not None
                                             or meta.get("ge") is not None)
    if physical and not (value == 0 or SANE_RANGE[0] <= value <= SANE_RANGE[1]):
        unit = f" {meta['unit'].split(' (')[0]}" if meta.get("unit") else ""
        raise UserError(f"{where}: {key}: {value!r}{unit} is not a sane value (a quantity like this must lie between "
                        f"{SANE_RANGE[0]:g} and {SANE_RANGE[1]:g}{unit}; beyond that the times computed from it "
                        "overflow or vanish)")


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build(cls: type[T], data: Any, where: str, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a YAML mapping, checking keys, types and ranges.

    ``where`` (a file name) and the key path start every error message.
    """
    label = prefix or "top level"
    if not isinstance(data, dict):
        raise UserError(f"{where}: {label}: must be a mapping of keys to values, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    for k in data:
        if k not in known:
            close = difflib.get_close_matches(str(k), list(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known keys: {', '.join(known)})"
            raise UserError(f"{where}: {_join(prefix, str(k))}: unknown key{hint}")
    hints = _hints(cls)
    kwargs = {}
    for name, f in known.items():
        key = _join(prefix, name)
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise UserError(f"{where}: {key}: missing (required: {f.metadata.get('doc', name)})")
            continue
        kwargs[name] = _convert(data[name], hints[name], where, key, dict(f.metadata))
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(f"{where}: {prefix}" if prefix else where)
    return obj


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def to_dict(obj: Any) -> Any:
    """A dataclass as plain YAML-ready data, leaving out fields that are None."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj) if getattr(obj, f.name) is not None}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None, width=100)


# ---------------------------------------------------------------------------- files and presets

def preset_names(kind: str) -> list[str]:
    """Names of the bundled presets of ``kind`` ("clusters", "models" or "workloads")."""
    folder = resources.files("moe_gps.config") / "presets" / kind
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _preset_text(kind: str, name: str) -> str:
    return (resources.files("moe_gps.config") / "presets" / kind / f"{name}.yaml").read_text(encoding="utf-8")


def _load(kind: str, cls: type[T], spec: str) -> T:
    singular = kind[:-1]
    if spec in preset_names(kind):
        where = f"{singular} preset {spec}"
        return build(cls, parse_yaml(_preset_text(kind, spec), where), where)
    p = Path(spec)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return build(cls, read_yaml(p), str(p))
    raise UserError(f"unknown {singular} preset '{spec}' (presets: {', '.join(preset_names(kind))}; "
                    f"or give a YAML file)")


def load_cluster(spec: str) -> ClusterConfig:
    """A cluster preset name (see :func:`preset_names`) or a YAML file."""
    return _load("clusters", ClusterConfig, spec)


def load_model(spec: str) -> ModelConfig:
    """A model preset name, a YAML file, or a Hugging Face ``config.json`` / checkpoint folder."""
    from moe_gps.config.hf import hf_model_dict, is_hf_config

    if spec not in preset_names("models") and is_hf_config(spec):
        data, where = hf_model_dict(spec)
        return build(ModelConfig, data, where)
    return _load("models", ModelConfig, spec)


def load_workload(path: str) -> WorkloadConfig:
    return build(WorkloadConfig, read_yaml(path), str(path))


def load_simulate_config(path: str) -> SimulateConfig:
    """A whole simulate config (as written to the output folder), fully checked."""
    return build(SimulateConfig, read_yaml(path), str(path))


def _norm(name: str) -> str:
    return name.lower().rsplit("/", 1)[-1].replace("_", "-").replace(".", "-")


def _models_of_shape(num_layers: int, num_experts: int, top_k: int) -> dict[str, ModelConfig]:
    """Preset name -> model, for the model presets with these MoE layers, experts and top-k."""
    models = {name: load_model(name) for name in preset_names("models")}
    shape = (num_layers, num_experts, top_k)
    return {name: m for name, m in models.items() if (m.num_layers, m.num_experts, m.top_k) == shape}


def infer_model(trace_model: str, num_layers: int, num_experts: int, top_k: int) -> ModelConfig | None:
    """The model preset named by a trace's metadata, if its name (or an alias) and shape match."""
    want = _norm(trace_model)
    return next((m for m in _models_of_shape(num_layers, num_experts, top_k).values()
                 if want in {_norm(m.name), *(_norm(a) for a in m.aliases)}), None)


def presets_of_shape(num_layers: int, num_experts: int, top_k: int) -> list[str]:
    """The model presets with these MoE layers, experts and top-k (whatever their names)."""
    return list(_models_of_shape(num_layers, num_experts, top_k))


def split_strategy_names(values: list[str]) -> list[str]:
    """Strategy names separated by spaces or commas; commas inside parentheses (options) stay.

    ``["none,eplb", "token:synthetic(accuracy=0.9,overhead=1e6)"]`` -> three names.
    Unbalanced parentheses are a UserError naming the piece.
    """
    out = []
    for v in values:
        depth, cur = 0, ""
        for ch in v + ",":
            depth += (ch == "(") - (ch == ")")
            if depth < 0:
                raise UserError(f"strategy {(cur + ch).strip()!r}: ')' without '('")
            if depth == 0 and ch in ", ":
                if cur:
                    out.append(cur)
                cur = ""
            else:
                cur += ch
        if depth:
            raise UserError(f"strategy {cur[:-1].strip()!r}: '(' without ')'")
    return out


def strategy_from_name(name: str) -> StrategyConfig:
    """``none``, ``eplb`` (static EPLB), ``static:<planner>``, ``dist:<predictor>``, ``token:<predictor>``,
    ``oracle`` -> a default :class:`StrategyConfig`. A predictor may carry options in parentheses,
    ``token:synthetic(accuracy=0.95,overhead=8e6)`` (values parsed as YAML scalars)."""
    where = f"strategy '{name}'"
    options: dict = {}
    base = name
    if name.endswith(")") and "(" in name:
        base, _, inner = name[:-1].partition("(")
        for item in filter(None, (x.strip() for x in inner.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise UserError(f"{where}: options must be key=value pairs separated by commas, got {item!r}")
            try:
                parsed = yaml.safe_load(value)
            except (yaml.YAMLError, ValueError, RecursionError):    # also numbers too long, nesting too deep
                raise UserError(f"{where}: cannot read the value of option {key.strip()!r}") from None
            if isinstance(parsed, str):      # YAML 1.1 reads 8.4e6 as a string
                try:
                    parsed = float(parsed)
                except ValueError:
                    pass
            if key.strip() in options:
                raise UserError(f"{where}: option {key.strip()!r} given twice")
            options[key.strip()] = parsed
    head, _, tail = base.partition(":")
    if options and head not in ("dist", "distribution", "token") and not (head == "eplb" and not tail):
        raise UserError(f"{where}: only dist:PREDICTOR, token:PREDICTOR and eplb (vLLM's --eplb-config keys) "
                        f"take options")
    if head == "none" and not tail:
        cfg = StrategyConfig(kind="none")
    elif head == "eplb" and not tail:
        cfg = StrategyConfig(kind="static", eplb_config=options or None)
    elif head == "static" and tail:
        cfg = StrategyConfig(kind="static", planner=tail)
    elif head in ("dist", "distribution") and tail:
        cfg = StrategyConfig(kind="distribution", predictor=tail, predictor_options=options)
    elif head == "token" and tail:
        cfg = StrategyConfig(kind="token", predictor=tail, predictor_options=options)
    elif head == "oracle" and not tail:
        cfg = StrategyConfig(kind="oracle")
    else:
        raise UserError(f"{where}: not a strategy name (use none, eplb, static:PLANNER, dist:PREDICTOR, "
                        f"token:PREDICTOR or oracle)")
    if options:
        cfg.name = name
    cfg.check(where)
    return cfg


# ---------------------------------------------------------------------------- cross-config checks

@dataclasses.dataclass
class MemoryUse:
    """HBM use of one GPU under one strategy, bytes."""

    expert_weights: float
    dense_weights: float
    kv_cache: float
    available: float

    @property
    def total(self) -> float:
        return self.expert_weights + self.dense_weights + self.kv_cache


def memory_use(cluster: ClusterConfig, model: ModelConfig, workload: WorkloadConfig,
               slots_per_gpu: int, tokens_per_step: float) -> MemoryUse:
    """Per-GPU memory (formulas in docs/configs.md, "Memory check")."""
    L = model.num_layers
    experts = slots_per_gpu * L * model.expert_bytes
    dense = L * (model.attention_params + model.shared_params) * model.dense_bytes
    tokens_per_gpu = tokens_per_step / cluster.num_gpus
    kv_tokens = tokens_per_gpu * (workload.seq_len if workload.phase == "decode" else 1)
    kv = kv_tokens * L * model.kv_bytes_per_token
    available = (cluster.gpu.hbm_capacity_gb - cluster.gpu.reserved_memory_gb) * 1e9
    return MemoryUse(experts, dense, kv, available)


def check_combination(cluster: ClusterConfig, model: ModelConfig, workload: WorkloadConfig,
                      strategies: list[StrategyConfig], tokens_per_step: float,
                      where: str = "config") -> None:
    """Reject combinations that cannot run: uneven slots, fewer slots than GPUs, memory overflow."""
    G, E = cluster.num_gpus, model.num_experts
    names = [s.resolved_name() for s in strategies]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"{where}: strategies: names must be unique, '{dup[0]}' appears twice (set name:)")
    for i, s in enumerate(strategies):
        key = f"{where}: strategies[{i}] ({names[i]})"
        R = s.resolved_redundant(G, E)
        if s.kind == "none" and R != (-E) % G:
            raise UserError(f"{key}: redundant_slots: kind none duplicates nothing; it may only hold the "
                            f"{(-E) % G} spare slot(s) that make {E} experts divide over {G} GPUs, got {R}")
        slots = E + R
        if slots < G:
            raise UserError(f"{key}: redundant_slots: {slots} slots for {G} GPUs; every GPU needs at least "
                            f"one expert slot (add {G - slots} redundant slots or use fewer GPUs)")
        if slots % G:
            spare = (-E) % G
            raise UserError(f"{key}: redundant_slots: num_experts ({E}) + redundant_slots ({R}) = {slots} "
                            f"slots do not divide evenly over {G} GPUs (use {spare} plus a multiple of {G}, "
                            f"e.g. {R + (-slots) % G})")
        mem = memory_use(cluster, model, workload, slots // G, tokens_per_step)
        if mem.total > mem.available:
            gb = 1e9
            raise UserError(
                f"{key}: model {model.name} does not fit cluster {cluster.name}: per GPU "
                f"{slots // G} expert slots x {model.num_layers} layers x {model.expert_bytes / gb:.3g} GB = "
                f"{mem.expert_weights / gb:.1f} GB of experts + {mem.dense_weights / gb:.1f} GB attention/shared "
                f"+ {mem.kv_cache / gb:.1f} GB KV cache = {mem.total / gb:.1f} GB > {mem.available / gb:.1f} GB "
                f"available ({cluster.gpu.hbm_capacity_gb:g} GB HBM - {cluster.gpu.reserved_memory_gb:g} GB "
                f"reserved)")


def check_model_matches_trace(model: ModelConfig, num_layers: int, num_experts: int, top_k: int,
                              trace_name: str, source: str | None = None) -> None:
    """UserError unless the model's layers, experts and top-k are the trace's; ``source``: the file or
    preset the model came from, named in the message."""
    for field_name, want in (("num_layers", num_layers), ("num_experts", num_experts), ("top_k", top_k)):
        have = getattr(model, field_name)
        if have != want:
            named = f"model {model.name}" + (f" ({source})" if source else "")
            raise UserError(f"{named}: {field_name}={have} but trace {trace_name} has "
                            f"{field_name}={want}; give a model that matches the trace (--model FILE)")
