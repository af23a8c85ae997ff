"""swapguard's own service manager (systemd, or anything that speaks its notify protocol).

Why it is its own object: the loop that owns the deadman clock must never block or raise because
of its manager. A manager that stopped reading, a socket path that went stale after the manager
restarted, or a full queue must cost one dropped datagram and one log line, never a tick. So the
datagrams go out through a non-blocking socket, and every error is logged (once per kind) and
swallowed; `supervisor.notify.sd_notify`, which raises like libsystemd does, stays the choice of
the host and of `swapguard notify`.

The watchdog pings (WATCHDOG=1 at half of WatchdogSec) come from the loop itself, so a stuck loop
stops them and the manager restarts swapguard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Mapping

from supervisor import notify
from supervisor.core.notifyproto import MAX_DATAGRAM_BYTES
from supervisor.errors import ConfigError

log = logging.getLogger(__name__)


class ServiceManager:
    """The socket of our own manager, from $NOTIFY_SOCKET; every call is a no-op without one."""

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        path = env.get("NOTIFY_SOCKET") or ""
        self.address: str | None = ("\0" + path[1:] if path.startswith("@") else path) or None
        try:
            self.watchdog_interval = notify.watchdog_interval(env)
        except ConfigError as exc:
            log.warning("ignoring our manager's watchdog: %s", exc)
            self.watchdog_interval = None
        self._failures_logged: set[str] = set()
        self._watchdog: asyncio.Handle | None = None

    def notify(self, state: str) -> bool:
        """Send `state` without blocking; False (and a log line once per kind) when it could not."""
        if self.address is None:
            return False
        payload = state.encode("utf-8", "replace")[:MAX_DATAGRAM_BYTES]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(payload, self.address)
        except OSError as exc:
            kind = type(exc).__name__ if exc.errno is None else os.strerror(exc.errno)
            if kind not in self._failures_logged:
                self._failures_logged.add(kind)
                log.warning("our service manager did not take a notification (%s): %s", kind, exc)
            return False
        return True

    def start_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ping at half of WatchdogSec from `loop`, until `stop_watchdog`."""
        interval = self.watchdog_interval
        if interval is None or self.address is None:
            return

        def ping() -> None:
            self.notify("WATCHDOG=1")
            self._watchdog = loop.call_later(interval, ping)

        self._watchdog = loop.call_soon(ping)

    def stop_watchdog(self) -> None:
        """Cancel the ping that is armed now (not the first one, which has long fired)."""
        if self._watchdog is not None:
            with contextlib.suppress(RuntimeError):
                self._watchdog.cancel()
            self._watchdog = None
