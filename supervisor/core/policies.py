"""The pure machines' policies, read from the config."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from supervisor.core import lifecycle, swaps

if TYPE_CHECKING:
    from supervisor.config.schema import Config

JITTER = 0.25
"""Up to this fraction of `restart_delay` is added at random to each backoff, so hosts restarted
together (a shared dependency went down) do not come back in lockstep."""


def host_policy(config: Config, rng: random.Random | None = None) -> lifecycle.Policy:
    """The lifecycle machine's policy; `rng` is for tests (the jitter's source)."""
    cfg = config.host
    uniform = (rng or random.Random()).uniform

    def backoff(failures: int) -> float:
        """restart_delay, doubled for each failure in a row after the first, plus jitter;
        never past restart_delay_max."""
        if cfg.restart_delay <= 0:
            return 0.0
        doublings = min(max(failures - 1, 0), 64)  # past 2**64 any delay is over any cap
        delay = cfg.restart_delay * 2.0**doublings + uniform(0, cfg.restart_delay * JITTER)
        return min(delay, cfg.restart_delay_max)

    return lifecycle.Policy(
        ready_mode=cfg.ready,
        start_timeout=cfg.start_timeout,
        min_uptime=cfg.min_uptime,
        heartbeat_timeout=cfg.heartbeat_timeout,
        stop_timeout=cfg.stop_timeout,
        restart=cfg.restart,
        restart_reset_after=cfg.restart_reset_after,
        backoff=backoff,
    )


def swap_policy(config: Config) -> swaps.Policy:
    dm = config.deadman
    return swaps.Policy(
        window=dm.window,
        extend_by=dm.extend_by,
        hard_cap=dm.hard_cap,
        max_crashes=dm.max_crashes,
        health_failures=dm.health_failures,
        health_interval=dm.health_interval,
        has_health_check=bool(dm.health_check),
        auto_confirm_after=dm.auto_confirm_after,
        has_build=bool(config.code.build),
        has_data=bool(config.data),
    )
