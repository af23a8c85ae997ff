"""Issue 13 beyond the HTTP layer: timed-out requests, the state directory, check vs run, jobs."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from supervisor.daemon.service import LoopBackend
from supervisor.errors import NotReachable
from supervisor.state.store import StateLock, Store, StoreError

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


# --- a state directory nobody else controls ----------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as nobody")


def _nobody() -> pwd.struct_passwd:
    return pwd.getpwnam("nobody")


@needs_root
def test_a_state_dir_owned_by_another_user_is_refused_and_its_symlink_not_written(
    tmp_path: Path,
) -> None:
    """The attack: nobody owns state.dir and plants lock -> victim; root swapguard must not
    truncate the victim (it did, writing its pid into it)."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "lock").symlink_to(victim)
    os.lchown(state / "lock", _nobody().pw_uid, _nobody().pw_gid)
    os.chown(state, _nobody().pw_uid, _nobody().pw_gid)
    with pytest.raises(StoreError, match=f"state dir {state} is owned by uid {_nobody().pw_uid}"):
        StateLock.acquire(state)
    with pytest.raises(StoreError, match="not by swapguard's user"):
        Store.open(state)
    assert victim.read_text() == "precious\n"


def test_a_planted_symlink_in_an_own_state_dir_is_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    for name in ("lock", "state.db", "state.db-wal", "state.db-journal"):
        state = tmp_path / f"state-{name}"
        state.mkdir(mode=0o700)
        (state / name).symlink_to(victim)
        with (
            pytest.raises(StoreError, match=f"{state / name} is a symlink"),
            StateLock.acquire(state),
        ):
            Store.open(state).close()
        assert victim.read_text() == "precious\n"
    hard = tmp_path / "state-hard"
    hard.mkdir(mode=0o700)
    os.link(victim, hard / "lock")
    with pytest.raises(StoreError, match="2 hard links"):
        StateLock.acquire(hard)
    assert victim.read_text() == "precious\n"


def test_state_dirs_and_parents_get_safe_modes_under_umask_000(tmp_path: Path) -> None:
    state = tmp_path / "a" / "b" / "state"
    old = os.umask(0)
    try:
        with StateLock.acquire(state):
            Store.open(state).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o755
    assert stat.S_IMODE((state / "lock").stat().st_mode) == 0o600


# --- write rights belong to the peer process, not to its pid number ----------------------------


@needs_root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
@pytest.mark.parametrize("pinning", ["peerpidfd", "pidfd_open"])
def test_pid_reuse_gives_no_write_right(pinning: str) -> None:
    """A reader's connection, inherited by its child after the reader exits, stays read-only
    even once a process of the host's tree holds the reader's old pid."""
    root = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m",
             "tests.pid_reuse_attack", pinning],
            cwd=root, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the attack did not finish: {exc.stderr!r}")
    if done.returncode != 0 and "unshare failed" in done.stderr:
        pytest.skip(f"no new pid namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["tree_pid"] == seen["reader"], "the host's child did not land on the reader's pid"
    assert seen["answer"].startswith("HTTP/1.1 403 "), seen
    assert "has exited; its write right ended with it" in seen["body"], seen
    assert seen["actions"] == []
