"""The swap lifecycle and its deadman clock, as a pure state machine.

Theory of operation
-------------------
A swap is one frozen record, `Swap`. Everything that happens to it arrives as an event, a past
fact stamped with the moment the runtime saw it: a request (activate, confirm, extend, roll back,
abort), a step that finished or failed, the host spawned, ready, crashed, silent or unhealthy, or a
`Tick` of the runtime's single timer. `step(swap, event, policy)` looks the pair (state, event type)
up in `TRANSITIONS`; the handler found there returns the next record and a list of actions, orders
for the runtime (stop the host, snapshot, build, start the host, restore code or data, run a health
check, cancel jobs in flight, emit an audit event). The runtime saves the record, then performs the
actions, then feeds their outcomes back as events, and sleeps until `next_wakeup()`.

Activation (stop old, snapshot, build, spawn new) and rollback (stop new, restore code, restore
data, build, spawn old) are chains of `Step`s. The step in progress is part of the record, so a
supervisor that died mid-chain loads the record and calls `resume()`, which orders it again.

Rules
-----
1. Everything that decides a transition lives in this file; the runtime only waits and dispatches.
   The data it decides on (states, steps, `Policy`, `Swap`, events, actions) is in
   `supervisor.core.swaprecord` and re-exported here, so callers import everything from `swaps`.
2. No I/O, no clock reads, no logging: `now` comes with every event; the runtime logs transitions.
3. Transitions are data. A (state, event type) pair missing from `TRANSITIONS` is a `Conflict` for a
   request (nothing changes) and is ignored for a fact (it does not concern a swap in that state).
   Each entry names the other states it may lead to and `step()` enforces it, so `mermaid()` can't
   drift from the code.
4. A step result (`StepDone`, `StepFailed`) for a step that is not in flight is stale and ignored.
5. Persisted before acted: the runtime saves the record before acting, so every action must be safe
   to perform twice; `resume()` re-issues the current step's action after a crash in between.
6. Safety first: on probation a passed deadline or hard cap beats anything fed in the same tick, the
   hard cap holds at every step (a hanging build too), and a confirm after the deadline is refused.
7. Instants are compared with `Instant.seconds_until`: the boot clock within one boot, the wall
   clock across a reboot.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from supervisor.core.backoff import Backoff
from supervisor.core.ids import SWAP_ID_SYNTAX, is_swap_id
from supervisor.core.instant import Instant
from supervisor.core.swaprecord import (
    ACTIVATION_STEPS,
    AT_REST,
    ROLLBACK_STEPS,
    STEPS_ALLOWED,
    TERMINAL,
    AbortRequested,
    Action,
    ActivateRequested,
    CancelJobs,
    ConfirmRequested,
    DataSynced,
    Emit,
    Event,
    ExtendRequested,
    HealthChecked,
    HeartbeatLost,
    HostCrashed,
    HostNotReady,
    HostReady,
    HostSpawned,
    Policy,
    Request,
    RestoreCode,
    RestoreData,
    RollbackRequested,
    RunBuild,
    RunHealthCheck,
    StartHost,
    Step,
    StepDone,
    StepFailed,
    StopHost,
    Swap,
    SwapState,
    SyncData,
    TakeSnapshots,
    Tick,
    earliest,
    stamp,
)
from supervisor.errors import BadRequest, Conflict

# The machine's surface: its own names and the record's (rule 1); callers need only `swaps`.
__all__ = [
    "ACTIVATION_STEPS",
    "AT_REST",
    "MIN_EXTENSION",
    "ROLLBACK_STEPS",
    "STEPS_ALLOWED",
    "TERMINAL",
    "TRANSITIONS",
    "AbortRequested",
    "Action",
    "ActivateRequested",
    "CancelJobs",
    "ConfirmRequested",
    "DataSynced",
    "Emit",
    "Event",
    "ExtendRequested",
    "Handler",
    "HealthChecked",
    "HeartbeatLost",
    "HostCrashed",
    "HostNotReady",
    "HostReady",
    "HostSpawned",
    "Outcome",
    "Policy",
    "Request",
    "RestoreCode",
    "RestoreData",
    "RollbackRequested",
    "RunBuild",
    "RunHealthCheck",
    "StartHost",
    "Step",
    "StepDone",
    "StepFailed",
    "StopHost",
    "Swap",
    "SwapState",
    "SyncData",
    "TakeSnapshots",
    "Tick",
    "Transition",
    "earliest",
    "mermaid",
    "new_swap",
    "next_wakeup",
    "resume",
    "stamp",
    "step",
]

_MAX_SUMMARY = 4096

Outcome = tuple[Swap, list[Action]]


# --- time --------------------------------------------------------------------------------------


def _reached(moment: Instant | None, now: Instant) -> bool:
    return moment is not None and moment.seconds_until(now) <= 0


def _expired(swap: Swap, now: Instant) -> bool:
    return _reached(swap.deadline, now) or _reached(swap.hard_cap, now)


def _auto_confirm_at(swap: Swap, policy: Policy) -> Instant | None:
    if policy.auto_confirm_after <= 0 or swap.ready_since is None or swap.data_unsynced:
        return None
    return swap.ready_since.plus(policy.auto_confirm_after)


# --- steps -------------------------------------------------------------------------------------

_STEP_ACTION: Mapping[Step, Callable[[Swap], Action]] = {
    Step.STOP_OLD: lambda swap: StopHost(),
    Step.SNAPSHOT: lambda swap: TakeSnapshots(),
    Step.BUILD_NEW: lambda swap: RunBuild(),
    Step.SPAWN_NEW: lambda swap: StartHost(
        env={"SWAPGUARD_SWAP_ID": swap.id, "SWAPGUARD_DEADLINE": str(stamp(swap.deadline))}
    ),
    Step.STOP_NEW: lambda swap: StopHost(),
    Step.RESTORE_CODE: lambda swap: RestoreCode(),
    Step.RESTORE_DATA: lambda swap: RestoreData(),
    Step.BUILD_OLD: lambda swap: RunBuild(),
    Step.SPAWN_OLD: lambda swap: StartHost(
        env={"SWAPGUARD_ROLLED_BACK": swap.id, "SWAPGUARD_ROLLBACK_REASON": str(swap.reason)}
    ),
    Step.ABORT_RESTORE: lambda swap: RestoreCode(),
}


def _applies(step: Step, swap: Swap, policy: Policy) -> bool:
    """Steps with nothing to do are skipped (restoring data only if the new version could write)."""
    if step is Step.SNAPSHOT:
        return policy.has_data
    if step in (Step.BUILD_NEW, Step.BUILD_OLD):
        return policy.has_build
    if step is Step.RESTORE_DATA:
        return swap.snapshots_taken
    return True


def _begin_after(swap: Swap, done: Step, policy: Policy, now: Instant) -> Outcome:
    """Start the first applicable step after `done` in its chain and order its action."""
    chain = ACTIVATION_STEPS if done in ACTIVATION_STEPS else ROLLBACK_STEPS
    following = chain[chain.index(done) + 1 :]
    step_ = next(candidate for candidate in following if _applies(candidate, swap, policy))
    swap = replace(swap, step=step_, attempts=0, retry_at=None)
    if step_ is Step.SNAPSHOT:  # the take may touch the live data even if its result is lost
        swap = replace(swap, snapshots_taken=True)
    if step_ is Step.SPAWN_NEW and swap.deadline is None:
        swap = replace(swap, deadline=earliest([now.plus(policy.window), swap.hard_cap]))
    return swap, [_STEP_ACTION[step_](swap)]


def _step_failed_retry(swap: Swap, event: StepFailed, policy: Policy) -> Outcome:
    """A failed rollback or abort step: retry with backoff, then give up to the operator."""
    attempts = swap.attempts + 1
    swap = replace(swap, attempts=attempts, last_error=event.error, retry_at=None)
    detail: dict[str, Any] = {"step": event.step.value, "error": event.error, "attempt": attempts}
    if attempts < policy.max_step_attempts:
        # no jitter: one rollback has no herd to spread, and the record stays a function of events
        delay = Backoff(first=policy.retry_delay, cap=policy.retry_delay_max)(attempts)
        swap = replace(swap, retry_at=event.now.plus(delay))
        return swap, [Emit("swap.step_failed", {**detail, "retry_in_s": delay})]
    if swap.state is SwapState.PREPARED:  # the abort gives up: still prepared, may be asked again
        return replace(swap, step=None, attempts=0), [Emit("swap.abort_failed", detail)]
    detail["reason"] = swap.reason
    return replace(swap, state=SwapState.FAILED), [Emit("rollback.failed", detail)]


def _retry_due(swap: Swap, event: Tick, policy: Policy) -> Outcome:
    if (step := swap.step) is None or not _reached(swap.retry_at, event.now):
        return swap, []
    swap = replace(swap, retry_at=None)
    return swap, [_STEP_ACTION[step](swap)]


# --- handlers: one per (state, event type) -----------------------------------------------------


def _conflict(swap: Swap, request: Request, why: str) -> Conflict:
    return Conflict(f"cannot {request.verb} swap {swap.id}: {why}")


def _require_running(swap: Swap, request: Request) -> None:
    """Confirm and extend need the new version on probation with its clock not yet run out."""
    if swap.step is not None:
        raise _conflict(swap, request, f"the new version is not running yet (step {swap.step})")
    if _expired(swap, request.now):
        due = stamp(earliest([swap.deadline, swap.hard_cap]))
        raise _conflict(swap, request, f"its deadline passed at {due}; the rollback is due")


def _activate(swap: Swap, event: ActivateRequested, policy: Policy) -> Outcome:
    if swap.step is not None:
        raise _conflict(swap, event, "its abort is in progress")
    hard_cap = event.now.plus(policy.hard_cap)
    swap = replace(
        swap,
        state=SwapState.PROBATION,
        step=Step.STOP_OLD,
        activated_at=event.now,
        hard_cap=hard_cap,
    )
    return swap, [Emit("swap.activated", {"hard_cap_at": stamp(hard_cap)}), StopHost()]


def _abort(swap: Swap, event: AbortRequested, policy: Policy) -> Outcome:
    if swap.step is not None:
        raise _conflict(swap, event, "its abort is already in progress")
    swap = replace(swap, step=Step.ABORT_RESTORE, attempts=0, retry_at=None)
    return swap, [RestoreCode()]


def _aborted(swap: Swap, event: StepDone, policy: Policy) -> Outcome:
    swap = replace(swap, state=SwapState.ABORTED, step=None, attempts=0, finished_at=event.now)
    return swap, [Emit("swap.aborted", {})]


def _rollback(swap: Swap, reason: str, now: Instant, error: str | None = None) -> Outcome:
    swap = replace(
        swap,
        state=SwapState.ROLLING_BACK,
        step=Step.STOP_NEW,
        reason=reason,
        attempts=0,
        retry_at=None,
        next_health_at=None,
        rollback_started_at=now,
        last_error=error if error is not None else swap.last_error,
    )
    detail = {"reason": reason} if error is None else {"reason": reason, "error": error}
    return swap, [CancelJobs(), Emit("swap.rollback_started", detail), StopHost()]


def _confirm(swap: Swap, now: Instant, by: str) -> Outcome:
    swap = replace(swap, state=SwapState.CONFIRMED, step=None, finished_at=now, next_health_at=None)
    return swap, [CancelJobs(), Emit("swap.confirmed", {"by": by})]


def _crashed(swap: Swap, now: Instant, policy: Policy, error: str | None = None) -> Outcome:
    swap = replace(swap, crashes=swap.crashes + 1, ready_since=None, host_ready=False)
    if error is not None:
        swap = replace(swap, last_error=error)
    if swap.crashes >= policy.max_crashes:
        return _rollback(swap, "crash_loop", now, error)
    return swap, []


def _new_version_running(swap: Swap, now: Instant, policy: Policy) -> Outcome:
    next_health = now.plus(policy.health_interval) if policy.has_health_check else None
    swap = replace(swap, step=None, next_health_at=next_health, ready_since=None, host_ready=False)
    detail = {"deadline_at": stamp(swap.deadline), "hard_cap_at": stamp(swap.hard_cap)}
    sync: list[Action] = [SyncData()] if swap.data_unsynced else []
    return swap, [Emit("swap.probation", detail), *sync]


def _probation_step_done(swap: Swap, event: StepDone, policy: Policy) -> Outcome:
    if event.step is Step.SPAWN_NEW:  # the same fact as HostSpawned
        return _new_version_running(swap, event.now, policy)
    if event.step is Step.SNAPSHOT:
        result = event.result or {}
        unsynced = bool(result.get("unsynced", False))
        records = tuple(result.get("data", ()))
        swap = replace(swap, snapshots_taken=True, data=records, data_unsynced=unsynced)
    return _begin_after(swap, event.step, policy, event.now)


def _probation_step_failed(swap: Swap, event: StepFailed, policy: Policy) -> Outcome:
    if event.step is Step.SPAWN_NEW:  # the runtime retries the spawn by its restart policy
        return _crashed(swap, event.now, policy, event.error)
    reason = "build_failed" if event.step is Step.BUILD_NEW else "activation_failed"
    return _rollback(swap, reason, event.now, event.error)


def _probation_spawned(swap: Swap, event: HostSpawned, policy: Policy) -> Outcome:
    if swap.step is Step.SPAWN_NEW:
        return _new_version_running(swap, event.now, policy)
    return swap, []  # a restart of the new version after a crash, or not the new version at all


def _probation_ready(swap: Swap, event: HostReady, policy: Policy) -> Outcome:
    if swap.step is not None:
        return swap, []
    return replace(swap, host_ready=True, ready_since=swap.ready_since or event.now), []


def _probation_crashed(swap: Swap, event: HostCrashed, policy: Policy) -> Outcome:
    if swap.step is not None:  # the old version stopping on our order; SPAWN_NEW has StepFailed
        return swap, []
    return _crashed(swap, event.now, policy)


def _rollback_when_running(reason: str) -> Callable[[Swap, Any, Policy], Outcome]:
    def handler(swap: Swap, event: Any, policy: Policy) -> Outcome:
        if swap.step is not None:  # about the old version, or a new one not spawned yet
            return swap, []
        return _rollback(swap, reason, event.now)

    handler.__name__ = f"_rollback_{reason}"
    return handler


def _probation_health(swap: Swap, event: HealthChecked, policy: Policy) -> Outcome:
    if swap.step is not None:
        return swap, []
    if event.ok:
        ready_since = swap.ready_since or (event.now if swap.host_ready else None)
        return replace(swap, health_failures=0, ready_since=ready_since), []
    swap = replace(swap, health_failures=swap.health_failures + 1, ready_since=None)
    if swap.health_failures >= policy.health_failures:
        return _rollback(swap, "health_failed", event.now, event.detail or None)
    return swap, []


def _probation_tick(swap: Swap, event: Tick, policy: Policy) -> Outcome:
    now = event.now
    if _expired(swap, now):
        return _rollback(swap, "deadline", now)
    if swap.step is not None:
        return swap, []
    if _reached(_auto_confirm_at(swap, policy), now):
        return _confirm(swap, now, "auto")
    if policy.has_health_check and _reached(swap.next_health_at, now):
        assert swap.next_health_at is not None
        overdue = -swap.next_health_at.seconds_until(now)
        intervals = math.floor(overdue / policy.health_interval) + 1  # skip missed ones: no burst
        later = swap.next_health_at.plus(intervals * policy.health_interval)
        return replace(swap, next_health_at=later), [RunHealthCheck()]
    return swap, []


def _confirm_requested(swap: Swap, event: ConfirmRequested, policy: Policy) -> Outcome:
    _require_running(swap, event)
    if swap.data_unsynced:  # the runtime waits for DataSynced first; this is the backstop
        raise _conflict(swap, event, "its copies of the data are not on disk yet; try again")
    return _confirm(swap, event.now, "request")


def _probation_data_synced(swap: Swap, event: DataSynced, policy: Policy) -> Outcome:
    if event.error is not None:  # data the new version writes may not survive: not confirmable
        return _rollback(swap, "activation_failed", event.now, event.error)
    return replace(swap, data_unsynced=False), []


MIN_EXTENSION = 1.0
"""An extension that moves the deadline by less than this (seconds) changes nothing."""


def _extend_requested(swap: Swap, event: ExtendRequested, policy: Policy) -> Outcome:
    """deadline = now + what was asked (at most `extend_by`), never past the hard cap and never
    sooner than it was: like systemd's EXTEND_TIMEOUT_USEC, an extension only adds time."""
    _require_running(swap, event)
    assert swap.hard_cap is not None  # set on activation
    asked = policy.extend_by if event.by is None else min(max(event.by, 0.0), policy.extend_by)
    wanted = event.now.plus(asked)
    capped = swap.hard_cap.seconds_until(wanted) < 0
    deadline = swap.hard_cap if capped else wanted
    if swap.deadline is not None and deadline.seconds_until(swap.deadline) < MIN_EXTENSION:
        return swap, []  # no later than now (a host extending in a loop): nothing is written
    swap = replace(swap, deadline=deadline)
    detail = {"deadline_at": stamp(swap.deadline), "capped": capped}
    return swap, [Emit("swap.extended", detail)]


def _rollback_requested(swap: Swap, event: RollbackRequested, policy: Policy) -> Outcome:
    return _rollback(swap, event.reason, event.now)


def _rollback_step_done(swap: Swap, event: StepDone, policy: Policy) -> Outcome:
    if event.step is Step.SPAWN_OLD:  # the same fact as HostSpawned
        return _rolled_back(swap, event, policy)
    return _begin_after(swap, event.step, policy, event.now)


def _rolled_back(swap: Swap, event: Event, policy: Policy) -> Outcome:
    if swap.step is not Step.SPAWN_OLD:
        return swap, []  # a host spawned mid-rollback is not the old version coming back
    started = swap.rollback_started_at or event.now
    duration = round(-started.seconds_until(event.now), 3)
    swap = replace(swap, state=SwapState.ROLLED_BACK, step=None, attempts=0, finished_at=event.now)
    return swap, [Emit("swap.rolled_back", {"reason": swap.reason, "duration_s": duration})]


def _retry_failed_rollback(swap: Swap, event: RollbackRequested, policy: Policy) -> Outcome:
    step = swap.step
    assert step is not None
    swap = replace(swap, state=SwapState.ROLLING_BACK, attempts=0, retry_at=None)
    detail = {"step": step.value, "by": event.reason}
    return swap, [Emit("swap.rollback_retried", detail), _STEP_ACTION[step](swap)]


# --- the table ---------------------------------------------------------------------------------

Handler = Callable[[Swap, Any, Policy], Outcome]


@dataclass(frozen=True, slots=True)
class Transition:
    """A handler and the other states it may lead to, each with when (the diagram's label)."""

    handler: Handler
    leads_to: Mapping[SwapState, str] = field(default_factory=dict)


S = SwapState
TRANSITIONS: Mapping[tuple[SwapState, type[Event]], Transition] = {
    (S.PREPARED, ActivateRequested): Transition(_activate, {S.PROBATION: ""}),
    (S.PREPARED, AbortRequested): Transition(_abort),
    (S.PREPARED, StepDone): Transition(_aborted, {S.ABORTED: "code restored"}),
    (S.PREPARED, StepFailed): Transition(_step_failed_retry),
    (S.PREPARED, Tick): Transition(_retry_due),
    (S.PROBATION, StepDone): Transition(_probation_step_done),
    (S.PROBATION, StepFailed): Transition(
        _probation_step_failed, {S.ROLLING_BACK: "build_failed, activation_failed, crash_loop"}
    ),
    (S.PROBATION, HostSpawned): Transition(_probation_spawned),
    (S.PROBATION, HostReady): Transition(_probation_ready),
    (S.PROBATION, HostCrashed): Transition(_probation_crashed, {S.ROLLING_BACK: "crash_loop"}),
    (S.PROBATION, HostNotReady): Transition(
        _rollback_when_running("not_ready"), {S.ROLLING_BACK: "not_ready"}
    ),
    (S.PROBATION, HeartbeatLost): Transition(
        _rollback_when_running("heartbeat_lost"), {S.ROLLING_BACK: "heartbeat_lost"}
    ),
    (S.PROBATION, HealthChecked): Transition(_probation_health, {S.ROLLING_BACK: "health_failed"}),
    (S.PROBATION, Tick): Transition(
        _probation_tick,
        {S.ROLLING_BACK: "deadline or hard cap", S.CONFIRMED: "auto confirm"},
    ),
    (S.PROBATION, ConfirmRequested): Transition(_confirm_requested, {S.CONFIRMED: ""}),
    (S.PROBATION, DataSynced): Transition(
        _probation_data_synced, {S.ROLLING_BACK: "activation_failed"}
    ),
    (S.PROBATION, ExtendRequested): Transition(_extend_requested),
    (S.PROBATION, RollbackRequested): Transition(
        _rollback_requested, {S.ROLLING_BACK: "requested"}
    ),
    (S.ROLLING_BACK, StepDone): Transition(_rollback_step_done, {S.ROLLED_BACK: "spawn_old"}),
    (S.ROLLING_BACK, StepFailed): Transition(
        _step_failed_retry, {S.FAILED: "max_step_attempts reached"}
    ),
    (S.ROLLING_BACK, HostSpawned): Transition(_rolled_back, {S.ROLLED_BACK: "old version"}),
    (S.ROLLING_BACK, Tick): Transition(_retry_due),
    (S.FAILED, RollbackRequested): Transition(
        _retry_failed_rollback, {S.ROLLING_BACK: "operator retry"}
    ),
}
del S


# --- the machine -------------------------------------------------------------------------------


def new_swap(
    *, id: str, summary: str, now: Instant, checkpoint: Mapping[str, Any], auto: bool = False
) -> Outcome:
    """A prepared swap: the code is checkpointed, the host still runs the old version."""
    if not is_swap_id(id):
        raise BadRequest(f"swap id must be {SWAP_ID_SYNTAX}, not {id!r}")
    if not isinstance(summary, str) or len(summary) > _MAX_SUMMARY:
        raise BadRequest(f"summary must be a string of at most {_MAX_SUMMARY} characters")
    swap = Swap(
        id=id,
        state=SwapState.PREPARED,
        step=None,
        summary=summary,
        reason=None,
        created_at=now,
        activated_at=None,
        deadline=None,
        hard_cap=None,
        finished_at=None,
        checkpoint=dict(checkpoint),
        auto=auto,
    )
    return swap, [Emit("swap.prepared", {"summary": summary, "auto": auto})]


def step(swap: Swap, event: Event, policy: Policy) -> Outcome:
    """Feed one event: the next record and the actions to perform, in order, after saving it."""
    if isinstance(event, StepDone | StepFailed) and (
        event.step is not swap.step or swap.retry_at is not None
    ):
        return swap, []  # stale: not the step in flight (while waiting to retry, none is)
    transition = TRANSITIONS.get((swap.state, type(event)))
    if transition is None:
        if isinstance(event, Request):
            raise _conflict(swap, event, f"it is {swap.state}")
        return swap, []
    new, actions = transition.handler(swap, event, policy)
    if new.state is not swap.state and new.state not in transition.leads_to:
        raise RuntimeError(f"{transition.handler.__name__} led {swap.state} to {new.state}")
    return new, actions


def resume(swap: Swap, policy: Policy, now: Instant) -> Outcome:
    """After a supervisor restart: order the step in flight again, and a SyncData still owed.

    SPAWN_NEW keeps its original deadline; the runtime feeds a Tick next so that deadlines that
    passed while no supervisor ran fire at once. A machine that restarted before the new
    version's copies of the data were on disk may have lost part of them: that rolls back.
    """
    if swap.state is SwapState.PROBATION and swap.data_unsynced:
        assert swap.activated_at is not None
        if swap.activated_at.boot_id != now.boot_id:
            why = "the machine restarted before the new version's copies of the data were on disk"
            return _rollback(swap, "activation_failed", now, why)
        if swap.step is None:
            return swap, [SyncData()]
    if swap.state in AT_REST or (step := swap.step) is None:
        return swap, []
    swap = replace(swap, retry_at=None)
    return swap, [_STEP_ACTION[step](swap)]


def next_wakeup(swap: Swap, policy: Policy) -> Instant | None:
    """When the runtime's single timer should feed the next Tick; None if nothing is timed."""
    if swap.state in AT_REST:
        return None
    moments = [swap.retry_at]
    if swap.state is SwapState.PROBATION:
        moments += [swap.deadline, swap.hard_cap]
        if swap.step is None:
            moments.append(_auto_confirm_at(swap, policy))
            if policy.has_health_check:
                moments.append(swap.next_health_at)
    return earliest(moments)


def mermaid() -> str:
    """The README's state diagram, drawn from TRANSITIONS (changes within a state are left out)."""
    edges: dict[tuple[SwapState, SwapState], list[str]] = {}
    for (source, event_type), transition in TRANSITIONS.items():
        for target, when in transition.leads_to.items():
            label = event_type.__name__ + (f" ({when})" if when else "")
            edges.setdefault((source, target), []).append(label)
    lines = ["stateDiagram-v2", f"    [*] --> {SwapState.PREPARED} : prepare"]
    for (source, target), labels in edges.items():
        lines.append(f"    {source} --> {target} : {'<br/>'.join(labels)}")
    lines += [f"    {state} --> [*]" for state in SwapState if state in TERMINAL]
    return "\n".join(lines) + "\n"
