"""The imperative shell: the one event loop that owns the host, the swap and their clocks.

Every input becomes an event for one of the two pure machines (`lifecycle` for the host process,
`swaps` for the deadman clock); their actions are performed here. Blocking work (git, snapshots,
builds, health checks) runs in worker threads and comes back as events through
`loop.call_soon_threadsafe`. A tree kill runs on the loop: it is a cgroup read when nothing is left
(the common case) and bounded otherwise. The control socket reaches this state only through
`daemon.LoopBackend._call`, which runs each request on the loop.

Parts of the shell live in modules of their own, each owned by the `Runtime`, each on the loop
thread, each reaching it only through what it was given:
- `hostrun.HostRunner`: the host's process, spawned or adopted, its run recorded, its exit watched;
- `notifyinput.NotifyInput`: the host's notify datagrams, turned into calls on the runtime;
- `wakeup.WakeTimer`: the one timer armed for the earlier wake-up of the two machines;
- `drift.DriftGuard`: the code baseline, and changes to the tree that no swap declared.

Order matters in two places:
- a swap record is saved before any of its actions runs, so a crash between two steps resumes at the
  step that was in progress (every step is repeatable);
- a host spawn is recorded (pid, start time) right after the fork, so a restarted supervisor adopts
  the process instead of starting a second one (`hostrun`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from supervisor import clock, notify
from supervisor.code.checkpoint import Checkpoint, CodeTree
from supervisor.config.schema import Config
from supervisor.control.notifysocket import NotifyServer
from supervisor.core import lifecycle, swaps
from supervisor.core.policies import host_policy, swap_policy
from supervisor.core.wakeup import next_wakeup
from supervisor.daemon.counters import Counters
from supervisor.daemon.drift import DriftGuard
from supervisor.daemon.hooks import HookRunner
from supervisor.daemon.hostrun import HostRunner
from supervisor.daemon.notifyinput import NotifyInput
from supervisor.daemon.swapwork import SwapWork
from supervisor.daemon.timer import WakeTimer
from supervisor.data.snapshot import SnapshotStore
from supervisor.errors import Conflict, NotFound, SwapguardError
from supervisor.process import host, jobs
from supervisor.state.store import Store

log = logging.getLogger(__name__)

CRASH_AT = os.environ.get("SWAPGUARD_CRASH_AT")
"""Fault injection for the test suite: `<state>/<step>` makes the process die (exit 86) right
after that swap record is persisted and before its actions run, as a kill -9 would."""


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
        self.machines: tuple[lifecycle.Host, swaps.Swap | None] = (lifecycle.Host(), None)
        self.counters = Counters()
        self.host_runner = HostRunner(
            config,
            store,
            cgroup,
            self.counters,
            on_exit=self.feed_host,
            emit=self._emit,
            schedule=self._schedule,
        )
        self.started_at = time.time()
        self.code = CodeTree(
            config.code.root, extra_paths=config.code.extra_paths, exclude=config.non_code_paths()
        )
        self.snapshots = SnapshotStore(config.state.dir / "snapshots")
        self.work = SwapWork(config, store, self.code, self.snapshots)
        self.hooks = HookRunner(config.hooks, cwd=config.code.root)
        self.notify_server = NotifyServer(config.state.dir / "notify.sock")
        self.drift_guard = DriftGuard(
            config.code,
            store,
            self.code,
            self.pool,
            swap_in_flight=lambda: self.swap is not None,
            emit=self._emit,
            prepare_swap=self._prepare_in_background,
        )
        self.timer = WakeTimer(self._tick)
        self.notify_input = NotifyInput(
            self.notify_server,
            self.counters,
            self,
            before_each=self.timer.wake_if_due,
            schedule=self._schedule,
        )
        self._host_env: dict[str, str] = {}
        self._one_shot_env = False
        self._listeners: list[Callable[[], None]] = []

    # --- start and shutdown --------------------------------------------------------------

    # The two machines' states are frozen values the loop replaces whole, and they are kept as
    # one pair: GET /v1/status reads `machines` on its own thread, and gets a host and a swap
    # from the same moment without waiting behind the loop (a wait of ~0.1 ms under heartbeats).

    @property
    def host(self) -> lifecycle.Host:
        return self.machines[0]

    @host.setter
    def host(self, value: lifecycle.Host) -> None:
        self.machines = (value, self.machines[1])

    @property
    def swap(self) -> swaps.Swap | None:
        return self.machines[1]

    @swap.setter
    def swap(self, value: swaps.Swap | None) -> None:
        self.machines = (self.machines[0], value)

    async def start(self) -> None:
        """Adopt a live host or start one; resume a swap that was in flight."""
        self.loop.add_reader(self.notify_server.fileno(), self.notify_input.on_readable)
        self.loop.add_signal_handler(signal.SIGCHLD, host.reap_orphans)
        active = self.store.active_swap()
        self.swap = swaps.Swap.from_json(active) if active else None
        adopted = self.host_runner.adopt()
        if adopted is not None:
            self.feed_host(adopted)
        await self.drift_guard.take_at_start(adopted=adopted is not None)
        if self.swap is not None:
            self._set_host_env_for(self.swap)
            swap, actions = swaps.resume(self.swap, self.swap_policy, clock.now())
            log.info("resuming swap %s in state %s step %s", swap.id, swap.state, swap.step)
            self._commit_swap(swap, actions)
        swap_drives_host = self.swap is not None and (
            self.swap.step is not None or self.swap.state is swaps.SwapState.FAILED
        )
        if adopted is None and not swap_drives_host:
            self.feed_host(lifecycle.StartRequested(now=clock.boot_clock()))
        self.timer.wake_now()

    async def shutdown(self) -> None:
        """SIGTERM/SIGINT: stop the host gracefully, then let the loop end."""
        log.info("swapguard stopping: stopping the host first")
        self.feed_host(lifecycle.StopRequested(now=clock.boot_clock()))
        deadline = self.config.host.stop_timeout + 10.0
        try:
            await asyncio.wait_for(self._host_stopped(), timeout=deadline)
        except TimeoutError:
            log.error("the host did not stop within %.0fs; killing its tree", deadline)
            host.kill_tree(self.host_runner.process, self.cgroup)
        jobs.cancel_all()
        self.hooks.close()
        self.notify_server.close()
        self.pool.shutdown(wait=True, cancel_futures=True)

    @property
    def process(self) -> host.HostProcess | None:
        """The host's live process, None while none runs (the control socket checks peers)."""
        return self.host_runner.process

    async def _host_stopped(self) -> None:
        while self.host.state is not lifecycle.HostState.STOPPED or self.process is not None:
            await self._next_change()

    async def _next_change(self) -> None:
        """Returns after the next change of the host or the swap."""
        waiter = self.loop.create_future()
        self._listeners.append(lambda: waiter.done() or waiter.set_result(None))
        await waiter

    async def data_on_disk(self, swap_id: str) -> None:
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
                swap.id, swap.state.value, swap.created_at.wall, swap.to_json(), emits
            )
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
        self.timer.arm(
            next_wakeup(self.host, self.host_policy, self.swap, self.swap_policy, clock.now())
        )
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
        swap_id = (
            self.swap.id if self.swap and self.swap.state is swaps.SwapState.PROBATION else None
        )
        event = self.host_runner.spawn(
            self._host_env, code_version=self.drift_guard.code_version, swap_id=swap_id
        )
        if isinstance(event, lifecycle.SpawnFailed):
            self.feed_host(event)
            return
        if self._one_shot_env:
            self._host_env, self._one_shot_env = {}, False
        self.feed_host(event)
        self.drift_guard.on_host_spawned()

    def _forward_host_fact(self, kind: str, detail: Mapping[str, Any]) -> None:
        now = clock.now()
        match kind:
            case "host.started":
                self._feed_swap_quietly(swaps.HostSpawned(now=now))
            case "host.ready":
                self.host_runner.record_ready()
                self._feed_swap_quietly(swaps.HostReady(now=now))
            case "host.exited":
                if not self._maybe_activate_on_exit():
                    self._feed_swap_quietly(swaps.HostCrashed(now=now))
            case "host.spawn_failed":
                step = self.swap.step if self.swap is not None else None
                if step in (swaps.Step.SPAWN_NEW, swaps.Step.SPAWN_OLD):
                    error = str(detail.get("error"))
                    self._feed_swap_quietly(swaps.StepFailed(now=now, step=step, error=error))
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

        def wanted() -> bool:  # on the worker: reads the pair the loop replaces whole
            now = self.swap
            return now is not None and now.id == swap.id and now.state is swaps.SwapState.PROBATION

        sync = functools.partial(self.work.sync_data, swap, wanted)
        self.loop.run_in_executor(self.pool, sync).add_done_callback(done)

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
        self.loop.call_soon_threadsafe(self.drift_guard.baseline_taken, checkpoint)

    def _run_health_check(self) -> None:
        def done(future: asyncio.Future[jobs.JobResult]) -> None:
            if future.cancelled():
                return
            if (error := future.exception()) is not None:  # a check that cannot run has failed
                self._feed_swap_quietly(
                    swaps.HealthChecked(now=clock.now(), ok=False, detail=str(error)[:200])
                )
                return
            result = future.result()
            detail = "ok" if result.ok else (result.output.strip().splitlines() or ["failed"])[-1]
            self._feed_swap_quietly(
                swaps.HealthChecked(now=clock.now(), ok=result.ok, detail=detail[:200])
            )

        self.loop.run_in_executor(self.pool, self.work.health_check).add_done_callback(done)

    def _finish_swap(self, swap: swaps.Swap) -> None:
        self.drift_guard.on_swap_finished(swap)
        self.swap = None
        self._host_env = self._host_env if self._one_shot_env else {}
        keep = self.config.state.keep_swaps
        self.pool.submit(self.work.settle, swap, keep)

    # --- swap commands (from the API) -----------------------------------------------------

    async def prepare(
        self, summary: str, *, auto: bool = False, checkpoint: Checkpoint | None = None
    ) -> swaps.Swap:
        if self.swap is not None:
            raise Conflict(f"swap {self.swap.id} is in flight ({self.swap.state})")
        swap_id = clock.new_id()
        if checkpoint is None:
            checkpoint = await self.loop.run_in_executor(
                self.pool, self.work.take_checkpoint, swap_id
            )
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

    async def command_swap(self, swap_id: str, action: str, body: Mapping[str, Any]) -> swaps.Swap:
        if action == "confirm":
            await self.data_on_disk(swap_id)
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

    # --- heartbeats (from notify datagrams and the control socket) -------------------------

    def heartbeat(self, status: str | None, boot: float | None = None) -> None:
        event = lifecycle.Heartbeat(
            now=boot if boot is not None else clock.boot_clock(), status=status
        )
        if self.host.state is lifecycle.HostState.STARTING and self.host.ready_unseen:
            self.feed_host(event)  # an adopted host's first heartbeat makes it ready
            return
        before = self.timer.at
        self.host, _ = lifecycle.step(self.host, event, self.host_policy)
        # A heartbeat only pushes the next wake-up later; the armed timer stays valid.
        if before is None:
            self.timer.arm(
            next_wakeup(self.host, self.host_policy, self.swap, self.swap_policy, clock.now())
        )

    # --- the timer, events, background tasks ------------------------------------------------

    def _tick(self) -> None:
        """The timer fired: both machines see the time (the swap's deadlines first)."""
        if self.swap is not None:
            with contextlib.suppress(Conflict):
                self.feed_swap(swaps.Tick(now=clock.now()))
        self.feed_host(lifecycle.Tick(now=clock.boot_clock()))

    def _emit(self, kind: str, detail: Mapping[str, Any], swap_id: str | None = None) -> None:
        record = self.store.append_event(kind, dict(detail), swap_id=swap_id)
        self.hooks.submit(record.to_json())

    def _schedule(self, coro: Coroutine[Any, Any, Any] | Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_log_task_error)

    def _prepare_in_background(self, summary: str, checkpoint: Checkpoint) -> None:
        """The drift guard's automatic swap, prepared from the baseline it was given."""
        self._schedule(self.prepare(summary, auto=True, checkpoint=checkpoint))


def _log_task_error(task: asyncio.Future[Any]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is not None and not isinstance(error, SwapguardError):
        log.error("background task failed", exc_info=error)
    elif error is not None:
        log.warning("%s", error)
