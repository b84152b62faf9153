"""The moe-gps command as a whole: usage errors are one line with exit code 2."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.mark.parametrize("args, fragment", [
    (["nonsense"], "moe-gps: argument COMMAND: invalid choice: 'nonsense'"),
    (["simulate"], "moe-gps simulate: the following arguments are required: trace"),
    (["trace", "import", "--from", "bogus", "x", "-o", "y"], "moe-gps trace import: argument --from: invalid choice"),
    (["plan", "t.parquet", "--gpus", "x", "--redundant", "0"], "moe-gps plan: argument --gpus: invalid int value: 'x'"),
])
def test_usage_errors_are_one_line_exit_2(args, fragment):
    proc = subprocess.run([sys.executable, "-m", "moe_gps.cli.main", *args], capture_output=True, text=True)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "\n" not in err and err.startswith("moe-gps: error: ")
    assert fragment in err
    assert proc.stdout == ""


def test_help_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "moe_gps.cli.main", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for name in ("trace", "predict", "plan", "simulate", "recommend", "run", "record"):
        assert re.search(rf"^    {name}\b", proc.stdout, re.M), name


@pytest.mark.parametrize("flag", ["-o", "--output", "--out"])
def test_every_command_takes_its_output_folder_as_o_or_output(flag):
    """predict evaluate and run take -o/--output as every other command does (and --out, as before)."""
    from moe_gps.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["predict", "evaluate", "t.parquet", flag, "D"]).out == "D"
    assert parser.parse_args(["run", "--config", "r.yaml", "--duplication", "off", flag, "D"]).out == "D"
