"""`swapguard logs -n/-f` on a real file that rotates under it, and `swapguard events` against a
real supervisor: the last N, one swap's, JSON, and -f printing each new event once."""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from supervisor.cli import logs as logs_module
from supervisor.cli.logs import last_lines
from tests.support import WAIT, make_sample_repo, supervised, wait_for


@pytest.mark.parametrize("count", [0, 1, 3, 10, 500])
def test_last_lines_reads_the_tail_in_chunks(count: int) -> None:
    lines = [f"line {n} {'x' * (n % 97)}\n".encode() for n in range(20_000)]
    stream = io.BytesIO(b"".join(lines))
    assert last_lines(stream, count) == b"".join(lines[-count:] if count else [])
    assert stream.tell() == len(stream.getvalue())  # -f goes on from the end


def test_last_lines_of_a_file_without_a_final_newline() -> None:
    assert last_lines(io.BytesIO(b"a\nb\nc"), 2) == b"b\nc"
    assert last_lines(io.BytesIO(b""), 5) == b""


@contextmanager
def reading(argv: list[str]) -> Iterator[queue.Queue[str]]:
    """A command's stdout lines in a queue, read by a thread; interrupted (SIGINT) at the end."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    try:
        yield lines
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(WAIT) == 0, process.stderr.read() if process.stderr else ""


def take(lines: queue.Queue[str], count: int) -> list[str]:
    return [lines.get(timeout=WAIT) for _ in range(count)]


def test_logs_follows_the_file_across_a_rotation_and_loses_no_line(tmp_path: Path) -> None:
    log = tmp_path / "host.log"
    config = tmp_path / "swapguard.toml"
    config.write_text(f'[host]\ncommand = ["true"]\noutput = "{log}"\n')
    log.write_text("".join(f"old {n}\n" for n in range(100)))
    argv = [sys.executable, "-m", "supervisor", "logs", "-n", "3", "-f", "--config", str(config)]
    with reading(argv) as lines:
        assert take(lines, 3) == ["old 97", "old 98", "old 99"]
        with log.open("a") as host:
            host.write("before rotation\n")
            host.flush()
            assert take(lines, 1) == ["before rotation"]
            log.rename(tmp_path / "host.log.1")  # what logrotate does, the host still writing
            host.write("into the renamed file\n")
            host.flush()
        log.write_text("in the new file\n")
        assert take(lines, 2) == ["into the renamed file", "in the new file"]


def test_logs_refuses_a_bad_count(tmp_path: Path) -> None:
    config = tmp_path / "swapguard.toml"
    config.write_text(f'[host]\ncommand = ["true"]\noutput = "{tmp_path}/h.log"\n')
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "logs", "-n", "-4", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == 2 and "whole number" in done.stderr


def test_events_last_n_one_swap_json_and_follow(tmp_path: Path) -> None:
    repo = make_sample_repo(tmp_path / "repo")
    with supervised(repo, data=False) as sup:
        sup.start()
        cli = [sys.executable, "-m", "supervisor", "--config", str(sup.config)]
        swap_id = sup.client.prepare("to be aborted")["id"]
        sup.client.abort(swap_id)
        sup.wait_swap(swap_id, "aborted")

        def run(*args: str) -> list[str]:
            done = subprocess.run([*cli, "events", *args], capture_output=True, text=True,
                                  timeout=WAIT, env={**os.environ, "NO_COLOR": "1"})
            assert done.returncode == 0, done.stderr
            return done.stdout.splitlines()

        everything = [json.loads(line) for line in run("--json", "-n", "1000")]
        assert [e["id"] for e in everything] == sorted(e["id"] for e in everything)
        last_two = run("-n", "2")
        assert len(last_two) == 2 and last_two == run("-n", "1000")[-2:]
        ours = [json.loads(line) for line in run("--json", "--swap", swap_id)]
        assert [e["event"] for e in ours] == ["swap.prepared", "swap.aborted"]
        assert all(e["swap_id"] == swap_id for e in ours)

        with reading([*cli, "events", "-f", "-n", "1", "--json"]) as lines:
            newest = json.loads(take(lines, 1)[0])["id"]  # printed once it follows
            second = sup.client.prepare("followed")["id"]
            sup.client.abort(second)
            seen: list[dict] = []
            while not any(e["event"] == "swap.aborted" for e in seen):
                seen.append(json.loads(take(lines, 1)[0]))
            assert [e["id"] for e in seen] == sorted({e["id"] for e in seen})  # once, in order
            assert seen[0]["id"] > newest
            assert [e["event"] for e in seen if e["swap_id"] == second] == [
                "swap.prepared",
                "swap.aborted",
            ]
        wait_for(lambda: sup.status()["swap"] is None, what="no swap in flight")


class _Stop(Exception):
    pass


def test_follow_keeps_what_the_old_file_got_between_its_last_read_and_the_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host writes its last line to the old file, then logrotate's new file appears, all
    between follow's read that came back empty and its look at the path: that line is read
    before the new file is (it used to be lost)."""
    log = tmp_path / "host.log"
    log.write_bytes(b"old\n")
    host = log.open("ab")
    stream = log.open("rb")
    stream.seek(0, os.SEEK_END)
    real_stat = os.stat
    looks = []

    def the_host_acts_first(path: object, *args: object, **kwargs: object) -> os.stat_result:
        looks.append(path)
        if len(looks) == 1:
            log.rename(tmp_path / "host.log.1")
            host.write(b"into the renamed file\n")
            host.flush()
            log.write_bytes(b"in the new file\n")
        if len(looks) == 3:
            raise _Stop
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(logs_module.os, "stat", the_host_acts_first)
    monkeypatch.setattr(logs_module, "FOLLOW_POLL_S", 0.0)
    out = io.BytesIO()
    with pytest.raises(_Stop):
        logs_module.follow(log, stream, out)
    host.close()
    assert out.getvalue() == b"into the renamed file\nin the new file\n"
