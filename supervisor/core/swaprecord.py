"""The swap machine's vocabulary: states, steps, the policy, the swap record, events and actions.

Everything here is frozen data that validates itself; nothing here decides a transition (that is
`core.swaps`, whose rules apply). The record is what the store persists (`Swap.to_json`), and
what status and the API show (`Swap.view`). Events are past facts stamped with the moment the
runtime saw them; actions are orders for the runtime, each safe to perform twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar

from supervisor.core.instant import Instant, rfc3339
from supervisor.errors import BadRequest

# --- states, steps, the policy and the record ----------------------------------------------------


class SwapState(StrEnum):
    PREPARED = "prepared"
    PROBATION = "probation"
    ROLLING_BACK = "rolling_back"
    CONFIRMED = "confirmed"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"
    FAILED = "failed"  # not terminal: waits for the operator, who retries with a rollback request


TERMINAL = frozenset({SwapState.CONFIRMED, SwapState.ROLLED_BACK, SwapState.ABORTED})
"""Finished: nothing happens to the swap again, and the next one may be prepared. The one list of
these (the store, the metrics and the demo take theirs from here)."""
AT_REST = TERMINAL | {SwapState.FAILED}
"""Nothing happens to the swap unless someone asks: no step is ordered, no clock runs."""


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
    snapshots_taken: bool = False  # a take began: a rollback restores the data
    checkpoint: Mapping[str, Any] = field(default_factory=dict)
    data: tuple[Mapping[str, Any], ...] = ()  # the snapshot records, as TakeSnapshots reported them
    auto: bool = False  # prepared by the drift guard, not by a request
    rollback_started_at: Instant | None = None
    host_ready: bool = False  # the new version said READY since it last (re)started
    # The new version works on copies of the data that may still be only in the page cache (the
    # snapshots are the original files): nothing may confirm it until SyncData reports them on disk.
    data_unsynced: bool = False

    def __post_init__(self) -> None:
        if self.step not in STEPS_ALLOWED[self.state]:
            raise ValueError(
                f"swap {self.id}: step {self.step} is impossible in state {self.state}"
            )

    def remaining_s(self, now: Instant) -> float | None:
        """Seconds left before the rollback is due; only a swap on probation has a clock running."""
        if self.state is not SwapState.PROBATION:
            return None
        due = earliest([self.deadline, self.hard_cap])
        return None if due is None else max(0.0, round(due.seconds_until(now), 3))

    def view(self, now: Instant) -> dict[str, Any]:
        """The contract's public fields of a swap (status and GET /v1/swaps/{id})."""
        return {
            "id": self.id,
            "state": self.state.value,
            "summary": self.summary,
            "reason": self.reason,
            "created_at": stamp(self.created_at),
            "activated_at": stamp(self.activated_at),
            "deadline_at": stamp(self.deadline),
            "hard_cap_at": stamp(self.hard_cap),
            "finished_at": stamp(self.finished_at),
            "remaining_s": self.remaining_s(now),
            "step": None if self.step is None else self.step.value,
            "crashes": self.crashes,
            "data_on_disk": not self.data_unsynced,  # false: a confirm waits for the flush
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
    """`by`: the seconds asked for (a host's EXTEND_TIMEOUT_USEC); None asks for `extend_by`,
    which also bounds what may be asked."""

    verb: ClassVar[str] = "extend"
    by: float | None = None


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
    result: Mapping[str, Any] | None = None  # SNAPSHOT: {"data": [record, ...], "unsynced": bool}

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
class DataSynced(Event):
    """SyncData finished: the new version's copies of the data are on disk, or `error` says
    why not."""

    error: str | None = None

    def _validate(self) -> None:
        if self.error is not None and not isinstance(self.error, str):
            raise TypeError(f"DataSynced.error must be a string or None, not {self.error!r}")


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
class SyncData(Action): ...  # fsync the new version's copies of the data; reply DataSynced


@dataclass(frozen=True, slots=True)
class RunHealthCheck(Action): ...  # [deadman].health_check once; reply HealthChecked


@dataclass(frozen=True, slots=True)
class CancelJobs(Action): ...  # kill a build or health check in flight: the swap moved on


@dataclass(frozen=True, slots=True)
class Emit(Action):
    """Append an audit event (the hooks that match it run)."""

    event: str
    detail: Mapping[str, Any]


# --- time, as the record shows it ------------------------------------------------------------


def earliest(moments: Iterable[Instant | None]) -> Instant | None:
    """The soonest of the given moments (None ones skipped); None if there is none."""
    best: Instant | None = None
    for moment in moments:
        if moment is not None and (best is None or moment.seconds_until(best) < 0):
            best = moment
    return best


def stamp(moment: Instant | None) -> str | None:
    """RFC 3339 wall-clock text of a moment, as the API shows it; None stays None."""
    return None if moment is None else rfc3339(moment.wall)
