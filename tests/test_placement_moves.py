"""The weight moves between two placements: per-slot actions, transfers and their sources, row copies."""

import numpy as np
import pytest

from moe_gps.placement.moves import KEEP, LOCAL, RECV, move_plan


def test_move_plan_unchanged_placement_moves_nothing():
    phy = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1]])
    plan = move_plan(phy, phy, 2)
    assert (plan.action == KEEP).all() and len(plan.transfers) == 0


def test_move_plan_local_copy_remote_transfer_and_duplicates():
    old = np.array([[0, 1, 2, 3, 4, 5]])          # rank 0: 0 1 2 | rank 1: 3 4 5
    new = np.array([[0, 2, 2, 5, 5, 3]])          # rank 0: 0 2 2 | rank 1: 5 5 3
    plan = move_plan(old, new, 2)
    assert plan.action[0, 0].tolist() == [KEEP, LOCAL, KEEP]
    assert plan.source[0, 0, 1] == 2               # copied from rank 0's slot 2
    assert plan.action[0, 1].tolist() == [LOCAL, LOCAL, LOCAL]   # a swap within rank 1
    assert plan.source[0, 1].tolist() == [2, 2, 0]
    assert len(plan.transfers) == 0
    new2 = np.array([[4, 4, 1, 0, 2, 3]])          # rank 0 needs expert 4 twice, held only by rank 1
    plan = move_plan(old, new2, 2)
    assert [(t.expert, t.src_rank, t.src_local, t.dst_rank) for t in plan.transfers] == \
        [(0, 0, 0, 1), (2, 0, 2, 1), (4, 1, 1, 0)]
    assert plan.action[0, 0].tolist() == [RECV, RECV, LOCAL]
    assert plan.source[0, 0, 0] == plan.source[0, 0, 1] == 2   # one transfer fills both slots


def test_move_plan_spreads_sources_over_replicas():
    old = np.array([[0, 1, 2, 0, 3, 4, 5, 6, 7, 1, 2, 3]])   # 4 ranks x 3 slots; expert 0 on ranks 0 and 1
    new = np.array([[1, 2, 3, 4, 5, 6, 7, 0, 1, 0, 2, 3]])   # ranks 2 and 3 now need expert 0
    plan = move_plan(old, new, 4)
    src = {(t.expert, t.dst_rank): t.src_rank for t in plan.transfers}
    assert src[(0, 2)] == 0 and src[(0, 3)] == 1             # one from each old replica
    assert all(t.src_rank != t.dst_rank for t in plan.transfers)
    assert all(old[0][t.src_rank * 3 + t.src_local] == t.expert for t in plan.transfers)


def test_move_plan_takes_sources_on_the_destinations_node():
    old = np.array([[0, 1, 2, 0, 3, 4, 5, 6, 7, 1, 2, 3]])   # 4 GPUs x 3 slots; expert 0 on GPUs 0 and 1
    new = np.array([[1, 2, 3, 4, 5, 6, 7, 0, 1, 0, 2, 3]])   # GPUs 2 and 3 now need expert 0
    # nodes {0, 2} and {1, 3}: each destination takes the replica on its own node
    plan = move_plan(old, new, 4, node_of=np.array([0, 1, 0, 1]))
    src = {(t.expert, t.dst_rank): t.src_rank for t in plan.transfers}
    assert src[(0, 2)] == 0 and src[(0, 3)] == 1
    # nodes {0, 3} and {1, 2}: the other way round
    plan = move_plan(old, new, 4, node_of=np.array([0, 1, 1, 0]))
    src = {(t.expert, t.dst_rank): t.src_rank for t in plan.transfers}
    assert src[(0, 2)] == 1 and src[(0, 3)] == 0


def test_row_copies_count_local_copies_second_slots_and_snapshots():
    old = np.array([[0, 1, 2, 3, 4, 5]])          # rank 0: 0 1 2 | rank 1: 3 4 5
    new = np.array([[4, 4, 1, 0, 2, 3]])          # rank 0: 4 4 1 | rank 1: 0 2 3
    plan = move_plan(old, new, 2)
    # rank 0: every old row is read after it is overwritten (slot 1 by the local copy, 0 and 2 by sends): 3
    # snapshots, the local copy and expert 4's second slot; rank 1: slot 0 (local copy) and slot 1 (sent)
    assert plan.snapshots().tolist() == [[[True, True, True], [True, True, False]]]
    assert plan.row_copies().tolist() == [[5, 3]]
    # after the sends (background transfers): only the local copies' sources
    assert plan.snapshots(sends=False).tolist() == [[[False, True, False], [True, False, False]]]
    assert plan.row_copies(sends=False).tolist() == [[3, 2]]
    # a new slot count writes a new buffer: no snapshots, every kept slot copied
    grown = np.array([[0, 1, 2, 2, 3, 4, 5, 5]])  # rank 0: 0 1 2 2 | rank 1: 3 4 5 5
    plan = move_plan(old, grown, 2)
    assert not plan.snapshots().any() and plan.row_copies().tolist() == [[4, 4]]


def test_move_plan_refuses_an_expert_without_an_old_replica_and_bad_nodes():
    old = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    with pytest.raises(ValueError, match="layer 0: expert 5 has no replica"):
        move_plan(old, np.array([[0, 1, 2, 5], [4, 5, 6, 7]]), 2)
    with pytest.raises(ValueError, match="node_of"):
        move_plan(old, old, 2, node_of=np.array([0, 2]))
    empty = move_plan(np.zeros((0, 4), dtype=np.int64), np.zeros((0, 4), dtype=np.int64), 2)
    assert len(empty.transfers) == 0 and empty.row_copies().shape == (0, 2)
