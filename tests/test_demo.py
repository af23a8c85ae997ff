"""`swapguard demo` end to end: the real supervisor, the sample host, real git and SQLite.

The demo is run as a user would run it (a subprocess, no TTY, no config) and judged by what it
prints and by what it leaves behind: no process naming its folder, no folder, nothing in the cwd.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from supervisor.demo.screen import LiveScreen, status_block

DEMO_TIMEOUT = 110.0  # the demo's own limit is 120 s; it normally takes ~15 s
FOLDER = re.compile(r"throwaway sample service in (\S+)")


def demo_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SWAPGUARD_", "NOTIFY_"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def processes_naming(folder: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(folder in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def assert_nothing_left(folder: str, timeout: float = 10.0) -> None:
    """No live process names the folder (polled briefly: a dying process may still be exiting)."""
    deadline = time.monotonic() + timeout
    while (left := processes_naming(folder)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, [(p.pid, p.info["cmdline"]) for p in left]


@pytest.fixture
def reaper() -> Iterator[list[str]]:
    """Folders a test saw; whatever the outcome, nothing of them survives the test."""
    folders: list[str] = []
    yield folders
    for folder in folders:
        for proc in processes_naming(folder):
            with contextlib.suppress(psutil.Error):
                proc.kill()
        shutil.rmtree(folder, ignore_errors=True)


def test_demo_narrates_every_step_and_leaves_nothing(tmp_path: Path, reaper: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "demo", "--plain"],
        cwd=tmp_path,
        env=demo_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=DEMO_TIMEOUT,
        check=False,
    )
    out = done.stdout.decode(errors="replace")
    match = FOLDER.search(out)
    assert match, out
    folder = match.group(1)
    reaper.append(folder)
    assert done.returncode == 0, out + done.stderr.decode(errors="replace")
    assert "\x1b[" not in out  # plain: no cursor moves
    for claim in (
        r"✓ v1 is running: pid \d+, ready",
        r"✓ v2 crashed 2 times .* reason crash_loop",
        r"✓ the rollback took [\d.]+m?s",
        r"✓ code: app\.json is v1 again; git status clean, HEAD unchanged",
        r"✓ v1 runs again: pid \d+, started with SWAPGUARD_ROLLED_BACK=\S+",
        r"✓ data: app\.db has no migrated_v2 table",
        r"probation: \[[#.]+\] [\d.]+m?s to the deadline",
        r"✓ deadline passed: the rollback began .* reason deadline",
        r"✓ data: app\.db has no migrated_v3 table .* keeps them \(migrated_v3",
        r"✓ v4 sent X_SWAPGUARD_CONFIRM once ready",
        r"✓ v4 keeps running: pid \d+",
        r"✓ kept: app\.json is v4 .* data/app\.db has migrated_v4",
        r"Every step behaved as narrated",
    ):
        assert re.search(claim, out), f"missing {claim!r} in:\n{out}"
    assert "✗" not in out
    assert len(re.findall(r"to the deadline", out)) >= 3  # the countdown, shown a few times
    assert_nothing_left(folder)
    assert not os.path.exists(folder)
    assert list(tmp_path.iterdir()) == []  # nothing written outside its folder


def test_ctrl_c_stops_everything_and_keep_leaves_the_folder(
    tmp_path: Path, reaper: list[str]
) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "demo", "--plain"],
        cwd=tmp_path,
        env=demo_env(SWAPGUARD_DEMO_KEEP="1"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            lines.put(raw.decode(errors="replace"))

    pumping = threading.Thread(target=pump, daemon=True)
    pumping.start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while not any("v1 is running" in line for line in seen):
            assert time.monotonic() < deadline, "".join(seen)
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                assert process.poll() is None, "".join(seen)
        match = FOLDER.search("".join(seen))
        assert match
        folder = match.group(1)
        reaper.append(folder)
        supervisor_pids = [p.pid for p in processes_naming(folder)]
        assert supervisor_pids  # the supervisor and the host, both naming the folder
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    pumping.join(10)  # the demo has exited: its stdout reaches EOF
    while not lines.empty():
        seen.append(lines.get_nowait())
    out = "".join(seen)
    assert "interrupted: cleaning up" in out, out
    assert f"kept the demo's folder (SWAPGUARD_DEMO_KEEP=1): {folder}" in out, out
    assert_nothing_left(folder)
    assert os.path.isdir(folder)
    assert (Path(folder) / "app" / "app.json").exists()
    assert list(tmp_path.iterdir()) == []


def test_live_block_is_redrawn_in_place() -> None:
    out = io.StringIO()
    screen = LiveScreen(6.0, out=out)
    doc = {
        "host": {
            "state": "running",
            "ready": True,
            "pid": 7,
            "status_text": "version v3",
            "heartbeat_age_s": 0.2,
        },
        "swap": {
            "id": "s1",
            "state": "probation",
            "remaining_s": 3.0,
            "step": None,
            "deadline_at": "2026-01-01T00:00:00Z",
        },
    }
    block = status_block(doc, 6.0)
    assert any("[##########..........] 3.0s to the deadline" in line for line in block)
    screen.show(doc)
    screen.say("a line that stays")
    screen.close()
    text = out.getvalue()
    erase = f"\x1b[{len(block)}F\x1b[J"
    assert text.count(erase) == 2  # before the narrated line, and on close
    assert text.index(erase) < text.index("a line that stays")
    assert text.startswith("\x1b[?25l") and text.endswith(f"{erase}\x1b[?25h")
