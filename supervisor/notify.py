"""Speaking systemd's notify protocol: swapguard to its service manager, hosts to swapguard.

`sd_notify` sends the datagrams any sd_notify library would (fire and forget); `watchdog_interval`
reads WATCHDOG_USEC/WATCHDOG_PID as sd_watchdog_enabled does. The parse of what hosts send is
`core.notifyproto`; the socket swapguard receives on is `control.notifysocket`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from supervisor.core.notifyproto import DIGITS, MAX_DATAGRAM_BYTES
from supervisor.errors import ConfigError

SEND_TIMEOUT_S = 5.0
"""A client gives up rather than hang forever on a receiver that stopped draining."""


def sd_notify(state: str, socket_path: str | None = None) -> bool:
    """Send `state` (e.g. "READY=1\\nSTATUS=up") to the notify socket; False when there is none.

    The socket is `socket_path` or else $NOTIFY_SOCKET; "@name" is the abstract namespace. As in
    libsystemd, an unset socket is not an error, but a set one that is missing or refuses is.
    """
    path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    payload = state.encode("utf-8")
    if not payload:
        raise ValueError("sd_notify needs a non-empty state")
    if len(payload) > MAX_DATAGRAM_BYTES:
        raise ValueError(f"sd_notify state is {len(payload)} bytes, over {MAX_DATAGRAM_BYTES}")
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.settimeout(SEND_TIMEOUT_S)
        sock.sendto(payload, address)
    return True


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between pings that systemd expects of this process, or None if it expects none.

    systemd's rule (sd_watchdog_enabled): WATCHDOG_USEC is set and WATCHDOG_PID is unset or our
    pid. Pinging at half the timeout leaves room for one late ping.
    """
    raw_usec = env.get("WATCHDOG_USEC")
    if raw_usec is None:
        return None
    if not DIGITS.fullmatch(raw_usec) or int(raw_usec) == 0:
        raise ConfigError(
            f"WATCHDOG_USEC must be a positive integer of microseconds, got {raw_usec!r}"
        )
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid is not None:
        if not DIGITS.fullmatch(raw_pid) or int(raw_pid) == 0:
            raise ConfigError(f"WATCHDOG_PID must be a positive process id, got {raw_pid!r}")
        if int(raw_pid) != os.getpid():
            return None
    return int(raw_usec) / 1_000_000 / 2
