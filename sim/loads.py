"""Token loads per GPU from a trace, vectorised (no Python loop over tokens).

Where a token starts (its *home* GPU, where its attention runs and where its expert
outputs come back): the trace's ``rank`` column when it has one and every rank of the step
is a GPU of the cluster (0 .. GPUs - 1); otherwise tokens are split into contiguous equal
blocks in trace order, ``home[t] = floor(t * G / T)`` (a data-parallel batch split).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from moe_gps.trace.data import CountsTrace, TokenCounts, TokensTrace, slot_major


def home_gpus(num_tokens: int, num_gpus: int, rank: np.ndarray | None = None) -> np.ndarray:
    """int64 [T]: the GPU each token of a step starts on."""
    if rank is not None and len(rank) == num_tokens and (
            num_tokens == 0 or (int(rank.min()) >= 0 and int(rank.max()) < num_gpus)):
        return rank.astype(np.int64)
    return (np.arange(num_tokens, dtype=np.int64) * num_gpus) // max(num_tokens, 1)


def unused_rank_note(trace: TokensTrace | CountsTrace, num_gpus: int, steps: np.ndarray) -> str | None:
    """Why :func:`home_gpus` ignores the trace's ``rank`` column in some of ``steps`` (a rank the cluster
    does not have), in one sentence; None when it is used in all of them or the trace has none."""
    rank = getattr(trace, "rank", None)
    if rank is None or len(steps) == 0:
        return None
    lo, hi = trace.step_offsets[steps], trace.step_offsets[np.asarray(steps) + 1]
    unused = [(int(a), int(b)) for a, b in zip(lo, hi)
              if b > a and (int(rank[a:b].min()) < 0 or int(rank[a:b].max()) >= num_gpus)]
    if not unused:
        return None
    ranks = np.concatenate([rank[a:b] for a, b in unused])
    outside = ranks[(ranks < 0) | (ranks >= num_gpus)]
    shown = int(outside.max()) if outside.max() >= num_gpus else int(outside.min())
    which = "any simulated step" if len(unused) == len(steps) else f"{len(unused)} of the {len(steps)} simulated steps"
    return (f"the trace's rank column was not used in {which}: it names rank {shown}, and the "
            f"cluster has {num_gpus} GPUs (ranks 0..{num_gpus - 1}); those steps' tokens start on the GPUs in "
            "equal contiguous blocks, in trace order")


def source_counts(experts: np.ndarray, home: np.ndarray, num_gpus: int, num_experts: int,
                  mask: np.ndarray | None = None) -> np.ndarray:
    """Assignments per (layer, home GPU, expert).

    experts: int [T, L, k];  home: int [T];  mask: bool [T, L, k] or None (count only True)
    -> float64 [L, G, E], laid out as [L, E, G] in memory (:func:`sim.work.route` reads it by expert)

    Counted one home GPU's tokens at a time (a bincount into one layer-by-expert table that stays in
    cache, written as that GPU's column), the tokens grouped by home GPU first where they are not; the
    keys built slot by slot (:func:`~moe_gps.trace.data.slot_major`). Tokens whose home is not a GPU 0 .. G-1 are not counted.
    """
    T, L, _ = experts.shape
    E = num_experts
    home = np.asarray(home)
    if T > 1 and (home[1:] < home[:-1]).any():
        order = np.argsort(home, kind="stable")
        experts, home = experts[order], home[order]
        mask = None if mask is None else mask[order]
    layer = np.arange(L, dtype=np.intp) * E
    bounds = np.searchsorted(home, np.arange(num_gpus + 1))
    out = np.zeros((L * E, num_gpus))
    for g in range(num_gpus):
        a, b = bounds[g], bounds[g + 1]
        if a < b:
            key = slot_major(experts[a:b])
            key += layer
            if mask is None:
                out[:, g] = np.bincount(key.ravel(), minlength=L * E)
            else:                                  # masked-out assignments go to one extra bin
                key = np.where(mask[a:b].transpose(2, 0, 1), key, L * E)
                out[:, g] = np.bincount(key.ravel(), minlength=L * E + 1)[:L * E]
    return np.swapaxes(out.reshape(L, E, num_gpus), 1, 2)


@dataclass
class StepLoads:
    """The true routing of one step, as the simulator needs it.

    step:        step index in the trace
    tokens:      tokens of the step after workload scaling (float)
    scale:       workload scale factor (1.0 = as in the trace)
    home_tokens: float [G] tokens starting on each GPU (attention work)
    by_home:     float [L, G, E] (token, expert) assignments by home GPU and expert (None for one mix:
                 made from ``mix_counts`` on first use of :attr:`src_counts`)
    experts:     int16 [T, L, k] the step's routing (None for a counts trace)
    home:        int64 [T] home GPU per token (None for a counts trace)
    rows:        int64 [T] the trace rows of the step's tokens when they are not one whole trace step
                 (a serving iteration, docs/serving.md), else None
    home_frac:   float [G] when every GPU's tokens have the same expert mix (a counts trace:
                 src_counts[l, g, e] = mix_counts[l, e] x home_frac[g]), else None
    mix_counts:  float [L, E] the expert counts of that one mix (scaled), else None
    """

    step: int
    tokens: float
    scale: float
    home_tokens: np.ndarray
    by_home: np.ndarray | None
    experts: np.ndarray | None = None
    home: np.ndarray | None = None
    rows: np.ndarray | None = None
    home_frac: np.ndarray | None = None
    mix_counts: np.ndarray | None = None

    @property
    def src_counts(self) -> np.ndarray:
        """float [L, G, E] (token, expert) assignments by home GPU and expert."""
        if self.by_home is None:
            if self.mix_counts is None or self.home_frac is None:
                raise ValueError("StepLoads: needs by_home, or mix_counts and home_frac")
            self.by_home = self.mix_counts[:, None, :] * self.home_frac[None, :, None]
        return self.by_home

    def release(self) -> None:
        """Forget the [L, G, E] assignments where they were made from ``mix_counts`` (made again on
        next use): a step looked far ahead need not hold them until it is served."""
        if self.mix_counts is not None and self.home_frac is not None:
            self.by_home = None

    @cached_property
    def counts(self) -> np.ndarray:
        """float [L, E] true load per expert (scaled)."""
        return self.mix_counts if self.mix_counts is not None else self.by_home.sum(axis=1)


def step_loads(trace: TokensTrace | CountsTrace, step: int, num_gpus: int,
               tokens_per_step: int | None = None) -> StepLoads:
    """The loads of one step; ``tokens_per_step`` rescales them (workload.tokens_per_step)."""
    E = trace.meta.num_experts
    if isinstance(trace, TokensTrace):
        r = trace.step(step)
        T = r.num_tokens
        home = home_gpus(T, num_gpus, r.rank)
        home_tokens = np.bincount(home, minlength=num_gpus).astype(np.float64)
        scale = _scale(T, tokens_per_step)
        src = source_counts(r.experts, home, num_gpus, E)
        src *= scale                        # in place: the array is large, and its layout is kept
        return StepLoads(step, T * scale, scale, home_tokens * scale, src, r.experts, home)
    T = int(trace.tokens_per_step[step])
    home_tokens = np.bincount(home_gpus(T, num_gpus), minlength=num_gpus).astype(np.float64)
    frac = home_tokens / max(T, 1)
    scale = _scale(T, tokens_per_step)
    # the same expert mix on every GPU: its [L, G, E] assignments are made only if a strategy asks for them
    return StepLoads(step, T * scale, scale, home_tokens * scale, None, home_frac=frac,
                     mix_counts=trace.counts_range(step, step + 1)[0] * scale)


def _scale(num_tokens: int, tokens_per_step: int | None) -> float:
    return 1.0 if tokens_per_step is None or num_tokens == 0 else tokens_per_step / num_tokens


class StepFeed:
    """The loads of the test steps (trace steps ``first`` on), each computed once: the run loop takes
    them in order (:meth:`take`), and a strategy that looks ahead (the oracle) reads the same
    objects (:meth:`ahead`). Only steps looked ahead of the run loop are kept."""

    def __init__(self, trace: TokensTrace | CountsTrace, first: int, num_gpus: int,
                 tokens_per_step: int | None = None) -> None:
        self.trace, self.first, self.num_gpus, self.tokens_per_step = trace, first, num_gpus, tokens_per_step
        self._kept: dict[int, StepLoads] = {}

    def ahead(self, i: int) -> StepLoads | None:
        """Test step ``i``'s loads (None past the end of the trace), kept until :meth:`take` takes it."""
        if self.first + i >= self.trace.num_steps:
            return None
        if i not in self._kept:
            self._kept[i] = step_loads(self.trace, self.first + i, self.num_gpus, self.tokens_per_step)
        return self._kept[i]

    def take(self, i: int) -> StepLoads:
        """Test step ``i``'s loads for the run loop; steps before it are forgotten."""
        for k in [k for k in self._kept if k < i]:
            del self._kept[k]
        return self._kept.pop(i, None) or step_loads(self.trace, self.first + i, self.num_gpus, self.tokens_per_step)


def counts_view(trace: TokensTrace | CountsTrace) -> CountsTrace:
    """The trace seen as per-expert counts: a counts trace itself (kept where it is, in memory or in
    its file), a tokens trace's counted step by step as first read
    (:class:`~moe_gps.trace.data.TokenCounts`)."""
    return trace if isinstance(trace, CountsTrace) else as_counts_trace(trace, TokenCounts(trace))


def as_counts_trace(trace: TokensTrace | CountsTrace, counts: np.ndarray) -> CountsTrace:
    """The same trace seen as per-expert counts (for predictors that read nothing else)."""
    if isinstance(trace, CountsTrace):
        return trace
    import dataclasses

    return CountsTrace(dataclasses.replace(trace.meta, kind="counts", tokens_per_step=None), counts)
