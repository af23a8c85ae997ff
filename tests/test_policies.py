"""The restart backoff the lifecycle machine is given: doubling, jittered, capped."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from supervisor.config.schema import load_config
from supervisor.core.policies import JITTER, host_policy


def policy_for(tmp_path: Path, delay: str, most: str, seed: int = 7):
    config = tmp_path / "swapguard.toml"
    config.write_text(
        f'[host]\ncommand = ["true"]\nrestart_delay = "{delay}"\nrestart_delay_max = "{most}"\n'
    )
    return host_policy(load_config(config), random.Random(seed))


def test_backoff_doubles_per_failure_with_jitter_up_to_the_cap(tmp_path: Path) -> None:
    backoff = policy_for(tmp_path, "1s", "10s").backoff
    for failures, base in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0)):
        delays = [backoff(failures) for _ in range(200)]
        assert all(base <= d <= base + JITTER for d in delays), (failures, min(delays), max(delays))
        assert max(delays) - min(delays) > JITTER / 2  # the jitter is really there
    assert backoff(5) == backoff(10_000) == 10.0  # capped, and no overflow far out


def test_a_zero_restart_delay_restarts_at_once(tmp_path: Path) -> None:
    assert policy_for(tmp_path, "0s", "10s").backoff(7) == 0.0


@pytest.mark.parametrize("seed", [1, 2])
def test_the_jitter_comes_from_the_given_source(tmp_path: Path, seed: int) -> None:
    first = [policy_for(tmp_path, "2s", "1m", seed).backoff(n) for n in range(1, 5)]
    again = [policy_for(tmp_path, "2s", "1m", seed).backoff(n) for n in range(1, 5)]
    assert first == again
