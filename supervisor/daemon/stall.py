"""A watch on the event loop from outside it: a loop that stops turning ends swapguard.

Why: the loop owns the deadman clock. Whatever holds it (a call that blocks on a path the host
made into a FIFO, a kernel that takes seconds to kill a tree, a bug) holds every deadline with it,
and nothing on the loop can notice. A thread can: every `limit / 2` it asks the loop to answer,
and when no answer came for `limit`, it logs where the loop thread stands and exits with
`EXIT_STALLED`. The service manager restarts swapguard, which adopts the host and resumes the
journaled swap from the store, deadlines included.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
import traceback

log = logging.getLogger(__name__)

EXIT_STALLED = 70
"""swapguard's exit code when its loop stalled (EX_SOFTWARE): the manager should restart it."""


class StallDetector:
    """Started on the loop thread; `stop()` before the loop ends."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: float) -> None:
        self.loop = loop
        self.limit = limit
        self._loop_thread = threading.get_ident()
        self._answered = time.monotonic()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="swapguard-stall", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _answer(self) -> None:
        self._answered = time.monotonic()

    def _watch(self) -> None:
        while not self._stopped.wait(self.limit / 2):
            silent = time.monotonic() - self._answered
            if silent >= self.limit:
                self._stalled(silent)
                return
            try:
                self.loop.call_soon_threadsafe(self._answer)
            except RuntimeError:  # the loop closed under us: shutting down
                return

    def _stalled(self, silent: float) -> None:
        frame = sys._current_frames().get(self._loop_thread)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)\n"
        log.critical(
            "the event loop has not turned for %.1fs (stall_limit %gs); exiting %d for a restart."
            " The loop thread is at:\n%s",
            silent,
            self.limit,
            EXIT_STALLED,
            stack.rstrip(),
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_STALLED)
