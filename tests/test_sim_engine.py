"""The SimPy event model against the closed form and against timelines worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from sim.engine import MARKS, EventModel, run_events
from sim.run import breakdown
from sim.work import Copies, StepWork, closed_form_layer_times

US = 1e-6


def work(pa, disp, ffn, comb, corr=None, copies=None, pred=None, link=None, host=0.0) -> StepWork:
    """A StepWork from [L, G] arrays in microseconds (predictor + attention given together; ``link``:
    the link part of dispatch and combine; ``host``: re-plan host time before the first layer)."""
    a = lambda x: np.asarray(x, dtype=float) * US  # noqa: E731
    pa = a(pa)
    pred = np.zeros_like(pa) if pred is None else a(pred)
    L, G = pa.shape
    lk = np.zeros((L, G)) if link is None else a(link)
    return StepWork(pred, pa - pred, a(disp), np.zeros((L, G)) if corr is None else a(corr), a(ffn), a(comb),
                    copies or Copies.empty(), np.ones((L, G)), np.ones((L, 4)), np.zeros(L), corr is not None,
                    dispatch_link=lk, combine_link=lk, replan_host=host * US)


def copies(rows) -> Copies:
    """rows: (layer, src, dst, microseconds)."""
    r = np.array(rows, dtype=float).reshape(-1, 4)
    return Copies(r[:, 0].astype(np.int64), r[:, 1].astype(np.int64), r[:, 2].astype(np.int64),
                  np.full(len(r), 1e6), r[:, 3] * US)


def layer_times(works, G, policy, **kw):
    tl = run_events(works, G, policy, **kw)
    return tl.column("end") - tl.column("start"), tl


@pytest.mark.parametrize("overlap", ["overlap", "critical", "async", "hidden"])
@pytest.mark.parametrize("G", [1, 4, 16])
def test_no_copies_matches_closed_form(G, overlap):
    rng = np.random.default_rng(G)
    L = 5
    r = lambda: rng.uniform(1, 100, (L, G))  # noqa: E731
    works = [work(r(), r(), r(), r()), work(r(), r(), r(), r(), corr=r(), pred=rng.uniform(0, 1, (L, G)))]
    t, _ = layer_times(works, G, overlap)
    closed = np.stack([closed_form_layer_times(w, overlap) for w in works])
    assert np.allclose(t, closed, rtol=1e-9, atol=0)
    # steps follow each other, layers too
    tl = run_events(works, G, overlap)
    starts = tl.column("start").ravel()
    assert np.allclose(starts[1:], tl.column("end").ravel()[:-1])


def test_copies_without_overlap_on_separate_ports_match_closed_form():
    G = 4
    pa, d, f, c = [[20, 10, 10, 10]] * 2, [[5] * 4] * 2, [[30, 10, 10, 10]] * 2, [[5] * 4] * 2
    w = work(pa, d, f, c, copies=copies([(0, 0, 1, 100), (0, 2, 3, 60), (1, 3, 0, 40)]))
    t, _ = layer_times([w], G, "critical")
    # layer 0: copies first (longest 100), then 20 + 5 + 30 + 5;  layer 1: 40 + 60
    assert t[0] == pytest.approx([160 * US, 100 * US])
    assert t[0] == pytest.approx(closed_form_layer_times(w, "critical"), rel=1e-9)


def test_copy_contends_with_dispatch_by_hand():
    # 2 GPUs; a 100 us copy GPU0 -> GPU1 starts with the layer, during attention (20 us on GPU 1);
    # the dispatch (5 us) must wait for the link until t=100, ends at 105; GPU 0's FFN (30 us)
    # ends at 135, GPU 1's (10 us, after its copy landed at 100) at 115; combine 135..140.
    w = work([[10, 20]], [[5, 5]], [[30, 10]], [[5, 5]], copies=copies([(0, 0, 1, 100)]))
    t, tl = layer_times([w], 2, "overlap")
    assert t[0, 0] == pytest.approx(140 * US)
    assert tl.marks[0, 0] == pytest.approx(np.array([0, 20, 105, 105, 135, 140]) * US)
    total, phases = breakdown(w, tl.marks[0])
    assert phases["copy"][0] == pytest.approx(80 * US)        # 140 - (20 + 5 + 30 + 5)
    assert sum(p[0] for p in phases.values()) == pytest.approx(total[0])
    # on the critical path: 100 + 20 + 5 + 30 + 5; hidden: the copy costs nothing
    assert layer_times([w], 2, "critical")[0][0, 0] == pytest.approx(160 * US)
    assert layer_times([w], 2, "hidden")[0][0, 0] == pytest.approx(60 * US)
    # the closed form assumes hidden copies and no contention, so it is below the event model
    assert closed_form_layer_times(w, "overlap")[0] == pytest.approx(60 * US)


def test_a_copy_on_other_links_does_not_delay_dispatch():
    # copy GPU2 -> GPU3 (50 us) overlaps; GPUs 0, 1 dispatch at once; GPUs 2, 3 wait until 50
    w = work([[10, 10, 10, 10]], [[5, 5, 5, 5]], [[10, 10, 10, 10]], [[5, 5, 5, 5]],
             copies=copies([(0, 2, 3, 50)]))
    t, tl = layer_times([w], 4, "overlap")
    assert tl.column("dispatched")[0, 0] == pytest.approx(55 * US)
    assert t[0, 0] == pytest.approx(70 * US)


def test_copies_sharing_a_port_queue():
    # two copies out of GPU 0 (40 us each) share its send port: they run one after the other
    w = work([[1, 1, 1]], [[1, 1, 1]], [[1, 1, 1]], [[1, 1, 1]], copies=copies([(0, 0, 1, 40), (0, 0, 2, 40)]))
    t, _ = layer_times([w], 3, "critical")
    assert t[0, 0] == pytest.approx((80 + 4) * US)
    assert closed_form_layer_times(w, "critical")[0] == pytest.approx(84 * US)   # port 0 busy 80 us


def test_straggler_sets_every_collective():
    # GPU 2 is slow in attention and in its FFN: both barriers wait for it
    w = work([[10, 10, 50]], [[5, 6, 7]], [[10, 40, 10]], [[3, 2, 1]])
    t, tl = layer_times([w], 3, "overlap")
    assert tl.marks[0, 0] == pytest.approx(np.array([0, 50, 57, 57, 97, 100]) * US)
    assert len(MARKS) == 6


def test_progress_callback_once_per_step():
    seen = []
    w = work([[1, 1]], [[1, 1]], [[1, 1]], [[1, 1]])
    run_events([w, w, w], 2, "overlap", on_step=seen.append)
    assert seen == [0, 1, 2]


def test_a_replan_with_critical_copies_by_hand():
    """One re-plan: 50 us of host time applying the placement, then the layer's 100 us copy into
    GPU 1, then the layer (20 + 5 + 30 + 5); the next layer has no copy."""
    w = work([[10, 20]] * 2, [[5, 5]] * 2, [[30, 10]] * 2, [[5, 5]] * 2, copies=copies([(0, 0, 1, 100)]), host=50)
    t, tl = layer_times([w], 2, "critical")
    assert t[0] == pytest.approx([210 * US, 60 * US])
    assert t[0] == pytest.approx(closed_form_layer_times(w, "critical"), rel=1e-9)
    total, phases = breakdown(w, tl.marks[0])
    assert phases["copy"] == pytest.approx([150 * US, 0])      # host time + the copy
    # hidden copies: nothing of the re-plan costs time
    assert layer_times([w], 2, "hidden")[0][0] == pytest.approx([60 * US, 60 * US])


def test_async_copy_contends_with_dispatch_and_combine_by_hand():
    """A background copy GPU 0 -> GPU 1 of 100 us (at half the link) starts with the step. While it
    runs, both GPUs' dispatch and combine get the other half: their 8 us link part takes 16 us.
    Layer 0: attention 0..20, dispatch 20..38 (10 + 8), FFN 38..68, combine 68..86 (the copy is
    still on the link); layer 1: attention 86..106, dispatch 106..116 (copy landed at 100), FFN
    ..146, combine ..156. The copy never delays anything else."""
    w = work([[20, 20]] * 2, [[10, 10]] * 2, [[30, 30]] * 2, [[10, 10]] * 2, link=[[8, 8]] * 2)
    job = copies([(0, 0, 1, 100)])
    model = EventModel(2, "async", bandwidth_share=0.5)
    marks = model.run_step(w, job)
    assert marks[:, [0, 2, 4, 5]] == pytest.approx(np.array([[0, 38, 68, 86], [86, 116, 146, 156]]) * US)
    assert not model.job_pending()
    total, phases = breakdown(w, marks)
    assert phases["copy"] == pytest.approx([16 * US, 0])      # the two stretched collectives
    # a copy on other GPUs' ports slows nobody; a share of 0.8 stretches 8 us to 8 / 0.2 = 40 us
    other = EventModel(3, "async", 0.5)
    w3 = work([[20] * 3], [[10] * 3], [[30] * 3], [[10] * 3], link=[[8] * 3])
    assert other.run_step(w3, copies([(0, 1, 2, 100)]))[0, 2] == pytest.approx(38 * US)
    heavy = EventModel(2, "async", 0.8)
    assert heavy.run_step(w, job)[0, 2] == pytest.approx((20 + 2 + 40) * US)


def test_async_job_spans_steps():
    """A 250 us job runs across steps of 60 us; it is pending until the step in which it lands."""
    w = work([[20, 20]], [[10, 10]], [[20, 20]], [[10, 10]], link=[[0, 0]])
    model = EventModel(2, "async", 0.5)
    pending = []
    for s in range(6):
        model.run_step(w, copies([(0, 0, 1, 250)]) if s == 0 else None)
        pending.append(model.job_pending())
    assert pending == [True, True, True, True, False, False]     # lands at 250 us, in step 4 (240..300)
