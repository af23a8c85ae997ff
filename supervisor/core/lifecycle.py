"""The host's lifecycle as a pure machine: start, readiness, heartbeats, stop, restart with backoff.

Theory of operation
-------------------
The runtime feeds events (`Spawned`, `Ready`, `Exited`, `Tick`, operator requests...) together with
the boot-clock time; `step()` returns the new `Host` record and a list of actions (`Spawn`,
`SignalStop`, `KillTree`, `Emit`). The machine never reads a clock, never touches a process and
never sleeps: the runtime arms one timer for `next_wakeup()` and feeds a `Tick` when it fires.

Rules:
1. Everything that decides a transition lives in this file; the swap machine (`swaps.py`) learns
   about the host only through the facts of the `Emit` actions this machine returns (typed:
   `Fact.EXITED`, `Fact.START_TIMEOUT`, ...), which `core.supervision` turns into swap events.
2. An intentional stop or restart is never a failure: it moves no backoff and counts no crash.
3. A failure (exit before ready, exit sooner than `min_uptime`, non-zero exit, death by signal,
   start timeout, lost heartbeat) grows the backoff; `restart_reset_after` of readiness forgets
   them.
4. Nothing gives up silently: a host that keeps failing stays in `backoff` (event `host.crash_loop`)
   and is retried at `restart_delay_max` for ever, unless `restart = "no"`.
5. A host adopted before its READY=1 was seen (it went to a supervisor that died) is ready at its
   first heartbeat: READY=1 is sent once, and waiting for it again would fail a ready host.
6. `started_at` is the process's own start (an adopted host's too): its uptime, and what an exit
   is measured against; `spawned_at` is when this supervisor began to watch it, which start
   timeouts run from.
7. `last_heartbeat` is a heartbeat the host sent, nothing else (READY=1, an adoption or a start
   are not heartbeats): `heartbeat_timeout` runs from the last heartbeat, or from readiness while
   none came yet.
8. Every exit says why it happened (`LastExit.reason`): the reason a stop was begun for, or, for
   an exit nobody asked for, a crash or a clean exit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from supervisor.core.backoff import Backoff

CRASH_LOOP_FAILURES = 5
"""Consecutive failures after which the host is reported as crash-looping."""


class HostState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    BACKOFF = "backoff"


class Fact(StrEnum):
    """What `Emit` reports: an audit event's kind, and for the swap machine a typed fact."""

    STARTED = "host.started"
    ADOPTED = "host.adopted"
    READY = "host.ready"
    EXITED = "host.exited"  # an exit nobody asked for
    STOPPED = "host.stopped"  # an exit after a stop order
    SPAWN_FAILED = "host.spawn_failed"
    START_TIMEOUT = "host.start_timeout"
    HEARTBEAT_LOST = "host.heartbeat_lost"
    UNHEALTHY = "host.unhealthy"  # the liveness check failed health_failures times in a row
    STOP_TIMEOUT = "host.stop_timeout"
    BACKOFF = "host.backoff"
    BACKOFF_RESET = "host.backoff_reset"
    CRASH_LOOP = "host.crash_loop"


class StopPurpose(StrEnum):
    """What follows once a stopping host is gone."""

    HALT = "halt"  # stay stopped (operator stop, a swap step)
    RESTART = "restart"  # intentional restart: spawn again at once, no failure counted
    RECOVER = "recover"  # the host failed (start timeout, lost heartbeat): restart after backoff


class ExitReason(StrEnum):
    """Why the host's process ended (rule 8); shown with the last exit, kept with the run."""

    STOP = "stop"  # a stop order: an operator's, a swap step's, swapguard's own shutdown
    RESTART = "restart"  # an intentional restart
    HEARTBEAT_LOST = "heartbeat_lost"  # no heartbeat within heartbeat_timeout, or WATCHDOG=trigger
    START_TIMEOUT = "start_timeout"  # not ready within start_timeout
    UNHEALTHY = "unhealthy"  # the liveness check failed (deadman.health_always)
    CRASH = "crash"  # exited on its own: non-zero, by a signal, or before it was ready
    EXIT = "exit"  # exited on its own with status 0 after it was up
    SPAWN_FAILED = "spawn_failed"  # never ran: the command could not be started


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """The `[host]` settings the machine needs, in seconds; `backoff(n)`: delay after n failures."""

    ready_mode: str = "notify"
    start_timeout: float = 60.0
    min_uptime: float = 1.0
    heartbeat_timeout: float = 0.0
    stop_timeout: float = 10.0
    restart: str = "always"
    restart_reset_after: float = 60.0
    # without a config: the config's default restart_delay and restart_delay_max, no jitter
    backoff: Callable[[int], float] = field(default=Backoff(first=0.1, cap=30.0))


@dataclass(frozen=True, slots=True)
class LastExit:
    code: int | None
    signal: int | None
    at: float  # wall clock, for display
    reason: ExitReason | None  # None: not known (ended while no swapguard watched it)


@dataclass(frozen=True, slots=True, kw_only=True)
class Host:
    state: HostState = HostState.STOPPED
    wanted: bool = False  # should the host be up? (operator stop and restart = "no" clear it)
    pid: int | None = None
    spawned_at: float | None = None  # boot clock: spawned, or adopted (timeouts run from here)
    started_at: float | None = None  # boot clock: the process's own start (rule 6)
    ready_at: float | None = None
    last_heartbeat: float | None = None
    status_text: str | None = None
    stop_purpose: StopPurpose | None = None
    stop_reason: ExitReason | None = None  # why the stop in progress was begun (rule 8)
    kill_at: float | None = None  # when the stop escalates to SIGKILL of the whole tree
    failures: int = 0  # consecutive, for the backoff
    backoff_until: float | None = None
    restarts: int = 0
    last_exit: LastExit | None = None
    ready_unseen: bool = False  # adopted while starting: its READY=1 may have gone unseen

    @property
    def ready(self) -> bool:
        return self.state is HostState.RUNNING


# --- events (past facts); `now` is the boot clock, `wall` the wall clock for display -----------


@dataclass(frozen=True, slots=True, kw_only=True)
class StartRequested:
    now: float


@dataclass(frozen=True, slots=True, kw_only=True)
class StopRequested:
    now: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RestartRequested:
    now: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Spawned:
    now: float
    pid: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Adopted:
    """A host left running by a previous supervisor process: treat it as running and ready."""

    now: float
    pid: int
    ready: bool
    started: float | None = None  # boot clock: when the process itself started, if known


@dataclass(frozen=True, slots=True, kw_only=True)
class Recalled:
    """A restarted supervisor's record of how the host's last run ended (the store keeps it):
    shown as the last exit until the next one."""

    now: float
    last_exit: LastExit


@dataclass(frozen=True, slots=True, kw_only=True)
class SpawnFailed:
    now: float
    wall: float
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready:
    now: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    now: float
    status: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchdogTriggered:
    """WATCHDOG=trigger: the host says its own watchdog expired."""

    now: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Unhealthy:
    """The liveness check failed `failures` times in a row: restart the host (as heartbeat loss
    does). `core.supervision` decides when; `detail` says how the last check failed."""

    now: float
    failures: int
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Exited:
    now: float
    wall: float
    code: int | None
    signal: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick:
    now: float


Event = (
    StartRequested
    | StopRequested
    | RestartRequested
    | Spawned
    | Adopted
    | Recalled
    | SpawnFailed
    | Ready
    | Heartbeat
    | WatchdogTriggered
    | Unhealthy
    | Exited
    | Tick
)

# --- actions (orders) ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spawn:
    pass


@dataclass(frozen=True, slots=True)
class SignalStop:
    """Send `stop_signal` to the host's tree."""


@dataclass(frozen=True, slots=True)
class KillTree:
    """SIGKILL every process left in the host's tree (after a stop timeout, or left by an exit)."""


@dataclass(frozen=True, slots=True)
class Emit:
    event: Fact
    detail: dict[str, Any] = field(default_factory=dict)


Action = Spawn | SignalStop | KillTree | Emit
Result = tuple[Host, list[Action]]

# --- transitions -----------------------------------------------------------------------------


def _spawn(host: Host) -> Result:
    # No pid and no spawn time until Spawned: the spawn may be deferred (an activation), and a
    # start timeout must not run from the previous process's spawn time.
    starting = replace(
        host, state=HostState.STARTING, backoff_until=None, kill_at=None, ready_unseen=False,
        pid=None, spawned_at=None, started_at=None, stop_reason=None,
    )
    return starting, [Spawn()]


def _begin_stop(
    host: Host, now: float, purpose: StopPurpose, reason: ExitReason, policy: Policy
) -> Result:
    stopping = replace(
        host, state=HostState.STOPPING, stop_purpose=purpose, stop_reason=reason,
        kill_at=now + policy.stop_timeout,
    )  # fmt: skip
    return stopping, [SignalStop()]


def _on_start(host: Host, event: StartRequested, policy: Policy) -> Result:
    host = replace(host, wanted=True)
    if host.state in (HostState.STOPPED, HostState.BACKOFF):
        return _spawn(host)
    if host.state is HostState.STOPPING:
        return replace(host, stop_purpose=StopPurpose.RESTART), []
    return host, []


def _on_stop(host: Host, event: StopRequested, policy: Policy) -> Result:
    host = replace(host, wanted=False)
    if host.state in (HostState.STARTING, HostState.RUNNING) and host.pid is not None:
        return _begin_stop(host, event.now, StopPurpose.HALT, ExitReason.STOP, policy)
    if host.state is HostState.STOPPING:
        return replace(host, stop_purpose=StopPurpose.HALT), []
    return replace(host, state=HostState.STOPPED, backoff_until=None), []


def _on_restart(host: Host, event: RestartRequested, policy: Policy) -> Result:
    host = replace(host, wanted=True)
    if host.state is HostState.STARTING and host.pid is None:
        return host, []  # a spawn is already on its way
    if host.state in (HostState.STARTING, HostState.RUNNING):
        return _begin_stop(host, event.now, StopPurpose.RESTART, ExitReason.RESTART, policy)
    if host.state is HostState.STOPPING:
        return replace(host, stop_purpose=StopPurpose.RESTART), []
    return _spawn(host)


def _on_spawned(host: Host, event: Spawned, policy: Policy) -> Result:
    if host.state is not HostState.STARTING:
        return host, []
    return replace(
        host, pid=event.pid, spawned_at=event.now, started_at=event.now, ready_at=None,
        last_heartbeat=None, status_text=None,
    ), [Emit(Fact.STARTED, {"pid": event.pid})]


def _on_adopted(host: Host, event: Adopted, policy: Policy) -> Result:
    state = HostState.RUNNING if event.ready else HostState.STARTING
    adopted = replace(
        host, state=state, wanted=True, pid=event.pid, spawned_at=event.now,
        started_at=min(event.started, event.now) if event.started is not None else event.now,
        ready_at=event.now if event.ready else None, last_heartbeat=None,
        ready_unseen=not event.ready,
    )
    return adopted, [Emit(Fact.ADOPTED, {"pid": event.pid})]


def _on_recalled(host: Host, event: Recalled, policy: Policy) -> Result:
    if host.last_exit is not None:
        return host, []  # an exit seen by this supervisor is newer
    return replace(host, last_exit=event.last_exit), []


def _on_ready(host: Host, event: Ready, policy: Policy) -> Result:
    if host.state is not HostState.STARTING or host.pid is None:
        return host, []
    ready = replace(host, state=HostState.RUNNING, ready_at=event.now, ready_unseen=False)
    return ready, [Emit(Fact.READY, {"pid": host.pid})]


def _on_heartbeat(host: Host, event: Heartbeat, policy: Policy) -> Result:
    if host.state not in (HostState.STARTING, HostState.RUNNING):
        return host, []
    status = event.status if event.status is not None else host.status_text
    host = replace(host, last_heartbeat=event.now, status_text=status)
    if host.state is HostState.STARTING and host.ready_unseen:  # rule 5
        return _on_ready(host, Ready(now=event.now), policy)
    return host, []


def _heartbeat_lost(host: Host, now: float, policy: Policy, detail: dict[str, Any]) -> Result:
    reason = ExitReason.HEARTBEAT_LOST
    stopping, actions = _begin_stop(host, now, StopPurpose.RECOVER, reason, policy)
    return stopping, [Emit(Fact.HEARTBEAT_LOST, {"pid": host.pid, **detail}), *actions]


def _on_watchdog_trigger(host: Host, event: WatchdogTriggered, policy: Policy) -> Result:
    if host.state not in (HostState.STARTING, HostState.RUNNING) or host.pid is None:
        return host, []
    return _heartbeat_lost(host, event.now, policy, {"trigger": True})


def _on_unhealthy(host: Host, event: Unhealthy, policy: Policy) -> Result:
    if host.state is not HostState.RUNNING or host.pid is None:
        return host, []  # stopping or restarting already: that run is over
    reason = ExitReason.UNHEALTHY
    stopping, actions = _begin_stop(host, event.now, StopPurpose.RECOVER, reason, policy)
    detail = {"pid": host.pid, "failures": event.failures, "detail": event.detail}
    return stopping, [Emit(Fact.UNHEALTHY, detail), *actions]


def _failure(
    host: Host, now: float, policy: Policy, detail: dict[str, Any], *, at_once: bool = True
) -> Result:
    """Count a failure and either restart at once, back off, or stay down (restart = "no").
    `at_once=False`: even a zero delay goes through backoff, so a spawn that keeps failing
    (nothing to exec) waits for the next turn of the loop instead of retrying within this one."""
    failures = host.failures + 1
    actions: list[Action] = []
    if failures == CRASH_LOOP_FAILURES:
        actions.append(Emit(Fact.CRASH_LOOP, {"failures": failures, **detail}))
    host = replace(host, failures=failures, pid=None)
    if policy.restart == "no" or not host.wanted:
        return replace(host, state=HostState.STOPPED, wanted=False), actions
    delay = max(policy.backoff(failures), 0.0)
    if delay <= 0 and at_once:
        host, spawn = _spawn(replace(host, restarts=host.restarts + 1))
        return host, actions + spawn
    backoff = replace(host, state=HostState.BACKOFF, backoff_until=now + delay)
    actions.append(Emit(Fact.BACKOFF, {"delay_s": round(delay, 3), "failures": failures}))
    return backoff, actions


def _on_exited(host: Host, event: Exited, policy: Policy) -> Result:
    if host.pid is None:
        return host, []
    uptime = event.now - (host.started_at if host.started_at is not None else event.now)
    failed = (
        event.signal is not None
        or event.code not in (0, None)
        or host.state is HostState.STARTING
        or uptime < policy.min_uptime
    )
    if host.state is HostState.STOPPING and host.stop_reason is not None:
        reason = host.stop_reason
    else:
        reason = ExitReason.CRASH if failed else ExitReason.EXIT
    last = LastExit(event.code, event.signal, event.wall, reason)
    exit_detail = {
        "pid": host.pid, "code": event.code, "signal": event.signal, "reason": reason.value
    }  # fmt: skip
    host = replace(host, last_exit=last, kill_at=None, stop_reason=None)
    # Whatever else of the tree is left goes with its main process (systemd's control-group mode).
    actions: list[Action] = [KillTree()]
    if host.state is HostState.STOPPING:
        purpose = host.stop_purpose
        host = replace(host, state=HostState.STOPPED, pid=None, stop_purpose=None)
        actions.append(Emit(Fact.STOPPED, exit_detail))
        if purpose is StopPurpose.RESTART and host.wanted:
            host, spawn = _spawn(replace(host, restarts=host.restarts + 1))
            return host, actions + spawn
        if purpose is StopPurpose.RECOVER:
            host, more = _failure(host, event.now, policy, exit_detail)
            return host, actions + more
        return host, actions
    actions.append(Emit(Fact.EXITED, exit_detail))
    if failed:
        host, more = _failure(host, event.now, policy, exit_detail)
        return host, actions + more
    host = replace(host, pid=None)
    if policy.restart == "always" and host.wanted:
        host, spawn = _spawn(replace(host, restarts=host.restarts + 1))
        return host, actions + spawn
    return replace(host, state=HostState.STOPPED, wanted=False), actions


def _on_spawn_failed(host: Host, event: SpawnFailed, policy: Policy) -> Result:
    if host.state is not HostState.STARTING:
        return host, []
    host = replace(host, last_exit=LastExit(127, None, event.wall, ExitReason.SPAWN_FAILED))
    detail = {"error": event.error}
    host, more = _failure(host, event.now, policy, detail, at_once=False)
    return host, [Emit(Fact.SPAWN_FAILED, detail), *more]


def _on_tick(host: Host, event: Tick, policy: Policy) -> Result:
    now = event.now
    if host.state is HostState.STOPPING and host.kill_at is not None and now >= host.kill_at:
        timed_out = Emit(Fact.STOP_TIMEOUT, {"pid": host.pid})
        return replace(host, kill_at=None), [KillTree(), timed_out]
    if (
        host.state is HostState.BACKOFF
        and host.backoff_until is not None
        and now >= host.backoff_until
    ):
        return _spawn(replace(host, restarts=host.restarts + 1))
    if host.state is HostState.STARTING and host.spawned_at is not None:
        if policy.ready_mode == "started" and now >= host.spawned_at + policy.min_uptime:
            return _on_ready(host, Ready(now=now), policy)
        if policy.ready_mode == "notify" and now >= host.spawned_at + policy.start_timeout:
            reason = ExitReason.START_TIMEOUT
            stopping, actions = _begin_stop(host, now, StopPurpose.RECOVER, reason, policy)
            return stopping, [Emit(Fact.START_TIMEOUT, {"pid": host.pid}), *actions]
    if host.state is HostState.RUNNING:
        silent_since = _silent_since(host)
        if (
            policy.heartbeat_timeout > 0
            and silent_since is not None
            and now >= silent_since + policy.heartbeat_timeout
        ):
            age = round(now - silent_since, 3)
            return _heartbeat_lost(host, now, policy, {"age_s": age})
        if (
            host.failures
            and host.ready_at is not None
            and now >= host.ready_at + policy.restart_reset_after
        ):
            return replace(host, failures=0), [Emit(Fact.BACKOFF_RESET, {})]
    return host, []


def _silent_since(host: Host) -> float | None:
    """What `heartbeat_timeout` runs from (rule 7): the last heartbeat, else readiness."""
    return host.last_heartbeat if host.last_heartbeat is not None else host.ready_at


# Each handler takes its own event type: Any, since a Callable's parameter can't follow the key.
_HANDLERS: dict[type[Event], Callable[[Host, Any, Policy], Result]] = {
    StartRequested: _on_start,
    StopRequested: _on_stop,
    RestartRequested: _on_restart,
    Spawned: _on_spawned,
    Adopted: _on_adopted,
    Recalled: _on_recalled,
    SpawnFailed: _on_spawn_failed,
    Ready: _on_ready,
    Heartbeat: _on_heartbeat,
    WatchdogTriggered: _on_watchdog_trigger,
    Unhealthy: _on_unhealthy,
    Exited: _on_exited,
    Tick: _on_tick,
}


def step(host: Host, event: Event, policy: Policy) -> Result:
    """Apply one event: the new record and the actions the runtime must perform, in order."""
    return _HANDLERS[type(event)](host, event, policy)


def next_wakeup(host: Host, policy: Policy) -> float | None:
    """The earliest boot-clock moment at which a `Tick` could change something."""
    moments: list[float] = []
    if host.state is HostState.STOPPING and host.kill_at is not None:
        moments.append(host.kill_at)
    if host.state is HostState.BACKOFF and host.backoff_until is not None:
        moments.append(host.backoff_until)
    if host.state is HostState.STARTING and host.spawned_at is not None:
        limit = policy.min_uptime if policy.ready_mode == "started" else policy.start_timeout
        moments.append(host.spawned_at + limit)
    if host.state is HostState.RUNNING:
        silent_since = _silent_since(host)
        if policy.heartbeat_timeout > 0 and silent_since is not None:
            moments.append(silent_since + policy.heartbeat_timeout)
        if host.failures and host.ready_at is not None:
            moments.append(host.ready_at + policy.restart_reset_after)
    return min(moments) if moments else None
