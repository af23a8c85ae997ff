"""The pid-reuse attack of issue 13, made deterministic: run as pid 1 of a new pid namespace
(`unshare --pid --fork --mount-proc`), where /proc/sys/kernel/ns_last_pid places the next process.

A reader (nobody) connects to the control socket, hands the connection to its child and exits;
a process of the host's tree is then started on the reader's old pid; the child writes
`POST /v1/host/stop` on the inherited connection. With `notify`: a stranger sends READY=1 and
WATCHDOG=trigger to the notify socket and exits, and the tree's process takes its pid before the
datagram is read. Prints one JSON line: what happened.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from supervisor.control import peers
from supervisor.control.server import ControlServer
from supervisor.daemon.service import LoopBackend
from supervisor.process.host import HostProcess, SpawnSpec

WAIT_S = 10.0
HOST = """
import os, signal, sys, time
def fork_child(*_):
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    with open(sys.argv[1], "a") as out:
        out.write(f"{pid}\\n")
signal.signal(signal.SIGUSR1, fork_child)
with open(sys.argv[1], "a") as out:
    out.write("ready\\n")
while True:
    time.sleep(1)
"""


# The host of `notify-known`: at each SIGUSR1 a child of its tree sends STATUS=tree<n> to the
# notify socket, waits (alive, so the server keeps its pin) for its go file, and is reaped.
SENDING_HOST = """
import os, signal, socket, sys, time
report, notify = sys.argv[1], sys.argv[2]
def say(line):
    with open(report, "a") as out:
        out.write(line + "\\n")
def send_and_wait(*_):
    pid = os.fork()
    if pid == 0:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"STATUS=tree%d" % os.getpid(), notify)
        while not os.path.exists(f"{report}.{os.getpid()}.go"):
            time.sleep(0.01)
        os._exit(0)
    say(f"sent {pid}")
    os.waitpid(pid, 0)
    say(f"reaped {pid}")
signal.signal(signal.SIGUSR1, send_and_wait)
say("ready")
while True:
    time.sleep(1)
"""


class RecordingBackend(LoopBackend):
    """The real write check (LoopBackend.may_write); the host action only recorded."""

    def __init__(self, runtime: Any) -> None:
        super().__init__(runtime)
        self.actions: list[str] = []

    def host_action(self, action: str) -> dict[str, Any]:
        self.actions.append(action)
        return {"state": "stopping"}


def wait_for_line(path: Path, count: int) -> list[str]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        lines = path.read_text().split() if path.exists() else []
        if len(lines) >= count:
            return lines
        time.sleep(0.01)  # polling a file under a deadline
    raise TimeoutError(f"{path}: fewer than {count} lines")


def notify_attack(host: HostProcess, work: Path, report: Path) -> dict[str, Any]:
    """A datagram whose sender's pid is a tree process's by the time it is read."""
    from supervisor.control.notifysocket import NotifyServer
    from supervisor.daemon.counters import Counters
    from supervisor.daemon.notifyinput import NotifyInput

    fed: list[str] = []
    target = SimpleNamespace(
        swap=None,
        process=host,
        cgroup=None,
        feed_host=lambda event: fed.append(type(event).__name__),
        heartbeat=lambda status, boot=None: fed.append("heartbeat"),
        feed_swap=lambda event: fed.append(type(event).__name__),
    )
    counters = Counters()
    with NotifyServer(work / "notify.sock") as server:
        idle = SimpleNamespace(due=lambda: False, wake_now=lambda: None)
        reader = NotifyInput(server, counters, target, timer=idle)
        sender = os.fork()
        if sender == 0:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"READY=1\nWATCHDOG=trigger", str(work / "notify.sock"))
            os._exit(0)
        os.waitpid(sender, 0)
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(sender - 1))
        os.kill(host.pid, signal.SIGUSR1)
        tree_pid = int(wait_for_line(report, 2)[1])
        reader.on_readable()
    return {
        "reader": sender,
        "tree_pid": tree_pid,
        "fed": fed,
        "dropped": counters.datagrams_dropped,
        "received": counters.datagrams,
    }


def _recording_input(host: HostProcess, server: Any) -> tuple[Any, list[Any], Any]:
    from supervisor.daemon.counters import Counters
    from supervisor.daemon.notifyinput import NotifyInput

    fed: list[Any] = []
    target = SimpleNamespace(
        swap=None,
        process=host,
        cgroup=None,
        feed_host=lambda event: fed.append(type(event).__name__),
        heartbeat=lambda status, boot=None: fed.append(status),
        feed_swap=lambda event: fed.append(type(event).__name__),
    )
    counters = Counters()
    idle = SimpleNamespace(due=lambda: False, wake_now=lambda: None)
    return NotifyInput(server, counters, target, timer=idle), fed, counters


def _read_one(reader: Any) -> None:
    """Wait (bounded) for a datagram, then let the input take what is there."""
    import select

    if not select.select([reader.server], [], [], WAIT_S)[0]:
        raise TimeoutError("no datagram arrived")
    reader.on_readable()


def _stranger(notify: Path, status: bytes) -> tuple[int, int]:
    """A process outside the host's tree that sends `status` and stays alive until its pipe's
    write end (returned with its pid) is closed."""
    hold_read, hold_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(hold_write)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(status, str(notify))
        os.read(hold_read, 1)
        os._exit(0)
    os.close(hold_read)
    return pid, hold_write


def notify_known_attack(work: Path) -> dict[str, Any]:
    """Known senders are remembered by pid while they live: a stranger that takes a known tree
    sender's pid once it exited is judged afresh (dropped), and a tree process that takes a
    known stranger's pid is too (kept): no verdict outlives its process."""
    from supervisor.control.notifysocket import NotifyServer

    notify, report = work / "notify.sock", work / "host.out"
    with NotifyServer(notify) as server:
        host = HostProcess.spawn(
            SpawnSpec(
                (sys.executable, "-c", SENDING_HOST, str(report), str(notify)),
                work,
                dict(os.environ),
            ),
            None,
        )
        try:
            wait_for_line(report, 1)
            reader, fed, counters = _recording_input(host, server)
            # A: a tree sender is pinned and remembered, exits; a stranger takes its pid.
            os.kill(host.pid, signal.SIGUSR1)
            tree = _last(report, "sent")
            _read_one(reader)
            (report.parent / f"{report.name}.{tree}.go").touch()
            _wait_for(report, f"reaped {tree}")
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(tree - 1))
            stranger, hold = _stranger(notify, b"STATUS=stranger")
            _read_one(reader)
            os.close(hold)
            os.waitpid(stranger, 0)
            after_a = {"fed": list(fed), "dropped": counters.datagrams_dropped}
            # B: a stranger is pinned and judged (dropped), exits; a tree process takes its pid.
            other, hold = _stranger(notify, b"STATUS=stranger")
            _read_one(reader)
            os.close(hold)
            os.waitpid(other, 0)
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(other - 1))
            os.kill(host.pid, signal.SIGUSR1)
            second_tree = _last(report, "sent", after=tree)
            _read_one(reader)
            (report.parent / f"{report.name}.{second_tree}.go").touch()
            return {
                "first_tree": tree,
                "stranger": stranger,
                "other": other,
                "second_tree": second_tree,
                "after_a": after_a,
                "fed": fed,
                "dropped": counters.datagrams_dropped,
                "received": counters.datagrams,
            }
        finally:
            host.signal_tree(signal.SIGKILL)


def _wait_for(path: Path, line: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if path.exists() and line in path.read_text().splitlines():
            return
        time.sleep(0.01)  # polling a file under a deadline
    raise TimeoutError(f"{path}: no line {line!r}")


def _last(path: Path, word: str, after: int | None = None) -> int:
    """The pid of the newest `word <pid>` line (other than `after`), waiting for it."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        pids = [int(line.split()[1]) for line in lines if line.startswith(word + " ")]
        if pids and pids[-1] != after:
            return pids[-1]
        time.sleep(0.01)  # polling a file under a deadline
    raise TimeoutError(f"{path}: no new {word!r} line")


def main() -> None:
    peers.use_peer_pidfd = sys.argv[1] != "pidfd_open"
    assert os.getpid() == 1, "run me as pid 1 of a new pid namespace"
    work = Path(tempfile.mkdtemp(prefix="sg-reuse-", dir="/tmp"))
    work.chmod(0o755)
    if sys.argv[1] == "notify-known":
        print(json.dumps(notify_known_attack(work)), flush=True)
        os._exit(0)
    report = work / "host.out"
    host = HostProcess.spawn(
        SpawnSpec((sys.executable, "-c", HOST, str(report)), work, dict(os.environ)), None
    )
    wait_for_line(report, 1)
    if sys.argv[1] == "notify":
        print(json.dumps(notify_attack(host, work, report)), flush=True)
        host.signal_tree(signal.SIGKILL)
        os._exit(0)
    runtime = SimpleNamespace(
        loop=None,
        config=SimpleNamespace(control=SimpleNamespace(allow_users=(), allow_groups=())),
        process=host,
        cgroup=None,
    )
    backend = RecordingBackend(runtime)
    server = ControlServer(work / "control.sock", backend, mode=0o666)
    server.serve_in_thread()
    nobody = pwd.getpwnam("nobody")
    go_read, go_write = os.pipe()
    answer_read, answer_write = os.pipe()
    reader = os.fork()
    if reader == 0:  # the reader: connect as nobody, hand the connection on, exit
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(work / "control.sock"))
        # One read first, so the server has accepted (and pinned) the connection while its
        # opener lives: the attack is on a connection outliving its opener. (A pid taken between
        # connect and accept is told apart only by SO_PEERPIDFD: see the README's limits.)
        conn.settimeout(WAIT_S)
        conn.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        conn.recv(65536)
        if os.fork() == 0:  # its child keeps the connection and waits for the pid to be reused
            os.read(go_read, 1)
            conn.settimeout(WAIT_S)
            conn.sendall(b"POST /v1/host/stop HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            os.write(answer_write, conn.recv(65536))
            os._exit(0)
        os._exit(0)
    os.waitpid(reader, 0)  # the reader is gone; its pid is free
    Path("/proc/sys/kernel/ns_last_pid").write_text(str(reader - 1))
    os.kill(host.pid, signal.SIGUSR1)
    tree_pid = int(wait_for_line(report, 2)[1])
    os.write(go_write, b"x")
    answer = os.read(answer_read, 65536).decode("latin-1")
    print(
        json.dumps(
            {
                "reader": reader,
                "tree_pid": tree_pid,
                "answer": answer.split("\r\n", 1)[0],
                "body": answer.partition("\r\n\r\n")[2],
                "actions": backend.actions,
            }
        ),
        flush=True,
    )
    server.close()
    host.signal_tree(signal.SIGKILL)
    os._exit(0)


if __name__ == "__main__":
    main()
