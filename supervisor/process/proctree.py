"""Process facts from psutil, and signals that never hit a stranger.

Every decision about a tree starts from one look at the processes below its roots
(`subtree_table`): parent, group, session, zombie state and identity of each. The identity is
psutil's own handle: two handles are equal only for the same pid *and* start time, so
`signal_verified` pins the pid with a pidfd first and then asks psutil whether the handle still
names that process (`is_running`); a recycled pid is never signalled. `process.host` builds the
host's tree from these pieces, `process.jobs` a job's.

The table is only what lies below the roots, found by psutil's `children(recursive=True)`: one
pass over every process's parent link, then a full look only at what it found. A look at every
process (`process_iter`) would cost three reads of each process on the machine per sweep.

psutil has no process group or session, so those two come from `os.getpgid`/`os.getsid`. Our
own code stays only where psutil has nothing: pidfds (here), the cgroup leaf (`process.cgroup`),
the child subreaper and its own-children read on the exit path (`process.host`).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import psutil

from supervisor import clock

_SWEEP_WAIT = 0.5  # await_exits: longest wait for SIGKILLed processes before the next sweep
_ENDED = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
START_ROUNDING_S = 0.01
"""Start times since boot count in clock ticks (10 ms): two reads of one process's start agree to
one tick, and that is the slack any comparison of them allows."""
WALL_START_SLACK_S = 1.05
"""A start on the wall clock rests on /proc/stat's btime, whole seconds that may shift by one: the
slack of the fallback comparison (runs recorded before v5, macOS), which a wall step defeats."""


@dataclass(frozen=True, slots=True)
class ProcInfo:
    """What a tree decision needs to know of one process."""

    process: psutil.Process  # its identity: equal only to a handle on the same pid and start
    ppid: int
    pgid: int
    sid: int
    zombie: bool

    @property
    def start(self) -> float:
        """When it started (psutil's create_time, read once with the handle): a later process
        under the same pid has a later one."""
        return float(self.process.create_time())


def proc_info(pid: int) -> ProcInfo | None:
    """Parent, group, session, zombie state and identity of `pid`; None when it is gone."""
    try:
        return _info(psutil.Process(pid))
    except (psutil.Error, OSError):  # psutil lets a /proc file gone mid-read through as OSError
        return None


def _info(process: psutil.Process) -> ProcInfo | None:
    """What the table holds of one process; None once it is gone. Group and session are not
    psutil's: a syscall each."""
    try:
        with process.oneshot():
            ppid, status = process.ppid(), process.status()
        return ProcInfo(
            process, ppid, os.getpgid(process.pid), os.getsid(process.pid), status in _ENDED
        )
    except (psutil.Error, OSError):
        return None


def subtree_table(roots: Iterable[int], also: Iterable[int] = ()) -> dict[int, ProcInfo]:
    """The processes `roots`, every process below them and those of `also` (without what is below
    those): the part of the process table a decision about a tree needs. Gone ones are left out."""
    table: dict[int, ProcInfo] = {}
    for pid in roots:
        with contextlib.suppress(psutil.Error, OSError):
            root = psutil.Process(pid)
            for process in (root, *root.children(recursive=True)):
                if process.pid not in table and (info := _info(process)) is not None:
                    table[process.pid] = info
    for pid in also:
        if pid not in table and (info := proc_info(pid)) is not None:
            table[pid] = info
    return table


def uptime() -> float:
    """Seconds since boot, on the clock of `started_at_uptime`."""
    if (boottime := getattr(time, "CLOCK_BOOTTIME", None)) is not None:
        return time.clock_gettime(boottime)
    return time.time() - psutil.boot_time()


def started_at_uptime(info: ProcInfo) -> float:
    """When `info`'s process started, in seconds since boot: exact to the clock tick, where its
    create_time (placed on the wall clock through a boot time in whole seconds) is not."""
    return info.start - psutil.boot_time()


@dataclass(frozen=True, slots=True)
class StartStamp:
    """When a process started, as a record kept across our restarts can name it: on the wall
    clock (psutil's create_time) and, where the kernel gives them (Linux), in the boot it ran in
    (`boot_id`) and seconds since that boot (`since_boot`).

    Why both: psutil places a start on the wall clock through the boot time, which moves with
    the wall clock (an NTP step, a VM resumed, `date -s`), so after a step a live process no
    longer matches its recorded create_time. Its start in ticks since boot never moves, and the
    boot id tells a reboot apart. `since_boot` is None for a run recorded before schema v5 and
    where there is no /proc (macOS, whose boot id is made of the boot time and moves with the
    wall clock, and whose create_time does not): then the wall clock alone decides, as before."""

    wall: float
    boot_id: str
    since_boot: float | None

    def names_same_process(self, live: StartStamp) -> bool:
        """Is `live` (read from the process now under the recorded pid) the process this stamp
        recorded? Same boot and same start to a tick; the wall start (within a second) only
        when either has no start since boot."""
        if clock.BOOT_ID_FROM_KERNEL and self.boot_id != live.boot_id:
            return False  # another boot: any process under that pid is a stranger
        if self.since_boot is not None and live.since_boot is not None:
            return abs(self.since_boot - live.since_boot) <= START_ROUNDING_S
        return abs(self.wall - live.wall) <= WALL_START_SLACK_S


def start_stamp(info: ProcInfo) -> StartStamp:
    """`info`'s process's start, to record now and compare after a restart of ours."""
    since_boot = started_at_uptime(info) if clock.BOOT_ID_FROM_KERNEL else None
    return StartStamp(info.start, clock.BOOT_ID, since_boot)


def process_table() -> dict[int, ProcInfo]:
    """Every process: for the fallbacks that must look at all of them (a job's sessions where
    there is no cgroup); a tree decision reads `subtree_table` instead."""
    table: dict[int, ProcInfo] = {}
    for process in psutil.process_iter():
        if (info := _info(process)) is not None:
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
    with contextlib.suppress(OSError, psutil.Error):
        if process.is_running():
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, sig)
            else:
                os.kill(process.pid, sig)
            return True, pidfd
    if pidfd is not None:
        os.close(pidfd)
    return False, None


class ProcessVerdicts:
    """Answers about processes (is this sender in the host's tree?), each good for as long as the
    process it is about lives.

    A hit must cost next to nothing: a notify flood asks once per datagram, and psutil's look at a
    process costs several times a bare read. So an entry holds a pidfd opened before its answer was
    worked out, and stays good until that pidfd shows an exit (until then the pid cannot name
    another process): one poll per hit. Without pidfds (macOS) an entry is keyed by psutil's
    handle instead, a look at the process per ask. Bounded (each entry may hold an fd); the least
    recently asked goes first. Thread-safe."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[int | psutil.Process, tuple[int | None, bool]] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False

    def answer(self, pid: int, work: Callable[[ProcInfo], bool]) -> bool:
        """`work(info)` for `pid`, or what it said before about this very process; False once the
        process is gone."""
        with self._lock:
            hit = self._entries.get(pid)
            if hit is not None and hit[0] is not None and not has_exited(hit[0]):
                self._entries.move_to_end(pid)
                return hit[1]
        pidfd = open_pidfd(pid)  # first: what we read next is then about this very process
        info = proc_info(pid)
        if info is None:
            if pidfd is not None:
                os.close(pidfd)
            return False
        key: int | psutil.Process = pid if pidfd is not None else info.process
        if pidfd is None:
            with self._lock:
                if (hit := self._entries.get(key)) is not None:
                    self._entries.move_to_end(key)
                    return hit[1]
        verdict = work(info)
        self._keep(key, pidfd, verdict)
        return verdict

    def close(self) -> None:
        """Forget everything and close the fds; nothing is kept from now on."""
        with self._lock:
            self._closed = True
            for pidfd, _ in self._entries.values():
                _close(pidfd)
            self._entries.clear()

    def _keep(self, key: int | psutil.Process, pidfd: int | None, verdict: bool) -> None:
        with self._lock:
            if self._closed:
                _close(pidfd)
                return
            if (stale := self._entries.pop(key, None)) is not None:
                _close(stale[0])
            dead = [k for k, (fd, _) in self._entries.items() if fd is not None and has_exited(fd)]
            for gone in dead:  # a new entry is a new process: the dead ones' fds go now
                _close(self._entries.pop(gone)[0])
            self._entries[key] = (pidfd, verdict)
            while len(self._entries) > self._size:
                _close(self._entries.popitem(last=False)[1][0])


def has_exited(pidfd: int) -> bool:
    """Has the process behind `pidfd` exited? (A pidfd polls readable once it has; poll, not
    select: the fd may be above 1024.)"""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _close(pidfd: int | None) -> None:
    if pidfd is not None:
        os.close(pidfd)


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
        except (psutil.Error, OSError):
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
