"""Token ids for each (step, rank): from a trace's token_id column, or a seeded generator.

A trace without token ids (a counts trace, or no ``token_id`` column) falls back to the
generator; the run's provenance says which source was used. (The trace recorder,
:mod:`runtime.record_hf`, refuses such a trace instead.)

Every rank runs ``batch_size`` sequences of ``seq_len`` tokens per step. The batch of
(step, rank) is a pure function of the config, so rank 0 can rebuild every rank's
input (token predictors need the whole step's ids before routing) without messages.

* **trace**: the trace's token ids, all steps concatenated, cut into consecutive
  chunks of ``batch_size * seq_len``; chunk ``step * ranks + rank`` (wrapping around
  at the end). Ids at or above the model's vocabulary are taken modulo its size.
* **generator**: Zipf-distributed ids (exponent ``zipf_exponent``) over the
  vocabulary, ``(zipf - 1) mod vocab``, from ``numpy.random.default_rng([seed, step, rank])``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.config import InputSection


@dataclass
class StepInput:
    """One rank's tokens of one step.

    token_id int64 [B, S]; seq int32 [B] global sequence ids; pos int32 [S] positions.
    """

    token_id: np.ndarray
    seq: np.ndarray
    pos: np.ndarray

    def flat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per token (row-major [B, S]): token_id int32, seq int32, pos int32 — each [B * S]."""
        B, S = self.token_id.shape
        return (self.token_id.reshape(-1).astype(np.int32), np.repeat(self.seq, S).astype(np.int32),
                np.tile(self.pos, B).astype(np.int32))


def trace_token_ids(path: str) -> np.ndarray | None:
    """The token ids of a trace, all steps concatenated (int64), or None for a trace without them (a counts
    trace, or no ``token_id`` column)."""
    from moe_gps.trace import load_trace
    from moe_gps.trace.data import TokensTrace
    trace = load_trace(path)
    if isinstance(trace, TokensTrace) and trace.token_id is not None and len(trace.token_id):
        return trace.token_id.astype(np.int64)
    return None


class TokenSource:
    """Builds :class:`StepInput` for any (step, rank); see the module docstring for the rules."""

    def __init__(self, cfg: InputSection, vocab_size: int, world_size: int) -> None:
        self.cfg, self.vocab_size, self.world_size = cfg, int(vocab_size), int(world_size)
        self.stream: np.ndarray | None = None
        self.description = f"seeded Zipf generator (exponent {cfg.zipf_exponent}, seed {cfg.seed})"
        self.clipped = False
        if cfg.trace:
            ids = trace_token_ids(cfg.trace)
            if ids is not None:
                self.clipped = bool((ids >= self.vocab_size).any())
                self.stream = ids % self.vocab_size
                self.description = (f"token ids of {cfg.trace} ({len(ids)} tokens"
                                    + (f", taken modulo the vocabulary of {self.vocab_size}" if self.clipped else "")
                                    + ")")
            else:
                self.description += f" ({cfg.trace} has no token ids)"

    @property
    def tokens_per_rank(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len

    def batch(self, step: int, rank: int) -> StepInput:
        B, S = self.cfg.batch_size, self.cfg.seq_len
        n = B * S
        if self.stream is not None:
            chunk = step * self.world_size + rank
            idx = (chunk * n + np.arange(n)) % len(self.stream)
            ids = self.stream[idx]
        else:
            rng = np.random.default_rng([self.cfg.seed, step, rank])
            ids = (rng.zipf(self.cfg.zipf_exponent, n) - 1) % self.vocab_size
        seq = (step * self.world_size + rank) * B + np.arange(B)
        return StepInput(ids.reshape(B, S).astype(np.int64), seq.astype(np.int32), np.arange(S, dtype=np.int32))

    def step_tokens(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The whole step's tokens, rank 0 first: token_id, seq, pos int32 [ranks * B * S]."""
        parts = [self.batch(step, r).flat() for r in range(self.world_size)]
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]
