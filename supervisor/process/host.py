"""The host's process: spawn, adopt, watch, signal and kill its whole tree. Mechanisms, no policy.

Theory of operation. The host runs in a session of its own, joins a cgroup v2 leaf before it
execs (when writable) and the daemon is a child subreaper. So every process the host starts stays
findable by one of: the cgroup (`cgroup.kill` empties it at once), descent from the host, the
host's process group, or reparenting to us. `kill_tree` uses all of them.

Our children are of three kinds: the host and the jobs (registered in `process.jobs`), children
other modules start in our own session with plain `subprocess` (their owners reap both), and
orphans of the host's tree, whose session is never ours (a process can leave a session, never join
one). Only orphans are ours to reap, and they count as part of the host's tree, but for those a
job left behind (`jobs.is_job_process`): a daemon detached by a build or a hook is not the host's.

Every signal goes through a pidfd, opened and then checked against the start time we saw (psutil's
identity of a process), so a recycled pid is never hit. Without pidfd, cgroup or subreaper (macOS):
psutil and polling. Process facts (the tree below us, start times, figures) come from psutil
through `process.proctree`, the leaf from `process.cgroup`; this module puts them together for the
host (and re-exports `CgroupLeaf` and `process_stats`). What stays hand-written here is what psutil
does not do: the subreaper, and its cheap read of our own children on the exit path. The cheap
answers (cgroup members, our own children) come first; psutil's look below us only when they
cannot vouch that the tree is gone.
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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from supervisor.errors import SwapguardError
from supervisor.process import jobs, outputlog
from supervisor.process.cgroup import WAIT_TO_BE_MOVED, CgroupLeaf
from supervisor.process.identity import HostUser
from supervisor.process.proctree import (
    ProcessVerdicts,
    ProcInfo,
    StartStamp,
    await_exits,
    descendants,
    open_pidfd,
    proc_info,
    signal_group,
    signal_verified,
    start_stamp,
    subtree_table,
)
from supervisor.process.proctree import process_stats as process_stats  # re-exported

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36

_CGROUP_VAR = "SWAPGUARD_CGROUP_PROCS"
_STUB = (
    'if [ -n "${SWAPGUARD_CGROUP_PROCS-}" ]; then '
    'echo 0 2>/dev/null > "$SWAPGUARD_CGROUP_PROCS" '
    '|| echo "swapguard: the host runs outside its cgroup" >&2; fi; '
    "unset SWAPGUARD_CGROUP_PROCS; "
    'if [ -n "${WATCHDOG_PID+set}" ]; then WATCHDOG_PID=$$; export WATCHDOG_PID; fi; '
    'exec "$@"'
)
# A host of another user waits to be moved into its leaf by us (see cgroup.WAIT_TO_BE_MOVED).
_WAIT_STUB = (
    WAIT_TO_BE_MOVED
    + 'if [ -n "${WATCHDOG_PID+set}" ]; then WATCHDOG_PID=$$; export WATCHDOG_PID; fi; '
    'exec "$@" </dev/null'
)
# waitid flags that look for an exited child without reaping it (None where there is no waitid)
_PEEK = os.WEXITED | os.WNOHANG | os.WNOWAIT if hasattr(os, "WNOWAIT") else None
_TREE_CACHE_SIZE = 64  # senders is_in_tree remembers, each with a pidfd: a bounded share of fds
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
    user: HostUser | None = None  # None: run as swapguard's own user

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
        self._in_tree = ProcessVerdicts(_TREE_CACHE_SIZE)  # is_in_tree's answers
        self._pidfd = open_pidfd(pid)  # first: all we read next is then about this very process
        try:
            info = proc_info(pid)
            if info is None:
                raise ProcessLookupError(f"no process {pid}")
            self._process = info.process  # its identity: pid and start time
            self.start: StartStamp = start_stamp(info)  # recorded for adoption
        except BaseException:
            self.close()
            raise
        self._popen: subprocess.Popen[bytes] | None = None
        self._exit: ExitStatus | None = None

    @classmethod
    def spawn(cls, spec: SpawnSpec, cgroup: CgroupLeaf | None) -> HostProcess:
        """Start the host in a new session, inside `cgroup` before it execs (nothing escapes)."""
        out_fd = _open_output(spec)
        ids = spec.user.popen_args() if spec.user is not None else {}
        we_move = cgroup is not None and bool(ids)
        try:
            command, env = _command(spec, cgroup, we_move=we_move)
            with jobs.SPAWN_LOCK:
                popen = subprocess.Popen(
                    command,
                    cwd=spec.cwd,
                    env=env,
                    stdin=subprocess.PIPE if we_move else subprocess.DEVNULL,
                    stdout=out_fd,
                    stderr=out_fd,
                    start_new_session=True,
                    close_fds=True,
                    **ids,
                )
                jobs.register(popen.pid)
        except OSError as exc:
            raise _spawn_failure(spec, exc, cgroup) from exc
        finally:
            if out_fd is not None:
                os.close(out_fd)
        if we_move:
            assert cgroup is not None
            cgroup.move_and_release(popen)
        host = cls(popen.pid, is_child=True, cgroup=cgroup)
        host._popen = popen  # kept so subprocess never polls (and reaps) this pid on its own
        log.info("host spawned: pid %d, %s (cwd %s)", host.pid, spec.argv[0], spec.cwd)
        return host

    @classmethod
    def adopt(
        cls, pid: int, recorded: StartStamp, *, cgroup: CgroupLeaf | None = None
    ) -> HostProcess | None:
        """Take over a live host after a supervisor restart; None unless `pid` is alive and is
        the process `recorded` names (same boot, same start: a recycled pid is refused, and a
        wall-clock step while we were down changes nothing)."""
        if pid <= 0:
            return None
        try:
            host = cls(pid, is_child=False, cgroup=cgroup)
        except ProcessLookupError:
            return None
        if host._exit_visible():
            host.close()
            return None
        if not recorded.names_same_process(host.start):
            log.warning("pid %d is not the recorded host: recorded %s, found %s",
                        pid, recorded, host.start)
            host.close()
            return None
        with contextlib.suppress(psutil.Error, OSError):
            if host._process.ppid() == os.getpid():
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
        return set(_live_tree(self, self._cgroup, _tree_table(self, self._cgroup)))

    def signal_tree(self, sig: int) -> None:
        """Send `sig` to every process of the tree and to the host's process group.

        With a cgroup leaf its member list is the tree (a process leaves a leaf only by a
        privileged move, and its forks are born in it): one read instead of a look at every
        process below us, which is what psutil's descent costs. The look stays for what a leaf
        cannot vouch for: no leaf, the host outside it (a refused move), or an orphan of the
        tree among our children outside it."""
        members = _leaf_tree(self, self._cgroup)
        if members is None:
            table = _tree_table(self, self._cgroup)
            for info in _live_tree(self, self._cgroup, table).values():
                pidfd = signal_verified(info.process, sig)[1]
                if pidfd is not None:
                    os.close(pidfd)
        else:
            assert self._cgroup is not None
            for pid in members:
                _signal_member(self._cgroup, pid, sig)
            table = {}
        if self._owns_group(table):
            signal_group(self.pid, sig)

    def close(self) -> None:
        self._in_tree.close()
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
        return info is None or info.zombie or info.process != self._process

    def _alive_in(self, table: Mapping[int, ProcInfo]) -> bool:
        info = table.get(self.pid)
        return self._exit is None and info is not None and info.process == self._process

    def _owns_group(self, table: Mapping[int, ProcInfo]) -> bool:
        """May we killpg(host pid)? Only while that number still names the host's group: the host
        itself, unreaped, or once no process has its pid, a group by that number (POSIX gives no
        new process a pid that still names a group). `table` is partial: a stranger now under
        the host's pid need not be in it, so the pid is looked at directly when it is missing."""
        current = table.get(self.pid) or proc_info(self.pid)
        if current is not None:  # the host itself, or a stranger under its old pid
            return current.process == self._process
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # it exists; signal_group will shrug off the same refusal
        return True


class TreeKill:
    """One SIGKILL of the host's whole tree, cut in two so that an event loop never waits on it:
    `start` sends what is instant and says whether anything is left; `finish`, on a worker, sweeps
    what escaped those signals and waits, bounded, for the exits.

    The cheap checks come first and after each sweep (`_nothing_left`: the cgroup's member list,
    our own children as subreaper); every process below us is scanned only while they cannot
    vouch that the tree is gone."""

    def __init__(self, host: HostProcess | None, cgroup: CgroupLeaf | None) -> None:
        self.host = host
        self.cgroup = cgroup
        self._members: list[int] = []  # the cgroup's, SIGKILLed at once by `start`

    def start(self) -> bool:
        """True when nothing is left (the common case: a cgroup read, our own children). Else
        `cgroup.kill` empties the cgroup at once (one write, no wait); `finish` does the rest:
        the sweeps that find what is outside a cgroup need a look at every process below us."""
        if _nothing_left(self.host, self.cgroup):
            return True
        if self.cgroup is not None:
            members = self.cgroup.pids()
            if members and self.cgroup.kill():
                self._members = members
        return False

    def finish(self, timeout: float) -> int:
        """Blocking but bounded by `timeout`: SIGKILL what is left, wait for the exits, reap what
        we can. Returns how many processes were killed (each counted once)."""
        host, cgroup = self.host, self.cgroup
        deadline = time.monotonic() + timeout
        killed: set[int] = set(self._members)
        if self._members:  # already dying: this waits for their exits
            _kill_and_wait(_handles(self._members), deadline)
        while not _nothing_left(host, cgroup):
            table = _tree_table(host, cgroup)
            if host is not None and host._owns_group(table):
                signal_group(host.pid, signal.SIGKILL)
            tree = _live_tree(host, cgroup, table)
            if not tree:
                break
            if time.monotonic() >= deadline:
                log.error("kill_tree: %d processes survive SIGKILL: %s", len(tree), sorted(tree))
                break
            signalled = _kill_and_wait([info.process for info in tree.values()], deadline)
            killed.update(process.pid for process in signalled)
        _reap(host)
        if killed:
            log.info("killed %d processes of the host's tree", len(killed))
        return len(killed)


def kill_tree(host: HostProcess | None, cgroup: CgroupLeaf | None, timeout: float = 5.0) -> int:
    """SIGKILL the host's whole tree and reap what we can; blocking but bounded by `timeout`
    (an event loop uses `TreeKill`, and waits on a worker). Returns how many were killed."""
    kill = TreeKill(host, cgroup)
    if kill.start():
        _reap(host)
        return 0
    return kill.finish(timeout)


def _kill_and_wait(processes: list[psutil.Process], deadline: float) -> list[psutil.Process]:
    """SIGKILL each (verified) and wait, bounded, for their exits; returns those signalled."""
    signalled, pidfds = [], []
    for process in processes:
        sent, pidfd = signal_verified(process, signal.SIGKILL)
        if sent:
            signalled.append(process)
        if pidfd is not None:
            pidfds.append(pidfd)
    if pidfds:
        await_exits(pidfds, deadline)
    else:  # no pidfd (macOS): nothing to block on, so pace the sweeps
        time.sleep(_POLL_SLICE)
    return signalled


def reap_orphans() -> list[int]:
    """Reap zombie orphans of the host's tree (call on SIGCHLD); returns the reaped pids."""
    try:
        if _PEEK is not None and os.waitid(os.P_ALL, 0, _PEEK) is None:
            return []  # no child has exited: nothing to look for
    except ChildProcessError:
        return []
    reaped = []
    with jobs.SPAWN_LOCK:
        children = _own_children()
        if children is None:
            children = {child.pid for child in psutil.Process().children()}
        for pid in _orphans(children):  # waitpid passes over one still alive
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    reaped.append(pid)
    if reaped:
        log.debug("reaped orphans %s", reaped)
    return reaped


def is_in_tree(pid: int, host: HostProcess | None, cgroup: CgroupLeaf | None) -> bool:
    """Is `pid` (a notify datagram's sender) the host, its descendant, in its cgroup, or a non-job
    orphan of ours (or below one)? Remembered per host and sender process (a notify flood asks once
    per datagram): a new host, a new memory."""
    if pid <= 0 or pid == os.getpid():
        return False
    if host is not None and pid == host.pid and host._exit is None:
        return True

    def work(info: ProcInfo) -> bool:
        return (cgroup is not None and pid in cgroup.pids()) or _descends(pid, info, host)

    if host is None:
        info = proc_info(pid)
        return info is not None and work(info)
    return host._in_tree.answer(pid, work)


# --- internals ---------------------------------------------------------------------------


def is_orphan(pid: int, info: ProcInfo, host_pid: int | None) -> bool:
    """A child of ours that nobody waits for and that came from outside our session (ours to
    reap)."""
    return info.sid != os.getsid(0) and pid not in jobs.registered() and pid != host_pid


def _is_host_orphan(pid: int, info: ProcInfo, host_pid: int | None) -> bool:
    """An orphan of the host's tree: one that no job (build, hook, health check) left behind."""
    return is_orphan(pid, info, host_pid) and not jobs.is_job_process(pid)


def _live_tree(
    host: HostProcess | None, cgroup: CgroupLeaf | None, table: Mapping[int, ProcInfo]
) -> dict[int, ProcInfo]:
    me, host_pid = os.getpid(), None if host is None else host.pid
    roots: set[int] = set(cgroup.pids()) if cgroup is not None else set()
    if host is not None and host._alive_in(table):
        roots.add(host.pid)
    roots.update(
        pid
        for pid, info in table.items()
        if info.ppid == me and _is_host_orphan(pid, info, host_pid)
    )
    members = roots | descendants(table, roots)
    return {
        pid: table[pid] for pid in members if pid in table and pid != me and not table[pid].zombie
    }


def _leaf_tree(host: HostProcess, cgroup: CgroupLeaf | None) -> list[int] | None:
    """The tree's pids as the cgroup leaf names them, or None when the leaf cannot vouch for the
    whole tree (see `HostProcess.signal_tree`): then the caller looks below us."""
    if cgroup is None or getattr(os, "pidfd_open", None) is None:
        return None
    members = cgroup.pids()
    inside = set(members)
    if host.pid not in inside and host._exit is None and not host._exit_visible():
        return None  # the host runs outside its leaf
    children = _own_children()
    if children is None:
        return None
    if any(not jobs.is_job_process(pid) for pid in _orphans(children - inside)):
        return None  # an orphan of the tree was moved out of the leaf
    me = os.getpid()
    return [pid for pid in members if pid != me]


def _signal_member(cgroup: CgroupLeaf, pid: int, sig: int) -> None:
    """Signal `pid`, read from the leaf's member list, only if the process now under it is a
    member: the pidfd pins a process, then its cgroup is read (a recycled pid is never hit)."""
    pidfd = open_pidfd(pid)
    if pidfd is None:
        return  # gone
    try:
        if cgroup.holds(pid):
            signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        pass  # exited meanwhile
    finally:
        os.close(pidfd)


def _tree_table(host: HostProcess | None, cgroup: CgroupLeaf | None) -> dict[int, ProcInfo]:
    """What may belong to the host's tree: all below us (as subreaper, the tree's orphans too),
    an adopted host and all below it, and the cgroup's members."""
    roots = [os.getpid()]
    if host is not None and not host.is_child:
        roots.append(host.pid)
    return subtree_table(roots, cgroup.pids() if cgroup is not None else ())


def _descends(pid: int, info: ProcInfo, host: HostProcess | None) -> bool:
    """Walk up the parents: the host above means yes; we above mean yes only through an orphan."""
    me, current, current_info = os.getpid(), pid, info
    for _ in range(_MAX_ANCESTRY):
        if host is not None and current == host.pid:
            return host._exit is None
        if current_info.ppid == me:
            return _is_host_orphan(current, current_info, None if host is None else host.pid)
        current = current_info.ppid
        parent_info = proc_info(current) if current > 1 else None
        if parent_info is None:
            return False
        current_info = parent_info
    return False


def _nothing_left(host: HostProcess | None, cgroup: CgroupLeaf | None) -> bool:
    """True only when it is cheap to be sure the tree is empty: the host is gone (reaped here),
    its cgroup (if any) is empty, and, as subreaper, no orphan of the tree is among our children
    (zombie ones are reaped here). An adopted host's orphans went to init, not to us: for it only
    a cgroup can vouch."""
    if host is not None and host.poll() is None:
        return False
    if cgroup is not None and cgroup.pids():
        return False
    if host is not None and not host.is_child:
        return cgroup is not None
    reap_orphans()
    children = _own_children()
    return children is not None and not _orphans(children)


def _orphans(children: set[int]) -> set[int]:
    """Those of our `children` that are orphans of the host's tree: neither jobs nor from our own
    session (a process can leave a session, never join one)."""
    own_session, found = os.getsid(0), set()
    for pid in children - jobs.registered():
        with contextlib.suppress(ProcessLookupError):  # reaped meanwhile
            if os.getsid(pid) != own_session:
                found.add(pid)
    return found


def _own_children() -> set[int] | None:
    """Our children from /proc/self/task/*/children (Linux), None where it cannot be read.

    The subreaper's own read, kept beside psutil on purpose: it runs at every exit of the host,
    and psutil finds children only by a scan of every process on the machine."""
    try:
        found: set[int] = set()
        for task in os.listdir("/proc/self/task"):
            found.update(map(int, _read_proc_file(f"/proc/self/task/{task}/children").split()))
    except (OSError, ValueError):
        return None
    return found


def _read_proc_file(path: str) -> bytes:
    """A /proc file's bytes by plain reads: a third of what `open()`'s buffered text layer costs,
    and this runs once per thread of ours at every exit of the host."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _handles(pids: list[int]) -> list[psutil.Process]:
    """psutil's handles on those of `pids` still there."""
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.Error, OSError):
            found.append(psutil.Process(pid))
    return found


def _reap(host: HostProcess | None) -> None:
    if host is not None:
        host.poll()
    reap_orphans()


def _command(
    spec: SpawnSpec, cgroup: CgroupLeaf | None, *, we_move: bool = False
) -> tuple[tuple[str, ...], dict[str, str]]:
    """The argv and environment to exec. Joining the cgroup and learning WATCHDOG_PID both need
    the child itself, so a /bin/sh stub does them and execs the host in place (same pid). A host
    of another user is moved by us instead (`we_move`) while its stub waits.

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
    if we_move:
        return ("/bin/sh", "-c", _WAIT_STUB, "swapguard-host", *spec.argv), env
    if cgroup is not None:
        env[_CGROUP_VAR] = str(cgroup.path / "cgroup.procs")
    return ("/bin/sh", "-c", _STUB, "swapguard-host", *spec.argv), env


def _open_output(spec: SpawnSpec) -> int | None:
    if spec.output is None:
        return None
    try:
        if spec.output_max_bytes > 0:
            return outputlog.start(
                spec.output, spec.output_max_bytes, spec.output_backups, spec.user
            )
        return outputlog.open_for(spec.output, spec.user)
    except OSError as exc:
        raise SpawnError(f"cannot open the host's output {spec.output}: {exc.strerror}") from exc


def _spawn_failure(spec: SpawnSpec, exc: OSError, cgroup: CgroupLeaf | None) -> SpawnError:
    reason = exc.strerror or str(exc)
    if exc.filename is not None and str(exc.filename) == str(spec.cwd):
        return SpawnError(f"cannot start host {spec.argv[0]!r}: working dir {spec.cwd}: {reason}")
    if cgroup is not None and str(exc.filename).startswith(str(cgroup.path)):
        return SpawnError(f"cannot start host {spec.argv[0]!r}: cgroup {cgroup.path}: {reason}")
    return SpawnError(f"cannot start host {spec.argv[0]!r} (cwd {spec.cwd}): {reason}")
