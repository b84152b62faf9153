"""Output folders record the code and the trace file their numbers came from."""

from __future__ import annotations

import hashlib

import pytest

from moe_gps import __version__
from moe_gps.provenance import _CHUNK, code_digest, file_sha256, provenance_comment


def test_file_sha256_is_what_sha256sum_prints_over_several_blocks(tmp_path):
    data = bytes(range(256)) * (3 * _CHUNK // 256 + 7)          # more than 3 blocks, the last one partial
    path = tmp_path / "t.parquet"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert file_sha256(tmp_path) is None and file_sha256(tmp_path / "missing") is None


def test_the_comment_names_version_code_and_trace(tmp_path):
    path = tmp_path / "t.parquet"
    path.write_bytes(b"routing")
    line = provenance_comment(str(path))
    assert line == (f"# moe-gps {__version__}, simulator code {code_digest()}; trace {path}, sha256 "
                    f"{hashlib.sha256(b'routing').hexdigest()}\n")
    assert "(not a file here: no checksum)" in provenance_comment(str(tmp_path / "gone.parquet"))
    assert provenance_comment(None).endswith("; no trace file\n")
    assert len(code_digest()) == 16 and code_digest() == code_digest()


def test_the_code_digest_covers_sub_folders(monkeypatch, tmp_path):
    """sim/serving is part of the simulator: a change there changes the digest."""
    import moe_gps.provenance as prov

    root = tmp_path / "src"
    (root / "moe_gps").mkdir(parents=True)
    (root / "sim" / "serving").mkdir(parents=True)
    (root / "sim" / "run.py").write_text("a = 1\n")
    (root / "sim" / "serving" / "run.py").write_text("b = 1\n")
    monkeypatch.setattr(prov, "__file__", str(root / "moe_gps" / "provenance.py"))
    first = prov.code_digest()
    (root / "sim" / "serving" / "run.py").write_text("b = 2\n")
    assert prov.code_digest() != first


@pytest.mark.parametrize("rel", ["moe_gps/trace/regroup.py", "moe_gps/trace/data.py", "moe_gps/config/loader.py",
                                 "moe_gps/recommend/runner.py"])
def test_the_code_digest_covers_the_code_that_makes_the_loads_and_the_configs(monkeypatch, tmp_path, rel):
    """The trace's loads and regrouping, the config checks and a sweep's records decide numbers too."""
    import moe_gps.provenance as prov

    root = tmp_path / "src"
    (root / rel).parent.mkdir(parents=True)
    (root / "moe_gps").mkdir(exist_ok=True)
    (root / rel).write_text("a = 1\n")
    monkeypatch.setattr(prov, "__file__", str(root / "moe_gps" / "provenance.py"))
    first = prov.code_digest()
    (root / rel).write_text("a = 2\n")
    assert prov.code_digest() != first


def test_a_file_is_hashed_once_while_unchanged_and_again_once_changed(tmp_path, monkeypatch):
    import builtins
    import os

    path = tmp_path / "t.parquet"
    path.write_bytes(b"first")
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    assert file_sha256(path) == file_sha256(path) == hashlib.sha256(b"first").hexdigest()
    assert opened.count(str(path.resolve())) == 1                    # recorded in two files, read once
    path.write_bytes(b"other")                                       # the same size, another time
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))
    assert file_sha256(path) == hashlib.sha256(b"other").hexdigest()
