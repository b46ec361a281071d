"""The order → payment → status flow with every process real, through the gateway.

Invariants checked: no money is created or lost, each order is debited at most once, every
order reaches a final status.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from gozon.contracts import ORDER_CREATED_TOPIC, OrderCreated, OrderCreatedPayload, utc_now
from tests.conftest import until
from tests.e2e.conftest import Platform

pytestmark = pytest.mark.e2e


@pytest.fixture
async def gateway(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    # Idle connections are dropped well before the server's 5 s keep-alive ends: a request
    # sent on a connection the server is closing at that moment fails with a ReadError.
    limits = httpx.Limits(max_connections=100, keepalive_expiry=1)
    async with httpx.AsyncClient(base_url=platform.gateway, timeout=120, limits=limits) as client:
        yield client


@pytest.fixture
async def accounts_db(platform: Platform) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(platform.env["GOZON_PAYMENTS_DATABASE_URL"])
    yield engine
    await engine.dispose()


async def until_consumed(platform: Platform, topic: str, group: str, within: float = 120) -> None:
    """Waits until `group` has committed, on every partition of `topic`, the end offset that
    the topic has now: everything published so far has been handled."""
    bootstrap = platform.env["GOZON_KAFKA_BOOTSTRAP_SERVERS"]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await consumer.start()
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
        partitions = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
        assert partitions, f"no partitions for {topic}"
        ends = await consumer.end_offsets(partitions)

        async def caught_up() -> bool:
            offsets = await admin.list_consumer_group_offsets(group)
            return all(
                (offsets[tp].offset if tp in offsets else 0) >= end for tp, end in ends.items()
            )

        await until(caught_up, within, f"{group} to commit the end of {topic}")
    finally:
        await admin.close()
        await consumer.stop()


def new_user() -> str:
    return f"e2e-{uuid.uuid4().hex[:12]}"


async def final_order(
    client: httpx.AsyncClient, user: str, order_id: str, within: float = 120
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        response = await client.get(f"/api/orders/{order_id}", headers={"X-User-Id": user})
        assert response.status_code == 200, response.text
        order: dict[str, Any] = response.json()
        if order["status"] != "NEW":
            return order
        assert loop.time() < deadline, f"order {order_id} still NEW after {within} s"
        await asyncio.sleep(0.02)


async def final_orders(
    client: httpx.AsyncClient, user: str, order_ids: list[str], within: float = 180
) -> list[dict[str, Any]]:
    """Waits until every one of the user's orders is final, asking for all of them at once
    (polling each order separately would load the machine more than the flow under test)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        response = await client.get("/api/orders?limit=200", headers={"X-User-Id": user})
        assert response.status_code == 200, response.text
        orders = {order["id"]: order for order in response.json()}
        if all(orders.get(oid, {}).get("status", "NEW") != "NEW" for oid in order_ids):
            return [orders[oid] for oid in order_ids]
        open_orders = sum(1 for oid in order_ids if orders.get(oid, {}).get("status") == "NEW")
        assert loop.time() < deadline, f"{open_orders} orders still NEW after {within} s"
        await asyncio.sleep(0.1)


async def balance(client: httpx.AsyncClient, user: str) -> Decimal:
    response = await client.get("/api/payments/balance", headers={"X-User-Id": user})
    assert response.status_code == 200, response.text
    return Decimal(str(response.json()["balance"]))


async def post_as_a_client_does(
    client: httpx.AsyncClient, url: str, user: str, **kwargs: Any
) -> httpx.Response:
    """POSTs with an Idempotency-Key and, as the API's contract asks, retries a 503 ("not
    processed": the API sheds what it cannot take) after its Retry-After, with the same key."""
    headers = {"X-User-Id": user, "Idempotency-Key": uuid.uuid4().hex}
    while True:
        response = await client.post(url, headers=headers, **kwargs)
        if response.status_code != 503:
            return response
        assert response.json()["outcome"] == "not_processed", response.text
        await asyncio.sleep(float(response.headers["retry-after"]))


async def order(client: httpx.AsyncClient, user: str, amount: str) -> str:
    response = await post_as_a_client_does(
        client, "/api/orders", user, json={"amount": float(amount), "description": "e2e"}
    )
    assert response.status_code == 201, response.text
    order_id: str = response.json()["id"]
    return order_id


async def deposit(client: httpx.AsyncClient, user: str, amount: str) -> None:
    response = await post_as_a_client_does(client, f"/api/payments/deposit?amount={amount}", user)
    assert response.status_code in (200, 201), response.text


async def test_the_spec_scenario_deposit_order_and_the_order_is_finished(
    gateway: httpx.AsyncClient,
) -> None:
    user = new_user()
    await deposit(gateway, user, "5000")
    response = await gateway.post(
        "/api/orders",
        headers={"X-User-Id": user, "Content-Type": "application/json"},
        content='{"amount": 1500.99, "description": "Тестовый заказ"}'.encode(),
    )
    assert response.status_code == 201
    assert response.json()["status"] == "NEW"
    # How soon it is FINISHED is measured by bench/capacity.py, not asserted here.
    finished = await final_order(gateway, user, response.json()["id"])
    assert finished["status"] == "FINISHED"
    assert await balance(gateway, user) == Decimal("3499.01")
    listed = await gateway.get("/api/orders", headers={"X-User-Id": user})
    assert [o["status"] for o in listed.json()] == ["FINISHED"]


async def test_insufficient_funds_cancel_the_order_and_leave_the_balance(
    gateway: httpx.AsyncClient,
) -> None:
    user = new_user()
    await deposit(gateway, user, "100")
    cancelled = await final_order(gateway, user, await order(gateway, user, "100.01"))
    assert cancelled["status"] == "CANCELLED"
    assert "INSUFFICIENT_FUNDS" in cancelled["cancel_reason"] or "insufficient" in (
        cancelled["cancel_reason"].lower()
    )
    assert await balance(gateway, user) == Decimal("100")


async def test_an_order_without_an_account_is_cancelled(gateway: httpx.AsyncClient) -> None:
    user = new_user()
    cancelled = await final_order(gateway, user, await order(gateway, user, "10"))
    assert cancelled["status"] == "CANCELLED"
    assert cancelled["cancel_reason"]
    response = await gateway.get("/api/payments/balance", headers={"X-User-Id": user})
    assert response.status_code == 404


async def test_the_same_order_event_three_times_debits_once(
    gateway: httpx.AsyncClient, platform: Platform, accounts_db: AsyncEngine
) -> None:
    user = new_user()
    await deposit(gateway, user, "50")
    order_id = uuid.uuid4()
    # The order exists, as the event says (the books must add up when the session ends: a
    # debit for an order that order_db lacks is what `gozon reconcile` reports).
    orders_db = create_async_engine(platform.env["GOZON_ORDERS_DATABASE_URL"])
    try:
        async with orders_db.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO orders (id, user_id, amount, description, status, created_at)"
                    " VALUES (:id, :user, 20.00, 'replayed', 'NEW', now())"
                ),
                {"id": order_id, "user": user},
            )
    finally:
        await orders_db.dispose()
    event = OrderCreated(
        aggregate_id=str(order_id),
        payload=OrderCreatedPayload(
            order_id=order_id,
            user_id=user,
            amount=Decimal("20.00"),
            description="replayed",
            created_at=utc_now(),
        ),
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=platform.env["GOZON_KAFKA_BOOTSTRAP_SERVERS"],
        acks="all",
        enable_idempotence=True,
    )
    await producer.start()
    try:
        for _ in range(3):
            await producer.send_and_wait(
                ORDER_CREATED_TOPIC, key=user.encode(), value=event.model_dump_json().encode()
            )
    finally:
        await producer.stop()

    async def counts() -> tuple[int, int, int]:
        async with accounts_db.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT (SELECT count(*) FROM account_ledger WHERE order_id = :o),"
                        "       (SELECT count(*) FROM payment_inbox WHERE order_id = :o),"
                        "       (SELECT count(*) FROM payment_outbox WHERE order_id = :o)"
                    ),
                    {"o": order_id},
                )
            ).one()
        return int(row[0]), int(row[1]), int(row[2])

    async def answered_thrice() -> bool:
        return (await counts())[2] == 3

    # every delivery is answered (with the one decision), so three answers = all consumed
    await until(answered_thrice, 120, "an answer to each of the three deliveries")
    # All three deliveries handled: the payments group has committed the topic's end.
    await until_consumed(platform, ORDER_CREATED_TOPIC, "payments")
    assert await counts() == (1, 1, 3)
    assert await balance(gateway, user) == Decimal("30.00")


async def publish(platform: Platform, events: list[OrderCreated]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=platform.env["GOZON_KAFKA_BOOTSTRAP_SERVERS"],
        acks="all",
        enable_idempotence=True,
    )
    await producer.start()
    try:
        for event in events:
            await producer.send_and_wait(
                ORDER_CREATED_TOPIC,
                key=event.payload.user_id.encode(),
                value=event.model_dump_json().encode(),
            )
    finally:
        await producer.stop()


async def test_new_envelopes_for_decided_orders_move_no_money(
    gateway: httpx.AsyncClient, platform: Platform, accounts_db: AsyncEngine
) -> None:
    """A producer's retry of an order under a fresh event id, for a CANCELLED order whose user
    has topped up since, and for a FINISHED one: neither is debited (again)."""
    user = new_user()
    await deposit(gateway, user, "100")
    finished = await final_order(gateway, user, await order(gateway, user, "60"))
    cancelled = await final_order(gateway, user, await order(gateway, user, "70"))
    assert (finished["status"], cancelled["status"]) == ("FINISHED", "CANCELLED")
    await deposit(gateway, user, "500")  # now the cancelled order would be affordable
    before = await check_money_invariants(accounts_db, user)
    assert before == Decimal("540")

    def envelope(final: dict[str, Any]) -> OrderCreated:
        return OrderCreated(  # a new envelope: a fresh event_id for the same order
            aggregate_id=final["id"],
            payload=OrderCreatedPayload(
                order_id=uuid.UUID(final["id"]),
                user_id=user,
                amount=Decimal(str(final["amount"])),
                description=final["description"],
                created_at=utc_now(),
            ),
        )

    await publish(platform, [envelope(finished), envelope(cancelled), envelope(cancelled)])

    async def answers() -> dict[str, int]:
        async with accounts_db.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT order_id::text, count(*) FROM payment_outbox"
                    " WHERE user_id = :u GROUP BY order_id"
                ),
                {"u": user},
            )
            return {order_id: int(count) for order_id, count in rows}

    async def all_answered() -> bool:  # first answer + one per new envelope
        return await answers() == {finished["id"]: 2, cancelled["id"]: 3}

    await until(all_answered, 30, "an answer to every new envelope")
    assert await check_money_invariants(accounts_db, user) == before
    assert await balance(gateway, user) == Decimal("540")
    for final in (finished, cancelled):
        again = await gateway.get(f"/api/orders/{final['id']}", headers={"X-User-Id": user})
        assert again.json()["status"] == final["status"]
    async with accounts_db.connect() as conn:
        statuses = (
            await conn.execute(
                text(
                    "SELECT DISTINCT order_id::text, payload->'payload'->>'status'"
                    " FROM payment_outbox WHERE user_id = :u"
                ),
                {"u": user},
            )
        ).all()
    assert sorted(status for _, status in statuses) == ["INSUFFICIENT_FUNDS", "PAID"]


async def check_money_invariants(accounts_db: AsyncEngine, user: str) -> Decimal:
    """Ledger and balance agree, nothing went negative, at most one debit per order."""
    async with accounts_db.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT a.balance,"
                    " coalesce(sum(CASE l.kind WHEN 'DEPOSIT' THEN l.amount"
                    "              ELSE -l.amount END), 0),"
                    " coalesce(min(l.balance_after), 0),"
                    " count(l.order_id) - count(DISTINCT l.order_id)"
                    " FROM accounts a LEFT JOIN account_ledger l ON l.account_id = a.id"
                    " WHERE a.user_id = :u GROUP BY a.balance"
                ),
                {"u": user},
            )
        ).one()
    account_balance, ledger_sum, lowest, double_debits = row
    assert account_balance == ledger_sum
    assert lowest >= 0
    assert double_debits == 0
    return Decimal(account_balance)


async def test_concurrent_orders_and_deposits_on_one_account_create_or_lose_no_money(
    gateway: httpx.AsyncClient, accounts_db: AsyncEngine
) -> None:
    user = new_user()
    await deposit(gateway, user, "100")
    amounts = [Decimal(f"{(n % 7) + 1}.{n % 100:02d}") for n in range(200)]
    deposits = [Decimal("25.50")] * 50
    order_ids, _ = await asyncio.gather(
        asyncio.gather(*(order(gateway, user, str(amount)) for amount in amounts)),
        asyncio.gather(*(deposit(gateway, user, str(amount)) for amount in deposits)),
    )
    finals = await final_orders(gateway, user, list(order_ids))
    paid = sum(
        (
            amount
            for amount, final in zip(amounts, finals, strict=True)
            if final["status"] == "FINISHED"
        ),
        Decimal(0),
    )
    assert {final["status"] for final in finals} <= {"FINISHED", "CANCELLED"}
    expected = Decimal(100) + sum(deposits) - paid
    assert await balance(gateway, user) == expected
    assert await check_money_invariants(accounts_db, user) == expected
    async with accounts_db.connect() as conn:
        results = (
            await conn.execute(
                text(
                    "SELECT count(*), count(DISTINCT order_id) FROM payment_outbox"
                    " WHERE user_id = :u"
                ),
                {"u": user},
            )
        ).one()
    assert tuple(results) == (200, 200)  # one payment result per order, exactly


async def test_a_payments_consumer_killed_mid_stream_debits_nothing_twice(
    gateway: httpx.AsyncClient, platform: Platform, accounts_db: AsyncEngine
) -> None:
    user = new_user()
    await deposit(gateway, user, "1000")
    amounts = [Decimal("3.00")] * 150

    async def handled() -> int:
        async with accounts_db.connect() as conn:
            count = await conn.scalar(
                text("SELECT count(*) FROM payment_inbox WHERE user_id = :u"), {"u": user}
            )
        return int(count or 0)

    async def some_handled() -> bool:
        return await handled() >= 5

    # Orders keep coming while the consumer is killed: the kill lands mid-stream.
    creating = asyncio.gather(*(order(gateway, user, str(a)) for a in amounts))
    await until(some_handled, 60, "the consumer to have handled some orders")
    platform.processes["payments-consumer"].kill()
    at_kill = await handled()
    assert at_kill < len(amounts), "the kill landed after the stream, not in it"
    order_ids = await creating
    await asyncio.to_thread(platform.start, "payments-consumer")
    finals = await final_orders(gateway, user, list(order_ids))
    assert {final["status"] for final in finals} == {"FINISHED"}
    assert await balance(gateway, user) == Decimal("1000") - sum(amounts)
    assert await check_money_invariants(accounts_db, user) == Decimal("550.00")
