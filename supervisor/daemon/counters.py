"""The counters /metrics shows; only the loop thread writes them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Counters:
    """Monotonic counters for /metrics; only the loop thread writes them."""

    datagrams: int = 0
    datagrams_dropped: int = 0
    datagrams_invalid: int = 0
    heartbeats: int = 0
    spawns: int = 0
    swaps_finished: dict[str, int] = field(default_factory=dict)
    exits: dict[str, int] = field(default_factory=dict)  # by lifecycle.ExitReason
