"""Issue 13, the daemon's side: a control request that timed out never takes effect later."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from supervisor.daemon.service import LoopBackend
from supervisor.errors import NotReachable

WAIT_S = 10.0


class RecordingRuntime:
    """The part of the runtime LoopBackend calls: a prepare that commits after its last await."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.config = SimpleNamespace(control=SimpleNamespace(allow_users=(), allow_groups=()))
        self.committed: list[str] = []
        self.checkpointed: asyncio.Event | None = None

    async def prepare(self, summary: str) -> Any:
        self.checkpointed = asyncio.Event()
        await self.checkpointed.wait()  # the checkpoint in a worker thread
        self.committed.append(summary)
        raise AssertionError("a timed-out prepare went on to commit")


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(WAIT_S)
    loop.close()


def _on_loop(loop: asyncio.AbstractEventLoop, fn: Any) -> Any:
    return asyncio.run_coroutine_threadsafe(_call(fn), loop).result(WAIT_S)


async def _call(fn: Any) -> Any:
    return fn()


def test_a_request_that_timed_out_before_the_loop_took_it_is_never_run(
    loop: asyncio.AbstractEventLoop,
) -> None:
    runtime = RecordingRuntime(loop)
    backend = LoopBackend(runtime)  # type: ignore[arg-type]
    backend.call_limit = 0.2
    stuck = threading.Event()
    loop.call_soon_threadsafe(stuck.wait, WAIT_S)  # the loop is busy (a stall)
    with pytest.raises(NotReachable, match="was not applied"):
        backend.prepare_swap("late")
    stuck.set()
    assert _on_loop(loop, lambda: runtime.checkpointed) is None  # prepare was never called
    assert runtime.committed == []


def test_a_request_that_timed_out_under_way_is_cancelled_and_never_commits(
    loop: asyncio.AbstractEventLoop,
) -> None:
    runtime = RecordingRuntime(loop)
    backend = LoopBackend(runtime)  # type: ignore[arg-type]
    backend.call_limit = 0.2
    with pytest.raises(NotReachable, match="was cancelled"):
        backend.prepare_swap("slow checkpoint")
    event = _on_loop(loop, lambda: runtime.checkpointed)
    assert event is not None  # it had started
    _on_loop(loop, event.set)  # the checkpoint ends after the answer
    _on_loop(loop, lambda: None)  # one more turn of the loop
    assert runtime.committed == []
