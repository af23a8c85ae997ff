"""The host's output rotated by size, with real processes: nothing lost or torn while a writer keeps
going, a logrotate-style move followed, no symlink followed, and a host whose output keeps flowing
across a kill -9 of swapguard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.process import outputlog
from tests.support import WAIT, git, supervised, wait_for

WRITER = """\
import os, sys
count = int(sys.argv[1])
for n in range(count):
    os.write(1, b"line %07d %s\\n" % (n, b"x" * (n % 61)))
"""


def all_files(path: Path) -> list[Path]:
    backups = sorted(
        path.parent.glob(path.name + ".*"), key=lambda p: int(p.suffix[1:]), reverse=True
    )
    return [*backups, path]


def write_through_a_logger(path: Path, lines: int, max_bytes: int, backups: int) -> None:
    fd = outputlog.start(path, max_bytes, backups)
    try:
        subprocess.run([sys.executable, "-c", WRITER, str(lines)], stdout=fd, check=True)
    finally:
        os.close(fd)
    wait_for(lambda: not outputlog._live, what="the logger to drain and exit")


def test_rotation_loses_and_tears_no_line(tmp_path: Path) -> None:
    path = tmp_path / "host.log"
    lines, max_bytes = 100_000, 256 * 1024
    write_through_a_logger(path, lines, max_bytes, backups=100)
    files = all_files(path)
    assert len(files) > 10, "it rotated"
    content = b"".join(f.read_bytes() for f in files)
    expected = b"".join(b"line %07d %s\n" % (n, b"x" * (n % 61)) for n in range(lines))
    assert content == expected  # every byte, in order: 0 lines lost
    for f in files[:-1]:
        data = f.read_bytes()
        assert data.endswith(b"\n"), f"{f.name} ends inside a line"
        assert len(data) <= max_bytes + outputlog.READ_BYTES
    print(f"\noutputlog: {len(expected)} bytes, {lines} lines, {len(files)} files, 0 lost")


def test_only_the_newest_backups_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "host.log"
    write_through_a_logger(path, 50_000, 64 * 1024, backups=3)
    names = [f.name for f in all_files(path)]
    assert names == ["host.log.3", "host.log.2", "host.log.1", "host.log"]
    tail = b"".join(f.read_bytes() for f in all_files(path))
    assert tail.endswith(b"line %07d %s\n" % (49_999, b"x" * (49_999 % 61)))


def test_a_move_by_logrotate_is_followed(tmp_path: Path) -> None:
    path = tmp_path / "host.log"
    fd = outputlog.start(path, 10**9, 1)
    try:
        os.write(fd, b"before\n")
        wait_for(lambda: path.read_bytes() == b"before\n", what="the first line")
        path.rename(tmp_path / "host.log.old")
        outputlog.reopen()  # logrotate's postrotate: SIGHUP to swapguard, which passes it on
        os.write(fd, b"after\n")
        wait_for(lambda: path.exists() and path.read_bytes() == b"after\n", what="a new file")
        assert (tmp_path / "host.log.old").read_bytes() == b"before\n"
    finally:
        os.close(fd)
    wait_for(lambda: not outputlog._live, what="the logger to exit")


def test_a_symlink_at_the_output_path_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (tmp_path / "host.log").symlink_to(victim)
    with pytest.raises(OSError):
        outputlog.start(tmp_path / "host.log", 4096, 1)
    assert victim.read_text() == "keep me\n"


HOST = """\
import itertools, sys, time
for n in itertools.count():
    print(f"tick {n:08d}", flush=True)
    time.sleep(0.001)
"""


def test_the_host_keeps_writing_across_a_kill_9_of_swapguard(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "host.py").write_text(HOST)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "host")
    log = tmp_path / "host.log"
    host = {"command": [sys.executable, "host.py"], "ready": "started", "min_uptime": "0.2s",
            "output": str(log), "output_max_bytes": "8KiB", "output_backups": 2}  # fmt: skip
    with supervised(repo, host=host, data=False) as sup:
        sup.start()
        wait_for(lambda: (log.parent / "host.log.2").exists(), what="two rotations")
        pid = sup.status()["host"]["pid"]
        sup.kill9()
        sup.start()
        assert sup.status()["host"]["pid"] == pid  # adopted, never restarted

        def newest() -> int:
            last = log.read_bytes().splitlines()[-1:]
            return int(last[0].split()[1]) if last and last[0].startswith(b"tick ") else -1

        seen = newest()
        wait_for(lambda: newest() > seen + 100, what="the output still flowing")
        for f in all_files(log):
            numbers = [int(line.split()[1]) for line in f.read_bytes().splitlines()]
            if not numbers:  # host.log just rotated: nothing written to it yet
                continue
            assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), f.name
        cli = [sys.executable, "-m", "supervisor", "logs", "-n", "5", "--config", str(sup.config)]
        shown = subprocess.run(cli, capture_output=True, text=True, timeout=WAIT).stdout
        assert len(shown.splitlines()) == 5 and shown.startswith("tick ")
