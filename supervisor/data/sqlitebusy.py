"""Short retries of one call on a SQLite database another process may hold (the host, a
straggler of its tree, an operator's shell).

SQLite's busy handler waits on a lock, but some busy answers skip it and come back at once: a WAL
checkpoint that a reader holds back reports busy as its result, a write slipped in between our
commit and checkpoint leaves the WAL non-empty, a WAL being recovered answers SQLITE_BUSY. Each
call here keeps its own connection timeout short and lets tenacity try again, with the core's
one backoff formula, until a bound its caller chose; then the last error stands.
"""

from __future__ import annotations

import logging
import random
import sqlite3

import tenacity

from supervisor.core.backoff import exponential
from supervisor.errors import SnapshotError

log = logging.getLogger(__name__)

ATTEMPT_TIMEOUT_S = 0.25
"""SQLite's own busy wait per attempt (the `timeout` of a connection opened inside the retry)."""


class SqliteBusy(SnapshotError):
    """Another process holds the database, or wrote to it meanwhile: worth another try soon."""


def is_busy(exc: BaseException) -> bool:
    if isinstance(exc, SqliteBusy):
        return True
    text = str(exc)
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def while_busy(within: float, what: str) -> tenacity.Retrying:
    """Retry the call while the database `what` is busy, for up to `within` seconds in all."""

    def log_retry(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait_ms = state.upcoming_sleep * 1000
        log.info("%s is busy (%s); trying again in %.0f ms", what, error, wait_ms)

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_busy),
        wait=exponential(0.02, 0.25, jitter=0.02, rng=random.Random()),
        stop=tenacity.stop_after_delay(within),
        before_sleep=log_retry,
        reraise=True,
    )
