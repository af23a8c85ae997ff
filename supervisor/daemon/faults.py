"""Fault injection for the test suite: a kill -9, a stuck loop, and the loop's own faults.

Each is set by a variable of swapguard's environment, read once at import; unset, each costs one
comparison where it sits. `<point>` is `<state>/<step>` of a swap record just persisted
(`probation/None` once the new version runs).

- `SWAPGUARD_CRASH_AT=<point>`: die (exit 86) right after that record is persisted and before its
  actions run, as a kill -9 would (`baseline/at_start`: once the host is spawned at start,
  before its code baseline is taken).
- `SWAPGUARD_STALL_AT=<point>`: block the loop there for good, as a call that never returns would:
  the stall detector must end the process.
- `SWAPGUARD_STORE_FAILS_AT=<point>`: from there, for `SWAPGUARD_STORE_FAILS_S` seconds (default
  3), every swap record and audit event the loop writes is refused (`StoreError`), as a full or
  failing state disk would: the ticks must go on.
- `SWAPGUARD_MANAGER_RAISES=1`: every datagram to our own service manager raises from inside the
  send: it must never reach the loop.
- `SWAPGUARD_KILL_BLOCKS_S=<seconds>`: every tree kill takes at least that long to see the tree
  gone, as a kernel slow to reap a big tree (or a process in D state) would.
- `SWAPGUARD_OCCUPY_POOL_AT=<point>`: there, every worker of the general pool gets a job that never
  returns (a check, a settle or a hash stuck on a hung file system): rollback steps and tree kills
  must not wait for them, nor must a SIGTERM.
- `SWAPGUARD_SLOW_EVENTS_S=<seconds>`: every audit entry the loop writes returns that long after
  its commit, as a loop preempted there on a busy machine would: no reader may see the entry
  before the state it tells of.
- `SWAPGUARD_TEST_GIT_HOOKS=<folder>`: the git hooks in that folder run in swapguard's git commands
  (read by `code.gitcmd`, below this layer; by default no hook runs): a test holds a git inside its
  ref transaction, locks taken, and kills swapguard meanwhile.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from supervisor.state.store import Store, StoreError

log = logging.getLogger(__name__)

CRASH_EXIT = 86
CRASH_AT = os.environ.get("SWAPGUARD_CRASH_AT")
STALL_AT = os.environ.get("SWAPGUARD_STALL_AT")
STORE_FAILS_AT = os.environ.get("SWAPGUARD_STORE_FAILS_AT")
MANAGER_RAISES = os.environ.get("SWAPGUARD_MANAGER_RAISES") == "1"
OCCUPY_POOL_AT = os.environ.get("SWAPGUARD_OCCUPY_POOL_AT")


def _seconds(name: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(name) or default))
    except ValueError:
        log.warning("%s: not a number of seconds; using %g", name, default)
        return default


STORE_FAILS_S = _seconds("SWAPGUARD_STORE_FAILS_S", 3.0)
KILL_BLOCKS_S = _seconds("SWAPGUARD_KILL_BLOCKS_S", 0.0)
SLOW_EVENTS_S = _seconds("SWAPGUARD_SLOW_EVENTS_S", 0.0)
_store_fails_until: float | None = None
_never = threading.Event()  # what an occupied worker waits for


def reached(point: str, *, pool: Executor | None = None) -> None:
    """The loop is at `point` (`<state>/<step>` of the swap just persisted); `pool`: the general
    pool, for SWAPGUARD_OCCUPY_POOL_AT."""
    global _store_fails_until
    if point == STORE_FAILS_AT and _store_fails_until is None:
        log.warning("SWAPGUARD_STORE_FAILS_AT=%s: the store refuses for %gs", point, STORE_FAILS_S)
        _store_fails_until = time.monotonic() + STORE_FAILS_S
    if point == OCCUPY_POOL_AT and pool is not None:
        workers = getattr(pool, "_max_workers", 4)
        log.warning("SWAPGUARD_OCCUPY_POOL_AT=%s: %d workers stuck for good", point, workers)
        for _ in range(workers):
            pool.submit(_never.wait)
    if point == CRASH_AT:
        log.warning("SWAPGUARD_CRASH_AT=%s: dying here", point)
        os._exit(CRASH_EXIT)
    if point == STALL_AT:
        log.warning("SWAPGUARD_STALL_AT=%s: the loop stops here", point)
        threading.Event().wait()


_LOOP_WRITES = ("save_swap_with_events", "append_events", "append_event")


def guard_store(store: Store) -> Store:
    """`store`, whose loop-side writes refuse while SWAPGUARD_STORE_FAILS_AT says so, and return
    late by SWAPGUARD_SLOW_EVENTS_S."""
    for name in _LOOP_WRITES if STORE_FAILS_AT is not None else ():
        setattr(store, name, _failing(getattr(store, name)))
    for name in _LOOP_WRITES if SLOW_EVENTS_S else ():
        setattr(store, name, _slow(getattr(store, name)))
    return store


def _slow(write: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(write)
    def late(*args: Any, **kwargs: Any) -> Any:
        written = write(*args, **kwargs)
        time.sleep(SLOW_EVENTS_S)
        return written

    return late


def _failing(write: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(write)
    def refusing(*args: Any, **kwargs: Any) -> Any:
        if _store_fails_until is not None and time.monotonic() < _store_fails_until:
            raise StoreError("SWAPGUARD_STORE_FAILS_AT: the state store refuses (injected)")
        return write(*args, **kwargs)

    return refusing


def manager_send() -> None:
    """Called inside each send to our service manager."""
    if MANAGER_RAISES:
        raise RuntimeError("SWAPGUARD_MANAGER_RAISES: the manager's socket raised (injected)")


def kill_blocks() -> None:
    """Called on the worker that waits for a tree kill."""
    if KILL_BLOCKS_S:
        time.sleep(KILL_BLOCKS_S)
