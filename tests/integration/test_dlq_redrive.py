"""Dead letters against the real Kafka and PostgreSQL: a payment result for an order that did
not exist yet is dead-lettered; once the order exists, a redrive completes it; a second
redrive publishes nothing; `list` shows why and whence; the CLI's errors are clear."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from devstack import Kafka
from gozon.contracts import PAYMENT_PROCESSED_TOPIC, PaymentProcessed, utc_now
from gozon.messaging.dlq import (
    REDRIVE_COUNT,
    REDRIVEN_FROM,
    list_dead_letters,
    parse_since,
    redrive,
    redrive_cursor,
)
from gozon.messaging.kafka import dlq_topic, new_producer
from gozon.messaging.metrics import DLQ_REDRIVEN
from gozon.orders.consumer import make_handler
from gozon.orders.models import Order
from tests.conftest import running_consumer, until
from tests.integration.conftest import create_topics_async, new_topic
from tests.integration.test_orders_consumer import order_state, result
from tests.integration.test_relay import consume

pytestmark = pytest.mark.integration


@pytest.fixture
async def topic(kafka: Kafka) -> str:
    return await new_topic(kafka, "test.dlq", partitions=2)


@pytest.fixture
async def engine(orders_db: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(orders_db)
    yield engine
    await engine.dispose()


async def partitions(kafka: Kafka, topic: str) -> list[TopicPartition]:
    producer = new_producer(kafka.bootstrap, client_id="test-meta")
    await producer.start()
    try:
        cluster = await producer.client.fetch_all_metadata()
    finally:
        await producer.stop()
    return [TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic) or ())]


async def end_offsets(kafka: Kafka, topic: str) -> int:
    """How many records the topic holds in all (it starts empty)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap)
    await consumer.start()
    try:
        return sum((await consumer.end_offsets(await partitions(kafka, topic))).values())
    finally:
        await consumer.stop()


async def create_order(engine: AsyncEngine, order_id: uuid.UUID) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            insert(Order).values(
                id=order_id,
                user_id="u-1",
                amount=Decimal("10.00"),
                description="x",
                status="NEW",
                created_at=utc_now(),
            )
        )


async def test_a_dead_letter_redriven_after_its_cause_is_fixed_completes_the_order_once(
    orders_db: str, engine: AsyncEngine, kafka: Kafka, topic: str, producer: AIOKafkaProducer
) -> None:
    dlq = dlq_topic(topic)
    group = f"redrive-{uuid.uuid4().hex[:8]}"
    early = uuid.uuid4()  # its payment result arrives before the order exists
    traceparent = b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"
    await producer.send_and_wait(
        topic, value=result(early, "PAID"), key=b"u-1", headers=[("traceparent", traceparent)]
    )
    consumer_group = f"g-{uuid.uuid4().hex[:8]}"
    async with running_consumer(
        orders_db, kafka, topic, consumer_group, PaymentProcessed, make_handler
    ):

        async def dead_lettered() -> bool:
            return await end_offsets(kafka, dlq) == 1

        await until(dead_lettered, 30, "the result to be dead-lettered")
        letters, total = await list_dead_letters(kafka.bootstrap, dlq)
        assert total == 1
        (letter,) = letters
        assert letter.reason == f"rejected: no order {early}"
        assert letter.origin.startswith(f"{topic}/")
        assert letter.order_id == str(early)
        assert letter.key == b"u-1"
        assert letter.redrives == 0

        # A dry run shows it and publishes nothing.
        dry = await redrive(kafka.bootstrap, dlq, group=group, dry_run=True)
        assert [d.offset for d in dry.redriven] == [letter.offset]
        assert await end_offsets(kafka, topic) == 1
        assert await redrive_cursor(kafka.bootstrap, dlq, group=group) == {0: None, 1: None}

        # The cause is fixed (the order now exists); the redrive completes it.
        await create_order(engine, early)
        before = DLQ_REDRIVEN.labels(topic)._value.get()
        first = await redrive(kafka.bootstrap, dlq, group=group)
        assert [d.offset for d in first.redriven] == [letter.offset]
        assert DLQ_REDRIVEN.labels(topic)._value.get() == before + 1

        async def finished() -> bool:
            return (await order_state(engine, early))[0] == "FINISHED"

        await until(finished, 30, "the redriven result to finish the order")

        # A second redrive finds nothing new and publishes nothing.
        second = await redrive(kafka.bootstrap, dlq, group=group)
        assert second.redriven == []
        assert await end_offsets(kafka, topic) == 2
        assert await end_offsets(kafka, dlq) == 1
    assert await order_state(engine, early) == ("FINISHED", None)

    # The redriven copy: same key, value and trace context, no dead-letter headers, and
    # where it came from.
    records = await consume(kafka.bootstrap, topic, at_least=2)
    copies = [r for r in records if REDRIVEN_FROM in dict(r.headers)]
    assert len(copies) == 1
    copy = copies[0]
    headers = dict(copy.headers)
    assert headers[REDRIVEN_FROM] == f"{dlq}/{letter.partition}/{letter.offset}".encode()
    assert headers[REDRIVE_COUNT] == b"1"
    assert headers["traceparent"] == traceparent
    assert not [key for key in headers if key.startswith("x-dlq-")]
    assert (copy.key, copy.value) == (letter.key, letter.value)


async def test_since_passes_over_older_dead_letters_and_limit_leaves_the_rest(
    kafka: Kafka, topic: str, producer: AIOKafkaProducer
) -> None:
    dlq = dlq_topic(topic)
    group = f"redrive-{uuid.uuid4().hex[:8]}"
    await producer.send_and_wait(dlq, value=b"old", key=b"k", headers=[("x-dlq-reason", b"a")])
    cut = datetime.now(UTC)
    await asyncio.sleep(0.01)  # the next records' timestamps are after the cut
    for n in range(3):
        await producer.send_and_wait(dlq, value=f"new-{n}".encode(), key=b"k")
    first = await redrive(kafka.bootstrap, dlq, group=group, since=cut, limit=2)
    assert [letter.value for letter in first.redriven] == [b"new-0", b"new-1"]
    assert (first.passed_over, first.remaining) == (1, 1)
    rest = await redrive(kafka.bootstrap, dlq, group=group)
    assert [letter.value for letter in rest.redriven] == [b"new-2"]
    assert (await redrive(kafka.bootstrap, dlq, group=group)).redriven == []
    listed, total = await list_dead_letters(kafka.bootstrap, dlq, limit=2)
    assert total == 4
    assert [letter.value for letter in listed] == [b"old", b"new-0"]


def test_since_reads_a_time_or_an_age() -> None:
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    assert parse_since("15m", now=now) == now - timedelta(minutes=15)
    assert parse_since("2026-11-25T10:00:00") == datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
    with pytest.raises(ValueError, match="not a time"):
        parse_since("yesterday")


def gozon(*args: str, bootstrap: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gozon.cli", *args],
        env={**os.environ, "GOZON_KAFKA_BOOTSTRAP_SERVERS": bootstrap},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_the_cli_lists_dead_letters_and_names_an_unreachable_broker(
    kafka: Kafka, producer: AIOKafkaProducer
) -> None:
    dlq = dlq_topic(PAYMENT_PROCESSED_TOPIC)
    await create_topics_async(kafka.bootstrap, PAYMENT_PROCESSED_TOPIC, dlq)
    since = datetime.now(UTC).isoformat()
    key = f"cli-{uuid.uuid4().hex[:8]}".encode()
    await producer.send_and_wait(
        dlq, value=b"{}", key=key, headers=[("x-dlq-reason", b"invalid message: test")]
    )
    listed = await asyncio.to_thread(
        gozon, "orders", "dlq", "list", "--since", since, bootstrap=kafka.bootstrap
    )
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith(f"{dlq}: ")
    assert key.decode() in listed.stdout
    assert "invalid message: test" in listed.stdout

    down = await asyncio.to_thread(gozon, "orders", "dlq", "list", bootstrap="127.0.0.1:1")
    assert down.returncode == 2
    assert down.stderr.startswith("gozon: Kafka at 127.0.0.1:1 is unreachable")
    assert "Traceback" not in down.stderr

    unknown = await asyncio.to_thread(gozon, "shipping", "dlq", "list", bootstrap="127.0.0.1:1")
    assert unknown.returncode == 2
    assert "invalid choice: 'shipping'" in unknown.stderr
