"""Errors a user can cause (bad file, bad config, bad flag), and failures of the machine
that a user must fix (disk full, no permission, out of memory).

The CLI prints a :class:`UserError` as one line and exits with code 2, without a
traceback. Library code raises it wherever the cause is the user's input.
:func:`environment_error` turns an ``OSError`` from the file system (disk full, no
permission, read-only file system, ...) or a ``MemoryError`` into such a line; the CLI,
the atomic writer and the runtime all use it.
"""

from __future__ import annotations

import errno
import os
import re

#: errno values that are about the machine or the user's paths, not a bug in moe-gps
ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "ENOSPC", "EDQUOT", "EFBIG", "EACCES", "EPERM", "EROFS", "EIO", "ENOTDIR", "EISDIR", "EEXIST",
        "ENOENT", "ENAMETOOLONG", "ELOOP", "EMFILE", "ENFILE", "ETXTBSY", "EXDEV", "ENXIO", "ENODEV",
    ) if hasattr(errno, name))


class UserError(Exception):
    """A problem with the user's input; ``str(err)`` is the one-line message."""

    exit_code = 2


class StrategyError(UserError):
    """A strategy's own problem (its predictor's or planner's options), found when it is made or fitted:
    ``strategies[index] (name): reason``, which the command line says where the strategy was given."""

    def __init__(self, index: int, name: str, reason: str):
        super().__init__(index, name, reason)          # as args: it crosses from a forked worker intact
        self.index, self.name, self.reason = index, name, reason

    def __str__(self) -> str:
        return f"strategies[{self.index}] ({self.name}): {self.reason}"


class HostLimit(UserError):
    """Input this machine cannot simulate now (not enough memory for it), which another machine, or this one
    with fewer workers, could: a sweep records it without caching it, so that a rerun tries again."""


def _errno_of(err: OSError) -> int | None:
    """The error number; pyarrow's OSErrors carry it only in their text ('... [errno 28] No space ...')."""
    if err.errno is not None:
        return err.errno
    found = re.search(r"\[errno (\d+)\]", str(err), re.IGNORECASE)
    return int(found.group(1)) if found else None


def os_reason(err: BaseException) -> str:
    """A short reason for an OSError or MemoryError: the system's words, one line."""
    if isinstance(err, OSError):
        number = _errno_of(err)
        if number is not None:
            return os.strerror(number)
    text = str(err).strip().splitlines()
    return (text[0][:300] if text else type(err).__name__)


def environment_error(err: BaseException, path: object = None, flag: str | None = None) -> UserError | None:
    """The one-line :class:`UserError` for a file-system or memory failure, else None.

    ``path`` (else the error's own file name) and ``flag`` (the option that chose the path
    or sized the work) are named in the message.
    """
    if isinstance(err, MemoryError):
        what = f"{flag}: " if flag else ""
        return UserError(f"{what}out of memory ({os_reason(err)}); make the input or the numbers that size it "
                         "smaller")
    if not isinstance(err, OSError) or _errno_of(err) not in ENVIRONMENT_ERRNOS:
        return None
    name = path if path is not None else err.filename
    where = " ".join(str(x) for x in (flag, name) if x is not None)
    text = f"cannot write ({os_reason(err)})" if path is not None else os_reason(err)
    return UserError(f"{where}: {text}" if where else text)


def report(err: BaseException, prog: str, who: str = "") -> int | None:
    """Print the one line for an error a user can act on and return the exit code; None for a bug.

    :class:`UserError` (exit 2), Ctrl-C / SIGTERM / SIGHUP (130 / 143 / 129) and file-system or
    memory failures (:func:`environment_error`, exit 2). ``prog`` starts the line (``moe-gps``,
    ``runtime.launch``); ``who`` (e.g. ``rank 1: ``) follows it.
    """
    import sys

    from moe_gps import signals

    if isinstance(err, KeyboardInterrupt):
        print(f"{prog}: {who}{signals.describe(err)}", file=sys.stderr)
        return signals.exit_code(err)
    mapped = err if isinstance(err, UserError) else environment_error(err)
    if mapped is None:
        return None
    print(f"{prog}: error: {who}{mapped}", file=sys.stderr)
    return mapped.exit_code
