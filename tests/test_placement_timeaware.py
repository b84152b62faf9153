"""The ``timeaware`` planner: replicas only where they lower the predicted time."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_gps.errors import UserError
from moe_gps.placement import Placement, plan_placement
from moe_gps.placement.layouts import contiguous
from moe_gps.placement.timeaware import home_layers, new_pairs


class ReadPlusTokens:
    """A toy time model: a GPU takes ``read`` seconds per slot with tokens plus ``per_token`` per
    token; the layer takes its slowest GPU."""

    def __init__(self, read: float, per_token: float, num_gpus: int) -> None:
        self.read, self.per_token, self.G = read, per_token, num_gpus

    def gpu(self, slot_exp, slot_tokens):
        n, P = slot_tokens.shape
        t = np.where(slot_tokens > 0, self.read + self.per_token * slot_tokens, 0.0)
        return t.reshape(n, self.G, P // self.G).sum(axis=2)

    def evaluate(self, slot_exp, slot_tokens, layers):
        g = self.gpu(slot_exp, slot_tokens)
        return g.max(axis=1), g


def predicted(p, loads, model):
    return model.gpu(p.phy2log, p.slot_loads(loads)).max(axis=1)


def home_time(loads, N, S, model):
    base = contiguous(*loads.shape, N, S)
    tok = np.where(base >= 0, np.take_along_axis(loads, np.maximum(base, 0), axis=1), 0.0)
    return model.gpu(base, tok).max(axis=1)


SKEWED = np.array([[400.0, 300, 20, 10, 10, 10, 5, 5], [50, 50, 50, 50, 50, 50, 50, 50]])


def test_weight_reads_that_cost_more_than_balance_saves_leave_slots_unused():
    model = ReadPlusTokens(read=1.0, per_token=1e-3, num_gpus=4)       # a replica's read: 1000 tokens
    p = plan_placement(SKEWED, 4, 4, "timeaware", cost=model)
    home = contiguous(2, 8, 4, 3) >= 0
    assert (p.replica_share[~home] == 0).all()                             # every redundant slot unused
    assert predicted(p, SKEWED, model) == pytest.approx(home_time(SKEWED, 4, 3, model))
    assert p.meta["options"]["unused_slots"] == 8


def test_cheap_replicas_balance_the_hot_gpu():
    model = ReadPlusTokens(read=0.0, per_token=1e-3, num_gpus=4)
    p = plan_placement(SKEWED, 4, 4, "timeaware", cost=model)
    t = predicted(p, SKEWED, model)
    # layer 0: 760 tokens over 4 GPUs, the hot GPU held 700; layer 1 is even already
    assert t[0] < 0.3 * home_time(SKEWED, 4, 3, model)[0]
    assert t[1] == pytest.approx(0.1)
    assert p.gpu_loads(SKEWED)[0].max() == pytest.approx(190.0, rel=0.02)
    # a plan balanced on token counts (EPLB) is no faster by this model
    assert t[0] <= predicted(plan_placement(SKEWED, 4, 4, "eplb"), SKEWED, model)[0] + 1e-12


def test_copy_penalty_and_resharing():
    model = ReadPlusTokens(read=0.0, per_token=1e-3, num_gpus=4)
    first = plan_placement(SKEWED, 4, 4, "timeaware", cost=model, balanced=False)
    assert home_layers(first, contiguous(2, 8, 4, 3), 4).all()
    # the hot expert moves: with copies forbidden only shares change, and no slot is rewritten
    moved = SKEWED[:, ::-1].copy()
    again = plan_placement(moved, 4, 4, "timeaware", previous=first, cost=model, copy_penalty_s=np.inf)
    assert np.array_equal(again.phy2log, first.phy2log) and not np.allclose(again.replica_share,
                                                                            first.replica_share)
    assert predicted(again, moved, model)[0] <= home_time(moved, 4, 3, model)[0]
    assert new_pairs(again.phy2log, first, 4).sum() == 0
    # a copy penalty above any saving keeps the replicas it has; none lets it re-plan freely
    dear = plan_placement(moved, 4, 4, "timeaware", previous=first, cost=model, copy_penalty_s=10.0)
    assert new_pairs(dear.phy2log, first, 4).sum() == 0
    free = plan_placement(moved, 4, 4, "timeaware", previous=first, cost=model, copy_penalty_s=0.0)
    assert new_pairs(free.phy2log, first, 4).sum() > 0
    assert predicted(free, moved, model)[0] < predicted(again, moved, model)[0]


class Asked(ReadPlusTokens):
    """ReadPlusTokens that records which layers it was asked about."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.layers: set[int] = set()

    def evaluate(self, slot_exp, slot_tokens, layers):
        self.layers.update(int(x) for x in layers)
        return super().evaluate(slot_exp, slot_tokens, layers)


def test_resharing_without_copies_plans_only_the_layers_in_the_static_layout():
    model = ReadPlusTokens(read=0.0, per_token=1e-3, num_gpus=4)
    at_home = plan_placement(SKEWED, 4, 4, "timeaware", cost=model, balanced=False)
    balanced = plan_placement(SKEWED, 4, 4, "eplb")
    mixed = Placement(np.stack([at_home.phy2log[0], balanced.phy2log[1]]), 4, 8,
                      np.stack([at_home.replica_share[0], balanced.replica_share[1]]), allow_colocated=True)
    moved = SKEWED[:, ::-1].copy()
    asked = Asked(0.0, 1e-3, 4)
    again = plan_placement(moved, 4, 4, "timeaware", previous=mixed, cost=asked, copy_penalty_s=np.inf)
    assert asked.layers == {0}                                   # layer 1 is not in the static layout: kept
    assert np.array_equal(again.phy2log[1], balanced.phy2log[1])
    assert np.array_equal(again.replica_share[1], balanced.replica_share[1])
    alone = plan_placement(moved, 4, 4, "timeaware", previous=at_home, cost=model, copy_penalty_s=np.inf)
    assert np.array_equal(again.phy2log[0], alone.phy2log[0])   # layer 0 re-split as if planned with the rest
    assert np.array_equal(again.replica_share[0], alone.replica_share[0])


def test_needs_a_time_model():
    with pytest.raises(UserError, match="timeaware: needs a time model"):
        plan_placement(SKEWED, 4, 4, "timeaware")
    with pytest.raises(UserError, match="copy_penalty_s must be >= 0"):
        plan_placement(SKEWED, 4, 4, "timeaware", cost=ReadPlusTokens(0, 1, 4), copy_penalty_s=-1)


@settings(max_examples=60, deadline=None)
@given(N=st.sampled_from([2, 3, 4]), extra=st.integers(1, 3), E=st.sampled_from([4, 6, 8]),
       read=st.floats(0, 2), seed=st.integers(0, 10_000))
def test_never_predicted_slower_than_no_duplication(N, extra, E, read, seed):
    S = -(-E // N) + extra
    R = N * S - E
    rng = np.random.default_rng(seed)
    loads = rng.gamma(0.5, 100.0, size=(3, E)) * rng.integers(0, 2, size=(3, 1))
    model = ReadPlusTokens(read=read, per_token=1e-2, num_gpus=N)
    for balanced in (True, False):
        p = plan_placement(loads, N, R, "timeaware", cost=model, balanced=balanced)
        assert (predicted(p, loads, model) <= home_time(loads, N, S, model) + 1e-9).all()
        assert np.allclose(p.gpu_loads(loads).sum(axis=1), loads.sum(axis=1))
