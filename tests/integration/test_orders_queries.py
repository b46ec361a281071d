"""`gozon.orders.queries` (the API's statements) and `gozon.core.pg` against the real
PostgreSQL: what each statement writes and returns, the idempotency race, the pool."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest
from opentelemetry import trace

from gozon.core.pg import Database, driver_dsn, request_budget
from gozon.orders import queries, service
from gozon.orders.schemas import OrderCreate
from tests.conftest import until

pytestmark = pytest.mark.integration


@pytest.fixture
async def db(orders_db: str) -> AsyncIterator[Database]:
    database = await Database.open(
        orders_db,
        pool_size=2,
        application_name="orders-api",
        pool_timeout_s=10,
        statement_timeout_s=3,
    )
    try:
        yield database
    finally:
        await database.close()


async def raw(orders_db: str) -> asyncpg.Connection:
    return await asyncpg.connect(driver_dsn(orders_db))


def body(amount: str = "10.50", description: str = "a book") -> OrderCreate:
    return OrderCreate(amount=Decimal(amount), description=description)


async def test_create_order_writes_the_order_and_its_event_with_the_trace_context(
    db: Database, orders_db: str
) -> None:
    with trace.get_tracer("tests").start_as_current_span("request") as span:
        created = await service.create_order(db=db, user_id="u1", data=body(), idempotency_key=None)
    assert not created.replayed
    order = created.order
    assert (order["user_id"], order["amount"], order["status"]) == ("u1", Decimal("10.50"), "NEW")
    conn = await raw(orders_db)
    try:
        rows = await conn.fetch("SELECT * FROM order_outbox")
    finally:
        await conn.close()
    assert len(rows) == 1
    event = json.loads(rows[0]["payload"])
    assert rows[0]["aggregate_id"] == str(order["id"])
    assert (rows[0]["topic"], rows[0]["message_key"], rows[0]["status"]) == (
        "order.created.event",
        "u1",
        "PENDING",
    )
    assert event["payload"]["order_id"] == str(order["id"])
    assert event["payload"]["amount"] == 10.5
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert trace_id in json.loads(rows[0]["headers"])["traceparent"]


async def test_a_key_replays_the_first_order_and_refuses_another_body(
    db: Database, orders_db: str
) -> None:
    first = await service.create_order(db=db, user_id="u1", data=body(), idempotency_key="k")
    again = await service.create_order(db=db, user_id="u1", data=body(), idempotency_key="k")
    assert again.replayed
    assert again.order == first.order
    with pytest.raises(service.IdempotencyKeyReused):
        await service.create_order(db=db, user_id="u1", data=body("11"), idempotency_key="k")
    other_user = await service.create_order(db=db, user_id="u2", data=body(), idempotency_key="k")
    assert not other_user.replayed
    conn = await raw(orders_db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM orders") == 2
        assert await conn.fetchval("SELECT count(*) FROM order_outbox") == 2
    finally:
        await conn.close()


async def test_a_key_committed_meanwhile_gives_no_row_then_the_replay(
    db: Database, orders_db: str
) -> None:
    """CREATE_ORDER's documented race: the same key inserted by a transaction that commits
    while this statement waits on the unique index is invisible to its snapshot."""
    other = await raw(orders_db)
    try:
        transaction = other.transaction()
        await transaction.start()
        await other.execute(
            "INSERT INTO orders (id, user_id, amount, description, status, idempotency_key, "
            "request_fingerprint, created_at, updated_at) "
            "VALUES ($1, 'u1', 10.50, 'a book', 'NEW', 'k', $2, now(), now())",
            uuid.uuid4(),
            service._fingerprint(body()),
        )
        racing = asyncio.create_task(
            service.create_order(db=db, user_id="u1", data=body(), idempotency_key="k")
        )

        async def waiting() -> bool:
            check = await raw(orders_db)
            try:
                return bool(
                    await check.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND application_name = 'orders-api'"
                    )
                )
            finally:
                await check.close()

        await until(waiting, 30, "the racing insert to wait on the key")
        await transaction.commit()
        created = await racing
    finally:
        await other.close()
    assert created.replayed
    assert created.order["description"] == "a book"


async def test_get_and_list_see_only_the_users_orders_newest_first(db: Database) -> None:
    made = [
        (await service.create_order(db=db, user_id="u1", data=body(), idempotency_key=None)).order
        for _ in range(3)
    ]
    await service.create_order(db=db, user_id="u2", data=body(), idempotency_key=None)
    assert await service.get_order(db=db, user_id="u1", order_id=made[0]["id"]) == made[0]
    assert await service.get_order(db=db, user_id="u2", order_id=made[0]["id"]) is None
    page, cursor = await service.list_orders(db=db, user_id="u1", limit=2, cursor=None)
    assert cursor is not None
    rest, end = await service.list_orders(db=db, user_id="u1", limit=2, cursor=cursor)
    assert end is None
    newest_first = sorted(made, key=lambda o: (o["created_at"], o["id"]), reverse=True)
    assert [o["id"] for o in page + rest] == [o["id"] for o in newest_first]
    rows = await db.read(queries.LIST_ORDERS, ("u2", 10))
    assert [r["user_id"] for r in rows] == ["u2"]


async def test_a_pooled_connection_serves_one_request_after_another(db: Database) -> None:
    """No pre-ping, no reset, and no reconnect: the same backend answers both."""
    first = await db.read("SELECT pg_backend_pid() AS pid", ())
    second = await db.read("SELECT pg_backend_pid() AS pid", ())
    assert first[0]["pid"] == second[0]["pid"]


async def test_a_request_short_of_time_writes_in_its_own_bounded_transaction(
    db: Database, orders_db: str
) -> None:
    """Less time left than the statement cap: BEGIN + SET LOCAL + the statement + COMMIT."""
    with request_budget(1.0):
        created = await service.create_order(db=db, user_id="u1", data=body(), idempotency_key=None)
    assert not created.replayed
    rows = await db.read("SELECT current_setting('statement_timeout') AS t", ())
    assert rows[0]["t"] == "3s"  # the SET LOCAL ended with its transaction
    conn = await raw(orders_db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM order_outbox") == 1
    finally:
        await conn.close()


async def test_a_connection_the_server_closed_while_idle_is_replaced_unseen(
    db: Database, orders_db: str
) -> None:
    pid = (await db.read("SELECT pg_backend_pid() AS pid", ()))[0]["pid"]
    admin = await raw(orders_db)
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    # Whether or not asyncpg has seen the connection go yet, the statement succeeds.
    rows = await db.read("SELECT pg_backend_pid() AS pid", ())
    assert rows[0]["pid"] != pid
    created = await service.create_order(db=db, user_id="u1", data=body(), idempotency_key=None)
    assert not created.replayed
