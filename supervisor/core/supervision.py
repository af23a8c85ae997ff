"""The host and its swap as one pure machine: every decision of the runtime, made in one place.

Theory of operation
-------------------
Two machines decide most things: `lifecycle` for the host's process (start, readiness, heartbeats,
stops, restarts with backoff) and `swaps` for a swap's deadman clock. This module decides what
lies between them, and holds both: `step(state, event, policy)` takes the `Supervision` record
(the host, the swap in flight and what the two share) and one event, and returns the next record
and the orders for the runtime, in the order they must be performed. The runtime turns its inputs
into events, calls `step`, performs the orders and feeds their outcomes back as events.

What is decided here:
- A host fact (started, ready, exited, spawn failed, start timeout, heartbeat lost) is news for
  the swap: it arrives as a typed `lifecycle.Fact` and goes on as the swap machine's event.
- A swap step that stops or starts the host is a host request; a stop step is done once the host
  is stopped; a start step whose host already runs (adopted after a restart of ours) is done.
- A host start while a swap is prepared starts the new code, an activation, and so may an exit
  of the host on its own: the code is checked first (`CheckCodeChanged`); changed code activates
  the swap, unchanged code is an ordinary start or crash. A start the check holds waits for an
  abort in progress and goes ahead once the abort ended.
- The environment of the next spawn: the swap's variables on probation, the rolled-back ones for
  one spawn after a rollback.
- A rollback that gave up (`failed`) leaves the host stopped; an operator's host request is
  refused while a swap step drives the host.
- A confirm of a new version whose copies of the data are not yet on disk waits for `SyncData`,
  and is answered (`AnswerConfirm`) once it took or was refused.
- Liveness (`deadman.health_always`): the health check runs every `health_interval` while the
  host is ready and no new version is on probation (there the swap's own check decides, and a
  failure rolls back); `health_failures` failures in a row restart the host
  (`lifecycle.Unhealthy`, event `host.unhealthy`), a failure for the backoff like a lost
  heartbeat. One check at a time (one in flight when the check stops, for a new run or a swap,
  is cancelled); the count starts again with every run of the host.
- A tree kill (`KillTree`) ends with `TreeGone`: until then no host is spawned (the spawn is
  held) and no stop step is done (nothing of the old tree may write while the code or the data
  is restored). The runtime waits for the exits off its loop, so a deadline is never held by it.

Rules
-----
1. Pure: no I/O, no clock reads, no logging. `now` comes with every event. The data it decides
   on (the record, policy, events, actions) is in `core.supervisionrecord`, re-exported here.
2. Persisted before acted: every record a swap passes through gets a `PersistSwap` (with its
   audit events) ahead of the orders that follow from it, so a crash between two orders resumes
   at the step in flight. Every order is safe to perform twice.
3. A request the machines refuse raises `Conflict` (or `BadRequest`) and changes nothing.
4. Results of work for a swap that is no longer the one in flight are dropped; a code check
   answered for a check no longer waited on is dropped.
5. The machines' own rules stay theirs: a host or swap record changes only through its own
   machine's `step` (`resume`, `new_swap`); this module decides what to feed them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from supervisor.core import lifecycle, swaps
from supervisor.core.instant import Instant
from supervisor.core.supervisionrecord import (
    Action,
    AnswerConfirm,
    CancelJobs,
    CheckCodeChanged,
    CodeCheck,
    CodeChecked,
    Emit,
    Event,
    HostInput,
    HostRequested,
    KillTree,
    Liveness,
    Outcome,
    PersistSwap,
    Policy,
    PrepareRequested,
    RecordExitReason,
    RecordReady,
    RestoreCode,
    RestoreData,
    Resumed,
    RunBuild,
    RunHealthCheck,
    SaveChanges,
    SignalStop,
    Spawn,
    Supervision,
    SwapFinished,
    SyncData,
    TakeSnapshots,
    Tick,
    TreeGone,
    VerifySnapshots,
    WorkReported,
    loaded,
)
from supervisor.core.swaprecord import stamp
from supervisor.core.wakeup import next_wakeup as _next_wakeup
from supervisor.errors import Conflict

HostState = lifecycle.HostState
SwapState = swaps.SwapState
_NO_LIVENESS = Liveness()
STOP_STEPS = frozenset({swaps.Step.STOP_OLD, swaps.Step.STOP_NEW})
SPAWN_STEPS = frozenset({swaps.Step.SPAWN_NEW, swaps.Step.SPAWN_OLD})

__all__ = [
    "Action",
    "AnswerConfirm",
    "CancelJobs",
    "CheckCodeChanged",
    "CodeCheck",
    "CodeChecked",
    "Emit",
    "Event",
    "HostInput",
    "HostRequested",
    "HostState",
    "KillTree",
    "Liveness",
    "Outcome",
    "PersistSwap",
    "Policy",
    "PrepareRequested",
    "RecordExitReason",
    "RecordReady",
    "RestoreCode",
    "RestoreData",
    "Resumed",
    "RunBuild",
    "RunHealthCheck",
    "SaveChanges",
    "SignalStop",
    "Spawn",
    "Supervision",
    "SwapFinished",
    "SwapState",
    "SyncData",
    "TakeSnapshots",
    "Tick",
    "TreeGone",
    "VerifySnapshots",
    "WorkReported",
    "heartbeat",
    "loaded",
    "next_wakeup",
    "step",
]


# --- the machine -------------------------------------------------------------------------------


def step(state: Supervision, event: Event, policy: Policy) -> Outcome:
    """Feed one event: the next record and the orders to perform, in order."""
    if isinstance(event, HostInput) and isinstance(event.event, lifecycle.Heartbeat):
        beaten = heartbeat(state, event.event, policy)
        if beaten is not None:
            return beaten, []
    now = event.event.now if isinstance(event, WorkReported) else event.now
    turn = _Turn(state, policy, now)
    turn.feed(event)
    turn.settle()
    return turn.state, turn.actions


def heartbeat(state: Supervision, event: lifecycle.Heartbeat, policy: Policy) -> Supervision | None:
    """The hot path (thousands a second): a heartbeat that only moves the host's clock, with no
    order; None when it does more (an adopted host's first one makes it ready): `step` it."""
    if state.host.ready_unseen:
        return None
    host, _ = lifecycle.step(state.host, event, policy.host)
    return Supervision(  # spelled out: twice as fast as `replace`, on the hottest path
        host=host,
        swap=state.swap,
        env=state.env,
        env_one_shot=state.env_one_shot,
        check=state.check,
        confirm_waiting=state.confirm_waiting,
        liveness=state.liveness,
        checks_ordered=state.checks_ordered,
        kills=state.kills,
        spawn_held=state.spawn_held,
    )


def next_wakeup(state: Supervision, policy: Policy, now: Instant) -> float | None:
    """The boot-clock moment at which a `Tick` could next change something; None: none."""
    wake = _next_wakeup(state.host, policy.host, state.swap, policy.swap, now)
    live = state.liveness.next_at
    return live if wake is None or (live is not None and live < wake) else wake


def _liveness_runs(state: Supervision, policy: Policy) -> bool:
    """The liveness check runs: configured, the host ready, no new version on probation."""
    if not (policy.health_always and policy.swap.has_health_check):
        return False
    if state.host.state is not HostState.RUNNING:
        return False
    swap = state.swap
    return swap is None or (swap.state is SwapState.PREPARED and swap.step is None)


def _spawn_overtaken(host: lifecycle.Host) -> bool:
    """A spawn the host machine ordered was overtaken within the same turn: a fact it emitted
    first (an exit of the new version that rolls its swap back) led to a stop. Spawning then
    would start an untracked second host."""
    return host.state is not HostState.STARTING or host.pid is not None


def _prepared_idle(swap: swaps.Swap | None) -> bool:
    return swap is not None and swap.state is SwapState.PREPARED and swap.step is None


def _confirm_must_wait(swap: swaps.Swap | None, swap_id: str) -> bool:
    """The new version runs but its copies of the data are still being flushed."""
    return (
        swap is not None
        and swap.id == swap_id
        and swap.state is SwapState.PROBATION
        and swap.step is None
        and swap.data_unsynced
    )


class _Turn:
    """One call of `step`: the record as it goes and the orders so far. Lives for that call only."""

    def __init__(self, state: Supervision, policy: Policy, now: Instant) -> None:
        self.state = state
        self.policy = policy
        self.now = now
        self.actions: list[Action] = []
        self.finished: swaps.Swap | None = None

    def set(self, **changes: Any) -> None:
        self.state = replace(self.state, **changes)

    # --- events --------------------------------------------------------------------------

    def feed(self, event: Event) -> None:
        match event:
            case HostInput(event=host_event):
                self.host(host_event)
            case HostRequested(event=request):
                swap = self.state.swap
                if swap is not None and swap.step is not None:  # the tree or data is mid-change
                    raise Conflict(
                        f"swap {swap.id} is at step {swap.step}; the host follows the swap"
                    )
                self.host(request)
            case Tick(now=now):
                if self.state.swap is not None:
                    self.swap(swaps.Tick(now=now))
                self.host(lifecycle.Tick(now=now.boot))
            case WorkReported(swap_id=None, event=swaps.HealthChecked() as result, check=check):
                self.liveness_checked(result, check)
            case WorkReported(swap_id=None):
                return  # only the liveness check reports without a swap
            case WorkReported(swap_id=swap_id, event=result):
                if self.state.swap is None or self.state.swap.id != swap_id:
                    return  # rule 4
                if isinstance(result, swaps.StepDone | swaps.StepFailed):
                    self.swap(result)  # a result for a step not in flight is the machine's to drop
                else:
                    self.swap_fact(result)
            case CodeChecked():
                self.code_checked(event)
            case TreeGone(killed=killed):
                self.tree_gone(killed)
            case Resumed(adopted=adopted, recalled=recalled):
                if recalled is not None:
                    self.host(recalled)
                self.resumed(adopted)
            case PrepareRequested():
                self.prepare(event)
            case swaps.ConfirmRequested() if _confirm_must_wait(self.state.swap, _id(self.state)):
                self.set(confirm_waiting=_id(self.state))  # answered once the data is on disk
            case swaps.Request():
                if self.state.swap is None:
                    raise Conflict("no swap is in flight")
                self.swap(event)

    def resumed(self, adopted: bool) -> None:
        swap = self.state.swap
        if swap is not None:
            if swap.state is SwapState.PROBATION and swap.deadline is not None:
                self.set(
                    env={
                        "SWAPGUARD_SWAP_ID": swap.id,
                        "SWAPGUARD_DEADLINE": stamp(swap.deadline) or "",
                    }
                )
            self.commit(*swaps.resume(swap, self.policy.swap, self.now), before=swap)
        swap = self.state.swap
        swap_drives_host = swap is not None and (
            swap.step is not None or swap.state is SwapState.FAILED
        )
        if not adopted and not swap_drives_host:
            self.host(lifecycle.StartRequested(now=self.now.boot))

    def prepare(self, event: PrepareRequested) -> None:
        if (swap := self.state.swap) is not None:
            raise Conflict(f"swap {swap.id} is in flight ({swap.state})")
        new, orders = swaps.new_swap(
            id=event.swap_id, summary=event.summary, now=event.now,
            checkpoint=event.checkpoint, auto=event.auto,
        )  # fmt: skip
        self.commit(new, orders, before=None)

    def code_checked(self, event: CodeChecked) -> None:
        check = self.state.check
        if check is None or check.swap_id != event.swap_id:
            return  # rule 4
        swap = self.state.swap
        aborting = swap is not None and swap.state is SwapState.PREPARED and swap.step is not None
        if aborting:
            return  # the code is being restored: the abort's end decides (see `commit`)
        self.set(check=None)
        if event.changed and _prepared_idle(swap) and swap is not None and swap.id == check.swap_id:
            self.swap(swaps.ActivateRequested(now=event.now))
            return
        host = self.state.host
        if check.spawn and host.state is HostState.STARTING and host.pid is None:
            self.spawn(checked=True)  # unchanged code: an ordinary start of the old version

    def tree_gone(self, killed: int) -> None:
        self.set(kills=max(0, self.state.kills - 1))
        if killed:
            self.actions.append(Emit("host.tree_killed", {"processes": killed}))
        if self.state.kills or not self.state.spawn_held:
            return
        self.set(spawn_held=False)
        host = self.state.host
        if host.state is HostState.STARTING and host.pid is None:  # not stopped meanwhile
            self.spawn()

    # --- the host ------------------------------------------------------------------------

    def host(self, event: lifecycle.Event) -> None:
        host, orders = lifecycle.step(self.state.host, event, self.policy.host)
        self.set(host=host)
        for order in orders:
            match order:
                case lifecycle.Spawn() if not _spawn_overtaken(self.state.host):
                    self.spawn()
                case lifecycle.Spawn():
                    pass  # a fact emitted before it stopped the host (a swap rolled back)
                case lifecycle.SignalStop():
                    self.actions.append(SignalStop())
                case lifecycle.KillTree():
                    self.set(kills=self.state.kills + 1)
                    self.actions.append(KillTree(process_too=self.state.host.pid is not None))
                case lifecycle.Emit(event=fact, detail=detail):
                    self.actions.append(Emit(fact.value, detail))
                    last = self.state.host.last_exit
                    ended = fact in (lifecycle.Fact.EXITED, lifecycle.Fact.STOPPED)
                    if ended and last is not None and last.reason is not None:
                        self.actions.append(RecordExitReason(last.reason.value))
                    self.host_fact(fact, detail)

    def spawn(self, *, checked: bool = False) -> None:
        swap = self.state.swap
        if not checked and _prepared_idle(swap):
            self.check_code(spawn=True)  # a start while prepared may be an activation
            return
        if self.state.kills:
            self.set(spawn_held=True)  # spawned once the last tree is gone (`tree_gone`)
            return
        swap_id = swap.id if swap is not None and swap.state is SwapState.PROBATION else None
        self.actions.append(Spawn(env=dict(self.state.env), swap_id=swap_id))

    def check_code(self, *, spawn: bool) -> None:
        swap = self.state.swap
        assert swap is not None
        check = self.state.check
        if check is not None and check.swap_id == swap.id:  # one check answers both questions
            if spawn and not check.spawn:
                self.set(check=replace(check, spawn=True))
            return
        self.set(check=CodeCheck(swap.id, spawn))
        self.actions.append(CheckCodeChanged(swap.id, swap.checkpoint))

    def host_fact(self, fact: lifecycle.Fact, detail: Mapping[str, Any]) -> None:
        """What a host fact means for the swap (rule 1 of `lifecycle`)."""
        now = self.now
        swap = self.state.swap
        match fact:
            case lifecycle.Fact.STARTED:
                if self.state.env_one_shot:
                    self.set(env={}, env_one_shot=False)
                self.swap_fact(swaps.HostSpawned(now=now))
            case lifecycle.Fact.READY:
                self.actions.append(RecordReady())
                self.swap_fact(swaps.HostReady(now=now))
            case lifecycle.Fact.EXITED if _prepared_idle(swap):
                self.check_code(spawn=False)  # it may have exited to apply a change
            case lifecycle.Fact.EXITED:
                self.swap_fact(swaps.HostCrashed(now=now))
            case lifecycle.Fact.SPAWN_FAILED if swap is not None and swap.step in SPAWN_STEPS:
                assert swap.step is not None
                error = str(detail.get("error"))
                self.swap_fact(swaps.StepFailed(now=now, step=swap.step, error=error))
            case lifecycle.Fact.SPAWN_FAILED:
                self.swap_fact(swaps.HostCrashed(now=now))
            case lifecycle.Fact.START_TIMEOUT:
                self.swap_fact(swaps.HostNotReady(now=now))
            case lifecycle.Fact.HEARTBEAT_LOST:
                self.swap_fact(swaps.HeartbeatLost(now=now))

    # --- the swap ------------------------------------------------------------------------

    def swap_fact(self, event: swaps.Event) -> None:
        """A fact for the swap machine; it concerns only a swap on probation or rolling back."""
        swap = self.state.swap
        if swap is not None and swap.state in (SwapState.PROBATION, SwapState.ROLLING_BACK):
            self.swap(event)

    def swap(self, event: swaps.Event) -> None:
        swap = self.state.swap
        assert swap is not None
        self.commit(*swaps.step(swap, event, self.policy.swap), before=swap)

    def commit(
        self, new: swaps.Swap, orders: list[swaps.Action], *, before: swaps.Swap | None
    ) -> None:
        emits = tuple((o.event, dict(o.detail)) for o in orders if isinstance(o, swaps.Emit))
        if before is None or new != before or emits:
            self.actions.append(PersistSwap(new, emits))
        self.set(swap=new)
        if new.step is swaps.Step.STOP_OLD and (before is None or before.step is None):
            self.actions.append(SaveChanges(new))
        if before is not None and before.step is swaps.Step.SPAWN_NEW and new.step is None:
            self.actions.append(VerifySnapshots(new))
        for order in orders:
            self.swap_order(new, order)
        gave_up = before is not None and before.state is not SwapState.FAILED
        if new.state is SwapState.FAILED and gave_up:
            # The rollback gave up: the host stays stopped for the operator, whatever the
            # lifecycle would retry (a spawn of the old version that keeps failing backs off).
            self.host(lifecycle.StopRequested(now=self.now.boot))
        if new.state in swaps.TERMINAL:
            self.finished = new
            self.set(swap=None)
            if not self.state.env_one_shot:
                self.set(env={})
            self.actions.append(SwapFinished(new))
        if (check := self.state.check) is not None and not _prepared_idle(self.state.swap):
            self.after_check(check, new, before)

    def after_check(self, check: CodeCheck, new: swaps.Swap, before: swaps.Swap | None) -> None:
        """The swap moved while a code check was out: an activation has stopped the host; an
        abort that ended lets a start held by the check go ahead; one in progress holds it."""
        if new.state is SwapState.PREPARED and new.step is not None:
            return
        self.set(check=None)
        if new.state is SwapState.PREPARED:  # the abort gave up: the tree is in doubt, ask again
            if check.spawn:
                self.check_code(spawn=True)
            return
        host = self.state.host
        if check.spawn and host.state is HostState.STARTING and host.pid is None:
            self.spawn(checked=True)

    def swap_order(self, swap: swaps.Swap, order: swaps.Action) -> None:
        match order:
            case swaps.StopHost():
                self.host(lifecycle.StopRequested(now=self.now.boot))
            case swaps.StartHost(env=env):
                self.start_for(swap, env)
            case swaps.TakeSnapshots():
                self.actions.append(TakeSnapshots(swap))
            case swaps.RunBuild():
                self.actions.append(RunBuild(swap))
            case swaps.RestoreCode():
                self.actions.append(RestoreCode(swap))
            case swaps.RestoreData():
                self.actions.append(RestoreData(swap))
            case swaps.SyncData():
                self.actions.append(SyncData(swap))
            case swaps.RunHealthCheck():
                self.actions.append(RunHealthCheck(swap.id))
            case swaps.CancelJobs():
                self.actions.append(CancelJobs())

    def start_for(self, swap: swaps.Swap, env: Mapping[str, str]) -> None:
        self.set(env=dict(env), env_one_shot=swap.state is SwapState.ROLLING_BACK)
        host = self.state.host
        if host.pid is not None and host.state in (HostState.STARTING, HostState.RUNNING):
            # Resumed after a restart of ours with the host already spawned (and adopted).
            self.swap_fact(swaps.HostSpawned(now=self.now))
            return
        self.host(lifecycle.StartRequested(now=self.now.boot))

    # --- liveness ------------------------------------------------------------------------

    def liveness_checked(self, result: swaps.HealthChecked, check: int) -> None:
        live = self.state.liveness
        if not live.in_flight or check != self.state.checks_ordered:
            return  # ordered for an earlier run of the host, or before a swap took over (rule 4)
        if result.ok:
            self.set(liveness=replace(live, in_flight=False, failures=0))
            return
        failures = live.failures + 1
        self.set(liveness=replace(live, in_flight=False, failures=failures))
        if failures >= self.policy.swap.health_failures:
            unhealthy = lifecycle.Unhealthy(
                now=self.now.boot, failures=failures, detail=result.detail
            )
            self.host(unhealthy)

    def tend_liveness(self) -> None:
        """Schedule the liveness check while it runs, forget it while it does not; order a check
        that is due unless one is in flight (a missed turn is skipped, never made up)."""
        live = self.state.liveness
        if not _liveness_runs(self.state, self.policy):
            if live != _NO_LIVENESS:
                if live.in_flight:
                    # One check at a time: the next run's, or the swap's own, never meets it. No
                    # other job is in flight here (liveness runs only without a swap step).
                    self.actions.append(CancelJobs())
                self.set(liveness=_NO_LIVENESS)
            return
        interval, now = self.policy.swap.health_interval, self.now.boot
        if live.next_at is None:
            self.set(liveness=replace(live, next_at=now + interval))
            return
        if now < live.next_at:
            return
        later = live.next_at + (math.floor((now - live.next_at) / interval) + 1) * interval
        if live.in_flight:
            self.set(liveness=replace(live, next_at=later))
            return
        check = self.state.checks_ordered + 1
        self.set(liveness=replace(live, next_at=later, in_flight=True), checks_ordered=check)
        self.actions.append(RunHealthCheck(None, check))

    # --- after the event -----------------------------------------------------------------

    def settle(self) -> None:
        """What follows from the record itself: a stop step whose host is stopped is done, a
        confirm that waited is answered once it need wait no more, and the liveness check is
        scheduled by where the host and the swap now stand."""
        while (swap := self.state.swap) is not None and swap.step in STOP_STEPS:
            if self.state.host.state is not HostState.STOPPED or self.state.kills:
                break
            assert swap.step is not None
            self.swap_fact(swaps.StepDone(now=self.now, step=swap.step))
            if self.state.swap == swap:  # not taken (waiting to retry, or failed)
                break
        self.answer_confirm()
        self.tend_liveness()

    def answer_confirm(self) -> None:
        waiting = self.state.confirm_waiting
        if waiting is None or _confirm_must_wait(self.state.swap, waiting):
            return
        self.set(confirm_waiting=None)
        swap = self.state.swap
        if swap is None or swap.id != waiting:
            done = self.finished
            if done is not None and done.id == waiting and done.state is SwapState.CONFIRMED:
                self.actions.append(AnswerConfirm(waiting, None))
                return
            state = done.state if done is not None and done.id == waiting else "finished"
            self.actions.append(AnswerConfirm(waiting, f"swap {waiting} is {state}"))
            return
        try:
            self.swap(swaps.ConfirmRequested(now=self.now))
        except Conflict as refused:
            self.actions.append(AnswerConfirm(waiting, refused.message))
            return
        self.actions.append(AnswerConfirm(waiting, None))


def _id(state: Supervision) -> str:
    return state.swap.id if state.swap is not None else ""
