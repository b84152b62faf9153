"""The run config (``run.yaml``) of ``runtime.launch``: dataclasses, defaults, validation.

Sections ``model``, ``input``, ``run``, ``duplication`` and ``output``; every key is
optional and documented in docs/runtime.md. Relative input paths (``model.checkpoint``,
``input.trace``, ``duplication.placement``) are resolved against the config file's
folder; ``output.dir`` against the current folder. This module needs no torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from moe_gps.errors import UserError
from moe_gps.files import read_yaml

DUPLICATION_MODES = ("off", "static", "dist-only", "token-to-expert")
#: how the runtime moves weights for a new placement (the simulator's copy policies it can run)
RUNTIME_COPY_POLICIES = ("critical", "async")
#: keys renamed to the simulator's names: old -> new
RENAMED_KEYS = {"duplication": {"replan_every": "replan_interval"}}
DTYPES = ("float32", "bfloat16", "float16")
#: the largest model.router_bias_std: a logit bias of this many standard deviations already makes the routing
#: one-hot, and far larger ones overflow the gate weights
MAX_ROUTER_BIAS_STD = 100.0
#: the largest seed torch takes
MAX_SEED = 2**63 - 1


@dataclass
class ModelSection:
    """A Mixtral-style stack with random weights, or a local HuggingFace MoE checkpoint."""

    checkpoint: str | None = None       # local HF checkpoint folder (Mixtral, Qwen2/Qwen3-MoE, OLMoE)
    num_layers: int = 4                 # decoder layers, each with an MoE block
    hidden_size: int = 128
    intermediate_size: int = 256        # per expert
    num_experts: int = 8
    top_k: int = 2
    num_heads: int = 4
    vocab_size: int = 32000
    router_bias_std: float = 0.0        # std of a fixed per-expert router logit bias (random models only)
    dtype: str = "float32"
    seed: int = 0


@dataclass
class InputSection:
    """Where token ids come from: a trace's token_id column, else a seeded Zipf generator."""

    trace: str | None = None
    batch_size: int = 4                 # sequences per rank per step
    seq_len: int = 64                   # tokens per sequence
    seed: int = 0
    zipf_exponent: float = 1.2          # of the seeded generator


@dataclass
class RunSection:
    steps: int = 16
    device: str = "auto"                # auto | cpu | cuda
    timeout_s: float = 60.0             # every collective, and the rendezvous
    threads: int | None = None          # torch CPU threads per rank (default: cores / local ranks)


@dataclass
class DuplicationSection:
    num_redundant: int = 4              # extra slots per layer in total (experts + this divisible by ranks)
    algorithm: str = "eplb"             # a moe_gps.placement algorithm
    algorithm_options: dict = field(default_factory=dict)
    warmup_steps: int = 4               # steps recorded before the first plan (the predictors' training split)
    replan_interval: int = 4            # K: a re-plan check every K steps after the warm-up
    window: int | None = None           # steps of history a plan is made from (None: static all, others 1)
    min_gain: float = 0.0               # re-plan only if the predicted saving > min_gain x the move's cost
    cluster: str | None = None          # cluster YAML (moe-gps calibrate): the cost model min_gain needs
    copy_policy: str = "critical"       # critical: move before the step; async: in the background
    distribution_predictor: str = "ema"
    distribution_params: dict = field(default_factory=dict)
    token_predictor: str = "token-id"
    token_params: dict = field(default_factory=dict)
    placement: str | None = None        # a plan.yaml kept for the whole run (--duplication static)
    verify: bool = True                 # check every slot after each move


@dataclass
class OutputSection:
    dir: str = "runs/run"
    trace: str = "trace.parquet"
    timings: str = "timings.csv"
    steps: str = "steps.csv"


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    input: InputSection = field(default_factory=InputSection)
    run: RunSection = field(default_factory=RunSection)
    duplication: DuplicationSection = field(default_factory=DuplicationSection)
    output: OutputSection = field(default_factory=OutputSection)
    source: str = "<defaults>"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


#: input paths resolved against the config file's folder
_PATHS = (("model", "checkpoint"), ("input", "trace"), ("duplication", "placement"), ("duplication", "cluster"))

_SECTIONS = {"model": ModelSection, "input": InputSection, "run": RunSection,
             "duplication": DuplicationSection, "output": OutputSection}


def _check_type(where: str, value: Any, default: Any, annotation: str) -> Any:
    if value is None:
        if "None" in annotation:
            return None
        raise UserError(f"{where}: must not be empty")
    if "bool" in annotation:
        if not isinstance(value, bool):
            raise UserError(f"{where}: must be true or false, got {value!r}")
        return value
    if "int" in annotation and "float" not in annotation:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: must be an integer, got {value!r}")
        return value
    if "float" in annotation:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{where}: must be a finite number, got {value!r}")
        return float(value)
    if "dict" in annotation:
        if not isinstance(value, dict):
            raise UserError(f"{where}: must be a mapping, got {value!r}")
        return value
    if "str" in annotation:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{where}: must be text, got {value!r}")
        return str(value)
    return value


def parse_run_config(doc: Any, where: str = "run config", base: Path | None = None) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a parsed YAML document."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise UserError(f"{where}: expected a mapping with sections {', '.join(_SECTIONS)}")
    unknown = sorted(set(doc) - set(_SECTIONS))
    if unknown:
        raise UserError(f"{where}: unknown section(s) {', '.join(unknown)} (known: {', '.join(_SECTIONS)})")
    parts = {}
    for name, cls in _SECTIONS.items():
        sec = doc.get(name)
        sec = {} if sec is None else sec
        if not isinstance(sec, dict):
            raise UserError(f"{where}: section '{name}' must be a mapping")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for old, new in RENAMED_KEYS.get(name, {}).items():
            if old in sec:
                raise UserError(f"{where}: {name}.{old} is now {name}.{new} (the simulator's name); rename it")
        bad = sorted(set(sec) - set(fields))
        if bad:
            raise UserError(f"{where}: {name}: unknown key(s) {', '.join(bad)} (known: {', '.join(fields)})")
        values = {k: _check_type(f"{where}: {name}.{k}", v, None, str(fields[k].type)) for k, v in sec.items()}
        parts[name] = cls(**values)
    cfg = RunConfig(**parts, source=where)
    base = base or Path(".")
    for sec, key in _PATHS:
        value = getattr(parts[sec], key)
        if value:
            p = Path(value).expanduser()
            setattr(parts[sec], key, str(p if p.is_absolute() else (base / p)))
    check_run_config(cfg)
    return cfg


def check_run_config(cfg: RunConfig) -> None:
    w = cfg.source
    m, i, r, d = cfg.model, cfg.input, cfg.run, cfg.duplication
    for sec, name, value, low in (("model", "num_layers", m.num_layers, 1), ("model", "hidden_size", m.hidden_size, 1),
                                  ("model", "intermediate_size", m.intermediate_size, 1),
                                  ("model", "num_experts", m.num_experts, 1), ("model", "top_k", m.top_k, 1),
                                  ("model", "num_heads", m.num_heads, 1), ("model", "vocab_size", m.vocab_size, 2),
                                  ("input", "batch_size", i.batch_size, 1), ("input", "seq_len", i.seq_len, 1),
                                  ("model", "seed", m.seed, 0), ("input", "seed", i.seed, 0),
                                  ("run", "steps", r.steps, 1), ("duplication", "num_redundant", d.num_redundant, 0),
                                  ("duplication", "warmup_steps", d.warmup_steps, 1),
                                  ("duplication", "replan_interval", d.replan_interval, 1)):
        if value < low:
            raise UserError(f"{w}: {sec}.{name} must be at least {low}, got {value}")
    if m.top_k > m.num_experts:
        raise UserError(f"{w}: model.top_k={m.top_k} exceeds model.num_experts={m.num_experts}")
    if m.hidden_size % m.num_heads:
        raise UserError(f"{w}: model.hidden_size={m.hidden_size} is not a multiple of model.num_heads={m.num_heads}")
    if (m.hidden_size // m.num_heads) % 2:
        raise UserError(f"{w}: model.hidden_size / model.num_heads must be even (rotary embedding)")
    if m.dtype not in DTYPES:
        raise UserError(f"{w}: model.dtype {m.dtype!r} is not one of {', '.join(DTYPES)}")
    if not 0 <= m.router_bias_std <= MAX_ROUTER_BIAS_STD:
        raise UserError(f"{w}: model.router_bias_std must be in [0, {MAX_ROUTER_BIAS_STD:g}] (the standard "
                        f"deviation of a router logit bias: the routing is one-hot long before that), got "
                        f"{m.router_bias_std:g}")
    for sec, name, value in (("model", "seed", m.seed), ("input", "seed", i.seed)):
        if value > MAX_SEED:
            raise UserError(f"{w}: {sec}.{name} must be at most 2^63 - 1, got {value}")
    if r.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"{w}: run.device {r.device!r} is not one of auto, cpu, cuda")
    if not 1 <= r.timeout_s <= 86400:        # gloo's timeout is whole seconds of a C int; a day is ample
        raise UserError(f"{w}: run.timeout_s must be from 1 to 86400 seconds, got {r.timeout_s:g}")
    if r.threads is not None and r.threads < 1:
        raise UserError(f"{w}: run.threads must be at least 1")
    if i.zipf_exponent <= 1:
        raise UserError(f"{w}: input.zipf_exponent must be > 1")
    _check_output_names(cfg)
    for sec, key in _PATHS:
        value = getattr(getattr(cfg, sec), key)
        if value and not Path(value).exists():
            raise UserError(f"{w}: {sec}.{key}: {value}: no such file or folder")
    _check_replan_policy(cfg)
    from moe_gps.placement import ALGORITHMS
    if d.algorithm not in ALGORITHMS:
        raise UserError(f"{w}: duplication.algorithm {d.algorithm!r} is not one of {', '.join(ALGORITHMS)}")


#: --help of the run's flags, shared by `moe-gps run` and `python -m runtime.launch`
FLAG_HELP = {
    "duplication": "off: no replicas; static: duplication.placement for the whole run, else re-planned at every "
                   "check from the true counts of recent steps (EPLB as vLLM runs it); dist-only: re-planned from a "
                   "distribution predictor; token-to-expert: re-planned from per-token guesses (docs/runtime.md)",
    "steps": "steps to run (default: the config's run.steps, else 16)",
    "out": "output folder for the trace, timings, steps (output.trace, .timings, .steps: trace.parquet, "
           "timings.csv, steps.csv unless the config names others), placement.yaml and summary.json (default: the "
           "config's output.dir, else runs/run)",
    "device": "auto (cuda where torch sees a GPU, else cpu), cpu or cuda (default: the config's run.device, "
              "else auto)",
}

#: the files a run writes into output.dir besides the three the output section names
FIXED_OUTPUTS = ("placement.yaml", "summary.json")


def run_outputs(cfg: RunConfig) -> tuple[str, ...]:
    """The names of the files a run writes into output.dir."""
    return (cfg.output.trace, cfg.output.timings, cfg.output.steps, *FIXED_OUTPUTS)


def _check_output_names(cfg: RunConfig) -> None:
    """output.trace, .timings and .steps: file names (in output.dir), each its own file, none of FIXED_OUTPUTS."""
    taken = {name: f"the run's {name}" for name in FIXED_OUTPUTS}
    for key in ("trace", "timings", "steps"):
        name = getattr(cfg.output, key)
        if not name.strip():
            raise UserError(f"{cfg.source}: output.{key} must name a file, got {name!r}")
        if "/" in name or os.sep in name or name in (".", ".."):
            raise UserError(f"{cfg.source}: output.{key} must be a file name in output.dir, without a folder, "
                            f"got {name!r}")
        other = taken.get(os.path.normpath(name))
        if other:
            raise UserError(f"{cfg.source}: output.{key} {name!r} is also {other}; give each output its own name")
        taken[os.path.normpath(name)] = f"output.{key}"


def _check_replan_policy(cfg: RunConfig) -> None:
    """``window``, ``min_gain``, ``cluster`` and ``copy_policy`` of the duplication section."""
    w, d = cfg.source, cfg.duplication
    if d.window is not None and d.window < 1:
        raise UserError(f"{w}: duplication.window must be at least 1 (or absent), got {d.window}")
    if d.min_gain < 0:
        raise UserError(f"{w}: duplication.min_gain must be >= 0, got {d.min_gain:g}")
    if d.copy_policy not in RUNTIME_COPY_POLICIES:
        raise UserError(f"{w}: duplication.copy_policy {d.copy_policy!r} is not one of "
                        f"{', '.join(RUNTIME_COPY_POLICIES)} (the simulator's overlap and hidden need copies "
                        "inside a layer, which the runtime does not do)")
    if d.min_gain > 0 and not d.cluster:
        raise UserError(f"{w}: duplication.min_gain={d.min_gain:g} needs a cost model: set duplication.cluster to "
                        "a cluster file (e.g. one written by moe-gps calibrate), or set min_gain: 0")
    if d.min_gain > 0 and cfg.model.checkpoint:
        raise UserError(f"{w}: duplication.min_gain needs the runtime's random model (model.checkpoint: null), "
                        "whose sizes the cost model knows")


def check_outputs_spare_inputs(cfg: RunConfig, out_dir: str, out_name: str) -> None:
    """A UserError when a file the run would write into ``out_dir`` (named ``out_name`` in the message:
    ``--out`` or output.dir) is one of its inputs: the run config itself, input.trace,
    duplication.placement or duplication.cluster (the run would overwrite what it reads)."""
    inputs = {"input.trace": cfg.input.trace, "duplication.placement": cfg.duplication.placement,
              "duplication.cluster": cfg.duplication.cluster,
              "the run config": cfg.source if Path(cfg.source).is_file() else None}
    from moe_gps.outputs import same_file

    for name in run_outputs(cfg):
        what = next((what for what, p in inputs.items() if p and same_file(p, Path(out_dir) / name)), None)
        if what:
            raise UserError(f"{cfg.source}: {out_name} {out_dir}: the run would write its {name} over {what} "
                            f"({(Path(out_dir) / name)}); write the run to another folder")


def check_run_inputs(cfg: RunConfig) -> None:
    """Read the files the config names as every rank will (model.checkpoint's config.json there, input.trace
    fully validated, the duplication.placement plan, the cluster file), so that a damaged one is one line
    before any rank starts."""
    from moe_gps.placement import load_placement
    from moe_gps.trace import load_trace

    def named(sec: str, key: str, err: UserError) -> UserError:
        return UserError(f"{cfg.source}: {sec}.{key}: {err}")

    ckpt = cfg.model.checkpoint
    if ckpt and not (Path(ckpt) / "config.json").is_file():
        raise UserError(f"{cfg.source}: model.checkpoint: {ckpt}: not a HuggingFace checkpoint folder "
                        "(no config.json)")
    if cfg.input.trace:
        try:
            load_trace(cfg.input.trace)
        except UserError as err:
            raise named("input", "trace", err) from None
    if cfg.duplication.placement:
        try:
            load_placement(cfg.duplication.placement)
        except UserError as err:
            raise named("duplication", "placement", err) from None
    if cfg.duplication.cluster:
        from moe_gps.config.loader import load_cluster
        try:
            load_cluster(cfg.duplication.cluster)
        except UserError as err:
            raise named("duplication", "cluster", err) from None


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate ``run.yaml``; UserError naming the file and key on any problem."""
    p = Path(path)
    doc = read_yaml(p, what="a run config")
    return parse_run_config(doc, where=str(p), base=p.resolve().parent)
