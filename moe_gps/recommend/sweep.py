"""The sweep file of ``moe-gps recommend``: which axes to vary, validated like the other configs.

``load_sweep(None)`` is the default sweep shipped with the package
(``moe_gps/recommend/default_sweep.yaml``); ``load_sweep(path)`` reads a user's file.
Every problem is one line naming the file and the key (``UserError``, exit code 2),
as for cluster and model files (docs/configs.md). Keys: docs/recommend.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from moe_gps.config.loader import SANE_RANGE, build, parse_yaml, read_yaml
from moe_gps.config.schema import ASSUMPTIONS, WorkloadConfig, spec
from moe_gps.errors import UserError

PLACEMENTS = ("optimistic", "typical", "pessimistic")


@dataclass
class SyntheticSpec:
    """A hypothetical token-to-expert predictor (moe_gps.predict's synthetic one)."""

    accuracy: float = spec("top-k recall of the predictor", ge=0, le=1)
    overhead_flops: float = spec("predictor FLOPs per token per MoE layer", unit="FLOP", ge=0, default=0.0)


@dataclass
class SweepConfig:
    """The axes of a recommendation sweep (docs/recommend.md, "The sweep file")."""

    seed: int = spec("seed of predictors, planners and skew variants", ge=0, default=0)
    assumptions: str = spec("the modelling assumptions of every run: realistic or paper (docs/configs.md)",
                            choices=ASSUMPTIONS, default="realistic")
    train_steps: int = spec("first steps of the trace that fit predictors and profile static plans",
                            unit="steps", ge=1, default=16)
    sim_steps: int = spec("steps simulated per run, right after the training steps", unit="steps", ge=1,
                          default=17)
    bandwidth_gb_s: list[float] = spec(
        "interconnect bandwidths, per GPU per direction, of the fabric the all-to-all crosses "
        "(intra_node on one node, inter_node otherwise)", unit="GB/s",
        factory=lambda: [25.0, 50.0, 100.0, 200.0, 400.0, 900.0])
    skew: list[float] = spec("target expert skewness values (max / mean tokens per expert), >= 1",
                             factory=lambda: [1.25, 1.6, 2.0, 2.5])
    num_gpus: list[int] = spec("GPU counts", factory=lambda: [2, 4, 8])
    workloads: list[WorkloadConfig] = spec("workloads (phase, tokens_per_step, seq_len)",
                                           factory=lambda: [WorkloadConfig("prefill", 512, 2048),
                                                            WorkloadConfig("prefill", 512, 8192),
                                                            WorkloadConfig("prefill", 512, 16384),
                                                            WorkloadConfig("decode", 2048, 256)])
    redundant_slots_per_gpu: list[int] = spec(
        "extra expert slots per GPU beyond ceil(experts / GPUs), tried for every duplicating strategy at "
        "your point", factory=lambda: [1, 2])
    map_redundant_slots_per_gpu: int = spec("extra slots per GPU of the strategies in the maps", ge=1,
                                            default=1)
    strategies: list[str] = spec("strategies compared at your point; 'all' = every default strategy",
                                 factory=lambda: ["all"])
    map_strategies: list[str] = spec("strategies in the decision maps (headline winner and runner-up added)",
                                     factory=lambda: ["none", "eplb", "dist:profile", "dist:ema",
                                                      "token:most-frequent"])
    map_token_predictor: SyntheticSpec | None = spec(
        "a hypothetical token-to-expert predictor drawn in the maps; null for none",
        factory=lambda: SyntheticSpec(0.9, 8.4e6))
    predictor_accuracy: list[float] = spec("accuracies of the synthetic token predictor, in [0, 1]",
                                           factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0])
    predictor_overhead_flops: list[float] = spec(
        "overheads of the synthetic token predictor, FLOPs per token per MoE layer", unit="FLOP",
        factory=lambda: [0.0, 8.4e6, 6.7e7, 3.5e8])
    predictor_placement: str = spec("where the synthetic predictor's errors land", choices=PLACEMENTS,
                                    default="typical")

    def check(self, where: str) -> None:
        def items(key: str, ok, what: str) -> None:
            values = getattr(self, key)
            if not values:
                raise UserError(f"{where}: {key}: must list at least one value")
            for i, v in enumerate(values):
                if not ok(v):
                    raise UserError(f"{where}: {key}[{i}]: must be {what}, got {v!r}")

        lo, hi = SANE_RANGE
        items("bandwidth_gb_s", lambda v: lo <= v <= hi, f"a bandwidth between {lo:g} and {hi:g} GB/s")
        items("skew", lambda v: v >= 1, "a number >= 1 (max / mean tokens per expert)")
        items("num_gpus", lambda v: v >= 1, "an integer >= 1")
        items("redundant_slots_per_gpu", lambda v: v >= 1, "an integer >= 1 (0 is the none strategy)")
        items("predictor_accuracy", lambda v: 0 <= v <= 1, "a number in [0, 1]")
        items("predictor_overhead_flops", lambda v: v >= 0, "a number >= 0 (FLOPs per token per layer)")
        items("strategies", lambda v: bool(v.strip()), "a strategy name")
        items("map_strategies", lambda v: bool(v.strip()), "a strategy name")
        from moe_gps.config.loader import strategy_from_name
        for key in ("strategies", "map_strategies"):
            for i, name in enumerate(getattr(self, key)):
                if name == "all":
                    if key == "map_strategies":
                        raise UserError(f"{where}: map_strategies[{i}]: 'all' is only allowed in strategies "
                                        "(the maps simulate every cell for each strategy)")
                    continue
                try:
                    cfg = strategy_from_name(name)
                except UserError as err:
                    raise UserError(f"{where}: {key}[{i}]: {err}") from None
                if cfg.predictor == "synthetic":
                    raise UserError(f"{where}: {key}[{i}]: synthetic predictors are swept by predictor_accuracy "
                                    "and predictor_overhead_flops (and map_token_predictor), not named here")
                try:
                    _check_names(cfg)
                except UserError as err:
                    raise UserError(f"{where}: {key}[{i}] ({name}): {err}") from None
        if len(self.map_strategies) > 12:
            raise UserError(f"{where}: map_strategies: at most 12 (each one is simulated in every map cell), "
                            f"got {len(self.map_strategies)}")


def _check_names(cfg) -> None:
    """The predictor (with its options) and the planner exist: caught here, not in every run."""
    from moe_gps.placement.planner import PLANNERS
    from moe_gps.predict import make_distribution_predictor, make_token_predictor

    if cfg.kind == "distribution":
        make_distribution_predictor(cfg.predictor, **cfg.predictor_options)
    elif cfg.kind == "token":
        make_token_predictor(cfg.predictor, **cfg.predictor_options)
    planner = cfg.resolved_planner()
    if planner not in PLANNERS:
        raise UserError(f"unknown placement algorithm {planner!r}; choose one of {', '.join(PLANNERS)}")


#: keys whose values may be written like 8.4e6 (YAML 1.1 reads that as a string)
_FLOAT_LIST_KEYS = ("bandwidth_gb_s", "skew", "predictor_accuracy", "predictor_overhead_flops")


def _numbers(data: Any) -> Any:
    """Turn '8.4e6'-style strings into floats in the numeric keys (YAML 1.1 needs 8.4e+6)."""
    def num(v: Any) -> Any:
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                return v
        return v

    if not isinstance(data, dict):
        return data
    out = dict(data)
    for k in _FLOAT_LIST_KEYS:
        if isinstance(out.get(k), list):
            out[k] = [num(v) for v in out[k]]
    m = out.get("map_token_predictor")
    if isinstance(m, dict):
        out["map_token_predictor"] = {k: num(v) for k, v in m.items()}
    return out


def default_sweep_text() -> str:
    return (resources.files("moe_gps.recommend") / "default_sweep.yaml").read_text(encoding="utf-8")


def parse_sweep(data: Any, where: str) -> SweepConfig:
    return build(SweepConfig, _numbers(data), where)


def load_sweep(path: str | None = None) -> SweepConfig:
    """The default sweep (path None) or a sweep YAML file, fully checked."""
    if path is None:
        return parse_sweep(parse_yaml(default_sweep_text(), "default sweep"), "default sweep")
    return parse_sweep(read_yaml(path), str(path))


def sweep_to_dict(sweep: SweepConfig) -> dict:
    """Plain YAML-ready data (every value explicit), for sweep.yaml in the report folder."""
    from moe_gps.config.loader import to_dict

    d = to_dict(sweep)
    if sweep.map_token_predictor is None:
        d["map_token_predictor"] = None
    return d
