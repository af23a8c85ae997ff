"""The host's process: spawn, adopt, watch, signal and kill its whole tree. Mechanisms, no policy.

Theory of operation. The host runs in a session of its own, joins a cgroup v2 leaf before it
execs (when writable) and the daemon is a child subreaper. So every process the host starts stays
findable by one of: the cgroup (`cgroup.kill` empties it at once), descent from the host, the
host's process group, or reparenting to us. `kill_tree` uses all of them.

Our children are of three kinds: the host and the jobs (registered in `supervisor.jobs`), children
other modules start in our own session with plain `subprocess` (their owners reap both), and
orphans of the host's tree, whose session is never ours (a process can leave a session, never join
one). Only orphans are ours to reap, and they count as part of the host's tree.

Every signal goes through a pidfd, opened and then checked against the start time we saw, so a
recycled pid is never hit. Without pidfd, cgroup or subreaper (macOS): psutil scans and polling.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from supervisor import jobs
from supervisor.errors import SwapguardError
from supervisor.jobs import open_pidfd, signal_group

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
_CGROUP_PARENT = "swapguard"
_CGROUP_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_HAVE_PROC = Path("/proc/self/stat").exists()
# psutil's create_time rests on /proc/stat's btime: whole seconds that may shift by one.
_CREATE_TIME_SLACK = 1.05
_PID_STUB = 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"'
# waitid flags that look for an exited child without reaping it (None where there is no waitid)
_PEEK = os.WEXITED | os.WNOHANG | os.WNOWAIT if hasattr(os, "WNOWAIT") else None
_TREE_CACHE_SIZE = 256
_MAX_ANCESTRY = 64
_SWEEP_WAIT = 0.5  # kill_tree: longest wait for SIGKILLed processes before the next sweep
_POLL_SLICE = 0.01  # kill_tree without pidfd (macOS): pause between sweeps


def become_subreaper() -> bool:
    """Make orphans of our descendants reparent to us (Linux); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.prctl(PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1), 0, 0, 0)
    except (OSError, AttributeError) as exc:
        log.warning("cannot become a child subreaper: %s", exc)
        return False
    if result != 0:
        log.warning("prctl(PR_SET_CHILD_SUBREAPER) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


@dataclass(frozen=True, slots=True)
class CgroupLeaf:
    """A cgroup v2 leaf holding the host's tree, so that `cgroup.kill` empties it at once."""

    path: Path

    @classmethod
    def create(cls, name: str) -> CgroupLeaf | None:
        """<our own cgroup>/swapguard/<name>, reused if it exists (an adopted host's leaf is found
        again after a supervisor restart); None without a writable cgroup2 mount.

        Under our own cgroup so that a service manager's delegation (systemd's `Delegate=yes`)
        and its limits cover the host too; at the mount's top only when we sit at the root."""
        if not _CGROUP_NAME.fullmatch(name) or name in (".", ".."):
            raise ValueError(f"cgroup leaf name must be letters, digits, '_', '.', '-': {name!r}")
        mount = _cgroup2_mount()
        if mount is None:
            return None
        leaf = mount / _own_cgroup().lstrip("/") / _CGROUP_PARENT / name
        try:
            leaf.mkdir(parents=True, exist_ok=True)
            if not os.access(leaf / "cgroup.procs", os.W_OK):
                raise PermissionError("cgroup.procs is not writable")
        except OSError as exc:
            log.info("no cgroup for the host (%s): %s", leaf, exc)
            return None
        return cls(leaf)

    def add(self, pid: int) -> None:
        """Move `pid` into the leaf; raises OSError (ProcessLookupError when it is gone)."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        try:
            return [int(line) for line in (self.path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def kill(self) -> bool:
        """SIGKILL every member at once (Linux >= 5.14); False where cgroup.kill is missing."""
        try:
            (self.path / "cgroup.kill").write_text("1")
        except OSError:
            return False
        return True

    def remove(self) -> None:
        """rmdir the leaf once it is empty; never raises (a busy leaf is simply kept)."""
        try:
            self.path.rmdir()
        except OSError as exc:
            log.debug("cgroup %s kept: %s", self.path, exc)


def _own_cgroup() -> str:
    """Our path in the v2 hierarchy ("0::/system.slice/swapguard.service"), "/" when unknown."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return "/"
    path = next((line[3:] for line in lines if line.startswith("0::")), "/")
    if path.endswith(f"/{_CGROUP_PARENT}") or f"/{_CGROUP_PARENT}/" in path:
        return path.split(f"/{_CGROUP_PARENT}", 1)[0] or "/"  # we run inside a host's leaf
    return path


def _cgroup2_mount() -> Path | None:
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        before, sep, after = line.partition(" - ")
        fields = before.split()
        if sep and after.split()[:1] == ["cgroup2"] and len(fields) > 4:
            return Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]))
    return None


@dataclass(frozen=True, slots=True)
class SpawnSpec:
    """What to start. `env` is the complete environment (the caller merges in its own); a
    WATCHDOG_PID in it is a placeholder that the host finds set to its own pid, as systemd does."""

    argv: tuple[str, ...]
    cwd: Path
    env: Mapping[str, str]
    output: Path | None = None  # None: inherit our stdout/stderr

    def __post_init__(self) -> None:
        argv = () if isinstance(self.argv, str | bytes) else tuple(self.argv)
        if not argv or not all(isinstance(arg, str) for arg in argv):
            raise ValueError(f"SpawnSpec.argv must be a non-empty list of strings: {self.argv!r}")
        for key, value in self.env.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"SpawnSpec.env[{key!r}] must map a string to a string")
        object.__setattr__(self, "argv", argv)
        object.__setattr__(self, "cwd", Path(self.cwd))
        if self.output is not None:
            object.__setattr__(self, "output", Path(self.output))


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How the host ended; both fields None when it was adopted and nobody could reap it."""

    code: int | None
    signal: int | None

    @classmethod
    def from_wait_status(cls, status: int | None) -> ExitStatus:
        """From waitpid's status; None (somebody else reaped it) gives the unknown status."""
        if status is None:
            return cls(None, None)
        if os.WIFSIGNALED(status):
            return cls(None, os.WTERMSIG(status))
        if os.WIFEXITED(status):
            return cls(os.WEXITSTATUS(status), None)
        return cls(None, None)

    def describe(self) -> str:
        if self.code is not None:
            return f"exit {self.code}"
        if self.signal is not None:
            try:
                return f"killed by {signal.Signals(self.signal).name}"
            except ValueError:
                return f"killed by signal {self.signal}"
        return "exited (status unknown)"


class SpawnError(SwapguardError):
    """The host could not be started: no such program, not executable, bad cwd or output."""

    code = "spawn_failed"


@dataclass(frozen=True, slots=True)
class _ProcInfo:
    ppid: int
    pgid: int
    sid: int
    zombie: bool
    start: float  # opaque: equal for the same process, different once the pid is reused


def _proc_info(pid: int) -> _ProcInfo | None:
    """Parent, group, session, zombie and start of `pid` from /proc (psutil elsewhere)."""
    if not _HAVE_PROC:
        return _psutil_info(pid)
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
        fields = data[data.rindex(b")") + 2 :].split()
        return _ProcInfo(
            ppid=int(fields[1]),
            pgid=int(fields[2]),
            sid=int(fields[3]),
            zombie=fields[0] in (b"Z", b"X"),
            start=int(fields[19]),
        )
    except (OSError, ValueError, IndexError):
        return None


def _psutil_info(pid: int) -> _ProcInfo | None:
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            ppid, status, start = proc.ppid(), proc.status(), proc.create_time()
        pgid, sid = os.getpgid(pid), os.getsid(pid)
    except (psutil.Error, OSError):
        return None
    return _ProcInfo(ppid, pgid, sid, status == psutil.STATUS_ZOMBIE, start)


def _process_table() -> dict[int, _ProcInfo]:
    """One consistent-enough look at every process: the basis of each tree decision."""
    if _HAVE_PROC:
        pids: Iterable[int] = (int(e.name) for e in os.scandir("/proc") if e.name.isdigit())
    else:
        pids = psutil.pids()
    return {pid: info for pid in pids if (info := _proc_info(pid)) is not None}


def _descendants(table: Mapping[int, _ProcInfo], roots: Iterable[int]) -> set[int]:
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


def _is_orphan(pid: int, info: _ProcInfo, host: HostProcess | None) -> bool:
    """A child of ours that nobody waits for and that came from outside our session."""
    return (
        info.sid != os.getsid(0)
        and pid not in jobs.registered()
        and (host is None or pid != host.pid)
    )


class HostProcess:
    """One host process, spawned by us or adopted after a supervisor restart."""

    def __init__(self, pid: int, *, is_child: bool, cgroup: CgroupLeaf | None) -> None:
        """Use `spawn` or `adopt`."""
        self.pid = pid
        self.is_child = is_child
        self._cgroup = cgroup
        self._reap_lock = threading.Lock()
        self._pidfd = open_pidfd(pid)  # first: all we read next is then about this very process
        try:
            self.create_time: float = psutil.Process(pid).create_time()
            info = _proc_info(pid)
            if info is None:
                raise psutil.NoSuchProcess(pid)
        except BaseException:
            self.close()
            raise
        self._start_key = info.start
        self._popen: subprocess.Popen[bytes] | None = None
        self._exit: ExitStatus | None = None
        self._tree_cache: OrderedDict[tuple[int, float], bool] = OrderedDict()
        self._cache_lock = threading.Lock()

    @classmethod
    def spawn(cls, spec: SpawnSpec, cgroup: CgroupLeaf | None) -> HostProcess:
        """Start the host in a new session, inside `cgroup` before it execs (nothing escapes)."""
        out_fd = _open_output(spec)
        procs_fd: int | None = None
        try:
            if cgroup is not None:
                procs_fd = os.open(cgroup.path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
            command = _command(spec)
            with jobs.SPAWN_LOCK:
                popen = subprocess.Popen(
                    command,
                    cwd=spec.cwd,
                    env=dict(spec.env),
                    stdin=subprocess.DEVNULL,
                    stdout=out_fd,
                    stderr=out_fd,
                    start_new_session=True,
                    close_fds=True,
                    preexec_fn=None if procs_fd is None else _joiner(procs_fd),
                )
                jobs.register(popen.pid)
        except OSError as exc:
            raise _spawn_failure(spec, exc, cgroup) from exc
        except subprocess.SubprocessError as exc:  # only the cgroup join can fail this way
            where = cgroup.path if cgroup else "?"
            raise SpawnError(f"cannot start host {spec.argv[0]!r}: joining {where}: {exc}") from exc
        finally:
            for fd in (out_fd, procs_fd):
                if fd is not None:
                    os.close(fd)
        host = cls(popen.pid, is_child=True, cgroup=cgroup)
        host._popen = popen  # kept so subprocess never polls (and reaps) this pid on its own
        log.info("host spawned: pid %d, %s (cwd %s)", host.pid, spec.argv[0], spec.cwd)
        return host

    @classmethod
    def adopt(
        cls, pid: int, create_time: float, *, cgroup: CgroupLeaf | None = None
    ) -> HostProcess | None:
        """Take over a live host after a supervisor restart; None unless `pid` is alive and
        started at `create_time` (a recycled pid is refused)."""
        if pid <= 0:
            return None
        try:
            host = cls(pid, is_child=False, cgroup=cgroup)
        except psutil.Error:
            return None
        if host._exit_visible() or abs(host.create_time - create_time) > _CREATE_TIME_SLACK:
            host.close()
            return None
        if (info := _proc_info(pid)) is not None and info.ppid == os.getpid():
            host.is_child = True  # we re-exec'd ourselves: still our child, so we reap it
            jobs.register(pid)
        log.info("host adopted: pid %d", pid)
        return host

    @property
    def exit_fd(self) -> int | None:
        """Readable once the host has exited (a pidfd); None where unsupported: poll instead."""
        return self._pidfd

    def poll(self) -> ExitStatus | None:
        """None while it runs. Reaps our child (thread-safe: kill_tree may reap it too)."""
        with self._reap_lock:
            if self._exit is not None:
                return self._exit
            if self.is_child:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:
                    log.warning("host %d was reaped by someone else: status lost", self.pid)
                    pid, status = self.pid, None
                if pid == 0:
                    return None
                self._exit = ExitStatus.from_wait_status(status)
                if self._popen is not None:  # marks it reaped: subprocess never waits on it again
                    self._popen.returncode = -1
                jobs.unregister(self.pid)
            elif self._exit_visible():
                self._exit = ExitStatus(None, None)
            return self._exit

    def tree_pids(self) -> set[int]:
        """Live pids of the host, its descendants, its cgroup and our non-job orphans."""
        return set(_live_tree(self, self._cgroup, _process_table()))

    def signal_tree(self, sig: int) -> None:
        """Send `sig` to every process of the tree and to the host's process group."""
        table = _process_table()
        for pid, info in _live_tree(self, self._cgroup, table).items():
            pidfd = _signal_verified(pid, info.start, sig)[1]
            if pidfd is not None:
                os.close(pidfd)
        if self._owns_group(table):
            signal_group(self.pid, sig)

    def close(self) -> None:
        with self._reap_lock:  # poll may be selecting on it in kill_tree's worker thread
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None

    def _exit_visible(self) -> bool:
        """Has the host exited (zombie or gone)? Never reaps."""
        if self._pidfd is not None:  # poll, not select: the fd may be above 1024
            poller = select.poll()
            poller.register(self._pidfd, select.POLLIN)
            return bool(poller.poll(0))
        info = _proc_info(self.pid)
        return info is None or info.zombie or info.start != self._start_key

    def _alive_in(self, table: Mapping[int, _ProcInfo]) -> bool:
        info = table.get(self.pid)
        return self._exit is None and info is not None and info.start == self._start_key

    def _owns_group(self, table: Mapping[int, _ProcInfo]) -> bool:
        """May we killpg(host pid)? Only while that number still names the host's group."""
        current = table.get(self.pid)
        if current is not None:  # the host itself, unreaped, or a stranger under its old pid
            return current.start == self._start_key
        return any(info.pgid == self.pid for info in table.values())


def kill_tree(host: HostProcess | None, cgroup: CgroupLeaf | None, timeout: float = 5.0) -> int:
    """SIGKILL the host's whole tree and reap what we can; blocking but bounded by `timeout`.

    Returns how many processes were killed (each counted once).
    """
    deadline = time.monotonic() + timeout
    killed: set[tuple[int, float]] = set()
    if cgroup is not None:
        table = _process_table()
        members = [(pid, table[pid].start) for pid in cgroup.pids() if pid in table]
        if members and cgroup.kill():
            killed.update(members)
    while True:
        table = _process_table()
        if host is not None and host._owns_group(table):
            signal_group(host.pid, signal.SIGKILL)
        tree = _live_tree(host, cgroup, table)
        if not tree:
            break
        if time.monotonic() >= deadline:
            log.error("kill_tree: %d processes survive SIGKILL: %s", len(tree), sorted(tree))
            break
        handles = []
        for pid, info in tree.items():
            sent, pidfd = _signal_verified(pid, info.start, signal.SIGKILL)
            if sent:
                killed.add((pid, info.start))
            if pidfd is not None:
                handles.append(pidfd)
        if handles:
            _await_exits(handles, deadline)
        else:  # no pidfd (macOS): nothing to block on, so pace the sweeps
            time.sleep(_POLL_SLICE)
        _reap(host)
    _reap(host)
    if killed:
        log.info("killed %d processes of the host's tree", len(killed))
    return len(killed)


def reap_orphans() -> list[int]:
    """Reap zombie orphans of the host's tree (call on SIGCHLD); returns the reaped pids."""
    try:
        if _PEEK is not None and os.waitid(os.P_ALL, 0, _PEEK) is None:
            return []  # no child has exited: skip the scan
    except ChildProcessError:
        return []
    me, reaped = os.getpid(), []
    with jobs.SPAWN_LOCK:
        for pid, info in _process_table().items():
            if info.ppid == me and info.zombie and _is_orphan(pid, info, None):
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        reaped.append(pid)
    if reaped:
        log.debug("reaped orphans %s", reaped)
    return reaped


def is_in_tree(pid: int, host: HostProcess | None, cgroup: CgroupLeaf | None) -> bool:
    """Is `pid` (a notify datagram's sender) the host, its descendant, in its cgroup, or a non-job
    orphan of ours (or below one)? Cached per host by (pid, start time): a new host, a new cache."""
    if pid <= 0 or pid == os.getpid():
        return False
    if host is not None and pid == host.pid and host._exit is None:
        return True
    info = _proc_info(pid)
    if info is None:
        return False
    if host is None:
        return (cgroup is not None and pid in cgroup.pids()) or _descends(pid, info, None)
    key = (pid, info.start)
    with host._cache_lock:
        if (cached := host._tree_cache.get(key)) is not None:
            host._tree_cache.move_to_end(key)
            return cached
    answer = (cgroup is not None and pid in cgroup.pids()) or _descends(pid, info, host)
    with host._cache_lock:
        host._tree_cache[key] = answer
        while len(host._tree_cache) > _TREE_CACHE_SIZE:
            host._tree_cache.popitem(last=False)
    return answer


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


# --- internals ---------------------------------------------------------------------------


def _live_tree(
    host: HostProcess | None, cgroup: CgroupLeaf | None, table: Mapping[int, _ProcInfo]
) -> dict[int, _ProcInfo]:
    me = os.getpid()
    roots: set[int] = set(cgroup.pids()) if cgroup is not None else set()
    if host is not None and host._alive_in(table):
        roots.add(host.pid)
    roots.update(
        pid for pid, info in table.items() if info.ppid == me and _is_orphan(pid, info, host)
    )
    members = roots | _descendants(table, roots)
    return {
        pid: table[pid] for pid in members if pid in table and pid != me and not table[pid].zombie
    }


def _descends(pid: int, info: _ProcInfo, host: HostProcess | None) -> bool:
    """Walk up the parents: the host above means yes; we above mean yes only through an orphan."""
    me, current, current_info = os.getpid(), pid, info
    for _ in range(_MAX_ANCESTRY):
        if host is not None and current == host.pid:
            return host._exit is None
        if current_info.ppid == me:
            return _is_orphan(current, current_info, host)
        current = current_info.ppid
        parent_info = _proc_info(current) if current > 1 else None
        if parent_info is None:
            return False
        current_info = parent_info
    return False


def _signal_verified(pid: int, start: float, sig: int) -> tuple[bool, int | None]:
    """Signal `pid` only if it is still the process that started at `start`; race-free with a
    pidfd (it pins the process, then the start time is checked). Returns whether it was sent
    and the pidfd (the caller closes it) to wait on its exit."""
    pidfd = open_pidfd(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        info = _proc_info(pid)
        if info is not None and info.start == start:
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, sig)
            else:
                os.kill(pid, sig)
            return True, pidfd
    if pidfd is not None:
        os.close(pidfd)
    return False, None


def _await_exits(pidfds: list[int], deadline: float) -> None:
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


def _reap(host: HostProcess | None) -> None:
    if host is not None:
        host.poll()
    reap_orphans()


def _joiner(procs_fd: int) -> Callable[[], None]:
    """Runs in the child between fork and exec (fork-safe: one write of prepared bytes to an
    open fd); "0" moves the writing process into the leaf, so the host execs already inside."""

    def join_cgroup() -> None:
        os.write(procs_fd, b"0")

    return join_cgroup


def _command(spec: SpawnSpec) -> tuple[str, ...]:
    """Only the child knows its pid: for WATCHDOG_PID a /bin/sh stub exports it and execs the
    host in place (same pid). The stub would report a bad program only as exit 127, so check
    the program and the cwd here first."""
    if "WATCHDOG_PID" not in spec.env:
        return spec.argv
    program = spec.argv[0]
    if "/" in program:
        candidate = spec.cwd / program
        found = candidate.is_file() and os.access(candidate, os.X_OK)
    else:
        found = shutil.which(program, path=spec.env.get("PATH", os.defpath)) is not None
    if not spec.cwd.is_dir():
        raise SpawnError(f"cannot start host {program!r}: working dir {spec.cwd}: not a directory")
    if not found:
        raise SpawnError(f"cannot start host {program!r} (cwd {spec.cwd}): no such executable")
    return ("/bin/sh", "-c", _PID_STUB, "swapguard-host", *spec.argv)


def _open_output(spec: SpawnSpec) -> int | None:
    if spec.output is None:
        return None
    try:
        return os.open(spec.output, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise SpawnError(f"cannot open the host's output {spec.output}: {exc.strerror}") from exc


def _spawn_failure(spec: SpawnSpec, exc: OSError, cgroup: CgroupLeaf | None) -> SpawnError:
    reason = exc.strerror or str(exc)
    if exc.filename is not None and str(exc.filename) == str(spec.cwd):
        return SpawnError(f"cannot start host {spec.argv[0]!r}: working dir {spec.cwd}: {reason}")
    if cgroup is not None and str(exc.filename).startswith(str(cgroup.path)):
        return SpawnError(f"cannot start host {spec.argv[0]!r}: cgroup {cgroup.path}: {reason}")
    return SpawnError(f"cannot start host {spec.argv[0]!r} (cwd {spec.cwd}): {reason}")
