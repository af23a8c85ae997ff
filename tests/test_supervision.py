"""The combined machine, driven directly: a small stand-in for the runtime performs its orders.

No processes, no sockets, no sleeps: a `Harness` plays the runtime (a spawn happens at once, other
work waits for the test to answer) and checks every order against the record it came with.
"""

from __future__ import annotations

from collections import deque
from dataclasses import fields, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from supervisor.clock import Instant
from supervisor.core import lifecycle as lc
from supervisor.core import supervision as sv
from supervisor.core import swaps
from supervisor.errors import BadRequest, Conflict

T0 = Instant(wall=1_800_000_000.0, boot=500.0, boot_id="boot-a")
RECORD = {"path": "data/app.db", "bytes": 4096, "sha256": "ab" * 32}
S = swaps.SwapState
H = lc.HostState
WORK = (sv.TakeSnapshots, sv.RunBuild, sv.RestoreCode, sv.RestoreData)


def policy(health_always: bool = False, **swap_knobs: Any) -> sv.Policy:
    knobs: dict[str, Any] = {
        "window": 60.0, "extend_by": 30.0, "hard_cap": 300.0, "max_crashes": 2,
        "health_failures": 3, "health_interval": 10.0, "has_health_check": False,
        "auto_confirm_after": 0.0, "has_build": True, "has_data": True,
        "max_step_attempts": 2, "retry_delay": 1.0, "retry_delay_max": 3.0,
    }  # fmt: skip
    host = lc.Policy(
        ready_mode="notify", start_timeout=5, min_uptime=1, heartbeat_timeout=0,
        stop_timeout=3, restart="always", restart_reset_after=10, backoff=lambda n: 0.5,
    )  # fmt: skip
    swap = swaps.Policy(**(knobs | swap_knobs))
    return sv.Policy(host=host, swap=swap, health_always=health_always)


class Harness:
    """Plays the runtime: feeds one event at a time, performs a spawn at once (its outcome is fed
    next, as the runtime's queue does) and keeps other work pending for the test to answer."""

    def __init__(self, pol: sv.Policy, state: sv.Supervision | None = None) -> None:
        self.policy = pol
        self.state = state or sv.Supervision()
        self.now = T0
        self.process: int | None = None
        self.next_pid = 100
        self.spawn_fails = False
        self.stored: dict[str, swaps.Swap] = {}
        self.events: list[str] = []
        self.swap_events: dict[str, list[str]] = {}
        self.spawns: list[sv.Spawn] = []
        self.pending: list[sv.Action] = []
        self.cancels = 0  # CancelJobs ordered
        self.answers: list[sv.AnswerConfirm] = []
        self.finished: dict[str, swaps.Swap] = {}
        self.slow_kills = False  # True: a KillTree waits for the test to answer (`TreeGone`)

    def feed(self, first: sv.Event) -> list[sv.Action]:
        """Raises what `step` raises for `first`; what its orders report back is fed after it."""
        queue: deque[sv.Event] = deque([first])
        orders: list[sv.Action] = []
        while queue:
            before = self.state
            self.state, actions = sv.step(before, queue.popleft(), self.policy)
            self.check_turn(actions)
            for action in actions:
                self.perform(action, queue)
            orders += actions
            if self.state.swap is not None:  # persisted before acted: the store has the record
                assert self.stored[self.state.swap.id] == self.state.swap
        return orders

    def check_turn(self, actions: list[sv.Action]) -> None:
        """Orders that concern the host are allowed in the state the turn left it in."""
        host = self.state.host
        spawns = [a for a in actions if isinstance(a, sv.Spawn)]
        assert len(spawns) <= 1
        if spawns:
            assert host.state is H.STARTING and host.pid is None
        if any(isinstance(a, sv.SignalStop) for a in actions):
            assert host.state is H.STOPPING
        if any(isinstance(a, sv.CheckCodeChanged) for a in actions):
            assert self.state.check is not None

    def perform(self, action: sv.Action, queue: deque[sv.Event]) -> None:
        match action:
            case sv.Spawn():
                assert self.process is None, "a second host while one runs"
                self.spawns.append(action)
                if self.spawn_fails:
                    failed = lc.SpawnFailed(now=self.now.boot, wall=0, error="ENOENT")
                    queue.append(sv.HostInput(now=self.now, event=failed))
                    return
                self.next_pid += 1
                self.process = self.next_pid
                spawned = lc.Spawned(now=self.now.boot, pid=self.process)
                queue.append(sv.HostInput(now=self.now, event=spawned))
            case sv.PersistSwap(swap=swap, events=events):
                self.stored[swap.id] = swap
                self.events += [kind for kind, _ in events]
                self.swap_events.setdefault(swap.id, []).extend(kind for kind, _ in events)
            case sv.Emit(event=kind):
                self.events.append(kind)
            case sv.KillTree():
                if self.slow_kills:
                    self.pending.append(action)
                else:  # nothing was left, as most often: the runtime reports it at once
                    queue.append(sv.TreeGone(now=self.now))
            case sv.TakeSnapshots(swap=swap) | sv.RunBuild(swap=swap) | sv.RestoreCode(
                swap=swap
            ) | sv.RestoreData(swap=swap) | sv.SyncData(swap=swap):
                assert self.stored[swap.id] == swap, "work ordered on a record not yet saved"
                expected = {
                    sv.TakeSnapshots: {swaps.Step.SNAPSHOT},
                    sv.RunBuild: {swaps.Step.BUILD_NEW, swaps.Step.BUILD_OLD},
                    sv.RestoreCode: {swaps.Step.RESTORE_CODE, swaps.Step.ABORT_RESTORE},
                    sv.RestoreData: {swaps.Step.RESTORE_DATA},
                    sv.SyncData: {None},
                }[type(action)]
                assert swap.step in expected
                self.pending.append(action)
            case sv.RunHealthCheck(swap_id=None):  # liveness: never the new version's probation
                assert self.policy.health_always and self.state.host.state is H.RUNNING
                swap = self.state.swap
                assert swap is None or (swap.state is S.PREPARED and swap.step is None)
                self.pending.append(action)
            case sv.RunHealthCheck(swap_id=str(swap_id)):
                swap = self.stored[swap_id]
                assert swap.state is S.PROBATION and swap.step is None
                self.pending.append(action)
            case sv.CheckCodeChanged(swap_id=swap_id):
                assert self.stored[swap_id].state is S.PREPARED
                self.pending.append(action)
            case sv.SwapFinished(swap=swap):
                assert swap.id not in self.finished
                self.finished[swap.id] = swap
                if swap.state is S.ROLLED_BACK:  # the old version came back
                    assert self.process is not None or self.spawns_pending(queue)
                    assert self.spawns[-1].env.get("SWAPGUARD_ROLLED_BACK") == swap.id
            case sv.AnswerConfirm():
                self.answers.append(action)
            case sv.CancelJobs():
                self.cancels += 1

    @staticmethod
    def spawns_pending(queue: deque[sv.Event]) -> bool:
        return any(
            isinstance(e, sv.HostInput) and isinstance(e.event, lc.Spawned) for e in queue
        )

    # --- what the tests say happened -------------------------------------------------------

    def at(self, seconds: float) -> Instant:
        self.now = T0.plus(seconds)
        return self.now

    def host(self, event: lc.Event) -> list[sv.Action]:
        return self.feed(sv.HostInput(now=self.now, event=event))

    def exits(self, code: int | None = 1) -> list[sv.Action]:
        assert self.process is not None
        self.process = None
        signal = None if code is not None else 9
        return self.host(lc.Exited(now=self.now.boot, wall=0, code=code, signal=signal))

    def answer(self, action: sv.Action, ok: bool = True, **result: Any) -> list[sv.Action]:
        """Report the outcome of pending work."""
        self.pending.remove(action)
        now = self.now
        match action:
            case sv.CheckCodeChanged(swap_id=swap_id):
                return self.feed(sv.CodeChecked(now=now, swap_id=swap_id, changed=ok))
            case sv.SyncData(swap=swap):
                synced = swaps.DataSynced(now=now, error=None if ok else "EIO")
                return self.feed(sv.WorkReported(swap_id=swap.id, event=synced))
            case sv.RunHealthCheck(swap_id=swap_id, check=check):
                checked = swaps.HealthChecked(now=now, ok=ok, detail="" if ok else "exit 1")
                return self.feed(sv.WorkReported(swap_id=swap_id, event=checked, check=check))
            case sv.KillTree():
                return self.feed(sv.TreeGone(now=now, killed=2))
        swap = action.swap  # type: ignore[union-attr]
        assert swap.step is not None
        outcome: swaps.StepDone | swaps.StepFailed
        if ok:
            data = {"data": [RECORD], **result} if swap.step is swaps.Step.SNAPSHOT else None
            outcome = swaps.StepDone(now=now, step=swap.step, result=data)
        else:
            outcome = swaps.StepFailed(now=now, step=swap.step, error="boom")
        return self.feed(sv.WorkReported(swap_id=swap.id, event=outcome))

    def work(self, kind: type) -> sv.Action:
        return next(a for a in self.pending if isinstance(a, kind))

    def finish_work(self, **result: Any) -> None:
        """Answer every step's work (not checks, syncs or health checks) until none is left."""
        while steps := [a for a in self.pending if isinstance(a, WORK)]:
            self.answer(steps[0], **result)


def running(pol: sv.Policy | None = None) -> Harness:
    harness = Harness(pol or policy())
    harness.feed(sv.Resumed(now=harness.now, adopted=False))
    harness.host(lc.Ready(now=harness.now.boot))
    assert harness.state.host.state is H.RUNNING
    return harness


def prepared(harness: Harness, swap_id: str = "s1") -> swaps.Swap:
    harness.feed(
        sv.PrepareRequested(now=harness.now, swap_id=swap_id, summary="", checkpoint={"c": 1})
    )
    assert harness.state.swap is not None
    return harness.state.swap


def on_probation(harness: Harness, unsynced: bool = False, prepare: bool = True) -> swaps.Swap:
    if prepare:
        prepared(harness)
    harness.feed(swaps.ActivateRequested(now=harness.now))
    harness.exits(None)  # the old version stops on SIGTERM
    harness.finish_work(unsynced=unsynced)
    swap = harness.state.swap
    assert swap is not None and swap.state is S.PROBATION and swap.step is None
    return swap


# --- the decisions that used to be the runtime's -------------------------------------------------


def test_a_start_while_prepared_checks_the_code_and_changed_code_activates() -> None:
    harness = running()
    swap = prepared(harness)
    harness.feed(sv.HostRequested(now=harness.now, event=lc.RestartRequested(now=500.0)))
    harness.exits(None)
    check = harness.work(sv.CheckCodeChanged)
    assert harness.spawns[-1].swap_id is None and len(harness.spawns) == 1  # no spawn yet
    harness.answer(check, ok=True)
    assert harness.state.swap is not None and harness.state.swap.state is S.PROBATION
    harness.finish_work()
    assert harness.spawns[-1].swap_id == swap.id
    assert harness.spawns[-1].env["SWAPGUARD_SWAP_ID"] == swap.id


def test_a_start_while_prepared_on_unchanged_code_starts_the_old_version() -> None:
    harness = running()
    prepared(harness)
    harness.feed(sv.HostRequested(now=harness.now, event=lc.RestartRequested(now=500.0)))
    harness.exits(None)
    harness.answer(harness.work(sv.CheckCodeChanged), ok=False)
    assert len(harness.spawns) == 2 and harness.spawns[-1] == sv.Spawn(env={}, swap_id=None)
    assert harness.state.swap is not None and harness.state.swap.state is S.PREPARED


def test_an_exit_while_prepared_asks_once_and_unchanged_code_is_an_ordinary_crash() -> None:
    harness = running()
    prepared(harness)
    harness.at(10)
    harness.exits(1)
    assert harness.state.host.state is H.BACKOFF and harness.state.host.failures == 1
    assert len([a for a in harness.pending if isinstance(a, sv.CheckCodeChanged)]) == 1
    harness.at(11)
    harness.feed(sv.Tick(now=harness.now))  # the backoff ends while the check is out
    assert len([a for a in harness.pending if isinstance(a, sv.CheckCodeChanged)]) == 1
    assert harness.state.check == sv.CodeCheck("s1", spawn=True)
    harness.answer(harness.work(sv.CheckCodeChanged), ok=False)
    assert harness.process is not None and harness.state.swap.state is S.PREPARED  # type: ignore[union-attr]


def test_a_start_held_by_a_check_goes_ahead_once_an_abort_restored_the_code() -> None:
    harness = running()
    prepared(harness)
    harness.feed(sv.HostRequested(now=harness.now, event=lc.RestartRequested(now=500.0)))
    harness.exits(None)
    check = harness.work(sv.CheckCodeChanged)
    harness.feed(swaps.AbortRequested(now=harness.now))
    harness.answer(check, ok=True)  # answered mid-abort: the abort decides
    assert harness.process is None and harness.state.check is not None
    harness.finish_work()
    assert harness.state.swap is None and harness.state.check is None
    assert harness.process is not None and harness.spawns[-1] == sv.Spawn(env={}, swap_id=None)


def test_a_resumed_spawn_step_with_an_adopted_host_counts_it_as_spawned() -> None:
    pol = policy()
    harness = running(pol)
    swap = on_probation(harness)
    at_spawn = swaps.Swap.from_json(swap.to_json() | {"step": "spawn_new"})
    restarted = Harness(pol, sv.loaded(at_spawn))
    restarted.stored[swap.id] = at_spawn
    restarted.process = 7
    restarted.host(lc.Adopted(now=600.0, pid=7, ready=True, started=550.0))
    orders = restarted.feed(sv.Resumed(now=restarted.now, adopted=True))
    assert not restarted.spawns and restarted.state.swap.step is None  # type: ignore[union-attr]
    assert restarted.state.env["SWAPGUARD_SWAP_ID"] == swap.id
    assert any(isinstance(o, sv.VerifySnapshots) for o in orders)
    assert restarted.state.host.started_at == 550.0  # uptime from the process's own start


def test_a_confirm_waits_for_the_data_on_disk_and_is_answered() -> None:
    harness = running()
    swap = on_probation(harness, unsynced=True)
    assert harness.feed(swaps.ConfirmRequested(now=harness.now)) == []
    assert harness.state.confirm_waiting == swap.id
    harness.feed(swaps.ConfirmRequested(now=harness.now))  # a repeat waits too, no change
    harness.answer(harness.work(sv.SyncData), ok=True)
    assert harness.answers == [sv.AnswerConfirm(swap.id, None)]
    assert harness.finished[swap.id].state is S.CONFIRMED


def test_a_waiting_confirm_is_refused_when_the_data_cannot_be_synced() -> None:
    harness = running()
    swap = on_probation(harness, unsynced=True)
    harness.feed(swaps.ConfirmRequested(now=harness.now))
    harness.answer(harness.work(sv.SyncData), ok=False)
    [answer] = harness.answers
    assert answer.swap_id == swap.id and "rolling_back" in str(answer.error)
    assert harness.state.swap is not None and harness.state.swap.reason == "activation_failed"


def test_the_rolled_back_variables_go_to_one_spawn_only() -> None:
    harness = running()
    swap = on_probation(harness)
    harness.feed(swaps.RollbackRequested(now=harness.now, reason="requested"))
    harness.exits(None)
    harness.finish_work()
    assert harness.finished[swap.id].state is S.ROLLED_BACK
    assert harness.spawns[-1].env == {
        "SWAPGUARD_ROLLED_BACK": swap.id, "SWAPGUARD_ROLLBACK_REASON": "requested",
    }  # fmt: skip
    harness.at(100)
    harness.exits(1)
    harness.at(101)
    harness.feed(sv.Tick(now=harness.now))
    assert harness.spawns[-1].env == {}


def test_an_operator_may_not_move_the_host_while_a_swap_step_drives_it() -> None:
    harness = running()
    prepared(harness)
    harness.feed(swaps.ActivateRequested(now=harness.now))
    with pytest.raises(Conflict, match="the host follows the swap"):
        harness.feed(sv.HostRequested(now=harness.now, event=lc.StartRequested(now=500.0)))


def test_a_stop_step_is_done_at_once_when_the_host_is_already_stopped() -> None:
    harness = running()
    harness.feed(sv.HostRequested(now=harness.now, event=lc.StopRequested(now=500.0)))
    harness.exits(None)
    prepared(harness)
    orders = harness.feed(swaps.ActivateRequested(now=harness.now))
    steps = [o.swap.step for o in orders if isinstance(o, sv.PersistSwap)]
    assert steps == [swaps.Step.STOP_OLD, swaps.Step.SNAPSHOT]  # each saved, in order
    assert isinstance(orders[-1], sv.TakeSnapshots)


def test_results_for_a_swap_no_longer_in_flight_are_dropped() -> None:
    harness = running()
    swap = on_probation(harness)
    stale = swaps.StepDone(now=harness.now, step=swaps.Step.SNAPSHOT, result={"data": []})
    before = harness.state
    assert harness.feed(sv.WorkReported(swap_id="another", event=stale)) == []
    assert harness.state == before and harness.state.swap == swap


def test_a_rollback_that_gives_up_leaves_the_host_stopped() -> None:
    harness = running()
    on_probation(harness)
    harness.feed(swaps.RollbackRequested(now=harness.now, reason="requested"))
    harness.exits(None)
    harness.spawn_fails = True
    for attempt in range(1, 10):
        harness.finish_work()
        if harness.state.swap is not None and harness.state.swap.state is S.FAILED:
            break
        harness.at(attempt * 40)
        harness.feed(sv.Tick(now=harness.now))
    assert harness.state.swap is not None and harness.state.swap.state is S.FAILED
    assert harness.state.host.state is H.STOPPED and not harness.state.host.wanted
    harness.at(1000)
    harness.feed(sv.Tick(now=harness.now))
    assert harness.state.host.state is H.STOPPED


def test_no_spawn_until_the_last_tree_kill_reports_the_tree_gone() -> None:
    harness = running()
    harness.slow_kills = True
    harness.at(5)
    harness.exits(0)  # a clean exit after min_uptime: restarted at once, once its tree is gone
    kill = harness.work(sv.KillTree)
    assert len(harness.spawns) == 1 and harness.state.spawn_held
    assert harness.state.host.state is H.STARTING and harness.state.host.pid is None
    orders = harness.answer(kill)
    assert len(harness.spawns) == 2 and not harness.state.spawn_held
    assert sv.Emit("host.tree_killed", {"processes": 2}) in orders


def test_a_held_spawn_is_dropped_when_the_host_is_stopped_meanwhile() -> None:
    harness = running()
    harness.slow_kills = True
    harness.at(5)
    harness.exits(0)
    harness.feed(sv.HostRequested(now=harness.now, event=lc.StopRequested(now=505.0)))
    harness.answer(harness.work(sv.KillTree))
    assert len(harness.spawns) == 1 and harness.state.host.state is H.STOPPED
    assert not harness.state.spawn_held and harness.state.kills == 0


def test_a_rollback_restores_nothing_until_the_new_versions_tree_is_gone() -> None:
    harness = running()
    swap = on_probation(harness)
    harness.slow_kills = True
    harness.at(61)
    harness.feed(sv.Tick(now=harness.now))  # the deadline: the rollback begins at once
    assert harness.stored[swap.id].state is S.ROLLING_BACK
    harness.exits(None)  # the new version stops; what it left is still being killed
    assert harness.state.host.state is H.STOPPED
    assert harness.stored[swap.id].step is swaps.Step.STOP_NEW
    assert not any(isinstance(a, sv.RestoreCode) for a in harness.pending)
    harness.answer(harness.work(sv.KillTree))
    assert harness.stored[swap.id].step is swaps.Step.RESTORE_CODE
    harness.finish_work()
    assert harness.finished[swap.id].state is S.ROLLED_BACK and harness.process is not None


def test_requests_that_are_refused_change_nothing() -> None:
    harness = running()
    before = harness.state
    with pytest.raises(Conflict, match="no swap"):
        harness.feed(swaps.ConfirmRequested(now=harness.now))
    prepared(harness)
    with pytest.raises(Conflict, match="in flight"):
        prepared(harness, "s2")
    with pytest.raises(BadRequest):
        Harness(policy(), before).feed(
            sv.PrepareRequested(now=T0, swap_id="bad id", summary="", checkpoint={})
        )


def test_a_heartbeat_moves_only_the_host_clock_and_keeps_every_other_field() -> None:
    harness = running()
    swap = on_probation(harness, unsynced=True)
    harness.feed(swaps.ConfirmRequested(now=harness.now))
    full = replace(
        harness.state, check=sv.CodeCheck("x", spawn=False), env_one_shot=True, kills=1,
        spawn_held=True, liveness=sv.Liveness(next_at=700.0, failures=1), checks_ordered=3,
    )  # fmt: skip
    assert all(getattr(full, f.name) != getattr(sv.Supervision(), f.name) for f in fields(full))
    beat = lc.Heartbeat(now=600.0, status="busy")
    beaten = sv.heartbeat(full, beat, harness.policy)
    assert beaten == replace(full, host=lc.step(full.host, beat, harness.policy.host)[0])
    assert sv.step(full, sv.HostInput(now=T0, event=beat), harness.policy) == (beaten, [])
    assert beaten is not None and beaten.swap == swap and beaten.host.status_text == "busy"
    adopted, _ = lc.step(lc.Host(), lc.Adopted(now=1.0, pid=3, ready=False), harness.policy.host)
    assert sv.heartbeat(sv.Supervision(host=adopted), beat, harness.policy) is None


def test_a_clean_exit_of_the_new_version_that_rolls_it_back_spawns_no_untracked_host() -> None:
    """Found by the walk: an exit with status 0 after min_uptime makes the host machine order a
    restart, and the same exit is the crash that rolls the swap back, which stops the host. The
    restart is overtaken: no spawn happens beside the rollback's."""
    harness = running(policy(max_crashes=1))
    swap = on_probation(harness)
    harness.host(lc.Ready(now=harness.now.boot))
    harness.at(5.0)
    spawns = len(harness.spawns)
    harness.exits(0)
    assert harness.state.swap is not None and harness.state.swap.state is S.ROLLING_BACK
    assert harness.state.host.state is H.STOPPED and len(harness.spawns) == spawns
    harness.finish_work()
    assert harness.finished[swap.id].state is S.ROLLED_BACK
    assert harness.spawns[-1].env.get("SWAPGUARD_ROLLED_BACK") == swap.id


def test_a_resumed_runtime_shows_the_recalled_exit_and_goes_on() -> None:
    last = lc.LastExit(None, 15, 1.0, lc.ExitReason.UNHEALTHY)
    harness = Harness(policy())
    recalled = lc.Recalled(now=harness.now.boot, last_exit=last)
    harness.feed(sv.Resumed(now=harness.now, adopted=False, recalled=recalled))
    assert harness.state.host.last_exit == last and harness.process is not None


def live(**knobs: Any) -> Harness:
    """A ready host with the liveness check on (every 10 s, 3 failures restart it)."""
    return running(policy(health_always=True, has_health_check=True, **knobs))


def next_liveness_check(harness: Harness) -> sv.RunHealthCheck:
    wake = sv.next_wakeup(harness.state, harness.policy, harness.now)
    assert wake is not None
    harness.at(wake - T0.boot)
    harness.feed(sv.Tick(now=harness.now))
    check = harness.work(sv.RunHealthCheck)
    assert isinstance(check, sv.RunHealthCheck) and check.swap_id is None
    return check


def test_liveness_failures_in_a_row_restart_a_ready_host_as_a_failure() -> None:
    harness = live()
    pid = harness.process
    for _ in range(2):
        harness.answer(next_liveness_check(harness), ok=False)
    harness.answer(next_liveness_check(harness), ok=True)  # the count starts again
    for _ in range(2):
        harness.answer(next_liveness_check(harness), ok=False)
    assert harness.state.host.state is H.RUNNING and "host.unhealthy" not in harness.events
    harness.answer(next_liveness_check(harness), ok=False)
    assert harness.events.count("host.unhealthy") == 1
    assert harness.state.host.state is H.STOPPING and harness.state.liveness == sv.Liveness()
    harness.exits(None)  # SIGTERM did it
    host = harness.state.host
    assert host.last_exit is not None and host.last_exit.reason is lc.ExitReason.UNHEALTHY
    assert host.failures == 1  # a failure for the backoff, like a lost heartbeat
    harness.feed(sv.Tick(now=harness.at(harness.now.boot - T0.boot + 1)))
    harness.host(lc.Ready(now=harness.now.boot))
    assert harness.process not in (None, pid) and harness.state.host.state is H.RUNNING


def test_liveness_runs_one_check_at_a_time_and_never_on_probation() -> None:
    harness = live()
    first = next_liveness_check(harness)
    harness.feed(sv.Tick(now=harness.at(harness.now.boot - T0.boot + 35)))  # three turns missed
    assert [a for a in harness.pending if isinstance(a, sv.RunHealthCheck)] == [first]
    wake = sv.next_wakeup(harness.state, harness.policy, harness.now)
    assert wake is not None and wake > harness.now.boot  # skipped, not made up in a burst
    prepared(harness)  # the old version still serves: liveness goes on
    harness.answer(first, ok=False)
    assert harness.state.liveness.failures == 1
    second = next_liveness_check(harness)
    cancels = harness.cancels
    swap = on_probation(harness, prepare=False)
    assert harness.cancels == cancels + 1  # the check in flight is cancelled as the swap goes on
    harness.answer(second, ok=False)  # and its late report counts for nothing
    assert harness.state.liveness == sv.Liveness()
    harness.host(lc.Ready(now=harness.now.boot))
    for _ in range(5):
        harness.feed(sv.Tick(now=harness.at(harness.now.boot - T0.boot + 10)))
    checks = [a for a in harness.pending if isinstance(a, sv.RunHealthCheck)]
    assert checks and all(check.swap_id == swap.id for check in checks)  # the swap's own
    for check in checks:
        harness.answer(check, ok=True)
    harness.feed(swaps.ConfirmRequested(now=harness.now))
    assert harness.state.swap is None
    harness.answer(next_liveness_check(harness), ok=False)  # the confirmed version's liveness
    assert harness.state.liveness.failures == 1


def test_a_liveness_result_from_before_a_restart_is_dropped() -> None:
    harness = live(health_failures=1)
    check = next_liveness_check(harness)
    harness.feed(sv.HostRequested(now=harness.now, event=lc.RestartRequested(now=harness.now.boot)))
    harness.exits(None)
    harness.host(lc.Ready(now=harness.now.boot))
    harness.answer(check, ok=False)
    assert "host.unhealthy" not in harness.events and harness.state.host.state is H.RUNNING


def test_a_liveness_result_of_an_earlier_run_never_counts_against_the_next() -> None:
    harness = live(health_failures=1)
    stale = next_liveness_check(harness)
    assert harness.cancels == 0
    harness.feed(sv.HostRequested(now=harness.now, event=lc.RestartRequested(now=harness.now.boot)))
    assert harness.cancels == 1  # the run it checks is ending: cancelled, one check at a time
    harness.exits(None)
    harness.host(lc.Ready(now=harness.now.boot))
    next_liveness_check(harness)  # the new run's check is in flight when ...
    (current,) = [a for a in harness.pending if isinstance(a, sv.RunHealthCheck) and a != stale]
    assert current.swap_id is None
    harness.answer(stale, ok=False)  # ... the old run's comes back, late
    assert "host.unhealthy" not in harness.events and harness.state.host.state is H.RUNNING
    assert harness.state.liveness.in_flight  # still waiting for the new run's own
    harness.answer(current, ok=False)
    assert harness.events.count("host.unhealthy") == 1


def test_without_health_always_no_check_runs_outside_probation() -> None:
    harness = running(policy(has_health_check=True))
    harness.feed(sv.Tick(now=harness.at(100.0)))
    assert not harness.pending
    assert sv.next_wakeup(harness.state, harness.policy, harness.now) is None


# --- random walks ------------------------------------------------------------------------------

REQUESTS = [swaps.ActivateRequested, swaps.ConfirmRequested, swaps.ExtendRequested,
            swaps.AbortRequested]  # fmt: skip


class SupervisionWalk(RuleBasedStateMachine):
    """Random inputs, outcomes and time for host and swap together; the harness checks each
    order as it is performed, the invariants hold after every event."""

    def __init__(self) -> None:
        super().__init__()
        self.h = Harness(policy())
        self.swaps_made = 0
        self.seconds = 0.0

    @initialize(
        has_data=st.booleans(),
        has_build=st.booleans(),
        has_health_check=st.booleans(),
        health_always=st.booleans(),
        auto_confirm_after=st.sampled_from([0.0, 15.0]),
        window=st.sampled_from([20.0, 60.0]),
        max_step_attempts=st.integers(1, 3),
        heartbeat_timeout=st.sampled_from([0.0, 4.0]),
        stage=st.sampled_from(["fresh", "prepared", "probation", "rolling_back"]),
        unsynced=st.booleans(),
    )
    def configure(
        self, heartbeat_timeout: float, stage: str, unsynced: bool, **knobs: Any
    ) -> None:
        """Start some walks further on, so that probation and rollback are walked often."""
        pol = policy(**knobs)
        host = lc.Policy(
            ready_mode="notify", start_timeout=5, min_uptime=1,
            heartbeat_timeout=heartbeat_timeout, stop_timeout=3, restart="always",
            restart_reset_after=10, backoff=lambda n: 0.5 * n,
        )  # fmt: skip
        self.h = Harness(sv.Policy(host=host, swap=pol.swap, health_always=pol.health_always))
        self.h.feed(sv.Resumed(now=self.h.now, adopted=False))
        self.h.host(lc.Ready(now=self.h.now.boot))
        if stage != "fresh":
            self.swaps_made = 1
            prepared(self.h)
        if stage in ("probation", "rolling_back"):
            on_probation(self.h, unsynced=unsynced, prepare=False)
            self.h.host(lc.Ready(now=self.h.now.boot))
        if stage == "rolling_back":
            self.h.feed(swaps.RollbackRequested(now=self.h.now))

    def feed(self, event: sv.Event) -> bool:
        try:
            self.h.feed(event)
        except (Conflict, BadRequest):
            assert isinstance(event, swaps.Request | sv.HostRequested | sv.PrepareRequested)
            return False
        return True

    @rule(seconds=st.floats(0.0, 20.0))
    def time_passes(self, seconds: float) -> None:
        self.seconds += seconds
        self.h.at(self.seconds)

    @rule()
    def time_reaches_the_next_wakeup(self) -> None:
        wake = sv.next_wakeup(self.h.state, self.h.policy, self.h.now)
        if wake is not None and wake > self.h.now.boot:
            self.seconds += wake - self.h.now.boot
            self.h.at(self.seconds)

    @rule()
    def tick(self) -> None:
        self.feed(sv.Tick(now=self.h.now))

    @rule(fails=st.booleans())
    def spawns_fail(self, fails: bool) -> None:
        self.h.spawn_fails = fails

    @rule(request=st.sampled_from([lc.StartRequested, lc.StopRequested, lc.RestartRequested]))
    def operator(self, request: type[lc.StartRequested]) -> None:
        swap = self.h.state.swap
        took = self.feed(sv.HostRequested(now=self.h.now, event=request(now=self.h.now.boot)))
        assert took == (swap is None or swap.step is None)

    @precondition(lambda self: self.h.process is not None)
    @rule(code=st.sampled_from([0, 1, None]))
    def process_exits(self, code: int | None) -> None:
        self.h.exits(code)

    @precondition(lambda self: self.h.process is not None)
    @rule(message=st.sampled_from([lc.Ready, lc.Heartbeat, lc.WatchdogTriggered]))
    def host_says(self, message: type[lc.Ready]) -> None:
        self.h.host(message(now=self.h.now.boot))

    @rule()
    def prepare(self) -> None:
        self.swaps_made += 1
        swap_id = f"s{self.swaps_made}"
        event = sv.PrepareRequested(now=self.h.now, swap_id=swap_id, summary="", checkpoint={})
        free = self.h.state.swap is None
        assert self.feed(event) == free

    @rule(request=st.sampled_from(REQUESTS))
    def request(self, request: type[swaps.Request]) -> None:
        self.feed(request(now=self.h.now))

    @rule()
    def rollback_request(self) -> None:
        self.feed(swaps.RollbackRequested(now=self.h.now))

    @precondition(
        lambda self: self.h.state.swap is not None
        and self.h.state.swap.state is S.PROBATION
        and self.h.state.confirm_waiting is None
    )
    @rule(confirm_first=st.booleans())
    def confirm_and_rollback_race(self, confirm_first: bool) -> None:
        race: list[swaps.Request] = [
            swaps.ConfirmRequested(now=self.h.now), swaps.RollbackRequested(now=self.h.now)
        ]  # fmt: skip
        swap_id = self.h.state.swap.id  # type: ignore[union-attr]
        took = [self.feed(request) for request in (race if confirm_first else race[::-1])]
        rolled_back = took[1] if confirm_first else took[0]
        finished = self.h.finished.get(swap_id)
        confirmed = finished is not None and finished.state is S.CONFIRMED
        waiting = self.h.state.confirm_waiting == swap_id  # a confirm waiting for the data
        assert rolled_back != (confirmed or waiting), "exactly one of them wins"

    @precondition(lambda self: self.h.pending)
    @rule(pick=st.integers(0, 10), ok=st.booleans(), unsynced=st.booleans())
    def work_reports(self, pick: int, ok: bool, unsynced: bool) -> None:
        action = self.h.pending[pick % len(self.h.pending)]
        event(f"answered {type(action).__name__}")
        self.h.answer(action, ok=ok, unsynced=unsynced)

    @invariant()
    def a_swap_on_probation_is_always_timed(self) -> None:
        swap = self.h.state.swap
        if swap is None or swap.state is not S.PROBATION:
            return
        event(f"probation at {swap.step}")
        due = swaps.earliest([swap.deadline, swap.hard_cap])
        assert due is not None
        wake = sv.next_wakeup(self.h.state, self.h.policy, self.h.now)
        assert wake is not None and wake <= due.boot + 1e-9

    @invariant()
    def starting_without_a_pid_only_while_a_code_check_holds_the_spawn(self) -> None:
        host = self.h.state.host
        if host.state is H.STARTING and host.pid is None:
            assert self.h.state.check is not None and self.h.state.check.spawn

    @invariant()
    def the_machine_knows_the_live_process(self) -> None:
        assert self.h.state.host.pid == self.h.process

    @invariant()
    def a_failed_rollback_leaves_the_host_down(self) -> None:
        swap = self.h.state.swap
        if swap is not None and swap.state is S.FAILED:
            event("rollback failed")
            assert self.h.state.host.state in (H.STOPPED, H.STOPPING)
            assert not self.h.state.host.wanted

    @invariant()
    def confirm_and_rollback_are_exclusive(self) -> None:
        for answer in self.h.answers:
            if answer.error is None:
                assert self.h.finished[answer.swap_id].state is S.CONFIRMED
        for swap_id, kinds in self.h.swap_events.items():
            assert not ("swap.confirmed" in kinds and "swap.rollback_started" in kinds), swap_id
        for swap in self.h.finished.values():
            event(f"finished {swap.state}")

    @invariant()
    def liveness_is_scheduled_only_while_it_runs_and_restarts_only_at_the_limit(self) -> None:
        state, pol = self.h.state, self.h.policy
        live = state.liveness
        swap = state.swap
        runs = (
            pol.health_always
            and pol.swap.has_health_check
            and state.host.state is H.RUNNING
            and (swap is None or (swap.state is S.PREPARED and swap.step is None))
        )
        if not runs:
            assert live == sv.Liveness()
            return
        event("liveness runs")
        assert live.next_at is not None and live.failures < pol.swap.health_failures
        wake = sv.next_wakeup(state, pol, self.h.now)
        assert wake is not None and wake <= live.next_at

    @invariant()
    def a_waiting_confirm_waits_only_for_the_data(self) -> None:
        waiting = self.h.state.confirm_waiting
        if waiting is not None:
            swap = self.h.state.swap
            assert swap is not None and swap.id == waiting and swap.data_unsynced


SupervisionWalk.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSupervisionWalk = SupervisionWalk.TestCase
