"""The combined machine's vocabulary: its record, policy, events and actions.

Frozen data only; nothing here decides anything (that is `core.supervision`, whose rules apply
and which re-exports every name here). Events are past facts stamped with the moment the runtime
saw them; actions are orders for the runtime, each safe to perform twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from supervisor.core import lifecycle, swaps
from supervisor.core.instant import Instant


@dataclass(frozen=True, slots=True)
class Policy:
    host: lifecycle.Policy
    swap: swaps.Policy
    # deadman.health_always: the health check also runs outside probation, as a liveness probe,
    # at the swap policy's health_interval; health_failures in a row restart the host
    health_always: bool = False


@dataclass(frozen=True, slots=True)
class Liveness:
    """The liveness check's schedule (boot clock) while it runs: the host is ready and no swap's
    new version is on probation (that one's check is the swap machine's)."""

    next_at: float | None = None  # None: not scheduled (not running now)
    failures: int = 0  # in a row
    in_flight: bool = False  # a check runs: no second one; only its result counts


@dataclass(frozen=True, slots=True)
class CodeCheck:
    """An activation check in flight: does the tree differ from the prepared swap's checkpoint?"""

    swap_id: str
    spawn: bool  # a host start waits for the answer (unchanged code: start the old version)


@dataclass(frozen=True, slots=True, kw_only=True)
class Supervision:
    """The whole supervised state; the runtime replaces it whole (readers on other threads see
    one consistent record)."""

    host: lifecycle.Host = field(default_factory=lifecycle.Host)
    swap: swaps.Swap | None = None
    env: Mapping[str, str] = field(default_factory=dict)  # added to the next spawn's environment
    env_one_shot: bool = False  # the rolled-back variables: cleared by the next spawn
    check: CodeCheck | None = None
    confirm_waiting: str | None = None  # the swap whose confirm waits for its data on disk
    liveness: Liveness = field(default_factory=Liveness)
    checks_ordered: int = 0  # liveness checks ordered so far: each one's number tags it
    kills: int = 0  # tree kills ordered and not yet reported `TreeGone`
    spawn_held: bool = False  # a spawn waits for those kills: never two hosts' trees at once


def loaded(swap: swaps.Swap | None) -> Supervision:
    """A restarted runtime's record before anything happened: the swap the store had in flight."""
    return Supervision(swap=swap)


# --- events: past facts, each with the moment the runtime saw it -------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class HostInput:
    """A lifecycle event (a request, a fact about the process, a heartbeat); `now` stamps what it
    means for the swap, `event.now` is the same moment on the boot clock."""

    now: Instant
    event: lifecycle.Event


@dataclass(frozen=True, slots=True, kw_only=True)
class HostRequested:
    """An operator's start, stop or restart: refused while a swap step drives the host."""

    now: Instant
    event: lifecycle.StartRequested | lifecycle.StopRequested | lifecycle.RestartRequested


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick:
    """The timer fired: both machines see the time, the swap's deadlines first."""

    now: Instant


@dataclass(frozen=True, slots=True, kw_only=True)
class Resumed:
    """A restarted runtime adopted the live host (or found none) and took the code baseline: the
    swap in flight goes on from its step, and the host starts unless a swap step drives it."""

    now: Instant
    adopted: bool
    # how the host's last recorded run ended, if the store has one (shown as its last exit);
    # part of this event, never one of its own: alone, it would let a swap's stop step be taken
    # as done before the live host is adopted
    recalled: lifecycle.Recalled | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PrepareRequested:
    now: Instant
    swap_id: str
    summary: str
    checkpoint: Mapping[str, Any]
    auto: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class CodeChecked:
    """The answer to `CheckCodeChanged`; a check that failed counts as changed (guarded)."""

    now: Instant
    swap_id: str
    changed: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkReported:
    """The outcome of work ordered for swap `swap_id`: a step, the data sync, a health check;
    `swap_id` None: the liveness check's (`RunHealthCheck(None)`)."""

    swap_id: str | None
    event: swaps.StepDone | swaps.StepFailed | swaps.DataSynced | swaps.HealthChecked
    check: int = 0  # a liveness check's number (`RunHealthCheck.check`), echoed


@dataclass(frozen=True, slots=True, kw_only=True)
class TreeGone:
    """A `KillTree` ended: nothing is left of the host's tree (or what survived SIGKILL past the
    kill's bound was logged); `killed` processes were SIGKILLed on the way."""

    now: Instant
    killed: int = 0


Event = (
    HostInput
    | HostRequested
    | Tick
    | Resumed
    | PrepareRequested
    | CodeChecked
    | WorkReported
    | TreeGone
    | swaps.Request
)


# --- actions: orders for the runtime -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spawn:
    """Start the host with `env` added; report back `lifecycle.Spawned` or `SpawnFailed`.
    `swap_id`: the swap whose new version this is, recorded with the run."""

    env: Mapping[str, str]
    swap_id: str | None


@dataclass(frozen=True, slots=True)
class SignalStop:
    """`stop_signal` to the host's tree."""


@dataclass(frozen=True, slots=True)
class KillTree:
    """SIGKILL what is left of the host's tree; `process_too`: its main process is still ours.
    Report back `TreeGone` once nothing is left: the signals go at once, the wait for the exits
    never holds the loop."""

    process_too: bool


@dataclass(frozen=True, slots=True)
class Emit:
    """An audit event about the host."""

    event: str
    detail: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class RecordExitReason:
    """The host's run ended: keep why with it (`lifecycle.ExitReason`)."""

    reason: str


@dataclass(frozen=True, slots=True)
class RecordReady:
    """The host's run became ready: a restarted supervisor adopts it as ready."""


@dataclass(frozen=True, slots=True)
class CheckCodeChanged:
    """Does the code tree differ from `checkpoint`? Report back `CodeChecked`."""

    swap_id: str
    checkpoint: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class PersistSwap:
    """Save the record and its audit events in one transaction, before the orders that follow."""

    swap: swaps.Swap
    events: tuple[tuple[str, Mapping[str, Any]], ...]


@dataclass(frozen=True, slots=True)
class SaveChanges:
    """Keep the list of changed files of the swap (the old version is stopping)."""

    swap: swaps.Swap


@dataclass(frozen=True, slots=True)
class VerifySnapshots:
    """The new version runs: check the snapshots' integrity in the background, report an event."""

    swap: swaps.Swap


@dataclass(frozen=True, slots=True)
class TakeSnapshots:
    swap: swaps.Swap  # report WorkReported(StepDone(SNAPSHOT, {"data": ..., "unsynced": ...}))


@dataclass(frozen=True, slots=True)
class RunBuild:
    swap: swaps.Swap  # its step says which build (BUILD_NEW, BUILD_OLD)


@dataclass(frozen=True, slots=True)
class RestoreCode:
    swap: swaps.Swap


@dataclass(frozen=True, slots=True)
class RestoreData:
    swap: swaps.Swap


@dataclass(frozen=True, slots=True)
class SyncData:
    swap: swaps.Swap  # report WorkReported(DataSynced)


@dataclass(frozen=True, slots=True)
class RunHealthCheck:
    """`check`: the liveness check's number, echoed in its report: a result that comes back
    after its run of the host ended (and the next run's check began) is not that run's."""

    swap_id: str | None  # report WorkReported(HealthChecked); None: the liveness check
    check: int = 0


@dataclass(frozen=True, slots=True)
class CancelJobs:
    """Kill a build or health check in flight: the swap moved on."""


@dataclass(frozen=True, slots=True)
class SwapFinished:
    """The swap ended (confirmed, rolled back, aborted): count it, settle its files."""

    swap: swaps.Swap


@dataclass(frozen=True, slots=True)
class AnswerConfirm:
    """A confirm that waited for the data is answered: `error` None if it took."""

    swap_id: str
    error: str | None


Action = (
    Spawn
    | SignalStop
    | KillTree
    | Emit
    | RecordReady
    | RecordExitReason
    | CheckCodeChanged
    | PersistSwap
    | SaveChanges
    | VerifySnapshots
    | TakeSnapshots
    | RunBuild
    | RestoreCode
    | RestoreData
    | SyncData
    | RunHealthCheck
    | CancelJobs
    | SwapFinished
    | AnswerConfirm
)
Outcome = tuple[Supervision, list[Action]]
