"""Router traces: the format every part of MoE-GPS reads.

>>> from moe_gps.trace import load_trace
>>> trace = load_trace("traces/mixtral_mmlu.parquet")
>>> trace.counts().shape          # [steps, layers, experts]
>>> trace.step(0).experts.shape   # [tokens, layers, top_k]
"""

from moe_gps.trace.data import CountsTrace, StepRouting, TokensTrace, expert_counts
from moe_gps.trace.meta import SCHEMA_VERSION, TraceMeta
from moe_gps.trace.reader import iter_steps, load_trace, read_meta, validate_trace
from moe_gps.trace.writer import CountsWriter, TraceWriter, write_trace

__all__ = [
    "CountsTrace", "CountsWriter", "StepRouting", "TokensTrace", "TraceMeta", "TraceWriter", "SCHEMA_VERSION",
    "expert_counts", "iter_steps", "load_trace", "read_meta", "validate_trace", "write_trace",
]
