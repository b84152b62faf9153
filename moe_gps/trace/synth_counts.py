"""Seeded synthetic counts traces: per-expert loads of long runs, fast at any scale.

The counts kind draws the loads the tokens kind's routing model implies, without drawing
tokens (:mod:`moe_gps.trace.synth` documents the model and the profiles). For step s and
layer l:

* the popularity logits are the tokens model's, ``pop[s, l] = base[l] + w[s, l]``, with
  the same ``base`` for the same seed and the same mean-reverting drift ``w``;
* a token takes k of E experts without replacement, expert e with probability
  ``pi[s, l, e] = min(1, c * softmax(pop[s, l])[e])``, c set so that the pi sum to k
  (water-filling: no expert can be taken by more than every token);
* the step's ``top_k * tokens_per_step`` (token, expert) assignments are one multinomial
  draw with probabilities ``pi / k``: every layer sums to exactly ``top_k * tokens``, and
  expert e gets ``tokens * pi[e]`` on average. An expert drawn above the step's tokens (a
  token takes an expert once) is cut to them, its excess drawn again over the others
  (:func:`cap_at_tokens`).

Per-token effects (token and layer affinity) have no counts to show, so those profile
parameters do not apply. Work is vectorised over blocks of steps: 10^4 steps at
DeepSeek-V3 scale (58 layers x 256 experts) take seconds, and a block at a time is all
that is held, so :func:`counts_blocks` can feed :class:`~moe_gps.trace.writer.CountsWriter`
in bounded memory.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from moe_gps.trace.data import CountsTrace
from moe_gps.trace.meta import TraceMeta
from moe_gps.trace.synth import SynthProfile, base_popularity, check_logits, resolve, synth_meta

#: steps drawn at a time
BLOCK_STEPS = 256


def inclusion(pop: np.ndarray, k: int) -> np.ndarray:
    """Probability that a token takes each expert: pop [..., E] logits -> [..., E], summing to k.

    ``min(1, c * softmax(pop))`` with c water-filled so that the sum is k: the experts capped at 1
    are taken by every token, and the others share what is left, ``k - capped``, as the softmax of
    their own logits. That softmax is taken over the uncapped experts alone (shifted by their largest
    logit), so that logits far apart (extreme skew) give the limit, each of the k most popular experts
    taken by every token, instead of 0 / 0.
    """
    capped = np.zeros(pop.shape, dtype=bool)
    pi = k * _softmax(pop, capped)
    for _ in range(k):
        now = capped | (pi > 1.0)
        if (now == capped).all():
            break
        capped = now
        left = k - capped.sum(axis=-1, keepdims=True)
        pi = np.where(capped, 1.0, left * _softmax(pop, capped))
    return np.minimum(pi, 1.0)


def _softmax(pop: np.ndarray, left_out: np.ndarray) -> np.ndarray:
    """softmax over the last axis of the logits not ``left_out`` (0 where left out; all 0 where all are)."""
    z = np.where(left_out, -np.inf, pop)
    top = z.max(axis=-1, keepdims=True)
    w = np.exp(z - np.where(np.isfinite(top), top, 0.0))
    total = w.sum(axis=-1, keepdims=True)
    return w / np.where(total > 0, total, 1.0)


def counts_meta(profile: str | SynthProfile = "mixtral-mmlu", num_steps: int = 64, tokens_per_step: int = 512,
                seed: int = 0, **overrides) -> tuple[SynthProfile, TraceMeta]:
    """(profile, metadata) of the counts trace :func:`counts_blocks` draws with the same arguments."""
    p = resolve(profile, num_steps, tokens_per_step, overrides)
    return p, synth_meta("counts", p, seed, num_steps, tokens_per_step, "moe_gps.trace.synth_counts")


def counts_blocks(p: SynthProfile, num_steps: int, tokens_per_step: int, seed: int = 0,
                  block_steps: int = BLOCK_STEPS) -> Iterator[np.ndarray]:
    """The counts, int64 [<= block_steps, layers, experts] at a time, in step order (deterministic for
    (profile, sizes, seed); the block size does not change the numbers)."""
    rng = np.random.default_rng(seed)
    base = base_popularity(p, rng)                       # [L, E]
    walk_rng = np.random.default_rng([seed, 1])          # drift, then draws: independent streams
    draw_rng = np.random.default_rng([seed, 2])
    L, E, k = p.num_layers, p.num_experts, p.top_k
    walk = np.zeros((L, E))
    n = k * tokens_per_step
    for lo in range(0, num_steps, block_steps):
        m = min(block_steps, num_steps - lo)
        noise = walk_rng.standard_normal((m, L, E))
        pop = np.empty((m, L, E))
        with np.errstate(over="ignore", invalid="ignore"):
            for i in range(m):
                walk = p.drift_memory * walk + p.drift * noise[i]
                pop[i] = base + walk
        check_logits(pop, p, "the popularity logits (base + drift)", ("popularity_sigma", "drift"))
        share = inclusion(pop, k) / k                    # [m, L, E], sums to 1
        share /= share.sum(axis=-1, keepdims=True)
        counts = draw_rng.multinomial(n, share).astype(np.int64, copy=False)
        yield cap_at_tokens(counts, tokens_per_step, share, seed, lo)


def cap_at_tokens(counts: np.ndarray, tokens: int, share: np.ndarray, seed: int, first_step: int) -> np.ndarray:
    """``counts`` [m, L, E] with no expert above the step's ``tokens`` (a token takes an expert once): the
    excess of an expert drawn above it goes, by a multinomial draw, to the experts below it in proportion to
    their share [m, L, E]. Each (step, layer) draws from its own stream, so the block size does not change
    the numbers."""
    for i, layer in np.argwhere((counts > tokens).any(axis=2)):
        rng = np.random.default_rng([seed, 3, first_step + int(i), int(layer)])
        row = counts[i, layer]
        while (row > tokens).any():
            excess = int((row - tokens).clip(min=0).sum())
            row = np.minimum(row, tokens)
            room = np.where(row < tokens, share[i, layer], 0.0)
            row = row + rng.multinomial(excess, room / room.sum())
        counts[i, layer] = row
    return counts


def synthesize_counts(profile: str | SynthProfile = "mixtral-mmlu", num_steps: int = 64,
                      tokens_per_step: int = 512, seed: int = 0, **overrides) -> CountsTrace:
    """A counts trace [num_steps, layers, experts] from a profile, in memory (see the module docstring)."""
    p, meta = counts_meta(profile, num_steps, tokens_per_step, seed, **overrides)
    return CountsTrace(meta, np.concatenate(list(counts_blocks(p, num_steps, tokens_per_step, seed))))
