"""Cost presets of the MoE-GPS paper's token-to-expert predictors, scaled to a model.

The paper predicts each token's experts before a layer's attention with a small network
on the token's hidden state. Two presets, per MoE layer (docs/predictors.md shows the
arithmetic for Mixtral 8x7B):

* ``paper-mlp``: an MLP ``h -> 128 s -> 64 s -> E`` with ``s = h / 4096`` (4096 -> 128 ->
  64 -> 8 for Mixtral). FLOPs per token ``2 (h d1 + d1 d2 + d2 E)``; its weights are read
  once per step; every token's hidden state is read and its E scores written.
* ``lstm``: an LSTM of width ``128 s`` over the tokens of each sequence, then a linear
  layer to the E scores. FLOPs per token ``2 (4 (h d + d d) + d E)``, and the recurrence
  makes one step per token of a sequence that no batching hides: ``serial_steps`` = the
  prompt length in prefill, 1 in decode, each a kernel launch (``step_latency_s``).
"""

from __future__ import annotations

from moe_gps.errors import UserError
from moe_gps.predict.base import PredictorCost

#: preset names for ``cost=`` in a token strategy's options
COST_PRESETS = ("paper-mlp", "lstm")


def cost_preset(name: str, hidden_size: int, num_experts: int, serial_steps: float, step_latency_s: float,
                weight_bytes: float = 2.0, activation_bytes: float = 2.0) -> PredictorCost:
    """The PredictorCost of preset ``name`` for a model of ``hidden_size`` and ``num_experts``.

    serial_steps: the LSTM's steps one after another (its sequence length); step_latency_s: seconds of one
    such step (a kernel launch). Both are ignored by ``paper-mlp``.
    """
    h, E = int(hidden_size), int(num_experts)
    s = h / 4096
    if name == "paper-mlp":
        d1, d2 = max(1, round(128 * s)), max(1, round(64 * s))
        params = h * d1 + d1 + d1 * d2 + d2 + d2 * E + E
        return PredictorCost(flops_per_token=2.0 * (h * d1 + d1 * d2 + d2 * E),
                             bytes_per_token=(h + E) * activation_bytes, fixed_bytes_per_step=params * weight_bytes,
                             state_bytes=params * weight_bytes,
                             note=f"the MoE-GPS paper's MLP {h}->{d1}->{d2}->{E} on the hidden state, "
                                  f"{params} parameters")
    if name == "lstm":
        d = max(1, round(128 * s))
        params = 4 * (h * d + d * d + d) + d * E + E
        return PredictorCost(flops_per_token=2.0 * (4 * (h * d + d * d) + d * E),
                             bytes_per_token=(h + E) * activation_bytes, fixed_bytes_per_step=params * weight_bytes,
                             state_bytes=params * weight_bytes, serial_steps=float(serial_steps),
                             step_latency_s=float(step_latency_s),
                             note=f"an LSTM of width {d} over each sequence ({h} inputs, {E} outputs), "
                                  f"{serial_steps:g} serial steps of {step_latency_s * 1e6:g} us")
    raise UserError(f"unknown predictor cost preset {name!r} (choose from {', '.join(COST_PRESETS)})")
