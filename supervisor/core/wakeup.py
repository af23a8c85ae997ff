"""When the runtime's single timer should next fire: the earlier wake-up of the two machines.

Why it exists: the pure machines never sleep. Each says when a `Tick` could next change something
(`lifecycle.next_wakeup` for the host, `swaps.next_wakeup` for the deadman clock); the runtime
arms one timer for the earlier of the two after every change and feeds both machines a Tick when
it fires. Keeping that here leaves the runtime a loop that only waits and dispatches.

Times are boot-clock seconds: they count suspend and ignore the wall clock. A swap instant of this
boot already is one; one from an earlier boot converts through the wall clock at `now`.
"""

from __future__ import annotations

from supervisor.core import lifecycle, swaps
from supervisor.core.instant import Instant


def next_wakeup(
    host: lifecycle.Host,
    host_policy: lifecycle.Policy,
    swap: swaps.Swap | None,
    swap_policy: swaps.Policy,
    now: Instant,
) -> float | None:
    """The earliest boot-clock moment at which either machine wants a Tick; None: no such moment."""
    wake = lifecycle.next_wakeup(host, host_policy)
    if swap is not None:
        swap_wake = swaps.next_wakeup(swap, swap_policy)
        if swap_wake is not None:
            # This boot's instants are boot-clock times already: stable, so an unchanged
            # wake-up leaves the armed timer alone. Across a reboot the wall clock converts.
            if swap_wake.boot_id == now.boot_id:
                at = swap_wake.boot
            else:
                at = now.boot + swap_wake.seconds_until(now)
            wake = at if wake is None else min(wake, at)
    return wake
