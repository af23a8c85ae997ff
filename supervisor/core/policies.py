"""The pure machines' policies, read from the config."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from supervisor.core import lifecycle, supervisionrecord, swaps
from supervisor.core.backoff import Backoff

if TYPE_CHECKING:
    from supervisor.config.schema import Config

JITTER_FRACTION = 0.25
"""A fraction of `restart_delay`: up to this times restart_delay seconds are added at random to
each backoff, so hosts restarted together (a shared dependency went down) do not come back in
lockstep."""


def host_policy(config: Config, rng: random.Random | None = None) -> lifecycle.Policy:
    """The lifecycle machine's policy; `rng` is the jitter's source (tests fix it)."""
    cfg = config.host
    backoff = Backoff(
        first=cfg.restart_delay,
        cap=cfg.restart_delay_max,
        jitter=cfg.restart_delay * JITTER_FRACTION,
        rng=rng or random.Random(),
    )
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


def supervision_policy(
    config: Config, rng: random.Random | None = None
) -> supervisionrecord.Policy:
    """The combined machine's policy: the host's, the swap's, and the liveness switch."""
    return supervisionrecord.Policy(
        host=host_policy(config, rng),
        swap=swap_policy(config),
        health_always=config.deadman.health_always,
    )
