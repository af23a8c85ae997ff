"""A tiny host for swapguard's demo and tests: standard library only.

It reads `app.json` beside it (its "code"), records each start in a WAL-mode SQLite database,
tells its supervisor it is ready over NOTIFY_SOCKET, and heartbeats until SIGTERM. What a version
does is set by `app.json`:

    {"version": "v2", "behaviour": "ok" | "crash" | "hang" | "silent" | "exit0", "confirm": false,
     "extend_usec": 0, "writes_per_second": 0}

- ok: ready, heartbeats, writes a row per tick when writes_per_second > 0
- crash: exits 1 right after opening the database (a broken migration)
- hang: never becomes ready
- silent: ready, then no heartbeat
- exit0: ready, then exits 0 (a host that applied a change and restarts)
- confirm: on probation (SWAPGUARD_SWAP_ID set), confirm the swap once ready
- extend_usec: on probation, ask for that much more time once ready (EXTEND_TIMEOUT_USEC)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def notify(message: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.sendall(message.encode())
    except OSError:
        pass  # no supervisor listening right now (it restarts and adopts us): keep serving


def main() -> int:
    config = json.loads((HERE / "app.json").read_text())
    version = str(config.get("version", "v1"))
    behaviour = str(config.get("behaviour", "ok"))
    db_path = HERE / config.get("database", "data/app.db")
    db_path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=wal")
    db.execute(
        "CREATE TABLE IF NOT EXISTS starts (id INTEGER PRIMARY KEY, version TEXT, at REAL, "
        "swap TEXT, rolled_back TEXT)"
    )
    db.execute("CREATE TABLE IF NOT EXISTS ticks (id INTEGER PRIMARY KEY, version TEXT, at REAL)")
    if version != "v1":
        db.execute(f"CREATE TABLE IF NOT EXISTS migrated_{version} (note TEXT)")
    db.execute(
        "INSERT INTO starts (version, at, swap, rolled_back) VALUES (?, ?, ?, ?)",
        (
            version,
            time.time(),
            os.environ.get("SWAPGUARD_SWAP_ID"),
            os.environ.get("SWAPGUARD_ROLLED_BACK"),
        ),
    )
    print(f"sample host {version} ({behaviour}) pid {os.getpid()}", flush=True)
    if behaviour == "crash":
        print(f"sample host {version}: migration failed, exiting", file=sys.stderr, flush=True)
        return 1
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    if behaviour == "hang":
        while not stopping:
            time.sleep(0.1)
        return 0
    notify(f"READY=1\nSTATUS=version {version}")
    swap_id = os.environ.get("SWAPGUARD_SWAP_ID")
    if swap_id and config.get("extend_usec"):
        notify(f"EXTEND_TIMEOUT_USEC={int(config['extend_usec'])}")
    if swap_id and config.get("confirm"):
        notify(f"X_SWAPGUARD_CONFIRM={swap_id}")
    if behaviour == "exit0":
        return 0
    watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    beat = min(1.0, watchdog_usec / 2e6) if watchdog_usec else 1.0
    writes = float(config.get("writes_per_second", 0))
    interval = min(beat, 1.0 / writes) if writes > 0 else beat
    last_beat = 0.0
    while not stopping:
        now = time.monotonic()
        if behaviour != "silent" and now - last_beat >= beat:
            notify("WATCHDOG=1")
            last_beat = now
        if writes > 0:
            db.execute("INSERT INTO ticks (version, at) VALUES (?, ?)", (version, time.time()))
        time.sleep(interval)
    # A host that writes at shutdown (a final flush of its caches): what it writes after the
    # activation's space check is what a snapshot can run out of room for.
    if (flush := int(config.get("flush_on_stop_bytes", 0))) > 0:
        db.execute("CREATE TABLE IF NOT EXISTS flushed (data BLOB)")
        db.execute("INSERT INTO flushed (data) VALUES (?)", (os.urandom(flush),))
    db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
