"""Reading the user's input files, with one clear line when something is wrong.

:func:`input_file` is the single check that a path names an existing regular file;
:func:`read_yaml` / :func:`parse_yaml` are the single YAML reader (fast C loader when
available; syntax errors name the line and column). Configs, placements, run configs
and traces all go through here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from moe_gps.errors import UserError

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def input_file(path: str | os.PathLike, what: str = "a file") -> Path:
    """``Path(path)`` if it is an existing file; UserError ``<path>: no such file`` etc. otherwise."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such file")
    if p.is_dir():
        raise UserError(f"{path}: is a folder, not {what}")
    return p


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML text; ``where`` (the file name) prefixes error messages. Empty text is an error."""
    try:
        data = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{where}: not valid YAML{at}: {problem}") from None
    if data is None:
        raise UserError(f"{where}: empty YAML file")
    return data


def read_yaml(path: str | os.PathLike, what: str = "a YAML file") -> Any:
    """Read and parse a YAML file (see :func:`parse_yaml`)."""
    p = input_file(path, what)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read ({err})") from None
    return parse_yaml(text, str(path))
