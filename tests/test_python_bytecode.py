"""A plain Python app, no .gitignore, bytecode writing on (issue 14): the bytecode Python writes
at every start is no undeclared change, and declared swaps confirm and roll back as ever, the
rollback running the old module, not the new version's bytecode."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.support import Supervisor, git, supervised, wait_for

APP = """\
import os, socket, sys, time
import pkg.mod, pkg.util

def notify(message):
    address = os.environ["NOTIFY_SOCKET"]
    if address.startswith("@"):
        address = "\\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)

if pkg.mod.BAD:
    sys.exit(3)
notify("READY=1")
beats = 0
while True:
    beats += 1
    notify(f"WATCHDOG=1\\nSTATUS={pkg.mod.VERSION} {pkg.util.twice(beats)} beats")
    time.sleep(0.1)
"""


def module(version: str, bad: int) -> str:
    return f'VERSION = "{version}"\nBAD = {bad}\n'  # the same size for every version


def write_module(repo: Path, version: str, bad: int) -> None:
    (repo / "pkg/mod.py").write_text(module(version, bad))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "app"
    (repo / "pkg").mkdir(parents=True)
    (repo / "app.py").write_text(APP)
    (repo / "pkg/__init__.py").write_text("")
    (repo / "pkg/mod.py").write_text(module("v1", 0))
    (repo / "pkg/util.py").write_text("def twice(n):\n    return 2 * n\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "v1")
    return repo


def beats_of(host: dict, version: str) -> int:
    text = host["status_text"] or ""
    prefix = f"{version} "
    return int(text[len(prefix) :].split()[0]) // 2 if text.startswith(prefix) else 0


HOST = {"env": {"PYTHONDONTWRITEBYTECODE": ""}, "command": [sys.executable, "app.py"]}


def running(sup: Supervisor, version: str, beats: int = 3, pid_not: int | None = None) -> int:
    """Wait for `version` ready and heartbeating (a pid other than `pid_not`); its pid."""

    def check() -> int | None:
        found = sup.status()["host"]
        ok = found["ready"] and found["pid"] not in (None, pid_not)
        return found["pid"] if ok and beats_of(found, version) >= beats else None

    return wait_for(check, what=f"{version} running, {beats} heartbeats")


def test_bytecode_written_at_each_start_is_no_change(repo: Path) -> None:
    with supervised(repo, host=HOST, data=False) as sup:
        sup.start()
        pid = running(sup, "v1")
        wait_for(lambda: list((repo / "pkg/__pycache__").glob("mod.*.pyc")), what="bytecode")
        for _ in range(2):  # restarts: each start of Python touches its bytecode again
            sup.client.host("restart")
            pid = running(sup, "v1", pid_not=pid)
        status = sup.status()
        assert status["swap"] is None and status["code"]["drift"] is False
        assert sup.client.swaps() == []
        assert "code.drift" not in sup.events()
        (repo / "notes.txt").write_text("an undeclared change\n")  # code: guarded as ever
        guard = wait_for(lambda: sup.status()["swap"], what="a guard swap")
        assert guard["summary"] == "undeclared change (guard)"
        changes = sup.client.swap(guard["id"])["changes"]
        assert changes == [{"path": "notes.txt", "change": "added"}]


def test_declared_swaps_confirm_and_roll_back_with_bytecode_on(repo: Path) -> None:
    with supervised(repo, host=HOST, data=False) as sup:
        sup.start()
        pid = running(sup, "v1")
        good = sup.client.prepare("v2")["id"]
        write_module(repo, "v2", 0)
        # as if written a while before v3 (v2's bytecode records its source's mtime in whole
        # seconds and its size, and is Python's to trust until one of them changes)
        os.utime(repo / "pkg/mod.py", (time.time() - 100, time.time() - 100))
        sup.client.activate(good)
        sup.wait_swap(good, "probation")
        pid = running(sup, "v2", pid_not=pid)
        sup.client.confirm(good)
        changes = sup.wait_swap(good, "confirmed")["changes"]
        assert changes == [{"path": "pkg/mod.py", "change": "modified"}]

        bad = sup.client.prepare("v3 crashes")["id"]
        write_module(repo, "v3", 1)  # same size as v2; likely the same second as the rollback
        sup.client.activate(bad)
        assert sup.wait_swap(bad, "rolled_back", timeout=40)["reason"] == "crash_loop"
        pid = running(sup, "v2", pid_not=pid)  # the restored source, not v3's bytecode
        assert (repo / "pkg/mod.py").read_text() == module("v2", 0)
        sup.client.host("restart")
        running(sup, "v2", pid_not=pid)
        assert [s["id"] for s in sup.client.swaps()] == [bad, good]
        assert sup.status()["code"]["drift"] is False
