"""Bounded side commands (the build step, health checks, event hooks) and the registry of children
that somebody is waiting for.

Why a registry: the daemon is a child subreaper, so orphans of the host's tree become our children
and must be reaped on SIGCHLD (`host.reap_orphans`). A reaper that scans for zombies would steal the
exit status of a child another thread is waiting for. So whoever spawns a child it will wait for
registers it here, holding `SPAWN_LOCK` from before the fork until the pid is recorded, and the
reaper holds the same lock while it scans: no window in which a fresh child looks like an orphan.

A job runs in a session of its own and must not outlive its bound: at the timeout (or on cancel)
its whole tree is stopped, then killed; when it exits by itself, whatever is left in its process
group is killed too. A job's tree is never the host's: each job runs in a cgroup leaf of its own
(`job-...`, joined before exec, where cgroup v2 is writable), so a daemon it detaches (setsid,
double fork) is still known as the job's (`is_job_process`), reported and stopped with it. Without
a cgroup the job's tree is sampled while it runs, which a fast enough double fork can escape.

Its output is read through a pipe, logged line by line and kept (the tail) for the result, all
from the calling thread with `select`, so a background process that keeps the pipe open cannot
hang the caller; the output itself (tail, log lines, a private file) is `process.joboutput`.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import selectors
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from supervisor.process import proctree
from supervisor.process.cgroup import LEAF_PARENT, WAIT_TO_BE_MOVED, CgroupLeaf
from supervisor.process.identity import HostUser
from supervisor.process.joboutput import OUTPUT_FILES_KEPT as OUTPUT_FILES_KEPT
from supervisor.process.joboutput import OUTPUT_LIMIT as OUTPUT_LIMIT
from supervisor.process.joboutput import JobOutput
from supervisor.process.joboutput import new_output_file as new_output_file
from supervisor.process.proctree import open_pidfd, signal_group

log = logging.getLogger(__name__)

SPAWN_LOCK = threading.Lock()
"""Held across fork + `register`, and by the orphan reaper while it scans."""

_registry: set[int] = set()
_registry_lock = threading.Lock()
_in_flight: set[CancelToken] = set()  # one per running job, for cancel_all
_epoch = 0  # how many cancel_all so far: a job ordered before the last one never starts

_DRAIN_GRACE = 1.0  # after the job is gone: how long an escaped writer may keep the pipe open
_REAP_WAIT = 5.0  # after SIGKILL: how long to wait for the job itself to be reaped
_FREEZE_ROUNDS = 20  # bound on the stop-everything sweeps of a job's tree (each finds new forks)
_POLL_SLICE = 0.05  # only where pidfd is missing (macOS): how often to look for the exit
_TRACK_SLICE = 0.1  # without a cgroup: how often a running job's tree is sampled
_JOB_LEAF = "job-"
_CGROUP_VAR = "SWAPGUARD_CGROUP_PROCS"
_STUB = (
    'echo 0 2>/dev/null > "$SWAPGUARD_CGROUP_PROCS" '
    '|| echo "swapguard: the job runs outside its cgroup" >&2; '
    'unset SWAPGUARD_CGROUP_PROCS; exec "$@"'
)
_WAIT_STUB = WAIT_TO_BE_MOVED + 'exec "$@" </dev/null'  # a job of another user (`user`)
_job_numbers = itertools.count(1)
_tracked: dict[int, tuple[float, int]] = {}  # no cgroup: pid -> (start, job pid) seen in a tree


def register(pid: int) -> None:
    """Mark `pid` as a child somebody waits for; the orphan reaper leaves it alone."""
    with _registry_lock:
        _registry.add(pid)


def unregister(pid: int) -> None:
    """Call once the child has been reaped by its owner."""
    with _registry_lock:
        _registry.discard(pid)


def registered() -> frozenset[int]:
    with _registry_lock:
        return frozenset(_registry)


def is_job_process(pid: int) -> bool:
    """Was `pid` started by a job (build, health check, hook), directly or below it? Such a
    process is never part of the host's tree, even once it detached and was reparented to us."""
    try:
        with open(f"/proc/{pid}/cgroup") as membership:  # Linux: the job leaves' names
            if f"/{LEAF_PARENT}/{_JOB_LEAF}" in membership.read():
                return True
    except OSError:
        pass
    info = proctree.proc_info(pid)
    if info is None:
        return False
    with _registry_lock:
        seen = _tracked.get(pid)
        leader = _tracked.get(info.sid)  # in a session a job's process opened (setsid)
    return (seen is not None and info.start == seen[0]) or leader is not None


def epoch() -> int:
    """Read where a job is ordered (the loop) and given to `run_job`: a job still queued for a
    worker when `cancel_all` runs is cancelled too, not started once a worker is free."""
    return _epoch


def cancel_all() -> int:
    """Cancel every job in flight (the swap moved on, or we shut down), and every job ordered
    before now that has not started (see `epoch`); returns how many were running."""
    global _epoch
    with _registry_lock:
        _epoch += 1
        tokens = list(_in_flight)
    for token in tokens:
        token.cancel()
    return len(tokens)


class CancelToken:
    """A selectable "stop now" for a job in flight (the swap moved on: `CancelJobs`).

    A self-pipe, so the job's `select` wakes at once instead of polling a flag.
    """

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        if not self._cancelled.is_set():
            self._cancelled.set()
            with contextlib.suppress(OSError):
                os.write(self._write_fd, b"x")

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def fileno(self) -> int:
        return self._read_fd

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass(frozen=True, slots=True)
class JobResult:
    """How a job ended. `returncode` < 0 means killed by that signal (subprocess's convention);
    None means it could not even be reaped (stuck in the kernel)."""

    argv: tuple[str, ...]
    returncode: int | None
    timed_out: bool
    output: str
    duration: float
    cancelled: bool = False
    left_behind: int = 0  # processes the job left running (detached daemons), stopped with it
    output_file: Path | None = None  # where the whole output is kept (`output_to`)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.cancelled

    def describe(self) -> str:
        """One phrase for events and logs: "exit 0", "timed out after 2.0s", "cancelled"."""
        if self.timed_out:
            return f"timed out after {self.duration:.1f}s"
        if self.cancelled:
            return "cancelled"
        if self.returncode is None:
            return "status unknown"
        if self.returncode < 0:
            try:
                return f"killed by {signal.Signals(-self.returncode).name}"
            except ValueError:
                return f"killed by signal {-self.returncode}"
        return f"exit {self.returncode}"


def run_job(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float,
    stdin: bytes | None = None,
    log_name: str = "job",
    cancel: CancelToken | None = None,
    output_to: Path | None = None,
    with_the_swap: bool = True,
    user: HostUser | None = None,
    ordered_at: int | None = None,
) -> JobResult:
    """Run one bounded command to its end and say how it went; blocking, for worker threads.

    Never raises for a failing command: a command that cannot start gives returncode 127 and the
    OSError text as output. `env` None inherits ours. Each output line is logged at INFO on
    `process.jobs.<log_name>` so that build output reaches the log. `cancel` (or `cancel_all`)
    stops it early, like a timeout; `with_the_swap=False` (a hook) keeps it out of `cancel_all`.
    `output_to` (from `new_output_file`): the whole output goes there, and its lines are logged
    at DEBUG only. `user` (host.user): it runs as that user, with the login's variables over
    `env` (the build and the health check: code the host may rewrite never runs as root); not
    with `stdin`. `ordered_at`: `epoch()` when the job was ordered; after a `cancel_all` since,
    it does not start (a build queued behind busy workers would otherwise run on the tree a
    rollback just restored) and ends `cancelled`.
    """
    command = _check_argv(argv)
    if user is not None and stdin is not None:
        raise ValueError("run_job: a job of another user takes no stdin")
    if not timeout > 0:
        raise ValueError(f"run_job: timeout must be > 0 seconds, got {timeout!r}")
    job_log = logging.getLogger(f"{__name__}.{log_name}")
    if with_the_swap:
        with _registry_lock:
            if ordered_at is not None and ordered_at != _epoch:
                job_log.info("not started: cancelled while it waited for a worker")
                return JobResult(command, None, False, "", 0.0, cancelled=True)
            token = cancel if cancel is not None else CancelToken()
            _in_flight.add(token)
    else:
        token = cancel if cancel is not None else CancelToken()
    try:
        if user is not None:
            env = {**(os.environ if env is None else env), **user.login_env()}
        output = JobOutput(job_log, output_to)
        result = _run(command, cwd, env, timeout, stdin, output, token, user)
        return result if output_to is None else replace(result, output_file=output_to)
    finally:
        with _registry_lock:
            _in_flight.discard(token)
        if cancel is None:
            token.close()


def _run(
    command: tuple[str, ...],
    cwd: Path,
    env: Mapping[str, str] | None,
    timeout: float,
    stdin: bytes | None,
    output: JobOutput,
    cancel: CancelToken,
    user: HostUser | None,
) -> JobResult:
    started = time.monotonic()
    job_log = output.log
    leaf = CgroupLeaf.create(f"{_JOB_LEAF}{os.getpid()}-{next(_job_numbers)}")
    ids = user.popen_args() if user is not None else {}
    we_move = leaf is not None and bool(ids)
    try:
        argv, full_env = _in_leaf(command, cwd, env, leaf, we_move=we_move)
        with SPAWN_LOCK:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=full_env,
                stdin=subprocess.DEVNULL if stdin is None and not we_move else subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                **ids,
            )
            register(proc.pid)
        if we_move:
            assert leaf is not None
            leaf.move_and_release(proc)
    except (OSError, subprocess.SubprocessError) as exc:
        if leaf is not None:
            leaf.remove()
        job_log.warning("cannot run %s (cwd %s): %s", command[0], cwd, exc)
        output.feed(f"{exc}\n".encode())
        output.close()
        return JobResult(command, 127, False, str(exc), time.monotonic() - started)

    run = _JobRun(proc, output, stdin, leaf)
    try:
        ended_by = run.supervise(started + timeout, cancel)
    finally:
        run.finish()
        unregister(proc.pid)
        output.close()
    result = JobResult(
        command,
        proc.returncode,
        timed_out=ended_by == "timeout",
        output=run.output.text(),
        duration=time.monotonic() - started,
        cancelled=ended_by == "cancel",
        left_behind=run.left_behind,
    )
    job_log.log(
        logging.INFO if result.ok else logging.WARNING,
        "%s: %s (%.2fs)",
        command[0],
        result.describe(),
        result.duration,
    )
    return result


def _in_leaf(
    command: tuple[str, ...],
    cwd: Path,
    env: Mapping[str, str] | None,
    leaf: CgroupLeaf | None,
    *,
    we_move: bool = False,
) -> tuple[tuple[str, ...], dict[str, str] | None]:
    """The argv and environment that start `command` inside `leaf`: a /bin/sh stub joins it (or,
    `we_move`, waits to be moved in) and execs the command in place (same pid), as for the host.
    The stub would report a missing program only as exit 127, so it is looked for here first
    (FileNotFoundError)."""
    if leaf is None:
        return command, None if env is None else dict(env)
    full_env = dict(os.environ if env is None else env)
    program = command[0]
    if Path(cwd).is_dir():  # else Popen names the missing folder
        if "/" in program:
            candidate = Path(cwd) / program
            found = candidate.is_file() and os.access(candidate, os.X_OK)
        else:
            found = shutil.which(program, path=full_env.get("PATH", os.defpath)) is not None
        if not found:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    if we_move:
        return ("/bin/sh", "-c", _WAIT_STUB, "swapguard-job", *command), full_env
    full_env[_CGROUP_VAR] = str(leaf.path / "cgroup.procs")
    return ("/bin/sh", "-c", _STUB, "swapguard-job", *command), full_env


def _check_argv(argv: Sequence[str]) -> tuple[str, ...]:
    if isinstance(argv, str | bytes):
        raise TypeError(f"run_job: argv must be a sequence of strings, not one string: {argv!r}")
    command = tuple(argv)
    if not command:
        raise ValueError("run_job: argv is empty")
    for index, arg in enumerate(command):
        if not isinstance(arg, str):
            raise TypeError(f"run_job: argv[{index}] must be a string, got {arg!r}")
    return command


class _JobRun:
    """The select loop of one job: output, stdin, the exit (pidfd), the deadline, a cancel."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        output: JobOutput,
        stdin: bytes | None,
        leaf: CgroupLeaf | None,
    ) -> None:
        self.proc = proc
        self.output = output
        self.leaf = leaf
        self.left_behind = 0
        self._sampled = leaf is None  # no cgroup: sample the tree
        self._out_fd: int | None = proc.stdout.fileno() if proc.stdout else None
        self._in_fd: int | None = proc.stdin.fileno() if proc.stdin else None
        self._pending_input = memoryview(stdin or b"")
        self._exit_fd = open_pidfd(proc.pid)
        for fd in (self._out_fd, self._in_fd):
            if fd is not None:
                os.set_blocking(fd, False)
        if self._in_fd is not None and not self._pending_input:
            self._close_input()

    def supervise(self, deadline: float, cancel: CancelToken) -> str:
        """Run until the job exits ("exit"), the deadline passes ("timeout") or a cancel.

        A selector, not select(): the daemon may hold fds above select's limit of 1024.
        """
        with selectors.DefaultSelector() as selector:
            selector.register(cancel.fileno(), selectors.EVENT_READ)
            for fd, events in (
                (self._exit_fd, selectors.EVENT_READ),
                (self._out_fd, selectors.EVENT_READ),
                (self._in_fd, selectors.EVENT_WRITE),
            ):
                if fd is not None:
                    selector.register(fd, events)
            while not self._exited():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "timeout"
                if cancel.cancelled:
                    return "cancel"
                wait = remaining if self._exit_fd is not None else min(remaining, _POLL_SLICE)
                if self._sampled:
                    self._sample_tree()
                    wait = min(wait, _TRACK_SLICE)
                for key, _ in selector.select(wait):
                    if key.fd == self._out_fd and not self._read_output():
                        selector.unregister(key.fd)
                    elif key.fd == self._in_fd:
                        self._write_input(selector)
        return "exit"

    def finish(self) -> None:
        """Kill what is left of the job, reap it, drain its output, close every fd."""
        try:
            if not self._exited():
                _kill_job_tree(self.proc.pid)
            # The leader is a zombie at worst here, so its pid still names its group: safe.
            signal_group(self.proc.pid, signal.SIGKILL)
            try:
                self.proc.wait(timeout=_REAP_WAIT)
            except subprocess.TimeoutExpired:
                log.error("job %d did not die within %.0fs of SIGKILL", self.proc.pid, _REAP_WAIT)
            self._stop_left_behind()
            self._drain(time.monotonic() + _DRAIN_GRACE)
        finally:
            self._close_input()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._out_fd = None
            if self._exit_fd is not None:
                os.close(self._exit_fd)
                self._exit_fd = None

    def _sample_tree(self) -> None:
        """No cgroup: note every process of the job's tree and session, so that one that
        detaches later is still known as the job's (`is_job_process`)."""
        job = self.proc.pid
        table = proctree.process_table()
        with _registry_lock:
            sessions = {job} | {pid for pid, (_s, owner) in _tracked.items() if owner == job}
        members = proctree.descendants(table, [job])
        members.update(pid for pid, info in table.items() if info.sid in sessions)
        members.discard(job)
        with _registry_lock:
            for pid in members:
                _tracked.setdefault(pid, (table[pid].start, job))

    def _stop_left_behind(self) -> None:
        """Kill what the job left running (a detached daemon), report it, reap what is ours."""
        job, me = self.proc.pid, os.getpid()
        if self._sampled:
            self._sample_tree()  # a last look: what joined a known session since
        if self.leaf is not None:
            left = proctree.subtree_table((), also=self.leaf.pids())
        else:
            with _registry_lock:
                mine = {pid: start for pid, (start, owner) in _tracked.items() if owner == job}
            seen = proctree.subtree_table((), also=mine)
            left = {pid: info for pid, info in seen.items() if info.start == mine[pid]}
        left = {pid: info for pid, info in left.items() if pid != job and not info.zombie}
        handles = []
        if self.leaf is not None and left:
            self.leaf.kill()
        for info in left.values():
            _sent, pidfd = proctree.signal_verified(info.process, signal.SIGKILL)
            if pidfd is not None:
                handles.append(pidfd)
        if handles:
            proctree.await_exits(handles, time.monotonic() + _REAP_WAIT)  # closes them
        for pid, info in left.items():
            if info.ppid == me:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
        with _registry_lock:
            for pid in [pid for pid, (_s, owner) in _tracked.items() if owner == job]:
                del _tracked[pid]
        if self.leaf is not None:
            self.leaf.remove()
        if left:
            self.left_behind = len(left)
            self.output.log.warning(
                "job %d left %d processes running (%s): stopped with it",
                job,
                len(left),
                ", ".join(map(str, sorted(left))),
            )

    def _exited(self) -> bool:
        """Has the job exited? Peeks without reaping, so its pid keeps naming its group."""
        if self.proc.returncode is not None:
            return True
        if not hasattr(os, "waitid"):  # reaps: killpg of the leftovers is then best effort
            return self.proc.poll() is not None
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None and info.si_pid != 0

    def _read_output(self) -> bool:
        """Read what is there; False at end of file (every writer closed the pipe)."""
        if self._out_fd is None:
            return False
        try:
            chunk = os.read(self._out_fd, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            self._out_fd = None
            return False
        self.output.feed(chunk)
        return True

    def _drain(self, until: float) -> None:
        with selectors.DefaultSelector() as selector:
            if self._out_fd is not None:
                selector.register(self._out_fd, selectors.EVENT_READ)
            while self._out_fd is not None:
                remaining = until - time.monotonic()
                if remaining <= 0:
                    log.warning("job %d: an escaped process holds its output", self.proc.pid)
                    break
                if selector.select(remaining):
                    self._read_output()
        self.output.flush()

    def _write_input(self, selector: selectors.BaseSelector) -> None:
        assert self._in_fd is not None
        try:
            written = os.write(self._in_fd, self._pending_input[:65536])
        except BlockingIOError:
            return
        except OSError:  # the job closed its stdin early: what it did not read is not ours to force
            self._pending_input = memoryview(b"")
            written = 0
        self._pending_input = self._pending_input[written:]
        if not self._pending_input:
            selector.unregister(self._in_fd)
            self._close_input()

    def _close_input(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        self._in_fd = None


def _kill_job_tree(pid: int) -> None:
    """SIGKILL a job and every descendant, including ones that left its process group.

    Stops the tree first, sweep after sweep, so that nothing forks while we look (a child of a
    killed parent would be reparented out of reach); then kills all of it at once. Each signal
    goes through `signal_verified`: a pid reused meanwhile is never hit.
    """
    stopped: dict[int, proctree.ProcInfo] = {}  # as the table saw each one
    signal_group(pid, signal.SIGSTOP)
    for _ in range(_FREEZE_ROUNDS):
        table = proctree.subtree_table([pid])
        if pid not in table:
            break
        found = {pid, *proctree.descendants(table, [pid])}
        fresh = [member for member in found if member not in stopped]
        if not fresh:
            break
        for member in fresh:
            stopped[member] = table[member]
            _signal_and_close(proctree.signal_verified(table[member].process, signal.SIGSTOP))
    signal_group(pid, signal.SIGKILL)
    for info in stopped.values():
        _signal_and_close(proctree.signal_verified(info.process, signal.SIGKILL))


def _signal_and_close(outcome: tuple[bool, int | None]) -> None:
    """signal_verified hands back the pidfd it pinned the process with; not waited on here."""
    if outcome[1] is not None:
        os.close(outcome[1])
