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
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, ClassVar

from supervisor.clock import Instant, rfc3339
from supervisor.errors import BadRequest, Conflict


class SwapState(StrEnum):
    PREPARED = "prepared"
    PROBATION = "probation"
    ROLLING_BACK = "rolling_back"
    CONFIRMED = "confirmed"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"
    FAILED = "failed"  # not terminal: waits for the operator, who retries with a rollback request


TERMINAL = frozenset({SwapState.CONFIRMED, SwapState.ROLLED_BACK, SwapState.ABORTED})


class Step(StrEnum):
    """The step in flight; persisted so that a restarted supervisor redoes it."""

    STOP_OLD = "stop_old"
    SNAPSHOT = "snapshot"
    BUILD_NEW = "build_new"
    SPAWN_NEW = "spawn_new"
    STOP_NEW = "stop_new"
    RESTORE_CODE = "restore_code"
    RESTORE_DATA = "restore_data"
    BUILD_OLD = "build_old"
    SPAWN_OLD = "spawn_old"
    ABORT_RESTORE = "abort_restore"


ACTIVATION_STEPS = (Step.STOP_OLD, Step.SNAPSHOT, Step.BUILD_NEW, Step.SPAWN_NEW)
ROLLBACK_STEPS = (
    Step.STOP_NEW,
    Step.RESTORE_CODE,
    Step.RESTORE_DATA,
    Step.BUILD_OLD,
    Step.SPAWN_OLD,
)

# Which `Swap.step` each state admits; `Swap` refuses any other pairing.
STEPS_ALLOWED: Mapping[SwapState, frozenset[Step | None]] = {
    SwapState.PREPARED: frozenset({None, Step.ABORT_RESTORE}),
    SwapState.PROBATION: frozenset({None, *ACTIVATION_STEPS}),
    SwapState.ROLLING_BACK: frozenset(ROLLBACK_STEPS),
    SwapState.FAILED: frozenset(ROLLBACK_STEPS),
    SwapState.CONFIRMED: frozenset({None}),
    SwapState.ROLLED_BACK: frozenset({None}),
    SwapState.ABORTED: frozenset({None}),
}

_SWAP_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MAX_SUMMARY = 4096
_MAX_REASON = 200


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """The knobs of the deadman clock: [deadman], plus whether a build and data entries exist."""

    window: float
    extend_by: float
    hard_cap: float
    max_crashes: int
    health_failures: int
    health_interval: float
    has_health_check: bool
    auto_confirm_after: float
    has_build: bool
    has_data: bool
    max_step_attempts: int = 5
    retry_delay: float = 1.0
    retry_delay_max: float = 30.0

    def __post_init__(self) -> None:
        must_hold = {
            "window": self.window > 0,
            "extend_by": self.extend_by > 0,
            "hard_cap": self.hard_cap > 0,
            "max_crashes": self.max_crashes >= 1,
            "health_failures": self.health_failures >= 1,
            "health_interval": self.health_interval > 0 or not self.has_health_check,
            "auto_confirm_after": self.auto_confirm_after >= 0,
            "max_step_attempts": self.max_step_attempts >= 1,
            "retry_delay": self.retry_delay >= 0,
            "retry_delay_max": self.retry_delay_max >= self.retry_delay,
        }
        for name, ok in must_hold.items():
            if not ok:
                raise ValueError(f"Policy.{name} is out of range: {getattr(self, name)!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Swap:
    """The persisted record of one swap. `checkpoint` and `data` are opaque to the machine."""

    id: str
    state: SwapState
    step: Step | None
    summary: str
    reason: str | None
    created_at: Instant
    activated_at: Instant | None
    deadline: Instant | None
    hard_cap: Instant | None
    finished_at: Instant | None
    crashes: int = 0
    health_failures: int = 0
    ready_since: Instant | None = None  # ready and healthy since; the auto-confirm clock
    next_health_at: Instant | None = None
    attempts: int = 0  # failed attempts of the current step
    retry_at: Instant | None = None  # waiting to retry a failed step: nothing is in flight
    last_error: str | None = None
    snapshots_taken: bool = False
    checkpoint: Mapping[str, Any] = field(default_factory=dict)
    data: tuple[Mapping[str, Any], ...] = ()  # the snapshot records, as TakeSnapshots reported them
    auto: bool = False  # prepared by the drift guard, not by a request
    rollback_started_at: Instant | None = None
    host_ready: bool = False  # the new version said READY since it last (re)started

    def __post_init__(self) -> None:
        if self.step not in STEPS_ALLOWED[self.state]:
            raise ValueError(
                f"swap {self.id}: step {self.step} is impossible in state {self.state}"
            )

    def remaining_s(self, now: Instant) -> float | None:
        """Seconds left before the rollback is due; only a swap on probation has a clock running."""
        if self.state is not SwapState.PROBATION:
            return None
        due = _earliest([self.deadline, self.hard_cap])
        return None if due is None else max(0.0, round(due.seconds_until(now), 3))

    def view(self, now: Instant) -> dict[str, Any]:
        """The contract's public fields of a swap (status and GET /v1/swaps/{id})."""
        return {
            "id": self.id,
            "state": self.state.value,
            "summary": self.summary,
            "reason": self.reason,
            "created_at": _stamp(self.created_at),
            "activated_at": _stamp(self.activated_at),
            "deadline_at": _stamp(self.deadline),
            "hard_cap_at": _stamp(self.hard_cap),
            "finished_at": _stamp(self.finished_at),
            "remaining_s": self.remaining_s(now),
            "step": None if self.step is None else self.step.value,
            "crashes": self.crashes,
        }

    def to_json(self) -> dict[str, Any]:
        """Every field, JSON-able, for the store; `from_json` gives back an equal record."""
        out = {spec.name: getattr(self, spec.name) for spec in fields(self)}
        for name in _INSTANT_FIELDS:
            out[name] = None if out[name] is None else out[name].to_json()
        return out | {
            "state": self.state.value,
            "step": None if self.step is None else self.step.value,
            "checkpoint": dict(self.checkpoint),
            "data": [dict(record) for record in self.data],
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Swap:
        """Rebuild a stored record; keys of a newer swapguard are ignored, missing ones default."""
        known = {spec.name for spec in fields(cls)}
        kwargs = {name: value for name, value in record.items() if name in known}
        try:
            for name in _INSTANT_FIELDS & kwargs.keys():
                kwargs[name] = None if kwargs[name] is None else Instant.from_json(kwargs[name])
            kwargs["state"] = SwapState(kwargs["state"])
            kwargs["step"] = None if kwargs.get("step") is None else Step(kwargs["step"])
            kwargs["checkpoint"] = dict(kwargs.get("checkpoint", {}))
            kwargs["data"] = tuple(kwargs.get("data", ()))
            return cls(**kwargs)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed swap record {record.get('id')!r}: {exc!r}") from exc


# Annotations are strings here (PEP 563): "Instant" or "Instant | None".
_INSTANT_FIELDS = frozenset(spec.name for spec in fields(Swap) if spec.type.startswith("Instant"))


# --- events: past facts, each stamped with the moment the runtime saw it ------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    now: Instant

    def __post_init__(self) -> None:
        if not isinstance(self.now, Instant):
            raise TypeError(f"{type(self).__name__}.now must be an Instant, not {self.now!r}")
        self._validate()

    def _validate(self) -> None:
        """Subclasses check their own fields (zero-argument super() breaks in slotted classes)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Request(Event):
    """Asked of the swap (API, CLI, notify): a `Conflict` in a state that does not allow it."""

    verb: ClassVar[str] = "change"


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivateRequested(Request):
    verb: ClassVar[str] = "activate"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfirmRequested(Request):
    verb: ClassVar[str] = "confirm"


@dataclass(frozen=True, slots=True, kw_only=True)
class ExtendRequested(Request):
    verb: ClassVar[str] = "extend"


@dataclass(frozen=True, slots=True, kw_only=True)
class AbortRequested(Request):
    verb: ClassVar[str] = "abort"


@dataclass(frozen=True, slots=True, kw_only=True)
class RollbackRequested(Request):
    verb: ClassVar[str] = "roll back"
    reason: str = "requested"

    def _validate(self) -> None:
        # The reason reaches the old version's environment: bounded, no control characters.
        ok = isinstance(self.reason, str) and 0 < len(self.reason.strip()) <= _MAX_REASON
        if not ok or any(ord(char) < 32 or ord(char) == 127 for char in self.reason):
            raise BadRequest(
                f"reason must be 1-{_MAX_REASON} printable characters: {self.reason!r}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class StepDone(Event):
    step: Step
    result: Mapping[str, Any] | None = None  # SNAPSHOT: {"data": [record, ...]}

    def _validate(self) -> None:
        _check_step(self, self.step)
        if self.result is not None and not isinstance(self.result, Mapping):
            raise TypeError(f"StepDone.result must be a mapping or None, not {self.result!r}")
        records = (self.result or {}).get("data", [])
        if not isinstance(records, list | tuple) or not all(
            isinstance(r, Mapping) for r in records
        ):
            raise TypeError(f"StepDone.result['data'] must be a list of mappings: {records!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class StepFailed(Event):
    step: Step
    error: str

    def _validate(self) -> None:
        _check_step(self, self.step)
        if not isinstance(self.error, str):
            raise TypeError(f"StepFailed.error must be a string, not {self.error!r}")


def _check_step(event: Event, step: object) -> None:
    if not isinstance(step, Step):
        raise TypeError(f"{type(event).__name__}.step must be a Step, not {step!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class HostSpawned(Event): ...  # the new (or old) version's process was started


@dataclass(frozen=True, slots=True, kw_only=True)
class HostReady(Event): ...  # READY=1; idempotent, so it may be fed again with every heartbeat


@dataclass(frozen=True, slots=True, kw_only=True)
class HostCrashed(Event): ...  # an exit the runtime did not ask for


@dataclass(frozen=True, slots=True, kw_only=True)
class HostNotReady(Event): ...  # start_timeout passed without READY


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatLost(Event): ...  # no heartbeat within heartbeat_timeout


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthChecked(Event):
    ok: bool
    detail: str = ""

    def _validate(self) -> None:
        if not isinstance(self.ok, bool):
            raise TypeError(f"HealthChecked.ok must be a bool, not {self.ok!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick(Event): ...  # the timer fired, or a restarted runtime wants passed deadlines seen


# --- actions: orders for the runtime, each safe to perform twice ---------------------------------


@dataclass(frozen=True, slots=True)
class Action: ...


@dataclass(frozen=True, slots=True)
class StopHost(Action): ...  # the host's whole process tree; nothing if none runs


@dataclass(frozen=True, slots=True)
class TakeSnapshots(Action): ...  # every [[data]] entry; reply StepDone(SNAPSHOT, {"data": [...]})


@dataclass(frozen=True, slots=True)
class RunBuild(Action): ...  # [code].build in the code root; CancelJobs kills it


@dataclass(frozen=True, slots=True)
class StartHost(Action):
    """Start the host with `env` added; if one already runs (adopted), just report HostSpawned."""

    env: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class RestoreCode(Action): ...  # the code tree back to the swap's checkpoint


@dataclass(frozen=True, slots=True)
class RestoreData(Action): ...  # every data entry back from the swap's snapshots


@dataclass(frozen=True, slots=True)
class RunHealthCheck(Action): ...  # [deadman].health_check once; reply HealthChecked


@dataclass(frozen=True, slots=True)
class CancelJobs(Action): ...  # kill a build or health check in flight: the swap moved on


@dataclass(frozen=True, slots=True)
class Emit(Action):
    """Append an audit event (the hooks that match it run)."""

    event: str
    detail: Mapping[str, Any]


Outcome = tuple[Swap, list[Action]]


# --- time --------------------------------------------------------------------------------------


def _reached(moment: Instant | None, now: Instant) -> bool:
    return moment is not None and moment.seconds_until(now) <= 0


def _earliest(moments: Iterable[Instant | None]) -> Instant | None:
    best: Instant | None = None
    for moment in moments:
        if moment is not None and (best is None or moment.seconds_until(best) < 0):
            best = moment
    return best


def _stamp(moment: Instant | None) -> str | None:
    return None if moment is None else rfc3339(moment.wall)


def _expired(swap: Swap, now: Instant) -> bool:
    return _reached(swap.deadline, now) or _reached(swap.hard_cap, now)


def _auto_confirm_at(swap: Swap, policy: Policy) -> Instant | None:
    if policy.auto_confirm_after <= 0 or swap.ready_since is None:
        return None
    return swap.ready_since.plus(policy.auto_confirm_after)


# --- steps -------------------------------------------------------------------------------------

_STEP_ACTION: Mapping[Step, Callable[[Swap], Action]] = {
    Step.STOP_OLD: lambda swap: StopHost(),
    Step.SNAPSHOT: lambda swap: TakeSnapshots(),
    Step.BUILD_NEW: lambda swap: RunBuild(),
    Step.SPAWN_NEW: lambda swap: StartHost(
        env={"SWAPGUARD_SWAP_ID": swap.id, "SWAPGUARD_DEADLINE": str(_stamp(swap.deadline))}
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
    if step_ is Step.SPAWN_NEW and swap.deadline is None:
        swap = replace(swap, deadline=_earliest([now.plus(policy.window), swap.hard_cap]))
    return swap, [_STEP_ACTION[step_](swap)]


def _step_failed_retry(swap: Swap, event: StepFailed, policy: Policy) -> Outcome:
    """A failed rollback or abort step: retry with backoff, then give up to the operator."""
    attempts = swap.attempts + 1
    swap = replace(swap, attempts=attempts, last_error=event.error, retry_at=None)
    detail = {"step": event.step.value, "error": event.error, "attempt": attempts}
    if attempts < policy.max_step_attempts:
        delay = min(policy.retry_delay * 2 ** (attempts - 1), policy.retry_delay_max)
        swap = replace(swap, retry_at=event.now.plus(delay))
        return swap, [Emit("swap.step_failed", {**detail, "retry_in_s": delay})]
    if swap.state is SwapState.PREPARED:  # the abort gives up: still prepared, may be asked again
        return replace(swap, step=None, attempts=0), [Emit("swap.abort_failed", detail)]
    detail["reason"] = swap.reason
    return replace(swap, state=SwapState.FAILED), [Emit("rollback.failed", detail)]


def _retry_due(swap: Swap, event: Tick, policy: Policy) -> Outcome:
    if swap.step is None or not _reached(swap.retry_at, event.now):
        return swap, []
    swap = replace(swap, retry_at=None)
    return swap, [_STEP_ACTION[swap.step](swap)]


# --- handlers: one per (state, event type) -----------------------------------------------------


def _conflict(swap: Swap, request: Request, why: str) -> Conflict:
    return Conflict(f"cannot {request.verb} swap {swap.id}: {why}")


def _require_running(swap: Swap, request: Request) -> None:
    """Confirm and extend need the new version on probation with its clock not yet run out."""
    if swap.step is not None:
        raise _conflict(swap, request, f"the new version is not running yet (step {swap.step})")
    if _expired(swap, request.now):
        due = _stamp(_earliest([swap.deadline, swap.hard_cap]))
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
    return swap, [Emit("swap.activated", {"hard_cap_at": _stamp(hard_cap)}), StopHost()]


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
    detail = {"deadline_at": _stamp(swap.deadline), "hard_cap_at": _stamp(swap.hard_cap)}
    return swap, [Emit("swap.probation", detail)]


def _probation_step_done(swap: Swap, event: StepDone, policy: Policy) -> Outcome:
    if event.step is Step.SPAWN_NEW:  # the same fact as HostSpawned
        return _new_version_running(swap, event.now, policy)
    if event.step is Step.SNAPSHOT:
        records = tuple((event.result or {}).get("data", ()))
        swap = replace(swap, snapshots_taken=True, data=records)
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
    return _confirm(swap, event.now, "request")


def _extend_requested(swap: Swap, event: ExtendRequested, policy: Policy) -> Outcome:
    _require_running(swap, event)
    assert swap.hard_cap is not None  # set on activation
    wanted = event.now.plus(policy.extend_by)
    capped = swap.hard_cap.seconds_until(wanted) < 0
    swap = replace(swap, deadline=swap.hard_cap if capped else wanted)
    detail = {"deadline_at": _stamp(swap.deadline), "capped": capped}
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
    assert swap.step is not None
    swap = replace(swap, state=SwapState.ROLLING_BACK, attempts=0, retry_at=None)
    detail = {"step": swap.step.value, "by": event.reason}
    return swap, [Emit("swap.rollback_retried", detail), _STEP_ACTION[swap.step](swap)]


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
    if not isinstance(id, str) or not _SWAP_ID.fullmatch(id):
        raise BadRequest(f"swap id must be 1-64 of [A-Za-z0-9._-], not {id!r}")
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
    """After a supervisor restart: order the step in flight again, nothing else.

    SPAWN_NEW keeps its original deadline; the runtime feeds a Tick next so that deadlines that
    passed while no supervisor ran fire at once.
    """
    in_flight = swap.state in (SwapState.PREPARED, SwapState.PROBATION, SwapState.ROLLING_BACK)
    if not in_flight or swap.step is None:
        return swap, []
    swap = replace(swap, retry_at=None)
    return swap, [_STEP_ACTION[swap.step](swap)]


def next_wakeup(swap: Swap, policy: Policy) -> Instant | None:
    """When the runtime's single timer should feed the next Tick; None if nothing is timed."""
    if swap.state in TERMINAL or swap.state is SwapState.FAILED:
        return None
    moments = [swap.retry_at]
    if swap.state is SwapState.PROBATION:
        moments += [swap.deadline, swap.hard_cap]
        if swap.step is None:
            moments.append(_auto_confirm_at(swap, policy))
            if policy.has_health_check:
                moments.append(swap.next_health_at)
    return _earliest(moments)


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
