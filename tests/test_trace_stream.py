"""Long traces in bounded memory: chunked validation and loading, counts traces written and
synthesised a block of steps at a time."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from moe_gps.cli.main import main
from moe_gps.trace import CountsTrace, CountsWriter, load_trace, validate_trace, write_trace
from moe_gps.trace.synth_counts import counts_blocks, counts_meta, inclusion, synthesize_counts

from test_trace_format import COUNTS_META, counts_cols, small_trace, write_raw


def _peak(fn) -> tuple[object, int]:
    """(fn(), peak bytes numpy and Python allocated while it ran)."""
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("chunk_rows", [1, 7, 40, 1 << 18])
def test_chunked_tokens_load_equals_the_trace(tmp_path, chunk_rows):
    trace = small_trace(steps=(5, 7, 3, 9, 1, 4))
    write_trace(tmp_path / "t.parquet", trace)
    back = load_trace(tmp_path / "t.parquet", chunk_rows=chunk_rows)
    np.testing.assert_array_equal(back.experts, trace.experts)
    np.testing.assert_array_equal(back.step_offsets, trace.step_offsets)
    np.testing.assert_array_equal(back.weights, trace.weights)
    np.testing.assert_array_equal(back.token_id, trace.token_id)
    assert back.seq is None and back.experts.flags.c_contiguous
    assert validate_trace(tmp_path / "t.parquet", chunk_rows=chunk_rows)[1] == 6


@pytest.mark.parametrize("chunk_rows", [1, 50, 1 << 18])
def test_chunked_counts_load_equals_the_trace(tmp_path, chunk_rows):
    counts = small_trace(steps=(5, 7, 3, 9)).counts()
    meta = CountsTrace(__import__("moe_gps.trace", fromlist=["TraceMeta"]).TraceMeta(**COUNTS_META), counts).meta
    write_trace(tmp_path / "c.parquet", CountsTrace(meta, counts))
    back = load_trace(tmp_path / "c.parquet", chunk_rows=chunk_rows)
    np.testing.assert_array_equal(back.counts(), counts)
    # a file that leaves out zero counts: fewer rows than steps x layers x experts, the array grows
    cols = counts_cols(counts)
    keep = cols["count"] > 0
    path = write_raw(tmp_path / "sparse.parquet", {n: c[keep] for n, c in cols.items()}, COUNTS_META)
    np.testing.assert_array_equal(load_trace(path, chunk_rows=chunk_rows).counts(), counts)
    assert validate_trace(path, chunk_rows=chunk_rows)[1] == 4


def test_an_error_in_a_late_chunk_names_its_file_row(tmp_path, capsys):
    trace = small_trace(steps=(5, 7, 3, 9))
    cols = counts_cols(trace.counts())
    cols["count"][3 * 32 + 8 * 2 + 5] += 2                # step 3, layer 2, expert 5: one row of the last chunk
    path = write_raw(tmp_path / "c.parquet", cols, COUNTS_META)
    for fn in (lambda: load_trace(path, chunk_rows=32), lambda: validate_trace(path, chunk_rows=32)):
        with pytest.raises(Exception, match=r"column 'count', row 112: step 3, layer 2 sums to 20 assignments"):
            fn()
    assert main(["trace", "validate", str(path)]) == 2
    assert "row 112: step 3, layer 2 sums to 20" in capsys.readouterr().err


def test_metadata_tokens_per_step_shorter_or_longer_than_the_data(tmp_path):
    counts = small_trace(steps=(5, 7, 3)).counts()
    cols = counts_cols(counts)
    for tps, message in (([5, 7], "tokens_per_step has 2 entries but the data has more steps (step 2 at row 64)"),
                         ([5, 7, 3, 4], "tokens_per_step has 4 entries but the data has 3 steps")):
        path = write_raw(tmp_path / "c.parquet", cols, {**COUNTS_META, "tokens_per_step": tps})
        with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
            validate_trace(path, chunk_rows=32)


def test_validation_memory_does_not_grow_with_steps(tmp_path):
    """10x the steps: validating holds one chunk, loading holds the counts array plus one chunk."""
    peaks = {}
    for steps in (40, 400):
        trace = synthesize_counts("mixtral-mmlu", num_steps=steps, tokens_per_step=512, seed=0)
        path = tmp_path / f"c{steps}.parquet"
        write_trace(path, trace)
        (_, n), peaks[("validate", steps)] = _peak(lambda: validate_trace(path, chunk_rows=4096))
        assert n == steps
        back, peak = _peak(lambda: load_trace(path, chunk_rows=4096))
        np.testing.assert_array_equal(back.counts(), trace.counts())
        peaks[("load", steps)] = peak - back.count_array.nbytes
    assert peaks[("validate", 400)] < 1.25 * peaks[("validate", 40)] + (64 << 10)
    assert peaks[("load", 400)] < 1.25 * peaks[("load", 40)] + (64 << 10)


def test_long_counts_trace_stays_in_a_temporary_file(tmp_path):
    """A counts trace past ``spill_bytes`` is read into a temporary file, not memory: the same counts,
    step ranges, tokens per step, written back and pickled (as its array); loading it holds one chunk."""
    import pickle

    from moe_gps.trace.data import StepStore

    trace = synthesize_counts("mixtral-mmlu", num_steps=400, tokens_per_step=512, seed=0)
    path = tmp_path / "c.parquet"
    write_trace(path, trace)
    back, peak = _peak(lambda: load_trace(path, chunk_rows=4096, spill_bytes=1))
    assert isinstance(back.count_array, StepStore) and back.num_steps == 400
    assert peak < trace.counts().nbytes / 4                       # never the whole array in memory
    np.testing.assert_array_equal(back.counts(), trace.counts())
    np.testing.assert_array_equal(back.counts_range(37, 91), trace.counts()[37:91])
    np.testing.assert_array_equal(back.counts_range(-5, 3), trace.counts()[:3])
    np.testing.assert_array_equal(back.count_array[-1], trace.counts()[-1])
    np.testing.assert_array_equal(back.tokens_per_step, trace.tokens_per_step)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(back)).count_array, trace.counts())
    write_trace(tmp_path / "again.parquet", back)
    np.testing.assert_array_equal(load_trace(tmp_path / "again.parquet").counts(), trace.counts())
    from moe_gps.trace.regroup import regroup
    np.testing.assert_array_equal(regroup(back, 1536).counts(), regroup(trace, 1536).counts())   # 3 steps each
    with pytest.raises(TypeError, match="one step or a range"):
        back.count_array[::2]


def test_counts_writer_streams_blocks_and_is_atomic(tmp_path):
    p, meta = counts_meta("mixtral-mmlu", 10, 64, 3)
    blocks = list(counts_blocks(p, 10, 64, 3, block_steps=3))
    assert [len(b) for b in blocks] == [3, 3, 3, 1]
    with CountsWriter(tmp_path / "c.parquet", meta) as w:
        for b in blocks:
            w.write_steps(b)
    np.testing.assert_array_equal(load_trace(tmp_path / "c.parquet").counts(), np.concatenate(blocks))
    with pytest.raises(RuntimeError):
        with CountsWriter(tmp_path / "d.parquet", meta) as w:
            w.write_steps(blocks[0])
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.parquet"]


def test_inclusion_probabilities_water_fill():
    pop = np.log(np.array([[8.0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    pi = inclusion(pop, 2)
    np.testing.assert_allclose(pi.sum(axis=1), [2, 2])
    # 2 x 8/12 > 1: the hot expert is taken by every token, the rest share the other assignment
    np.testing.assert_allclose(pi[0], [1, 0.25, 0.25, 0.25, 0.25])
    np.testing.assert_allclose(pi[1], [0.4] * 5)


def test_synthetic_counts_statistics():
    t = synthesize_counts("mixtral-mmlu", num_steps=300, tokens_per_step=1000, seed=4, drift=0.0)
    c = t.counts()
    assert t.meta.kind == "counts" and t.meta.source == "synthetic"
    assert "SYNTHETIC" in t.meta.provenance["note"]
    assert (c.sum(axis=2) == 2 * 1000).all()                        # every layer: top_k x tokens
    np.testing.assert_array_equal(t.tokens_per_step, np.full(300, 1000))
    # no drift: every step draws from the same inclusion probabilities, and the mean load is tokens x pi
    p, _ = counts_meta("mixtral-mmlu", 300, 1000, 4, drift=0.0)
    base = __import__("moe_gps.trace.synth", fromlist=["base_popularity"]).base_popularity(
        p, np.random.default_rng(4))
    np.testing.assert_allclose(c.mean(axis=0), 1000 * inclusion(base, 2), rtol=0.02)


def test_synthetic_counts_drift_and_determinism():
    def jsd_next(c):
        q = c / c.sum(axis=2, keepdims=True)
        m = (q[1:] + q[:-1]) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = lambda a: np.nansum(a * np.log2(a / m), axis=2)  # noqa: E731
        return float(((kl(q[1:]) + kl(q[:-1])) / 2).mean())

    calm = synthesize_counts("mixtral-mmlu", num_steps=60, tokens_per_step=4096, drift=0.0).counts()
    moving = synthesize_counts("mixtral-mmlu", num_steps=60, tokens_per_step=4096, drift=0.5).counts()
    assert jsd_next(moving) > 3 * jsd_next(calm)
    p, _ = counts_meta("sst2", 9, 100, 7)
    a = np.concatenate(list(counts_blocks(p, 9, 100, 7, block_steps=2)))
    b = np.concatenate(list(counts_blocks(p, 9, 100, 7, block_steps=256)))
    np.testing.assert_array_equal(a, b)                              # the block size changes nothing
    assert not np.array_equal(a, np.concatenate(list(counts_blocks(p, 9, 100, 8))))


def test_synth_counts_cli_at_deepseek_shape(tmp_path, capsys):
    out = tmp_path / "ds.parquet"
    assert main(["trace", "synth", "--profile", "deepseek-v3", "--kind", "counts", "--steps", "300",
                 "--tokens", "4096", "-o", str(out)]) == 0
    assert "synthetic counts trace, profile deepseek-v3, 300 steps x 4096 tokens, 58 layers, 256 experts, top-8" \
        in capsys.readouterr().out
    t = load_trace(out)
    assert t.counts().shape == (300, 58, 256) and (t.counts().sum(axis=2) == 8 * 4096).all()
    assert t.meta.model == "deepseek-v3" and t.meta.provenance["profile"]["num_experts"] == 256
    assert main(["trace", "validate", str(out)]) == 0
    assert "ok (counts trace, 300 steps, 58 layers, 256 experts, top-8" in capsys.readouterr().out
    assert main(["trace", "synth", "--kind", "counts", "--weights", "-o", str(tmp_path / "w.parquet")]) == 2
    assert "a counts trace has no gate weights" in capsys.readouterr().err
    assert not (tmp_path / "w.parquet").exists()


def test_steps_out_of_order_across_chunks_load_whole(tmp_path):
    from moe_gps.errors import UserError
    from moe_gps.trace import iter_steps

    from test_trace_format import meta_dict, raw_table

    trace = small_trace(steps=(5, 7, 3, 9))
    cols = raw_table(trace)
    order = np.argsort(np.where(cols["step"] == 1, 9, cols["step"]), kind="stable")   # steps 0, 2, 3, 1
    path = write_raw(tmp_path / "u.parquet", {n: c[order] for n, c in cols.items()}, meta_dict(trace))
    back = load_trace(path, chunk_rows=8)
    np.testing.assert_array_equal(back.experts, trace.experts)
    assert validate_trace(path, chunk_rows=8)[1] == 4
    with pytest.raises(UserError, match="row 20: gap in step numbers: step 1 is missing"):
        list(iter_steps(path, batch_rows=8))                     # streaming has not seen step 1 yet


def test_reading_ahead_hands_over_errors_and_stops_with_its_reader():
    import threading

    from moe_gps.trace.reader import _read_ahead

    def batches():
        yield 1
        yield 2
        raise ValueError("bad page")

    it = _read_ahead(batches(), "t.parquet")
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(ValueError, match="bad page"):
        next(it)
    it = _read_ahead(iter(range(100)), "t.parquet", depth=1)
    assert next(it) == 0
    it.close()                                            # the reader stopped early: so does the thread
    assert not any(t.name == "moe-gps-read-ahead" for t in threading.enumerate())
    assert list(_read_ahead(iter(range(5)), "t.parquet")) == list(range(5))


def test_a_tokens_traces_counts_are_counted_as_read():
    import pickle

    from moe_gps.trace.data import TokenCounts
    from moe_gps.trace.synth import synthesize
    from sim.loads import counts_view

    t = synthesize("sst2", num_steps=6, tokens_per_step=64, seed=1, num_layers=3)
    view = counts_view(t)
    store = view.count_array
    assert isinstance(store, TokenCounts) and store.shape == (6, 3, t.meta.num_experts)
    want = t.counts()
    assert np.array_equal(view.counts_range(2, 4), want[2:4])
    assert store._done.tolist() == [False, False, True, True, False, False]      # only what was read
    assert np.array_equal(store[-1], want[-1]) and np.array_equal(view.counts_range(-3, 99), want)
    assert np.array_equal(pickle.loads(pickle.dumps(view)).count_array, want)
    assert np.array_equal(view.tokens_per_step, t.tokens_per_step)
    with pytest.raises(TypeError, match="one step or a range"):
        store[::2]
    with pytest.raises(ValueError, match="read-only"):
        view.counts_range(0, 2)[0, 0, 0] = 7            # one reader cannot change what the others see
    whole = np.array(store)
    whole[0, 0, 0] += 7                                 # a copy
    assert np.array_equal(view.counts(), want)
