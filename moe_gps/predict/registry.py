"""Predictor names -> classes, and the factories that build them from names and params."""

from __future__ import annotations

import inspect

from moe_gps.errors import UserError
from moe_gps.options import check_options
from moe_gps.predict.base import DistributionPredictor, TokenPredictor
from moe_gps.predict.distribution import (EMAPredictor, KalmanPredictor, OracleDistribution, PreviousPredictor,
                                          ProfilePredictor, TokenHistogramPredictor, WindowPredictor)
from moe_gps.predict.mlp import MLPTokens
from moe_gps.predict.synthetic import CurveTokenPredictor, SyntheticDistributionPredictor, SyntheticTokenPredictor
from moe_gps.predict.tokens import (MostFrequentTokens, OracleTokens, PositionTokens, PrevLayerTokens,
                                    TokenIdTokens)

#: distribution-only predictors by name (the evaluation runs all but "synthetic" by default)
DISTRIBUTION_PREDICTORS: dict[str, type[DistributionPredictor]] = {
    c.name: c for c in (OracleDistribution, ProfilePredictor, PreviousPredictor, WindowPredictor, EMAPredictor,
                        KalmanPredictor, TokenHistogramPredictor, SyntheticDistributionPredictor)
}

#: token-to-expert predictors by name (the evaluation runs all but "synthetic" by default)
TOKEN_PREDICTORS: dict[str, type[TokenPredictor]] = {
    c.name: c for c in (OracleTokens, MostFrequentTokens, TokenIdTokens, PositionTokens, PrevLayerTokens,
                        MLPTokens, SyntheticTokenPredictor, CurveTokenPredictor)
}

#: the what-if predictors: they read the true routing and take their accuracy as a parameter
WHAT_IF = ("synthetic", "curve")

#: what `moe-gps predict evaluate` runs when no --predictors are given
DEFAULT_DISTRIBUTION = tuple(n for n in DISTRIBUTION_PREDICTORS if n not in WHAT_IF)
DEFAULT_TOKEN = tuple(n for n in TOKEN_PREDICTORS if n not in WHAT_IF)


def _make(table: dict, kind: str, name: str, params: dict):
    if name not in table:
        raise UserError(f"unknown {kind} predictor {name!r} (choose from {', '.join(table)})")
    cls = table[name]
    sig = inspect.signature(cls.__init__)
    accepted = [p for p in sig.parameters if p != "self"]
    bad = sorted(set(params) - set(accepted))
    if bad:
        raise UserError(f"{kind} predictor {name!r} has no parameter(s) {', '.join(bad)} "
                        f"(it takes {', '.join(accepted) or 'none'})")
    check_options(cls, params, f"{kind} predictor {name!r}")
    return cls(**params)


def make_distribution_predictor(name: str, **params) -> DistributionPredictor:
    """A distribution-only predictor by name (see DISTRIBUTION_PREDICTORS), e.g. ("ema", alpha=0.3)."""
    return _make(DISTRIBUTION_PREDICTORS, "distribution", name, params)


def make_token_predictor(name: str, **params) -> TokenPredictor:
    """A token-to-expert predictor by name (see TOKEN_PREDICTORS), e.g. ("prev-layer")."""
    return _make(TOKEN_PREDICTORS, "token", name, params)
