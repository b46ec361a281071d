"""The per-user token bucket, on a hand-driven clock."""

from __future__ import annotations

import pytest

from gozon.gateway.ratelimit import RateLimiter, retry_after


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_goes_through_then_the_next_request_waits_for_a_token() -> None:
    clock = Clock()
    limiter = RateLimiter(rate_per_s=2, burst=3, clock=clock)
    assert [limiter.acquire("u") for _ in range(3)] == [0, 0, 0]
    assert limiter.acquire("u") == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.acquire("u") == 0


def test_a_refused_request_costs_no_token() -> None:
    clock = Clock()
    limiter = RateLimiter(rate_per_s=1, burst=1, clock=clock)
    assert limiter.acquire("u") == 0
    for _ in range(5):
        assert limiter.acquire("u") > 0
    clock.now += 1.0
    assert limiter.acquire("u") == 0


def test_tokens_refill_up_to_the_burst_only() -> None:
    clock = Clock()
    limiter = RateLimiter(rate_per_s=10, burst=2, clock=clock)
    limiter.acquire("u")
    clock.now += 3600
    assert [limiter.acquire("u") for _ in range(2)] == [0, 0]
    assert limiter.acquire("u") > 0


def test_users_have_their_own_buckets() -> None:
    limiter = RateLimiter(rate_per_s=1, burst=1, clock=Clock())
    assert limiter.acquire("a") == 0
    assert limiter.acquire("a") > 0
    assert limiter.acquire("b") == 0


def test_memory_is_bounded_by_dropping_the_least_recently_seen_user() -> None:
    limiter = RateLimiter(rate_per_s=1, burst=1, max_users=2, clock=Clock())
    for user in ("a", "b", "c"):
        assert limiter.acquire(user) == 0
    assert limiter.acquire("a") == 0  # forgotten: a full bucket again
    assert limiter.acquire("c") > 0


def test_retry_after_rounds_up_to_whole_seconds() -> None:
    assert retry_after(0.01) == 1
    assert retry_after(1.0) == 1
    assert retry_after(1.2) == 2


def test_a_limit_needs_a_positive_rate() -> None:
    with pytest.raises(ValueError, match="positive rate"):
        RateLimiter(rate_per_s=0, burst=1)
