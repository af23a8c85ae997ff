"""Time that survives a supervisor restart but not a wall-clock jump.

Deadlines are kept on the boot-time clock (CLOCK_BOOTTIME on Linux: counts suspend, never jumps)
together with the boot id. Within one boot the boot-time clock decides; across a reboot only the
wall clock can, so a stored deadline carries both.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

_BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


def boot_clock() -> float:
    """Seconds since boot: monotonic, counts suspend, unaffected by settimeofday."""
    if _BOOTTIME is not None:
        return time.clock_gettime(_BOOTTIME)
    return time.monotonic()


def _read_boot_id() -> str:
    try:
        return _BOOT_ID_PATH.read_text().strip()
    except OSError:
        # macOS: kern.boottime would do, but the wall time of boot is a fine stand-in.
        import psutil

        return f"boot-{int(psutil.boot_time())}"


BOOT_ID = _read_boot_id()


@dataclass(frozen=True, slots=True)
class Instant:
    """A moment as both clocks saw it; `boot` is meaningful only when `boot_id` is this boot."""

    wall: float
    boot: float
    boot_id: str

    def seconds_until(self, now: Instant) -> float:
        if self.boot_id == now.boot_id:
            return self.boot - now.boot
        return self.wall - now.wall

    def plus(self, seconds: float) -> Instant:
        return Instant(self.wall + seconds, self.boot + seconds, self.boot_id)

    def to_json(self) -> dict[str, float | str]:
        return {"wall": self.wall, "boot": self.boot, "boot_id": self.boot_id}

    @classmethod
    def from_json(cls, data: dict) -> Instant:
        return cls(float(data["wall"]), float(data["boot"]), str(data["boot_id"]))


def now() -> Instant:
    return Instant(time.time(), boot_clock(), BOOT_ID)


def rfc3339(wall: float | None) -> str | None:
    """UTC with millisecond precision and a Z, as every timestamp in the API is written."""
    if wall is None:
        return None
    stamp = datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def new_id() -> str:
    """Short, sortable-enough, unique ids for swaps: the second, then 24 random bits."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + os.urandom(3).hex()
