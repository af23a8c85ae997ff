"""The pure machines' policies, read from the config."""

from __future__ import annotations

import tenacity

from supervisor import lifecycle, swaps
from supervisor.config import Config


def host_policy(config: Config) -> lifecycle.Policy:
    """The lifecycle machine's policy; its backoff is tenacity's exponential wait plus jitter."""
    cfg = config.host
    base = tenacity.wait_exponential(
        multiplier=cfg.restart_delay, exp_base=2, max=cfg.restart_delay_max
    )
    jitter = tenacity.wait_random(0, cfg.restart_delay * 0.25)

    def backoff(failures: int) -> float:
        if cfg.restart_delay <= 0:
            return 0.0
        state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
        state.attempt_number = failures
        return min(base(state) + jitter(state), cfg.restart_delay_max)

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
