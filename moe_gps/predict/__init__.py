"""Predictors of MoE routing, both kinds, with their metrics and costs.

>>> from moe_gps.predict import make_distribution_predictor, rollout_distribution
>>> dp = make_distribution_predictor("ema", alpha=0.3)
>>> shares = rollout_distribution(dp, trace, train_steps=32)   # [steps - 32, layers, experts]
>>> from moe_gps.predict import make_token_predictor, rollout_tokens
>>> tp = make_token_predictor("prev-layer")
>>> pred = rollout_tokens(tp, trace, train_steps=32)            # int16 [N_test, layers, k]
>>> tp.cost().flops_per_token                                   # per token, per MoE layer

Distribution-only predictors (:data:`DISTRIBUTION_PREDICTORS`) guess each layer's load
share of the next step; token-to-expert predictors (:data:`TOKEN_PREDICTORS`) guess each
token's top-k experts. Definitions, metrics and cost formulas: docs/predictors.md.
"""

from moe_gps.predict.base import (DistributionPredictor, MissingFeature, PredictorCost, TokenPredictor,
                                  default_train_steps, iter_rollout_distribution, rollout_distribution,
                                  rollout_tokens, split_tokens)
from moe_gps.predict.evaluate import Evaluation, PredictorReport, evaluate, parse_predictor_names
from moe_gps.predict.metrics import (distribution_errors, planned_balancedness, predicted_counts,
                                     static_balancedness, token_hits)
from moe_gps.predict.mlp import torch_available
from moe_gps.predict.registry import (DEFAULT_DISTRIBUTION, DEFAULT_TOKEN, DISTRIBUTION_PREDICTORS,
                                      TOKEN_PREDICTORS, make_distribution_predictor, make_token_predictor)
from moe_gps.predict.synthetic import (PLACEMENTS, AccuracyOverheadCurve, SyntheticDistributionPredictor,
                                       SyntheticTokenPredictor, accuracy_overhead_curve, corrupt)

__all__ = [
    "DEFAULT_DISTRIBUTION", "DEFAULT_TOKEN", "DISTRIBUTION_PREDICTORS", "PLACEMENTS", "TOKEN_PREDICTORS",
    "AccuracyOverheadCurve", "DistributionPredictor", "Evaluation", "MissingFeature", "PredictorCost",
    "PredictorReport", "SyntheticDistributionPredictor", "SyntheticTokenPredictor", "TokenPredictor",
    "accuracy_overhead_curve", "corrupt", "default_train_steps", "distribution_errors", "evaluate",
    "iter_rollout_distribution", "make_distribution_predictor", "make_token_predictor", "parse_predictor_names",
    "planned_balancedness", "predicted_counts", "rollout_distribution", "rollout_tokens", "split_tokens",
    "static_balancedness",
    "token_hits", "torch_available",
]
