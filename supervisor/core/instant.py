"""A moment as both clocks saw it: what deadlines are made of.

Deadlines are kept on the boot-time clock (CLOCK_BOOTTIME on Linux: counts suspend, never jumps)
together with the boot id. Within one boot the boot-time clock decides; across a reboot only the
wall clock can, so a stored deadline carries both. Reading the clocks is `supervisor.clock`'s job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


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
    def from_json(cls, data: Mapping[str, Any]) -> Instant:
        return cls(float(data["wall"]), float(data["boot"]), str(data["boot_id"]))


def rfc3339(wall: float | None) -> str | None:
    """UTC with millisecond precision and a Z, as every timestamp in the API is written."""
    if wall is None:
        return None
    stamp = datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def wall_of(stamp: str) -> float:
    """The wall-clock seconds an API timestamp stands for: `rfc3339` read back (to the ms)."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
