"""Entry point of the ``moe-gps`` command.

Every subcommand module exposes ``register(subparsers)``, which adds its parser and
sets ``func`` (called with the parsed ``argparse.Namespace``; returns an exit code or
None). Modules import their heavy dependencies inside ``func`` so that ``--help`` is
fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from moe_gps import __version__
from moe_gps.argparsing import Parser
from moe_gps.errors import UserError

# Subcommand modules, in the order they appear in --help.
COMMANDS = (
    "moe_gps.cli.trace_cmd",
    "moe_gps.cli.predict_cmd",
    "moe_gps.cli.plan_cmd",
    "moe_gps.cli.simulate_cmd",
    "moe_gps.cli.serve_cmd",
    "moe_gps.cli.recommend_cmd",
    "moe_gps.cli.run_cmd",
    "moe_gps.cli.fidelity_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="moe-gps",
        description=(
            "MoE-GPS: should you duplicate hot experts, and should duplication be driven by "
            "token-to-expert or distribution-only prediction? Answers from router traces. Commands and a "
            "quick start: README.md."
        ),
    )
    parser.add_argument("--version", action="version", version=f"moe-gps {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (0 ok, 1 failed, 2 user error, 128 + signal stopped).

    SIGTERM and SIGHUP stop a command like Ctrl-C (:mod:`moe_gps.signals`). A file-system or
    memory failure (disk full, no permission, out of memory) is one line with exit 2.
    """
    from moe_gps import signals
    from moe_gps.errors import report
    from moe_gps.outputs import command_scope

    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt as err:              # Ctrl-C while the commands load: one line, no traceback
        return report(err, "moe-gps")
    try:
        with signals.handled(), command_scope():
            code = args.func(args)
            sys.stdout.flush()
    except BrokenPipeError:
        return _stdout_closed()
    except (UserError, KeyboardInterrupt, OSError, MemoryError) as err:
        failed = report(err, "moe-gps")
        if failed is None:
            raise
        return failed
    return int(code or 0)


def _stdout_closed() -> int:
    """The reader of our output went away (``moe-gps trace inspect X | head``): end quietly.

    Later writes, and the flush at exit, go to /dev/null instead of raising again. Exit
    code 141 (128 + SIGPIPE), as a command killed by the broken pipe would report.
    """
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


if __name__ == "__main__":
    sys.exit(main())
