"""The trace seen as a stream of tokens that serving iterations take their routing from.

The trace's test tokens (every token of the steps after the training steps, in trace
order) form one stream. Each iteration takes the next T tokens, T being the tokens the
scheduler put in it, so consecutive tokens keep the trace's token-level correlations;
when the stream ends it starts again from its first token (the run's notes say how many
times). A strategy is asked about an iteration as about the test step that holds the
iteration's first token (docs/serving.md, "Routing and strategies").
"""

from __future__ import annotations

import numpy as np

from moe_gps.errors import UserError
from moe_gps.trace.data import CountsTrace, TokensTrace
from sim.loads import StepLoads, source_counts


class TokenStream:
    """Test tokens of ``trace`` (rows from step ``train_steps`` on), taken in order, wrapping around."""

    def __init__(self, trace: TokensTrace | CountsTrace, train_steps: int, trace_name: str = "trace") -> None:
        if not isinstance(trace, TokensTrace):
            raise UserError(f"{trace_name}: serving needs a tokens trace (per-token routing) to route each "
                            "iteration's tokens; this trace has per-expert counts only")
        self.trace = trace
        self.offsets = trace.step_offsets
        self.train_steps = train_steps
        self.first = int(trace.step_offsets[train_steps])
        self.end = trace.num_tokens
        if self.end <= self.first:
            raise UserError(f"{trace_name}: no test tokens after the {train_steps} training steps")
        self.pos = self.first
        self.taken = 0

    @property
    def size(self) -> int:
        """Tokens in one pass of the stream."""
        return self.end - self.first

    @property
    def laps(self) -> float:
        """How many times the stream has been used (1.0: every test token once)."""
        return self.taken / self.size

    def take(self, n: int) -> np.ndarray:
        """int64 [n]: the trace rows of the next ``n`` tokens."""
        start = self.pos
        if start + n <= self.end:
            rows = np.arange(start, start + n, dtype=np.int64)
        else:
            rows = self.first + (np.arange(start - self.first, start - self.first + n, dtype=np.int64) % self.size)
        self.pos = self.first + (start - self.first + n) % self.size
        self.taken += n
        return rows

    def test_step(self, row: int) -> int:
        """Index among the test steps (0 = step ``train_steps``) of the step holding trace row ``row``."""
        return int(np.searchsorted(self.offsets, row, side="right")) - 1 - self.train_steps

    def loads(self, rows: np.ndarray, home: np.ndarray, num_gpus: int) -> StepLoads:
        """The true routing of an iteration made of trace rows ``rows`` (int64 [T]) whose tokens start on
        GPUs ``home`` (int64 [T]), as the strategies and the cost model read it."""
        experts = self.trace.experts[rows]
        E = self.trace.meta.num_experts
        src = source_counts(experts, home, num_gpus, E)
        home_tokens = np.bincount(home, minlength=num_gpus).astype(np.float64)
        step = self.train_steps + self.test_step(int(rows[0]))
        return StepLoads(step, float(len(rows)), 1.0, home_tokens, src, experts, home, rows)
