"""Liveness and readiness: `/health/live` says the process runs, `/health/ready` that it can work.

A process registers named async checks (its database, Kafka); readiness runs them all with a
deadline and answers 503 naming the ones that failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

Check = Callable[[], Awaitable[bool]]


class Readiness:
    def __init__(self, timeout: float = 2.0) -> None:
        self._checks: dict[str, Check] = {}
        self._timeout = timeout

    def add(self, name: str, check: Check) -> None:
        self._checks[name] = check

    async def _run(self, check: Check) -> bool:
        try:
            return await asyncio.wait_for(check(), self._timeout)
        except Exception:  # a check that raises or times out is a failed check
            return False

    async def report(self) -> dict[str, bool]:
        names = list(self._checks)
        results = await asyncio.gather(*(self._run(self._checks[name]) for name in names))
        return dict(zip(names, results, strict=True))
