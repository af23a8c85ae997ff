"""`[hooks] on_event`: tell the operator's program about events, never blocking the clock.

Events are queued to one worker thread, which runs the hook once per matching event with the event's
JSON on stdin, bounded by a 10 s limit. The queue is bounded too: when a hook is slower than the
events, the oldest-waiting ones are dropped and counted rather than delaying anything else.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import queue
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from supervisor.config.schema import HooksConfig
from supervisor.process import jobs

log = logging.getLogger(__name__)

HOOK_TIMEOUT = 10.0
QUEUE_LIMIT = 1000


class HookRunner:
    def __init__(self, config: HooksConfig, *, cwd: Path, output_dir: Path | None = None) -> None:
        """`output_dir`: where each run's output is kept, readable by swapguard's user only."""
        self.argv = tuple(config.on_event)
        self.output_dir = output_dir
        self.patterns = tuple(config.events)
        self.cwd = cwd
        self.dropped = 0
        self.ran = 0
        self.failed = 0
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=QUEUE_LIMIT)
        self._thread: threading.Thread | None = None
        if self.argv:
            self._thread = threading.Thread(target=self._work, name="swapguard-hooks", daemon=True)
            self._thread.start()

    def matches(self, event: str) -> bool:
        return any(fnmatch.fnmatchcase(event, pattern) for pattern in self.patterns)

    def submit(self, event: Mapping[str, Any]) -> None:
        """Called on the loop thread for every event; cheap when nothing matches."""
        if self._thread is None or not self.matches(str(event.get("event", ""))):
            return
        try:
            self._queue.put_nowait(dict(event))
        except queue.Full:
            self.dropped += 1
            log.warning("hook queue full: dropped event %s", event.get("event"))

    def close(self, timeout: float = HOOK_TIMEOUT + 1) -> None:
        if self._thread is None:
            return
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            jobs.cancel_all()
        self._thread.join(timeout)
        self._thread = None

    def _work(self) -> None:
        while (event := self._queue.get()) is not None:
            payload = json.dumps(event).encode() + b"\n"
            output = None
            if self.output_dir is not None:
                try:
                    output = jobs.new_output_file(self.output_dir, "hook")
                except OSError as exc:
                    log.warning("hook output not kept: %s", exc)
            result = jobs.run_job(
                self.argv,
                cwd=self.cwd,
                timeout=HOOK_TIMEOUT,
                stdin=payload,
                log_name="hook",
                output_to=output,
            )
            self.ran += 1
            if not result.ok:
                self.failed += 1
                kept = "" if output is None else f"; output in {output}"
                log.warning("hook for %s: %s%s", event.get("event"), result.describe(), kept)
