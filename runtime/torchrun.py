"""``python -m runtime.torchrun ARGS``: ``torchrun ARGS`` (``torch.distributed.run``), quiet when stopped.

torchrun passes SIGINT, SIGTERM or SIGHUP on to its ranks, waits for them, and then raises
``SignalException``, whose traceback of torchrun's own code followed each rank's one line. The
commands that start torchrun (``moe-gps run``, ``calibrate``, ``validate``) start it through here:
the same torchrun, which ends with ``128 + signal`` and no traceback when a signal stopped it.
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.run import main as torchrun
    except KeyboardInterrupt:       # Ctrl-C (to the whole process group) before torchrun started: its starter says so
        return 130
    try:
        torchrun()
    except SignalException as err:
        return 128 + int(err.sigval)
    except KeyboardInterrupt:       # before torchrun's own handlers are in place
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
