"""The process table, read from /proc (psutil elsewhere), and signals that never hit a stranger.

Every decision about the host's tree starts from one look at every process (`process_table`): its
parent, group, session, zombie state and start time. The start time is what tells a process from a
later one that got its pid: `signal_verified` pins the pid with a pidfd first and then checks it, so
a recycled pid is never signalled. `process.host` builds the host's tree from these pieces.

Where /proc is there (Linux), everything here is read from it (a process's stat, its statm for
memory, /proc/stat once for the boot time), and psutil is never imported: it is 0.8 MiB of a
resting daemon's RSS, for what those reads already say. Elsewhere (macOS) psutil answers,
imported at its first use.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

HAVE_PROC = Path("/proc/self/stat").exists()
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if HAVE_PROC else 100
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if HAVE_PROC else 4096
# Fields of /proc/<pid>/stat counted after the ")" that ends the command name (state is 0).
_PPID, _PGID, _SID, _UTIME, _STIME, _START = 1, 2, 3, 11, 12, 19
_SWEEP_WAIT = 0.5  # await_exits: longest wait for SIGKILLed processes before the next sweep


@dataclass(frozen=True, slots=True)
class ProcInfo:
    """What a tree decision needs to know of one process."""

    ppid: int
    pgid: int
    sid: int
    zombie: bool
    start: float  # opaque: equal for the same process, different once the pid is reused


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces and ")")."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except OSError:
        return None
    end = data.rfind(b")")
    return data[end + 2 :].split() if end > 0 else None


def proc_info(pid: int) -> ProcInfo | None:
    """Parent, group, session, zombie and start of `pid` from /proc (psutil elsewhere)."""
    if not HAVE_PROC:
        return _psutil_info(pid)
    if (fields := _stat_fields(pid)) is None:
        return None
    try:
        return ProcInfo(
            ppid=int(fields[_PPID]),
            pgid=int(fields[_PGID]),
            sid=int(fields[_SID]),
            zombie=fields[0] in (b"Z", b"X"),
            start=int(fields[_START]),
        )
    except (ValueError, IndexError):
        return None


def create_time(pid: int, info: ProcInfo | None = None) -> float | None:
    """When `pid` started, in seconds since the epoch, as psutil reckons it (boot time from
    /proc/stat plus the start in clock ticks); None when it is gone."""
    if not HAVE_PROC:
        psutil = _psutil()
        try:
            return float(psutil.Process(pid).create_time())
        except psutil.Error:
            return None
    info = info or proc_info(pid)
    return None if info is None else info.start / CLOCK_TICKS + boot_time()


def boot_time() -> float:
    """/proc/stat's btime (whole seconds), read once as psutil does: the kernel derives it from
    the wall clock, so reading it again after a clock step could move every start time."""
    global _BOOT_TIME
    if _BOOT_TIME is None:
        with open("/proc/stat", "rb") as stat:
            line = next(line for line in stat if line.startswith(b"btime "))
        _BOOT_TIME = float(line.split()[1])
    return _BOOT_TIME


_BOOT_TIME: float | None = None


def _psutil() -> types.ModuleType:
    import psutil

    return psutil


def _psutil_info(pid: int) -> ProcInfo | None:
    psutil = _psutil()
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
        pids = _psutil().pids()
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
    if not HAVE_PROC:
        return _psutil_stats(pids)
    pages = ticks = 0
    for pid in pids:
        if (fields := _stat_fields(pid)) is None:
            continue
        try:
            # statm's resident count, as psutil reads it: stat's rss field is a per-CPU
            # approximation that can lag by a few hundred KiB
            with open(f"/proc/{pid}/statm", "rb") as statm:
                resident = int(statm.read().split()[1])
            busy = int(fields[_UTIME]) + int(fields[_STIME])
        except (OSError, ValueError, IndexError):
            continue
        pages, ticks = pages + resident, ticks + busy
    return pages * PAGE_SIZE, ticks / CLOCK_TICKS


def _psutil_stats(pids: Iterable[int]) -> tuple[int, float]:
    psutil = _psutil()
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
