"""The one backoff formula (restart delays, step retries, in-call retries): a table of cases."""

from __future__ import annotations

import math
import random

import pytest
import tenacity

from supervisor.core.backoff import Backoff, exponential


@pytest.mark.parametrize(
    ("first", "cap", "failures", "delay"),
    [
        (1.0, 10.0, 1, 1.0),
        (1.0, 10.0, 2, 2.0),
        (1.0, 10.0, 4, 8.0),
        (1.0, 10.0, 5, 10.0),  # 16 capped
        (1.0, 10.0, 10_000, 10.0),  # far out: no overflow
        (1.0, 10.0, 0, 1.0),  # no failure yet waits as one does
        (0.25, 0.25, 3, 0.25),  # a cap equal to the first delay: a fixed delay
        (0.0, 10.0, 1, 0.0),  # no delay stays no delay ...
        (0.0, 10.0, 100_000, 0.0),  # ... however far out
    ],
)
def test_the_delay_doubles_per_failure_up_to_the_cap(
    first: float, cap: float, failures: int, delay: float
) -> None:
    assert Backoff(first=first, cap=cap)(failures) == delay


def test_the_jitter_is_in_seconds_drawn_from_the_given_rng_and_capped() -> None:
    def seeded(seed: int) -> Backoff:
        return Backoff(first=2.0, cap=100.0, jitter=0.5, rng=random.Random(seed))

    draws = [seeded(seed)(3) for seed in range(300)]
    assert all(8.0 <= d <= 8.5 for d in draws) and max(draws) - min(draws) > 0.25
    assert [seeded(9)(n) for n in (1, 2)] == [seeded(9)(n) for n in (1, 2)]
    at_cap = Backoff(first=2.0, cap=8.0, jitter=5.0, rng=random.Random(1))
    assert {at_cap(n) for n in range(3, 50)} == {8.0}  # the jitter never passes the cap


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"first": -1.0, "cap": 1.0}, "first must be >= 0"),
        ({"first": 1.0, "cap": math.nan}, "cap must be >= 0"),
        ({"first": 2.0, "cap": 1.0}, "below its first delay"),
        ({"first": 1.0, "cap": 2.0, "jitter": -0.1}, "jitter must be >= 0"),
        ({"first": 1.0, "cap": 2.0, "jitter": 0.1}, "needs an rng"),
    ],
)
def test_bad_settings_are_refused_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Backoff(**kwargs)


def test_the_same_formula_drives_a_tenacity_retry_inside_one_call() -> None:
    slept: list[float] = []
    calls = iter([OSError("busy"), OSError("busy"), OSError("busy"), "done"])

    def flaky() -> str:
        outcome = next(calls)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    retrying = tenacity.Retrying(
        wait=exponential(0.5, 1.5), sleep=slept.append, stop=tenacity.stop_after_attempt(5)
    )
    assert retrying(flaky) == "done"
    assert slept == [Backoff(first=0.5, cap=1.5)(n) for n in (1, 2, 3)] == [0.5, 1.0, 1.5]
