"""One relay batch against the real PostgreSQL and Kafka: what the claim-and-mark leaves behind
when a publish fails in the middle, when the broker goes away, when the relay's connection is
dropped, and when two relays poll at once.

The claim marks its rows SENT in the statement that locks them; these tests show that nothing
but acknowledged rows ever commits as SENT.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, cast

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import Text, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from devstack import Kafka
from gozon.core.pg import is_database_outage
from gozon.messaging.kafka import new_producer
from gozon.messaging.relay import BrokerUnavailable, OutboxRelay, RelayConfig
from gozon.orders.models import order_outbox
from tests.integration.conftest import create_topics_async
from tests.integration.test_relay import consume, event_ids, insert_events

pytestmark = pytest.mark.integration

BeforeSend = Callable[[int, list["asyncio.Future[Any]"]], Awaitable[None]]


@pytest.fixture
async def engine(orders_db: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(orders_db)
    yield engine
    await engine.dispose()


@pytest.fixture
async def topic(kafka: Kafka) -> str:
    name = f"test.relay.{uuid.uuid4().hex[:10]}"
    await create_topics_async(kafka.bootstrap, name)
    return name


class HookedProducer:
    """The real producer, with a hook run before the n-th row (from 0) reaches it: to stop the
    broker, drop the relay's connection or hold a batch at a chosen point of a batch."""

    def __init__(self, producer: AIOKafkaProducer, before_send: BeforeSend) -> None:
        self.producer = producer
        self.before_send = before_send
        self.futures: list[asyncio.Future[Any]] = []

    @property
    def client(self) -> Any:  # what `broker_answers` asks
        return self.producer.client

    async def send(self, topic: str, **kwargs: Any) -> asyncio.Future[Any]:
        await self.before_send(len(self.futures), self.futures)
        future: asyncio.Future[Any] = await self.producer.send(topic, **kwargs)
        self.futures.append(future)
        return future


async def _nothing(n: int, futures: list[asyncio.Future[Any]]) -> None:
    return None


@asynccontextmanager
async def relay_for(
    engine: AsyncEngine,
    bootstrap: str,
    before_send: BeforeSend = _nothing,
    config: RelayConfig | None = None,
) -> AsyncIterator[OutboxRelay]:
    """A relay that is not running: the test calls `publish_batch` itself."""
    producer = new_producer(bootstrap, client_id=f"test-relay-{uuid.uuid4().hex[:6]}")
    await producer.start()
    relay = OutboxRelay(
        table=order_outbox,
        producer=cast(AIOKafkaProducer, HookedProducer(producer, before_send)),
        config=config or RelayConfig(),
        database_url=engine.url.render_as_string(hide_password=False),
    )
    try:
        yield relay
    finally:
        await relay.close()
        await producer.stop()


async def outbox_rows(engine: AsyncEngine) -> list[Any]:
    t = order_outbox
    async with engine.connect() as conn:
        result = await conn.execute(
            select(
                t.c.id,
                t.c.status,
                t.c.attempts,
                t.c.last_error,
                t.c.sent_at,
                t.c.next_attempt_at,
                t.c.payload["event_id"].astext.label("event_id"),
                func.now().label("now"),
            ).order_by(t.c.id)
        )
        return list(result.all())


async def insert_big(engine: AsyncEngine, topic: str) -> None:
    """A row the broker refuses (over its message size limit)."""
    async with engine.begin() as conn:
        await conn.execute(
            insert(order_outbox).values(
                aggregate_id="big",
                event_type="OrderCreated",
                topic=topic,
                message_key="user-big",
                payload={"event_id": "big", "padding": "x" * 2_000_000},
            )
        )


def assert_pending_as_claimed(row: Any) -> None:
    """A row put back without an attempt: as it was before the claim."""
    assert (row.status, row.attempts, row.last_error, row.sent_at) == ("PENDING", 0, None, None)
    assert row.next_attempt_at <= row.now


def assert_sent(row: Any) -> None:
    assert (row.status, row.attempts, row.last_error) == ("SENT", 0, None)
    assert isinstance(row.sent_at, datetime)


# --------------------------------------------------------------------------- tests


async def test_a_refused_row_in_the_middle_of_a_batch_alone_stays_pending_with_an_attempt(
    engine: AsyncEngine, kafka: Kafka, topic: str
) -> None:
    before = await insert_events(engine, topic, 3, keys=1)
    await insert_big(engine, topic)
    after = await insert_events(engine, topic, 3, keys=1)
    config = RelayConfig(max_attempts=5, backoff_base=30, backoff_max=60)
    async with relay_for(engine, kafka.bootstrap, config=config) as relay:
        assert await relay.publish_batch() == 7  # one batch, one transaction

    rows = await outbox_rows(engine)
    big = rows[3]
    assert big.event_id == "big"
    assert (big.status, big.attempts, big.sent_at) == ("PENDING", 1, None)
    assert "MessageSizeTooLarge" in big.last_error
    assert (big.next_attempt_at - big.now).total_seconds() > 20  # backoff_base 30 s from now
    for row in rows[:3] + rows[4:]:
        assert_sent(row)
    records = await consume(kafka.bootstrap, topic, at_least=6)
    assert event_ids(records) == [row.event_id for row in rows if row.event_id != "big"]
    assert set(event_ids(records)) == before | after  # in id order: one key, one partition


async def test_a_row_for_a_missing_topic_counts_an_attempt_and_the_rows_after_it_are_not_tried(
    engine: AsyncEngine, kafka: Kafka, topic: str
) -> None:
    # The broker answers, but the topic does not exist (auto-creation is off): a transient
    # error that is the message's fault. The rows after it wait for the next batch.
    await insert_events(engine, topic, 2, keys=1)
    await insert_events(engine, f"test.relay.missing.{uuid.uuid4().hex[:8]}", 1)
    await insert_events(engine, topic, 2, keys=1)
    config = RelayConfig(max_attempts=5, backoff_base=30, backoff_max=60)
    async with relay_for(engine, kafka.bootstrap, config=config) as relay:
        assert await relay.publish_batch() == 5  # no BrokerUnavailable: the broker answered

    rows = await outbox_rows(engine)
    assert_sent(rows[0])
    assert_sent(rows[1])
    assert (rows[2].status, rows[2].attempts, rows[2].sent_at) == ("PENDING", 1, None)
    assert rows[2].last_error
    assert_pending_as_claimed(rows[3])
    assert_pending_as_claimed(rows[4])


async def test_an_outage_in_the_middle_of_a_batch_leaves_the_unacknowledged_rows_pending_without_an_attempt(  # noqa: E501
    engine: AsyncEngine, private_kafka: Kafka, topic: str
) -> None:
    # The last three rows go to a topic the producer has no metadata for, so their send waits
    # for the broker and fails (after request_timeout_ms) once it is gone. (Messages already
    # enqueued when a broker dies are retried by aiokafka until it is back.)
    later = f"{topic}.later"
    await create_topics_async(private_kafka.bootstrap, topic)
    await insert_events(engine, topic, 3, keys=1)
    await insert_events(engine, later, 3, keys=1)

    async def stop_the_broker_at_the_fourth_row(n: int, futures: list[asyncio.Future[Any]]) -> None:
        if n == 3:
            await asyncio.gather(*futures)  # the first three are acknowledged
            await asyncio.to_thread(private_kafka.stop)

    async with relay_for(engine, private_kafka.bootstrap, stop_the_broker_at_the_fourth_row) as r:
        with pytest.raises(BrokerUnavailable):
            await r.publish_batch()

    rows = await outbox_rows(engine)
    for row in rows[:3]:
        assert_sent(row)  # acknowledged before the outage: committed SENT
    for row in rows[3:]:
        assert_pending_as_claimed(row)  # an outage burns no attempt


async def test_a_connection_dropped_in_the_middle_of_a_batch_leaves_every_row_pending(
    engine: AsyncEngine, kafka: Kafka, topic: str
) -> None:
    ids = await insert_events(engine, topic, 4, keys=1)

    async def drop_the_relays_connection(n: int, futures: list[asyncio.Future[Any]]) -> None:
        if n == 2:  # the first batch's third row (the second batch counts on from 4)
            await asyncio.gather(*futures)
            async with engine.connect() as conn:  # the server ends the relay's session
                ended = await conn.scalar(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                        "AND state = 'idle in transaction'"
                    )
                )
            assert ended == 1

    async with relay_for(engine, kafka.bootstrap, drop_the_relays_connection) as relay:
        # Lost at the COMMIT (or a RELEASE): asyncpg says so one way or another — closed,
        # or refused while it has read the server's FATAL goodbye but not yet its EOF.
        lost = (
            asyncpg.PostgresConnectionError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
        )
        with pytest.raises(lost) as raised:
            await relay.publish_batch()
        assert is_database_outage(raised.value)  # the relay's loop backs off and retries
        rows = await outbox_rows(engine)
        for row in rows:
            assert_pending_as_claimed(row)  # the claim's SENT died with the transaction

        assert await relay.publish_batch() == 4  # the next poll publishes them all
    for row in await outbox_rows(engine):
        assert_sent(row)
    records = await consume(kafka.bootstrap, topic, at_least=8)
    published = event_ids(records)
    # The first batch published all four (it learns of the loss only at its commit), the
    # second all four again: at least once, shown.
    assert sorted(published) == sorted([*ids, *ids])


async def test_two_relays_polling_at_once_never_claim_the_same_row(
    engine: AsyncEngine, kafka: Kafka, topic: str
) -> None:
    ids = await insert_events(engine, topic, 30, keys=3)
    holding = asyncio.Event()
    release = asyncio.Event()

    async def hold_the_first_batch(n: int, futures: list[asyncio.Future[Any]]) -> None:
        if n == 0:
            holding.set()
            await release.wait()

    config = RelayConfig(batch_size=10)
    async with (
        relay_for(engine, kafka.bootstrap, hold_the_first_batch, config) as first,
        relay_for(engine, kafka.bootstrap, config=config) as second,
    ):
        held = asyncio.create_task(first.publish_batch())
        await asyncio.wait_for(holding.wait(), 30)
        # The first relay holds rows 1–10, claimed and uncommitted: the second skips them
        # without waiting and takes the rest; nobody sees the held rows as SENT meanwhile.
        assert await asyncio.wait_for(second.publish_batch(), 30) == 10
        assert await asyncio.wait_for(second.publish_batch(), 30) == 10
        assert await asyncio.wait_for(second.publish_batch(), 30) == 0
        rows = await outbox_rows(engine)
        assert [row.status for row in rows] == ["PENDING"] * 10 + ["SENT"] * 20
        release.set()
        assert await held == 10
    rows = await outbox_rows(engine)
    assert {row.status for row in rows} == {"SENT"}
    records = await consume(kafka.bootstrap, topic, at_least=30)
    published = event_ids(records)
    assert sorted(published) == sorted(ids)  # each row once


async def test_a_row_goes_out_as_stored_with_its_ids_on_its_span_and_its_log_line(
    engine: AsyncEngine,
    kafka: Kafka,
    topic: str,
    spans: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The relay decodes no payload: the message's value is the row's JSON as PostgreSQL writes
    # it out, and the ids the span and the log line carry are read by the claim.
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    async with engine.begin() as conn:
        await conn.execute(
            insert(order_outbox).values(
                aggregate_id="order-7",
                event_type="OrderCreated",
                topic=topic,
                message_key="user-7",
                payload={"event_id": "event-7", "aggregate_id": "order-7", "amount": 1500.99},
                headers={"traceparent": f"00-{trace_id}-{parent}-01"},
            )
        )
        stored = await conn.scalar(select(order_outbox.c.payload.cast(Text)))
    spans.clear()
    with caplog.at_level(logging.INFO, logger="gozon.messaging.relay"):
        async with relay_for(engine, kafka.bootstrap) as relay:
            assert await relay.publish_batch() == 1

    (record,) = await consume(kafka.bootstrap, topic, at_least=1)
    assert isinstance(stored, str)
    assert record.value == stored.encode()
    assert json.loads(record.value) == {
        "event_id": "event-7",
        "aggregate_id": "order-7",
        "amount": 1500.99,
    }
    (send,) = [s for s in spans.get_finished_spans() if s.name == f"send {topic}"]
    assert send.attributes is not None
    assert send.attributes["messaging.message.id"] == "event-7"
    assert send.context.trace_id == int(trace_id, 16)  # it continues the row's trace
    assert send.parent is not None
    assert send.parent.span_id == int(parent, 16)
    assert dict(record.headers)["traceparent"].decode().split("-")[1] == trace_id
    published = [
        r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg["event"] == "published"
    ]
    assert len(published) == 1
    line = published[0]
    assert (line["event_id"], line["aggregate_id"], line["trace_id"], line["span_id"]) == (
        "event-7",
        "order-7",
        trace_id,
        parent,
    )
