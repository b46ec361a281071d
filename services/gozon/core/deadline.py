"""Deadlines and load shedding for the APIs: work is refused early rather than done late.

The contract between the gateway and the APIs (docs/reliability.md):

- `X-Request-Timeout-Ms` (set by the gateway): how long the caller will still wait, capped at
  the API's own `api_timeout_s`.
- `Admission`, ASGI middleware in front of every API route (not health, not metrics): at most
  `max_in_flight` running and `max_queued` waiting; past that, or when a request's budget runs
  out in the queue or is too small to start, **503 with `Retry-After` at once, before the
  database is touched** (`"outcome": "not_processed"`).
- `gozon.core.pg.Database`, the APIs' one way to PostgreSQL, holds every statement and
  transaction to the request's deadline: **nothing committed after the deadline**, and a
  transaction still open at the deadline has its connection closed. The defaults nest:
  gateway 5 s > API budget 4 s > statement 3 s > pool wait 2 s.
- `install_outage_handlers`: a lost, refused or timed-out connection, a cancelled statement,
  a conflict the server rolled back (a deadlock), an exhausted pool, a passed deadline or a
  database that refuses the service (as `gozon.core.pg` classifies them) is a 503 with
  `Retry-After` ("not processed": the transaction rolled back), never a 500; a write whose
  connection was lost while it may have been committing is a 504 with `"outcome": "unknown"`
  (retry with the same `Idempotency-Key`).
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Final

import asyncpg
import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Gauge
from starlette.types import ASGIApp, Receive, Scope, Send

from gozon.core.headers import DEADLINE_HEADER
from gozon.core.pg import (
    MIN_BUDGET_S,
    DeadlineExceeded,
    NotProcessed,
    OutcomeUnknown,
    RequestBudget,
    budget_scope,
    current_budget,
    is_database_refusal,
    is_not_processed,
)
from gozon.core.problems import problem_response

_DEADLINE_HEADER_RAW = DEADLINE_HEADER.lower().encode()
RETRY_AFTER_S: Final = 1
NOT_PROCESSED: Final = "not_processed"
UNKNOWN: Final = "unknown"

SHED = Counter(
    "gozon_api_shed_total",
    "Requests answered 503 before any work, by reason: queue_full, queue_timeout, no_budget.",
    ["service", "reason"],
)
IN_FLIGHT = Gauge("gozon_api_in_flight", "API requests running now.", ["service"])
QUEUED = Gauge("gozon_api_queued", "API requests waiting for a slot.", ["service"])
OUTAGES = Counter(
    "gozon_api_database_unavailable_total",
    "Requests answered 503/504 because the database failed them or their deadline passed, by "
    "outcome: not_processed, unknown (COMMIT cut), deadline.",
    ["outcome"],
)

log = structlog.get_logger(__name__)


def parse_budget(value: bytes | None, cap_s: float) -> float:
    """The budget in seconds from the header's value (whole milliseconds), capped at `cap_s`.

    A missing or malformed value means "no caller deadline": the API's own cap applies.
    """
    if value is None or not value.isdigit() or len(value) > 9:
        return cap_s
    return min(int(value) / 1000, cap_s)


def not_processed(detail: str, *, instance: str | None = None) -> JSONResponse:
    return problem_response(
        503,
        f"{detail} The request was not processed; retry after the time in Retry-After.",
        instance=instance,
        headers={"Retry-After": str(RETRY_AFTER_S)},
        outcome=NOT_PROCESSED,
    )


@dataclass
class Admission:
    """Bounds the API's in-flight work and sets each request's deadline (see module docstring).

    A slot freed by a finishing request goes straight to the oldest waiter, so a waiter never
    loses its place to a newcomer.
    """

    app: ASGIApp
    service: str
    max_in_flight: int
    max_queued: int
    timeout_s: float
    exempt: tuple[str, ...] = ("/health/", "/metrics", "/openapi.json", "/docs")
    _running: int = 0
    _waiters: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)

    def __post_init__(self) -> None:
        # The gauges' series, kept: set twice per request, not looked up each time.
        self._in_flight = IN_FLIGHT.labels(self.service)
        self._queued = QUEUED.labels(self.service)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.exempt):
            await self.app(scope, receive, send)
            return
        raw = next((v for k, v in scope["headers"] if k == _DEADLINE_HEADER_RAW), None)
        budget = RequestBudget(time.monotonic() + parse_budget(raw, self.timeout_s))
        if budget.left() < MIN_BUDGET_S:
            await self._shed(
                "no_budget", "Too little time was left to do it.", scope, receive, send
            )
            return
        if not await self._acquire(budget, scope, receive, send):
            return
        try:
            with budget_scope(budget):
                await self.app(scope, receive, send)
        finally:
            self._release()

    async def _acquire(
        self, budget: RequestBudget, scope: Scope, receive: Receive, send: Send
    ) -> bool:
        if self._running < self.max_in_flight and not self._waiters:
            self._running += 1
            self._in_flight.set(self._running)
            return True
        if len(self._waiters) >= self.max_queued:
            await self._shed("queue_full", "The service is at capacity.", scope, receive, send)
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._queued.set(len(self._waiters))
        try:
            async with asyncio.timeout(max(0.0, budget.left() - MIN_BUDGET_S)):
                await waiter
        except TimeoutError:
            pass
        except BaseException:  # cancelled (the client left): a slot handed over goes on
            if waiter.done() and not waiter.cancelled():
                self._release()
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            self._queued.set(len(self._waiters))
        if waiter.cancelled():
            await self._shed("queue_timeout", "The service is at capacity.", scope, receive, send)
            return False
        return True  # the slot was handed over by `_release`

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; the running count stays
                self._queued.set(len(self._waiters))
                return
        self._running -= 1
        self._in_flight.set(self._running)

    async def _shed(
        self, reason: str, detail: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        SHED.labels(self.service, reason).inc()
        await not_processed(detail, instance=scope["path"])(scope, receive, send)


def _unknown_outcome(request: Request) -> JSONResponse:
    OUTAGES.labels(UNKNOWN).inc()
    return problem_response(
        504,
        "The database connection was lost while the request was being committed: it may or "
        "may not have been processed. Retrying with the same Idempotency-Key is safe.",
        instance=request.url.path,
        title="Outcome unknown",
        outcome=UNKNOWN,
    )


def _unavailable(request: Request, reason: str) -> JSONResponse:
    OUTAGES.labels(NOT_PROCESSED).inc()
    log.warning("database unavailable", path=request.url.path, reason=reason)
    return not_processed("The database is unavailable or too slow.", instance=request.url.path)


async def _on_database_error(request: Request, exc: Exception) -> JSONResponse:
    # A failed COMMIT leaves `committing` set (after_commit never ran): the outcome is unknown.
    budget = current_budget()
    if budget is not None and budget.committing:
        log.warning("database failed during commit", path=request.url.path, error=repr(exc))
        return _unknown_outcome(request)
    if isinstance(exc, DeadlineExceeded) or (budget is not None and budget.cut):
        OUTAGES.labels("deadline").inc()
        return not_processed("The request's deadline passed.", instance=request.url.path)
    if isinstance(exc, OutcomeUnknown):
        log.warning("database lost during a write", path=request.url.path, error=repr(exc))
        return _unknown_outcome(request)
    if isinstance(exc, NotProcessed):
        return _unavailable(request, str(exc))
    if is_not_processed(exc):  # an outage, or a conflict the server rolled back
        return _unavailable(request, repr(exc))
    if is_database_refusal(exc):
        # Not this request's fault: every request fails alike until the deployment is fixed
        # (a grant, a migration, a read-only standby). Nothing was committed.
        log.error(
            "the database refuses the service (its role, grants or schema, or a read-only server)",
            path=request.url.path,
            error=repr(exc),
        )
        OUTAGES.labels(NOT_PROCESSED).inc()
        return not_processed("The database is unavailable.", instance=request.url.path)
    # Anything else is a bug, not an outage: the generic 500 (logged with its traceback).
    log.error("unhandled error", path=request.url.path, exc_info=exc)
    return problem_response(
        500, "The server failed to answer; the error was logged.", instance=request.url.path
    )


def install_outage_handlers(app: FastAPI) -> None:
    """503 (or 504 when a COMMIT was cut) for database failures, instead of a 500."""
    for exc_class in (
        asyncpg.PostgresError,
        asyncpg.InterfaceError,  # a connection closed under a statement (cut at the deadline)
        asyncpg.InternalClientError,
        OSError,
        DeadlineExceeded,
        NotProcessed,
        OutcomeUnknown,
    ):
        app.add_exception_handler(exc_class, _on_database_error)
