"""Process facts from psutil, and signals that never hit a stranger.

Every decision about the host's tree starts from one look at every process (`process_table`): its
parent, group, session, zombie state and identity. The identity is psutil's own handle: two
handles are equal only for the same pid *and* start time, so `signal_verified` pins the pid with a
pidfd first and then asks psutil whether the handle still names that process (`is_running`); a
recycled pid is never signalled. `process.host` builds the host's tree from these pieces.

psutil has no process group or session, so those two come from `os.getpgid`/`os.getsid`. Our
own code stays only where psutil has nothing: pidfds (here), the cgroup leaf (`process.cgroup`),
the child subreaper and its own-children read on the exit path (`process.host`).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import psutil

_SWEEP_WAIT = 0.5  # await_exits: longest wait for SIGKILLed processes before the next sweep
_ENDED = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


@dataclass(frozen=True, slots=True)
class ProcInfo:
    """What a tree decision needs to know of one process."""

    process: psutil.Process  # its identity: equal only to a handle on the same pid and start
    ppid: int
    pgid: int
    sid: int
    zombie: bool


def proc_info(pid: int) -> ProcInfo | None:
    """Parent, group, session, zombie state and identity of `pid`; None when it is gone."""
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            return _info(process, process.ppid(), process.status())
    except (psutil.Error, OSError):
        return None


def _info(process: psutil.Process, ppid: int | None, status: str | None) -> ProcInfo | None:
    """Group and session are not psutil's: a syscall each (raises OSError once it is gone)."""
    if ppid is None or status is None:
        return None
    pid = process.pid
    return ProcInfo(process, ppid, os.getpgid(pid), os.getsid(pid), status in _ENDED)


def process_table() -> dict[int, ProcInfo]:
    """One consistent-enough look at every process: the basis of each tree decision.

    psutil's iterator keeps its handles from one call to the next and (since psutil 6) no longer
    checks them for a reused pid, so a handle it kept could carry the start of a process long
    gone: the cache is dropped first, and every identity here is read now."""
    psutil.process_iter.cache_clear()
    table: dict[int, ProcInfo] = {}
    for process in psutil.process_iter(["ppid", "status"]):
        with contextlib.suppress(OSError):
            if (info := _info(process, process.info["ppid"], process.info["status"])) is not None:
                table[process.pid] = info
    return table


def descendants(table: Mapping[int, ProcInfo], roots: Iterable[int]) -> set[int]:
    """Every process below `roots` in `table` (roots excluded), by parent links."""
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info.ppid, []).append(pid)
    found: set[int] = set()
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def signal_verified(process: psutil.Process, sig: int) -> tuple[bool, int | None]:
    """Signal `process` only if its pid still names it; race-free with a pidfd (it pins the
    process, then psutil compares the start time). Returns whether it was sent and the pidfd
    (the caller closes it) to wait on its exit."""
    pidfd = open_pidfd(process.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
        if process.is_running():
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, sig)
            else:
                os.kill(process.pid, sig)
            return True, pidfd
    if pidfd is not None:
        os.close(pidfd)
    return False, None


def await_exits(pidfds: list[int], deadline: float) -> None:
    """Wait (bounded) until the given processes exited; closes the fds."""
    poller = select.poll()
    for fd in pidfds:
        poller.register(fd, select.POLLIN)
    pending = len(pidfds)
    try:
        while pending:
            remaining = min(deadline - time.monotonic(), _SWEEP_WAIT)
            ready = poller.poll(remaining * 1000) if remaining > 0 else []
            if not ready:
                return
            for fd, _ in ready:
                poller.unregister(fd)
            pending -= len(ready)
    finally:
        for fd in pidfds:
            os.close(fd)


def process_stats(pids: Iterable[int]) -> tuple[int, float]:
    """Total RSS bytes and CPU seconds (user + system) of `pids`; vanished ones count 0."""
    rss, cpu = 0, 0.0
    for pid in pids:
        try:
            process = psutil.Process(pid)
            with process.oneshot():
                memory, times = process.memory_info(), process.cpu_times()
        except psutil.Error:
            continue
        rss += memory.rss
        cpu += times.user + times.system
    return rss, cpu


def signal_group(pgid: int, sig: int) -> None:
    """killpg that shrugs off a group already gone; shared by the host and the jobs."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def open_pidfd(pid: int) -> int | None:
    """A pollable exit handle (pidfd), or None where the platform has none: then poll."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        return opener(pid)
    except OSError:
        return None
