"""The host's runs: each process started or adopted, recorded in the store, its exit watched.

Why it exists: the lifecycle machine decides *when* the host starts; `process.host` has the
mechanisms of a process tree. In between sits a run: a spawn with the environment the host is
promised (notify socket, watchdog, control socket, the swap's variables), recorded (pid, start
time) right after the fork so that a restarted supervisor adopts the process instead of starting
a second one, and an exit seen on the loop and recorded. This module does that and answers with
the lifecycle events for the runtime to feed; it decides nothing.

Rules it keeps:
- Loop thread only.
- A process that cannot be recorded is killed and the spawn fails: better no host than an
  untracked one.
- Nothing is written between an exit and the next spawn: the exit (with why it happened, once the
  lifecycle machine decided it) is recorded together with the next spawn's record, in one
  transaction right after the fork, or once `on_exit` returns when no spawn followed. `process` is
  None by the time `on_exit` hears of the exit. A supervisor killed in between finds the run
  without an exit at its restart: its process is gone, so the run is closed as lost and an
  unrecorded host in the leaf is killed (`adopt`).
- A kill of the host's tree sends its signals on the loop and waits for the exits on one of the
  `workers` it was given (reserved for what a rollback cannot wait for); `on_tree_gone` hears
  the end, whatever it was.
- It reaches the runtime only through what it is given: the `on_exit`, `on_tree_gone`, `emit`
  and `schedule` callables, the `workers` and the `Counters` record.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

import tenacity

from supervisor import clock
from supervisor.config.schema import Config
from supervisor.core import lifecycle
from supervisor.daemon import faults
from supervisor.errors import SwapguardError
from supervisor.process import host, identity, proctree
from supervisor.state.store import RunExit, Store

if TYPE_CHECKING:
    from supervisor.daemon.counters import Counters

log = logging.getLogger(__name__)
_UNRECORDED_GONE_S = 2.0  # how long adoption waits for an unrecorded host to be gone
KILL_WAIT_S = 5.0
"""How long a tree kill waits (on a worker) for SIGKILLed processes to be gone; what survives that
(a process in D state) is logged, and the machines go on without it."""

_INHERITED_PROTOCOL_VARS = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "FDSTORE",
)
"""Our own manager's variables: the host gets ours (or none), never our manager's."""


class HostRunner:
    """The host's current process (`process`, None while none runs) and its run record."""

    def __init__(
        self,
        config: Config,
        store: Store,
        cgroup: host.CgroupLeaf | None,
        counters: Counters,
        *,
        on_exit: Callable[[lifecycle.Exited], None],
        on_tree_gone: Callable[[int], None],
        emit: Callable[[str, Mapping[str, Any]], None],
        schedule: Callable[[Coroutine[Any, Any, Any]], None],
        workers: Executor,
    ) -> None:
        """`on_exit` gets the exit of the process; `on_tree_gone(killed)` the end of a tree kill;
        `emit(kind, detail)` records an audit event; `schedule` runs a coroutine in the background
        with its errors logged; `workers` wait for tree kills."""
        self.config = config
        self.store = store
        self.cgroup = cgroup
        self.counters = counters
        self.loop = asyncio.get_running_loop()
        self._on_exit = on_exit
        self._on_tree_gone = on_tree_gone
        self._emit = emit
        self._workers = workers
        self._schedule = schedule
        self.process: host.HostProcess | None = None
        self.run_id: int | None = None
        self._ended_run_id: int | None = None  # the run whose exit awaits its reason
        self.code_version: str | None = None  # the current run's, as recorded
        self._unrecorded_exit: RunExit | None = None  # recorded with the next spawn

    def adopt(self) -> lifecycle.Adopted | None:
        """The host a previous supervisor left running, if its recorded run is still alive."""
        run = self.store.live_run()
        if run is None:
            self._kill_unrecorded()
            return None
        recorded = proctree.StartStamp(run.create_time, run.boot_id, run.start_uptime)
        process = host.HostProcess.adopt(run.pid, recorded, cgroup=self.cgroup)
        if process is None:
            self.store.record_exit(run.id, time.time(), None, None)
            if self._kill_unrecorded():
                gone = (
                    "ended while swapguard was down, its exit not recorded: an unrecorded process"
                    " in its cgroup leaf (a spawn swapguard died before recording, or what the"
                    " host left behind) was killed"
                )
            else:
                gone = "gone while swapguard was down (or its pid names another process now)"
            self._emit("host.lost", {"pid": run.pid, "detail": gone})
            return None
        self.process, self.run_id, self.code_version = process, run.id, run.code_version
        self._watch_exit(process)
        boot = clock.boot_clock()
        started = process.start.since_boot  # its own start, not our restart, on the boot clock
        if started is None:  # no /proc (macOS): from the wall clock, which a step skews
            started = boot - max(0.0, time.time() - process.start.wall)
        return lifecycle.Adopted(
            now=boot, pid=process.pid, ready=run.ready_at is not None, started=started
        )

    def recall_last_exit(self) -> lifecycle.Recalled | None:
        """How the host's last recorded run ended, for a supervisor that just started."""
        run = self.store.last_ended_run()
        if run is None or run.exited_at is None:
            return None
        reasons = {reason.value: reason for reason in lifecycle.ExitReason}
        reason = reasons.get(run.exit_reason or "")  # None: it ended while we were down
        last = lifecycle.LastExit(run.exit_code, run.exit_signal, run.exited_at, reason)
        return lifecycle.Recalled(now=clock.boot_clock(), last_exit=last)

    def _kill_unrecorded(self) -> bool:
        """A host in our cgroup leaf that no run records was spawned by a swapguard killed before
        it recorded the spawn: never two hosts, so it goes before one is started (issue 12's
        chaos test found it). Without a cgroup it cannot be found. Whether one was found."""
        if self.cgroup is None or not (members := self.cgroup.pids()):
            return False
        log.warning("killing %s: a host spawned by a swapguard that died before recording it",
                    members)
        self.cgroup.kill()
        deadline = time.monotonic() + _UNRECORDED_GONE_S
        while self.cgroup.pids() and time.monotonic() < deadline:
            time.sleep(0.01)  # exits take milliseconds once SIGKILL is sent; bounded all the same
        return True

    def kill_tree(self, *, process_too: bool) -> None:
        """SIGKILL what is left of the host's tree (its main process too if `process_too`): at
        once on the loop, the wait for the exits on a worker, so no deadline waits for a kernel
        slow to reap a tree. `on_tree_gone` is called on the loop either way: at once (queued by
        the runtime) when nothing was left, the common case."""
        kill = host.TreeKill(self.process if process_too else None, self.cgroup)
        if kill.start() and not faults.KILL_BLOCKS_S:
            self._on_tree_gone(0)
            return

        def finish() -> int:
            faults.kill_blocks()
            return kill.finish(KILL_WAIT_S)

        def done(future: asyncio.Future[int]) -> None:
            killed = 0
            if future.cancelled():
                pass  # shutting down
            elif (error := future.exception()) is not None:
                log.error("killing the host's tree failed", exc_info=error)
            else:
                killed = future.result()
            self._on_tree_gone(killed)

        self.loop.run_in_executor(self._workers, finish).add_done_callback(done)

    def _kill_unrecordable(self, process: host.HostProcess) -> None:
        """SIGKILL a host just spawned that the store would not record: at once on the loop (its
        cgroup, else the process itself: our unreaped child, so its pid is still its own), the
        sweep for anything it forked meanwhile and the wait on a worker."""
        kill = host.TreeKill(process, self.cgroup)
        if kill.start():
            process.close()
            return
        with contextlib.suppress(OSError):
            os.kill(process.pid, signal.SIGKILL)

        def finish() -> None:
            try:
                kill.finish(KILL_WAIT_S)
            finally:
                process.close()

        self.loop.run_in_executor(self._workers, finish).add_done_callback(_log_failure)

    def spawn(
        self, extra_env: Mapping[str, str], *, code_version: str | None, swap_id: str | None
    ) -> lifecycle.Spawned | lifecycle.SpawnFailed:
        """Start and record a host process. `extra_env` goes over the configured environment;
        `code_version` and `swap_id` are recorded with the run."""
        wall = time.time()
        try:
            # looked up at each start, as a login would: a changed group list applies at once
            user = identity.resolve(self.config.host.user, self.config.host.group)
            spec = host.SpawnSpec(
                argv=self.config.host.command,
                cwd=self.config.host.cwd,
                env=self._child_env(extra_env, user),
                output=self.config.host.output,
                output_max_bytes=self.config.host.output_max_bytes,
                output_backups=self.config.host.output_backups,
                user=user,
            )
            process = host.HostProcess.spawn(spec, self.cgroup)
        except SwapguardError as exc:
            return lifecycle.SpawnFailed(now=clock.boot_clock(), wall=wall, error=exc.message)
        self.counters.spawns += 1
        try:
            self.run_id = self._record_spawn(process, wall, code_version, swap_id)
            self.code_version = code_version
            self._unrecorded_exit = None
        except SwapguardError as exc:
            # A host we could not record would not be adopted after a restart of ours, and a
            # second one would start: better no host than an untracked one.
            self._kill_unrecordable(process)
            return lifecycle.SpawnFailed(
                now=clock.boot_clock(), wall=wall, error=f"not recorded: {exc.message}"
            )
        self.process = process
        self._watch_exit(process)
        return lifecycle.Spawned(now=clock.boot_clock(), pid=process.pid)

    def _record_spawn(
        self, process: host.HostProcess, wall: float, code_version: str | None, swap_id: str | None
    ) -> int:
        """Twice at most: a full state disk gives back the store's reserve on the first refusal."""
        for attempt in tenacity.Retrying(stop=tenacity.stop_after_attempt(2), reraise=True):
            with attempt:
                start = process.start
                return self.store.record_spawn(
                    process.pid, start.wall, start.boot_id, wall, code_version, swap_id,
                    start_uptime=start.since_boot, previous=self._unrecorded_exit,
                )
        raise AssertionError("unreachable: tenacity reraises")

    def record_code_version(self, code_version: str) -> None:
        """The baseline taken after the current run's spawn is the code it started on."""
        if self.run_id is not None and self.process is not None:
            try:
                self.store.record_code_version(self.run_id, code_version)
                self.code_version = code_version
            except SwapguardError as exc:  # adoption then takes the baseline again
                log.error("host run %d: code version not recorded: %s", self.run_id, exc)

    def record_ready(self) -> None:
        """The current run became ready: a restarted supervisor adopts it as ready."""
        if self.run_id is not None:
            try:
                self.store.record_ready(self.run_id, time.time())
            except SwapguardError as exc:  # adopted as starting then: its next heartbeat readies it
                log.error("host run %d: readiness not recorded: %s", self.run_id, exc)

    def record_exit_reason(self, reason: str) -> None:
        """Why the run that just exited ended, once the lifecycle machine decided it: with the
        exit itself while that waits for the next spawn's transaction (nothing is written
        between an exit and the next spawn), else on its own."""
        run_id, self._ended_run_id = self._ended_run_id, None
        pending = self._unrecorded_exit
        if pending is not None and pending.run_id == run_id:
            self._unrecorded_exit = dataclasses.replace(pending, reason=reason)
            return
        if run_id is not None:
            try:
                self.store.record_exit_reason(run_id, reason)
            except SwapguardError as exc:  # the audit log's host.exited/stopped has it too
                log.error("host run %d: exit reason not recorded: %s", run_id, exc)

    def _child_env(
        self, extra_env: Mapping[str, str], user: identity.HostUser | None
    ) -> dict[str, str]:
        inherit = self.config.host.inherit_env
        env = dict(os.environ)
        if inherit is not None:  # an allow-list: nothing else of ours reaches the host
            env = {name: value for name, value in env.items() if name in inherit}
        for key in _INHERITED_PROTOCOL_VARS:
            env.pop(key, None)
        if user is not None:  # the login's own, over ours; host.env still has the last word
            env.update(user.login_env())
        env.update(self.config.host.env)
        env["NOTIFY_SOCKET"] = str(self.config.notify_socket())
        env["SWAPGUARD_SOCKET"] = str(self.config.host_control_socket())
        if self.config.host.heartbeat_timeout > 0:
            env["WATCHDOG_USEC"] = str(int(self.config.host.heartbeat_timeout * 1_000_000))
            env["WATCHDOG_PID"] = "0"  # filled by the child: see host.SpawnSpec
        env.update(extra_env)
        return env

    def _watch_exit(self, process: host.HostProcess) -> None:
        fd = process.exit_fd
        if fd is not None:
            self.loop.add_reader(fd, self._on_exit_readable, process)
        else:
            self._schedule(self._poll_exit(process))

    async def _poll_exit(self, process: host.HostProcess) -> None:
        while self.process is process:
            self._on_exit_readable(process)
            await asyncio.sleep(0.05)

    def _on_exit_readable(self, process: host.HostProcess) -> None:
        status = process.poll()
        if status is None:
            return
        if process.exit_fd is not None:
            self.loop.remove_reader(process.exit_fd)
        process.close()
        wall = time.time()
        self._ended_run_id = self.run_id
        if self.run_id is not None:
            self._unrecorded_exit = RunExit(self.run_id, wall, status.code, status.signal)
        if self.process is process:
            self.process = None
        try:
            self._on_exit(
                lifecycle.Exited(
                    now=clock.boot_clock(), wall=wall, code=status.code, signal=status.signal
                )
            )
        finally:
            self.record_pending_exit()

    def record_pending_exit(self) -> None:
        """The exit no spawn has recorded yet (none followed it): at the end of the turn that
        heard it, before the turn's state is published (a status never runs ahead of the store)."""
        end, self._unrecorded_exit = self._unrecorded_exit, None
        if end is None:
            return
        try:
            self.store.record_exit(end.run_id, end.at, end.code, end.signal, end.reason)
        except SwapguardError as exc:  # a restart finds the run's process gone all the same
            log.error("host run %d: exit not recorded: %s", end.run_id, exc)


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and (error := future.exception()) is not None:
        log.error("killing an unrecorded host failed", exc_info=error)
