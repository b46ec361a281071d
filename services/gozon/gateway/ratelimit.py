"""A token bucket per user: `rate` requests a second on average, bursts of up to `burst`.

Guarantees: a user who has waited long enough always gets a request through; a refused request
costs nothing and is told how long to wait (`Retry-After`, whole seconds, at least 1). Memory
is bounded: past `max_users` buckets the least recently seen user's bucket is dropped, which
only hands that user a full bucket again, what an idle user would have anyway.

The limit is per gateway process: with N replicas a user gets up to N times the rate. That is
the usual edge rate limit (it protects the upstreams from one noisy client); a global quota
would need shared state (Redis) and is out of scope.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class RateLimiter:
    def __init__(
        self,
        *,
        rate_per_s: float,
        burst: int,
        max_users: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a rate limit needs a positive rate and a burst of at least 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._max_users = max_users
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def acquire(self, user: str) -> float:
        """Takes a token for `user`: 0 if the request may go, else the seconds to wait."""
        now = self._clock()
        tokens, at = self._buckets.pop(user, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_s)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate_per_s
        self._buckets[user] = (tokens, now)
        if len(self._buckets) > self._max_users:
            self._buckets.popitem(last=False)
        return wait


def retry_after(wait_s: float) -> int:
    """`Retry-After` in whole seconds, rounded up and at least 1."""
    return max(1, math.ceil(wait_s))
