"""The one backoff formula: the host's restart delay and a failed swap step's retry delay.

A delay starts at `first`, doubles per failure in a row, gets up to `jitter` seconds added at
random, and never passes `cap`. It is composed from tenacity's wait strategies, so the retries that
sleep inside one call (`tenacity.Retrying(wait=exponential(...))`) and the delays the pure machines
schedule (`Backoff(...)(failures)`) are one formula.

The randomness comes from an `rng` the caller passes: tenacity's own `wait_random` draws from the
global `random`, which a test could not fix and which would make the machines' output depend on
hidden state. Only arithmetic runs here: no clock, no I/O (tenacity's wait strategies read neither).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from tenacity.wait import wait_base, wait_exponential, wait_none

if TYPE_CHECKING:
    from tenacity import RetryCallState


class _JitterFrom(wait_base):
    """Up to `most` seconds, uniform, drawn from the given source."""

    def __init__(self, most: float, rng: random.Random | None) -> None:
        if most > 0 and rng is None:
            raise ValueError("a jitter needs an rng: the core draws no randomness of its own")
        self.most = most
        self.rng = rng

    def __call__(self, retry_state: RetryCallState) -> float:
        if self.most <= 0 or self.rng is None:
            return 0.0
        return self.rng.uniform(0.0, self.most)


class _Capped(wait_base):
    """Another strategy's wait, never past `cap` (the jitter included)."""

    def __init__(self, inner: wait_base, cap: float) -> None:
        self.inner = inner
        self.cap = cap

    def __call__(self, retry_state: RetryCallState) -> float:
        return float(min(self.inner(retry_state), self.cap))


def exponential(
    first: float, cap: float, jitter: float = 0.0, rng: random.Random | None = None
) -> wait_base:
    """The formula as a tenacity wait strategy: attempt n waits first * 2**(n-1) + jitter, capped.

    `jitter` is in seconds, not a fraction of `first`.
    """
    for name, value in (("first", first), ("cap", cap), ("jitter", jitter)):
        if not value >= 0:  # also refuses NaN
            raise ValueError(f"backoff {name} must be >= 0 seconds, got {value!r}")
    if cap < first:
        raise ValueError(f"backoff cap ({cap!r} s) is below its first delay ({first!r} s)")
    # wait_exponential answers 0 * 2**n with its max once 2**n overflows a float: 0 stays 0 here
    doubling = wait_exponential(multiplier=first, max=cap) if first > 0 else wait_none()
    return _Capped(doubling + _JitterFrom(jitter, rng), cap)


@dataclass(frozen=True, slots=True)
class _Attempt:
    """What a wait strategy reads of tenacity's RetryCallState; a real one reads the clock."""

    attempt_number: int


class Backoff:
    """The delay after `failures` failures in a row, for a machine that schedules it itself."""

    __slots__ = ("_wait",)

    def __init__(
        self, *, first: float, cap: float, jitter: float = 0.0, rng: random.Random | None = None
    ) -> None:
        self._wait = exponential(first, cap, jitter, rng)

    def __call__(self, failures: int) -> float:
        """0 or fewer failures wait as one does: the first delay."""
        return self._wait(cast("RetryCallState", _Attempt(max(failures, 1))))
