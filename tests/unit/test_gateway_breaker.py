"""The circuit breaker's state machine, on a hand-driven clock."""

from __future__ import annotations

from gozon.gateway.breaker import CircuitBreaker, State


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, changes: list[State] | None = None) -> CircuitBreaker:
    return CircuitBreaker(
        failure_threshold=3,
        reset_timeout_s=5.0,
        clock=clock,
        on_change=None if changes is None else changes.append,
    )


def test_stays_closed_below_the_threshold_and_a_success_resets_the_count() -> None:
    b = breaker(Clock())
    for _ in range(2):
        b.failure()
    b.success()
    for _ in range(2):
        b.failure()
    assert b.state is State.CLOSED
    assert b.allow()


def test_opens_after_consecutive_failures_and_refuses_at_once() -> None:
    clock = Clock()
    changes: list[State] = []
    b = breaker(clock, changes)
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert b.state is State.OPEN
    assert changes == [State.OPEN]
    assert not b.allow()
    clock.now += 1.2
    assert not b.allow()
    assert b.retry_after() == 4


def test_after_the_reset_timeout_exactly_one_probe_goes_through() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.failure()
    clock.now += 5.0
    assert b.allow()
    assert b.state is State.HALF_OPEN
    assert not b.allow()
    assert not b.allow()


def test_a_successful_probe_closes_it() -> None:
    clock = Clock()
    changes: list[State] = []
    b = breaker(clock, changes)
    for _ in range(3):
        b.failure()
    clock.now += 5.0
    assert b.allow()
    b.success()
    assert b.state is State.CLOSED
    assert changes == [State.OPEN, State.HALF_OPEN, State.CLOSED]
    assert b.allow()
    assert b.allow()


def test_a_failed_probe_reopens_it_for_another_reset_timeout() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.failure()
    clock.now += 5.0
    assert b.allow()
    b.failure()
    assert b.state is State.OPEN
    clock.now += 4.9
    assert not b.allow()
    clock.now += 0.1
    assert b.allow()


def test_a_probe_that_never_reports_stops_blocking_after_a_reset_timeout() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.failure()
    clock.now += 5.0
    assert b.allow()  # this probe's client goes away: no success, no failure
    clock.now += 4.0
    assert not b.allow()
    clock.now += 1.0
    assert b.allow()


def test_late_failures_from_before_it_opened_do_not_push_the_probe_back() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.failure()
    clock.now += 4.0
    b.failure()
    clock.now += 1.0
    assert b.allow()


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.failure()
    assert b.retry_after() == 5
    clock.now += 4.99
    assert b.retry_after() == 1
