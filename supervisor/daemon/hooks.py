"""`[hooks] on_event`: tell the operator's program about events, never blocking the clock.

Events are queued to one worker thread, which runs the hook for each matching event with the event's
JSON on stdin, bounded by a 10 s limit. A run that exits non-zero or times out is tried again with
backoff (tenacity, the core's one formula) a bounded number of times before the next event, so the
hook sees events in order. The queue is bounded too: when a hook is slower than the events, the
newest are dropped rather than delaying anything else. Every event finally dropped, by a full queue
or by a hook that failed every attempt, is counted (`/metrics`) and logged.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import queue
import random
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tenacity

from supervisor.config.schema import HooksConfig
from supervisor.core.backoff import exponential
from supervisor.process import jobs

log = logging.getLogger(__name__)

HOOK_TIMEOUT = 10.0
QUEUE_LIMIT = 1000
HOOK_ATTEMPTS = 4
"""Runs of the hook per event: a receiver that is down for a few seconds still gets it."""
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 8.0


class HookRunner:
    def __init__(
        self,
        config: HooksConfig,
        *,
        cwd: Path,
        output_dir: Path | None = None,
        timeout: float = HOOK_TIMEOUT,
        attempts: int = HOOK_ATTEMPTS,
        retry_first: float = RETRY_FIRST_S,
        retry_max: float = RETRY_MAX_S,
    ) -> None:
        """`output_dir`: where each run's output is kept, readable by swapguard's user only."""
        self.argv = tuple(config.on_event)
        self.output_dir = output_dir
        self.patterns = tuple(config.events)
        self.cwd = cwd
        self.timeout = timeout
        self.queue_full = 0  # written by the loop thread only
        self.given_up = 0  # written by the worker only: failed every attempt, or cut by close()
        self.ran = 0
        self.failed = 0
        self._closing = threading.Event()  # ends a wait between attempts at once
        self._retrying = tenacity.Retrying(
            retry=tenacity.retry_if_result(lambda result: not result.ok),
            stop=tenacity.stop_after_attempt(attempts)
            | tenacity.stop_when_event_set(self._closing),
            wait=exponential(retry_first, retry_max, retry_first / 4, random.Random()),
            sleep=tenacity.sleep_using_event(self._closing),
            before_sleep=self._log_retry,
            retry_error_callback=_last_result,
        )
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=QUEUE_LIMIT)
        self._thread: threading.Thread | None = None
        if self.argv:
            self._thread = threading.Thread(target=self._work, name="swapguard-hooks", daemon=True)
            self._thread.start()

    @property
    def dropped(self) -> int:
        """Events the hook never got: its queue was full, or every attempt failed."""
        return self.queue_full + self.given_up

    def matches(self, event: str) -> bool:
        return any(fnmatch.fnmatchcase(event, pattern) for pattern in self.patterns)

    def submit(self, event: Mapping[str, Any]) -> None:
        """Called on the loop thread for every event; cheap when nothing matches."""
        if self._thread is None or not self.matches(str(event.get("event", ""))):
            return
        try:
            self._queue.put_nowait(dict(event))
        except queue.Full:
            self.queue_full += 1
            log.error(
                "hook queue full: dropped event %s (#%s)", event.get("event"), event.get("id")
            )

    def close(self, timeout: float | None = None) -> None:
        """End the worker: a wait between attempts ends at once, and the event in flight and those
        queued get one last run each, within `timeout`; what still fails is dropped and counted."""
        if self._thread is None:
            return
        self._closing.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            jobs.cancel_all()
        self._thread.join(self.timeout + 1 if timeout is None else timeout)
        self._thread = None

    def _work(self) -> None:
        while (event := self._queue.get()) is not None:
            result: jobs.JobResult = self._retrying(self._run_once, event)
            if not result.ok:
                self.given_up += 1
                log.error(
                    "hook for event %s (#%s) dropped after %d run(s): %s",
                    event.get("event"), event.get("id"),
                    self._retrying.statistics.get("attempt_number", 1), result.describe(),
                )  # fmt: skip

    def _run_once(self, event: dict[str, Any]) -> jobs.JobResult:
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
            timeout=self.timeout,
            stdin=payload,
            log_name="hook",
            output_to=output,
        )
        self.ran += 1
        if not result.ok:
            self.failed += 1
            kept = "" if output is None else f"; output in {output}"
            log.warning("hook for %s: %s%s", event.get("event"), result.describe(), kept)
        return result

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        event = state.args[0] if state.args else {}
        result = state.outcome.result() if state.outcome else None
        log.warning(
            "hook for event %s (#%s) %s; again in %.1f s (run %d failed)",
            event.get("event"), event.get("id"), result.describe() if result else "failed",
            state.upcoming_sleep, state.attempt_number,
        )  # fmt: skip


def _last_result(state: tenacity.RetryCallState) -> jobs.JobResult:
    """Out of attempts: hand back the last run's result, not tenacity's RetryError."""
    assert state.outcome is not None
    result: jobs.JobResult = state.outcome.result()
    return result
