"""Evaluate predictors of both kinds on one trace: accuracy or error, imbalance, cost.

>>> ev = evaluate(load_trace("traces/mixtral_mmlu.parquet"), train_steps=32)
>>> [(r.label, r.overall.get("recall")) for r in ev.reports]

Every predictor is fitted on steps < train_steps and rolled out over the rest
(:func:`rollout_distribution`, :func:`rollout_tokens`). Overall figures are means over
the test (step, layer) pairs (token metrics: over test (token, layer) pairs); per-layer
figures are means over the test steps (tokens) of that layer.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np

from moe_gps.errors import UserError
from moe_gps.predict.base import (MissingFeature, PredictorCost, check_train_steps, default_train_steps,
                                  rollout_distribution, rollout_tokens, shares)
from moe_gps.predict.metrics import (distribution_errors, planned_gpu_loads, predicted_counts,
                                     static_gpu_loads, token_hits)
from moe_gps.predict.registry import (DEFAULT_DISTRIBUTION, DEFAULT_TOKEN, DISTRIBUTION_PREDICTORS,
                                      TOKEN_PREDICTORS, make_distribution_predictor, make_token_predictor)
from moe_gps.predict.synthetic import SyntheticTokenPredictor
from moe_gps.trace.data import CountsTrace, TokensTrace

@dataclass
class PredictorReport:
    """One predictor's results. ``overall``: metric -> value; ``per_layer``: metric -> [L]."""

    name: str
    label: str
    kind: str
    mode: str
    uses: str
    cost: PredictorCost | None = None
    seconds: float = 0.0
    overall: dict[str, float] = field(default_factory=dict)
    per_layer: dict[str, list[float]] = field(default_factory=dict)
    skipped: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cost"] = None if self.cost is None else self.cost.to_dict()
        return d


@dataclass
class Evaluation:
    """All results of one evaluation run."""

    trace: dict
    train_steps: int
    test_steps: int
    num_gpus: int
    num_redundant: int
    algorithm: str
    reference: dict
    reports: list[PredictorReport]
    warnings: list[str] = field(default_factory=list)

    def report(self, label_or_name: str, kind: str | None = None) -> PredictorReport:
        for r in self.reports:
            if (r.label == label_or_name or r.name == label_or_name) and (kind is None or r.kind == kind):
                return r
        raise KeyError(label_or_name)

    def to_dict(self) -> dict:
        return {"trace": self.trace, "train_steps": self.train_steps, "test_steps": self.test_steps,
                "num_gpus": self.num_gpus, "num_redundant": self.num_redundant, "algorithm": self.algorithm,
                "reference": self.reference, "warnings": self.warnings,
                "predictors": [r.to_dict() for r in self.reports]}


def default_redundant(num_experts: int, num_gpus: int) -> int:
    """The simulator's default: one slot per GPU beyond the spares that make the experts divide
    (:func:`moe_gps.config.schema.redundant_slots`)."""
    from moe_gps.config.schema import redundant_slots

    return redundant_slots(num_gpus, num_experts, 1)


def parse_predictor_names(spec: str | Sequence[str] | None) -> tuple[list[str], list[str]]:
    """'ema,prev-layer,token:oracle' -> (distribution names, token names).

    A bare name in both registries (oracle, synthetic) selects both kinds; ``distribution:``
    (``d:``) or ``token:`` (``t:``) selects one."""
    if spec is None:
        return list(DEFAULT_DISTRIBUTION), list(DEFAULT_TOKEN)
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise UserError("no predictors given")
    dist, tok = [], []
    for item in items:
        kind, _, name = item.rpartition(":")
        if kind in ("distribution", "d"):
            targets = [(DISTRIBUTION_PREDICTORS, dist)]
        elif kind in ("token", "t"):
            targets = [(TOKEN_PREDICTORS, tok)]
        elif kind == "":
            targets = [(DISTRIBUTION_PREDICTORS, dist), (TOKEN_PREDICTORS, tok)]
        else:
            raise UserError(f"predictor {item!r}: prefix must be 'distribution:' or 'token:'")
        found = False
        for table, out in targets:
            if name in table:
                found = True
                if name not in out:
                    out.append(name)
        if not found:
            raise UserError(f"unknown predictor {item!r} (distribution: {', '.join(DISTRIBUTION_PREDICTORS)}; "
                            f"token: {', '.join(TOKEN_PREDICTORS)})")
    return dist, tok


def _layer_mean(values: np.ndarray) -> list[float]:
    return [float(v) for v in values.mean(axis=0)]


def _dist_summary(pred: np.ndarray, counts: np.ndarray, G: int, R: int, algorithm: str) -> tuple[dict, dict]:
    from moe_gps.placement import balancedness, vllm_balancedness

    errs = distribution_errors(pred, counts)
    gpu = planned_gpu_loads(pred, counts, G, R, algorithm)            # [S, L, GPUs]
    errs["balancedness"] = balancedness(gpu)
    overall = {k: float(v.mean()) for k, v in errs.items()}
    overall["balancedness_vllm"] = float(vllm_balancedness(gpu).mean())
    overall["eps_max_worst"] = float(errs["eps_max"].max())
    return overall, {k: _layer_mean(v) for k, v in errs.items()}


def evaluate(trace: TokensTrace | CountsTrace, distribution: Iterable | None = None, token: Iterable | None = None,
             train_steps: int | None = None, online: bool | None = None, num_gpus: int = 4,
             num_redundant: int | None = None, algorithm: str = "eplb", synthetic: Sequence[float] = (),
             synthetic_placement: str = "typical", synthetic_overhead=None, seed: int = 0,
             progress: bool = False) -> Evaluation:
    """Fit and roll out every predictor; measure it against the true routing.

    distribution, token: names (see the registries) or predictor instances; None = the
    defaults (every non-synthetic predictor). online: None keeps each predictor's
    default mode. synthetic: accuracies of extra SyntheticTokenPredictor rows.
    """
    if distribution is None and token is None:
        distribution, token = DEFAULT_DISTRIBUTION, DEFAULT_TOKEN
    distribution, token = list(distribution or []), list(token or [])
    S = trace.num_steps
    train_steps = default_train_steps(S) if train_steps is None else check_train_steps(trace, train_steps)
    meta = trace.meta
    E = meta.num_experts
    if num_redundant is None:
        num_redundant = default_redundant(E, num_gpus)
    counts = trace.counts()
    test_counts = counts[train_steps:]
    from moe_gps.placement import ALGORITHMS
    if algorithm not in ALGORITHMS:
        raise UserError(f"unknown placement algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    # fails early, with the planner's one-line message, on a bad GPU / redundant-slot combination
    from moe_gps.placement import balancedness, vllm_balancedness
    static_gpu = static_gpu_loads(test_counts, num_gpus, num_redundant)
    static = balancedness(static_gpu)
    reference = {"static_balancedness": float(static.mean()),
                 "static_balancedness_vllm": float(vllm_balancedness(static_gpu).mean()),
                 "static_balancedness_per_layer": _layer_mean(static)}

    def mode_kw(cls) -> dict:
        return {} if online is None else {"online": online}

    jobs: list[tuple[str, object]] = []
    for d in distribution:
        jobs.append(("distribution", d))
    for t in token:
        jobs.append(("token", t))
    for a in synthetic:
        jobs.append(("token", SyntheticTokenPredictor(a, synthetic_overhead, synthetic_placement, seed)))

    reports: list[PredictorReport] = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="predictors", unit="pred", leave=False)
    is_tokens = isinstance(trace, TokensTrace)
    test_offsets = None
    if is_tokens:
        test_offsets = trace.step_offsets[train_steps:] - trace.step_offsets[train_steps]
        true_test = trace.experts[int(trace.step_offsets[train_steps]):]
    for kind, spec in jobs:
        table = DISTRIBUTION_PREDICTORS if kind == "distribution" else TOKEN_PREDICTORS
        if isinstance(spec, str) and spec not in table:
            raise UserError(f"unknown {kind} predictor {spec!r} (choose from {', '.join(table)})")
        name = spec if isinstance(spec, str) else spec.name
        cls = table[name] if isinstance(spec, str) else type(spec)
        rep = PredictorReport(name=name, label=name, kind=kind, mode="", uses=cls.uses)
        if bar is not None:
            bar.set_postfix_str(f"{kind}:{name}")
        try:
            if isinstance(spec, str):
                params = {"seed": seed} if "seed" in inspect.signature(cls.__init__).parameters else {}
                params.update(mode_kw(cls))
                pred_obj = (make_distribution_predictor if kind == "distribution" else make_token_predictor)(
                    name, **params)
            else:
                pred_obj = spec
            rep.label, rep.mode = pred_obj.describe(), pred_obj.mode
            t0 = time.perf_counter()
            if kind == "distribution":
                pred = rollout_distribution(pred_obj, trace, train_steps)
                rep.seconds = time.perf_counter() - t0
                rep.overall, rep.per_layer = _dist_summary(pred, test_counts, num_gpus, num_redundant, algorithm)
            else:
                if not is_tokens:
                    raise MissingFeature(f"predictor {name!r} needs a tokens trace (per-token routing); "
                                         "this is a counts trace")
                pred = rollout_tokens(pred_obj, trace, train_steps)
                rep.seconds = time.perf_counter() - t0
                hits = token_hits(pred, true_test)
                rep.overall = {k: float(v.mean()) for k, v in hits.items()}
                rep.per_layer = {k: _layer_mean(v) for k, v in hits.items()}
                implied = shares(predicted_counts(pred, test_offsets, E))
                d_overall, d_layer = _dist_summary(implied, test_counts, num_gpus, num_redundant, algorithm)
                rep.overall.update(d_overall)
                rep.per_layer.update(d_layer)
            rep.cost = pred_obj.cost()
        except MissingFeature as err:
            rep.skipped = str(err)
        reports.append(rep)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    trace_info = {"model": meta.model, "dataset": meta.dataset, "source": meta.source, "kind": meta.kind,
                  "steps": S, "layers": meta.num_layers, "experts": E, "top_k": meta.top_k,
                  "tokens": int(trace.tokens_per_step.sum())}
    return Evaluation(trace_info, train_steps, S - train_steps, num_gpus, num_redundant, algorithm, reference,
                      reports)
