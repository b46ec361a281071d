"""A circuit breaker per upstream: a dead service costs the gateway's clients nothing.

    CLOSED ──(N consecutive failures)──▶ OPEN ──(reset timeout)──▶ HALF_OPEN
       ▲                                  ▲                          │
       └─────────(probe succeeds)─────────┼──────────────────────────┤
                                          └──────(probe fails)───────┘

Guarantees: while OPEN, `allow()` answers False at once (the caller says 503 with
`retry_after()`), so no request waits on a service known to be down. After the reset timeout
exactly one request is let through as a probe; its outcome closes or reopens the breaker. A
probe whose outcome is never reported (its client went away) stops blocking after another
reset timeout, so the breaker cannot stick half-open. What is a failure is the proxy's call
(gateway/proxy.py): only the upstream's own (no connection, no answer in time to a request
sent whole, a broken answer, a 5xx other than 503 and 504), never anything a client did.

Pure logic with an injectable clock; one instance per upstream, used from one event loop.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable


class State(enum.IntEnum):
    """The values are those of the `gozon_gateway_breaker_state` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_threshold: int,
        reset_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[State], None] | None = None,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._on_change = on_change
        self._state = State.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_started_at: float | None = None

    @property
    def state(self) -> State:
        return self._state

    def allow(self) -> bool:
        """May a request go to the upstream now? Takes the probe slot when half-open."""
        if self._state is State.CLOSED:
            return True
        now = self._clock()
        if self._state is State.OPEN:
            if now - self._opened_at < self.reset_timeout_s:
                return False
            self._set(State.HALF_OPEN)
        if self._probe_started_at is None or now - self._probe_started_at >= self.reset_timeout_s:
            self._probe_started_at = now
            return True
        return False

    def success(self) -> None:
        self._failures = 0
        self._probe_started_at = None
        if self._state is not State.CLOSED:
            self._set(State.CLOSED)

    def failure(self) -> None:
        self._failures += 1
        self._probe_started_at = None
        if self._state is State.OPEN:  # a request from before it opened: keep the schedule
            return
        if self._state is State.HALF_OPEN or self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
            self._set(State.OPEN)

    def retry_after(self) -> int:
        """Whole seconds until the next probe may go (at least 1), for `Retry-After`."""
        if self._state is State.OPEN:
            left = self._opened_at + self.reset_timeout_s - self._clock()
        else:
            left = self.reset_timeout_s
        return max(1, math.ceil(left))

    def _set(self, state: State) -> None:
        if state is not self._state:
            self._state = state
            if self._on_change is not None:
                self._on_change(state)
