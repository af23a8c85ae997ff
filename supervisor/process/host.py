"""The host's process: spawn, adopt, watch, signal and kill its whole tree. Mechanisms, no policy.

Theory of operation. The host runs in a session of its own, joins a cgroup v2 leaf before it
execs (when writable) and the daemon is a child subreaper. So every process the host starts stays
findable by one of: the cgroup (`cgroup.kill` empties it at once), descent from the host, the
host's process group, or reparenting to us. `kill_tree` uses all of them.

Our children are of three kinds: the host and the jobs (registered in `process.jobs`), children
other modules start in our own session with plain `subprocess` (their owners reap both), and
orphans of the host's tree, whose session is never ours (a process can leave a session, never join
one). Only orphans are ours to reap, and they count as part of the host's tree.

Every signal goes through a pidfd, opened and then checked against the start time we saw, so a
recycled pid is never hit. Without pidfd, cgroup or subreaper (macOS): psutil scans and polling.
The process table and verified signals are `process.proctree`, the leaf `process.cgroup`;
this module puts them together for the host (and re-exports `CgroupLeaf` and `process_stats`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from supervisor.errors import SwapguardError
from supervisor.process import jobs, outputlog
from supervisor.process.cgroup import CgroupLeaf
from supervisor.process.proctree import (
    ProcInfo,
    await_exits,
    create_time,
    descendants,
    open_pidfd,
    proc_info,
    process_table,
    signal_group,
    signal_verified,
)
from supervisor.process.proctree import process_stats as process_stats  # re-exported

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36

# A create_time rests on /proc/stat's btime: whole seconds that may shift by one.
_CREATE_TIME_SLACK = 1.05
_CGROUP_VAR = "SWAPGUARD_CGROUP_PROCS"
_STUB = (
    'if [ -n "${SWAPGUARD_CGROUP_PROCS-}" ]; then '
    'echo 0 2>/dev/null > "$SWAPGUARD_CGROUP_PROCS" '
    '|| echo "swapguard: the host runs outside its cgroup" >&2; fi; '
    "unset SWAPGUARD_CGROUP_PROCS; "
    'if [ -n "${WATCHDOG_PID+set}" ]; then WATCHDOG_PID=$$; export WATCHDOG_PID; fi; '
    'exec "$@"'
)
# waitid flags that look for an exited child without reaping it (None where there is no waitid)
_PEEK = os.WEXITED | os.WNOHANG | os.WNOWAIT if hasattr(os, "WNOWAIT") else None
_TREE_CACHE_SIZE = 256
_MAX_ANCESTRY = 64
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
class SpawnSpec:
    """What to start. `env` is the complete environment (the caller merges in its own); a
    WATCHDOG_PID in it is a placeholder that the host finds set to its own pid, as systemd does."""

    argv: tuple[str, ...]
    cwd: Path
    env: Mapping[str, str]
    output: Path | None = None  # None: inherit our stdout/stderr
    output_max_bytes: int = 0  # > 0: through a logger that rotates the file (`outputlog`)
    output_backups: int = 5

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
            info = proc_info(pid)
            started = None if info is None else create_time(pid, info)
            if info is None or started is None:
                raise ProcessLookupError(f"no process {pid}")
            self.create_time: float = started
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
        try:
            command, env = _command(spec, cgroup)
            with jobs.SPAWN_LOCK:
                popen = subprocess.Popen(
                    command,
                    cwd=spec.cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out_fd,
                    stderr=out_fd,
                    start_new_session=True,
                    close_fds=True,
                )
                jobs.register(popen.pid)
        except OSError as exc:
            raise _spawn_failure(spec, exc, cgroup) from exc
        finally:
            if out_fd is not None:
                os.close(out_fd)
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
        except ProcessLookupError:
            return None
        if host._exit_visible() or abs(host.create_time - create_time) > _CREATE_TIME_SLACK:
            host.close()
            return None
        if (info := proc_info(pid)) is not None and info.ppid == os.getpid():
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
        return set(_live_tree(self, self._cgroup, process_table()))

    def signal_tree(self, sig: int) -> None:
        """Send `sig` to every process of the tree and to the host's process group."""
        table = process_table()
        for pid, info in _live_tree(self, self._cgroup, table).items():
            pidfd = signal_verified(pid, info.start, sig)[1]
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
        info = proc_info(self.pid)
        return info is None or info.zombie or info.start != self._start_key

    def _alive_in(self, table: Mapping[int, ProcInfo]) -> bool:
        info = table.get(self.pid)
        return self._exit is None and info is not None and info.start == self._start_key

    def _owns_group(self, table: Mapping[int, ProcInfo]) -> bool:
        """May we killpg(host pid)? Only while that number still names the host's group."""
        current = table.get(self.pid)
        if current is not None:  # the host itself, unreaped, or a stranger under its old pid
            return current.start == self._start_key
        return any(info.pgid == self.pid for info in table.values())


def kill_tree(host: HostProcess | None, cgroup: CgroupLeaf | None, timeout: float = 5.0) -> int:
    """SIGKILL the host's whole tree and reap what we can; blocking but bounded by `timeout`.

    Returns how many processes were killed (each counted once).
    """
    if _nothing_left(host, cgroup):  # the common case, a host that exited alone: no scan
        _reap(host)
        return 0
    deadline = time.monotonic() + timeout
    killed: set[tuple[int, float]] = set()
    if cgroup is not None:
        table = process_table()
        members = [(pid, table[pid].start) for pid in cgroup.pids() if pid in table]
        if members and cgroup.kill():
            killed.update(members)
    while True:
        table = process_table()
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
            sent, pidfd = signal_verified(pid, info.start, signal.SIGKILL)
            if sent:
                killed.add((pid, info.start))
            if pidfd is not None:
                handles.append(pidfd)
        if handles:
            await_exits(handles, deadline)
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
        for pid, info in process_table().items():
            if info.ppid == me and info.zombie and is_orphan(pid, info, None):
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
    info = proc_info(pid)
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


# --- internals ---------------------------------------------------------------------------


def is_orphan(pid: int, info: ProcInfo, host_pid: int | None) -> bool:
    """A child of ours that nobody waits for and that came from outside our session."""
    return info.sid != os.getsid(0) and pid not in jobs.registered() and pid != host_pid


def _live_tree(
    host: HostProcess | None, cgroup: CgroupLeaf | None, table: Mapping[int, ProcInfo]
) -> dict[int, ProcInfo]:
    me, host_pid = os.getpid(), None if host is None else host.pid
    roots: set[int] = set(cgroup.pids()) if cgroup is not None else set()
    if host is not None and host._alive_in(table):
        roots.add(host.pid)
    roots.update(
        pid for pid, info in table.items() if info.ppid == me and is_orphan(pid, info, host_pid)
    )
    members = roots | descendants(table, roots)
    return {
        pid: table[pid] for pid in members if pid in table and pid != me and not table[pid].zombie
    }


def _descends(pid: int, info: ProcInfo, host: HostProcess | None) -> bool:
    """Walk up the parents: the host above means yes; we above mean yes only through an orphan."""
    me, current, current_info = os.getpid(), pid, info
    for _ in range(_MAX_ANCESTRY):
        if host is not None and current == host.pid:
            return host._exit is None
        if current_info.ppid == me:
            return is_orphan(current, current_info, None if host is None else host.pid)
        current = current_info.ppid
        parent_info = proc_info(current) if current > 1 else None
        if parent_info is None:
            return False
        current_info = parent_info
    return False


def _nothing_left(host: HostProcess | None, cgroup: CgroupLeaf | None) -> bool:
    """True only when it is cheap to be sure the tree is empty: the host is gone, and its cgroup
    is empty, or (as subreaper) no child of ours but our own jobs is alive."""
    if host is not None and host.poll() is None:
        return False
    if cgroup is not None:
        return not cgroup.pids()
    if host is not None and not host.is_child:
        return False  # an adopted host's orphans went to init, not to us
    children = _own_children()
    return children is not None and not (children - jobs.registered())


def _own_children() -> set[int] | None:
    """Our children from /proc/self/task/*/children (Linux), None where it cannot be read."""
    try:
        tasks = os.listdir("/proc/self/task")
        found: set[int] = set()
        for task in tasks:
            with open(f"/proc/self/task/{task}/children") as listing:
                found.update(int(pid) for pid in listing.read().split())
    except (OSError, ValueError):
        return None
    return found


def _reap(host: HostProcess | None) -> None:
    if host is not None:
        host.poll()
    reap_orphans()


def _command(spec: SpawnSpec, cgroup: CgroupLeaf | None) -> tuple[tuple[str, ...], dict[str, str]]:
    """The argv and environment to exec. Joining the cgroup and learning WATCHDOG_PID both need
    the child itself, so a /bin/sh stub does them and execs the host in place (same pid).

    A stub rather than a `preexec_fn`: that would force a full fork of this (threaded, large)
    process, ~20 ms here, where vfork + a shell costs ~1 ms. The stub would report a bad program
    only as exit 127, so the program and the cwd are checked here first."""
    env = dict(spec.env)
    if cgroup is None and "WATCHDOG_PID" not in env:
        return spec.argv, env
    program = spec.argv[0]
    if "/" in program:
        candidate = spec.cwd / program
        found = candidate.is_file() and os.access(candidate, os.X_OK)
    else:
        found = shutil.which(program, path=env.get("PATH", os.defpath)) is not None
    if not spec.cwd.is_dir():
        raise SpawnError(f"cannot start host {program!r}: working dir {spec.cwd}: not a directory")
    if not found:
        raise SpawnError(f"cannot start host {program!r} (cwd {spec.cwd}): no such executable")
    if cgroup is not None:
        env[_CGROUP_VAR] = str(cgroup.path / "cgroup.procs")
    return ("/bin/sh", "-c", _STUB, "swapguard-host", *spec.argv), env


def _open_output(spec: SpawnSpec) -> int | None:
    if spec.output is None:
        return None
    try:
        if spec.output_max_bytes > 0:
            return outputlog.start(spec.output, spec.output_max_bytes, spec.output_backups)
        return os.open(spec.output, outputlog.OPEN_FLAGS, outputlog.FILE_MODE)
    except OSError as exc:
        raise SpawnError(f"cannot open the host's output {spec.output}: {exc.strerror}") from exc


def _spawn_failure(spec: SpawnSpec, exc: OSError, cgroup: CgroupLeaf | None) -> SpawnError:
    reason = exc.strerror or str(exc)
    if exc.filename is not None and str(exc.filename) == str(spec.cwd):
        return SpawnError(f"cannot start host {spec.argv[0]!r}: working dir {spec.cwd}: {reason}")
    if cgroup is not None and str(exc.filename).startswith(str(cgroup.path)):
        return SpawnError(f"cannot start host {spec.argv[0]!r}: cgroup {cgroup.path}: {reason}")
    return SpawnError(f"cannot start host {spec.argv[0]!r} (cwd {spec.cwd}): {reason}")
