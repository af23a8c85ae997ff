"""systemd's notify protocol, both ways: hosts report to swapguard, swapguard reports to systemd.

Theory of operation. A host is given `NOTIFY_SOCKET`, so any sd_notify library works unchanged. Each
datagram is newline-separated `KEY=VALUE` text. The parse (`parse_datagram`) is pure: bytes in, one
`NotifyMessage` out, or a `NotifyError` that names what was wrong. It follows systemd where systemd
is specific: a 4 KiB cap (systemd's NOTIFY_BUFFER_MAX), no NUL bytes, unknown keys ignored, a flag
counts only when its value is exactly "1". Unlike systemd, a known key with a bad value rejects the
whole datagram, so bad input changes nothing.

`NotifyServer` owns the receiving socket and nothing else: it neither parses nor decides who may
speak. It hands the daemon's event loop raw `Datagram`s with the sender's credentials as the kernel
checked them; the daemon drops those from outside the host's tree. On Linux a unix datagram
receiver loses nothing: once `net.unix.max_dgram_qlen` datagrams queue, a blocking sender waits
(a non-blocking one gets EAGAIN). So a flooding host slows itself down, and `drain(limit)` keeps
it from starving the rest of the loop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import stat
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from supervisor.errors import BadRequest, ConfigError

log = logging.getLogger(__name__)

MAX_DATAGRAM_BYTES = 4096
"""systemd's NOTIFY_BUFFER_MAX (PIPE_BUF): longer datagrams are rejected, not truncated."""

RECEIVE_BUFFER_BYTES = 4 * 1024 * 1024
SEND_TIMEOUT_S = 5.0
"""A client gives up rather than hang forever on a receiver that stopped draining."""

_MAX_EXTEND_USEC = 2**64 - 1  # systemd parses it as a uint64
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
_MAX_SOCKET_PATH_BYTES = 103 if sys.platform == "darwin" else 107  # sizeof(sun_path) - 1
_SO_RCVBUFFORCE = 33 if sys.platform.startswith("linux") else None  # not exported by Python
_HAS_PASSCRED = hasattr(socket, "SO_PASSCRED") and hasattr(socket, "SCM_CREDENTIALS")


# --- pure part: bytes in, a message out ------------------------------------------------------


class NotifyError(BadRequest):
    """A datagram that is not a valid notify message; the message names what was wrong."""

    code = "bad_notify_datagram"


@dataclass(frozen=True, slots=True, kw_only=True)
class NotifyMessage:
    """What one datagram said; a flag is False and a value None when its key was absent."""

    ready: bool = False
    watchdog: bool = False
    watchdog_trigger: bool = False  # WATCHDOG=trigger: the host declares itself failed
    stopping: bool = False
    reloading: bool = False
    status: str | None = None
    extend_timeout_usec: int | None = None
    confirm_swap_id: str | None = None
    mainpid: int | None = None


def parse_datagram(data: bytes) -> NotifyMessage:
    """Parse one notify datagram, or raise NotifyError naming the first thing wrong with it."""
    if not data:
        raise NotifyError("empty notify datagram")
    if len(data) > MAX_DATAGRAM_BYTES:
        raise NotifyError(f"notify datagram over {MAX_DATAGRAM_BYTES} bytes")
    if b"\0" in data:
        raise NotifyError("notify datagram contains a NUL byte")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotifyError(f"notify datagram is not UTF-8 (byte {exc.start})") from None

    fields: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), start=1):
        if not line:
            continue  # "READY=1\n" is common; systemd skips empty lines too
        key, sep, value = line.partition("=")
        if not sep:
            raise NotifyError(f"line {number} of notify datagram has no '=': {_excerpt(line)}")
        if not key:
            raise NotifyError(f"line {number} of notify datagram has an empty key")
        fields[key] = value  # a repeated key: the last one wins, as in systemd
    if not fields:
        raise NotifyError("notify datagram has no KEY=VALUE line")

    return NotifyMessage(
        ready=fields.get("READY") == "1",
        watchdog=fields.get("WATCHDOG") == "1",
        # as in systemd: "act as if the watchdog expired"
        watchdog_trigger=fields.get("WATCHDOG") == "trigger",
        stopping=fields.get("STOPPING") == "1",
        reloading=fields.get("RELOADING") == "1",
        status=fields.get("STATUS"),
        extend_timeout_usec=_optional_integer(fields, "EXTEND_TIMEOUT_USEC", 0, _MAX_EXTEND_USEC),
        confirm_swap_id=_optional_swap_id(fields),
        mainpid=_optional_integer(fields, "MAINPID", 1, 2**31 - 1),
    )


def _optional_integer(fields: Mapping[str, str], key: str, low: int, high: int) -> int | None:
    """Plain ASCII digits only: int() would also take '+5', ' 5', '5_0' and non-ASCII digits."""
    raw = fields.get(key)
    if raw is None:
        return None
    if not _DIGITS.fullmatch(raw):
        raise NotifyError(f"{key} must be an integer from {low}, got {_excerpt(raw)}")
    value = int(raw)
    if not low <= value <= high:
        raise NotifyError(f"{key} must be between {low} and {high}, got {_excerpt(raw)}")
    return value


def _optional_swap_id(fields: Mapping[str, str]) -> str | None:
    raw = fields.get("X_SWAPGUARD_CONFIRM")
    if raw is None:
        return None
    if not raw or raw != raw.strip():
        raise NotifyError(f"X_SWAPGUARD_CONFIRM needs a swap id, got {_excerpt(raw)}")
    return raw


def _excerpt(text: str, limit: int = 60) -> str:
    """Quote untrusted text for an error message without letting it flood the log."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


# --- server: the socket the host talks to -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Datagram:
    """One received datagram and its sender as the kernel saw it (None where the OS cannot tell)."""

    payload: bytes
    pid: int | None
    uid: int | None
    gid: int | None


class NotifyServer:
    """A bound, non-blocking unix datagram socket that the daemon's event loop drains."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).absolute()
        _check_socket_path_length(str(self.path))
        _remove_stale_socket(self.path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.bind(str(self.path))
        except BaseException:
            self._sock.close()
            raise
        try:
            # Anyone local may send; the daemon keeps only datagrams from the host's tree.
            os.chmod(self.path, 0o666)
            self._inode = os.stat(self.path).st_ino
            if _HAS_PASSCRED:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            _enlarge_receive_buffer(self._sock)
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            self.path.unlink(missing_ok=True)
            raise
        log.debug("notify socket bound at %s", self.path)

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self, limit: int = 1024) -> list[Datagram]:
        """Read up to `limit` pending datagrams without blocking; [] when none are waiting.

        The limit keeps one flooding host from starving the rest of the event loop.
        """
        if limit < 1:
            raise ValueError(f"drain limit must be at least 1, got {limit}")
        received: list[Datagram] = []
        while len(received) < limit:
            try:
                received.append(self._receive_one())
            except BlockingIOError:
                break
        return received

    def close(self) -> None:
        """Close the socket and remove its file, unless another server has since taken the path."""
        if self._sock.fileno() == -1:
            return
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()

    def __enter__(self) -> NotifyServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _receive_one(self) -> Datagram:
        # One byte over the cap, so an oversized datagram reaches the parser still oversized.
        bufsize = MAX_DATAGRAM_BYTES + 1
        if not _HAS_PASSCRED:
            payload = self._sock.recv(bufsize)
            return Datagram(payload, None, None, None)
        # Room for credentials only: the kernel closes any descriptors a sender passes (FDSTORE=1),
        # so none can leak into swapguard.
        payload, ancillary, _flags, _address = self._sock.recvmsg(
            bufsize, socket.CMSG_SPACE(_UCRED.size)
        )
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, uid, gid = _UCRED.unpack_from(data)
                return Datagram(payload, pid, uid, gid)
        return Datagram(payload, None, None, None)


def _check_socket_path_length(path: str) -> None:
    size = len(os.fsencode(path))
    if size > _MAX_SOCKET_PATH_BYTES:
        raise OSError(
            errno.ENAMETOOLONG,
            f"notify socket path is {size} bytes, over the unix socket limit of "
            f"{_MAX_SOCKET_PATH_BYTES}; use a shorter state.dir",
            path,
        )


def _remove_stale_socket(path: Path) -> None:
    """A socket left by a crashed swapguard blocks bind(); anything else at the path is not ours."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, "not a socket, refusing to replace it", str(path))
    path.unlink(missing_ok=True)


def _enlarge_receive_buffer(sock: socket.socket) -> None:
    """Let bursts queue in the kernel; as root, FORCE goes past net.core.rmem_max.

    On Linux this is a byte budget only: the count of queued datagrams is capped by
    net.unix.max_dgram_qlen (10 here), after which senders block or get EAGAIN.
    """
    for option in (_SO_RCVBUFFORCE, socket.SO_RCVBUF):
        if option is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, RECEIVE_BUFFER_BYTES)
            return
        except OSError as exc:
            log.debug("notify socket: receive buffer option %s refused: %s", option, exc)


# --- client: swapguard under systemd, `swapguard notify`, and hosts -------------------------------


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
    if not _DIGITS.fullmatch(raw_usec) or int(raw_usec) == 0:
        raise ConfigError(
            f"WATCHDOG_USEC must be a positive integer of microseconds, got {raw_usec!r}"
        )
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid is not None:
        if not _DIGITS.fullmatch(raw_pid) or int(raw_pid) == 0:
            raise ConfigError(f"WATCHDOG_PID must be a positive process id, got {raw_pid!r}")
        if int(raw_pid) != os.getpid():
            return None
    return int(raw_usec) / 1_000_000 / 2
