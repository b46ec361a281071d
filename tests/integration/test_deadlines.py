"""Deadlines, load shedding and database outages in the APIs (gozon.core.deadline), against the
real PostgreSQL.

A request is held in flight by a lock another connection takes on the `orders` table (the
INSERT waits on it): no sleeps stand for "busy". Every refusal is checked to have written
nothing once the lock is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from gozon.core.db import create_engine
from gozon.core.pg import Database, DeadlineExceeded, request_budget
from gozon.orders.api import build_app
from gozon.orders.models import Order
from gozon.orders.settings import OrdersSettings
from tests.conftest import serve, until
from tests.integration.conftest import (
    frozen_when_it_waits_for_a_lock,
    read_only_switch,
    role_of_its_own,
)

pytestmark = pytest.mark.integration


# Long enough that a busy machine's test never meets them by accident.
PATIENT: dict[str, Any] = {"api_timeout_s": 60, "db_statement_timeout_s": 60}


def order(key: str, **headers: str) -> dict[str, Any]:
    return {
        "json": {"amount": 10, "description": key},
        "headers": {"X-User-Id": "deadline-user", "Idempotency-Key": key, **headers},
    }


def raw_url(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


@contextlib.asynccontextmanager
async def orders_locked(url: str) -> AsyncIterator[asyncpg.Connection]:
    """The `orders` table locked against writes until the block ends."""
    conn = await asyncpg.connect(raw_url(url))
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("LOCK TABLE orders IN SHARE MODE")
        try:
            yield conn
        finally:
            await transaction.rollback()
    finally:
        await conn.close()


async def orders_with(url: str, key: str) -> int:
    conn = await asyncpg.connect(raw_url(url))
    try:
        return int(await conn.fetchval("SELECT count(*) FROM orders WHERE description = $1", key))
    finally:
        await conn.close()


async def waiting_on_lock(url: str, count: int) -> bool:
    conn = await asyncpg.connect(raw_url(url))
    try:
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND application_name = 'orders-api'"
        )
        return int(waiting) >= count
    finally:
        await conn.close()


@pytest.fixture
async def tight(orders_db: str) -> AsyncIterator[httpx.AsyncClient]:
    """An orders API that runs one request at a time and queues one more."""
    settings = OrdersSettings(
        orders_database_url=orders_db, api_max_in_flight=1, api_max_queued=1, **PATIENT
    )
    async with serve(build_app(settings)) as client:
        yield client


async def test_past_capacity_the_api_answers_503_at_once_and_writes_nothing(
    tight: httpx.AsyncClient, orders_db: str
) -> None:
    async with orders_locked(orders_db):
        first = asyncio.create_task(tight.post("/api/orders", **order("first")))
        await until(lambda: waiting_on_lock(orders_db, 1), 30, "the first INSERT to wait")
        queued = asyncio.create_task(tight.post("/api/orders", **order("queued")))

        async def one_queued() -> bool:
            metrics = (await tight.get("/metrics")).text
            return 'gozon_api_queued{service="orders"} 1.0' in metrics

        await until(one_queued, 30, "the second request to be queued")
        shed = await tight.post("/api/orders", **order("shed"))
        assert shed.status_code == 503
        assert shed.headers["retry-after"] == "1"
        assert shed.json()["outcome"] == "not_processed"
        metrics = (await tight.get("/metrics")).text
        assert 'gozon_api_shed_total{reason="queue_full",service="orders"} 1.0' in metrics
        assert (await tight.get("/health/live")).status_code == 200  # never shed
    assert (await first).status_code == 201
    assert (await queued).status_code == 201
    assert await orders_with(orders_db, "shed") == 0


async def test_a_statement_past_the_callers_deadline_is_cancelled_and_answered_503(
    orders_db: str,
) -> None:
    async with serve(build_app(OrdersSettings(orders_database_url=orders_db))) as client:
        async with orders_locked(orders_db):
            response = await client.post(
                "/api/orders", **order("late", **{"X-Request-Timeout-Ms": "300"})
            )
        assert response.status_code == 503
        assert response.json()["outcome"] == "not_processed"
        assert await orders_with(orders_db, "late") == 0
        # The same key goes through once the database is free: nothing was half-written.
        assert (await client.post("/api/orders", **order("late"))).status_code == 201


async def test_a_write_whose_server_freezes_is_answered_within_the_deadline(
    orders_db: str,
) -> None:
    """A request short of time writes as BEGIN; SET LOCAL statement_timeout; the statement;
    COMMIT. If the server stops answering meanwhile (a stalled disk, a paused machine: the
    connection stays open and nothing is cancelled), only the client's bound keeps the request
    inside its deadline, and the connection must be dropped, not rolled back: the ROLLBACK
    would wait for the frozen server. Frozen here: the request's own backend (SIGSTOP), while
    its INSERT waits for the table lock."""
    budget_s = 1.0
    async with serve(build_app(OrdersSettings(orders_database_url=orders_db))) as client:
        async with orders_locked(orders_db) as admin:
            started = time.monotonic()
            sent = asyncio.create_task(
                client.post(
                    "/api/orders",
                    **order("frozen", **{"X-Request-Timeout-Ms": str(int(budget_s * 1000))}),
                )
            )
            async with frozen_when_it_waits_for_a_lock(admin, "orders-api"):
                response = await asyncio.wait_for(sent, 30)
                took = time.monotonic() - started
        assert response.status_code == 503, response.text
        assert response.json()["outcome"] == "not_processed"
        # Well under the gateway's margin of one second past the budget, on a busy machine too.
        assert took < budget_s + 0.8, f"answered {took:.2f} s after it was sent"
        assert await orders_with(orders_db, "frozen") == 0
        # The same key goes through on a fresh connection: nothing was half-written.
        assert (await client.post("/api/orders", **order("frozen"))).status_code == 201


async def test_too_small_a_budget_is_refused_before_any_work(orders_db: str) -> None:
    async with serve(build_app(OrdersSettings(orders_database_url=orders_db))) as client:
        response = await client.post(
            "/api/orders",
            json={"amount": 10, "description": "tiny"},
            headers={"X-User-Id": "deadline-user", "X-Request-Timeout-Ms": "10"},
        )
    assert response.status_code == 503
    assert response.json()["outcome"] == "not_processed"
    assert await orders_with(orders_db, "tiny") == 0


async def transactions(url: str) -> Database:
    """The APIs' database access (`Database.transaction` bounds the payments API's deposits)."""
    return await Database.open(
        url,
        pool_size=1,
        application_name="gozon",
        pool_timeout_s=2,
        statement_timeout_s=3,
    )


async def test_nothing_is_committed_once_the_deadline_has_passed(orders_db: str) -> None:
    engine = create_engine(orders_db, pool_size=1)
    db = await transactions(orders_db)

    async def insert_then_wait_for_the_deadline() -> None:
        with request_budget(0.5) as budget:
            async with db.transaction() as conn:
                await conn.execute(
                    "INSERT INTO orders (id, user_id, amount, description, status, "
                    "created_at, updated_at) VALUES ($1, 'u', 1, 'after', 'NEW', now(), now())",
                    uuid.uuid4(),
                )
                await until(lambda: asyncio.sleep(0, result=budget.left() <= 0), 5, "the deadline")

    try:
        with pytest.raises(DeadlineExceeded):
            await insert_then_wait_for_the_deadline()
        async with AsyncSession(engine) as session:
            count = await session.scalar(
                select(func.count()).select_from(Order).where(Order.description == "after")
            )
        assert count == 0
    finally:
        await db.close()
        await engine.dispose()


async def test_a_statement_cut_between_its_preparation_and_execution_is_the_deadlines(
    orders_db: str,
) -> None:
    """The fault suite's frozen database once got a 500: the deadline's cut (a timer) fell
    between a new statement's preparation and its execution, and asyncpg, its protocol already
    dropped, raised `AttributeError: 'NoneType' object has no attribute 'bind_execute'`, which
    no outage handler knows. Made certain here: the statement's preparation is sent, the loop
    is held until the deadline has passed and the answer has arrived, so the cut runs after
    the answer is read and before the statement resumes. Inside a cut transaction any failure
    is `DeadlineExceeded`: a 503, nothing committed."""
    db = await transactions(orders_db)

    async def prepared_then_cut() -> None:
        async with db.transaction() as conn:
            fetching = asyncio.ensure_future(conn.fetch("SELECT $1::int + 1 AS never_prepared", 1))
            await asyncio.sleep(0)  # the statement's preparation is sent
            time.sleep(budget.left() + 0.3)  # noqa: ASYNC251 - the loop held on purpose
            await fetching

    try:
        with request_budget(0.5) as budget, pytest.raises(DeadlineExceeded) as raised:
            await prepared_then_cut()
        assert budget.cut
        assert not budget.committing
        print(f"\nthe driver raised: {raised.value.__cause__!r}")
    finally:
        await db.close()


async def test_a_commit_cut_at_the_deadline_is_of_unknown_outcome(orders_db: str) -> None:
    """The payments API's transactions (`Database.transaction`) have their connection cut at
    the deadline (a server that stopped answering cancels nothing). If the COMMIT was already
    sent, the server may have committed: the budget says `committing`, which the API answers
    504 "outcome unknown" rather than 503. The COMMIT is held here by a deferred constraint
    trigger that waits for an advisory lock the test holds, and its backend is stopped
    (SIGSTOP) while it waits."""
    db = await transactions(orders_db)
    key = 20261203
    admin = await asyncpg.connect(raw_url(orders_db))
    try:
        await admin.execute("SELECT pg_advisory_lock($1)", key)
        with request_budget(1.0) as budget:
            started = time.monotonic()

            async def commit_that_waits_for_the_lock() -> None:
                async with db.transaction() as conn:
                    for statement in (
                        "CREATE TEMP TABLE held (x int) ON COMMIT DROP",
                        "CREATE FUNCTION pg_temp.wait_for_the_test() RETURNS trigger "
                        f"LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_advisory_xact_lock({key}); "
                        "RETURN NULL; END $$",
                        "CREATE CONSTRAINT TRIGGER at_commit AFTER INSERT ON held "
                        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                        "EXECUTE FUNCTION pg_temp.wait_for_the_test()",
                        "INSERT INTO held VALUES (1)",
                    ):
                        await conn.execute(statement)

            committing = asyncio.create_task(commit_that_waits_for_the_lock())
            async with frozen_when_it_waits_for_a_lock(admin, "gozon"):
                with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError)):
                    await asyncio.wait_for(committing, 30)
                took = time.monotonic() - started
        assert budget.cut
        assert budget.committing
        assert took < 1.0 + 0.8, f"gave up {took:.2f} s after the transaction began"
    finally:
        await admin.close()
        await db.close()


async def lock_waiter(url: str, spare: int) -> int | None:
    """The orders API's backend waiting on the lock, other than `spare` (a connection of its
    own: pg_stat_activity is a snapshot per transaction)."""
    conn = await asyncpg.connect(raw_url(url))
    try:
        pid = await conn.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'orders-api' "
            "AND wait_event_type = 'Lock' AND pid <> $1",
            spare,
        )
        return None if pid is None else int(pid)
    finally:
        await conn.close()


async def kill_lock_waiter(admin: asyncpg.Connection, orders_db: str, spare: int = 0) -> int:
    """Terminates the orders API's connection waiting on the lock (not `spare`); its pid."""

    async def waiting() -> bool:
        return await lock_waiter(orders_db, spare) is not None

    await until(waiting, 30, "the INSERT to wait")
    pid = await lock_waiter(orders_db, spare)
    assert pid is not None
    await admin.execute("SELECT pg_terminate_backend($1)", pid)
    return pid


async def test_a_connection_killed_mid_request_is_retried_once_then_503_and_the_pool_recovers(
    orders_db: str,
) -> None:
    """The server terminates the connection (as a restart does) while the INSERT runs: the
    statement is rolled back, so the API sends it once more on a fresh connection; killed
    again, the answer is 503 and nothing was written."""
    settings = OrdersSettings(orders_database_url=orders_db, **PATIENT)
    async with serve(build_app(settings)) as client:
        async with orders_locked(orders_db) as admin:
            pending = asyncio.create_task(client.post("/api/orders", **order("killed")))
            first = await kill_lock_waiter(admin, orders_db)
            await kill_lock_waiter(admin, orders_db, spare=first)  # the retry's connection
            response = await pending
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert response.json()["outcome"] == "not_processed"
        assert await orders_with(orders_db, "killed") == 0
        # Every pooled connection killed (as a PostgreSQL restart does): the next request
        # still succeeds, on a new connection.
        admin2 = await asyncpg.connect(raw_url(orders_db))
        try:
            await admin2.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'orders-api'"
            )
        finally:
            await admin2.close()
        again = await client.post("/api/orders", **order("killed"))
        assert again.status_code == 201, again.text


async def test_a_database_that_refuses_the_api_is_answered_503_not_processed(
    orders_db: str,
) -> None:
    """A grant taken away (as a migration not run or a read-only standby after a failover
    would) fails every request alike and commits nothing: to the client that is the service
    unavailable (retry later), not an unknown outcome; once granted again, the same request
    goes through."""
    engine = create_engine(orders_db)
    try:
        async with role_of_its_own(engine) as (role, as_role):
            async with engine.begin() as conn:
                await conn.execute(text(f"REVOKE INSERT ON orders FROM {role}"))
            settings = OrdersSettings(orders_database_url=as_role, **PATIENT)
            async with serve(build_app(settings)) as client:
                refused = await client.post("/api/orders", **order("refused"))
                assert refused.status_code == 503, refused.text
                assert refused.headers["retry-after"] == "1"
                assert refused.json()["outcome"] == "not_processed"
                assert await orders_with(orders_db, "refused") == 0

                async with engine.begin() as conn:
                    await conn.execute(text(f"GRANT INSERT ON orders TO {role}"))
                again = await client.post("/api/orders", **order("refused"))
                assert again.status_code == 201, again.text
                assert await orders_with(orders_db, "refused") == 1
    finally:
        await engine.dispose()


async def test_a_connection_to_a_read_only_server_is_dropped_not_pooled_again(
    orders_db: str,
) -> None:
    """While the database is read-only (as a standby is), new sessions refuse writes: 503.
    Once it is writable again, the sessions made meanwhile must not live on in the pool
    refusing writes for ever (nothing else would end them: after a failover back, say): the
    next request goes through at once, with no session of the server ended by anyone."""
    settings = OrdersSettings(orders_database_url=orders_db, **PATIENT)
    async with read_only_switch(orders_db) as switch, serve(build_app(settings)) as client:
        assert (await client.post("/api/orders", **order("before"))).status_code == 201
        await switch.read_only(True)
        await switch.admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'orders-api'"
        )
        refused = await client.post("/api/orders", **order("read-only"))
        assert refused.status_code == 503, refused.text
        assert refused.json()["outcome"] == "not_processed"

        await switch.read_only(False)
        again = await client.post("/api/orders", **order("read-only"))
        assert again.status_code == 201, again.text
        assert await orders_with(orders_db, "read-only") == 1


async def test_a_connection_to_a_server_that_never_answers_gives_up_within_the_budget() -> None:
    """As for the payments API (test_payments_api.py): a server whose kernel accepts the TCP
    connection but which never answers the startup (frozen) costs a request its budget, not
    the pool's connect timeout. The server here is a socket that listens and never answers."""
    budget_s = 1.0
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"postgresql+asyncpg://gozon:gozon@127.0.0.1:{silent.getsockname()[1]}/orders"
        async with serve(build_app(OrdersSettings(orders_database_url=url))) as client:
            started = time.monotonic()
            response = await client.post(
                "/api/orders",
                **order("silent", **{"X-Request-Timeout-Ms": str(int(budget_s * 1000))}),
            )
            took = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert response.json()["outcome"] == "not_processed"
    assert took < budget_s + 0.8, f"answered {took:.2f} s after it was sent"
