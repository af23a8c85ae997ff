"""`[hooks] on_event`: tell the operator's program about events, at least once, in order.

The store's audit log is the queue. One worker thread reads the events after a delivery cursor
kept in the store, runs the hook for each one the config selects (its JSON on stdin, a 10 s
limit), and moves the cursor on once the hook has it. So nothing is lost to a slow hook, to a
rollback (a swap's job cancellation never touches a hook), or to a restart of swapguard: the
next swapguard goes on after the cursor, and the event whose run a crash cut short is delivered
again (at least once). A run that exits non-zero or times out is tried again with backoff
(tenacity, the core's one formula) before the next event. An event is finally dropped only when
every run failed, or when the store trimmed it before the hook could see it (the log keeps the
newest 100 000): both are counted (`/metrics`) and logged. A new hook starts at the newest event;
it is not handed the history.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tenacity

from supervisor.config.schema import HooksConfig
from supervisor.core.backoff import exponential
from supervisor.process import jobs
from supervisor.state.store import EventRecord, Store, StoreError

log = logging.getLogger(__name__)

CURSOR_KEY = "hooks.delivered"
"""The store value holding the id of the last event the hook has had (or that was dropped)."""
HOOK_TIMEOUT = 10.0
HOOK_ATTEMPTS = 4
"""Runs of the hook per event: a receiver that is down for a few seconds still gets it."""
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 8.0
BATCH = 100
STORE_RETRY_S = 1.0  # the store could not be read or written: try again this much later
CLOSE_GRACE_S = 2.0  # on close, how long a run in flight may go on before it is cancelled


class HookRunner:
    def __init__(
        self,
        config: HooksConfig,
        *,
        store: Store,
        cwd: Path,
        output_dir: Path | None = None,
        published: Callable[[], int | None] = lambda: None,
        timeout: float = HOOK_TIMEOUT,
        attempts: int = HOOK_ATTEMPTS,
        retry_first: float = RETRY_FIRST_S,
        retry_max: float = RETRY_MAX_S,
    ) -> None:
        """`output_dir`: where each run's output is kept, readable by swapguard's user only;
        `published()`: the newest event id whose state the status shows (None: every event)."""
        self.argv = tuple(config.on_event)
        self.patterns = tuple(config.events)
        self.store = store
        self.cwd = cwd
        self.output_dir = output_dir
        self._published = published
        self.timeout = timeout
        self.given_up = 0  # written by the worker only: failed every run
        self.trimmed = 0  # events the store trimmed before the worker read them
        self.ran = 0
        self.failed = 0
        self._wake = threading.Event()  # set for every new event the hook wants
        self._closing = threading.Event()  # ends a wait (for events, or between runs) at once
        self._cancel = jobs.CancelToken()  # close() cuts a run in flight short, nothing else
        self._retrying = tenacity.Retrying(
            retry=tenacity.retry_if_result(lambda result: not result.ok),
            stop=tenacity.stop_after_attempt(attempts)
            | tenacity.stop_when_event_set(self._closing),
            wait=exponential(retry_first, retry_max, retry_first / 4, random.Random()),
            sleep=tenacity.sleep_using_event(self._closing),
            before_sleep=self._log_retry,
            retry_error_callback=_last_result,
        )
        self._thread: threading.Thread | None = None
        if self.argv:
            self._cursor = self._initial_cursor()
            self._thread = threading.Thread(target=self._work, name="swapguard-hooks", daemon=True)
            self._thread.start()

    @property
    def dropped(self) -> int:
        """Events selected for the hook that it never got (every run failed, or trimmed)."""
        return self.given_up + self.trimmed

    @property
    def cursor(self) -> int:
        """The id of the last event the hook has had, or that was dropped."""
        return self._cursor

    def matches(self, event: str) -> bool:
        return any(fnmatch.fnmatchcase(event, pattern) for pattern in self.patterns)

    def submit(self, event: dict[str, Any]) -> None:
        """Called on the loop thread for every event once it is in the store and its state is
        published: a wake-up, no more."""
        if self._thread is not None and self.matches(str(event.get("event", ""))):
            self._wake.set()

    def wake(self) -> None:
        """Entries were published whose kinds the loop did not hold (a worker wrote them): the
        hook reads the store past its cursor and runs for those it wants."""
        if self._thread is not None:
            self._wake.set()

    def close(self, timeout: float | None = None) -> None:
        """End the worker: a wait ends at once; a run in flight gets a short grace, then is cut
        (its event stays after the cursor, for the next swapguard)."""
        if self._thread is None:
            return
        self._closing.set()
        self._wake.set()
        self._thread.join(CLOSE_GRACE_S if timeout is None else timeout)
        self._cancel.cancel()
        self._thread.join(self.timeout + 1)
        self._thread = None
        self._cancel.close()

    # --- the worker ----------------------------------------------------------------------------

    def _initial_cursor(self) -> int:
        saved = self.store.get_value(CURSOR_KEY)
        if isinstance(saved, int) and not isinstance(saved, bool) and saved >= 0:
            return saved
        newest = self.store.newest_event_id()  # a new hook is not handed the history
        self.store.set_value(CURSOR_KEY, newest)
        return newest

    def _work(self) -> None:
        while not self._closing.is_set():
            self._wake.clear()  # before reading: an event stored meanwhile wakes the next wait
            try:
                batch = self.store.events_after(
                    self._cursor, limit=BATCH, up_to=self._published()
                )
            except StoreError as exc:
                log.error("hooks: cannot read the events: %s", exc)
                self._closing.wait(STORE_RETRY_S)
                continue
            if not batch:
                self._wake.wait()
                continue
            for record in batch:
                if self._closing.is_set():
                    return
                self._deliver(record)

    def _deliver(self, record: EventRecord) -> None:
        if record.id > self._cursor + 1:  # the store trimmed these before the hook saw them
            self.trimmed += record.id - self._cursor - 1
            log.error("hooks: events %d to %d were trimmed before delivery", self._cursor + 1,
                      record.id - 1)  # fmt: skip
        if self.matches(record.kind):
            event = record.to_json()
            result: jobs.JobResult = self._retrying(self._run_once, event)
            if not result.ok:
                if self._closing.is_set():
                    return  # cut by close(): the next swapguard delivers it
                self.given_up += 1
                log.error(
                    "hook for event %s (#%s) dropped after %d run(s): %s",
                    record.kind, record.id,
                    self._retrying.statistics.get("attempt_number", 1), result.describe(),
                )  # fmt: skip
        self._cursor = record.id
        try:
            self.store.set_value(CURSOR_KEY, record.id)
        except StoreError as exc:  # delivered again after a restart: at least once still holds
            log.error("hooks: cannot record the delivery of event #%d: %s", record.id, exc)

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
            cancel=self._cancel,
            output_to=output,
            with_the_swap=False,  # a rollback's CancelJobs must not cost the hook its event
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
