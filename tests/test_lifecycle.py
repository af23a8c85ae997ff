"""The host lifecycle machine, driven directly: no processes, no sockets, the clock is a number."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from supervisor.core import lifecycle as lc

POLICY = lc.Policy(ready_mode="notify", start_timeout=5, min_uptime=1, heartbeat_timeout=2,
                   stop_timeout=3, restart="always", restart_reset_after=10,
                   backoff=lambda n: 0.5 * 2 ** (n - 1))


def run(events: list[lc.Event], policy: lc.Policy = POLICY,
        host: lc.Host | None = None) -> tuple[lc.Host, list[lc.Action]]:
    host = host or lc.Host()
    actions: list[lc.Action] = []
    for event in events:
        host, more = lc.step(host, event, policy)
        actions += more
    return host, actions


def emitted(actions: list[lc.Action]) -> list[str]:
    return [a.event for a in actions if isinstance(a, lc.Emit)]


def running(now: float = 0.0, policy: lc.Policy = POLICY) -> lc.Host:
    host, _ = run([lc.StartRequested(now=now), lc.Spawned(now=now, pid=10), lc.Ready(now=now)],
                  policy)
    return host


def test_start_spawn_ready() -> None:
    host, actions = run([lc.StartRequested(now=0)])
    assert host.state is lc.HostState.STARTING and actions == [lc.Spawn()]
    host, actions = lc.step(host, lc.Spawned(now=0.1, pid=42), POLICY)
    assert host.pid == 42 and emitted(actions) == ["host.started"]
    host, actions = lc.step(host, lc.Ready(now=0.2), POLICY)
    assert host.state is lc.HostState.RUNNING and host.ready and emitted(actions) == ["host.ready"]


def test_ready_mode_started_is_ready_after_min_uptime() -> None:
    policy = lc.Policy(ready_mode="started", min_uptime=1)
    host, _ = run([lc.StartRequested(now=0), lc.Spawned(now=0, pid=1)], policy)
    assert lc.next_wakeup(host, policy) == 1
    host, _ = lc.step(host, lc.Tick(now=0.5), policy)
    assert host.state is lc.HostState.STARTING
    host, _ = lc.step(host, lc.Tick(now=1.0), policy)
    assert host.state is lc.HostState.RUNNING


def test_crash_backs_off_doubling_then_resets() -> None:
    host = running()
    delays = []
    now = 10.0
    for _ in range(3):
        host, actions = lc.step(host, lc.Exited(now=now, wall=0, code=1, signal=None), POLICY)
        assert host.state is lc.HostState.BACKOFF
        assert lc.KillTree() in actions
        delays.append(host.backoff_until - now)
        now = host.backoff_until
        host, actions = lc.step(host, lc.Tick(now=now), POLICY)
        assert actions == [lc.Spawn()] and host.state is lc.HostState.STARTING
        host, _ = run([lc.Spawned(now=now, pid=11), lc.Ready(now=now)], host=host)
    assert delays == [0.5, 1.0, 2.0]
    assert host.restarts == 3
    # ready for restart_reset_after forgets the failures
    host, _ = lc.step(host, lc.Heartbeat(now=now + 9.9), POLICY)
    host, actions = lc.step(host, lc.Tick(now=now + 10), POLICY)
    assert host.failures == 0 and emitted(actions) == ["host.backoff_reset"]


def test_zero_delay_respawns_in_the_same_step() -> None:
    policy = lc.Policy(backoff=lambda n: 0.0)
    host = running(policy=policy)
    host, actions = lc.step(host, lc.Exited(now=5, wall=0, code=1, signal=None), policy)
    assert host.state is lc.HostState.STARTING
    assert actions[0] == lc.KillTree() and actions[-1] == lc.Spawn()


def test_crash_loop_is_reported_once_and_never_gives_up() -> None:
    host = running()
    seen = []
    now = 1.0
    for _ in range(lc.CRASH_LOOP_FAILURES + 2):
        host, actions = lc.step(host, lc.Exited(now=now, wall=0, code=2, signal=None), POLICY)
        seen += emitted(actions)
        assert host.state is lc.HostState.BACKOFF
        now = host.backoff_until
        host, _ = run([lc.Tick(now=now), lc.Spawned(now=now, pid=3)], host=host)
    assert seen.count("host.crash_loop") == 1


def test_clean_exit_after_min_uptime_is_not_a_failure() -> None:
    host = running()
    host, _ = lc.step(host, lc.Exited(now=100, wall=0, code=0, signal=None), POLICY)
    assert host.failures == 0 and host.state is lc.HostState.STARTING


@pytest.mark.parametrize("restart,code,expected", [
    ("no", 1, lc.HostState.STOPPED),
    ("no", 0, lc.HostState.STOPPED),
    ("on-failure", 0, lc.HostState.STOPPED),
    ("on-failure", 1, lc.HostState.BACKOFF),
    ("always", 0, lc.HostState.STARTING),
])
def test_restart_policies(restart: str, code: int, expected: lc.HostState) -> None:
    policy = lc.Policy(restart=restart, backoff=lambda n: 1.0, min_uptime=1)
    host = running(policy=policy)
    host, _ = lc.step(host, lc.Exited(now=50, wall=0, code=code, signal=None), policy)
    assert host.state is expected


def test_intentional_restart_is_never_a_crash() -> None:
    host = running()
    host, actions = lc.step(host, lc.RestartRequested(now=1), POLICY)
    assert host.state is lc.HostState.STOPPING and actions == [lc.SignalStop()]
    host, actions = lc.step(host, lc.Exited(now=1.1, wall=0, code=None, signal=15), POLICY)
    assert host.state is lc.HostState.STARTING and host.failures == 0
    assert actions[-1] == lc.Spawn() and "host.exited" not in emitted(actions)


def test_stop_escalates_to_tree_kill_after_stop_timeout() -> None:
    host = running()
    host, actions = lc.step(host, lc.StopRequested(now=1), POLICY)
    assert actions == [lc.SignalStop()] and lc.next_wakeup(host, POLICY) == 4
    host, actions = lc.step(host, lc.Tick(now=4), POLICY)
    assert lc.KillTree() in actions and host.state is lc.HostState.STOPPING
    host, actions = lc.step(host, lc.Exited(now=4.01, wall=0, code=None, signal=9), POLICY)
    assert host.state is lc.HostState.STOPPED and not host.wanted and host.pid is None


def test_start_timeout_restarts_through_a_stop() -> None:
    host, _ = run([lc.StartRequested(now=0), lc.Spawned(now=0, pid=5)])
    host, actions = lc.step(host, lc.Tick(now=5), POLICY)
    assert emitted(actions) == ["host.start_timeout"] and host.state is lc.HostState.STOPPING
    host, actions = lc.step(host, lc.Exited(now=5.1, wall=0, code=None, signal=15), POLICY)
    assert host.state is lc.HostState.BACKOFF and host.failures == 1


def test_heartbeat_loss() -> None:
    host = running()
    host, _ = lc.step(host, lc.Heartbeat(now=1.5, status="busy"), POLICY)
    assert host.status_text == "busy" and lc.next_wakeup(host, POLICY) == 3.5
    host, actions = lc.step(host, lc.Tick(now=3.4), POLICY)
    assert actions == []
    host, actions = lc.step(host, lc.Tick(now=3.5), POLICY)
    assert "host.heartbeat_lost" in emitted(actions) and host.state is lc.HostState.STOPPING


def test_spawn_failure_backs_off() -> None:
    host, _ = run([lc.StartRequested(now=0)])
    host, actions = lc.step(host, lc.SpawnFailed(now=0, wall=0, error="no such file"), POLICY)
    assert emitted(actions)[0] == "host.spawn_failed" and host.state is lc.HostState.BACKOFF


def test_a_failed_spawn_backs_off_even_with_no_delay() -> None:
    """Nothing to exec fails at once, every time: a zero delay must not retry within the turn
    (the runtime would spin), but at the next tick."""
    policy = lc.Policy(backoff=lambda n: 0.0)
    host, _ = run([lc.StartRequested(now=0)], policy)
    host, actions = lc.step(host, lc.SpawnFailed(now=1, wall=0, error="ENOENT"), policy)
    assert host.state is lc.HostState.BACKOFF and lc.Spawn() not in actions
    assert lc.next_wakeup(host, policy) == 1
    host, actions = lc.step(host, lc.Tick(now=1), policy)
    assert actions == [lc.Spawn()]


def test_stop_during_backoff_and_start_again() -> None:
    host = running()
    host, _ = lc.step(host, lc.Exited(now=1, wall=0, code=1, signal=None), POLICY)
    host, actions = lc.step(host, lc.StopRequested(now=1.1), POLICY)
    assert host.state is lc.HostState.STOPPED and actions == []
    assert lc.next_wakeup(host, POLICY) is None
    host, actions = lc.step(host, lc.StartRequested(now=2), POLICY)
    assert actions == [lc.Spawn()]


def test_adopted_host_is_running() -> None:
    host, actions = lc.step(lc.Host(), lc.Adopted(now=3, pid=77, ready=True), POLICY)
    assert host.state is lc.HostState.RUNNING and host.pid == 77 and host.wanted
    assert emitted(actions) == ["host.adopted"]


def test_exit_of_unknown_process_is_ignored() -> None:
    host, actions = lc.step(lc.Host(), lc.Exited(now=1, wall=0, code=0, signal=None), POLICY)
    assert actions == [] and host == lc.Host()


def test_stop_before_the_spawn_happened_is_immediate() -> None:
    host, _ = run([lc.StartRequested(now=0)])
    host, actions = lc.step(host, lc.StopRequested(now=0.1), POLICY)
    assert host.state is lc.HostState.STOPPED and actions == []


def test_watchdog_trigger_counts_as_a_lost_heartbeat() -> None:
    host = running()
    host, actions = lc.step(host, lc.WatchdogTriggered(now=1), POLICY)
    assert "host.heartbeat_lost" in emitted(actions) and host.state is lc.HostState.STOPPING


def test_an_adopted_starting_host_is_ready_at_its_first_heartbeat() -> None:
    """Its READY=1 may have gone to the supervisor that died; it is sent only once."""
    host, _ = lc.step(lc.Host(), lc.Adopted(now=0, pid=9, ready=False), POLICY)
    assert host.state is lc.HostState.STARTING
    host, actions = lc.step(host, lc.Heartbeat(now=1), POLICY)
    assert host.state is lc.HostState.RUNNING and emitted(actions) == ["host.ready"]
    fresh, _ = run([lc.StartRequested(now=0), lc.Spawned(now=0, pid=10), lc.Heartbeat(now=1)])
    assert fresh.state is lc.HostState.STARTING  # a spawned host still needs READY=1


def test_a_deferred_spawn_does_not_time_out_on_the_previous_spawn_time() -> None:
    """A start while a swap is prepared waits for git before spawning: no stale start timeout."""
    host = running(now=0)
    host, _ = lc.step(host, lc.Exited(now=100, wall=0, code=0, signal=None), POLICY)
    assert host.state is lc.HostState.STARTING and host.pid is None and host.spawned_at is None
    assert lc.next_wakeup(host, POLICY) is None
    host, actions = lc.step(host, lc.Tick(now=200), POLICY)
    assert actions == [] and host.state is lc.HostState.STARTING
    host, _ = lc.step(host, lc.Spawned(now=201, pid=7), POLICY)
    assert host.pid == 7 and lc.next_wakeup(host, POLICY) == 206


def test_readiness_is_not_a_heartbeat_and_the_timeout_runs_from_it() -> None:
    """A ready = "started" host that never heartbeats has no heartbeat to show, and a host that
    is silent after READY=1 loses it heartbeat_timeout after readiness."""
    started = lc.Policy(ready_mode="started", min_uptime=1)
    host, _ = run([lc.StartRequested(now=0), lc.Spawned(now=0, pid=1), lc.Tick(now=1)], started)
    assert host.state is lc.HostState.RUNNING and host.last_heartbeat is None
    host = running(now=10)
    assert host.last_heartbeat is None and lc.next_wakeup(host, POLICY) == 12
    host, _ = lc.step(host, lc.Heartbeat(now=11), POLICY)
    assert host.last_heartbeat == 11 and lc.next_wakeup(host, POLICY) == 13
    adopted, _ = lc.step(lc.Host(), lc.Adopted(now=5, pid=3, ready=True), POLICY)
    assert adopted.last_heartbeat is None and lc.next_wakeup(adopted, POLICY) == 7


def reason_after(events: list[lc.Event], exit_code: int | None = None) -> lc.ExitReason:
    host, _ = run(events, host=running(now=0))
    signal = 15 if exit_code is None else None
    host, _ = lc.step(host, lc.Exited(now=50, wall=0, code=exit_code, signal=signal), POLICY)
    assert host.last_exit is not None
    return host.last_exit.reason


R = lc.ExitReason


@pytest.mark.parametrize(
    ("events", "code", "reason"),
    [
        ([lc.StopRequested(now=1)], None, R.STOP),
        ([lc.RestartRequested(now=1)], None, R.RESTART),
        ([lc.Tick(now=2.5)], None, R.HEARTBEAT_LOST),
        ([lc.WatchdogTriggered(now=1)], None, R.HEARTBEAT_LOST),
        ([lc.Unhealthy(now=1, failures=3, detail="exit 1")], None, R.UNHEALTHY),
        ([lc.Heartbeat(now=1)], 1, R.CRASH),
        ([lc.Heartbeat(now=1)], None, R.CRASH),  # a signal nobody sent for a reason of ours
        ([lc.Heartbeat(now=1)], 0, R.EXIT),
        ([lc.Unhealthy(now=1, failures=3), lc.StopRequested(now=2)], None, R.UNHEALTHY),
    ],
)
def test_every_exit_says_why(events: list[lc.Event], code: int | None, reason: R) -> None:
    assert reason_after(events, code) is reason


def test_an_exit_before_readiness_is_a_crash_and_a_start_timeout_says_so() -> None:
    host, _ = run([lc.StartRequested(now=0), lc.Spawned(now=0, pid=1)])
    crashed, actions = lc.step(host, lc.Exited(now=3, wall=0, code=0, signal=None), POLICY)
    assert crashed.last_exit is not None and crashed.last_exit.reason is R.CRASH
    exited = [a for a in actions if isinstance(a, lc.Emit) and a.event is lc.Fact.EXITED]
    assert [a.detail["reason"] for a in exited] == ["crash"]
    host, _ = run([lc.Tick(now=5), lc.Exited(now=6, wall=0, code=None, signal=15)], host=host)
    assert host.last_exit is not None and host.last_exit.reason is R.START_TIMEOUT
    failed, _ = run([lc.StartRequested(now=0), lc.SpawnFailed(now=0, wall=0, error="ENOENT")])
    assert failed.last_exit is not None and failed.last_exit.reason is R.SPAWN_FAILED


def test_a_recalled_exit_is_shown_until_one_seen_here() -> None:
    old = lc.LastExit(None, 15, 1.0, R.HEARTBEAT_LOST)
    host, actions = lc.step(lc.Host(), lc.Recalled(now=0, last_exit=old), POLICY)
    assert host.last_exit == old and actions == []
    host = running(now=1)
    host, _ = lc.step(host, lc.Exited(now=5, wall=2.0, code=1, signal=None), POLICY)
    again, _ = lc.step(host, lc.Recalled(now=6, last_exit=old), POLICY)
    assert again.last_exit is not None and again.last_exit.reason is R.CRASH


def test_unhealthy_restarts_a_running_host_only() -> None:
    host, actions = lc.step(running(), lc.Unhealthy(now=1, failures=3, detail="x"), POLICY)
    assert host.state is lc.HostState.STOPPING and host.stop_purpose is lc.StopPurpose.RECOVER
    assert emitted(actions) == ["host.unhealthy"] and lc.SignalStop() in actions
    again, actions = lc.step(host, lc.Unhealthy(now=2, failures=3), POLICY)
    assert again == host and actions == []


# --- random walks ------------------------------------------------------------------------------


class HostWalk(RuleBasedStateMachine):
    """The runtime's side played by the walk: a Spawn is performed at once (the process starts or
    the spawn fails), a process exits when the walk says; invariants hold after every event."""

    def __init__(self) -> None:
        super().__init__()
        self.policy = POLICY
        self.host = lc.Host()
        self.now = 0.0
        self.process: int | None = None  # the live host process, as the runtime sees it
        self.next_pid = 100
        self.spawn_fails = False

    @initialize(
        ready_mode=st.sampled_from(["notify", "started"]),
        restart=st.sampled_from(["always", "on-failure", "no"]),
        heartbeat_timeout=st.sampled_from([0.0, 2.0]),
        delay=st.sampled_from([0.0, 0.5]),
        adopted=st.sampled_from([None, False, True]),
    )
    def configure(
        self, ready_mode: str, restart: str, heartbeat_timeout: float, delay: float,
        adopted: bool | None,
    ) -> None:  # fmt: skip
        self.policy = lc.Policy(
            ready_mode=ready_mode, start_timeout=5, min_uptime=1,
            heartbeat_timeout=heartbeat_timeout, stop_timeout=3, restart=restart,
            restart_reset_after=10, backoff=lambda n: delay * 2 ** (n - 1),
        )  # fmt: skip
        if adopted is not None:
            self.process = self.next_pid
            self.feed(lc.Adopted(now=self.now, pid=self.process, ready=adopted, started=-50.0))

    def feed(self, event: lc.Event) -> None:
        before = self.host
        self.host, actions = lc.step(before, event, self.policy)
        asked = before.stop_purpose in (lc.StopPurpose.HALT, lc.StopPurpose.RESTART)
        if isinstance(event, lc.Exited) and before.state is lc.HostState.STOPPING and asked:
            assert self.host.failures == before.failures, "an intentional stop counted"
        for action in actions:  # every action is allowed in the state it came from
            match action:
                case lc.Spawn():
                    assert self.process is None, "a second host while one runs"
                    assert self.host.state is lc.HostState.STARTING and self.host.pid is None
                    self.spawn()
                case lc.SignalStop():
                    assert self.host.state is lc.HostState.STOPPING and self.process is not None
                case lc.KillTree():
                    assert isinstance(event, lc.Exited | lc.Tick)
                case lc.Emit(event=fact):
                    assert isinstance(fact, lc.Fact)

    def spawn(self) -> None:
        """What the runtime does with a Spawn: at once, before any other event."""
        if self.spawn_fails:
            self.feed(lc.SpawnFailed(now=self.now, wall=0, error="ENOENT"))
            return
        self.next_pid += 1
        self.process = self.next_pid
        self.feed(lc.Spawned(now=self.now, pid=self.process))

    @rule(fails=st.booleans())
    def spawns_fail(self, fails: bool) -> None:
        self.spawn_fails = fails

    @rule(seconds=st.floats(0.0, 20.0))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def time_reaches_the_next_wakeup(self) -> None:
        wake = lc.next_wakeup(self.host, self.policy)
        if wake is not None and wake > self.now:
            self.now = wake

    @rule()
    def tick(self) -> None:
        self.feed(lc.Tick(now=self.now))

    @rule(request=st.sampled_from([lc.StartRequested, lc.StopRequested, lc.RestartRequested]))
    def operator(self, request: type[lc.StartRequested]) -> None:
        self.feed(request(now=self.now))

    @precondition(lambda self: self.process is not None)
    @rule(code=st.sampled_from([0, 1, None]))
    def process_exits(self, code: int | None) -> None:
        self.process = None
        signal = None if code is not None else 9
        self.feed(lc.Exited(now=self.now, wall=0, code=code, signal=signal))

    @precondition(lambda self: self.process is not None)
    @rule(message=st.sampled_from(["ready", "heartbeat", "trigger"]))
    def host_says(self, message: str) -> None:
        event = {"ready": lc.Ready, "heartbeat": lc.Heartbeat, "trigger": lc.WatchdogTriggered}
        self.feed(event[message](now=self.now))

    @invariant()
    def the_machine_knows_the_live_process(self) -> None:
        assert self.host.pid == self.process
        if self.host.state in (lc.HostState.STOPPED, lc.HostState.BACKOFF):
            assert self.process is None

    @invariant()
    def never_starting_without_a_process(self) -> None:
        """A spawn is performed in the same turn: no `starting` without a pid is ever left."""
        assert not (self.host.state is lc.HostState.STARTING and self.host.pid is None)

    @invariant()
    def nothing_waits_without_a_wakeup(self) -> None:
        wake = lc.next_wakeup(self.host, self.policy)
        if self.host.state is lc.HostState.BACKOFF:
            assert wake is not None and self.host.backoff_until == wake
        if self.host.state is lc.HostState.STOPPING and self.host.kill_at is not None:
            assert wake is not None and wake <= self.host.kill_at

    @invariant()
    def uptime_counts_from_the_process_start(self) -> None:
        if self.host.pid is not None:
            assert self.host.started_at is not None and self.host.spawned_at is not None
            assert self.host.started_at <= self.host.spawned_at


HostWalk.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestHostWalk = HostWalk.TestCase
