"""A small Python host under swapguard: the control client and sd_notify, side by side.

It reads `app.json` beside it (its "code"):

    {"version": "v2", "confirm": true, "via": "http" | "notify"}

- reports ready, then heartbeats every second (or at half of WATCHDOG_USEC) with a status text;
- on probation (SWAPGUARD_SWAP_ID set) with "confirm": true, confirms its own swap once ready;
- "via": "http" talks to the control socket with `supervisor.client.Client`, which answers every
  call (a confirm after the deadline raises `Conflict`); "via": "notify" sends systemd-style
  datagrams with `supervisor.notify.sd_notify`, fire and forget, as any sd_notify library would;
- appends what it was told at start (probation, rollback) to `host.log`, one JSON line per start;
- exits 0 on SIGTERM.

It needs swapguard importable (installed in its environment, or on PYTHONPATH).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from supervisor.client import Client
from supervisor.errors import SwapguardError
from supervisor.notify import sd_notify, watchdog_interval

HERE = Path(__file__).resolve().parent


class Reporter:
    """Readiness, heartbeats and confirms, over HTTP or as notify datagrams."""

    def __init__(self, via: str) -> None:
        if via not in ("http", "notify"):
            raise ValueError(f'app.json: "via" must be "http" or "notify", got {via!r}')
        self.via = via
        self.client = Client(os.environ["SWAPGUARD_SOCKET"]) if via == "http" else None

    def ready(self, status: str) -> None:
        if self.client is not None:
            self.client.heartbeat(status, ready=True)
        else:
            sd_notify(f"READY=1\nSTATUS={status}")

    def heartbeat(self, status: str) -> None:
        if self.client is not None:
            self.client.heartbeat(status)
        else:
            sd_notify(f"WATCHDOG=1\nSTATUS={status}")

    def confirm(self, swap_id: str) -> None:
        if self.client is not None:
            self.client.confirm(swap_id)
        else:
            sd_notify(f"X_SWAPGUARD_CONFIRM={swap_id}")

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def record(**fields: Any) -> None:
    """One JSON line per event in host.log (ignored by git), so a test can see what we were told."""
    with (HERE / "host.log").open("a") as log:
        log.write(json.dumps(fields) + "\n")


def main() -> int:
    app = json.loads((HERE / "app.json").read_text())
    version = str(app.get("version", "v1"))
    reporter = Reporter(str(app.get("via", "http")))
    swap_id = os.environ.get("SWAPGUARD_SWAP_ID")
    rolled_back = os.environ.get("SWAPGUARD_ROLLED_BACK")
    seen = {
        "version": version,
        "pid": os.getpid(),
        "probation": {"swapId": swap_id, "deadline": os.environ.get("SWAPGUARD_DEADLINE")}
        if swap_id
        else None,
        "rolledBack": {"swapId": rolled_back, "reason": os.environ.get("SWAPGUARD_ROLLBACK_REASON")}
        if rolled_back
        else None,
    }
    record(event="start", **seen)

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())

    reporter.ready(f"python host {version}: up")
    if swap_id and app.get("confirm"):
        try:
            reporter.confirm(swap_id)
            record(event="confirmed", swapId=swap_id, via=reporter.via, **seen)
        except SwapguardError as err:  # e.g. Conflict: the deadline passed first
            print(f"confirm of {swap_id} refused: {err.message}", file=sys.stderr, flush=True)

    interval = min(1.0, watchdog_interval() or 1.0)
    beats = 0
    while not stopping.wait(interval):
        beats += 1
        try:
            reporter.heartbeat(f"python host {version}: {beats} beats")
        except (SwapguardError, OSError) as err:
            print(f"heartbeat failed: {err}", file=sys.stderr, flush=True)
    reporter.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
