"""Admission control and the deadline header (gozon.core.deadline), on a stand-in ASGI app, and
what a database error means (gozon.core.pg's classifiers)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import httpx
from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from gozon.core.deadline import Admission, install_outage_handlers, parse_budget
from gozon.core.pg import (
    current_budget,
    is_database_outage,
    is_database_refusal,
    is_not_processed,
    sqlstate,
)
from gozon.messaging.consumer import is_retryable
from tests.conftest import until


async def now(value: bool) -> bool:
    return value


def test_the_budget_header_is_capped_and_a_bad_value_means_no_caller_deadline() -> None:
    assert parse_budget(b"1500", 4.0) == 1.5
    assert parse_budget(b"999999", 4.0) == 4.0
    assert parse_budget(None, 4.0) == 4.0
    assert parse_budget(b"-5", 4.0) == 4.0
    assert parse_budget(b"soon", 4.0) == 4.0


class Held:
    """An app whose requests run until released, recording their budgets."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.budgets: list[float] = []
        self.release = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.started.append(scope["path"])
        budget = current_budget()  # None for the exempt paths
        if budget is not None:
            self.budgets.append(budget.left())
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def call(app: Admission, path: str, headers: list[tuple[bytes, bytes]] | None = None) -> Any:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "path": path, "headers": headers or [], "method": "GET"}
    await app(scope, receive, send)
    status = sent[0]["status"]
    headers_out = dict(sent[0]["headers"])
    body = json.loads(sent[1]["body"]) if sent[1]["body"] else None
    return status, headers_out, body


async def test_past_limit_and_queue_it_answers_503_at_once_and_queued_ones_run_in_order() -> None:
    held = Held()
    app = Admission(held, service="t", max_in_flight=1, max_queued=1, timeout_s=30)
    first = asyncio.create_task(call(app, "/a"))
    second = asyncio.create_task(call(app, "/b"))
    await until(lambda: now(held.started == ["/a"] and bool(app._waiters)), 10, "one queued")
    status, headers, body = await call(app, "/c")
    assert status == 503
    assert headers[b"retry-after"] == b"1"
    assert body["outcome"] == "not_processed"
    assert held.started == ["/a"]
    health = asyncio.create_task(call(app, "/health/live"))  # never queued
    await until(lambda: now("/health/live" in held.started), 10, "health to run")
    held.release.set()
    assert [(await t)[0] for t in (first, second, health)] == [200, 200, 200]
    assert held.started == ["/a", "/health/live", "/b"]
    assert app._running == 0


async def test_a_queued_request_whose_budget_runs_out_is_shed() -> None:
    held = Held()
    app = Admission(held, service="t", max_in_flight=1, max_queued=5, timeout_s=30)
    first = asyncio.create_task(call(app, "/a"))
    await until(lambda: now(bool(held.started)), 10, "the first to run")
    status, _, body = await call(app, "/b", [(b"x-request-timeout-ms", b"100")])
    assert status == 503
    assert body["outcome"] == "not_processed"
    held.release.set()
    assert (await first)[0] == 200
    assert held.started == ["/a"]
    assert 29 < held.budgets[0] <= 30


async def test_too_small_a_budget_is_refused_before_the_app_runs() -> None:
    held = Held()
    app = Admission(held, service="t", max_in_flight=1, max_queued=1, timeout_s=30)
    status, _, _ = await call(app, "/a", [(b"x-request-timeout-ms", b"20")])
    assert status == 503
    assert held.started == []


def error(code: str) -> asyncpg.PostgresError:
    """The driver's error for the server's SQLSTATE `code`, as the services meet it."""
    raised = asyncpg.PostgresError.new({"C": code, "M": f"error {code}"})
    assert raised.sqlstate == code
    return raised


def test_a_server_shutting_down_or_refusing_is_an_outage_and_a_bug_is_not() -> None:
    # admin shutdown, "the database system is shutting down", connection failure, too many
    # connections, statement timeout
    for code in ("57P01", "57P03", "08006", "53300", "57014"):
        assert is_database_outage(error(code)), code
    for code in ("23505", "42P01", "22003"):  # a constraint, a missing table, a bad number
        assert not is_database_outage(error(code)), code


def test_a_database_refusing_the_service_is_waited_out_and_a_messages_fault_is_not() -> None:
    # a privilege revoked, a table missing (a migration not run), a wrong password, a missing
    # database, a read-only standby, the server's I/O error: every message would fail alike
    for code in ("42501", "42P01", "42703", "28P01", "3D000", "25006", "58030"):
        assert is_database_refusal(error(code)), code
        assert is_retryable(error(code)), code
        assert not is_database_outage(error(code)), code  # the server answers
    assert is_database_refusal(asyncpg.InsufficientPrivilegeError("permission denied"))
    assert is_retryable(asyncpg.ReadOnlySQLTransactionError("read-only transaction"))
    # a constraint, a bad number, a refused check: this message's own fault, dead-lettered
    for code in ("23505", "22003", "23514", "25P02"):
        assert not is_database_refusal(error(code)), code
        assert not is_retryable(error(code)), code
    assert not is_database_refusal(ValueError("no database error"))


def test_the_drivers_own_connection_errors_are_outages_and_its_data_errors_are_not() -> None:
    # the relays' batches run on asyncpg itself: a closed connection, one still digesting the
    # server's FATAL goodbye (InternalClientError), the server's admin shutdown
    assert is_database_outage(asyncpg.ConnectionDoesNotExistError("closed"))
    assert is_database_outage(asyncpg.InternalClientError("cannot switch to state 15"))
    assert is_database_outage(asyncpg.AdminShutdownError("terminating connection"))
    assert not is_database_outage(asyncpg.UniqueViolationError("duplicate key"))
    assert not is_database_outage(asyncpg.DataError("invalid input"))


def test_a_conflict_is_retried_and_not_processed_and_a_bad_message_is_neither() -> None:
    # the consumers' batches run on asyncpg itself: its deadlock or serialization failure
    # keeps its SQLSTATE, so the runner retries the batch instead of dead-lettering it, and an
    # API answers 503 "not processed" (the server rolled the transaction back)
    assert sqlstate(asyncpg.DeadlockDetectedError("deadlock detected")) == "40P01"
    assert is_retryable(asyncpg.DeadlockDetectedError("deadlock detected"))
    assert is_retryable(asyncpg.SerializationError("could not serialize access"))
    for code in ("40P01", "40001"):
        assert is_retryable(error(code)), code
        assert is_not_processed(error(code)), code
    for code in ("57P01", "08006", "53300"):
        assert is_not_processed(error(code)), code
    assert not is_retryable(asyncpg.UniqueViolationError("duplicate key"))
    assert not is_retryable(asyncpg.CheckViolationError("refused"))
    for code in ("23505", "23514", "42501", "22003"):
        assert not is_not_processed(error(code)), code
    assert sqlstate(ValueError("no database error")) is None


async def test_a_connection_cut_at_the_deadline_is_503_unless_its_commit_was_sent() -> None:
    """A transaction's connection closed at the deadline (`gozon.core.pg.Database.transaction`):
    nothing can have committed unless the COMMIT had been sent, which makes the outcome
    unknown."""
    api = FastAPI()
    install_outage_handlers(api)

    @api.get("/cut")
    async def cut(committing: bool) -> None:
        budget = current_budget()
        assert budget is not None
        budget.cut, budget.committing = True, committing
        raise asyncpg.ConnectionDoesNotExistError("closed in the middle of the operation")

    app = Admission(api, service="t", max_in_flight=1, max_queued=0, timeout_s=30)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        before = await client.get("/cut?committing=false")
        during = await client.get("/cut?committing=true")
    assert before.status_code == 503
    assert before.json()["outcome"] == "not_processed"
    assert "deadline" in before.json()["detail"]
    assert during.status_code == 504
    assert during.json()["outcome"] == "unknown"


async def test_a_conflict_the_server_rolled_back_is_503_not_processed_and_a_bug_is_500() -> None:
    """A deadlock inside a transaction (`Database.transaction`: the payments API's deposit, a
    write short of time) passes through as the driver raised it: rolled back, not a bug."""
    api = FastAPI()
    install_outage_handlers(api)

    @api.get("/raise/{code}")
    async def raises(code: str) -> None:
        raise error(code)

    transport = httpx.ASGITransport(app=api, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        deadlock = await client.get("/raise/40P01")
        bug = await client.get("/raise/22003")  # a number out of range: our statement's fault
    assert deadlock.status_code == 503
    assert deadlock.json()["outcome"] == "not_processed"
    assert deadlock.headers["Retry-After"] == "1"
    assert bug.status_code == 500


async def test_a_statement_on_a_connection_closed_under_it_is_503_not_a_500() -> None:
    """The driver refuses a statement on a connection already closed (cut at the deadline, or
    terminated): nothing was sent, so nothing was written."""
    api = FastAPI()
    install_outage_handlers(api)

    @api.get("/closed")
    async def closed() -> None:
        raise asyncpg.InterfaceError("cannot call Connection.fetch(): connection is closed")

    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/closed")
    assert response.status_code == 503
    assert response.json()["outcome"] == "not_processed"
    assert response.headers["Retry-After"] == "1"
