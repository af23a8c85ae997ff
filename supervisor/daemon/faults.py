"""Fault injection for the test suite: a kill -9 or a stuck loop at a chosen swap point.

`SWAPGUARD_CRASH_AT=<state>/<step>` makes the daemon die (exit 86) right after that swap record
is persisted and before its actions run, as a kill -9 would (`baseline/at_start`: once the host
is spawned at start, before its code baseline is taken). `SWAPGUARD_STALL_AT=<state>/<step>`
blocks the loop there for good, as a call that never returns would: the stall detector must end
the process. Both are read once at import; unset, `reached` is one comparison.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

CRASH_EXIT = 86
CRASH_AT = os.environ.get("SWAPGUARD_CRASH_AT")
STALL_AT = os.environ.get("SWAPGUARD_STALL_AT")


def reached(point: str) -> None:
    """The loop is at `point` (`<state>/<step>` of the swap just persisted)."""
    if point == CRASH_AT:
        log.warning("SWAPGUARD_CRASH_AT=%s: dying here", point)
        os._exit(CRASH_EXIT)
    if point == STALL_AT:
        log.warning("SWAPGUARD_STALL_AT=%s: the loop stops here", point)
        threading.Event().wait()
