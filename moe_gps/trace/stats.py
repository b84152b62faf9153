"""Routing statistics that decide which prediction strategy can work.

All functions are vectorised over leading axes. Definitions (also in docs/trace-format.md):

* skewness = max_e c_e / mean_e c_e  (the MoE-GPS paper's skew: tokens at the most
  loaded expert over mean tokens per expert; 1.0 is perfectly even, E/k is the maximum
  for top-k routing since a token picks an expert at most once);
* Gini coefficient of the per-expert loads, in [0, 1 - 1/E];
* top-expert share = max_e c_e / sum_e c_e;
* drift = Jensen-Shannon divergence (base 2, in [0, 1]) between the load distributions
  of consecutive steps that route tokens (a step without tokens has none);
* layer affinity = how well a token's top-1 expert at layer l predicts its top-1 expert
  at layer l+1: the hit rate of the most frequent successor, cross-fitted (table built on
  even tokens and scored on odd tokens, and the reverse), against the baseline of
  guessing the layer's most frequent top-1 expert, cross-fitted the same way (the most
  frequent among the even tokens for the odd ones, and the reverse);
* token-id affinity = the same hit rate when the predictor is the token's vocabulary id.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np

from moe_gps.trace.data import CountsTrace, TokensTrace


def skewness(counts: np.ndarray) -> np.ndarray:
    """counts: [..., experts] -> max / mean over experts: [...] (NaN where no load)."""
    counts = np.asarray(counts, dtype=np.float64)
    mean = counts.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, counts.max(axis=-1) / mean, np.nan)


def gini(counts: np.ndarray) -> np.ndarray:
    """counts: [..., experts] -> Gini coefficient over experts: [...]."""
    x = np.sort(np.asarray(counts, dtype=np.float64), axis=-1)
    n = x.shape[-1]
    total = x.sum(axis=-1)
    rank = np.arange(1, n + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (2 * (rank * x).sum(axis=-1) / (n * total)) - (n + 1) / n, np.nan)


def top_share(counts: np.ndarray) -> np.ndarray:
    """counts: [..., experts] -> max / sum over experts: [...]."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, counts.max(axis=-1) / total, np.nan)


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence, base 2, over the last axis. Inputs are normalised; NaN where one is all 0."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = p / p.sum(axis=-1, keepdims=True)
        q = q / q.sum(axis=-1, keepdims=True)
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(a > 0, a * np.log2(a / b), 0.0).sum(axis=-1)

    return np.clip(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0, 1.0)


def mode_hit_rate(group: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cross-fitted hit rate of predicting ``target`` as the most frequent target of its ``group``.

    group, target: int [tokens, columns]; column c is scored on its own. The table is
    fitted on even tokens and scored on odd ones, and the reverse; a group unseen in the
    fitting half falls back to the column's most frequent target. Returns
    (hit [columns], baseline [columns]) where baseline guesses the column's most frequent
    target of the fitting half, cross-fitted the same way. Sparse (sort-based), so any number of groups works.
    """
    n, C = target.shape
    hits, base = np.zeros(C), np.zeros(C)
    if n < 2 or C == 0:
        return np.full(C, np.nan), np.full(C, np.nan)
    T = int(target.max()) + 1
    col = np.broadcast_to(np.arange(C), (n, C))
    even = np.arange(n) % 2 == 0
    for fit in (even, ~even):
        score = ~fit
        g = (group[fit].astype(np.int64) * C + col[fit]).ravel()        # group id within its column
        keys, cnt = np.unique(g * T + target[fit].ravel(), return_counts=True)
        kg, kt = keys // T, keys % T
        order = np.lexsort((-cnt, kg))                                  # per group: most frequent first
        first = order[np.r_[True, kg[order][1:] != kg[order][:-1]]]
        best_g, best_t = kg[first], kt[first]
        marg = np.array([np.bincount(target[fit][:, c], minlength=T).argmax() for c in range(C)])
        q = (group[score].astype(np.int64) * C + col[score])            # [n_score, C]
        pos = np.clip(np.searchsorted(best_g, q), 0, len(best_g) - 1)
        guess = np.where(best_g[pos] == q, best_t[pos], marg[None, :])
        hits += (guess == target[score]).sum(axis=0)
        base += (target[score] == marg[None, :]).sum(axis=0)
    return hits / n, base / n


def layer_affinity(experts: np.ndarray, bar=None) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 hit rate of layer l -> l+1 (cross-fitted) and the most-frequent baseline.

    experts: int [tokens, layers, k]  ->  (hit [layers - 1], baseline [layers - 1]); ``bar``: a progress bar
    advanced by one per layer (:func:`_by_layer`)
    """
    top1 = experts[:, :, 0].astype(np.int64)
    return _by_layer(top1[:, :-1], top1[:, 1:], bar)


def token_id_affinity(experts: np.ndarray, token_id: np.ndarray, bar=None) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 hit rate from the token's vocabulary id, per layer (cross-fitted), and the baseline.

    experts: int [tokens, layers, k], token_id: int [tokens] -> (hit [layers], baseline [layers]); ``bar``: as
    :func:`layer_affinity`'s
    """
    top1 = experts[:, :, 0].astype(np.int64)
    return _by_layer(np.broadcast_to(token_id[:, None], top1.shape), top1, bar)


def _by_layer(group: np.ndarray, target: np.ndarray, bar=None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`mode_hit_rate` a column (layer) at a time, advancing ``bar`` (when given) by one per column: the
    same numbers as all columns at once, since every column is scored on its own."""
    C = target.shape[1]
    hit, base = np.full(C, np.nan), np.full(C, np.nan)
    for c in range(C):
        hit[c:c + 1], base[c:c + 1] = mode_hit_rate(group[:, c:c + 1], target[:, c:c + 1])
        if bar is not None:
            bar.update()
    return hit, base


@dataclass
class LayerStats:
    layer: int
    skewness: float            # over the whole trace
    skewness_step_mean: float  # mean over steps of the per-step skewness
    skewness_step_max: float
    gini: float
    top_share: float
    drift_jsd: float           # mean JSD between consecutive steps that route tokens (NaN for fewer than two)
    affinity_next: float       # cross-fitted top-1 hit rate l -> l+1 (NaN for counts traces / last layer)
    affinity_token_id: float   # cross-fitted top-1 hit rate from token_id (NaN without token ids)
    affinity_baseline: float   # guessing the layer's most frequent top-1 expert of the other half (cross-fitted)


@dataclass
class TraceSummary:
    kind: str
    model: str
    dataset: str
    source: str
    num_steps: int
    num_layers: int
    num_experts: int
    top_k: int
    num_tokens: int
    tokens_per_step_min: int
    tokens_per_step_max: int
    has_weights: bool
    optional_columns: list[str]
    empty_steps: int           # steps that route no token (left out of the per-step skew and the drift)
    layers: list[LayerStats]

    def overall(self) -> dict[str, float]:
        """Means over layers of every per-layer statistic, plus the worst layer's skewness."""
        out = {}
        for name in LayerStats.__dataclass_fields__:
            if name == "layer":
                continue
            vals = np.array([getattr(s, name) for s in self.layers], dtype=np.float64)
            out[name] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
        out["skewness_worst_layer"] = float(max(s.skewness for s in self.layers))
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["overall"] = self.overall()
        return d


def summarize(trace: TokensTrace | CountsTrace, progress: bool = False) -> TraceSummary:
    """Per-layer statistics of a trace (see the module docstring for definitions). ``progress``: a progress
    bar of the per-layer hit rates (the slow part of a tokens trace) on stderr."""
    import sys

    from tqdm import tqdm

    meta = trace.meta
    counts = trace.counts()                                   # [S, L, E]
    total = counts.sum(axis=0)                                # [L, E]
    step_skew = skewness(counts)                              # [S, L]
    # drift between consecutive steps that route tokens: a step without tokens has no load distribution
    routed = counts.sum(axis=2)[:, 0] > 0                     # [S] (every layer of a step holds the same)
    loads = counts[routed]
    if len(loads) > 1:
        drift = js_divergence(loads[1:], loads[:-1]).mean(axis=0)
    else:
        drift = np.full(meta.num_layers, np.nan)
    hit = np.full(meta.num_layers, np.nan)
    tok_hit = np.full(meta.num_layers, np.nan)
    base = np.full(meta.num_layers, np.nan)
    if isinstance(trace, TokensTrace):
        L = meta.num_layers
        total_work = (L - 1) + L + (L if trace.token_id is not None else 0)
        with tqdm(total=total_work, desc="inspect", unit="layer", leave=False, disable=not progress,
                  file=sys.stderr) as bar:
            top1 = trace.experts[:, :, 0].astype(np.int64)
            base = _by_layer(np.zeros_like(top1), top1, bar)[1]
            del top1                                           # each affinity makes its own: one copy at a time
            hit[:-1] = layer_affinity(trace.experts, bar)[0]
            if trace.token_id is not None:
                tok_hit = token_id_affinity(trace.experts, trace.token_id, bar)[0]
    skew, g, share = skewness(total), gini(total), top_share(total)
    with warnings.catch_warnings():                            # a layer of no load: NaN, shown as '-'
        warnings.simplefilter("ignore", RuntimeWarning)
        skew_mean, skew_max = np.nanmean(step_skew, axis=0), np.nanmax(step_skew, axis=0)
    layers = [
        LayerStats(l_, float(skew[l_]), float(skew_mean[l_]), float(skew_max[l_]),
                   float(g[l_]), float(share[l_]), float(drift[l_]), float(hit[l_]), float(tok_hit[l_]),
                   float(base[l_]))
        for l_ in range(meta.num_layers)
    ]
    tps = trace.tokens_per_step
    optional = [f for f in ("token_id", "seq", "pos", "rank") if getattr(trace, f, None) is not None]
    return TraceSummary(
        kind=meta.kind, model=meta.model, dataset=meta.dataset, source=meta.source,
        num_steps=trace.num_steps, num_layers=meta.num_layers, num_experts=meta.num_experts,
        top_k=meta.top_k, num_tokens=int(tps.sum()), tokens_per_step_min=int(tps.min()),
        tokens_per_step_max=int(tps.max()), has_weights=getattr(trace, "weights", None) is not None,
        optional_columns=optional, empty_steps=int((~routed).sum()), layers=layers,
    )
