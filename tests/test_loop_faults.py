"""Faults injected into the loop that owns the deadman (issue 12, items 3 and 4): the store raising
in the deadline's tick, our own manager's socket raising, a tree kill that blocks, every general
worker stuck. Whatever is active, the rollback begins by the deadline + 1 s (each case reports its
measured lateness: `report_figure`), ends `rolled_back`, and a SIGTERM still ends swapguard within
stop_timeout plus a few seconds. Plus the time bound of a copy on a file system that stalls."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.data import datacopy
from supervisor.errors import SnapshotError
from tests.support import (
    WAIT,
    Supervisor,
    make_sample_repo,
    report_figure,
    rows,
    supervised,
    wait_for,
)
from tests.test_swap_e2e import new_version

LATE_BOUND_S = 1.0  # the contract: rollback begins by min(deadline, hard cap) + 1 s
WINDOW = "2s"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_sample_repo(tmp_path / "repo")


def stored_swap(sup: Supervisor, swap_id: str) -> dict:
    found = rows(sup.state / "state.db", f"SELECT record FROM swap WHERE id = '{swap_id}'")
    return dict(json.loads(found[0][0]))


def lateness(sup: Supervisor, swap_id: str) -> float:
    """From the daemon's own record, on the boot clock: rollback start - min(deadline, cap)."""
    record = stored_swap(sup, swap_id)
    due = min(record["deadline"]["boot"], record["hard_cap"]["boot"])
    return float(record["rollback_started_at"]["boot"] - due)


def deadline_rollback(
    sup: Supervisor, repo: Path, fault: str, *, behaviour: str = "ok", end_within: float = 60.0
) -> dict:
    """A new version nobody confirms, rolled back at its deadline while `fault` is active: the
    lateness and the rollback's length, reported; the swap's final document returned."""
    swap_id = sup.client.prepare(f"loop fault: {fault}")["id"]
    new_version(repo, {"version": "v2", "behaviour": behaviour})
    sup.client.activate(swap_id)
    doc = wait_for(
        lambda: (d := sup.client.swap(swap_id))["state"] in ("rolled_back", "failed") and d,
        timeout=end_within,
        what="the rollback to end",
    )
    assert doc["state"] == "rolled_back" and doc["reason"] == "deadline", doc["events"][-5:]
    late = lateness(sup, swap_id)
    record = stored_swap(sup, swap_id)
    took = record["finished_at"]["boot"] - record["rollback_started_at"]["boot"]
    report_figure(
        f"loop fault {fault}: rollback began {late * 1000:+.0f} ms against the deadline, "
        f"took {took:.2f}s to rolled_back"
    )
    assert 0 <= late <= LATE_BOUND_S, late
    sup.wait_host(ready=True)
    wait_for(
        lambda: (
            rows(repo / "data/app.db", "SELECT version FROM starts ORDER BY id DESC LIMIT 1")
            == [("v1",)]
        ),
        what="v1 back",
    )
    return doc


def test_the_store_refusing_in_the_deadlines_tick(repo: Path) -> None:
    """From the moment v2 runs until after its deadline, every record and event is refused: the
    tick still stops v2, the rollback goes on, and the records are saved once the store takes."""
    env = {"SWAPGUARD_STORE_FAILS_AT": "probation/None", "SWAPGUARD_STORE_FAILS_S": "3.5"}
    with supervised(repo, deadman={"window": WINDOW, "hard_cap": "60s"}) as sup:
        sup.start(env=env)
        deadline_rollback(sup, repo, "store refusing from probation to past the deadline")
        assert "the store refuses" in sup.output()


def test_our_managers_socket_raising_at_every_notification(repo: Path, tmp_path: Path) -> None:
    path = tmp_path / "manager.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(path))
        env = {
            "NOTIFY_SOCKET": str(path),
            "WATCHDOG_USEC": "200000",  # pings every 100 ms, each one raising too
            "WATCHDOG_PID": "",
            "SWAPGUARD_MANAGER_RAISES": "1",
        }
        with supervised(repo, deadman={"window": WINDOW, "hard_cap": "60s"}) as sup:
            sup.start(env=env)
            deadline_rollback(sup, repo, "manager socket raising at every send")
            assert "manager's socket raised" in sup.output()


def test_a_tree_kill_that_blocks_across_the_deadline(repo: Path) -> None:
    """v2 dies at once and each kill of its tree takes 3 s to see it gone (a kernel slow to reap):
    the deadline falls inside that wait, which no longer holds the loop."""
    env = {"SWAPGUARD_KILL_BLOCKS_S": "3"}
    deadman = {"window": "1500ms", "hard_cap": "60s", "max_crashes": 5}
    with supervised(repo, deadman=deadman) as sup:
        sup.start(env=env)
        deadline_rollback(sup, repo, "tree kill blocking 3 s", behaviour="crash")


def test_every_general_worker_stuck_then_sigterm(repo: Path) -> None:
    """Once v2 runs, each worker of the general pool is stuck for good (checks, settles, hashes on
    a hung file system): the rollback's steps and kills run on workers reserved for them, and a
    SIGTERM afterwards still ends swapguard at once (the stuck workers are abandoned)."""
    env = {"SWAPGUARD_OCCUPY_POOL_AT": "probation/None"}
    host = {"stop_timeout": "2s"}
    with supervised(repo, host=host, deadman={"window": WINDOW, "hard_cap": "60s"}) as sup:
        sup.start(env=env)
        deadline_rollback(sup, repo, "every general worker stuck", end_within=30)
        assert "workers stuck for good" in sup.output()
        assert sup.process is not None
        began = time.monotonic()
        code = sup.stop(timeout=WAIT)
        took = time.monotonic() - began
        report_figure(f"SIGTERM with every general worker stuck: exit {code} after {took:.2f}s")
        assert code == 0 and took < 2 + 5, took
        assert "exiting with work still running" in sup.output()


def test_a_shutdown_that_cannot_end_is_ended_by_its_bound() -> None:
    """Whatever holds the shutdown (a worker inside the store's lock on a hung disk), the process
    is gone by its bound, naming what it abandoned."""
    script = (
        "import logging, threading, time\n"
        "logging.basicConfig()\n"
        "from supervisor.daemon.service import _exit_by\n"
        "threading.Thread(target=time.sleep, args=(60,), name='stuck-worker').start()\n"
        "_exit_by(0.5, lambda: True)\n"
        "time.sleep(60)\n"
    )
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT
    )
    took = time.monotonic() - began
    assert done.returncode == 0 and took < 0.5 + 5, (took, done.stderr)
    assert "abandoning: stuck-worker" in done.stderr


# --- the time bound of copies and flushes -------------------------------------------------------


@pytest.fixture
def stalling_copies(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Every chunk of a copy takes 0.2 s, as on a file system that trickles."""
    calls: list[float] = []

    def slow(copy):  # type: ignore[no-untyped-def]
        def chunk(src: int, dst: int, offset: int, count: int) -> int:
            calls.append(time.monotonic())
            time.sleep(0.2)
            return int(copy(src, dst, offset, count))

        return chunk

    monkeypatch.setattr(datacopy, "_kernel_copy", slow(datacopy._kernel_copy))
    monkeypatch.setattr(datacopy, "_user_copy", slow(datacopy._user_copy))
    yield calls


def test_a_copy_that_stalls_ends_with_an_error_within_its_bound(
    tmp_path: Path, stalling_copies: list[float]
) -> None:
    source = tmp_path / "big.db"
    with open(source, "wb") as handle:
        for _ in range(16):  # 16 chunks of 8 MiB, real data (a hole is not copied)
            handle.write(os.urandom(1024) * 8192)
    began = time.monotonic()
    with (
        pytest.raises(SnapshotError, match=r"took longer than 0\.5s") as error,
        datacopy.time_bound(0.5, "the snapshot of the data"),
    ):
        datacopy.copy_file(source, tmp_path / "copy.db")
    took = time.monotonic() - began
    assert took < 0.5 + 1.0 and len(stalling_copies) < 16, took
    assert "the snapshot of the data" in str(error.value) and "byte" in str(error.value)
    with datacopy.time_bound(60, "unhurried"):  # a bound long enough changes nothing
        assert datacopy.file_digest(source)[0] == 16 * 2**23


def test_a_hash_or_a_walk_past_its_bound_stops(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    for index in range(50):
        (tmp_path / "tree" / f"{index}.txt").write_text(str(index))
    with datacopy.time_bound(0.0, "the restore of the data"), pytest.raises(SnapshotError):
        datacopy.tree_digest(tmp_path / "tree")
    assert datacopy.tree_digest(tmp_path / "tree")[0] > 0  # no bound outside the block


def test_a_manager_send_that_raises_anything_is_swallowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from supervisor.daemon import faults
    from supervisor.daemon.manager import ServiceManager

    path = tmp_path / "manager.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        manager = ServiceManager({"NOTIFY_SOCKET": str(path)})
        assert manager.notify("STATUS=fine") is True
        monkeypatch.setattr(faults, "MANAGER_RAISES", True)
        assert manager.notify("STATUS=x") is False  # a RuntimeError inside the send: not raised
        assert manager.notify("WATCHDOG=1") is False
