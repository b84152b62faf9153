"""The routings the calibration's model benchmarks run (``runtime.fidelity_bench``), as arrays, so that
``calibrate`` can model the very tokens each benchmark sent.

* :func:`balanced_experts`: every expert chosen equally often, distinct per token;
* :func:`imbalanced_experts`: the same, except that a share of the tokens choose the experts of
  rank 0 (the imbalance benchmark: rank 0 computes longer, the others wait for it);
* :func:`expert_counts`: every rank's per-expert pair counts of one of them;
* :func:`rank0_experts`: the experts that share goes to.
"""

from __future__ import annotations

import numpy as np


def rank0_experts(placement) -> list[int]:
    """The experts rank 0 holds in the first layer of ``placement``, ascending: those the imbalance
    benchmark sends its share of the tokens to (``hot`` of :func:`imbalanced_experts`)."""
    return sorted({int(e) for e in placement.phy2log[0][:placement.slots_per_gpu]})


def balanced_experts(T: int, k: int, E: int, rank: int) -> np.ndarray:
    """int64 [T, k]: token t's j-th expert is (t k + j + rank) mod E: every expert chosen exactly
    T k / E times (when E divides T k), distinct per token (k <= E)."""
    t = np.arange(T, dtype=np.int64)[:, None]
    j = np.arange(k, dtype=np.int64)[None, :]
    return (t * k + j + rank) % E


def imbalanced_experts(T: int, k: int, E: int, rank: int, fraction: float, hot: list[int]) -> np.ndarray:
    """int64 [T, k]: :func:`balanced_experts`, except that the first round(fraction x T) tokens choose the
    ``hot`` experts (those rank 0 holds), distinct per token as far as there are enough of them."""
    out = balanced_experts(T, k, E, rank)
    n, h = int(round(fraction * T)), len(hot)
    if n and h:
        t = np.arange(n)[:, None]
        j = np.arange(min(k, h))[None, :]
        out[:n, :min(k, h)] = np.asarray(hot, dtype=np.int64)[(t + j) % h]
    return out


def expert_counts(T: int, k: int, E: int, ranks: int, fraction: float = 0.0,
                  hot: list[int] | None = None) -> np.ndarray:
    """float [ranks, E]: pairs each rank routes to each expert under :func:`imbalanced_experts` (with
    ``fraction`` 0 or no ``hot``: :func:`balanced_experts`)."""
    return np.stack([np.bincount(imbalanced_experts(T, k, E, r, fraction, hot or []).ravel(), minlength=E)
                     for r in range(ranks)]).astype(np.float64)
