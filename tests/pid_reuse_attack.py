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
        reader = NotifyInput(server, counters, target, before_each=lambda: None)
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


def main() -> None:
    peers.use_peer_pidfd = sys.argv[1] != "pidfd_open"
    assert os.getpid() == 1, "run me as pid 1 of a new pid namespace"
    work = Path(tempfile.mkdtemp(prefix="sg-reuse-", dir="/tmp"))
    work.chmod(0o755)
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
