"""Time that survives a supervisor restart but not a wall-clock jump.

Deadlines are kept on the boot-time clock (CLOCK_BOOTTIME on Linux: counts suspend, never jumps)
together with the boot id. Within one boot the boot-time clock decides; across a reboot only the
wall clock can, so a stored deadline carries both.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from supervisor.core.instant import Instant, rfc3339

__all__ = ["BOOT_ID", "Instant", "boot_clock", "new_id", "now", "rfc3339"]

_BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


def boot_clock() -> float:
    """Seconds since boot: monotonic, counts suspend, unaffected by settimeofday."""
    if _BOOTTIME is not None:
        return time.clock_gettime(_BOOTTIME)
    return time.monotonic()


def _read_boot_id() -> tuple[str, bool]:
    try:
        return _BOOT_ID_PATH.read_text().strip(), True
    except OSError:
        # macOS: kern.boottime would do, but the wall time of boot is a fine stand-in.
        import psutil

        return f"boot-{int(psutil.boot_time())}", False


BOOT_ID, BOOT_ID_FROM_KERNEL = _read_boot_id()
"""BOOT_ID_FROM_KERNEL: is BOOT_ID the kernel's own (Linux)? Then it and a process's start since
boot name the process across wall-clock steps; the stand-in (macOS) moves with the wall clock."""


def now() -> Instant:
    return Instant(time.time(), boot_clock(), BOOT_ID)


def new_id() -> str:
    """Short, sortable-enough, unique ids for swaps: the second, then 24 random bits."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + os.urandom(3).hex()
