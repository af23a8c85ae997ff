"""The restart backoff the lifecycle machine is given: doubling, jittered, capped."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from supervisor.config.schema import load_config
from supervisor.core.policies import JITTER_FRACTION, host_policy


def policy_for(tmp_path: Path, delay: str, most: str, seed: int = 7):
    config = tmp_path / "swapguard.toml"
    config.write_text(
        f'[host]\ncommand = ["true"]\nrestart_delay = "{delay}"\nrestart_delay_max = "{most}"\n'
    )
    return host_policy(load_config(config), random.Random(seed))


def test_backoff_doubles_per_failure_with_jitter_up_to_the_cap(tmp_path: Path) -> None:
    # 2 s, not 1 s: a jitter read as seconds instead of a fraction of the delay would show
    backoff = policy_for(tmp_path, "2s", "20s").backoff
    jitter_s = 2.0 * JITTER_FRACTION
    for failures, base in ((1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0)):
        delays = [backoff(failures) for _ in range(200)]
        spread = (failures, min(delays), max(delays))
        assert all(base <= d <= base + jitter_s for d in delays), spread
        assert max(delays) - min(delays) > jitter_s / 2  # the jitter is really there
    assert backoff(5) == backoff(10_000) == 20.0  # capped, jitter included, and no overflow far out


def test_a_zero_restart_delay_restarts_at_once(tmp_path: Path) -> None:
    backoff = policy_for(tmp_path, "0s", "10s").backoff
    assert backoff(1) == backoff(7) == backoff(100_000) == 0.0


@pytest.mark.parametrize("seed", [1, 2])
def test_the_jitter_comes_from_the_given_source(tmp_path: Path, seed: int) -> None:
    first = [policy_for(tmp_path, "2s", "1m", seed).backoff(n) for n in range(1, 5)]
    again = [policy_for(tmp_path, "2s", "1m", seed).backoff(n) for n in range(1, 5)]
    assert first == again
