"""The loop that owns the deadman cannot be held or left unarmed: a stuck loop ends swapguard (and a
restarted one finishes the rollback), a tick that raises is tried again, and our own service
manager can neither block nor raise into the loop."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervisor.daemon.manager import ServiceManager
from supervisor.daemon.stall import EXIT_STALLED
from supervisor.daemon.timer import RETRY_FAILED_TICK_S, WakeTimer
from tests.support import WAIT, make_sample_repo, supervised, wait_for
from tests.test_swap_e2e import new_version

# --- the stall detector, end to end ------------------------------------------------------------


def test_a_stuck_loop_exits_for_a_restart_and_the_restart_finishes_the_rollback(
    tmp_path: Path,
) -> None:
    repo = make_sample_repo(tmp_path / "repo")
    deadman = {"window": "60s", "hard_cap": "120s", "stall_limit": "1s"}
    with supervised(repo, deadman=deadman) as sup:
        sup.start(env={"SWAPGUARD_STALL_AT": "rolling_back/restore_code"})
        old_pid = sup.status()["host"]["pid"]
        swap_id = sup.client.prepare("stall")["id"]
        new_version(repo, {"version": "v2"})
        sup.client.activate(swap_id)
        wait_for(
            lambda: (s := sup.status()["swap"]) and s["step"] is None and s["state"] == "probation",
            what="the new version on probation",
        )
        sup.client.rollback(swap_id, reason="requested")
        assert sup.process is not None
        began = time.monotonic()
        code = sup.process.wait(WAIT)
        waited = time.monotonic() - began
        assert code == EXIT_STALLED, sup.output()[-3000:]
        assert waited < 1 + WAIT / 4, f"the stall was seen after {waited:.1f}s"
        log = sup.output()
        assert "has not turned" in log and "faults.py" in log, log[-3000:]

        sup.start(wait_ready=False)  # as the service manager would, without the fault
        doc = sup.wait_swap(swap_id, "rolled_back", timeout=60)
        host = sup.wait_host(ready=True)
        assert host["pid"] != old_pid and doc["reason"] == "requested"
        assert sup.status()["swap"] is None


def test_stall_limit_below_a_second_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "swapguard.toml"
    config.write_text('[host]\ncommand = ["true"]\n[deadman]\nstall_limit = "200ms"\n')
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == 2 and "deadman.stall_limit" in done.stderr, done.stderr


# --- the timer -----------------------------------------------------------------------------------


def test_a_tick_that_raises_is_tried_again() -> None:
    async def scenario() -> list[float]:
        calls: list[float] = []
        done = asyncio.Event()

        def tick() -> None:
            calls.append(time.monotonic())
            if len(calls) == 1:
                raise OSError(28, "No space left on device")  # a store that cannot be written
            done.set()

        timer = WakeTimer(tick)
        timer.wake_now()
        await asyncio.wait_for(done.wait(), WAIT)
        return calls

    calls = asyncio.run(scenario())
    assert len(calls) == 2
    assert calls[1] - calls[0] >= RETRY_FAILED_TICK_S * 0.9


# --- our own service manager ----------------------------------------------------------------------


def test_a_missing_manager_socket_neither_raises_nor_blocks(tmp_path: Path) -> None:
    manager = ServiceManager({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert manager.notify("STATUS=x") is False
    assert manager.notify("STATUS=y") is False
    assert ServiceManager({}).notify("READY=1") is False


def test_a_manager_that_stopped_reading_never_blocks_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        manager = ServiceManager({"NOTIFY_SOCKET": str(path)})
        began = time.monotonic()
        sent = [manager.notify(f"STATUS={n}") for n in range(5000)]
        elapsed = time.monotonic() - began
        assert sent[0] is True and sent[-1] is False  # the queue filled up: dropped, not waited
        assert elapsed < 5.0


def test_watchdog_pings_come_from_the_loop_and_stop_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        receiver.settimeout(WAIT)
        pid = str(os.getpid())
        env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "100000", "WATCHDOG_PID": pid}
        manager = ServiceManager(env)

        async def scenario() -> None:
            manager.start_watchdog(asyncio.get_running_loop())
            for _ in range(3):  # every 50 ms
                assert await asyncio.to_thread(receiver.recv, 64) == b"WATCHDOG=1"
            manager.stop_watchdog()
            await asyncio.sleep(0.2)  # four intervals in which no ping may come

        asyncio.run(scenario())
        receiver.setblocking(False)
        with pytest.raises(BlockingIOError):
            receiver.recv(64)
