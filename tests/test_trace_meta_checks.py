"""Bad trace inputs refused with one line and exit 2: metadata fields of the wrong JSON type, negative
seeds, and a trace path that is not a regular file."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from moe_gps.cli.main import main
from moe_gps.trace import TraceMeta, write_trace
from moe_gps.trace.meta import META_KEY
from moe_gps.trace.synth import synthesize


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("meta") / "good.parquet"
    write_trace(path, synthesize("mixtral-mmlu", num_steps=4, tokens_per_step=32, num_layers=4, seed=0))
    return str(path)


def with_meta(good: str, path, **changes) -> str:
    """A copy of ``good`` whose metadata has ``changes``."""
    table = pq.read_table(good)
    meta = json.loads(table.schema.metadata[META_KEY])
    meta.update(changes)
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()}), path)
    return str(path)


def one_line_error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err, err
    return err


BAD_FIELDS = [
    ("model", 123, "model", "must be a string, got a number (123)"),
    ("dataset", None, "dataset", "must be a string, got null"),
    ("kind", 5, "kind", "must be a string"),
    ("source", [], "source", "must be a string, got a list"),
    ("schema_version", True, "schema_version", "must be an integer, got a boolean"),
    ("num_layers", 4.0, "num_layers", "must be an integer, got a number (4.0)"),
    ("provenance", "a string", "provenance", 'must be a JSON object, got a string ("a string")'),
    ("provenance", ["x"], "provenance", "must be a JSON object, got a list"),
    ("tokens_per_step", "x", "tokens_per_step", "must be null or a list of non-negative integers"),
    ("tokens_per_step", [32, -1, 32, 32], "tokens_per_step", "entry 1 is a number (-1)"),
    ("provenance", {"original_layer_ids": [0, "1", 2, 3]}, "provenance.original_layer_ids",
     'must be a list of integers, got a list whose entry 1 is a string ("1")'),
    ("provenance", {"num_hidden_layers": "32"}, "provenance.num_hidden_layers", "must be an integer"),
    ("provenance", {"moe_layers": [1, 2, 3, 4]}, "provenance.moe_layers", "must be a list of strings"),
]


@pytest.mark.parametrize("field,value,name,says", BAD_FIELDS, ids=[f"{b[2]}={b[1]!r}" for b in BAD_FIELDS])
def test_metadata_field_of_wrong_type_is_refused(good, tmp_path, capsys, field, value, name, says):
    path = with_meta(good, tmp_path / "bad.parquet", **{field: value})
    err = one_line_error(["trace", "validate", path], capsys)
    assert err.startswith(f"moe-gps: error: {path}: metadata field '{name}' "), err
    assert says in err, err


def test_metadata_of_the_right_types_still_reads(good, tmp_path):
    path = with_meta(good, tmp_path / "ok.parquet", tokens_per_step=None,
                     provenance={"original_layer_ids": [1, 2, 3, 4], "num_hidden_layers": 5, "anything": [1, "x"]})
    meta = TraceMeta.from_json(pq.read_schema(path).metadata[META_KEY], path)
    assert meta.provenance["num_hidden_layers"] == 5 and meta.tokens_per_step is None


def test_numeric_model_name_is_refused_before_simulate(good, tmp_path, capsys):
    path = with_meta(good, tmp_path / "model.parquet", model=123)
    err = one_line_error(["simulate", path], capsys)
    assert "metadata field 'model' must be a string" in err


def test_string_provenance_is_refused_by_rechunk_and_plan(good, tmp_path, capsys):
    path = with_meta(good, tmp_path / "prov.parquet", provenance="a string")
    out = tmp_path / "out.parquet"
    err = one_line_error(["trace", "rechunk", path, "--tokens-per-step", "64", "-o", str(out)], capsys)
    assert "metadata field 'provenance' must be a JSON object" in err
    plan, sglang = tmp_path / "plan.yaml", tmp_path / "sglang.json"
    err = one_line_error(["plan", path, "--gpus", "2", "-o", str(plan), "--sglang", str(sglang)], capsys)
    assert "metadata field 'provenance' must be a JSON object" in err
    assert not out.exists() and not plan.exists() and not sglang.exists()


@pytest.mark.parametrize("kind", ["counts", "tokens"])
def test_more_layers_than_int16_ids_hold_is_refused_before_anything_is_written(tmp_path, capsys, kind):
    """40000 layers wrapped the int16 layer column to -32768 in a file that trace validate then refused."""
    out = tmp_path / "t.parquet"
    err = one_line_error(["trace", "synth", "--kind", kind, "--set", "num_layers=40000", "--set", "num_experts=2",
                          "--set", "top_k=1", "--steps", "1", "--tokens", "2", "-o", str(out)], capsys)
    assert "num_layers=40000 does not fit the int16 layer ids of the trace format" in err
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [
    ["predict", "evaluate", "{trace}", "--predictors", "synthetic", "--synthetic", "0.9", "--seed", "-1"],
    ["predict", "evaluate", "{trace}", "--predictors", "mlp", "--seed", "-5", "-o", "{out}"],
    ["trace", "synth", "--steps", "4", "--tokens", "16", "--seed", "-1", "-o", "{out}"],
    ["trace", "synth", "--kind", "counts", "--steps", "4", "--tokens", "16", "--seed", "-1", "-o", "{out}"],
], ids=["predict-synthetic", "predict-mlp", "synth-tokens", "synth-counts"])
def test_negative_seed_is_refused(good, tmp_path, capsys, argv):
    out = tmp_path / "out"
    argv = [a.format(trace=good, out=out) for a in argv]
    err = one_line_error(argv, capsys)
    seed = argv[argv.index("--seed") + 1]
    assert err == f"moe-gps: error: --seed must be >= 0, got {seed}"
    assert not out.exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_named_pipe_is_not_a_regular_file(tmp_path, capsys):
    fifo = tmp_path / "pipe.parquet"
    os.mkfifo(fifo)
    err = one_line_error(["trace", "validate", str(fifo)], capsys)   # must not wait for a writer
    assert err == f"moe-gps: error: {fifo}: is a FIFO, not a regular file"


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero here")
def test_device_is_not_a_regular_file(capsys):
    err = one_line_error(["trace", "inspect", "/dev/zero"], capsys)
    assert err == "moe-gps: error: /dev/zero: is a character device, not a regular file"
