"""Hostile new versions for the fault suite. A test repo runs this file as `python run.py`.

It reads `app.json` beside it. The behaviours of the well-behaved sample host (ok, crash, hang,
silent, exit0) exec `app.py` (the sample host) in place, so v1 is the sample host itself. Every
other behaviour is a new version that does one hostile thing on probation and never confirms:

- exit0_now: exits 0 at once, before READY
- stop_heartbeats: ready, heartbeats for a moment, then stays alive and silent
- ignore_term: ready, ignores SIGTERM
- escape: ready, ignores SIGTERM, and leaves processes behind that ignore it too: a setsid child,
  a double-forked daemon (cwd /), an exec'd program in a session of its own, and a process that
  re-forks itself every few milliseconds (its pid never stays the same)
- flood_notify: ready, then floods NOTIFY_SOCKET from several processes with `flood` datagrams
  (WATCHDOG=1 and junk), as fast as the socket takes them
- flood_control: ready, then `threads` threads hammer GET /v1/status and POST /v1/heartbeat on
  SWAPGUARD_SOCKET, while `idle` more hold half-sent requests open
- delete_db, corrupt_db, hold_lock (BEGIN IMMEDIATE, never commits), grow_wal (no checkpoints)

and one that is not hostile at all: touch_then_confirm (see there).

Every new version first migrates the database like the sample host does (a `migrated_<version>`
table and a row in `starts`), so a rollback has something to undo. Progress goes to
`data/hostile.log` as lines "<what> <value>": `pid <n>` for each process started, `done <n>` once
the attack is under way (the figure is attack-specific), `sent <n>` for flood progress.

Standard library only: it runs under whatever interpreter the host command names.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLE_BEHAVIOURS = {"ok", "crash", "hang", "silent", "exit0"}
DB_PATH = HERE / "data" / "app.db"
LOG_PATH = HERE / "data" / "hostile.log"
JUNK = [
    b"WATCHDOG=1",
    b"\xff\xfe\x00not text",
    b"READY=2",
    b"X_SWAPGUARD_CONFIRM=not-this-swap",
    b"WATCHDOG=1\nSTATUS=flooding",
    b"=",
    b"A" * 5000,
    b"EXTEND_TIMEOUT_USEC=soon",
]


def record(what: str, value: object) -> None:
    """Append one progress line; O_APPEND keeps lines from many processes whole."""
    fd = os.open(LOG_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{what} {value}\n".encode())
    finally:
        os.close(fd)


def notify_socket() -> socket.socket:
    path = os.environ["NOTIFY_SOCKET"]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.connect("\0" + path[1:] if path.startswith("@") else path)
    return sock


def notify(message: str) -> None:
    with notify_socket() as sock:
        sock.sendall(message.encode())


def migrate(version: str) -> sqlite3.Connection:
    """What a new version's first start does: a schema change and a row, committed."""
    DB_PATH.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(DB_PATH, isolation_level=None)
    db.execute("PRAGMA journal_mode=wal")
    db.execute(f"CREATE TABLE IF NOT EXISTS migrated_{version} (note TEXT)")
    db.execute(
        "INSERT INTO starts (version, at, swap, rolled_back) VALUES (?, ?, ?, ?)",
        (version, time.time(), os.environ.get("SWAPGUARD_SWAP_ID"), None),
    )
    return db


def ignore_term() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def linger() -> None:
    """Stay alive until killed (SIGTERM too, unless it is ignored)."""
    while True:
        time.sleep(3600)


def forked(child: object) -> int:
    """Run `child()` in a forked process that never returns here; the parent gets the pid."""
    pid = os.fork()
    if pid == 0:
        try:
            child()  # type: ignore[operator]
        finally:
            os._exit(0)
    return pid


# --- behaviours ----------------------------------------------------------------------------


def stop_heartbeats(config: dict) -> None:
    migrate(config["version"])
    notify("READY=1")
    for _ in range(3):
        notify("WATCHDOG=1")
        time.sleep(0.2)
    record("done", 3)
    linger()


def ignore_sigterm(config: dict) -> None:
    migrate(config["version"])
    ignore_term()
    notify("READY=1")
    record("done", 1)
    linger()


def _setsid_child() -> None:
    os.setsid()
    ignore_term()
    record("pid", os.getpid())
    linger()


def _double_forked_daemon() -> None:
    os.setsid()

    def daemon() -> None:
        os.chdir("/")
        ignore_term()
        record("pid", os.getpid())
        linger()

    forked(daemon)


def _hopper() -> None:
    """Fork, let the parent exit, start a new session, again and again: no pid lasts."""
    ignore_term()
    record("pid", os.getpid())
    while True:
        time.sleep(0.005)
        if os.fork() != 0:
            os._exit(0)
        os.setsid()


def escape(config: dict) -> None:
    migrate(config["version"])
    ignore_term()
    notify("READY=1")
    forked(_setsid_child)
    forked(_double_forked_daemon)
    forked(_hopper)
    program = (
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(3600)\n"
    )
    exec_child = subprocess.Popen([sys.executable, "-c", program], start_new_session=True)
    record("pid", exec_child.pid)
    record("done", 4)
    linger()


def _flood_worker(count: int, payloads: list[bytes]) -> None:
    sock = notify_socket()
    for number in range(count):
        sock.send(payloads[number % len(payloads)])
        if number % 1000 == 999:
            record("sent", 1000)
    record("sent", count % 1000)


def flood_notify(config: dict) -> None:
    migrate(config["version"])
    notify("READY=1")
    workers = int(config.get("workers", 4))
    total = int(config.get("flood", 100_000))
    record("done", total)
    began = time.monotonic()
    # extend: every datagram a valid request for more time (each one pushes the deadline)
    payloads = [b"EXTEND_TIMEOUT_USEC=60000000"] if config.get("extend") else JUNK
    pids = [forked(lambda: _flood_worker(total // workers, payloads)) for _ in range(workers)]
    for pid in pids:
        os.waitpid(pid, 0)
    record("flood_s", round(time.monotonic() - began, 3))
    linger()


def _http(sock: socket.socket, method: str, path: str, body: bytes = b"") -> int:
    """One request on a keep-alive connection; returns the status code."""
    head = f"{method} {path} HTTP/1.1\r\nHost: swapguard\r\nContent-Length: {len(body)}\r\n"
    if body:
        head += "Content-Type: application/json\r\n"
    sock.sendall(head.encode() + b"\r\n" + body)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    header, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in header.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        rest += chunk
    if b"connection: close" in header.lower():
        raise ConnectionError("closed by the server")
    return int(header.split(b" ", 2)[1])


class _Tally:
    def __init__(self, report_at: int) -> None:
        self.lock = threading.Lock()
        self.answered = 0
        self.report_at = report_at

    def add(self, status: int) -> None:
        with self.lock:
            self.answered += 1
            if self.answered == self.report_at:
                record("done", self.answered)
            if self.answered % 100 == 0:
                record("answered", 100)


def _hammer(path: str, tally: _Tally) -> None:
    requests = [("GET", "/v1/status", b""), ("POST", "/v1/heartbeat", b'{"status": "flood"}')]
    number = 0
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(path)
                for _ in range(50):
                    method, target, body = requests[number % 2]
                    number += 1
                    tally.add(_http(sock, method, target, body))
        except OSError:
            time.sleep(0.001)


def _hold_idle(path: str) -> None:
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(path)
                sock.sendall(b"GET /v1/status HTTP/1.1\r\nHost: swa")  # and never the rest
                while sock.recv(65536):
                    pass
        except OSError:
            time.sleep(0.01)


def flood_control(config: dict) -> None:
    migrate(config["version"])
    notify("READY=1")
    path = os.environ["SWAPGUARD_SOCKET"]
    tally = _Tally(report_at=int(config.get("report_at", 500)))
    threads = [
        threading.Thread(target=_hammer, args=(path, tally), daemon=True)
        for _ in range(int(config.get("threads", 50)))
    ]
    threads += [
        threading.Thread(target=_hold_idle, args=(path,), daemon=True)
        for _ in range(int(config.get("idle", 20)))
    ]
    for thread in threads:
        thread.start()
    linger()


def delete_db(config: dict) -> None:
    migrate(config["version"]).close()
    notify("READY=1")
    for suffix in ("", "-wal", "-shm", "-journal"):
        DB_PATH.with_name(DB_PATH.name + suffix).unlink(missing_ok=True)
    record("done", 1)
    linger()


def corrupt_db(config: dict) -> None:
    db = migrate(config["version"])
    notify("READY=1")
    for suffix in ("", "-wal"):
        target = DB_PATH.with_name(DB_PATH.name + suffix)
        size = target.stat().st_size
        with target.open("r+b") as handle:
            handle.write(os.urandom(max(size, 4096)))
            handle.flush()
            os.fsync(handle.fileno())
    record("done", 1)
    del db  # left open: it still believes in what it wrote
    linger()


def hold_lock(config: dict) -> None:
    db = migrate(config["version"])
    ignore_term()
    notify("READY=1")
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO ticks (version, at) VALUES (?, ?)", ("uncommitted", time.time()))
    record("done", 1)
    linger()


def grow_wal(config: dict) -> None:
    db = migrate(config["version"])
    db.execute("PRAGMA wal_autocheckpoint=0")
    # No fsync per commit: the attack is the WAL's size, and it must be reached well within the
    # window even when the disk is busy (at one fsync per row it sometimes was not, here).
    db.execute("PRAGMA synchronous=OFF")
    notify("READY=1")
    wal = DB_PATH.with_name(DB_PATH.name + "-wal")
    target = int(config.get("wal_bytes", 16 * 1024 * 1024))
    payload = os.urandom(4096).hex()
    written = 0
    while True:
        db.execute("INSERT INTO ticks (version, at) VALUES (?, ?)", (payload, time.time()))
        written += 1
        if written % 100 == 0 and wal.stat().st_size >= target:
            record("done", wal.stat().st_size)
            break
    while True:
        db.execute("INSERT INTO ticks (version, at) VALUES (?, ?)", (payload, time.time()))
        time.sleep(0.05)


def exit0_now(config: dict) -> None:
    sys.exit(0)


def touch_then_confirm(config: dict) -> None:
    """Not hostile: a good version that confirms itself just as the tree stirs (an ignored log
    file appears), so the confirm lands inside the code watcher's debounce."""
    migrate(config["version"])
    notify("READY=1")
    record("done", 1)  # before the touch: no other write may restart the debounce after it
    (HERE / "touched.log").write_text(f"{time.time()}\n")
    time.sleep(float(config.get("delay", 0.2)))
    notify(f"X_SWAPGUARD_CONFIRM={os.environ['SWAPGUARD_SWAP_ID']}")
    while True:
        notify("WATCHDOG=1")
        time.sleep(0.2)


BEHAVIOURS = {
    "exit0_now": exit0_now,
    "stop_heartbeats": stop_heartbeats,
    "ignore_term": ignore_sigterm,
    "escape": escape,
    "flood_notify": flood_notify,
    "flood_control": flood_control,
    "delete_db": delete_db,
    "corrupt_db": corrupt_db,
    "hold_lock": hold_lock,
    "grow_wal": grow_wal,
    "touch_then_confirm": touch_then_confirm,
}


def main() -> None:
    config = json.loads((HERE / "app.json").read_text())
    behaviour = str(config.get("behaviour", "ok"))
    if behaviour in SAMPLE_BEHAVIOURS:
        os.execv(sys.executable, [sys.executable, str(HERE / "app.py")])
    if behaviour not in BEHAVIOURS:
        sys.exit(f"hostile host: unknown behaviour {behaviour!r} in app.json")
    record("pid", os.getpid())
    BEHAVIOURS[behaviour](config)


if __name__ == "__main__":
    main()
