"""The trace format: round trips, streaming, and one test per bad input (message + exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_gps.cli.main import main
from moe_gps.trace import (CountsTrace, StepRouting, TokensTrace, TraceMeta, TraceWriter, iter_steps,
                           load_trace, write_trace)
from moe_gps.trace.meta import META_KEY


def small_trace(steps=(5, 7, 3), L=4, E=8, k=2, seed=0, weights=True) -> TokensTrace:
    rng = np.random.default_rng(seed)
    N = sum(steps)
    experts = np.argsort(rng.random((N, L, E)), axis=2)[:, :, :k].astype(np.int16)
    w = rng.random((N, L, k)).astype(np.float32) if weights else None
    meta = TraceMeta(kind="tokens", num_layers=L, num_experts=E, top_k=k, source="synthetic",
                     provenance={"test": True})
    offsets = np.concatenate([[0], np.cumsum(steps)]).astype(np.int64)
    return TokensTrace(meta, experts, offsets, w, token_id=rng.integers(0, 100, N).astype(np.int32))


def raw_table(trace: TokensTrace) -> dict[str, np.ndarray]:
    """The columns write_trace would produce, as a dict we can corrupt."""
    L, k = trace.meta.num_layers, trace.meta.top_k
    cols = {
        "step": np.repeat(np.repeat(np.arange(trace.num_steps), trace.tokens_per_step), L).astype(np.int32),
        "token": np.repeat(np.concatenate([np.arange(t) for t in trace.tokens_per_step]), L).astype(np.int32),
        "layer": np.tile(np.arange(L), trace.num_tokens).astype(np.int16),
    }
    for j in range(k):
        cols[f"expert_{j}"] = trace.experts[:, :, j].ravel().copy()
        cols[f"weight_{j}"] = trace.weights[:, :, j].ravel().copy()
    return cols


def write_raw(path, cols: dict, meta: dict | None) -> str:
    table = pa.table(cols)
    if meta is not None:
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    pq.write_table(table, path)
    return str(path)


def meta_dict(trace: TokensTrace, **changes) -> dict:
    d = json.loads(trace.meta.to_json())
    d.update(changes)
    return d


def validate_cli(path, capsys) -> str:
    code = main(["trace", "validate", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("moe-gps: error: ")
    return err


def test_tokens_round_trip_and_counts(tmp_path):
    trace = small_trace()
    path = tmp_path / "t.parquet"
    write_trace(path, trace)
    back = load_trace(path)
    assert isinstance(back, TokensTrace)
    np.testing.assert_array_equal(back.experts, trace.experts)
    np.testing.assert_array_equal(back.step_offsets, trace.step_offsets)
    np.testing.assert_allclose(back.weights, trace.weights)
    np.testing.assert_array_equal(back.token_id, trace.token_id)
    counts = back.counts()
    assert counts.shape == (3, 4, 8)
    # every layer of a step holds top_k x tokens assignments
    np.testing.assert_array_equal(counts.sum(axis=2), np.array([5, 7, 3])[:, None] * 2 * np.ones((1, 4)))
    # bincount matches a direct count for one (step, layer)
    step1 = back.step(1)
    assert step1.experts.shape == (7, 4, 2)
    direct = np.array([(step1.experts[:, 2, :] == e).sum() for e in range(8)])
    np.testing.assert_array_equal(counts[1, 2], direct)


def test_unsorted_rows_are_sorted_on_load(tmp_path):
    trace = small_trace(weights=True)
    cols = raw_table(trace)
    perm = np.random.default_rng(1).permutation(len(cols["step"]))
    path = write_raw(tmp_path / "shuffled.parquet", {k: v[perm] for k, v in cols.items()}, meta_dict(trace))
    back = load_trace(path)
    np.testing.assert_array_equal(back.experts, trace.experts)


def test_rows_in_order_take_the_fast_check_and_anything_else_the_sorting_one():
    # rows already grouped per token in (step, token, layer) order are checked without a 64-bit key per row;
    # the fast check declines anything else (the sorting check then sorts, or says what is wrong), and both
    # give the same tokens on rows in order
    from moe_gps.trace.validate import _tokens_in_order, _tokens_sorted

    cols = raw_table(small_trace())
    L = 4
    step, token, layer = cols["step"], cols["token"], cols["layer"]
    fast = _tokens_in_order(step, token, layer, L)
    order, slow = _tokens_sorted(step, token, layer, L, "t", 0, sort=False)
    assert fast is not None and order is None
    assert all(np.array_equal(a, b) for a, b in zip(fast, slow))
    swapped = np.r_[L:2 * L, 0:L, 2 * L:len(step)]                       # two tokens out of order
    missing = np.r_[0:L - 1, L:len(step)]                                 # a token without its last layer
    twice = np.r_[0:L, 0:len(step)]                                       # a token's rows twice
    for rows in (swapped, missing, twice):
        assert _tokens_in_order(step[rows], token[rows], layer[rows], L) is None


def test_stream_steps_across_small_batches(tmp_path):
    trace = small_trace(steps=(5, 7, 3, 9))
    path = tmp_path / "t.parquet"
    write_trace(path, trace)
    streamed = list(iter_steps(path, batch_rows=6))
    assert [s.step for s in streamed] == [0, 1, 2, 3]
    for s in streamed:
        np.testing.assert_array_equal(s.experts, trace.step(s.step).experts)


def test_counts_round_trip(tmp_path):
    trace = small_trace()
    meta = TraceMeta(kind="counts", num_layers=4, num_experts=8, top_k=2, source="synthetic")
    counts = CountsTrace(meta, trace.counts())
    write_trace(tmp_path / "c.parquet", counts)
    back = load_trace(tmp_path / "c.parquet")
    np.testing.assert_array_equal(back.counts(), trace.counts())
    np.testing.assert_array_equal(back.tokens_per_step, [5, 7, 3])


def test_writer_is_atomic(tmp_path):
    target = tmp_path / "keep.parquet"
    target.write_text("the user's old file")
    trace = small_trace()
    with pytest.raises(RuntimeError):
        with TraceWriter(target, trace.meta, with_weights=False) as w:
            w.write_step(trace.step(0))
            raise RuntimeError("interrupted")
    assert target.read_text() == "the user's old file"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.parquet"]


# ---- bad inputs: one line naming file, column and first bad row; exit 2 ----

def test_not_parquet(tmp_path, capsys):
    path = tmp_path / "x.parquet"
    path.write_text("step,token,layer\n0,0,0\n")
    err = validate_cli(path, capsys)
    assert f"{path}: not a Parquet file" in err


def test_damaged_data_pages_are_one_line_whichever_way_the_trace_is_read(tmp_path, capsys):
    """Bytes flipped inside the column pages (the footer intact): every reader either reads the file or says
    in one line that it is damaged; none passes on pyarrow's own error."""
    from moe_gps.errors import UserError
    from moe_gps.trace import load_trace, validate_trace

    path = tmp_path / "good.parquet"
    write_trace(path, small_trace(steps=(40, 30, 50)))
    data = path.read_bytes()
    footer = int.from_bytes(data[-8:-4], "little") + 8
    damaged = 0
    for at in range(4, len(data) - footer - 16, 29):
        bad = bytearray(data)
        bad[at:at + 16] = bytes(b ^ 0xA5 for b in bad[at:at + 16])
        path.write_bytes(bytes(bad))
        for read in (load_trace, validate_trace, lambda p: list(iter_steps(p)),
                     lambda p: load_trace(p, chunk_rows=64)):
            try:
                read(path)
            except UserError as err:
                damaged += "damaged Parquet data" in str(err)
    assert damaged                                        # some flips do break the pages
    path.write_bytes(bytes(bad))
    code = main(["trace", "validate", str(path)])
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err and err.count("\n") <= 1, err


def test_a_reader_error_that_is_the_machines_is_not_called_damage():
    """Out of memory and a failing disk are said as such; only what does not decode is 'damaged'."""
    import errno

    from moe_gps.trace.reader import _damaged

    assert "out of memory" in str(_damaged("t.parquet", pa.ArrowMemoryError("malloc of size 1073741824 failed")))
    assert str(_damaged("t.parquet", OSError(errno.EIO, "Input/output error"))) == "t.parquet: Input/output error"
    assert "damaged Parquet data" in str(_damaged("t.parquet", OSError()))          # no message: no IndexError


def test_empty_file(tmp_path, capsys):
    path = tmp_path / "empty.parquet"
    path.write_bytes(b"")
    assert f"{path}: empty file (0 bytes)" in validate_cli(path, capsys)


def test_no_rows(tmp_path, capsys):
    trace = small_trace()
    cols = {k: v[:0] for k, v in raw_table(trace).items()}
    path = write_raw(tmp_path / "norows.parquet", cols, meta_dict(trace))
    assert "the trace has no rows" in validate_cli(path, capsys)


def test_missing_metadata(tmp_path, capsys):
    path = write_raw(tmp_path / "plain.parquet", raw_table(small_trace()), None)
    assert "no 'moe_gps' metadata entry" in validate_cli(path, capsys)


def test_missing_column(tmp_path, capsys):
    trace = small_trace()
    cols = raw_table(trace)
    del cols["layer"]
    path = write_raw(tmp_path / "m.parquet", cols, meta_dict(trace))
    assert f"{path}: missing required column(s) 'layer'" in validate_cli(path, capsys)


def test_extra_column(tmp_path, capsys):
    trace = small_trace()
    cols = raw_table(trace)
    cols["temperature"] = np.zeros(len(cols["step"]), np.float32)
    path = write_raw(tmp_path / "x.parquet", cols, meta_dict(trace))
    assert f"{path}: unexpected column(s) 'temperature'" in validate_cli(path, capsys)


def test_expert_id_out_of_range(tmp_path, capsys):
    trace = small_trace()
    cols = raw_table(trace)
    cols["expert_1"][13] = 8
    path = write_raw(tmp_path / "r.parquet", cols, meta_dict(trace))
    err = validate_cli(path, capsys)
    assert f"{path}: column 'expert_1', row 13: expert id 8 outside [0, 8)" in err


def test_negative_expert_id(tmp_path, capsys):
    trace = small_trace()
    cols = raw_table(trace)
    cols["expert_0"][4] = -1
    path = write_raw(tmp_path / "r.parquet", cols, meta_dict(trace))
    assert "column 'expert_0', row 4: expert id -1 outside [0, 8)" in validate_cli(path, capsys)


def test_duplicate_expert_in_top_k(tmp_path, capsys):
    trace = small_trace()
    cols = raw_table(trace)
    cols["expert_1"][21] = cols["expert_0"][21]
    path = write_raw(tmp_path / "d.parquet", cols, meta_dict(trace))
    err = validate_cli(path, capsys)
    assert f"column 'expert_1', row 21: expert {cols['expert_0'][21]} appears twice in one token's top-k" in err


def test_layer_gap(tmp_path, capsys):
    trace = small_trace()
    cols = raw_table(trace)
    keep = cols["layer"] != 2
    cols = {k: v[keep] for k, v in cols.items()}
    path = write_raw(tmp_path / "g.parquet", cols, meta_dict(trace))
    err = validate_cli(path, capsys)
    assert f"{path}: column 'layer', row 2: gap in layer numbers: layer 2 is missing but layer 3 is present" in err


def test_token_missing_one_layer(tmp_path, capsys):
    trace = small_trace()
    cols = raw_table(trace)
    keep = np.ones(len(cols["step"]), bool)
    keep[4 * 6 + 1] = False  # token 6 (step 1, token 1) loses layer 1
    cols = {k: v[keep] for k, v in cols.items()}
    path = write_raw(tmp_path / "g.parquet", cols, meta_dict(trace))
    assert "column 'layer', row 24: step 1, token 1 has no row for layer 1" in validate_cli(path, capsys)


def test_nan_weight(tmp_path, capsys):
    trace = small_trace()
    cols = raw_table(trace)
    cols["weight_0"][7] = np.nan
    path = write_raw(tmp_path / "w.parquet", cols, meta_dict(trace))
    assert f"{path}: column 'weight_0', row 7: gate weight is NaN" in validate_cli(path, capsys)


def test_negative_weight(tmp_path, capsys):
    trace = small_trace()
    cols = raw_table(trace)
    cols["weight_1"][30] = -0.25
    path = write_raw(tmp_path / "w.parquet", cols, meta_dict(trace))
    assert "column 'weight_1', row 30: gate weight is negative (-0.25)" in validate_cli(path, capsys)


def test_metadata_top_k_disagrees(tmp_path, capsys):
    trace = small_trace()
    path = write_raw(tmp_path / "k.parquet", raw_table(trace), meta_dict(trace, top_k=3))
    err = validate_cli(path, capsys)
    assert f"{path}: metadata says top_k=3 but the file has 2 expert column(s) (expert_0..expert_1)" in err


def test_metadata_num_experts_disagrees(tmp_path, capsys):
    trace = small_trace()
    cols = raw_table(trace)
    path = write_raw(tmp_path / "e.parquet", cols, meta_dict(trace, num_experts=4))
    row = int(np.argmax((cols["expert_0"] >= 4) | (cols["expert_1"] >= 4)))
    col = "expert_0" if cols["expert_0"][row] >= 4 else "expert_1"
    err = validate_cli(path, capsys)
    assert f"column '{col}', row {row}: expert id {cols[col][row]} outside [0, 4) (num_experts=4 in the metadata)" in err


def test_metadata_num_layers_disagrees(tmp_path, capsys):
    trace = small_trace()
    path = write_raw(tmp_path / "l.parquet", raw_table(trace), meta_dict(trace, num_layers=6))
    assert "column 'layer': the data has layers 0..3 but the metadata says num_layers=6" in validate_cli(path, capsys)


def counts_cols(counts: np.ndarray) -> dict:
    S, L, E = counts.shape
    s, l_, e = np.meshgrid(np.arange(S), np.arange(L), np.arange(E), indexing="ij")
    return {"step": s.ravel().astype(np.int32), "layer": l_.ravel().astype(np.int16),
            "expert": e.ravel().astype(np.int16), "count": counts.ravel().astype(np.int64)}


def test_counts_disagree_with_top_k_times_tokens(tmp_path, capsys):
    trace = small_trace()
    cols = counts_cols(trace.counts())
    cols["count"][8 * 4 + 8 + 3] += 1   # step 1, layer 1, expert 3
    meta = dict(schema_version=1, kind="counts", num_layers=4, num_experts=8, top_k=2, model="m",
                dataset="d", source="synthetic", provenance={}, tokens_per_step=[5, 7, 3])
    path = write_raw(tmp_path / "c.parquet", cols, meta)
    err = validate_cli(path, capsys)
    assert f"{path}: column 'count', row 40: step 1, layer 1 sums to 15 assignments but top_k × tokens = 2 × 7 = 14" in err


def test_counts_layer_not_multiple_of_top_k(tmp_path, capsys):
    trace = small_trace()
    cols = counts_cols(trace.counts())
    cols["count"][0] += 1   # step 0, layer 0: 11 assignments, top-2
    meta = dict(schema_version=1, kind="counts", num_layers=4, num_experts=8, top_k=2, model="m",
                dataset="d", source="synthetic", provenance={})
    path = write_raw(tmp_path / "c.parquet", cols, meta)
    assert "column 'count', row 0: step 0, layer 0 sums to 11 assignments, not a multiple of top_k=2" in \
        validate_cli(path, capsys)


def test_bad_metadata_json(tmp_path, capsys):
    trace = small_trace()
    table = pa.table(raw_table(trace)).replace_schema_metadata({META_KEY: b"{not json"})
    path = tmp_path / "j.parquet"
    pq.write_table(table, path)
    assert "metadata entry 'moe_gps' is not valid JSON" in validate_cli(path, capsys)


def test_missing_file(tmp_path, capsys):
    assert "no such file" in validate_cli(tmp_path / "nope.parquet", capsys)


def test_streaming_reports_the_same_errors(tmp_path):
    from moe_gps.errors import UserError
    trace = small_trace()
    cols = raw_table(trace)
    cols["expert_0"][50] = 99
    path = write_raw(tmp_path / "s.parquet", cols, meta_dict(trace))
    with pytest.raises(UserError, match="column 'expert_0', row 50: expert id 99 outside"):
        list(iter_steps(path, batch_rows=16))


def test_step_routing_counts():
    s = StepRouting(0, np.array([[[0, 1]], [[1, 2]]], dtype=np.int16))
    np.testing.assert_array_equal(s.counts(4), [[1, 2, 1, 0]])


def test_streaming_unsorted_names_a_remedy_that_exists(tmp_path):
    from moe_gps.errors import UserError
    trace = small_trace()
    cols = raw_table(trace)
    order = np.arange(len(cols["step"]))
    order[[0, 5]] = order[[5, 0]]                       # two rows of step 0 out of order
    path = write_raw(tmp_path / "u.parquet", {n: c[order] for n, c in cols.items()}, meta_dict(trace))
    with pytest.raises(UserError, match=r"not in \(step, token, layer\) order") as err:
        list(iter_steps(path))
    assert "--fix" not in str(err.value)                # `trace validate` has no --fix flag
    assert "write_trace" in str(err.value)
    assert load_trace(path).num_steps == 3               # loading whole sorts it


def test_writer_leaves_nothing_when_it_cannot_open(tmp_path, monkeypatch):
    import moe_gps.trace.writer as writer

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writer.pq, "ParquetWriter", broken)
    with pytest.raises(OSError, match="disk full"):
        TraceWriter(tmp_path / "t.parquet", small_trace().meta)
    assert list(tmp_path.iterdir()) == []


def _peak_bytes(fn) -> int:
    """Peak bytes that Python and numpy allocate while fn() runs (tracemalloc sees numpy arrays)."""
    import tracemalloc
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


COUNTS_META = dict(schema_version=1, kind="counts", num_layers=4, num_experts=8, top_k=2, model="m",
                   dataset="d", source="synthetic", provenance={})


@pytest.mark.parametrize("big, dtype", [(2**31 - 1, np.int32), (2**40, np.int64)])
def test_counts_huge_step_number_is_a_gap_without_huge_memory(tmp_path, capsys, big, dtype):
    # A bincount over step numbers would size an array by the largest step (16 GiB for 2^31 - 1).
    cols = counts_cols(small_trace().counts())            # steps 0..2, 4 layers x 8 experts: 96 rows
    cols["step"] = cols["step"].astype(dtype)
    cols["step"][-32:] = big                              # step 2 renumbered
    path = write_raw(tmp_path / "c.parquet", cols, COUNTS_META)
    errors = []
    peak = _peak_bytes(lambda: errors.append(validate_cli(path, capsys)))
    assert errors == [f"moe-gps: error: {path}: column 'step', row 64: gap in step numbers: step 2 is missing "
                      f"(found step {big})"]
    assert peak < 20 << 20


def test_counts_rows_in_any_order_and_a_plain_gap(tmp_path, capsys):
    trace = small_trace()
    cols = counts_cols(trace.counts())
    order = np.random.default_rng(1).permutation(len(cols["step"]))
    path = write_raw(tmp_path / "c.parquet", {n: c[order] for n, c in cols.items()}, COUNTS_META)
    np.testing.assert_array_equal(load_trace(path).counts(), trace.counts())
    cols["step"][cols["step"] == 1] = 7                   # steps 0, 2, 7
    path = write_raw(tmp_path / "g.parquet", cols, COUNTS_META)
    assert validate_cli(path, capsys).endswith("column 'step', row 32: gap in step numbers: step 1 is missing "
                                               "(found step 7)")


@pytest.mark.parametrize("kind", ["tokens", "counts"])
def test_huge_layer_number_is_out_of_range_without_huge_memory(tmp_path, capsys, kind):
    trace = small_trace()
    if kind == "tokens":
        cols, meta, row = raw_table(trace), meta_dict(trace), 13
    else:
        cols, meta, row = counts_cols(trace.counts()), COUNTS_META, 13
    cols["layer"] = cols["layer"].astype(np.int32)
    cols["layer"][row] = 2**31 - 1
    path = write_raw(tmp_path / f"{kind}.parquet", cols, meta)
    errors = []
    peak = _peak_bytes(lambda: errors.append(validate_cli(path, capsys)))
    assert errors[0].endswith(f"column 'layer', row {row}: layer 2147483647 but the metadata says num_layers=4")
    assert peak < 20 << 20
    if kind == "tokens":                                  # streaming checks layers per chunk the same way
        from moe_gps.errors import UserError
        with pytest.raises(UserError, match=f"row {row}: layer 2147483647 but"):
            list(iter_steps(path, batch_rows=16))
