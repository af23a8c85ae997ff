"""The imperative shell: the one event loop that owns the host, the swap and their clocks.

Every input becomes an event for one of the two pure machines (`lifecycle` for the host process,
`swaps` for the deadman clock); their actions are performed here. Blocking work (git, snapshots,
builds, health checks) runs in worker threads and comes back as events through
`loop.call_soon_threadsafe`. A tree kill runs on the loop: it is a cgroup read when nothing is left
(the common case) and bounded otherwise. The control socket reaches this state only through
`daemon.LoopBackend._call`, which runs each request on the loop.

Order matters in two places:
- a swap record is saved before any of its actions runs, so a crash between two steps resumes at the
  step that was in progress (every step is repeatable);
- a host spawn is recorded (pid, start time) right after the fork, so a restarted supervisor adopts
  the process instead of starting a second one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from supervisor import clock, host, jobs, lifecycle, notify, swaps
from supervisor.checkpoint import Checkpoint, CodeTree
from supervisor.config import Config
from supervisor.errors import Conflict, NotFound, SwapguardError
from supervisor.hooks import HookRunner
from supervisor.policies import host_policy, swap_policy
from supervisor.snapshot import SnapshotStore
from supervisor.store import Store
from supervisor.swapwork import BASELINE_KEY, SwapWork

log = logging.getLogger(__name__)

CRASH_AT = os.environ.get("SWAPGUARD_CRASH_AT")
"""Fault injection for the test suite: `<state>/<step>` makes the process die (exit 86) right
after that swap record is persisted and before its actions run, as a kill -9 would."""

BASELINE_CONFIRMED_KEY = "host_checkpoint_confirmed"
"""Store key of the confirmed swap whose code the baseline was last taken from: a supervisor
killed between a confirm and that refresh takes it on restart, else the drift guard would
prepare from the code before the swap (and its rollback would undo the confirmed version)."""


@dataclass
class Counters:
    """Monotonic counters for /metrics; only the loop thread writes them."""

    datagrams: int = 0
    datagrams_dropped: int = 0
    datagrams_invalid: int = 0
    heartbeats: int = 0
    spawns: int = 0
    swaps_finished: dict[str, int] = field(default_factory=dict)


class Runtime:
    """Owns the supervisor's state. Construct on the loop thread; call `start()` once."""

    def __init__(self, config: Config, store: Store, *, cgroup: host.CgroupLeaf | None) -> None:
        self.config = config
        self.store = store
        self.cgroup = cgroup
        self.loop = asyncio.get_running_loop()
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="swapguard-io")
        self.host_policy = host_policy(config)
        self.swap_policy = swap_policy(config)
        self.host = lifecycle.Host()
        self.process: host.HostProcess | None = None
        self.run_id: int | None = None
        self.swap: swaps.Swap | None = None
        self.counters = Counters()
        self.started_at = time.time()
        self.code = CodeTree(
            config.code.root, extra_paths=config.code.extra_paths, exclude=self._code_excludes()
        )
        self.snapshots = SnapshotStore(config.state.dir / "snapshots")
        self.work = SwapWork(config, store, self.code, self.snapshots)
        self.hooks = HookRunner(config.hooks, cwd=config.code.root)
        self.notify_server = notify.NotifyServer(config.state.dir / "notify.sock")
        self.drift = False
        self._baseline_pending = False
        self._recheck_drift = False
        baseline = store.get_value(BASELINE_KEY)
        self.code_version: str | None = (
            baseline.get("commit") if isinstance(baseline, dict) else None)
        self.head = baseline.get("head") if isinstance(baseline, dict) else None
        self._host_env: dict[str, str] = {}
        self._one_shot_env = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._listeners: list[Callable[[], None]] = []
        self._last_refusal: str | None = None  # a host repeating a refused request: logged once
        self._confirm_waiting = False  # a datagram's confirm waits for SyncData; one is enough

    # --- start and shutdown --------------------------------------------------------------

    def _code_excludes(self) -> list[os.PathLike[str]]:
        paths: list[os.PathLike[str]] = [self.config.state.dir, self.config.control.socket]
        if self.config.host.output is not None:  # the host's log is not code
            paths.append(self.config.host.output)
        for entry in self.config.data:
            paths.append(entry.path)
            for suffix in ("-wal", "-shm", "-journal"):
                paths.append(entry.path.with_name(entry.path.name + suffix))
        return paths

    async def start(self) -> None:
        """Adopt a live host or start one; resume a swap that was in flight."""
        self.loop.add_reader(self.notify_server.fileno(), self._on_datagrams)
        self.loop.add_signal_handler(signal.SIGCHLD, host.reap_orphans)
        active = self.store.active_swap()
        self.swap = swaps.Swap.from_json(active) if active else None
        adopted = self._adopt_live_host()
        newest = self.store.list_swaps(limit=1)
        confirmed = newest[0]["id"] if newest and newest[0]["state"] == "confirmed" else None
        unsettled = confirmed is not None and (
            self.store.get_value(BASELINE_CONFIRMED_KEY) != confirmed
        )
        if self.swap is None and (not adopted or self.code_version is None or unsettled):
            # The checkpoint of the code the host starts on: what the drift guard falls back to.
            await self.loop.run_in_executor(
                self.pool, self._refresh_baseline_blocking, confirmed
            )
        if self.swap is not None:
            self._set_host_env_for(self.swap)
            swap, actions = swaps.resume(self.swap, self.swap_policy, clock.now())
            log.info("resuming swap %s in state %s step %s", swap.id, swap.state, swap.step)
            self._commit_swap(swap, actions)
        swap_drives_host = self.swap is not None and (
            self.swap.step is not None or self.swap.state is swaps.SwapState.FAILED
        )
        if not adopted and not swap_drives_host:
            self.feed_host(lifecycle.StartRequested(now=clock.boot_clock()))
        self._tick()

    async def shutdown(self) -> None:
        """SIGTERM/SIGINT: stop the host gracefully, then let the loop end."""
        log.info("swapguard stopping: stopping the host first")
        self.feed_host(lifecycle.StopRequested(now=clock.boot_clock()))
        deadline = self.config.host.stop_timeout + 10.0
        try:
            await asyncio.wait_for(self._host_stopped(), timeout=deadline)
        except TimeoutError:
            log.error("the host did not stop within %.0fs; killing its tree", deadline)
            host.kill_tree(self.process, self.cgroup)
        jobs.cancel_all()
        self.hooks.close()
        self.notify_server.close()
        self.pool.shutdown(wait=True, cancel_futures=True)

    async def _host_stopped(self) -> None:
        while self.host.state is not lifecycle.HostState.STOPPED or self.process is not None:
            await self._next_change()

    async def _next_change(self) -> None:
        """Returns after the next change of the host or the swap."""
        waiter = self.loop.create_future()
        self._listeners.append(lambda: waiter.done() or waiter.set_result(None))
        await waiter

    async def _data_on_disk(self, swap_id: str) -> None:
        """A confirm of a running new version waits for SyncData (the machine refuses it before):
        the time it takes to flush what the activation copied, seconds at most."""
        while (
            (swap := self.swap) is not None
            and swap.id == swap_id
            and swap.state is swaps.SwapState.PROBATION
            and swap.step is None
            and swap.data_unsynced
        ):
            await self._next_change()

    def _adopt_live_host(self) -> bool:
        run = self.store.live_run()
        if run is None:
            return False
        process = host.HostProcess.adopt(run.pid, run.create_time, cgroup=self.cgroup)
        if process is None:
            self.store.record_exit(run.id, time.time(), None, None)
            self._emit("host.lost", {"pid": run.pid, "detail": "gone while swapguard was down"})
            return False
        self.process, self.run_id = process, run.id
        self._watch_exit(process)
        self.feed_host(
            lifecycle.Adopted(
                now=clock.boot_clock(), pid=process.pid, ready=run.ready_at is not None
            )
        )
        return True

    # --- the two machines ----------------------------------------------------------------

    def feed_host(self, event: lifecycle.Event) -> None:
        before = self.host.state
        self.host, actions = lifecycle.step(self.host, event, self.host_policy)
        if self.host.state is not before:
            log.info("host %s --%s--> %s", before, type(event).__name__, self.host.state)
            notify.sd_notify(f"STATUS=host {self.host.state}")
        for action in actions:
            self._perform_host(action)
        self._after_change()

    def feed_swap(self, event: swaps.Event) -> None:
        """Feed the swap machine; raises Conflict when the event is not allowed now."""
        if self.swap is None:
            raise Conflict("no swap is in flight")
        swap, actions = swaps.step(self.swap, event, self.swap_policy)
        self._commit_swap(swap, actions)

    def _feed_swap_quietly(self, event: swaps.Event) -> None:
        """Host facts go to the swap machine only when it can use them."""
        if self.swap is None or self.swap.state not in (
            swaps.SwapState.PROBATION,
            swaps.SwapState.ROLLING_BACK,
        ):
            return
        with contextlib.suppress(Conflict):
            self.feed_swap(event)

    def _commit_swap(self, swap: swaps.Swap, actions: list[swaps.Action]) -> None:
        before = self.swap
        emits = [(a.event, dict(a.detail)) for a in actions if isinstance(a, swaps.Emit)]
        if before is None or swap != before or emits:
            # The record and its events in one transaction: a reader never sees one without
            # the other, and both are on disk before any action runs.
            records = self.store.save_swap_with_events(
                swap.id, swap.state.value, swap.created_at.wall, swap.to_json(), emits)
            for record in records:
                self.hooks.submit(record.to_json())
            if CRASH_AT is not None and f"{swap.state.value}/{swap.step}" == CRASH_AT:
                log.warning("SWAPGUARD_CRASH_AT=%s: dying here", CRASH_AT)
                os._exit(86)
        if before is None or (before.state, before.step) != (swap.state, swap.step):
            log.info(
                "swap %s: %s/%s -> %s/%s",
                swap.id,
                before.state if before else "-",
                before.step if before else "-",
                swap.state,
                swap.step,
            )
        self.swap = swap
        if swap.step is swaps.Step.STOP_OLD and (before is None or before.step is None):
            self.pool.submit(self.work.save_changes, swap)
        if before is not None and before.step is swaps.Step.SPAWN_NEW and swap.step is None:
            self.pool.submit(self._verify_snapshots, swap)
        for action in actions:
            if not isinstance(action, swaps.Emit):
                self._perform_swap(swap, action)
        if swap.state in swaps.TERMINAL:
            self.counters.swaps_finished[swap.state.value] = (
                self.counters.swaps_finished.get(swap.state.value, 0) + 1
            )
            self._finish_swap(swap)
        self._after_change()

    def _after_change(self) -> None:
        self._arm_timer()
        self._check_stop_step()
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener()

    # --- host actions --------------------------------------------------------------------

    def _perform_host(self, action: lifecycle.Action) -> None:
        match action:
            case lifecycle.Spawn():
                self._spawn_host()
            case lifecycle.SignalStop():
                if self.process is not None:
                    self.process.signal_tree(int(self.config.host.stop_signal))
            case lifecycle.KillTree():
                killed = host.kill_tree(self.process if self.host.pid else None, self.cgroup)
                if killed:
                    self._emit("host.tree_killed", {"processes": killed})
            case lifecycle.Emit(event=kind, detail=detail):
                self._emit(kind, detail)
                self._forward_host_fact(kind, detail)

    def _spawn_host(self, *, activate_if_prepared: bool = True) -> None:
        if (
            activate_if_prepared
            and self.swap is not None
            and self.swap.state is swaps.SwapState.PREPARED
            and not self.swap.step
        ):
            # A start while a swap is prepared starts the new code: that is an activation.
            self._schedule(self._activate_if_changed(self.swap.id, restart=True))
            return
        spec = host.SpawnSpec(
            argv=self.config.host.command,
            cwd=self.config.host.cwd,
            env=self._child_env(),
            output=self.config.host.output,
        )
        wall = time.time()
        try:
            process = host.HostProcess.spawn(spec, self.cgroup)
        except SwapguardError as exc:
            self.feed_host(
                lifecycle.SpawnFailed(now=clock.boot_clock(), wall=wall, error=exc.message)
            )
            return
        self.counters.spawns += 1
        swap_id = (
            self.swap.id if self.swap and self.swap.state is swaps.SwapState.PROBATION else None
        )
        try:
            self.run_id = self.store.record_spawn(
                process.pid, process.create_time, clock.BOOT_ID, wall, self.code_version, swap_id
            )
        except SwapguardError as exc:
            # A host we could not record would not be adopted after a restart of ours, and a
            # second one would start: better no host than an untracked one.
            host.kill_tree(process, self.cgroup)
            process.close()
            self.feed_host(lifecycle.SpawnFailed(
                now=clock.boot_clock(), wall=wall, error=f"not recorded: {exc.message}"))
            return
        self.process = process
        if self._one_shot_env:
            self._host_env, self._one_shot_env = {}, False
        self._watch_exit(process)
        self.feed_host(lifecycle.Spawned(now=clock.boot_clock(), pid=process.pid))
        self.pool.submit(self._refresh_head_blocking)
        if self.drift and self.swap is None:
            self.pool.submit(self._refresh_baseline_blocking)

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
            env.pop(key, None)
        env.update(self.config.host.env)
        env["NOTIFY_SOCKET"] = str(self.config.state.dir / "notify.sock")
        env["SWAPGUARD_SOCKET"] = str(self.config.control.socket)
        if self.config.host.heartbeat_timeout > 0:
            env["WATCHDOG_USEC"] = str(int(self.config.host.heartbeat_timeout * 1_000_000))
            env["WATCHDOG_PID"] = "0"  # filled by the child: see host.SpawnSpec
        env.update(self._host_env)
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
        if self.run_id is not None:
            self.store.record_exit(self.run_id, wall, status.code, status.signal)
        if self.process is process:
            self.process = None
        self.feed_host(
            lifecycle.Exited(
                now=clock.boot_clock(), wall=wall, code=status.code, signal=status.signal
            )
        )

    def _forward_host_fact(self, kind: str, detail: Mapping[str, Any]) -> None:
        now = clock.now()
        match kind:
            case "host.started":
                self._feed_swap_quietly(swaps.HostSpawned(now=now))
            case "host.ready":
                if self.run_id is not None:
                    self.store.record_ready(self.run_id, time.time())
                self._feed_swap_quietly(swaps.HostReady(now=now))
            case "host.exited":
                if not self._maybe_activate_on_exit():
                    self._feed_swap_quietly(swaps.HostCrashed(now=now))
            case "host.spawn_failed":
                if self.swap is not None and self.swap.step in (
                    swaps.Step.SPAWN_NEW,
                    swaps.Step.SPAWN_OLD,
                ):
                    self._feed_swap_quietly(
                        swaps.StepFailed(
                            now=now, step=self.swap.step, error=str(detail.get("error"))
                        )
                    )
                else:
                    self._feed_swap_quietly(swaps.HostCrashed(now=now))
            case "host.start_timeout":
                self._feed_swap_quietly(swaps.HostNotReady(now=now))
            case "host.heartbeat_lost":
                self._feed_swap_quietly(swaps.HeartbeatLost(now=now))

    def _maybe_activate_on_exit(self) -> bool:
        """A host that exits on its own while a swap is prepared may have applied a change."""
        swap = self.swap
        if swap is None or swap.state is not swaps.SwapState.PREPARED or swap.step is not None:
            return False
        self._schedule(self._activate_if_changed(swap.id, restart=False))
        return True

    # --- swap actions --------------------------------------------------------------------

    def _perform_swap(self, swap: swaps.Swap, action: swaps.Action) -> None:
        match action:
            case swaps.StopHost():
                self.feed_host(lifecycle.StopRequested(now=clock.boot_clock()))
            case swaps.TakeSnapshots():
                self._run_step(swap, lambda: self.work.take_snapshots(swap))
            case swaps.RunBuild():
                self._run_step(swap, lambda: self.work.build(swap.step))
            case swaps.StartHost(env=env):
                self._start_for_swap(swap, env)
            case swaps.RestoreCode():
                self._run_step(swap, lambda: self._restore_code(swap))
            case swaps.RestoreData():
                self._run_step(swap, lambda: self.work.restore_data(swap))
            case swaps.SyncData():
                self._sync_data(swap)
            case swaps.RunHealthCheck():
                self._run_health_check()
            case swaps.CancelJobs():
                jobs.cancel_all()

    def _start_for_swap(self, swap: swaps.Swap, env: Mapping[str, str]) -> None:
        self._host_env = dict(env)
        self._one_shot_env = swap.state is swaps.SwapState.ROLLING_BACK
        if self.process is not None and self.host.state in (
            lifecycle.HostState.STARTING,
            lifecycle.HostState.RUNNING,
        ):
            # Resumed after a supervisor restart with the host already spawned (and adopted).
            self.loop.call_soon(self._feed_swap_quietly, swaps.HostSpawned(now=clock.now()))
            return
        self.feed_host(lifecycle.StartRequested(now=clock.boot_clock()))

    def _set_host_env_for(self, swap: swaps.Swap) -> None:
        if swap.state is swaps.SwapState.PROBATION and swap.deadline is not None:
            self._host_env = {
                "SWAPGUARD_SWAP_ID": swap.id,
                "SWAPGUARD_DEADLINE": clock.rfc3339(swap.deadline.wall) or "",
            }

    def _check_stop_step(self) -> None:
        """A StopHost step is done once the lifecycle says stopped and no process is left."""
        swap = self.swap
        if swap is None or swap.step not in (swaps.Step.STOP_OLD, swaps.Step.STOP_NEW):
            return
        if self.host.state is lifecycle.HostState.STOPPED and self.process is None:
            self.loop.call_soon(self._step_done_if_current, swap.id, swap.step, None)

    def _run_step(self, swap: swaps.Swap, work: Callable[[], Any]) -> None:
        """Run a blocking step in a worker; its result comes back as StepDone or StepFailed."""
        step_now = swap.step
        assert step_now is not None

        def done(future: asyncio.Future[Any]) -> None:
            error = future.exception()
            if error is None:
                self._step_done_if_current(swap.id, step_now, future.result())
                return
            if not isinstance(error, SwapguardError):
                log.error("step %s of swap %s failed", step_now, swap.id, exc_info=error)
            self._step_failed_if_current(swap.id, step_now, str(error))

        self.loop.run_in_executor(self.pool, work).add_done_callback(done)

    def _sync_data(self, swap: swaps.Swap) -> None:
        """In a worker: the new version's copies of the data to disk; DataSynced comes back."""

        def done(future: asyncio.Future[None]) -> None:
            if self.swap is None or self.swap.id != swap.id:
                return
            error = future.exception()
            why = None if error is None else f"the data copies could not be synced: {error}"
            self._feed_swap_quietly(swaps.DataSynced(now=clock.now(), error=why))

        self.loop.run_in_executor(self.pool, self.work.sync_data, swap).add_done_callback(done)

    def _step_done_if_current(self, swap_id: str, step_now: swaps.Step, result: Any) -> None:
        if self.swap is None or self.swap.id != swap_id or self.swap.step is not step_now:
            return
        self.feed_swap(
            swaps.StepDone(
                now=clock.now(),
                step=step_now,
                result=result if isinstance(result, Mapping) else None,
            )
        )

    def _step_failed_if_current(self, swap_id: str, step_now: swaps.Step, error: str) -> None:
        if self.swap is None or self.swap.id != swap_id or self.swap.step is not step_now:
            return
        self.feed_swap(swaps.StepFailed(now=clock.now(), step=step_now, error=error))

    def _restore_code(self, swap: swaps.Swap) -> None:
        checkpoint = self.work.restore_code(swap)
        self.loop.call_soon_threadsafe(self._baseline_taken, checkpoint)

    def _run_health_check(self) -> None:
        def done(future: asyncio.Future[jobs.JobResult]) -> None:
            if future.cancelled():
                return
            if (error := future.exception()) is not None:  # a check that cannot run has failed
                self._feed_swap_quietly(
                    swaps.HealthChecked(now=clock.now(), ok=False, detail=str(error)[:200]))
                return
            result = future.result()
            detail = "ok" if result.ok else (result.output.strip().splitlines() or ["failed"])[-1]
            self._feed_swap_quietly(
                swaps.HealthChecked(now=clock.now(), ok=result.ok, detail=detail[:200])
            )

        self.loop.run_in_executor(self.pool, self.work.health_check).add_done_callback(done)

    def _finish_swap(self, swap: swaps.Swap) -> None:
        if swap.state is swaps.SwapState.CONFIRMED:
            # Until the confirmed tree is the baseline, a drift check would compare against the
            # version before the swap and "guard" the one just confirmed.
            self._baseline_pending = True
            self.pool.submit(self._refresh_baseline_blocking, swap.id)
        else:  # aborted or rolled back: the tree is the restored checkpoint again
            self.drift = False
        self.swap = None
        self._host_env = self._host_env if self._one_shot_env else {}
        keep = self.config.state.keep_swaps
        self.pool.submit(self.work.prune, keep)

    # --- swap commands (from the API) -----------------------------------------------------

    async def prepare(
        self, summary: str, *, auto: bool = False, checkpoint: Checkpoint | None = None
    ) -> swaps.Swap:
        if self.swap is not None:
            raise Conflict(f"swap {self.swap.id} is in flight ({self.swap.state})")
        swap_id = clock.new_id()
        if checkpoint is None:
            checkpoint = await self.loop.run_in_executor(
                self.pool, self.work.take_checkpoint, swap_id)
        if self.swap is not None:  # another prepare won while we were checkpointing
            raise Conflict(f"swap {self.swap.id} is in flight ({self.swap.state})")
        swap, actions = swaps.new_swap(
            id=swap_id, summary=summary, now=clock.now(), checkpoint=checkpoint.to_json(), auto=auto
        )
        self._commit_swap(swap, actions)
        return swap

    def _verify_snapshots(self, swap: swaps.Swap) -> None:
        """In a worker: integrity_check of the snapshots, reported as an event."""
        if (event := self.work.verify_snapshots(swap)) is not None:
            self.loop.call_soon_threadsafe(self._emit, event[0], event[1], swap.id)

    async def _activate_if_changed(self, swap_id: str, *, restart: bool) -> None:
        """Activation by exit or by a start: only when the tree differs from the checkpoint."""
        swap = self.swap
        if swap is None or swap.id != swap_id or swap.state is not swaps.SwapState.PREPARED:
            return
        checkpoint = Checkpoint.from_json(dict(swap.checkpoint))
        changed = await self.loop.run_in_executor(self.pool, self.code.differs, checkpoint)
        if self.swap is not swap:
            return
        if changed:
            self.feed_swap(swaps.ActivateRequested(now=clock.now()))
            return
        # Unchanged code: an ordinary start (after an exit the lifecycle already decided).
        if restart:
            self._spawn_host(activate_if_prepared=False)

    async def command_swap(
        self, swap_id: str, action: str, body: Mapping[str, Any]
    ) -> swaps.Swap:
        if action == "confirm":
            await self._data_on_disk(swap_id)
        swap = self._swap_for(swap_id)
        now = clock.now()
        event: swaps.Event
        match action:
            case "activate":
                event = swaps.ActivateRequested(now=now)
            case "confirm":
                event = swaps.ConfirmRequested(now=now)
            case "extend":
                event = swaps.ExtendRequested(now=now)
            case "rollback":
                event = swaps.RollbackRequested(
                    now=now, reason=str(body.get("reason") or "requested")
                )
            case "abort":
                event = swaps.AbortRequested(now=now)
            case _:
                raise NotFound(f"unknown swap action {action!r}")
        if swap is not self.swap:
            raise Conflict(f"swap {swap_id} is {swap.state}; nothing to {action}")
        self.feed_swap(event)
        return self.swap or swaps.Swap.from_json(self.store.load_swap(swap_id) or {})

    def _swap_for(self, swap_id: str) -> swaps.Swap:
        if self.swap is not None and self.swap.id == swap_id:
            return self.swap
        record = self.store.load_swap(swap_id)
        if record is None:
            raise NotFound(f"no swap {swap_id!r}")
        return swaps.Swap.from_json(record)

    # --- notify datagrams and heartbeats ---------------------------------------------------

    def _on_datagrams(self) -> None:
        for datagram in self.notify_server.drain():
            self._tick_if_due()  # a flood must not hold the deadman clock back by a whole batch
            self.counters.datagrams += 1
            if datagram.pid is not None and not host.is_in_tree(
                datagram.pid, self.process, self.cgroup
            ):
                self.counters.datagrams_dropped += 1
                continue
            try:
                message = notify.parse_datagram(datagram.payload)
            except notify.NotifyError:
                self.counters.datagrams_invalid += 1
                continue
            self._on_notify(message)

    def _on_notify(self, message: notify.NotifyMessage) -> None:
        boot = clock.boot_clock()
        if message.ready:
            self.feed_host(lifecycle.Ready(now=boot))
        if message.watchdog_trigger:
            self.feed_host(lifecycle.WatchdogTriggered(now=boot))
        if message.watchdog or message.status is not None:
            if message.watchdog:
                self.counters.heartbeats += 1
            self.heartbeat(message.status, boot)
        if message.extend_timeout_usec is not None:
            self._swap_command_quietly(swaps.ExtendRequested(now=clock.now()))
        if (
            message.confirm_swap_id is not None
            and self.swap is not None
            and self.swap.id == message.confirm_swap_id
            and not self._confirm_waiting
        ):
            self._confirm_waiting = True
            self._schedule(self._confirm_by_datagram(self.swap.id))

    async def _confirm_by_datagram(self, swap_id: str) -> None:
        try:
            await self._data_on_disk(swap_id)
        finally:
            self._confirm_waiting = False
        if self.swap is not None and self.swap.id == swap_id:
            self._swap_command_quietly(swaps.ConfirmRequested(now=clock.now()))

    def _swap_command_quietly(self, event: swaps.Event) -> None:
        try:
            self.feed_swap(event)
        except Conflict as exc:
            if exc.message != self._last_refusal:
                log.warning("notify: %s", exc.message)
                self._last_refusal = exc.message

    def heartbeat(self, status: str | None, boot: float | None = None) -> None:
        event = lifecycle.Heartbeat(
            now=boot if boot is not None else clock.boot_clock(), status=status
        )
        if self.host.state is lifecycle.HostState.STARTING and self.host.ready_unseen:
            self.feed_host(event)  # an adopted host's first heartbeat makes it ready
            return
        before = self._timer_at
        self.host, _ = lifecycle.step(self.host, event, self.host_policy)
        # A heartbeat only pushes the next wake-up later; the armed timer stays valid.
        if before is None:
            self._arm_timer()

    # --- timers ----------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        wake = lifecycle.next_wakeup(self.host, self.host_policy)
        if self.swap is not None:
            swap_wake = swaps.next_wakeup(self.swap, self.swap_policy)
            if swap_wake is not None:
                # This boot's instants are boot-clock times already: stable, so an unchanged
                # wake-up leaves the armed timer alone. Across a reboot the wall clock converts.
                if swap_wake.boot_id == clock.BOOT_ID:
                    at = swap_wake.boot
                else:
                    at = clock.boot_clock() + swap_wake.seconds_until(clock.now())
                wake = at if wake is None else min(wake, at)
        if wake == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = wake
        if wake is None:
            self._timer = None
            return
        delay = max(0.0, wake - clock.boot_clock())
        self._timer = self.loop.call_later(delay, self._tick)

    def _tick_if_due(self) -> None:
        """Tick now if the armed timer is due, rather than after the input in hand."""
        if self._timer_at is not None and clock.boot_clock() >= self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._tick()

    def _tick(self) -> None:
        self._timer, self._timer_at = None, None
        if self.swap is not None:
            self._feed_swap_quietly_any(swaps.Tick(now=clock.now()))
        self.feed_host(lifecycle.Tick(now=clock.boot_clock()))

    def _feed_swap_quietly_any(self, event: swaps.Event) -> None:
        with contextlib.suppress(Conflict):
            self.feed_swap(event)

    # --- drift, baseline, events -------------------------------------------------------------

    def on_tree_changed(self) -> None:
        """From the watcher (via call_soon_threadsafe): compare the tree with the running code."""
        if self.swap is not None or self.config.code.undeclared_changes == "ignore":
            return
        if self._baseline_pending:
            self._recheck_drift = True
            return
        baseline = self.store.get_value(BASELINE_KEY)
        if not isinstance(baseline, dict):
            return
        checkpoint = Checkpoint.from_json(baseline)
        future = self.loop.run_in_executor(self.pool, self.code.differs, checkpoint)
        future.add_done_callback(
            lambda f: f.exception() is None and f.result() and self._on_drift(checkpoint)
        )

    def _on_drift(self, baseline: Checkpoint) -> None:
        if self.swap is not None or self.drift or self._baseline_pending:
            return
        if baseline.commit != self.code_version:  # compared against a baseline since replaced
            self.on_tree_changed()
            return
        self.drift = True
        self._emit("code.drift", {"root": str(self.config.code.root)})
        if self.config.code.undeclared_changes == "guard":
            self._schedule(
                self.prepare("undeclared change (guard)", auto=True, checkpoint=baseline)
            )

    def _refresh_baseline_blocking(self, confirmed: str | None = None) -> None:
        """`confirmed`: the id of the confirmed swap whose code this baseline is taken from."""
        try:
            self.code.check()
            checkpoint = self.code.take("baseline")
        except SwapguardError as exc:
            log.warning("no code baseline: %s", exc.message)
            self.loop.call_soon_threadsafe(self._baseline_settled)
            return
        self.store.set_value(BASELINE_KEY, checkpoint.to_json())
        if confirmed is not None:
            self.store.set_value(BASELINE_CONFIRMED_KEY, confirmed)
        self.loop.call_soon_threadsafe(self._baseline_taken, checkpoint)

    def _refresh_head_blocking(self) -> None:
        """status shows the HEAD the host was started on; git is asked off the loop."""
        try:
            head = self.code.head()
        except SwapguardError:
            return
        self.loop.call_soon_threadsafe(setattr, self, "head", head)

    def _baseline_taken(self, checkpoint: Checkpoint) -> None:
        self.head = checkpoint.head
        self.code_version = checkpoint.commit
        if self.swap is None:
            self.drift = False
        self._baseline_settled()

    def _baseline_settled(self) -> None:
        self._baseline_pending = False
        if self._recheck_drift:
            self._recheck_drift = False
            self.on_tree_changed()

    def _emit(self, kind: str, detail: Mapping[str, Any], swap_id: str | None = None) -> None:
        record = self.store.append_event(kind, dict(detail), swap_id=swap_id)
        self.hooks.submit(record.to_json())

    def _schedule(self, coro: Coroutine[Any, Any, Any] | Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_log_task_error)


def _log_task_error(task: asyncio.Future[Any]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is not None and not isinstance(error, SwapguardError):
        log.error("background task failed", exc_info=error)
    elif error is not None:
        log.warning("%s", error)

