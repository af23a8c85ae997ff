"""The imperative shell: the one event loop that performs what the pure machine decides.

Every input (a datagram, a child's exit, a timer, an HTTP command, a worker's result) becomes an
event for `core.supervision.step`, which decides for the host and the swap together and returns
orders; this module only turns inputs into events, calls `step`, performs the orders, and feeds
their outcomes back as events. Blocking work (git, snapshots, builds, health checks) runs in
worker threads and comes back through `loop.call_soon_threadsafe`. Two pools: the general one
(checks, hashes, settles, health checks, activation steps) and a reserved one for what a rollback
cannot wait for: its steps and the waits of tree kills, which never queue behind the general
pool's work, however stuck that is. A tree kill sends its signals on the loop (a cgroup read when
nothing is left, the common case; `cgroup.kill` otherwise) and waits for the exits on a reserved
worker; `TreeGone` comes back. The control socket reaches this state only through
`daemon.LoopBackend._call`, which runs each request on the loop.

Parts of the shell live in modules of their own, each owned by the `Runtime`, each on the loop
thread, each reaching it only through what it was given:
- `hostrun.HostRunner`: the host's process, spawned or adopted, its run recorded, its exit watched,
  its tree killed;
- `notifyinput.NotifyInput`: the host's notify datagrams, turned into calls on the runtime;
- `timer.WakeTimer`: the one timer armed for the machine's next wake-up;
- `drift.DriftGuard`: the code baseline, and changes to the tree that no swap declared.

Order matters in three places:
- events are fed one at a time: what an order reports back while others are performed waits in a
  queue, so every `step` sees the record its predecessor left;
- a swap record is saved (`PersistSwap`) before the orders that follow it, so a crash between two
  steps resumes at the step that was in progress (every step is repeatable);
- a host spawn is recorded (pid, start time) right after the fork, so a restarted supervisor adopts
  the process instead of starting a second one (`hostrun`).

What lies between a host's exit and the next spawn is kept to what decides it (the step) and what
must precede it (the tree's kill): the exit is recorded with the next spawn (`hostrun`), and the
audit entries of a turn are written together once its orders are performed, or before a swap
record is saved (`_emit`), so the log keeps its order; the code baseline at start is taken once the
host is spawned (`drift`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from supervisor import clock
from supervisor.code.checkpoint import Checkpoint, CodeTree
from supervisor.config.schema import Config
from supervisor.control.notifysocket import NotifyServer
from supervisor.control.routes import ABORT_WAIT_S
from supervisor.core import lifecycle, swaps
from supervisor.core import supervision as sv
from supervisor.core.policies import supervision_policy
from supervisor.daemon import faults
from supervisor.daemon.counters import Counters
from supervisor.daemon.drift import DriftGuard
from supervisor.daemon.hooks import HookRunner
from supervisor.daemon.hostrun import KILL_WAIT_S, HostRunner
from supervisor.daemon.manager import ServiceManager
from supervisor.daemon.notifyinput import NotifyInput
from supervisor.daemon.swapwork import OUTPUT_DIR, SwapWork, failure_detail
from supervisor.daemon.timer import WakeTimer
from supervisor.data.snapshot import SnapshotStore
from supervisor.errors import Conflict, NotFound, SwapguardError
from supervisor.process import host, jobs
from supervisor.process.host import HostProcess
from supervisor.state.store import EventRecord, Store, StoreError

log = logging.getLogger(__name__)

SAVE_RETRY_S = 1.0
"""A swap record the store refused (a full state disk) is saved again this often."""

RESERVED_WORKERS = 3
"""The reserved pool: a rollback step, a tree kill's wait, and one spare for a step stuck on a
hung file system (its retry must not queue behind it)."""


class Runtime:
    """Owns the supervisor's state. Construct on the loop thread; call `start()` once."""

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        cgroup: host.CgroupLeaf | None,
        manager: ServiceManager | None = None,
    ) -> None:
        self.config = config
        self.manager = manager or ServiceManager({})
        self.store = faults.guard_store(store)
        self.cgroup = cgroup
        self.loop = asyncio.get_running_loop()
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="swapguard-io")
        self.reserved = ThreadPoolExecutor(
            max_workers=RESERVED_WORKERS, thread_name_prefix="swapguard-rollback"
        )
        self.policy = supervision_policy(config)
        self.state = sv.Supervision()
        self.published = self.state
        self.counters = Counters()
        self.host_runner = HostRunner(
            config,
            store,
            cgroup,
            self.counters,
            on_exit=self.feed_host,
            on_tree_gone=lambda killed: self.feed(sv.TreeGone(now=clock.now(), killed=killed)),
            emit=self._emit,
            schedule=self._schedule,
            workers=self.reserved,
        )
        self.started_at = time.time()
        self.code = CodeTree(
            config.code.root,
            extra_paths=config.code.extra_paths,
            exclude=config.non_code_paths(),
            ignore=config.non_code_patterns(),
        )
        # Readers of the audit log (the events API, hooks) see no event past this id: the state
        # an event tells of is published first (see `_publish`).
        self.published_event_id = store.newest_event_id()
        self._written_event_id = self.published_event_id
        self._unannounced: list[EventRecord] = []  # records written, for the hooks once published
        self._unread_by_hooks = False  # a worker wrote entries since the last publish
        self.snapshots = SnapshotStore(config.state.dir / "snapshots")
        self.work = SwapWork(config, store, self.code, self.snapshots)
        self.hooks = HookRunner(
            config.hooks,
            store=store,
            cwd=config.code.root,
            output_dir=config.state.dir / OUTPUT_DIR,
            published=lambda: self.published_event_id,
        )
        self.notify_server = NotifyServer(
            config.notify_socket(),
            self.manager.handed_back.pop("notify", None),
            staging_dir=None if config.host_socket_dir() is None else config.state.dir,
        )
        self.manager.store_socket(
            "notify", self.notify_server.bound_socket, taken_back=self.notify_server.inherited
        )
        self.drift_guard = DriftGuard(
            config.code,
            store,
            self.code,
            self.pool,
            swap_in_flight=lambda: self.swap is not None,
            emit=self._emit,
            prepare_swap=self._prepare_in_background,
            record_code_version=lambda commit: self.host_runner.record_code_version(commit),
        )
        self.timer = WakeTimer(self._tick)
        self.notify_input = NotifyInput(self.notify_server, self.counters, self, timer=self.timer)
        self._queue: deque[sv.Event] = deque()
        self._feeding = False
        self._unwritten: list[tuple[str, dict[str, Any], str | None, float]] = []  # see _emit
        self._event_name = "-"
        self._confirm_waiters: dict[str, list[asyncio.Future[str | None]]] = {}
        self._listeners: list[Callable[[], None]] = []
        self._unsaved: tuple[swaps.Swap, list[tuple[str, dict[str, Any]]]] | None = None
        self._save_retry: asyncio.TimerHandle | None = None

    # --- start and shutdown --------------------------------------------------------------

    # `state` is the loop's working record; `published` is the record as it stands between two
    # events, replaced whole once every order an event caused is performed. GET /v1/status reads
    # `published` on its own thread: a host, a swap and the liveness check from the same moment,
    # never a half-done spawn (state `starting` without a pid), and no wait behind the loop.

    @property
    def host(self) -> lifecycle.Host:
        return self.state.host

    @property
    def swap(self) -> swaps.Swap | None:
        return self.state.swap

    async def start(self) -> None:
        """Adopt a live host or start one; resume a swap that was in flight."""
        self.loop.add_reader(self.notify_server.fileno(), self.notify_input.on_readable)
        self.loop.add_signal_handler(signal.SIGCHLD, host.reap_orphans)
        active = self.store.active_swap()
        self.state = self.published = sv.loaded(swaps.Swap.from_json(active) if active else None)
        if self.swap is not None:
            log.info("resuming swap %s in state %s step %s", *_where(self.swap))
        # what a swapguard that died left in the repo: a lock of ours there would stop the next
        # git command (a prune, a checkpoint) until some later operation cleared it. Not waited
        # for (a hung file system must not hold the adoption); each git step clears first anyway.
        clearing = self.loop.run_in_executor(self.pool, self.code.clear_stale_locks)
        clearing.add_done_callback(self._stale_locks_cleared)
        adopted = self.host_runner.adopt()
        recalled = self.host_runner.recall_last_exit()
        if adopted is not None:
            self.feed_host(adopted)
        # The host is spawned before the code baseline is taken (in a worker): a prepare and a
        # drift check wait for it, the host's start does not.
        self.drift_guard.plan_at_start(
            adopted=adopted is not None, run_code_version=self.host_runner.code_version
        )
        self.feed(sv.Resumed(now=clock.now(), adopted=adopted is not None, recalled=recalled))
        self.drift_guard.take_at_start()
        self.timer.wake_now()
        self.pool.submit(self.work.measure_disk)  # status and /metrics show the disk at once

    def _stale_locks_cleared(self, done: asyncio.Future[list[str]]) -> None:
        """The start's look at the repo's locks: what it removed, and what is not ours."""
        if done.cancelled() or done.exception() is not None:
            return
        if cleared := done.result():
            self._emit("code.stale_locks_cleared", {"locks": cleared})
        if foreign := self.code.foreign_locks():
            self._emit("code.foreign_locks", {"locks": foreign})

    async def shutdown(self) -> None:
        """SIGTERM/SIGINT: stop the host gracefully, then let the loop end."""
        log.info("swapguard stopping: stopping the host first")
        self.feed_host(lifecycle.StopRequested(now=clock.boot_clock()))
        deadline = self.config.host.stop_timeout + KILL_WAIT_S + 1.0  # the machine kills first
        try:
            await asyncio.wait_for(self._host_stopped(), timeout=deadline)
        except TimeoutError:
            log.error("the host did not stop within %.0fs; killing its tree", deadline)
            host.kill_tree(self.host_runner.process, self.cgroup, timeout=1.0)
        jobs.cancel_all()
        self.hooks.close()
        self.manager.forget_socket("notify")
        self.notify_server.close()
        # Queued work is dropped; a worker still inside a call (a hung file system, say) is
        # not waited for: the process ends without it (see cli `run` and service `_serve`).
        for pool in (self.pool, self.reserved):
            pool.shutdown(wait=False, cancel_futures=True)

    @property
    def process(self) -> HostProcess | None:
        """The host's live process, None while none runs (the control socket checks peers)."""
        return self.host_runner.process

    async def _host_stopped(self) -> None:
        while (
            self.host.state is not lifecycle.HostState.STOPPED
            or self.process is not None
            or self.state.kills
        ):
            await self._next_change()

    async def _next_change(self) -> None:
        """Returns after the next change of the host or the swap."""
        waiter = self.loop.create_future()

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        self._listeners.append(wake)
        await waiter

    # --- the machine -----------------------------------------------------------------------

    def feed(self, event: sv.Event) -> None:
        """Step the machine and perform its orders; what they report back is fed in turn.

        Raises what `step` raises for the event given (a refused request changes nothing); an
        event reported back while orders are performed waits for them in the queue."""
        if self._feeding:
            self._queue.append(event)
            return
        self._feeding = True
        try:
            self._apply(event)
        finally:
            try:
                while self._queue:
                    queued = self._queue.popleft()
                    try:
                        self._apply(queued)
                    except Exception:
                        log.exception("performing %s failed", type(queued).__name__)
            finally:
                self.host_runner.record_pending_exit()
                self._write_events()
                self._feeding = False
                self._publish()
                self._after_change()

    def feed_host(self, event: lifecycle.Event) -> None:
        self.feed(sv.HostInput(now=clock.now(), event=event))

    def request_host(
        self,
        event: lifecycle.StartRequested | lifecycle.StopRequested | lifecycle.RestartRequested,
    ) -> None:
        """An operator's host request; raises Conflict while a swap step drives the host."""
        self.feed(sv.HostRequested(now=clock.now(), event=event))

    def feed_swap(self, event: swaps.Event) -> None:
        """A request for the swap in flight; raises Conflict when it is not allowed now."""
        if not isinstance(event, swaps.Request):
            raise TypeError(f"{type(event).__name__} is not a request")
        self.feed(event)

    def _apply(self, event: sv.Event) -> None:
        """Step, then perform every order, each whatever the one before raised (a stop must not
        be lost to a failed write); the first error is raised after all were tried."""
        before = self.state.host.state
        self.state, actions = sv.step(self.state, event, self.policy)
        wrapped = sv.HostInput | sv.HostRequested | sv.WorkReported
        inner = event.event if isinstance(event, wrapped) else event
        self._event_name = type(inner).__name__  # for the swap's transition, logged on saving
        if self.state.host.state is not before:
            log.info("host %s --%s--> %s", before, self._event_name, self.state.host.state)
            self.manager.notify(f"STATUS=host {self.state.host.state}")
        first_error: Exception | None = None
        for action in actions:
            try:
                self._perform(action)
            except Exception as exc:
                if first_error is not None:
                    log.exception("performing %s failed", type(action).__name__)
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def _after_change(self) -> None:
        self.timer.arm(sv.next_wakeup(self.state, self.policy, clock.now()))
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener()

    # --- orders ------------------------------------------------------------------------------

    def _perform(self, action: sv.Action) -> None:
        match action:
            case sv.Spawn(env=env, swap_id=swap_id):
                self._spawn(env, swap_id)
            case sv.SignalStop():
                if self.process is not None:
                    self.process.signal_tree(int(self.config.host.stop_signal))
            case sv.KillTree(process_too=process_too):
                self.host_runner.kill_tree(process_too=process_too)
            case sv.Emit(event=kind, detail=detail):
                self._emit(kind, detail)
            case sv.RecordReady():
                self.host_runner.record_ready()
            case sv.RecordExitReason(reason=reason):
                self.counters.exits[reason] = self.counters.exits.get(reason, 0) + 1
                self.host_runner.record_exit_reason(reason)
            case sv.CheckCodeChanged(swap_id=swap_id, checkpoint=checkpoint):
                self._check_code(swap_id, checkpoint)
            case sv.PersistSwap(swap=swap, events=events):
                self._persist(swap, events)
            case sv.SaveChanges(swap=swap):
                self.pool.submit(self.work.save_changes, swap)
            case sv.VerifySnapshots(swap=swap):
                self.pool.submit(self._verify_snapshots, swap)
            case sv.TakeSnapshots(swap=swap):
                self._run_step(swap, functools.partial(self.work.take_snapshots, swap))
            case sv.RunBuild(swap=swap):
                self._run_step(swap, functools.partial(self.work.build, swap.step, jobs.epoch()))
            case sv.RestoreCode(swap=swap):
                self._run_step(swap, functools.partial(self._restore_code, swap))
            case sv.RestoreData(swap=swap):
                self._run_step(swap, functools.partial(self.work.restore_data, swap))
            case sv.SyncData(swap=swap):
                self._sync_data(swap)
            case sv.RunHealthCheck(swap_id=swap_id, check=check):
                self._run_health_check(swap_id, check)
            case sv.CancelJobs():
                jobs.cancel_all()
            case sv.SwapFinished(swap=swap):
                self._finish_swap(swap)
            case sv.AnswerConfirm(swap_id=swap_id, error=error):
                self._answer_confirm(swap_id, error)

    def _spawn(self, env: Mapping[str, str], swap_id: str | None) -> None:
        guard = self.drift_guard
        version = None if guard.refreshing() else guard.code_version  # else: filled in later
        event = self.host_runner.spawn(env, code_version=version, swap_id=swap_id)
        self.feed_host(event)
        if isinstance(event, lifecycle.Spawned):
            self.drift_guard.on_host_spawned()

    def _persist(self, swap: swaps.Swap, events: tuple[tuple[str, Mapping[str, Any]], ...]) -> None:
        # The record and its events in one transaction: a reader never sees one without the
        # other, and both are on disk before any action that follows runs.
        log.info("swap %s --%s--> %s/%s", swap.id, self._event_name, swap.state, swap.step)
        unsaved_events = self._unsaved[1] if self._unsaved is not None else []
        self._unsaved = (swap, [*unsaved_events, *((kind, dict(d)) for kind, d in events)])
        self._save_unsaved(before=True)  # the entries before it keep their place in the log
        faults.reached(f"{swap.state.value}/{swap.step}", pool=self.pool)

    def _save_unsaved(self, *, before: bool = False) -> None:
        """Save the newest record not yet on disk, with every event since the last save. When the
        store refuses (a full state disk), the orders go on all the same (safety first: a new
        version past its deadline is stopped and rolled back; every step is repeatable, so a
        crash before the save redoes them) and the save is tried again until it takes.

        `before`: the audit entries of this turn so far go first, in the same commit (they were
        one commit of their own: a crash between the two changed nothing but the log). Refused,
        they are written apart, as before, and the record is saved alone."""
        if self._unsaved is None:
            return
        swap, events = self._unsaved
        entries, self._unwritten = (self._unwritten, []) if before else ([], self._unwritten)
        try:
            records = self.store.save_swap_with_events(
                swap.id, swap.state.value, swap.created_at.wall, swap.to_json(), events, entries
            )
        except (StoreError, ValueError) as exc:
            if entries:
                self._unwritten = [*entries, *self._unwritten]
                self._write_events()  # each refusal is logged there
                self._save_unsaved()
                return
            if not isinstance(exc, StoreError):
                raise
            log.error("swap %s: cannot save its record (%s); acting anyway, saving again in "
                      "%.1f s", swap.id, exc, SAVE_RETRY_S)  # fmt: skip
            if self._save_retry is None:
                self._save_retry = self.loop.call_later(SAVE_RETRY_S, self._retry_save)
            return
        self._unsaved = None
        self._written(records)

    def _retry_save(self) -> None:
        self._save_retry = None
        self._save_unsaved()
        self._publish()

    def _check_code(self, swap_id: str, checkpoint: Mapping[str, Any]) -> None:
        """In a worker: does the tree differ from the prepared swap's checkpoint?"""

        def done(future: asyncio.Future[bool]) -> None:
            if future.cancelled():
                return
            error = future.exception()
            if error is not None:  # cannot tell: let the swap guard whatever is there
                log.warning("cannot compare the tree with swap %s: %s", swap_id, error)
            changed = True if error is not None else bool(future.result())
            self.feed(sv.CodeChecked(now=clock.now(), swap_id=swap_id, changed=changed))

        check = functools.partial(self.code.differs, Checkpoint.from_json(dict(checkpoint)))
        self.loop.run_in_executor(self.pool, check).add_done_callback(done)

    def _run_step(self, swap: swaps.Swap, work: Callable[[], Any]) -> None:
        """Run a blocking step in a worker (a rollback's on a reserved one); its result comes
        back as StepDone or StepFailed."""
        step_now = swap.step
        assert step_now is not None

        def done(future: asyncio.Future[Any]) -> None:
            self._written_by_a_worker()
            error = future.exception()
            event: swaps.StepDone | swaps.StepFailed
            if error is None:
                result = future.result()
                result = result if isinstance(result, Mapping) else None
                event = swaps.StepDone(now=clock.now(), step=step_now, result=result)
            else:
                if not isinstance(error, SwapguardError):
                    log.error("step %s of swap %s failed", step_now, swap.id, exc_info=error)
                event = swaps.StepFailed(now=clock.now(), step=step_now, error=str(error))
            self.feed(sv.WorkReported(swap_id=swap.id, event=event))

        rollback = swap.state is swaps.SwapState.ROLLING_BACK
        pool = self.reserved if rollback else self.pool
        self.loop.run_in_executor(pool, work).add_done_callback(done)

    def _sync_data(self, swap: swaps.Swap) -> None:
        """In a worker: the new version's copies of the data to disk; DataSynced comes back."""

        def done(future: asyncio.Future[None]) -> None:
            error = future.exception()
            why = None if error is None else f"the data copies could not be synced: {error}"
            event = swaps.DataSynced(now=clock.now(), error=why)
            self.feed(sv.WorkReported(swap_id=swap.id, event=event))

        def wanted() -> bool:  # on the worker: reads the record the loop replaces whole
            now = self.state.swap
            return now is not None and now.id == swap.id and now.state is swaps.SwapState.PROBATION

        sync = functools.partial(self.work.sync_data, swap, wanted)
        self.loop.run_in_executor(self.pool, sync).add_done_callback(done)

    def _restore_code(self, swap: swaps.Swap) -> None:
        checkpoint = self.work.restore_code(swap)
        self.loop.call_soon_threadsafe(self.drift_guard.baseline_taken, checkpoint)

    def _run_health_check(self, swap_id: str | None, check: int) -> None:
        """In a worker: the health check for the swap on probation, or (None) the liveness one
        (`check`: its number, echoed)."""

        def done(future: asyncio.Future[jobs.JobResult]) -> None:
            if future.cancelled():
                return
            if (error := future.exception()) is not None:  # a check that cannot run has failed
                ok, detail = False, str(error)
            else:
                result = future.result()
                ok = result.ok
                detail = failure_detail(result)  # never the check's output: readers see events
            event = swaps.HealthChecked(now=clock.now(), ok=ok, detail=detail[:200])
            self.feed(sv.WorkReported(swap_id=swap_id, event=event, check=check))

        check_job = functools.partial(self.work.health_check, jobs.epoch())
        self.loop.run_in_executor(self.pool, check_job).add_done_callback(done)

    def _finish_swap(self, swap: swaps.Swap) -> None:
        finished = self.counters.swaps_finished
        finished[swap.state.value] = finished.get(swap.state.value, 0) + 1
        self.drift_guard.on_swap_finished(swap)
        self.pool.submit(self.work.settle, swap, self.config.state.keep_swaps)

    def _verify_snapshots(self, swap: swaps.Swap) -> None:
        """In a worker: integrity_check of the snapshots, reported as an event."""
        if (event := self.work.verify_snapshots(swap)) is not None:
            self.loop.call_soon_threadsafe(self._emit, event[0], event[1], swap.id)

    def _answer_confirm(self, swap_id: str, error: str | None) -> None:
        waiters = self._confirm_waiters.pop(swap_id, [])
        if error is not None and not waiters:
            log.warning("confirm of swap %s refused: %s", swap_id, error)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(error)

    # --- swap commands (from the API) -----------------------------------------------------

    async def prepare(
        self, summary: str, *, auto: bool = False, checkpoint: Checkpoint | None = None
    ) -> swaps.Swap:
        if self.swap is not None:
            raise Conflict(f"swap {self.swap.id} is in flight ({self.swap.state})")
        if not auto:  # the drift guard's swap is not refused: its take refuses, and rolls back
            await self._disk_fits(make_room=False)
            if self.swap is not None:
                raise Conflict(f"swap {self.swap.id} is in flight ({self.swap.state})")
        swap_id = clock.new_id()
        if checkpoint is None:
            # Every swap is prepared with the baseline of the host in place (it is taken after
            # the spawn at start): a drift check after the swap compares against it.
            await self.drift_guard.settled()
            checkpoint = await self.loop.run_in_executor(
                self.pool, self.work.take_checkpoint, swap_id
            )
        self.feed(
            sv.PrepareRequested(
                now=clock.now(),
                swap_id=swap_id,
                summary=summary,
                checkpoint=checkpoint.to_json(),
                auto=auto,
            )
        )
        assert self.swap is not None
        return self.swap

    async def command_swap(self, swap_id: str, action: str, body: Mapping[str, Any]) -> swaps.Swap:
        current = self.swap
        if action == "activate" and current is not None and _activatable(current, swap_id):
            await self._disk_fits(make_room=True)  # refused here: the host was never stopped
        swap = self._swap_for(swap_id)
        now = clock.now()
        event: swaps.Request
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
        self.feed(event)
        if action == "abort":
            await self._abort_settled(swap_id)
        if action == "confirm" and self.state.confirm_waiting == swap_id:
            # The new version's copies of the data are being flushed: seconds at most.
            answer: asyncio.Future[str | None] = self.loop.create_future()
            self._confirm_waiters.setdefault(swap_id, []).append(answer)
            if (error := await answer) is not None:
                raise Conflict(error)
        current = self.swap  # None once the event finished the swap: then the store has it
        return current if current is not None else self._swap_for(swap_id)

    async def _disk_fits(self, *, make_room: bool) -> None:
        """Raises InsufficientStorage when an activation's snapshot would not fit (a worker
        measures; `core.diskbudget` decides). With `make_room`, the budget's prune runs first."""
        check = functools.partial(self.work.check_disk, make_room=make_room)
        try:
            await self.loop.run_in_executor(self.pool, check)
        except OSError as exc:  # cannot tell: go ahead, the take checks again before it copies
            log.warning("cannot measure the disk for the snapshot: %s", exc)

    async def _abort_settled(self, swap_id: str) -> None:
        """An abort answers once the code is restored (the swap is `aborted`), or, still under
        way after ABORT_WAIT_S (a git lock held, retries), with the swap at its step: 202.
        An abort that gave up is refused with its last error; the swap stays prepared."""

        def restoring() -> bool:
            swap = self.swap
            return swap is not None and swap.id == swap_id and swap.step is not None

        try:
            async with asyncio.timeout(ABORT_WAIT_S):
                while restoring():
                    await self._next_change()
        except TimeoutError:
            return
        swap = self.swap
        if swap is not None and swap.id == swap_id:  # still prepared: the restore gave up
            raise Conflict(
                f"the abort of swap {swap_id} gave up: {swap.last_error}; the swap is still "
                "prepared (abort again, or activate it)"
            )

    def _swap_for(self, swap_id: str) -> swaps.Swap:
        if self.swap is not None and self.swap.id == swap_id:
            return self.swap
        record = self.store.load_swap(swap_id)
        if record is None:
            raise NotFound(f"no swap {swap_id!r}")
        return swaps.Swap.from_json(record)

    # --- heartbeats (from notify datagrams and the control socket) -------------------------

    def heartbeat(self, status: str | None, boot: float | None = None) -> None:
        beat = lifecycle.Heartbeat(
            now=boot if boot is not None else clock.boot_clock(), status=status
        )
        beaten = None if self._feeding else sv.heartbeat(self.state, beat, self.policy)
        if beaten is None:
            self.feed(sv.HostInput(now=clock.now(), event=beat))  # e.g. an adopted host's first
            return
        self.state = beaten
        self._publish()
        # A heartbeat only pushes the next wake-up later; the armed timer stays valid.
        if self.timer.at is None:
            self.timer.arm(sv.next_wakeup(self.state, self.policy, clock.now()))

    # --- the timer, events, background tasks ------------------------------------------------

    def _tick(self) -> None:
        self.feed(sv.Tick(now=clock.now()))

    def _emit(self, kind: str, detail: Mapping[str, Any], swap_id: str | None = None) -> None:
        """Into the audit log; a store that refuses it costs the entry (logged), never the orders
        that follow it. While a turn of the machine is performed, entries wait for its end (or
        the next swap record saved) and go in one transaction: a restart writes nothing between
        the host's exit and the next spawn, and one commit after it."""
        self._unwritten.append((kind, dict(detail), swap_id, time.time()))
        if not self._feeding:
            self._write_events()
            self._publish()

    def _write_events(self) -> None:
        entries, self._unwritten = self._unwritten, []
        if not entries:
            return
        try:
            records = self.store.append_events(entries)
        except (StoreError, ValueError) as exc:
            if len(entries) > 1 and isinstance(exc, ValueError):  # one bad entry: keep the rest
                for entry in entries:
                    self._unwritten = [entry]
                    self._write_events()
                return
            for kind, detail, _, _ in entries:
                log.error("event %s %s not recorded: %s", kind, detail, exc)
            return
        self._written(records)

    def _written_by_a_worker(self) -> None:
        """A step's worker may have written entries of its own (a restore's lock reports): they
        are published with the step's result, not with whatever the loop writes next."""
        try:
            newest = self.store.newest_event_id()
        except StoreError as exc:
            log.warning("cannot read the audit log's newest id: %s", exc)
            return
        if newest > self._written_event_id:
            self._written_event_id = newest
            self._unread_by_hooks = True  # entries the loop never held: the hooks read them

    def _written(self, records: list[EventRecord]) -> None:
        if records:
            self._written_event_id = max(self._written_event_id, records[-1].id)
            self._unannounced += records

    def _publish(self) -> None:
        """The state as it stands between two events, then the events written on the way to it:
        a reader who saw an event finds its state in the status (never the state before it), and
        the status never runs ahead of the store (the store was written first). An entry a
        step's worker writes (a restore's lock report) is published with the step's result."""
        self.published = self.state
        self.published_event_id = self._written_event_id
        records, self._unannounced = self._unannounced, []
        for record in records:
            self.hooks.submit(record.to_json())
        if self._unread_by_hooks:
            self._unread_by_hooks = False
            self.hooks.wake()

    def _schedule(self, coro: Coroutine[Any, Any, Any] | Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_log_task_error)

    def _prepare_in_background(self, summary: str, checkpoint: Checkpoint) -> None:
        """The drift guard's automatic swap, prepared from the baseline it was given."""
        self._schedule(self.prepare(summary, auto=True, checkpoint=checkpoint))


def _activatable(swap: swaps.Swap, swap_id: str) -> bool:
    """An activate request for `swap` would stop the host (else the machine refuses it anyway)."""
    return swap.id == swap_id and swap.state is swaps.SwapState.PREPARED and swap.step is None


def _where(swap: swaps.Swap) -> tuple[str, str, str | None]:
    return swap.id, swap.state.value, None if swap.step is None else swap.step.value


def _log_task_error(task: asyncio.Future[Any]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is not None and not isinstance(error, SwapguardError):
        log.error("background task failed", exc_info=error)
    elif error is not None:
        log.warning("%s", error)
