"""Regrouping a trace into steps of another size, from its own tokens.

A trace recorded at one batch size says little about another by multiplying its counts:
every step would keep the sampling noise of its own few tokens. Regrouping instead cuts
the trace's own tokens, in trace order, into steps of ``N`` tokens: consecutive small
steps are concatenated, a large step is split, and every (token, layer, expert)
assignment keeps its order, token id, sequence, position, rank and gate weights. The
tokens after the last whole step of ``N`` are left out (said in the provenance, whose
``regrouped`` entry records the regrouping in numbers).

A counts trace has no tokens to cut: it regroups only when ``N`` is a whole multiple of
its (constant) tokens per step, by summing consecutive steps.

:func:`regroup` does it; :func:`regroup_or_scale` is the simulator's rule: regroup when
that leaves at least :data:`MIN_STEPS` steps and more than the given ``train_steps``, else keep
the trace (and the simulator scales each step's counts to ``N``, with a warning saying why).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moe_gps.errors import UserError
from moe_gps.trace.data import COUNT_CHUNK_ELEMENTS, OPTIONAL_TOKEN_FIELDS, CountsTrace, TokensTrace

#: regrouped steps the simulator needs (1 to fit predictors, 8 to simulate, with margin)
MIN_STEPS = 12
#: provenance entries that describe a trace's steps (a generator's sizes, an importer's grouping of
#: forward passes into steps): a regrouping moves them into its own record
STEP_PROVENANCE = ("num_steps", "tokens_per_step", "step_grouping")


def regrouped_steps(trace: TokensTrace | CountsTrace, tokens_per_step: int) -> int:
    """How many whole steps of ``tokens_per_step`` tokens :func:`regroup` would make (0: cannot)."""
    if isinstance(trace, TokensTrace):
        return int(trace.num_tokens // tokens_per_step)
    tps = trace.tokens_per_step
    if len(tps) == 0 or np.any(tps != tps[0]) or tps[0] <= 0 or tokens_per_step % int(tps[0]):
        return 0
    return int(trace.num_steps // (tokens_per_step // int(tps[0])))


def regroup(trace: TokensTrace | CountsTrace, tokens_per_step: int) -> TokensTrace | CountsTrace:
    """The trace as consecutive steps of exactly ``tokens_per_step`` tokens (module docstring)."""
    n = int(tokens_per_step)
    if n < 1:
        raise UserError(f"tokens per step must be >= 1, got {tokens_per_step}")
    steps = regrouped_steps(trace, n)
    if steps < 1:
        tps = trace.tokens_per_step
        if int(tps.sum()) < n:
            raise UserError(f"the trace holds {int(tps.sum())} tokens, fewer than one step of {n}")
        if len(tps) and np.any(tps != tps[0]):
            raise UserError(f"a counts trace regroups only into whole multiples of its steps, which must then all "
                            f"hold the same tokens; these hold {describe_tokens_per_step(trace)}")
        raise UserError(f"a counts trace regroups only into whole multiples of its steps "
                        f"({describe_tokens_per_step(trace)}); {n} is not one")
    prov = {**trace.meta.provenance, "regrouped": regroup_record(trace, n, steps)}
    for name in STEP_PROVENANCE:
        prov.pop(name, None)
    if isinstance(trace, CountsTrace):
        per = n // int(trace.tokens_per_step[0])
        L, E = trace.meta.num_layers, trace.meta.num_experts
        merged = np.empty((steps, L, E), dtype=np.int64)
        block = max(1, COUNT_CHUNK_ELEMENTS // (per * L * E))              # merged steps read at a time
        for lo in range(0, steps, block):
            hi = min(steps, lo + block)
            merged[lo:hi] = trace.counts_range(lo * per, hi * per).reshape(hi - lo, per, L, E).sum(axis=1)
        meta = dataclasses.replace(trace.meta, provenance=prov, tokens_per_step=[n] * steps)
        return CountsTrace(meta, merged)
    rows = steps * n
    cut = lambda a: None if a is None else a[:rows]  # noqa: E731
    meta = dataclasses.replace(trace.meta, provenance=prov)
    return TokensTrace(meta, trace.experts[:rows], np.arange(steps + 1, dtype=np.int64) * n, cut(trace.weights),
                       **{f: cut(getattr(trace, f)) for f in OPTIONAL_TOKEN_FIELDS})


def regroup_record(trace: TokensTrace | CountsTrace, n: int, steps: int) -> dict:
    """The provenance entry ``regrouped`` of :func:`regroup` into ``steps`` steps of ``n`` tokens: its numbers,
    the steps it was made from (tokens per step as min/median/max), the provenance entries that described
    those steps (moved here from the top level, where they no longer hold), and an earlier regrouping's record
    (under ``earlier``)."""
    tps = trace.tokens_per_step                                         # [>= 1 steps]
    med = float(np.median(tps))
    record = {"tokens_per_step": n, "num_steps": steps, "from_steps": int(trace.num_steps),
              "from_tokens_per_step": {"min": int(tps.min()), "median": int(med) if med.is_integer() else med,
                                       "max": int(tps.max())},
              "tokens_left_out": int(tps.sum() - steps * n)}
    prov = trace.meta.provenance
    before = {name: prov[name] for name in STEP_PROVENANCE if name in prov}
    if before:
        record["from_provenance"] = before
    if "regrouped" in prov:
        record["earlier"] = prov["regrouped"]
    return record


def describe_tokens_per_step(trace: TokensTrace | CountsTrace) -> str:
    """The trace's tokens per step in words: ``512``, or ``100/256/512 (min/median/max)``."""
    tps = trace.tokens_per_step
    if len(tps) == 0:
        return "no steps"
    lo, med, hi = int(tps.min()), int(np.median(tps)), int(tps.max())
    return f"{lo}" if lo == hi else f"{lo}/{med}/{hi} (min/median/max)"


def regroup_note(trace: TokensTrace | CountsTrace, tokens_per_step: int) -> str:
    """What :func:`regroup` of ``trace`` into steps of ``tokens_per_step`` does, in one sentence."""
    n = int(tokens_per_step)
    steps = regrouped_steps(trace, n)
    left = int(trace.tokens_per_step.sum() - steps * n)
    tail = f"; the last {left} tokens are left out" if left else ""
    return (f"regrouped the trace's {trace.num_steps} step{'s' if trace.num_steps != 1 else ''} of "
            f"{describe_tokens_per_step(trace)} tokens into {steps} steps of {n}, in trace order{tail}")


def steps_needed(train_steps: int | None = None) -> int:
    """The fewest regrouped steps the simulator regroups into: :data:`MIN_STEPS`, and one more than a
    given ``train_steps`` (so that some step is left to simulate)."""
    return MIN_STEPS if train_steps is None else max(MIN_STEPS, int(train_steps) + 1)


def regroups(trace: TokensTrace | CountsTrace, tokens_per_step: int, train_steps: int | None = None) -> bool:
    """The simulator's rule: ``--tokens-per-step`` regroups ``trace`` (else it scales each step's counts)
    when that makes at least :func:`steps_needed` steps."""
    return regrouped_steps(trace, tokens_per_step) >= steps_needed(train_steps)


def regroup_or_scale(trace: TokensTrace | CountsTrace, tokens_per_step: int | None,
                     train_steps: int | None = None):
    """The simulator's rule for ``--tokens-per-step``: -> (trace, note, warning).

    Regroup where :func:`regroups` (note says so); otherwise return
    the trace as it is (the simulator then scales each step's counts to ``tokens_per_step``)
    and a warning with the reason. Without ``tokens_per_step``: the trace, no note, no warning.
    """
    if tokens_per_step is None:
        return trace, None, None
    n = int(tokens_per_step)
    have = describe_tokens_per_step(trace)
    steps = regrouped_steps(trace, n)
    if regroups(trace, n, train_steps):
        return regroup(trace, n), regroup_note(trace, n), None
    if steps >= MIN_STEPS:
        why = (f"regrouping makes {steps} steps of {n}, and train_steps={train_steps} would leave none of them to "
               "simulate")
    elif isinstance(trace, TokensTrace):
        need = steps_needed(train_steps)
        why = (f"the trace holds {trace.num_tokens} tokens, {steps} steps of {n} (regrouping needs "
               f"{need}, {need * n} tokens)")
    elif steps:
        why = f"the counts trace makes only {steps} steps of {n} (regrouping needs {steps_needed(train_steps)})"
    else:
        why = f"a counts trace regroups only into whole multiples of its steps ({have} tokens)"
    return trace, None, (f"--tokens-per-step {n}: {why}; each step's expert counts are scaled from its {have} "
                         f"tokens instead, {scaling_noise(trace.tokens_per_step, n)}")


def scaling_noise(tokens_per_step: np.ndarray, n: int) -> str:
    """What scaling steps of ``tokens_per_step`` tokens to ``n`` does to their sampling noise: a step
    smaller than ``n`` keeps its larger noise, a larger one gets less than a real step of ``n`` has."""
    lo, hi = (int(tokens_per_step.min()), int(tokens_per_step.max())) if len(tokens_per_step) else (n, n)
    smaller, larger = lo < n, hi > n
    if smaller and larger:
        return (f"which keeps the sampling noise of the steps smaller than {n} tokens and gives the larger ones "
                f"less sampling noise than a real step of {n} tokens")
    if smaller:
        return "which keeps the sampling noise of the smaller step"
    if larger:
        return f"which has less sampling noise than a real step of {n} tokens"
    return f"which changes nothing: every step holds {n} tokens"


def decode_shaped(trace: TokensTrace | CountsTrace) -> str | None:
    """Why the trace looks like decode (one new token per sequence per step), or None.

    From the metadata (``provenance.phase``) or, for a tokens trace with a ``seq`` column, from its
    shape: no step holds two tokens of one sequence, and some sequence appears in several steps."""
    phase = trace.meta.provenance.get("phase") if isinstance(trace.meta.provenance, dict) else None
    if phase == "decode":
        return "its metadata says phase: decode"
    if phase is not None or not isinstance(trace, TokensTrace) or trace.seq is None or trace.num_steps < 2:
        return None
    step = np.repeat(np.arange(trace.num_steps), np.diff(trace.step_offsets))
    key = step.astype(np.int64) * (int(trace.seq.max()) + 1) + trace.seq
    if len(np.unique(key)) != len(key):
        return None
    if len(np.unique(trace.seq)) == len(trace.seq):
        return None
    return "one token per sequence per step"
