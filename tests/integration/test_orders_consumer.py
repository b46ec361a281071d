"""The consumer runner and the orders consumer against the real Kafka and PostgreSQL:
final statuses, duplicates, poison messages to the dead-letter topic, a database outage."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from decimal import Decimal
from typing import Literal

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from prometheus_client import REGISTRY
from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from devstack import Kafka, Postgres
from gozon.contracts import PaymentProcessed, PaymentProcessedPayload, utc_now
from gozon.core.pg import worker_pool
from gozon.messaging.consumer import DLQ_REASON, BatchHandler, Delivery, Outcome
from gozon.messaging.kafka import dlq_topic
from gozon.orders.consumer import count_stuck_orders, make_handler
from gozon.orders.models import Order
from tests.conftest import running_consumer, until
from tests.integration.conftest import new_topic
from tests.integration.test_relay import consume

pytestmark = pytest.mark.integration


@pytest.fixture
async def topic(kafka: Kafka) -> str:
    return await new_topic(kafka, "test.payments", partitions=1)


async def new_order(engine: AsyncEngine, user_id: str = "u-1") -> uuid.UUID:
    order_id = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            insert(Order).values(
                id=order_id,
                user_id=user_id,
                amount=Decimal("10.00"),
                description="x",
                status="NEW",
                created_at=utc_now(),
            )
        )
    return order_id


def result(
    order_id: uuid.UUID,
    status: Literal["PAID", "INSUFFICIENT_FUNDS", "ACCOUNT_NOT_FOUND"],
    reason: str | None = None,
) -> bytes:
    event = PaymentProcessed(
        aggregate_id=str(order_id),
        payload=PaymentProcessedPayload(
            order_id=order_id,
            user_id="u-1",
            amount=Decimal("10"),
            status=status,
            reason=reason,
            processed_at=utc_now(),
        ),
    )
    return event.model_dump_json().encode()


async def order_state(engine: AsyncEngine, order_id: uuid.UUID) -> tuple[str, str | None]:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(Order.status, Order.cancel_reason).where(Order.id == order_id)
            )
        ).one()
    return row.status, row.cancel_reason


async def committed(kafka: Kafka, topic: str, group: str) -> int | None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    meta = offsets.get(TopicPartition(topic, 0))
    return None if meta is None else int(meta.offset)


async def until_committed(
    kafka: Kafka, topic: str, group: str, offset: int, within: float = 20
) -> None:
    async def reached() -> bool:
        return await committed(kafka, topic, group) == offset

    await until(reached, within, f"offset {offset} to be committed")


@pytest.fixture
async def engine(orders_db: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(orders_db)
    yield engine
    await engine.dispose()


async def test_payment_results_move_orders_to_their_final_status_once(
    orders_db: str, engine: AsyncEngine, kafka: Kafka, topic: str, producer: AIOKafkaProducer
) -> None:
    paid, poor, late = await new_order(engine), await new_order(engine), await new_order(engine)
    messages = [
        result(paid, "PAID"),
        result(poor, "INSUFFICIENT_FUNDS", "balance 5.00 is less than 10.00"),
        result(paid, "PAID"),  # a duplicate
        result(late, "ACCOUNT_NOT_FOUND"),
        result(late, "PAID"),  # late: the first result won
    ]
    for value in messages:
        await producer.send_and_wait(topic, value=value, key=b"u-1")
    group = f"g-{uuid.uuid4().hex[:8]}"
    async with running_consumer(orders_db, kafka, topic, group, PaymentProcessed, make_handler):
        await until_committed(kafka, topic, group, len(messages))
    assert await order_state(engine, paid) == ("FINISHED", None)
    assert await order_state(engine, poor) == ("CANCELLED", "balance 5.00 is less than 10.00")
    assert await order_state(engine, late) == ("CANCELLED", "ACCOUNT_NOT_FOUND")


async def test_a_malformed_message_lands_in_the_dlq_with_its_reason_and_the_next_is_handled(
    orders_db: str, engine: AsyncEngine, kafka: Kafka, topic: str, producer: AIOKafkaProducer
) -> None:
    order_id = await new_order(engine)
    poison = [b"{not json", b'{"event_type": "PaymentProcessed"}', b""]
    for value in poison:
        await producer.send_and_wait(
            topic,
            value=value,
            key=b"u-1",
            headers=[("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")],
        )
    await producer.send_and_wait(topic, value=result(uuid.uuid4(), "PAID"), key=b"u-1")
    await producer.send_and_wait(topic, value=result(order_id, "PAID"), key=b"u-1")
    group = f"g-{uuid.uuid4().hex[:8]}"
    async with running_consumer(orders_db, kafka, topic, group, PaymentProcessed, make_handler):
        await until_committed(kafka, topic, group, 5)
    assert await order_state(engine, order_id) == ("FINISHED", None)

    dead = await consume(kafka.bootstrap, dlq_topic(topic), at_least=4)
    assert [record.value for record in dead[:3]] == poison
    reasons = [dict(record.headers)[DLQ_REASON].decode() for record in dead]
    assert reasons[0].startswith("invalid message: ")
    assert "not an accepted JSON document" in reasons[0]
    assert "Field required" in reasons[1]
    assert reasons[2] == "invalid message: empty message value"
    assert reasons[3].startswith("rejected: no order ")  # well-formed, but unknown order
    origin = dict(dead[0].headers)
    assert origin["x-dlq-original-topic"] == topic.encode()
    assert origin["x-dlq-original-offset"] == b"0"
    assert origin["traceparent"].startswith(b"00-111")


async def test_a_database_outage_is_retried_until_it_ends_and_the_message_is_not_skipped(
    private_postgres: Postgres, kafka: Kafka, topic: str, producer: AIOKafkaProducer
) -> None:
    url = private_postgres.url("order_db")
    engine = create_async_engine(url)
    try:
        order_id = await new_order(engine)
    finally:
        await engine.dispose()
    group = f"g-{uuid.uuid4().hex[:8]}"
    attempts = [0]

    def counting(pool: asyncpg.Pool) -> BatchHandler[PaymentProcessed]:
        handle = make_handler(pool)

        async def counted(batch: Sequence[Delivery[PaymentProcessed]]) -> Sequence[Outcome]:
            attempts[0] += 1
            return await handle(batch)

        return counted

    async with running_consumer(url, kafka, topic, group, PaymentProcessed, counting) as runner:
        await asyncio.to_thread(private_postgres.stop)
        await producer.send_and_wait(topic, value=result(order_id, "PAID"), key=b"u-1")

        async def retried() -> bool:
            return not runner.database_ok and attempts[0] >= 3

        await until(retried, 120, "the runner to retry the message through the outage")
        assert await committed(kafka, topic, group) is None  # not skipped, not committed
        await asyncio.to_thread(private_postgres.start)
        await until_committed(kafka, topic, group, 1, within=120)
    engine = create_async_engine(url)
    try:
        assert await order_state(engine, order_id) == ("FINISHED", None)
    finally:
        await engine.dispose()


async def test_the_stuck_gauge_counts_the_new_orders_older_than_the_threshold(
    orders_db: str,
) -> None:
    engine = create_async_engine(orders_db)
    try:
        stuck, _recent, final = [await new_order(engine) for _ in range(3)]
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "UPDATE orders SET created_at = now() - interval '1 hour' WHERE id = ANY(:ids)"
                ),
                {"ids": [stuck, final]},
            )
            await conn.execute(
                text("UPDATE orders SET status = 'FINISHED' WHERE id = :id"), {"id": final}
            )
    finally:
        await engine.dispose()
    pool = await worker_pool(orders_db, size=1, application_name="test-stuck")
    try:
        assert await count_stuck_orders(pool, timedelta(minutes=5)) == 1  # not recent, final
        assert REGISTRY.get_sample_value("gozon_orders_stuck") == 1
        assert await count_stuck_orders(pool, timedelta(hours=2)) == 0
        assert REGISTRY.get_sample_value("gozon_orders_stuck") == 0
    finally:
        await pool.close()
