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

import array
import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import MutableMapping

from supervisor import notify
from supervisor.core.notifyproto import MAX_DATAGRAM_BYTES
from supervisor.daemon import faults
from supervisor.errors import ConfigError

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3
STORED_NAMES = frozenset({"notify", "control", "hostcontrol"})
"""What swapguard keeps in its manager's fd store: the sockets hosts and operators connect to
(`hostcontrol`: the host's own control socket, with host.user)."""


class ServiceManager:
    """The socket of our own manager, from $NOTIFY_SOCKET; every call is a no-op without one."""

    def __init__(self, env: MutableMapping[str, str] = os.environ) -> None:
        path = env.get("NOTIFY_SOCKET") or ""
        self.address: str | None = ("\0" + path[1:] if path.startswith("@") else path) or None
        try:
            self.watchdog_interval = notify.watchdog_interval(env)
        except ConfigError as exc:
            log.warning("ignoring our manager's watchdog: %s", exc)
            self.watchdog_interval = None
        store = env.get("FDSTORE", "")
        self.fd_store_size = int(store) if store.isdigit() else 0
        self.handed_back = inherited_sockets(env)
        """Sockets from the fd store, by name, until their owner takes them (`pop`)."""
        self._failures_logged: set[str] = set()
        self._watchdog: asyncio.Handle | None = None

    def notify(self, state: str) -> bool:
        """Send `state` without blocking; False (and a log line once per kind) when it could not."""
        if self.address is None:
            return False
        return self._send(state.encode("utf-8", "replace")[:MAX_DATAGRAM_BYTES], [])

    def _send(self, payload: bytes, ancillary: list[tuple[int, int, bytes]]) -> bool:
        assert self.address is not None
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                faults.manager_send()
                sock.sendmsg([payload], ancillary, 0, self.address)
        except Exception as exc:  # whatever the send raises stays here, never in the loop
            errno = getattr(exc, "errno", None)
            kind = type(exc).__name__ if errno is None else os.strerror(errno)
            if kind not in self._failures_logged:
                self._failures_logged.add(kind)
                log.warning("our service manager did not take a notification (%s): %s", kind, exc)
            return False
        return True

    def store_socket(self, name: str, sock: socket.socket, *, taken_back: bool = False) -> bool:
        """Hand `sock` to the manager's fd store as `name` (FDSTORE=1), where it has one.

        Under systemd with `FileDescriptorStoreMax=` (announced as $FDSTORE), a restarted
        swapguard gets it back through LISTEN_FDS, still bound where hosts connected. A socket
        bound anew (not `taken_back` from the store) first takes out what the store holds under
        `name`: systemd keeps every fd sent under one name (it drops only the same file twice),
        so a stale one left there would come back first at each restart.
        """
        if self.address is None or self.fd_store_size <= 0:
            return False
        if not taken_back:
            self.forget_socket(name)
        message = f"FDSTORE=1\nFDNAME={name}".encode()
        fds = array.array("i", [sock.fileno()])
        return self._send(message, [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])

    def forget_socket(self, name: str) -> bool:
        """Take `name` out of the store (a clean stop: the next start binds anew)."""
        if self.address is None or self.fd_store_size <= 0:
            return False
        return self._send(f"FDSTOREREMOVE=1\nFDNAME={name}".encode(), [])

    def start_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ping at half of WatchdogSec from `loop`, until `stop_watchdog`."""
        interval = self.watchdog_interval
        if interval is None or self.address is None:
            return

        def ping() -> None:
            self._watchdog = loop.call_later(interval, ping)  # first: re-armed whatever follows
            self.notify("WATCHDOG=1")

        self._watchdog = loop.call_soon(ping)

    def stop_watchdog(self) -> None:
        """Cancel the ping that is armed now (not the first one, which has long fired)."""
        if self._watchdog is not None:
            with contextlib.suppress(RuntimeError):
                self._watchdog.cancel()
            self._watchdog = None


# --- the fd store: sockets that outlive a restart of swapguard ----------------------------------


def inherited_sockets(env: MutableMapping[str, str] = os.environ) -> dict[str, socket.socket]:
    """The sockets our manager handed back (`LISTEN_FDS`), by `FDNAME`; as sd_listen_fds_with_names.

    They count only when `LISTEN_PID` is our pid (else they were meant for another process). The
    variables are removed either way, so nothing we start inherits them.
    """
    keys = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
    pid, count, names = (env.pop(key, None) for key in keys)
    if pid != str(os.getpid()) or count is None or not count.isdigit():
        return {}
    labels = (names or "").split(":")
    found: dict[str, socket.socket] = {}
    for offset in range(int(count)):
        fd = LISTEN_FDS_START + offset
        name = labels[offset] if offset < len(labels) and labels[offset] else "unknown"
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            log.warning("fd %d (%s) from our manager is not a socket: %s", fd, name, exc)
            continue
        if name in found or name not in STORED_NAMES:
            log.warning("closing fd %d from our manager: unexpected name %r", fd, name)
            sock.close()
            continue
        found[name] = sock
    return found
