"""``python -m runtime.torchrun ARGS``: ``torchrun ARGS`` (``torch.distributed.run``), ending in one line.

torchrun passes SIGINT, SIGTERM or SIGHUP on to its ranks, waits for them, and then raises
``SignalException``; when a rank fails it raises ``ChildFailedError``. Either printed a traceback of
torchrun's own code after the ranks' one-line reasons. The commands that start torchrun (``moe-gps
run``, ``calibrate``, ``validate``) start it through here: the same torchrun, which ends with ``128 +
signal`` when a signal stopped it, and, when ranks failed, with one line naming each failed rank and
its exit code, and exit code 2 when every failed rank's was 2 (a user error it explained), else 1.
"""

from __future__ import annotations

import signal
import sys


def main() -> int:
    try:
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import main as torchrun
    except KeyboardInterrupt:       # Ctrl-C before torchrun started: the command that started it says so
        return 130
    try:
        torchrun()
    except SignalException as err:
        return 128 + int(err.sigval)
    except KeyboardInterrupt:       # before torchrun's own handlers are in place
        return 130
    except ChildFailedError as err:
        codes = {rank: f.exitcode for rank, f in sorted(err.failures.items())}
        print("torchrun: " + "; ".join(f"rank {rank} {_ended(code)}" for rank, code in codes.items()),
              file=sys.stderr)
        return 2 if all(code == 2 for code in codes.values()) else 1
    return 0


def _ended(code: int) -> str:
    """``exited with code 2``, or ``was killed by SIGSEGV`` for a negative exit code."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exited with code {code}"


if __name__ == "__main__":
    sys.exit(main())
