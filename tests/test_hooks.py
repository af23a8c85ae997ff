"""Hook delivery with real hook processes and a real store: every selected event at least once, in
order, across job cancellations and restarts; retried with backoff; drops counted and logged."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.config.schema import HooksConfig
from supervisor.daemon import hooks
from supervisor.daemon.hooks import CURSOR_KEY, HookRunner
from supervisor.process import jobs
from supervisor.state.models import EventRow
from supervisor.state.store import Store
from tests.support import wait_for

# Fails an event's first `fails[event]` runs (exit 3), or hangs on it when the count is "hang",
# or takes a second over it when "slow";
# every run is logged to ran.jsonl, every success to got.jsonl.
_HOOK = r"""
import json, pathlib, sys, time
folder = pathlib.Path(sys.argv[1])
event = json.loads(sys.stdin.read())
name = event["event"]
with open(folder / "ran.jsonl", "a") as log:
    log.write(json.dumps(name) + "\n")
plan = json.loads((folder / "plan.json").read_text())
ran = [json.loads(line) for line in (folder / "ran.jsonl").read_text().splitlines()]
if plan.get(name) == "hang":
    time.sleep(60)
if plan.get(name) == "slow":
    time.sleep(1)
fails = plan.get(name, 0)
if isinstance(fails, int) and ran.count(name) <= fails:
    sys.exit(3)
with open(folder / "got.jsonl", "a") as got:
    got.write(json.dumps(name) + "\n")
"""


def runner(folder: Path, plan: dict[str, object], store: Store, **knobs: float) -> HookRunner:
    (folder / "plan.json").write_text(json.dumps(plan))
    config = HooksConfig(on_event=(sys.executable, "-c", _HOOK, str(folder)), events=("swap.*",))
    knobs = {"retry_first": 0.05, "retry_max": 0.2, **knobs}
    return HookRunner(config, store=store, cwd=folder, **knobs)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "state") as opened:
        yield opened


def lines(path: Path) -> list[str]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def emit(store: Store, hook: HookRunner | None, *names: str) -> list[int]:
    """Append events as the runtime does (store first, then a word to the hook)."""
    ids = []
    for name in names:
        record = store.append_event(name, {}, swap_id="s1" if name.startswith("swap.") else None)
        if hook is not None:
            hook.submit(record.to_json())
        ids.append(record.id)
    return ids


def test_a_failing_hook_is_run_again_and_events_keep_their_order(
    tmp_path: Path, store: Store
) -> None:
    hook = runner(tmp_path, {"swap.prepared": 2}, store)
    try:
        ids = emit(store, hook, "swap.prepared", "swap.activated", "host.spawned", "swap.confirmed")
        wait_for(lambda: hook.cursor == ids[-1], what="every event past the cursor")
        delivered = ["swap.prepared", "swap.activated", "swap.confirmed"]
        assert lines(tmp_path / "got.jsonl") == delivered  # host.* is not selected
        assert lines(tmp_path / "ran.jsonl") == ["swap.prepared"] * 2 + delivered
        assert (hook.ran, hook.failed, hook.dropped) == (5, 2, 0)
        assert store.get_value(CURSOR_KEY) == ids[-1]
    finally:
        hook.close()


@pytest.mark.parametrize("plan", [{"swap.prepared": 99}, {"swap.prepared": "hang"}])
def test_an_event_the_hook_fails_every_time_is_dropped_counted_and_logged(
    tmp_path: Path, store: Store, plan: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    hook = runner(tmp_path, plan, store, attempts=3, timeout=1.0)
    try:
        with caplog.at_level(logging.WARNING, logger=hooks.__name__):
            first, _ = emit(store, hook, "swap.prepared", "swap.aborted")
            wait_for(lambda: lines(tmp_path / "got.jsonl") == ["swap.aborted"], what="the next")
        assert lines(tmp_path / "ran.jsonl") == ["swap.prepared"] * 3 + ["swap.aborted"]
        assert (hook.given_up, hook.trimmed, hook.dropped) == (1, 0, 1)
        dropped = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(dropped) == 1 and f"swap.prepared (#{first}) dropped after 3 run(s)" in (
            dropped[0].getMessage()
        )
        retried = [r for r in caplog.records if "again in" in r.getMessage()]
        assert len(retried) == 2
    finally:
        hook.close()


def test_a_restart_delivers_what_the_last_one_did_not(tmp_path: Path, store: Store) -> None:
    """close() (a stop, or a swapguard killed mid-run) leaves the event after the cursor: the next
    runner, on the same store, delivers it and everything after it: at least once."""
    hook = runner(tmp_path, {"swap.prepared": 99}, store, retry_first=30.0, retry_max=30.0)
    first, second = emit(store, hook, "swap.prepared", "swap.activated")
    wait_for(lambda: hook.failed == 1, what="the first run to fail")
    started = time.monotonic()
    hook.close()
    assert time.monotonic() - started < 5.0  # not the 30 s wait
    assert hook.given_up == 0 and store.get_value(CURSOR_KEY) == first - 1
    emit(store, None, "swap.confirmed")  # while no hook runs
    (tmp_path / "plan.json").write_text("{}")
    again = runner(tmp_path, {}, store)
    try:
        wait_for(lambda: again.cursor == second + 1, what="the restarted hook to catch up")
        got = lines(tmp_path / "got.jsonl")
        assert got == ["swap.prepared", "swap.activated", "swap.confirmed"]
    finally:
        again.close()


def test_a_new_hook_is_not_handed_the_history(tmp_path: Path, store: Store) -> None:
    emit(store, None, "swap.prepared", "swap.aborted")
    hook = runner(tmp_path, {}, store)
    try:
        (newest,) = emit(store, hook, "swap.confirmed")
        wait_for(lambda: hook.cursor == newest, what="the new event")
        assert lines(tmp_path / "got.jsonl") == ["swap.confirmed"]
    finally:
        hook.close()


def test_a_job_cancellation_never_kills_a_hook(tmp_path: Path, store: Store) -> None:
    """A rollback's CancelJobs stops the swap's build and checks; the hook's run goes on."""
    hook = runner(tmp_path, {"swap.rollback_started": "slow"}, store)
    try:
        (only,) = emit(store, hook, "swap.rollback_started")
        wait_for(lambda: lines(tmp_path / "ran.jsonl"), what="the hook to be running")
        assert jobs.cancel_all() == 0  # the hook's run is not among the swap's jobs
        wait_for(lambda: hook.cursor == only, what="the run to finish")
        assert lines(tmp_path / "got.jsonl") == ["swap.rollback_started"]
        assert (hook.ran, hook.failed) == (1, 0)
    finally:
        hook.close()


def test_a_burst_larger_than_any_queue_is_delivered_whole(tmp_path: Path, store: Store) -> None:
    config = HooksConfig(on_event=("true",), events=("swap.*",))
    hook = HookRunner(config, store=store, cwd=tmp_path)
    try:
        ids = emit(store, hook, *["swap.extended"] * 300)
        wait_for(lambda: hook.cursor == ids[-1], timeout=120, what="all 300 delivered")
        assert (hook.ran, hook.dropped) == (300, 0)
    finally:
        hook.close()


def test_events_trimmed_before_delivery_are_counted(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    hook = runner(tmp_path, {"swap.prepared": "hang"}, store, attempts=1, timeout=2.0)
    try:
        first, *middle, last = emit(store, None, *["swap.extended"] * 5)
        EventRow.delete().where(EventRow.id.in_(middle)).execute(store._db)  # the store's trim
        with caplog.at_level(logging.ERROR, logger=hooks.__name__):
            hook.submit({"event": "swap.extended"})
            wait_for(lambda: hook.cursor == last, what="the survivors")
        assert hook.trimmed == 3 and hook.dropped == 3
        assert f"events {first + 1} to {last - 1} were trimmed" in caplog.text
    finally:
        hook.close()


# --- end to end: a real swapguard, rollbacks and a kill -9 ---------------------------------------

_SLOW_RECORDER = r"""
import json, sys, time
event = json.loads(sys.stdin.read())
time.sleep(0.3)
with open(sys.argv[1], "a") as out:
    out.write(json.dumps([event["id"], event["event"]]) + "\n")
"""


def test_every_swap_event_reaches_a_slow_hook_across_rollbacks_and_a_kill_9(
    tmp_path: Path,
) -> None:
    from tests.support import make_sample_repo, supervised, write_app

    repo = make_sample_repo(tmp_path / "repo")
    got = tmp_path / "got.jsonl"
    extra = f"[hooks]\non_event = {json.dumps([sys.executable, '-c', _SLOW_RECORDER, str(got)])}\n"
    with supervised(repo, extra=extra, deadman={"window": "60s"}) as sup:
        sup.start()
        for round_ in range(3):
            swap_id = sup.client.prepare(f"round {round_}")["id"]
            write_app(repo, {"version": f"v{round_ + 2}"})
            sup.client.activate(swap_id)
            wait_for(lambda: sup.status()["swap"]["step"] is None, what="the new version")
            if round_ == 1:
                sup.kill9()  # events queued for the hook wait in the store
                sup.start(wait_ready=False)
            sup.client.rollback(swap_id, reason="requested")
            sup.wait_swap(swap_id, "rolled_back", timeout=60)
            sup.wait_host(ready=True)
        wanted = [
            [e["id"], e["event"]]
            for e in sup.client.events(after=0, limit=1000)
            if e["event"].startswith("swap.")
        ]
        wait_for(lambda: lines(got)[-1:] == wanted[-1:], timeout=60, what="the last event")
        first_seen = list(dict.fromkeys(map(tuple, lines(got))))  # at least once, in order
        assert first_seen == [tuple(item) for item in wanted]


def test_an_event_a_worker_wrote_reaches_a_hook_that_wants_only_it(
    tmp_path: Path, store: Store
) -> None:
    """A restore's worker writes `code.foreign_locks` itself: the loop never holds the record,
    so it wakes the hooks when it publishes the step's result, and a hook that wants only that
    kind reads it from the store."""
    (tmp_path / "plan.json").write_text("{}")
    config = HooksConfig(
        on_event=(sys.executable, "-c", _HOOK, str(tmp_path)), events=("code.foreign_locks",)
    )
    published = [store.newest_event_id()]  # as the runtime's published_event_id
    asked: list[int] = []  # each read of the store by the hook's worker asks it first

    def published_id() -> int:
        asked.append(published[0])
        return published[0]

    hook = HookRunner(
        config,
        store=store,
        cwd=tmp_path,
        published=published_id,
        retry_first=0.05,
        retry_max=0.2,
    )
    try:
        wait_for(lambda: asked, what="the hook's first read")  # found nothing: it now waits
        record = store.append_event("code.foreign_locks", {"locks": ["x.lock"]}, swap_id="s1")
        published[0] = record.id  # the loop publishes the step's result...
        hook.wake()  # ...and says so: no record of the kind passes through its hands
        wait_for(lambda: lines(tmp_path / "got.jsonl") == ["code.foreign_locks"], timeout=30)
    finally:
        hook.close()
