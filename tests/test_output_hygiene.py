"""Output hygiene: strict JSON (null, never NaN), a hint naming `trace import` for files that
are not Parquet traces, and a quiet end when the reader of stdout goes away."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from moe_gps.cli.main import main
from moe_gps.errors import UserError
from moe_gps.trace import CountsTrace, TraceMeta, load_trace, write_trace


def _strict(text: str):
    def bad(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=bad)


@pytest.fixture
def one_step(tmp_path):
    """One step: drift between steps is undefined (NaN inside), which JSON must show as null."""
    meta = TraceMeta(kind="counts", num_layers=2, num_experts=4, top_k=1, model="m", dataset="d", source="synthetic")
    path = tmp_path / "one.parquet"
    write_trace(path, CountsTrace(meta, np.array([[[1, 2, 0, 1], [0, 0, 4, 0]]], np.int64)))
    return path


def test_inspect_and_plan_json_use_null_not_nan(one_step, tmp_path, capsys):
    assert main(["trace", "inspect", "--json", str(one_step)]) == 0
    data = _strict(capsys.readouterr().out)
    assert data["layers"][0]["drift_jsd"] is None and data["overall"]["drift_jsd"] is None
    assert main(["plan", str(one_step), "--gpus", "2", "-o", str(tmp_path / "p.yaml"), "--json"]) == 0
    plan = _strict(capsys.readouterr().out)
    assert 0 < plan["plan"]["balancedness_vllm"] <= 1 and plan["static"]["experts_moved"] is None


@pytest.mark.parametrize("name, content, fmt", [
    ("g.csv", "layer_id,token_id,expert_0,expert_1\n0,0,0.5,0\n", "gate-csv"),
    ("v.jsonl", '{"topk_weights": [1, 2], "topk_ids": [[0, 1]]}\n', "vllm-jsonl"),
    ("r.jsonl", '{"id": "chatcmpl-1", "choices": [{"routed_experts": [[[0, 1]]]}]}\n', "vllm-routed"),
    ("s.json", '[{"text": "x", "meta_info": {"routed_experts": "AAAA"}}]', "sglang-routed"),
    ("p.json", '{"total_input_tokens": 3, "expert_popularity": [[1, 2]]}', "popularity-json"),
])
def test_non_parquet_input_names_the_import_line(tmp_path, capsys, name, content, fmt):
    path = tmp_path / name
    path.write_text(content)
    src = path.parent if fmt == "gate-csv" else path        # gate-csv: a step is a folder of layer files
    with pytest.raises(UserError, match=f"not a Parquet file; .*`moe-gps trace import --from {fmt} {src} "):
        load_trace(path)
    for argv in (["trace", "inspect", str(path)], ["plan", str(path), "--gpus", "2", "-o", str(tmp_path / "p.yaml")],
                 ["simulate", str(path), "-o", str(tmp_path / "out")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"moe-gps trace import --from {fmt}" in err


def test_torch_and_unknown_files_get_a_hint_too(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"logical_count": torch.zeros(1, 2, 3)}, tmp_path / "expert_distribution_recorder_1.pt")
    with pytest.raises(UserError, match="SGLang expert-distribution dump.*--from sglang-dump"):
        load_trace(tmp_path / "expert_distribution_recorder_1.pt")
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(UserError, match=r"looks like a text file; convert router traces with `moe-gps trace import "
                                        r"--from FORMAT"):
        load_trace(tmp_path / "notes.txt")


def test_trace_inspect_into_a_closed_pipe_ends_quietly(tmp_path):
    """`moe-gps trace inspect X | head` must not end with a BrokenPipeError traceback."""
    path = tmp_path / "s.parquet"
    assert main(["trace", "synth", "--steps", "4", "--tokens", "16", "-o", str(path)]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "moe_gps.cli.main", "trace", "inspect", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                              # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == ""


def test_parquet_written_a_table_at_a_time(tmp_path):
    """write_parquet_atomic takes an iterable of tables: one row group each, the rows of their concatenation
    (as pandas writes them: NaN as null, text as large_string), without importing pandas."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moe_gps.atomic import write_parquet_atomic

    parts = [{"name": ["a"] * 3, "x": [1.0, float("nan"), 3.0], "i": np.arange(3, dtype=np.int16),
              "ok": [True, False, True], "note": ["p", None, "q,r"]},
             {"name": ["b"] * 2, "x": [4.0, 5.0], "i": np.arange(2, dtype=np.int16), "ok": [False, False],
              "note": ["s", "t"]}]
    path = write_parquet_atomic(tmp_path / "t.parquet", iter(parts))
    assert pq.ParquetFile(path).metadata.num_row_groups == 2
    frame = pd.concat([pd.DataFrame(p) for p in parts], ignore_index=True)
    want = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    assert pq.read_table(path).equals(want)
    with pytest.raises(ValueError):
        write_parquet_atomic(tmp_path / "empty.parquet", iter([]))
    assert not (tmp_path / "empty.parquet").exists()
    code = ("import sys, numpy as np; from moe_gps.atomic import write_csv_atomic, write_parquet_atomic\n"
            "t = {'s': ['a', 'b'], 'x': np.array([0.5, np.nan])}\n"
            "write_parquet_atomic(sys.argv[1] + '.parquet', t); write_csv_atomic(sys.argv[1] + '.csv', t)\n"
            "print('pandas' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "u")], capture_output=True, text=True, check=True)
    assert done.stdout == "False\n" and (tmp_path / "u.csv").read_text() == "s,x\na,0.5\nb,\n"


def test_csv_is_written_as_pandas_writes_it(tmp_path):
    """write_csv_atomic writes the bytes pandas' to_csv(index=False, float_format="%.6g") writes, for the
    kinds of columns the outputs have (numbers, text with commas and quotes, missing values, booleans)."""
    import pandas as pd

    from moe_gps.atomic import write_csv_atomic
    from moe_gps.tables import rows_to_columns

    rows = [{"strategy": "none", "predictor": None, "slots": 0, "mean_ms": 15.1309871, "accuracy": None,
             "ok": True, "big": 123456789, "tiny": 1.5e-9},
            {"strategy": 'dist:ema, "x"', "predictor": "ema", "slots": 4, "mean_ms": float("nan"),
             "accuracy": 0.321, "ok": False, "big": 2, "tiny": float("inf")}]
    cases = {"rows": rows_to_columns(rows),
             "arrays": {"step": np.arange(3), "x": np.array([1.0, np.nan, -0.0]), "flag": np.array([True, False, True]),
                        "name": np.array(["a", "b", ""], dtype=object)},
             "one": {"x": [np.nan, 2.0]}}
    for name, columns in cases.items():
        ours = write_csv_atomic(tmp_path / f"{name}.csv", columns).read_bytes()
        pd.DataFrame(columns).to_csv(tmp_path / f"{name}-pandas.csv", index=False, float_format="%.6g")
        assert ours == (tmp_path / f"{name}-pandas.csv").read_bytes(), name
    with pytest.raises(ValueError, match="different lengths"):
        write_csv_atomic(tmp_path / "bad.csv", {"a": [1, 2], "b": [1]})
    assert not (tmp_path / "bad.csv").exists()
