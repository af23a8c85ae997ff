"""A stand-in service manager: systemd's notify socket, fd store and Restart=always, nothing more.

`python tests/standin_manager.py NOTIFY_PATH [--no-store] -- COMMAND...` runs COMMAND with
NOTIFY_SOCKET=NOTIFY_PATH and, unless --no-store, FDSTORE=16. As systemd documents it: the main
process sends `FDSTORE=1` + `FDNAME=` with fds as SCM_RIGHTS (kept in order; like systemd, several
may share a name, and only the same file sent again is dropped) and `FDSTOREREMOVE=1` + `FDNAME=`
to drop every fd of that name; when COMMAND exits for any reason it is started again after 0.2 s
with the stored fds as 3.. and LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID (the new process's own pid,
set by an `exec` that keeps it). SIGTERM stops COMMAND (SIGTERM, then SIGKILL) and the manager.
"""

from __future__ import annotations

import array
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

RESTART_DELAY_S = 0.2


def main(argv: list[str]) -> int:
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    path, use_store = options[0], "--no-store" not in options
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(path)
        notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        notify.setblocking(False)
        return Manager(notify, path, command, use_store).run()


class Manager:
    def __init__(self, notify: socket.socket, path: str, command: list[str], store: bool) -> None:
        self.notify, self.path, self.command, self.use_store = notify, path, command, store
        self.store: list[tuple[str, int]] = []
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        selector = selectors.DefaultSelector()
        selector.register(self.notify, selectors.EVENT_READ)
        while not self.stopping:
            if self.child is None or self.child.poll() is not None:
                if self.child is not None:
                    time.sleep(RESTART_DELAY_S)  # systemd's RestartSec
                self.child = self._spawn()
            for _ in selector.select(timeout=0.05):
                self._receive()
        self._stop_child()
        return 0

    def _spawn(self) -> subprocess.Popen[bytes]:
        names = [name for name, _fd in self.store]
        fds = [fd for _name, fd in self.store]
        env = {**os.environ, "NOTIFY_SOCKET": self.path}
        if self.use_store:
            env["FDSTORE"] = "16"
        if fds:
            env["LISTEN_FDS"], env["LISTEN_FDNAMES"] = str(len(fds)), ":".join(names)
            # LISTEN_PID must be the new process's pid: a shell learns it and execs in place.
            argv = ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *self.command]
        else:
            argv = self.command

        def move_fds() -> None:
            for offset, fd in enumerate(fds):
                os.dup2(fd, 3 + offset)  # dup2 leaves the copy inheritable

        targets = tuple(range(3, 3 + len(fds)))
        return subprocess.Popen(argv, env=env, preexec_fn=move_fds, pass_fds=targets)

    def _receive(self) -> None:
        while True:
            try:
                message, ancillary, _flags, _addr = self.notify.recvmsg(
                    4096, socket.CMSG_SPACE(16 * 4) + socket.CMSG_SPACE(12)
                )
            except BlockingIOError:
                return
            fields = dict(
                line.split("=", 1) for line in message.decode().splitlines() if "=" in line
            )
            fds: list[int] = []
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(data[: len(data) - len(data) % received.itemsize])
                    fds.extend(received)
            name = fields.get("FDNAME", "stored")
            if fields.get("FDSTORE") == "1" and self.use_store:
                for fd in fds:
                    if any(_same_file(fd, kept) for _name, kept in self.store):
                        os.close(fd)  # systemd keeps one copy of a file
                    else:
                        self.store.append((name, fd))
                continue
            for fd in fds:
                os.close(fd)
            if fields.get("FDSTOREREMOVE") == "1":
                for _name, fd in [entry for entry in self.store if entry[0] == name]:
                    os.close(fd)
                self.store = [entry for entry in self.store if entry[0] != name]

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _stop_child(self) -> None:
        if self.child is None or self.child.poll() is not None:
            return
        self.child.terminate()
        try:
            self.child.wait(30)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()


def _same_file(one: int, other: int) -> bool:
    first, second = os.fstat(one), os.fstat(other)
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
