"""Hook delivery with real hook processes: retried with backoff, in order; drops counted, logged."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import pytest

from supervisor.config.schema import HooksConfig
from supervisor.daemon import hooks
from supervisor.daemon.hooks import HookRunner
from tests.support import wait_for

# Fails an event's first `fails[event]` runs (exit 3), or hangs on it when the count is "hang";
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
if ran.count(name) <= plan.get(name, 0):
    sys.exit(3)
with open(folder / "got.jsonl", "a") as got:
    got.write(json.dumps(name) + "\n")
"""


def runner(folder: Path, plan: dict[str, object], **knobs: float) -> HookRunner:
    (folder / "plan.json").write_text(json.dumps(plan))
    config = HooksConfig(on_event=(sys.executable, "-c", _HOOK, str(folder)), events=("swap.*",))
    knobs = {"retry_first": 0.05, "retry_max": 0.2, **knobs}
    return HookRunner(config, cwd=folder, **knobs)  # type: ignore[arg-type]


def lines(path: Path) -> list[str]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def event(name: str, number: int) -> dict[str, object]:
    return {"id": number, "event": name, "detail": {}}


def test_a_failing_hook_is_run_again_and_events_keep_their_order(tmp_path: Path) -> None:
    hook = runner(tmp_path, {"swap.prepared": 2})
    try:
        for number, name in enumerate(["swap.prepared", "swap.activated", "host.spawned"]):
            hook.submit(event(name, number))  # host.* does not match: never queued
        hook.submit(event("swap.confirmed", 4))
        wait_for(lambda: hook.ran == 5, what="five runs")  # the worker saw the last one end
        delivered = ["swap.prepared", "swap.activated", "swap.confirmed"]
        assert lines(tmp_path / "got.jsonl") == delivered
        assert lines(tmp_path / "ran.jsonl") == ["swap.prepared"] * 2 + delivered
        assert (hook.ran, hook.failed, hook.dropped) == (5, 2, 0)
    finally:
        hook.close()


@pytest.mark.parametrize("plan", [{"swap.prepared": 99}, {"swap.prepared": "hang"}])
def test_an_event_the_hook_fails_every_time_is_dropped_counted_and_logged(
    tmp_path: Path, plan: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    hook = runner(tmp_path, plan, attempts=3, timeout=1.0)
    try:
        with caplog.at_level(logging.WARNING, logger=hooks.__name__):
            hook.submit(event("swap.prepared", 1))
            hook.submit(event("swap.aborted", 2))
            wait_for(lambda: lines(tmp_path / "got.jsonl") == ["swap.aborted"], what="the next")
        assert lines(tmp_path / "ran.jsonl") == ["swap.prepared"] * 3 + ["swap.aborted"]
        assert (hook.given_up, hook.queue_full, hook.dropped) == (1, 0, 1)
        dropped = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(dropped) == 1 and "swap.prepared (#1) dropped after 3 run(s)" in (
            dropped[0].getMessage()
        )
        retried = [r for r in caplog.records if "again in" in r.getMessage()]
        assert len(retried) == 2
    finally:
        hook.close()


def test_close_cuts_a_retry_wait_short_and_gives_one_last_run(tmp_path: Path) -> None:
    hook = runner(tmp_path, {"swap.prepared": 99}, retry_first=30.0, retry_max=30.0)
    hook.submit(event("swap.prepared", 1))
    wait_for(lambda: lines(tmp_path / "ran.jsonl"), what="the first run")
    wait_for(lambda: hook.failed == 1, what="the first run to fail")
    started = time.monotonic()
    hook.close()
    assert time.monotonic() - started < 5.0  # not the 30 s wait
    assert hook.given_up == 1 and lines(tmp_path / "ran.jsonl") == ["swap.prepared"] * 2


def test_a_full_queue_drops_the_newest_and_counts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(hooks, "QUEUE_LIMIT", 1)
    hook = runner(tmp_path, {"swap.prepared": "hang"}, attempts=1, timeout=2.0)
    try:
        hook.submit(event("swap.prepared", 1))
        wait_for(lambda: lines(tmp_path / "ran.jsonl"), what="the hook to be busy")
        with caplog.at_level(logging.ERROR, logger=hooks.__name__):
            hook.submit(event("swap.activated", 2))  # waits in the queue
            hook.submit(event("swap.confirmed", 3))  # no room: dropped
        assert hook.queue_full == 1 and "swap.confirmed (#3)" in caplog.text
        wait_for(lambda: lines(tmp_path / "got.jsonl") == ["swap.activated"], what="the queued")
        assert hook.dropped == 2  # the hanging one timed out on its only attempt
    finally:
        hook.close()
