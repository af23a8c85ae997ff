"""systemd's notify protocol, parsed: bytes in, one `NotifyMessage` out.

Each datagram is newline-separated `KEY=VALUE` text. The parse follows systemd where systemd is
specific: a 4 KiB cap (systemd's NOTIFY_BUFFER_MAX), no NUL bytes, unknown keys ignored, a flag
counts only when its value is exactly "1". Unlike systemd, a known key with a bad value rejects the
whole datagram, so bad input changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from supervisor.core.ids import SWAP_ID_SYNTAX, is_swap_id
from supervisor.errors import BadRequest

MAX_DATAGRAM_BYTES = 4096
"""systemd's NOTIFY_BUFFER_MAX (PIPE_BUF): longer datagrams are rejected, not truncated."""

_MAX_EXTEND_USEC = 2**64 - 1  # systemd parses it as a uint64
DIGITS = re.compile(r"[0-9]+", re.ASCII)


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

    @property
    def asks_nothing(self) -> bool:
        """Nothing here that swapguard acts on (a lone BARRIER=1 of systemd-notify, STOPPING=1,
        unknown keys): whoever sent it, it needs no trust and is not a dropped datagram."""
        return not (
            self.ready
            or self.watchdog
            or self.watchdog_trigger
            or self.status is not None
            or self.extend_timeout_usec is not None
            or self.confirm_swap_id is not None
        )

    @property
    def heartbeat_only(self) -> bool:
        """WATCHDOG=1 and/or STATUS, nothing else swapguard acts on: several of these in a row
        say what the last one says (its status, or the one before where it has none)."""
        return (self.watchdog or self.status is not None) and not (
            self.ready
            or self.watchdog_trigger
            or self.extend_timeout_usec is not None
            or self.confirm_swap_id is not None
        )


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
    if not DIGITS.fullmatch(raw):
        raise NotifyError(f"{key} must be an integer from {low}, got {_excerpt(raw)}")
    value = int(raw)
    if not low <= value <= high:
        raise NotifyError(f"{key} must be between {low} and {high}, got {_excerpt(raw)}")
    return value


def _optional_swap_id(fields: Mapping[str, str]) -> str | None:
    raw = fields.get("X_SWAPGUARD_CONFIRM")
    if raw is None:
        return None
    if not is_swap_id(raw):
        raise NotifyError(
            f"X_SWAPGUARD_CONFIRM needs a swap id ({SWAP_ID_SYNTAX}), got {_excerpt(raw)}"
        )
    return raw


def _excerpt(text: str, limit: int = 60) -> str:
    """Quote untrusted text for an error message without letting it flood the log."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
