"""Reading the user's input files, with one clear line when something is wrong.

:func:`input_file` is the single check that a path names an existing regular file;
:func:`read_yaml` / :func:`parse_yaml` are the single YAML reader (fast C loader when
available; syntax errors name the line and column). Configs, placements, run configs
and traces all go through here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from moe_gps.errors import UserError
from moe_gps.outputs import special_kind


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The safe loader (the C one when available), stricter where YAML 1.1 is silent: a key given twice
    in one mapping is an error (not the last one winning), and ``3e2`` / ``8.4e6`` are numbers (YAML 1.1
    reads a float with an exponent but without a dot or a sign, as YAML 1.2 writes them, as a string)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def input_file(path: str | os.PathLike, what: str = "a file") -> Path:
    """``Path(path)`` if it is an existing file; UserError ``<path>: no such file`` etc. otherwise."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such file")
    if p.is_dir():
        raise UserError(f"{path}: is a folder, not {what}")
    kind = special_kind(p.stat().st_mode)
    if kind:                                  # a FIFO or a device: never opened (it could block)
        raise UserError(f"{path}: is {kind}, not a regular file")
    return p


def beyond_parser(err: ValueError | RecursionError, fmt: str) -> str:
    """``not valid JSON (...)`` for well-formed text that Python's parsers still refuse: nesting deeper than
    the stack, or an integer of more digits than Python converts."""
    why = "nested too deep" if isinstance(err, RecursionError) else str(err).split(";")[0]
    return f"not valid {fmt} ({why})"


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML text; ``where`` (the file name) prefixes error messages. Empty text is an error."""
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{where}: not valid YAML{at}: {problem}") from None
    except (ValueError, RecursionError) as err:
        raise UserError(f"{where}: {beyond_parser(err, 'YAML')}") from None
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
