"""The swap machine, driven directly: events in, records and actions out; the clock is a value."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from supervisor.clock import Instant, rfc3339
from supervisor.core import swaps
from supervisor.core.instant import wall_of
from supervisor.core.swaps import (
    TERMINAL,
    TRANSITIONS,
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
    mermaid,
    new_swap,
    next_wakeup,
    resume,
    step,
)
from supervisor.errors import BadRequest, Conflict

S = SwapState
T0 = Instant(wall=1_800_000_000.0, boot=500.0, boot_id="boot-a")
ACTIVATED = 10.0  # every staged swap is activated at T0 + 10 s; its chain takes no time
RECORD = {"path": "data/app.db", "bytes": 4096, "sha256": "ab" * 32}


def at(seconds: float) -> Instant:
    return T0.plus(seconds)


def policy(**overrides: Any) -> Policy:
    knobs: dict[str, Any] = {
        "window": 60.0,
        "extend_by": 30.0,
        "hard_cap": 300.0,
        "max_crashes": 2,
        "health_failures": 3,
        "health_interval": 10.0,
        "has_health_check": True,
        "auto_confirm_after": 0.0,
        "has_build": True,
        "has_data": True,
        "max_step_attempts": 4,
        "retry_delay": 1.0,
        "retry_delay_max": 3.0,
    }
    return Policy(**(knobs | overrides))


def kinds(actions: list[Action]) -> list[type]:
    return [type(action) for action in actions]


def emitted(actions: list[Action]) -> dict[str, dict[str, Any]]:
    return {action.event: dict(action.detail) for action in actions if isinstance(action, Emit)}


def complete(swap: Swap, pol: Policy, now: Instant) -> tuple[Swap, list[Action]]:
    """What the runtime feeds once the current step's action has worked."""
    assert swap.step is not None
    if swap.step in (Step.SPAWN_NEW, Step.SPAWN_OLD):
        return step(swap, HostSpawned(now=now), pol)
    result = {"data": [RECORD]} if swap.step is Step.SNAPSHOT else None
    return step(swap, StepDone(now=now, step=swap.step, result=result), pol)


def prepared() -> Swap:
    return new_swap(id="s1", summary="try the new parser", now=T0, checkpoint={"tree": "abc"})[0]


def activating(pol: Policy, until: Step) -> Swap:
    swap, _ = step(prepared(), ActivateRequested(now=at(ACTIVATED)), pol)
    while swap.step is not until:
        swap, _ = complete(swap, pol, at(ACTIVATED))
    return swap


def on_probation(pol: Policy) -> Swap:
    """Spawned at T0+10: deadline T0+70 (window 60), hard cap T0+310, first health check T0+20."""
    swap, _ = complete(activating(pol, Step.SPAWN_NEW), pol, at(ACTIVATED))
    return swap


def rolling_back(pol: Policy, until: Step, reason: str = "requested") -> Swap:
    swap, _ = step(on_probation(pol), RollbackRequested(now=at(20), reason=reason), pol)
    while swap.step is not until:
        swap, _ = complete(swap, pol, at(20))
    return swap


def failed(pol: Policy, at_step: Step) -> Swap:
    """A rollback that gave up at `at_step` after every attempt failed."""
    swap, now = rolling_back(pol, at_step), at(30)
    while swap.state is S.ROLLING_BACK:
        swap, _ = step(swap, StepFailed(now=now, step=at_step, error="disk full"), pol)
        if swap.retry_at is not None:
            now = swap.retry_at
            swap, _ = step(swap, Tick(now=now), pol)
    return swap


# --- prepare and activate ----------------------------------------------------------------------


def test_a_new_swap_is_prepared_and_announced() -> None:
    swap, actions = new_swap(id="s1", summary="x", now=T0, checkpoint={"tree": "abc"}, auto=True)
    assert (swap.state, swap.step, swap.created_at, swap.auto) == (S.PREPARED, None, T0, True)
    assert swap.checkpoint == {"tree": "abc"}
    assert actions == [Emit("swap.prepared", {"summary": "x", "auto": True})]


@pytest.mark.parametrize(
    ("swap_id", "summary", "names"),
    [("", "x", "swap id"), ("a/b", "x", "swap id"), ("x" * 65, "x", "swap id"),
     ("ok", "x" * 5000, "summary"), ("ok", None, "summary")],
)  # fmt: skip
def test_new_swap_refuses_bad_input(swap_id: str, summary: Any, names: str) -> None:
    with pytest.raises(BadRequest, match=names):
        new_swap(id=swap_id, summary=summary, now=T0, checkpoint={})


def test_activation_stops_the_old_host_and_starts_the_hard_cap() -> None:
    swap, actions = step(prepared(), ActivateRequested(now=at(10)), policy())
    assert (swap.state, swap.step, swap.activated_at) == (S.PROBATION, Step.STOP_OLD, at(10))
    assert swap.hard_cap == at(310) and swap.deadline is None
    assert actions == [Emit("swap.activated", {"hard_cap_at": rfc3339(at(310).wall)}), StopHost()]


@pytest.mark.parametrize(
    ("has_data", "has_build", "chain"),
    [
        (True, True, [(Step.SNAPSHOT, TakeSnapshots), (Step.BUILD_NEW, RunBuild),
                      (Step.SPAWN_NEW, StartHost)]),
        (True, False, [(Step.SNAPSHOT, TakeSnapshots), (Step.SPAWN_NEW, StartHost)]),
        (False, True, [(Step.BUILD_NEW, RunBuild), (Step.SPAWN_NEW, StartHost)]),
        (False, False, [(Step.SPAWN_NEW, StartHost)]),
    ],
)  # fmt: skip
def test_activation_chain_skips_what_is_not_configured(
    has_data: bool, has_build: bool, chain: list[tuple[Step, type]]
) -> None:
    pol = policy(has_data=has_data, has_build=has_build)
    swap = activating(pol, Step.STOP_OLD)
    for expected_step, expected_action in chain:
        swap, actions = complete(swap, pol, at(11))
        assert swap.step is expected_step and kinds(actions) == [expected_action]
    assert swap.snapshots_taken is has_data
    assert swap.data == ((RECORD,) if has_data else ())


def test_spawn_new_sets_the_deadline_once_and_passes_it_on() -> None:
    pol = policy()
    swap, actions = complete(activating(pol, Step.BUILD_NEW), pol, at(40))
    assert swap.step is Step.SPAWN_NEW and swap.deadline == at(100)
    deadline = rfc3339(at(100).wall)
    assert actions == [StartHost(env={"SWAPGUARD_SWAP_ID": "s1", "SWAPGUARD_DEADLINE": deadline})]
    swap, _ = step(swap, StepFailed(now=at(50), step=Step.SPAWN_NEW, error="ENOENT"), pol)
    swap, actions = step(swap, HostSpawned(now=at(55)), pol)
    assert swap.deadline == at(100), "a retried spawn does not restart the clock"
    assert swap.step is None and swap.next_health_at == at(65)
    assert actions == [
        Emit("swap.probation", {"deadline_at": deadline, "hard_cap_at": rfc3339(at(310).wall)})
    ]


def test_the_deadline_never_lies_past_the_hard_cap() -> None:
    pol = policy(window=500.0)
    swap = activating(pol, Step.SPAWN_NEW)
    assert swap.deadline == swap.hard_cap == at(310)


def test_no_health_check_schedules_none() -> None:
    swap = on_probation(policy(has_health_check=False))
    assert swap.next_health_at is None
    assert step(swap, Tick(now=at(20)), policy(has_health_check=False)) == (swap, [])


# --- probation -------------------------------------------------------------------------------

ROLLBACK_ACTIONS = [CancelJobs, Emit, StopHost]
EventMaker = Callable[[Instant], Event]


def crash(now: Instant) -> Event:
    return HostCrashed(now=now)


def ready(now: Instant) -> Event:
    return HostReady(now=now)


def healthy(now: Instant) -> Event:
    return HealthChecked(now=now, ok=True)


def unhealthy(now: Instant) -> Event:
    return HealthChecked(now=now, ok=False, detail="HTTP 500")


def lost(now: Instant) -> Event:
    return HeartbeatLost(now=now)


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ([crash], {"state": S.PROBATION, "crashes": 1}),
        ([crash, crash], {"state": S.ROLLING_BACK, "reason": "crash_loop", "crashes": 2}),
        ([lambda now: HostNotReady(now=now)], {"state": S.ROLLING_BACK, "reason": "not_ready"}),
        ([lost], {"state": S.ROLLING_BACK, "reason": "heartbeat_lost"}),
        ([unhealthy, unhealthy], {"state": S.PROBATION, "health_failures": 2}),
        ([unhealthy] * 3, {"state": S.ROLLING_BACK, "reason": "health_failed"}),
        ([unhealthy, unhealthy, healthy, unhealthy], {"health_failures": 1}),
        ([ready, ready], {"ready_since": at(11), "host_ready": True}),
        ([ready, crash], {"ready_since": None, "crashes": 1}),
        ([ready, unhealthy], {"ready_since": None}),
        ([ready, unhealthy, healthy], {"ready_since": at(13), "health_failures": 0}),
        ([healthy], {"ready_since": None}),
        ([crash, lambda now: HostSpawned(now=now)], {"state": S.PROBATION, "step": None}),
    ],
    ids=[
        "one crash counts", "max_crashes roll back", "not ready", "heartbeat lost",
        "health failures count", "health failures roll back", "a good check resets the count",
        "ready is stamped once", "a crash unreadies", "a failed check restarts the ready clock",
        "a good check of a ready host restarts it", "a good check does not make a host ready",
        "a restart after a crash changes nothing",
    ],
)  # fmt: skip
def test_probation_facts(events: list[EventMaker], expected: dict[str, Any]) -> None:
    pol = policy()
    swap = on_probation(pol)
    actions: list[Action] = []
    for offset, make in enumerate(events, start=1):
        swap, actions = step(swap, make(at(ACTIVATED + offset)), pol)
    assert {name: getattr(swap, name) for name in expected} == expected
    if swap.state is S.ROLLING_BACK:
        assert kinds(actions) == ROLLBACK_ACTIONS and swap.step is Step.STOP_NEW


@pytest.mark.parametrize("event", [crash, ready, unhealthy, lambda now: HostNotReady(now=now)])
def test_facts_about_the_old_host_during_activation_are_ignored(event: EventMaker) -> None:
    pol = policy()
    swap = activating(pol, Step.STOP_OLD)
    assert step(swap, event(at(11)), pol) == (swap, [])


def test_the_deadline_rolls_back_on_the_first_tick_at_it() -> None:
    pol = policy()
    swap = on_probation(pol)
    assert step(swap, Tick(now=at(69.999)), pol)[0].state is S.PROBATION
    swap, actions = step(swap, Tick(now=at(70)), pol)
    assert (swap.state, swap.reason, swap.rollback_started_at) == (
        S.ROLLING_BACK,
        "deadline",
        at(70),
    )
    assert actions == [
        CancelJobs(),
        Emit("swap.rollback_started", {"reason": "deadline"}),
        StopHost(),
    ]


def test_health_checks_are_due_every_interval_without_bursts() -> None:
    pol = policy()
    swap = on_probation(pol)
    assert step(swap, Tick(now=at(19.5)), pol) == (swap, [])
    swap, actions = step(swap, Tick(now=at(20)), pol)
    assert actions == [RunHealthCheck()] and swap.next_health_at == at(30)
    swap, actions = step(swap, Tick(now=at(55)), pol)  # 30, 40 and 50 were missed
    assert actions == [RunHealthCheck()] and swap.next_health_at == at(60)
    assert step(swap, Tick(now=at(56)), pol) == (swap, [])


def test_auto_confirm_once_ready_and_healthy_long_enough() -> None:
    pol = policy(auto_confirm_after=5.0, has_health_check=False)
    swap, _ = step(on_probation(pol), HostReady(now=at(11)), pol)
    assert step(swap, Tick(now=at(15.9)), pol) == (swap, [])
    swap, actions = step(swap, Tick(now=at(16)), pol)
    assert (swap.state, swap.finished_at) == (S.CONFIRMED, at(16))
    assert actions == [CancelJobs(), Emit("swap.confirmed", {"by": "auto"})]


def test_a_passed_deadline_beats_auto_confirm() -> None:
    pol = policy(auto_confirm_after=5.0)
    swap, _ = step(on_probation(pol), HostReady(now=at(11)), pol)
    assert step(swap, Tick(now=at(80)), pol)[0].state is S.ROLLING_BACK


@pytest.mark.parametrize("stuck_at", [Step.STOP_OLD, Step.SNAPSHOT, Step.BUILD_NEW, Step.SPAWN_NEW])
def test_the_hard_cap_holds_at_every_activation_step(stuck_at: Step) -> None:
    pol = policy(window=1000.0)  # the deadline is the hard cap itself
    swap = activating(pol, stuck_at)
    assert step(swap, Tick(now=at(309)), pol)[0] == swap
    swap, actions = step(swap, Tick(now=at(310)), pol)
    assert (swap.state, swap.reason) == (S.ROLLING_BACK, "deadline")
    assert kinds(actions) == ROLLBACK_ACTIONS, "CancelJobs kills the hanging build"


@pytest.mark.parametrize(
    ("failing", "reason", "restores_data"),
    # A failed take may have put working copies in place already: its rollback restores data.
    [(Step.BUILD_NEW, "build_failed", True), (Step.SNAPSHOT, "activation_failed", True),
     (Step.STOP_OLD, "activation_failed", False)],
)  # fmt: skip
def test_a_failed_activation_step_rolls_back(
    failing: Step, reason: str, restores_data: bool
) -> None:
    pol = policy()
    swap = activating(pol, failing)
    swap, actions = step(swap, StepFailed(now=at(11), step=failing, error="exit 2"), pol)
    assert (swap.state, swap.reason, swap.last_error) == (S.ROLLING_BACK, reason, "exit 2")
    assert emitted(actions)["swap.rollback_started"] == {"reason": reason, "error": "exit 2"}
    swap, _ = complete(swap, pol, at(12))  # STOP_NEW done
    swap, _ = complete(swap, pol, at(12))  # RESTORE_CODE done
    assert (swap.step is Step.RESTORE_DATA) is restores_data


def test_a_failed_spawn_counts_as_a_crash() -> None:
    pol = policy()
    swap = activating(pol, Step.SPAWN_NEW)
    swap, actions = step(swap, StepFailed(now=at(11), step=Step.SPAWN_NEW, error="ENOEXEC"), pol)
    assert (swap.state, swap.step, swap.crashes, actions) == (S.PROBATION, Step.SPAWN_NEW, 1, [])
    swap, _ = step(swap, StepFailed(now=at(12), step=Step.SPAWN_NEW, error="ENOEXEC"), pol)
    assert (swap.state, swap.reason) == (S.ROLLING_BACK, "crash_loop")


# --- requests ----------------------------------------------------------------------------------


def test_confirm_keeps_the_new_version() -> None:
    pol = policy()
    swap, actions = step(on_probation(pol), ConfirmRequested(now=at(30)), pol)
    assert (swap.state, swap.finished_at, swap.step) == (S.CONFIRMED, at(30), None)
    assert actions == [CancelJobs(), Emit("swap.confirmed", {"by": "request"})]
    assert next_wakeup(swap, pol) is None


NOT_YET = "the new version is not running yet"


@pytest.mark.parametrize(
    ("stage", "asked", "message"),
    [
        (lambda p: activating(p, Step.BUILD_NEW), ConfirmRequested, NOT_YET),
        (lambda p: activating(p, Step.SPAWN_NEW), ExtendRequested, NOT_YET),
        (lambda p: prepared(), ConfirmRequested, "it is prepared"),
        (lambda p: prepared(), ExtendRequested, "it is prepared"),
        (lambda p: prepared(), RollbackRequested, "it is prepared"),
        (lambda p: rolling_back(p, Step.RESTORE_CODE), ConfirmRequested, "it is rolling_back"),
        (lambda p: rolling_back(p, Step.RESTORE_CODE), RollbackRequested, "it is rolling_back"),
        (lambda p: rolling_back(p, Step.RESTORE_CODE), AbortRequested, "it is rolling_back"),
        (lambda p: on_probation(p), ActivateRequested, "it is probation"),
        (lambda p: on_probation(p), AbortRequested, "it is probation"),
        (lambda p: failed(p, Step.RESTORE_DATA), ConfirmRequested, "it is failed"),
        (lambda p: step(on_probation(p), ConfirmRequested(now=at(20)), p)[0],
         RollbackRequested, "it is confirmed"),
        (lambda p: complete(rolling_back(p, Step.SPAWN_OLD), p, at(21))[0],
         ConfirmRequested, "it is rolled_back"),
    ],
)  # fmt: skip
def test_requests_in_the_wrong_state_are_conflicts(
    stage: Callable[[Policy], Swap], asked: type[Request], message: str
) -> None:
    pol = policy()
    swap = stage(pol)
    with pytest.raises(Conflict, match=f"cannot {asked.verb} swap s1: {message}"):
        step(swap, asked(now=at(40)), pol)


@pytest.mark.parametrize("request_type", [ConfirmRequested, ExtendRequested])
def test_a_swap_past_its_deadline_cannot_be_confirmed_or_extended(request_type: type) -> None:
    pol = policy()
    with pytest.raises(Conflict, match="deadline passed"):
        step(on_probation(pol), request_type(now=at(70)), pol)


def test_an_extension_adds_time_up_to_the_hard_cap_and_never_takes_any() -> None:
    pol = policy()
    swap = on_probation(pol)
    assert swap.deadline == at(70)
    same, actions = step(swap, ExtendRequested(now=at(20)), pol)
    assert same == swap and actions == [], "now + extend_by (50) is before the deadline: no-op"
    swap, actions = step(swap, ExtendRequested(now=at(50)), pol)
    assert swap.deadline == at(80)
    assert actions == [
        Emit("swap.extended", {"deadline_at": rfc3339(at(80).wall), "capped": False})
    ]
    swap, actions = step(swap, ExtendRequested(now=at(60)), policy(extend_by=1000.0))
    assert swap.deadline == swap.hard_cap == at(310) and emitted(actions)["swap.extended"]["capped"]


def test_a_host_asks_for_its_own_extension_bounded_by_extend_by() -> None:
    """EXTEND_TIMEOUT_USEC=n: the host names the time it needs; extend_by bounds it."""
    pol = policy()
    swap = on_probation(pol)
    asked, _ = step(swap, ExtendRequested(now=at(60), by=20.0), pol)
    assert asked.deadline == at(80)
    bounded, _ = step(swap, ExtendRequested(now=at(60), by=3600.0), pol)
    assert bounded.deadline == at(90)
    too_little, actions = step(swap, ExtendRequested(now=at(60), by=5.0), pol)
    assert too_little == swap and actions == []


def test_an_explicit_rollback_carries_its_reason_to_the_old_version() -> None:
    pol = policy()
    swap, actions = step(on_probation(pol), RollbackRequested(now=at(20), reason="bad UX"), pol)
    assert (swap.state, swap.reason, swap.step) == (S.ROLLING_BACK, "bad UX", Step.STOP_NEW)
    assert kinds(actions) == ROLLBACK_ACTIONS
    assert RollbackRequested(now=at(0)).reason == "requested"


@pytest.mark.parametrize("reason", ["", "   ", "a\nb", "nul\x00", "x" * 201, 42])
def test_a_rollback_reason_must_be_printable(reason: Any) -> None:
    with pytest.raises(BadRequest, match="reason"):
        RollbackRequested(now=at(0), reason=reason)


def test_abort_restores_the_code_without_a_restart() -> None:
    pol = policy()
    swap, actions = step(prepared(), AbortRequested(now=at(5)), pol)
    assert (swap.state, swap.step, actions) == (S.PREPARED, Step.ABORT_RESTORE, [RestoreCode()])
    with pytest.raises(Conflict, match="already in progress"):
        step(swap, AbortRequested(now=at(5)), pol)
    with pytest.raises(Conflict, match="abort is in progress"):
        step(swap, ActivateRequested(now=at(5)), pol)
    swap, actions = complete(swap, pol, at(6))
    assert (swap.state, swap.finished_at, actions) == (S.ABORTED, at(6), [Emit("swap.aborted", {})])


def test_a_failing_abort_is_retried_then_left_prepared() -> None:
    pol = policy(max_step_attempts=2)
    swap, _ = step(prepared(), AbortRequested(now=at(5)), pol)
    swap, actions = step(swap, StepFailed(now=at(6), step=Step.ABORT_RESTORE, error="locked"), pol)
    assert swap.retry_at == at(7) and "swap.step_failed" in emitted(actions)
    swap, actions = step(swap, Tick(now=at(7)), pol)
    assert actions == [RestoreCode()] and swap.retry_at is None
    swap, actions = step(swap, StepFailed(now=at(8), step=Step.ABORT_RESTORE, error="locked"), pol)
    assert (swap.state, swap.step, swap.last_error) == (S.PREPARED, None, "locked")
    assert "swap.abort_failed" in emitted(actions)


# --- rollback ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("has_data", "has_build", "chain"),
    [
        (True, True, [Step.RESTORE_CODE, Step.RESTORE_DATA, Step.BUILD_OLD, Step.SPAWN_OLD]),
        (True, False, [Step.RESTORE_CODE, Step.RESTORE_DATA, Step.SPAWN_OLD]),
        (False, True, [Step.RESTORE_CODE, Step.BUILD_OLD, Step.SPAWN_OLD]),
        (False, False, [Step.RESTORE_CODE, Step.SPAWN_OLD]),
    ],
)
def test_rollback_chain(has_data: bool, has_build: bool, chain: list[Step]) -> None:
    pol = policy(has_data=has_data, has_build=has_build)
    swap = rolling_back(pol, Step.STOP_NEW, reason="deadline")
    expected_actions = {
        Step.RESTORE_CODE: RestoreCode(),
        Step.RESTORE_DATA: RestoreData(),
        Step.BUILD_OLD: RunBuild(),
        Step.SPAWN_OLD: StartHost(
            env={"SWAPGUARD_ROLLED_BACK": "s1", "SWAPGUARD_ROLLBACK_REASON": "deadline"}
        ),
    }
    for expected in chain:
        swap, actions = complete(swap, pol, at(21))
        assert swap.step is expected and actions == [expected_actions[expected]]
    swap, actions = step(swap, HostSpawned(now=at(22.5)), pol)
    assert (swap.state, swap.step, swap.finished_at) == (S.ROLLED_BACK, None, at(22.5))
    assert actions == [Emit("swap.rolled_back", {"reason": "deadline", "duration_s": 2.5})]


def test_failed_rollback_steps_are_retried_with_capped_backoff_then_left_to_the_operator() -> None:
    pol = policy()  # 4 attempts, delays 1, 2, 3 (capped)
    swap = rolling_back(pol, Step.RESTORE_DATA)
    now = 30.0
    for attempt, delay in [(1, 1.0), (2, 2.0), (3, 3.0)]:
        fail = StepFailed(now=at(now), step=Step.RESTORE_DATA, error="disk full")
        swap, actions = step(swap, fail, pol)
        assert swap.retry_at == at(now + delay) and next_wakeup(swap, pol) == at(now + delay)
        assert emitted(actions)["swap.step_failed"] == {
            "step": "restore_data", "error": "disk full", "attempt": attempt, "retry_in_s": delay
        }  # fmt: skip
        assert step(swap, fail, pol) == (swap, []), "no step in flight while waiting: stale"
        assert step(swap, Tick(now=at(now + delay - 0.01)), pol) == (swap, [])
        swap, actions = step(swap, Tick(now=at(now + delay)), pol)
        assert actions == [RestoreData()] and swap.retry_at is None
        now += delay
    swap, actions = step(swap, StepFailed(now=at(now), step=Step.RESTORE_DATA, error="EIO"), pol)
    assert (swap.state, swap.step, swap.attempts) == (S.FAILED, Step.RESTORE_DATA, 4)
    assert emitted(actions)["rollback.failed"]["reason"] == "requested"
    assert next_wakeup(swap, pol) is None and resume(swap, pol, at(99)) == (swap, [])


def test_an_operator_retry_resumes_a_failed_rollback_at_its_step() -> None:
    pol = policy()
    swap = failed(pol, Step.BUILD_OLD)
    swap, actions = step(swap, RollbackRequested(now=at(60), reason="fixed disk"), pol)
    assert (swap.state, swap.step, swap.attempts) == (S.ROLLING_BACK, Step.BUILD_OLD, 0)
    assert swap.reason == "requested", "the swap keeps why it rolled back"
    assert actions == [
        Emit("swap.rollback_retried", {"step": "build_old", "by": "fixed disk"}),
        RunBuild(),
    ]


@pytest.mark.parametrize(
    "event",
    [crash, ready, unhealthy, lambda now: HostNotReady(now=now),
     lost, lambda now: HostSpawned(now=now)],
)  # fmt: skip
def test_host_facts_during_rollback_are_ignored(event: EventMaker) -> None:
    pol = policy()
    swap = rolling_back(pol, Step.RESTORE_CODE)
    assert step(swap, event(at(25)), pol) == (swap, [])


@pytest.mark.parametrize(
    "stage",
    [lambda p: on_probation(p), lambda p: activating(p, Step.BUILD_NEW),
     lambda p: rolling_back(p, Step.RESTORE_CODE), lambda p: prepared()],
)  # fmt: skip
def test_stale_step_results_are_ignored(stage: Callable[[Policy], Swap]) -> None:
    pol = policy()
    swap = stage(pol)
    for other in Step:
        if other is not swap.step:
            assert step(swap, StepDone(now=at(30), step=other), pol) == (swap, [])
            assert step(swap, StepFailed(now=at(30), step=other, error="x"), pol) == (swap, [])


# --- restart, timer, views, records ------------------------------------------------------------

RESUMED = {
    Step.STOP_OLD: lambda p: activating(p, Step.STOP_OLD),
    Step.SNAPSHOT: lambda p: activating(p, Step.SNAPSHOT),
    Step.BUILD_NEW: lambda p: activating(p, Step.BUILD_NEW),
    Step.SPAWN_NEW: lambda p: activating(p, Step.SPAWN_NEW),
    Step.STOP_NEW: lambda p: rolling_back(p, Step.STOP_NEW),
    Step.RESTORE_CODE: lambda p: rolling_back(p, Step.RESTORE_CODE),
    Step.RESTORE_DATA: lambda p: rolling_back(p, Step.RESTORE_DATA),
    Step.BUILD_OLD: lambda p: rolling_back(p, Step.BUILD_OLD),
    Step.SPAWN_OLD: lambda p: rolling_back(p, Step.SPAWN_OLD),
    Step.ABORT_RESTORE: lambda p: step(prepared(), AbortRequested(now=at(1)), p)[0],
}


def expected_resume_action(swap: Swap) -> list[Action]:
    """Written out independently of the machine's own step -> action map (same boot)."""
    if swap.state is S.PROBATION and swap.step is None and swap.data_unsynced:
        return [SyncData()]
    if swap.state not in (S.PREPARED, S.PROBATION, S.ROLLING_BACK) or swap.step is None:
        return []
    if swap.step is Step.SPAWN_NEW:
        assert swap.deadline is not None
        env = {"SWAPGUARD_SWAP_ID": swap.id, "SWAPGUARD_DEADLINE": rfc3339(swap.deadline.wall)}
        return [StartHost(env=env)]
    if swap.step is Step.SPAWN_OLD:
        return [StartHost(env={"SWAPGUARD_ROLLED_BACK": swap.id,
                               "SWAPGUARD_ROLLBACK_REASON": str(swap.reason)})]  # fmt: skip
    simple = {Step.STOP_OLD: StopHost(), Step.SNAPSHOT: TakeSnapshots(), Step.BUILD_NEW: RunBuild(),
              Step.STOP_NEW: StopHost(), Step.RESTORE_CODE: RestoreCode(),
              Step.RESTORE_DATA: RestoreData(), Step.BUILD_OLD: RunBuild(),
              Step.ABORT_RESTORE: RestoreCode()}  # fmt: skip
    return [simple[swap.step]]


@pytest.mark.parametrize("current", list(Step))
def test_resume_reissues_exactly_the_current_step(current: Step) -> None:
    pol = policy()
    swap = Swap.from_json(json.loads(json.dumps(RESUMED[current](pol).to_json())))
    assert swap.step is current
    resumed, actions = resume(swap, pol, at(1000))
    assert actions == expected_resume_action(swap) and resumed == swap


def test_resume_keeps_the_original_deadline_and_the_next_tick_fires_it() -> None:
    pol = policy()
    swap = activating(pol, Step.SPAWN_NEW)
    resumed, actions = resume(swap, pol, at(500))
    assert resumed.deadline == at(70)
    assert actions == [StartHost(env={"SWAPGUARD_SWAP_ID": "s1",
                                      "SWAPGUARD_DEADLINE": rfc3339(at(70).wall)})]  # fmt: skip
    assert step(resumed, Tick(now=at(500)), pol)[0].reason == "deadline"


def test_resume_retries_at_once_a_step_that_was_waiting_for_its_backoff() -> None:
    pol = policy()
    swap = rolling_back(pol, Step.RESTORE_CODE)
    swap, _ = step(swap, StepFailed(now=at(30), step=Step.RESTORE_CODE, error="x"), pol)
    resumed, actions = resume(swap, pol, at(30.5))
    assert resumed.retry_at is None and actions == [RestoreCode()]
    assert complete(resumed, pol, at(31))[0].step is Step.RESTORE_DATA


def test_next_wakeup_is_the_earliest_timed_moment() -> None:
    pol = policy(auto_confirm_after=4.0)
    assert next_wakeup(prepared(), pol) is None
    assert next_wakeup(activating(pol, Step.BUILD_NEW), pol) == at(310)
    swap = on_probation(pol)
    assert next_wakeup(swap, pol) == at(20)  # first health check
    swap, _ = step(swap, HostReady(now=at(11)), pol)
    assert next_wakeup(swap, pol) == at(15)  # auto-confirm
    assert next_wakeup(on_probation(policy(has_health_check=False)), pol) == at(70)
    pol = policy(has_health_check=False, extend_by=1000.0)
    swap, _ = step(on_probation(pol), ExtendRequested(now=at(20)), pol)
    assert next_wakeup(swap, pol) == at(310)


def test_view_has_the_contract_fields() -> None:
    pol = policy()
    swap = on_probation(pol)
    view = swap.view(at(40))
    assert view == {
        "id": "s1",
        "state": "probation",
        "summary": "try the new parser",
        "reason": None,
        "created_at": rfc3339(T0.wall),
        "activated_at": rfc3339(at(10).wall),
        "deadline_at": rfc3339(at(70).wall),
        "hard_cap_at": rfc3339(at(310).wall),
        "finished_at": None,
        "remaining_s": 30.0,
        "step": None,
        "crashes": 0,
        "data_on_disk": True,
    }
    assert replace(swap, data_unsynced=True).view(at(40))["data_on_disk"] is False
    assert swap.view(at(99))["remaining_s"] == 0.0, "never negative"
    assert activating(pol, Step.BUILD_NEW).view(at(10))["remaining_s"] == 300.0
    assert prepared().view(at(1))["remaining_s"] is None
    assert json.loads(json.dumps(view)) == view


def test_records_round_trip_and_bad_records_are_named() -> None:
    swap = rolling_back(policy(), Step.RESTORE_DATA)
    assert swap.data == (RECORD,) and swap.snapshots_taken
    stored = json.loads(json.dumps(swap.to_json()))
    assert Swap.from_json(stored) == swap
    assert Swap.from_json(stored | {"added_by_a_newer_version": 1}) == swap
    for broken in [stored | {"state": "limbo"}, stored | {"deadline": {"wall": 1}},
                   {k: v for k, v in stored.items() if k != "created_at"}]:  # fmt: skip
        with pytest.raises(ValueError, match="malformed swap record 's1'"):
            Swap.from_json(broken)
    with pytest.raises(ValueError, match="impossible in state"):
        Swap.from_json(stored | {"state": "probation"})


def unsynced(pol: Policy, until: Step | None = None) -> tuple[Swap, list[Action]]:
    """A take that left working copies not yet on disk, walked on to `until` (None: running)."""
    swap = activating(pol, Step.SNAPSHOT)
    result = {"data": [RECORD], "unsynced": True}
    swap, actions = step(swap, StepDone(now=at(ACTIVATED), step=Step.SNAPSHOT, result=result), pol)
    while swap.step is not until:
        swap, actions = complete(swap, pol, at(ACTIVATED))
    assert swap.data_unsynced
    return swap, actions


def test_a_new_version_on_unsynced_data_copies_is_confirmed_once_they_are_on_disk() -> None:
    pol = policy(auto_confirm_after=15.0, has_health_check=False)
    swap, actions = unsynced(pol)
    assert SyncData() in actions
    swap, _ = step(swap, HostReady(now=at(11)), pol)
    with pytest.raises(Conflict, match="not on disk yet"):
        step(swap, ConfirmRequested(now=at(12)), pol)
    assert next_wakeup(swap, pol) == swap.deadline, "no auto confirm is due yet"
    assert step(swap, Tick(now=at(30)), pol)[0].state is S.PROBATION
    swap, actions = step(swap, DataSynced(now=at(31)), pol)
    assert not swap.data_unsynced and actions == []
    swap, actions = step(swap, Tick(now=at(31)), pol)
    assert swap.state is S.CONFIRMED and emitted(actions)["swap.confirmed"] == {"by": "auto"}


def test_data_copies_that_cannot_be_synced_roll_back() -> None:
    pol = policy()
    swap, _ = unsynced(pol)
    swap, actions = step(swap, DataSynced(now=at(12), error="EIO"), pol)
    assert (swap.state, swap.reason) == (S.ROLLING_BACK, "activation_failed")
    assert swap.last_error == "EIO" and kinds(actions) == ROLLBACK_ACTIONS


@pytest.mark.parametrize("until", [None, Step.BUILD_NEW, Step.SPAWN_NEW])
def test_a_restart_owes_the_sync_and_a_reboot_rolls_back(until: Step | None) -> None:
    """After a power cut the working copies may be torn: the new version must not go on."""
    pol = policy()
    swap, _ = unsynced(pol, until)
    if until is None:
        assert resume(swap, pol, at(20)) == (swap, [SyncData()])
    rebooted = Instant(wall=T0.wall + 20, boot=5.0, boot_id="boot-b")
    after, actions = resume(swap, pol, rebooted)
    assert (after.state, after.reason) == (S.ROLLING_BACK, "activation_failed")
    assert "restarted" in str(after.last_error) and kinds(actions) == ROLLBACK_ACTIONS


def test_instants_from_another_boot_compare_by_wall_clock() -> None:
    pol = policy(has_health_check=False)
    swap = on_probation(pol)  # deadline: wall T0+70 in boot-a
    early = Instant(wall=T0.wall + 69, boot=9999.0, boot_id="boot-b")
    late = Instant(wall=T0.wall + 70, boot=1.0, boot_id="boot-b")
    assert step(swap, Tick(now=early), pol)[0] == swap
    assert step(swap, Tick(now=late), pol)[0].state is S.ROLLING_BACK


@pytest.mark.parametrize(
    ("make", "error", "names"),
    [
        (lambda: Tick(now=1.0), TypeError, "Tick.now"),
        (lambda: StepDone(now=T0, step="snapshot"), TypeError, "StepDone.step"),
        (lambda: StepDone(now=T0, step=Step.SNAPSHOT, result={"data": "x"}), TypeError, "data"),
        (lambda: StepFailed(now=T0, step=Step.SNAPSHOT, error=None), TypeError, "error"),
        (lambda: HealthChecked(now=T0, ok=1), TypeError, "HealthChecked.ok"),
        (lambda: policy(window=0), ValueError, "Policy.window"),
        (lambda: policy(retry_delay_max=0.5), ValueError, "Policy.retry_delay_max"),
        (lambda: policy(max_crashes=0), ValueError, "Policy.max_crashes"),
    ],
)  # fmt: skip
def test_bad_values_are_named(make: Callable[[], Any], error: type, names: str) -> None:
    with pytest.raises(error, match=names):
        make()


@given(st.floats(min_value=0, max_value=2**34, allow_nan=False))
def test_api_timestamps_read_back_to_the_millisecond(wall: float) -> None:
    stamp = rfc3339(wall)
    assert stamp is not None and stamp.endswith("Z")
    assert abs(wall_of(stamp) - wall) < 0.001


def test_the_diagram_is_drawn_from_the_table() -> None:
    diagram = mermaid()
    assert diagram.startswith("stateDiagram-v2\n")
    for state in SwapState:
        assert f" {state.value} " in diagram
    for (source, event_type), transition in TRANSITIONS.items():
        for target in transition.leads_to:
            line = next(ln for ln in diagram.splitlines() if f"{source} --> {target} :" in ln)
            assert event_type.__name__ in line
    for state in TERMINAL:
        assert f"{state} --> [*]" in diagram


# --- random walks ------------------------------------------------------------------------------

STEPS_OF_STATE = {
    S.PREPARED: {None, Step.ABORT_RESTORE},
    S.PROBATION: {None, Step.STOP_OLD, Step.SNAPSHOT, Step.BUILD_NEW, Step.SPAWN_NEW},
    S.ROLLING_BACK: {Step.STOP_NEW, Step.RESTORE_CODE, Step.RESTORE_DATA, Step.BUILD_OLD,
                     Step.SPAWN_OLD},
    S.FAILED: {Step.STOP_NEW, Step.RESTORE_CODE, Step.RESTORE_DATA, Step.BUILD_OLD,
               Step.SPAWN_OLD},
    S.CONFIRMED: {None}, S.ROLLED_BACK: {None}, S.ABORTED: {None},
}  # fmt: skip
FACTS = [HostSpawned, HostReady, HostCrashed, HostNotReady, HeartbeatLost]
REQUESTS = [ActivateRequested, ConfirmRequested, ExtendRequested, AbortRequested]


def rollback_due(swap: Swap, now: Instant) -> bool:
    return any(
        moment is not None and moment.seconds_until(now) <= 0
        for moment in (swap.deadline, swap.hard_cap)
    )


class SwapWalk(RuleBasedStateMachine):
    """Random events and time; the invariants of the contract hold after every one."""

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.pol = policy()
        self.swap = prepared()

    @initialize(
        has_data=st.booleans(),
        has_build=st.booleans(),
        has_health_check=st.booleans(),
        auto_confirm_after=st.sampled_from([0.0, 15.0]),
        window=st.sampled_from([20.0, 60.0, 500.0]),
        extend_by=st.sampled_from([30.0, 1000.0]),
        max_step_attempts=st.integers(1, 3),
        stage=st.sampled_from(["prepared", "activating", "running"]),
    )
    def configure(self, stage: str, **knobs: Any) -> None:
        """Start some walks further on, so that probation and rollback are walked often."""
        self.pol = policy(**knobs)
        if stage != "prepared":
            self.feed(ActivateRequested(now=self.now))
        while stage == "running" and self.swap.step is not None:
            self.current_step_works()

    def feed(self, event: Event) -> bool:
        """Step the machine and check what must hold of this one transition; True if it took."""
        before = self.swap
        try:
            after, actions = step(before, event, self.pol)
        except Conflict:
            assert isinstance(event, Request), f"{event} is a fact, never refused"
            return False
        if before.state in TERMINAL:  # (4) terminal states never change again
            assert (after, actions) == (before, [])
        if (
            isinstance(event, Tick)
            and before.state is S.PROBATION
            and rollback_due(before, event.now)
        ):
            assert after.state is S.ROLLING_BACK  # (3) the tick at the deadline rolls back
        for action in actions:  # (7) a host starts only as the spawn step of a chain
            if isinstance(action, StartHost):
                assert after.step in (Step.SPAWN_NEW, Step.SPAWN_OLD)
        self.swap = after
        return True

    @rule(seconds=st.floats(0.0, 30.0))
    def time_passes(self, seconds: float) -> None:
        self.now = self.now.plus(seconds)

    @rule()
    def time_reaches_the_next_wakeup(self) -> None:
        wakeup = next_wakeup(self.swap, self.pol)
        if wakeup is not None and wakeup.seconds_until(self.now) > 0:
            self.now = wakeup

    @rule()
    def tick(self) -> None:
        self.feed(Tick(now=self.now))

    @precondition(lambda self: self.swap.step is not None)
    @rule(unsynced=st.booleans())
    def current_step_works(self, unsynced: bool = False) -> None:
        assert self.swap.step is not None
        snapshot = self.swap.step is Step.SNAPSHOT
        result = {"data": [RECORD], "unsynced": unsynced} if snapshot else None
        self.feed(StepDone(now=self.now, step=self.swap.step, result=result))

    @rule(ok=st.booleans())
    def data_synced(self, ok: bool) -> None:
        self.feed(DataSynced(now=self.now, error=None if ok else "EIO"))

    @precondition(lambda self: self.swap.step is not None)
    @rule()
    def current_step_fails(self) -> None:
        assert self.swap.step is not None
        self.feed(StepFailed(now=self.now, step=self.swap.step, error="boom"))

    @rule(stale=st.sampled_from(list(Step)), done=st.booleans())
    def some_step_result(self, stale: Step, done: bool) -> None:
        if done:
            self.feed(StepDone(now=self.now, step=stale))
        else:
            self.feed(StepFailed(now=self.now, step=stale, error="late"))

    @rule(fact=st.sampled_from(FACTS))
    def host_fact(self, fact: type[Event]) -> None:
        self.feed(fact(now=self.now))

    @rule(ok=st.booleans())
    def health_checked(self, ok: bool) -> None:
        self.feed(HealthChecked(now=self.now, ok=ok))

    @precondition(lambda self: self.swap.state is S.PREPARED and self.swap.step is None)
    @rule()
    def activate(self) -> None:
        self.feed(ActivateRequested(now=self.now))

    @precondition(lambda self: self.swap.state is S.PROBATION and self.swap.step is None)
    @rule(by=st.one_of(st.none(), st.floats(0, 2000)))
    def extend(self, by: float | None) -> None:
        before = self.swap.deadline
        self.feed(ExtendRequested(now=self.now, by=by))
        if self.swap.state is S.PROBATION and before is not None and self.swap.deadline:
            assert before.seconds_until(self.swap.deadline) <= 0, "an extension took time"

    @rule(request=st.sampled_from(REQUESTS))
    def request(self, request: type[Request]) -> None:
        self.feed(request(now=self.now))

    @rule(reason=st.sampled_from(["requested", "operator"]))
    def rollback_request(self, reason: str) -> None:
        self.feed(RollbackRequested(now=self.now, reason=reason))

    @precondition(lambda self: self.swap.state is S.PROBATION)
    @rule(confirm_first=st.booleans())
    def confirm_and_rollback_race(self, confirm_first: bool) -> None:
        race: list[Request] = [ConfirmRequested(now=self.now), RollbackRequested(now=self.now)]
        winners = [self.feed(request) for request in (race if confirm_first else race[::-1])]
        assert winners.count(True) == 1, "(8) exactly one of confirm and rollback wins"

    @invariant()
    def state_and_step_agree(self) -> None:  # (1)
        event(f"reached {self.swap.state}")
        assert self.swap.step in STEPS_OF_STATE[self.swap.state]

    @invariant()
    def deadline_within_hard_cap(self) -> None:  # (2)
        if self.swap.deadline is not None and self.swap.hard_cap is not None:
            assert self.swap.deadline.seconds_until(self.swap.hard_cap) <= 1e-9

    @invariant()
    def nothing_confirmed_before_its_data_is_on_disk(self) -> None:  # (9)
        assert not (self.swap.state is S.CONFIRMED and self.swap.data_unsynced)

    @invariant()
    def record_round_trips(self) -> None:  # (5)
        assert Swap.from_json(json.loads(json.dumps(self.swap.to_json()))) == self.swap

    @invariant()
    def restart_reissues_the_current_step(self) -> None:  # (6)
        reloaded = Swap.from_json(self.swap.to_json())
        _, actions = resume(reloaded, self.pol, self.now)
        assert actions == expected_resume_action(self.swap)


SwapWalk.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSwapWalk = SwapWalk.TestCase


def test_an_extension_that_moves_the_deadline_by_less_than_a_second_changes_nothing() -> None:
    """A host extending in a loop must not write the store hundreds of times a second."""
    policy = swaps.Policy(window=60, extend_by=60, hard_cap=600, max_crashes=2, health_failures=3,
                          health_interval=10, has_health_check=False, auto_confirm_after=0,
                          has_build=False, has_data=False)
    t0 = Instant(1000.0, 1000.0, "boot")
    swap, _ = swaps.new_swap(id="s1", summary="", now=t0, checkpoint={})
    for fact in (swaps.ActivateRequested(now=t0), swaps.StepDone(now=t0, step=swaps.Step.STOP_OLD),
                 swaps.HostSpawned(now=t0)):
        swap, _ = swaps.step(swap, fact, policy)
    first, actions = swaps.step(swap, swaps.ExtendRequested(now=t0.plus(5)), policy)
    assert [a.event for a in actions if isinstance(a, swaps.Emit)] == ["swap.extended"]
    again, actions = swaps.step(first, swaps.ExtendRequested(now=t0.plus(5.5)), policy)
    assert again == first and actions == []
    later, actions = swaps.step(first, swaps.ExtendRequested(now=t0.plus(7)), policy)
    assert later.deadline == t0.plus(67) and actions


def test_the_readme_shows_the_diagram_of_this_table() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    assert f"```mermaid\n{mermaid()}```" in readme, "paste swaps.mermaid() into the README"
