"""The process table, read from /proc (psutil elsewhere), and signals that never hit a stranger.

Every decision about the host's tree starts from one look at every process (`process_table`): its
parent, group, session, zombie state and start time. The start time is what tells a process from a
later one that got its pid: `signal_verified` pins the pid with a pidfd first and then checks it, so
a recycled pid is never signalled. `supervisor.host` builds the host's tree from these pieces.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from supervisor import jobs
from supervisor.jobs import open_pidfd

HAVE_PROC = Path("/proc/self/stat").exists()
_SWEEP_WAIT = 0.5  # await_exits: longest wait for SIGKILLed processes before the next sweep


@dataclass(frozen=True, slots=True)
class ProcInfo:
    """What a tree decision needs to know of one process."""

    ppid: int
    pgid: int
    sid: int
    zombie: bool
    start: float  # opaque: equal for the same process, different once the pid is reused


def proc_info(pid: int) -> ProcInfo | None:
    """Parent, group, session, zombie and start of `pid` from /proc (psutil elsewhere)."""
    if not HAVE_PROC:
        return _psutil_info(pid)
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
        fields = data[data.rindex(b")") + 2 :].split()
        return ProcInfo(
            ppid=int(fields[1]),
            pgid=int(fields[2]),
            sid=int(fields[3]),
            zombie=fields[0] in (b"Z", b"X"),
            start=int(fields[19]),
        )
    except (OSError, ValueError, IndexError):
        return None


def _psutil_info(pid: int) -> ProcInfo | None:
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            ppid, status, start = proc.ppid(), proc.status(), proc.create_time()
        pgid, sid = os.getpgid(pid), os.getsid(pid)
    except (psutil.Error, OSError):
        return None
    return ProcInfo(ppid, pgid, sid, status == psutil.STATUS_ZOMBIE, start)


def process_table() -> dict[int, ProcInfo]:
    """One consistent-enough look at every process: the basis of each tree decision."""
    if HAVE_PROC:
        pids: Iterable[int] = (int(e.name) for e in os.scandir("/proc") if e.name.isdigit())
    else:
        pids = psutil.pids()
    return {pid: info for pid in pids if (info := proc_info(pid)) is not None}


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


def is_orphan(pid: int, info: ProcInfo, host_pid: int | None) -> bool:
    """A child of ours that nobody waits for and that came from outside our session."""
    return info.sid != os.getsid(0) and pid not in jobs.registered() and pid != host_pid


def signal_verified(pid: int, start: float, sig: int) -> tuple[bool, int | None]:
    """Signal `pid` only if it is still the process that started at `start`; race-free with a
    pidfd (it pins the process, then the start time is checked). Returns whether it was sent
    and the pidfd (the caller closes it) to wait on its exit."""
    pidfd = open_pidfd(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        info = proc_info(pid)
        if info is not None and info.start == start:
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, sig)
            else:
                os.kill(pid, sig)
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
            proc = psutil.Process(pid)
            with proc.oneshot():
                memory, times = proc.memory_info(), proc.cpu_times()
        except psutil.Error:
            continue
        rss += memory.rss
        cpu += times.user + times.system
    return rss, cpu
