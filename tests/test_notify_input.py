"""The notify input between the socket and the runtime: heartbeats in a row heard once, the timer
hearing every heartbeat read before it, and a sender's tree verdict kept on its pin.

Real sockets and real processes: the sender is a host spawned by `HostProcess.spawn` that sends
what it is given and then waits to be killed, so it stays pinned while the input reads."""

from __future__ import annotations

import os
import select
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from supervisor.control.notifysocket import NotifyServer
from supervisor.daemon import notifyinput
from supervisor.daemon.counters import Counters
from supervisor.daemon.notifyinput import NotifyInput
from supervisor.process.host import HostProcess, SpawnSpec, kill_tree
from tests.support import wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCM_PIDFD: Linux")

SENDER = """
import os, signal, socket, sys, time
notify, done = sys.argv[1], sys.argv[2]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
rounds = 0
def send(*_):
    global rounds
    for message in sys.argv[3:]:
        sock.sendto(message.encode().replace(b"|", b"\\n"), notify)
    rounds += 1
    with open(done + ".tmp", "w") as out:
        out.write(str(rounds))
    os.replace(done + ".tmp", done)
signal.signal(signal.SIGUSR1, send)
send()
while True:
    time.sleep(600)
"""


class Recorder(SimpleNamespace):
    """The runtime as the input sees it, recording each call in order."""

    def __init__(self, process: HostProcess | None) -> None:
        calls: list[Any] = []
        super().__init__(
            swap=None,
            process=process,
            cgroup=None,
            calls=calls,
            feed_host=lambda event: calls.append(type(event).__name__),
            heartbeat=lambda status, boot=None: calls.append(("heartbeat", status)),
            feed_swap=lambda event: calls.append(type(event).__name__),
        )


class StubTimer:
    """Due at the `due_at`-th datagram (counting from 1), never otherwise."""

    def __init__(self, target: Recorder, due_at: int | None = None) -> None:
        self.target, self.due_at, self.asked = target, due_at, 0
        self.heard_at_wake: list[Any] | None = None

    def due(self) -> bool:
        self.asked += 1
        return self.asked == self.due_at

    def wake_now(self) -> None:
        self.heard_at_wake = list(self.target.calls)
        self.target.calls.append("woke")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NotifyServer]:
    with NotifyServer(tmp_path / "n.sock") as bound:
        yield bound


@pytest.fixture
def send(tmp_path: Path, server: NotifyServer) -> Iterator[Any]:
    """send(*messages) -> the host that sent them ('|' is a newline), all queued by return;
    it sends them again at each `resend`. At most 10 at a time: a unix datagram socket queues
    net.unix.max_dgram_qlen (10 here) before a sender blocks."""
    hosts: list[HostProcess] = []

    def sender(*messages: str) -> HostProcess:
        done = tmp_path / f"sent-{len(hosts)}"
        argv = (sys.executable, "-S", "-c", SENDER, str(server.path), str(done), *messages)
        host = HostProcess.spawn(SpawnSpec(argv, tmp_path, {}), None)
        host.done = done  # type: ignore[attr-defined]
        hosts.append(host)
        wait_for(lambda: done.exists() and done.read_text() == "1", what="the datagrams queued")
        return host

    yield sender
    for host in hosts:
        kill_tree(host, None)
        host.close()


def resend(host: HostProcess, rounds: int) -> None:
    """The sender sends its messages again (its `rounds`-th time); all queued by return."""
    os.kill(host.pid, signal.SIGUSR1)  # our unreaped child: the pid is its own
    done: Path = host.done  # type: ignore[attr-defined]
    wait_for(lambda: done.read_text() == str(rounds), what="the datagrams queued again")


def read_all(reader: NotifyInput) -> None:
    """One batch, as the loop would take it once the socket is readable."""
    assert select.select([reader.server], [], [], 10)[0], "nothing to read"
    reader.on_readable()


def test_heartbeats_in_a_row_are_heard_once_with_the_last_status(
    server: NotifyServer, send: Any
) -> None:
    host = send("WATCHDOG=1", "WATCHDOG=1|STATUS=a", "WATCHDOG=1", "READY=1",
                "WATCHDOG=1|STATUS=b", "STATUS=c", "WATCHDOG=1")  # fmt: skip
    target, counters = Recorder(host), Counters()
    reader = NotifyInput(server, counters, target, timer=StubTimer(target))
    read_all(reader)
    # in order, as the datagrams came: what came before READY is heard before it
    assert target.calls == [("heartbeat", "a"), "Ready", ("heartbeat", "c")]
    assert counters.heartbeats == 5 and counters.datagrams == 7
    assert counters.datagrams_dropped == counters.datagrams_invalid == 0


def test_a_heartbeat_without_status_keeps_the_one_before_it_in_the_run(
    server: NotifyServer, send: Any
) -> None:
    host = send("STATUS=warm", "WATCHDOG=1", "WATCHDOG=1")
    target = Recorder(host)
    read_all(NotifyInput(server, Counters(), target, timer=StubTimer(target)))
    assert target.calls == [("heartbeat", "warm")]


def test_a_due_timer_hears_every_heartbeat_read_before_it(server: NotifyServer, send: Any) -> None:
    host = send("STATUS=1", "STATUS=2", "STATUS=3")
    target = Recorder(host)
    timer = StubTimer(target, due_at=3)  # before the third datagram
    read_all(NotifyInput(server, Counters(), target, timer=timer))
    assert timer.heard_at_wake == [("heartbeat", "2")]
    assert target.calls == [("heartbeat", "2"), "woke", ("heartbeat", "3")]


def test_junk_in_a_run_of_heartbeats_is_counted_and_breaks_nothing(
    server: NotifyServer, send: Any
) -> None:
    host = send("WATCHDOG=1", "no equals sign", "EXTEND_TIMEOUT_USEC=-1", "WATCHDOG=1|STATUS=z")
    target, counters = Recorder(host), Counters()
    read_all(NotifyInput(server, counters, target, timer=StubTimer(target)))
    assert target.calls == [("heartbeat", "z")]
    assert counters.datagrams_invalid == 2 and counters.heartbeats == 2


def test_a_known_sender_is_judged_once_per_host(
    server: NotifyServer, send: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tree verdict lives on the sender's pin: its next datagrams cost no look at its
    process; a new host record (another HostProcess) is a new question."""
    asked: list[int] = []
    is_in_tree = notifyinput.host.is_in_tree

    def counting(pid: int, process: HostProcess | None, cgroup: Any) -> bool:
        asked.append(pid)
        return is_in_tree(pid, process, cgroup)

    monkeypatch.setattr(notifyinput.host, "is_in_tree", counting)
    host = send("WATCHDOG=1", "STATUS=beat")
    target, counters = Recorder(host), Counters()
    reader = NotifyInput(server, counters, target, timer=StubTimer(target))
    read_all(reader)
    resend(host, 2)
    read_all(reader)
    assert asked == [host.pid] and counters.datagrams_dropped == 0
    assert target.calls == [("heartbeat", "beat")] * 2

    again = HostProcess(host.pid, is_child=False, cgroup=None)  # the same process, a new record
    try:
        target.process = again
        resend(host, 3)
        read_all(reader)
        resend(host, 4)
        read_all(reader)
    finally:
        again.close()
    assert asked == [host.pid] * 2 and counters.datagrams_dropped == 0
    assert target.calls == [("heartbeat", "beat")] * 4


def test_a_stranger_is_dropped_every_time(server: NotifyServer, send: Any) -> None:
    """A sender outside the host's tree (another spawned process, not the host) stays dropped."""
    host = send("READY=1")
    target, counters = Recorder(host), Counters()
    reader = NotifyInput(server, counters, target, timer=StubTimer(target))
    read_all(reader)
    assert target.calls == ["Ready"]
    stranger = send("WATCHDOG=1", "READY=1", "STATUS=hijacked")
    assert stranger.pid != host.pid
    read_all(reader)
    assert target.calls == ["Ready"] and counters.datagrams_dropped == 3
