"""The argument parser of every command line: ``moe-gps`` and ``python -m runtime.launch`` / ``runtime.record_hf``.

A usage error is one line (``TAG: error: PROG: ...``) with exit 2, naming the (sub)command that
found it and its ``--help``.
"""

from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (``moe-gps: error: ...``) with exit 2.

    ``tag`` starts the line (default ``moe-gps``). Subcommand parsers are of the same class
    (``add_subparsers`` uses the parent's class). A flag must be spelled in
    full (``--step`` is not taken for ``--steps``), and arguments a parser does not know are a usage
    error of that parser, so a subcommand's line names the subcommand and its help.
    """

    #: the word that starts an error line
    tag = "moe-gps"

    def __init__(self, *args, tag: str | None = None, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        if tag:
            self.tag = tag

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.tag}: error: {self.prog}: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)

    def parse_known_args(self, args=None, namespace=None):
        """As argparse's, but an argument this parser does not know is a usage error here (not returned for
        the parent parser to report under its own name); and an empty or blank value given to any argument
        (``-o ''``, ``--cluster=``) is a usage error: no argument takes one, and read as absent it would
        quietly run with the default."""
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        for action in self._actions:
            value = getattr(namespace, action.dest, None)
            if value is action.default:
                continue
            if any(isinstance(v, str) and not v.strip() for v in (value if isinstance(value, list) else [value])):
                self.error(f"argument {'/'.join(action.option_strings) or action.metavar or action.dest}: "
                           f"an empty value ({value!r})")
        return namespace, extras
