"""The runtime's single timer: one loop callback armed for the earliest wake-up of both machines.

Rules it keeps:
- Loop thread only.
- Times are boot-clock seconds (`clock.boot_clock`).
- An unchanged wake-up leaves the armed timer alone: heartbeats, which only ever push the host's
  wake-up later, cost no re-arming.
- Once it fires it is disarmed before the callback runs, so the callback's re-arm always takes,
  even for the same moment (a timer that fired a hair early ticks again).
- A callback that raises leaves the timer armed all the same (soon), never disarmed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from supervisor import clock

log = logging.getLogger(__name__)

RETRY_FAILED_TICK_S = 0.2
"""How soon a tick that raised is tried again: soon enough for any deadline's 1 s of grace."""


class WakeTimer:
    """One `loop.call_later` handle, re-armed only when the wake-up moves."""

    def __init__(self, on_wake: Callable[[], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self._on_wake = on_wake
        self._handle: asyncio.TimerHandle | None = None
        self._at: float | None = None

    @property
    def at(self) -> float | None:
        """The boot-clock moment it is armed for; None while disarmed."""
        return self._at

    def arm(self, wake: float | None) -> None:
        """Wake at `wake` (boot clock) instead of whatever was armed; None disarms."""
        if wake == self._at:
            return
        if self._handle is not None:
            self._handle.cancel()
        self._at = wake
        if wake is None:
            self._handle = None
            return
        delay = max(0.0, wake - clock.boot_clock())
        self._handle = self.loop.call_later(delay, self._wake)

    def wake_now(self) -> None:
        """Disarm and run the callback now (which arms again as the machines say)."""
        if self._handle is not None:
            self._handle.cancel()
        self._wake()

    def due(self) -> bool:
        """Has the armed moment passed? (Then `wake_now`, rather than after the input in hand.)"""
        return self._at is not None and clock.boot_clock() >= self._at

    def _wake(self) -> None:
        self._handle, self._at = None, None
        try:
            self._on_wake()
        except Exception:
            # A tick that raised (a full state disk, say) may have left the machines' actions
            # half done and the timer unarmed: tick again soon, so no deadline is dropped.
            log.exception("a tick failed; ticking again in %.1fs", RETRY_FAILED_TICK_S)
            if self._at is None or self._at > clock.boot_clock() + RETRY_FAILED_TICK_S:
                self.arm(clock.boot_clock() + RETRY_FAILED_TICK_S)
