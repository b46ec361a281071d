"""Traces on the real hops, with the spans an OTLP exporter would get (kept in memory here).

An order goes through the gateway (in-process) to the orders API (uvicorn on a socket), its
outbox row through the orders relay, Kafka, the payments consumer, the payment's outbox row,
the payments relay, Kafka again and the orders consumer. Its trace holds every hop and the
statements each ran, joined by parent ids, with the attributes the OpenTelemetry semantic
conventions (v1.44) name; and nothing else is exported meanwhile. An idle platform (relays
polling and pruning, wake-up notifications, scrape-time gauges) exports nothing at all unless
background tracing is switched on, and then its polls are whole traces: claim, commit and
pruning inside the poll's span.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import Table, insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from devstack import Kafka
from gozon.contracts import (
    ORDER_CREATED_TOPIC,
    PAYMENT_PROCESSED_TOPIC,
    OrderCreated,
    PaymentProcessed,
)
from gozon.core.db import create_engine
from gozon.core.telemetry import SCHEMA_URL, QuietBackground, package_version
from gozon.gateway.app import build_app as gateway_app
from gozon.gateway.settings import GatewaySettings
from gozon.messaging.kafka import dlq_topic, new_producer
from gozon.messaging.relay import OutboxRelay, RelayConfig
from gozon.messaging.wakeup import OutboxNotifier, channel_for
from gozon.orders.api import build_app as orders_app
from gozon.orders.consumer import make_handler as orders_handler
from gozon.orders.models import Order, order_outbox
from gozon.orders.settings import OrdersSettings
from gozon.payments.api import build_app as payments_app
from gozon.payments.consumer import make_handler as payments_handler
from gozon.payments.models import payment_outbox
from gozon.payments.settings import PaymentsSettings
from tests.conftest import running_consumer, serve, until
from tests.integration.conftest import create_topics_async
from tests.integration.test_gateway import uvicorn_serving
from tests.integration.test_relay_batch import relay_for

pytestmark = pytest.mark.integration

# An order's trace here (docs/observability.md, "Only traces that mean something"): 9 hops
# (gateway SERVER and CLIENT, the API's SERVER, send/process and the batch's process span on
# both topics) and the statements they ran.
ORDER_TRACE_SPANS = 17
ORDER_TRACE_STATEMENTS = 8

TOPICS = (
    ORDER_CREATED_TOPIC,
    PAYMENT_PROCESSED_TOPIC,
    dlq_topic(ORDER_CREATED_TOPIC),
    dlq_topic(PAYMENT_PROCESSED_TOPIC),
)


@contextlib.asynccontextmanager
async def relaying(
    engine: AsyncEngine, table: Table, bootstrap: str, config: RelayConfig
) -> AsyncIterator[OutboxRelay]:
    """A relay on `table`, as `gozon … relay` runs one."""
    producer = new_producer(bootstrap, client_id=f"test-{table.name}")
    await producer.start()
    relay = OutboxRelay(
        table=table,
        producer=producer,
        config=config,
        database_url=engine.url.render_as_string(hide_password=False),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        yield relay
    finally:
        stop.set()
        await task
        await producer.stop()


async def group_starts_at_end(bootstrap: str, group: str, topic: str) -> None:
    """Commits the topic's end offsets for `group`: its consumers skip the events the
    session's other tests left there (their traces are not this test's)."""
    producer = new_producer(bootstrap, client_id="test-metadata")
    await producer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in await producer.partitions_for(topic)]
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.commit(await consumer.end_offsets(partitions))
    finally:
        await consumer.stop()


def counting_polls(relay: OutboxRelay) -> list[int]:
    """Counts the relay's polls (each claims, marks, commits, then prunes when due)."""
    polls = [0]
    poll = relay.publish_batch

    async def counted() -> int:
        polls[0] += 1
        return await poll()

    relay.publish_batch = counted  # type: ignore[method-assign]
    return polls


def one(spans: Sequence[ReadableSpan], name: str, kind: SpanKind) -> ReadableSpan:
    found = [s for s in spans if s.name == name and s.kind == kind]
    assert len(found) == 1, f"{name}: {sorted(s.name for s in spans)}"
    return found[0]


def parent_of(span: ReadableSpan, spans: Sequence[ReadableSpan]) -> ReadableSpan:
    assert span.parent is not None, span.name
    return next(s for s in spans if s.context.span_id == span.parent.span_id)


def is_statement(span: ReadableSpan) -> bool:
    return span.kind == SpanKind.CLIENT and "db.system.name" in (span.attributes or {})


def is_batch(span: ReadableSpan) -> bool:
    return "messaging.batch.message_count" in (span.attributes or {})


def only(spans: Sequence[ReadableSpan], name: str, kind: SpanKind, *, batch: bool) -> ReadableSpan:
    """The one span of that name and kind that is (or is not) a consumer's batch span."""
    return one([s for s in spans if is_batch(s) == batch], name, kind)


async def test_an_orders_trace_holds_its_hops_and_statements_with_current_conventions(
    orders_db: str, payments_db: str, kafka: Kafka, spans: InMemorySpanExporter, logs_dir: Path
) -> None:
    await create_topics_async(kafka.bootstrap, *TOPICS)
    user = f"u-{uuid.uuid4().hex[:10]}"
    async with serve(payments_app(PaymentsSettings(payments_database_url=payments_db))) as pay:
        deposit = await pay.post("/api/payments/deposit?amount=100", headers={"X-User-Id": user})
        assert deposit.status_code == 200
    orders_engine = create_engine(orders_db, pool_size=2, pre_ping=False)
    payments_engine = create_engine(payments_db, pool_size=2, pre_ping=False)
    group = f"g-{uuid.uuid4().hex[:8]}"
    config = RelayConfig(fallback_poll=0.2)
    orders_api = orders_app(OrdersSettings(orders_database_url=orders_db))
    for topic in (ORDER_CREATED_TOPIC, PAYMENT_PROCESSED_TOPIC):
        await group_starts_at_end(kafka.bootstrap, group, topic)
    try:
        async with (
            uvicorn_serving(orders_api) as orders_url,
            serve(
                gateway_app(
                    GatewaySettings(gateway_orders_url=orders_url, gateway_payments_url=orders_url)
                )
            ) as gateway,
            relaying(orders_engine, order_outbox, kafka.bootstrap, config),
            relaying(payments_engine, payment_outbox, kafka.bootstrap, config),
            running_consumer(
                payments_db, kafka, ORDER_CREATED_TOPIC, group, OrderCreated, payments_handler
            ),
            running_consumer(
                orders_db, kafka, PAYMENT_PROCESSED_TOPIC, group, PaymentProcessed, orders_handler
            ),
        ):
            spans.clear()  # from here on, only the order's spans may be exported
            created = await gateway.post(
                "/api/orders",
                headers={"X-User-Id": user},
                json={"amount": 10, "description": "traced"},
            )
            assert created.status_code == 201, created.text
            order_id = uuid.UUID(created.json()["id"])
            trace_id = int(created.headers["x-trace-id"], 16)

            async def finished() -> bool:
                async with orders_engine.connect() as conn:
                    status = await conn.scalar(select(Order.status).where(Order.id == order_id))
                return status == "FINISHED"

            await until(finished, 30, "the order to be FINISHED")

            async def last_hop_ended() -> bool:
                return any(
                    s.name == f"process {PAYMENT_PROCESSED_TOPIC}"
                    for s in spans.get_finished_spans()
                )

            await until(last_hop_ended, 10, "the orders consumer's span to end")
    finally:
        await orders_engine.dispose()
        await payments_engine.dispose()

    exported = list(spans.get_finished_spans())
    # The export, as OTLP would carry it, kept with the run's logs for a reader to look at.
    (logs_dir / "order-trace.json").write_text(
        "[\n" + ",\n".join(span.to_json() for span in exported) + "\n]\n", encoding="utf-8"
    )
    # Nothing but the order's trace: no relay poll, claim, commit, notification or pruning.
    assert {s.context.trace_id for s in exported} == {trace_id}, sorted(
        (s.name, format(s.context.trace_id, "032x")) for s in exported
    )
    # One root (the gateway's server span); every other span's parent is in the trace.
    ids = {s.context.span_id for s in exported}
    roots = [s for s in exported if s.parent is None]
    assert [r.name for r in roots] == ["POST /api/orders/**"]
    assert all(s.parent.span_id in ids for s in exported if s.parent is not None)

    edge = roots[0]
    assert edge.kind == SpanKind.SERVER
    assert edge.attributes is not None
    assert edge.attributes["http.request.method"] == "POST"
    assert edge.attributes["http.route"] == "/api/orders/**"
    assert edge.attributes["http.response.status_code"] == 201

    client = one(exported, "POST", SpanKind.CLIENT)
    assert parent_of(client, exported) is edge
    assert client.attributes is not None
    assert client.attributes["http.request.method"] == "POST"
    assert client.attributes["url.full"] == f"{orders_url}/api/orders"
    assert client.attributes["server.address"] == "127.0.0.1"
    assert client.attributes["server.port"] == int(orders_url.rsplit(":", 1)[1])
    assert client.attributes["http.response.status_code"] == 201

    api = one(exported, "POST /api/orders", SpanKind.SERVER)
    assert parent_of(api, exported) is client  # the CLIENT span's context went upstream
    assert api.attributes is not None
    assert api.attributes["http.route"] == "/api/orders"
    assert api.attributes["http.request.method"] == "POST"

    # Every statement sits under a hop, in the current names: a server span, or a consumer's
    # batch span (the batch's one transaction), itself a child of the message's CONSUMER span.
    # Each is named by its query summary (`INSERT orders`, `BEGIN`), never by a bare first
    # word such as `WITH` or `BEGIN;`.
    statements = [s for s in exported if is_statement(s)]
    assert statements
    for statement in statements:
        hop = parent_of(statement, exported)
        if is_batch(hop):
            message = parent_of(hop, exported)
            assert any(link.context.span_id == message.context.span_id for link in hop.links)
            hop = message
        assert hop.kind in (SpanKind.SERVER, SpanKind.CONSUMER)
        attributes = statement.attributes or {}
        assert attributes["db.system.name"] == "postgresql"
        assert attributes["db.query.text"]
        assert attributes["server.address"]
        assert attributes["db.query.summary"] == statement.name
        assert attributes["db.operation.name"] == statement.name.split()[0]
        assert not statement.name.endswith(";"), statement.name
        assert statement.name != "WITH", statement.name
        if statement.name.split()[0] in ("SELECT", "INSERT", "UPDATE", "DELETE"):
            assert attributes["db.collection.name"] == statement.name.split()[1], statement.name
        assert "db.statement" not in attributes
        assert "net.peer.name" not in attributes
    assert any(parent_of(s, exported) is api for s in statements)
    summaries = {s.name for s in statements}
    # the order and its outbox row: one statement, a CTE (`WITH inserted AS (INSERT …)`)
    assert any(name.startswith("INSERT orders INSERT order_outbox") for name in summaries), (
        summaries
    )
    assert "COMMIT" in summaries, summaries
    assert any(name.startswith("BEGIN") for name in summaries), summaries
    other = [s for s in exported if not is_statement(s)]
    assert sorted(s.name for s in other) == sorted(
        [
            "POST /api/orders/**",
            "POST",
            "POST /api/orders",
            f"send {ORDER_CREATED_TOPIC}",
            f"process {ORDER_CREATED_TOPIC}",
            f"process {ORDER_CREATED_TOPIC}",  # the message's, and its batch's
            f"send {PAYMENT_PROCESSED_TOPIC}",
            f"process {PAYMENT_PROCESSED_TOPIC}",
            f"process {PAYMENT_PROCESSED_TOPIC}",
        ]
    )
    # docs/observability.md gives these figures: keep them true
    assert (len(exported), len(statements)) == (ORDER_TRACE_SPANS, ORDER_TRACE_STATEMENTS), sorted(
        s.name for s in exported
    )

    # Every span says which service, version, namespace and environment made it, and the
    # project's own spans which conventions they follow.
    for span in exported:
        resource = dict(span.resource.attributes)
        assert resource["service.name"] == "gozon-tests"
        assert resource["service.namespace"] == "gozon"
        assert resource["service.version"] == package_version() != "0+unknown"
        assert resource["deployment.environment.name"] == "local"
        assert span.resource.schema_url == SCHEMA_URL
        if not is_statement(span):
            assert span.instrumentation_scope is not None
            assert span.instrumentation_scope.schema_url == SCHEMA_URL, span.name

    broker_host, broker_port = kafka.bootstrap.rsplit(":", 1)
    for topic in (ORDER_CREATED_TOPIC, PAYMENT_PROCESSED_TOPIC):
        send = one(exported, f"send {topic}", SpanKind.PRODUCER)
        process = only(exported, f"process {topic}", SpanKind.CONSUMER, batch=False)
        assert parent_of(process, exported) is send  # the Kafka headers carried it
        batch = only(exported, f"process {topic}", SpanKind.CONSUMER, batch=True)
        assert parent_of(batch, exported) is process  # a batch of one: this message's
        assert any(is_statement(s) and parent_of(s, exported) is batch for s in exported)
        assert [link.context.span_id for link in batch.links] == [process.context.span_id]
        sent, got = dict(send.attributes or {}), dict(process.attributes or {})
        batched = dict(batch.attributes or {})
        assert batched["messaging.batch.message_count"] == 1
        assert batched["messaging.consumer.group.name"] == group
        for attributes, operation in ((sent, "send"), (got, "process"), (batched, "process")):
            assert attributes["messaging.system"] == "kafka"
            assert attributes["messaging.destination.name"] == topic
            assert attributes["messaging.operation.name"] == operation
            assert attributes["messaging.operation.type"] == operation
            assert attributes["server.address"] == broker_host
            assert attributes["server.port"] == int(broker_port)
            assert (
                attributes["messaging.destination.partition.id"]
                == (got["messaging.destination.partition.id"])
            )
        for attributes in (sent, got):
            assert attributes["messaging.kafka.message.key"] == user
        assert got["messaging.consumer.group.name"] == group
        # The same message on both sides: its id, its partition and its offset there.
        assert sent["messaging.message.id"] == got["messaging.message.id"]
        uuid.UUID(str(got["messaging.message.id"]))
        assert (
            sent["messaging.destination.partition.id"] == got["messaging.destination.partition.id"]
        )
        assert isinstance(got["messaging.destination.partition.id"], str)
        assert sent["messaging.kafka.offset"] == got["messaging.kafka.offset"]
        assert isinstance(got["messaging.kafka.offset"], int)
    # The payment's outbox row was written inside the payments consumer's span.
    assert parent_of(
        one(exported, f"send {PAYMENT_PROCESSED_TOPIC}", SpanKind.PRODUCER), exported
    ) is only(exported, f"process {ORDER_CREATED_TOPIC}", SpanKind.CONSUMER, batch=False)


@contextlib.asynccontextmanager
async def notifications_counted(database_url: str, channel: str) -> AsyncIterator[list[int]]:
    """Counts the notifications on `channel` (on a connection of the test's own)."""
    url = make_url(database_url).set(drivername="postgresql")
    conn = await asyncpg.connect(url.render_as_string(hide_password=False))
    count = [0]

    def received(*_: Any) -> None:
        count[0] += 1

    await conn.add_listener(channel, received)
    try:
        yield count
    finally:
        await conn.close()


async def background_work(
    orders_db: str,
    payments_db: str,
    kafka: Kafka,
    *,
    polls: int,
    notifications: int,
    done: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Both relays poll (and prune, every poll) `polls` times or more with nothing to do,
    the orders API's notifier sends `notifications` wake-ups, the scrape-time gauges are
    computed, both consumers wait on their empty topics."""
    orders_engine = create_engine(orders_db, pool_size=2, pre_ping=False)
    payments_engine = create_engine(payments_db, pool_size=2, pre_ping=False)
    config = RelayConfig(fallback_poll=0.02, prune_interval=0.0)
    group = f"g-{uuid.uuid4().hex[:8]}"
    # Topics of their own, empty: the session's other tests leave events in the real ones.
    idle_topics = [f"idle-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    await create_topics_async(kafka.bootstrap, *idle_topics)
    notifier = OutboxNotifier(orders_db, order_outbox.name)
    try:
        async with (
            relaying(orders_engine, order_outbox, kafka.bootstrap, config) as orders_relay,
            relaying(payments_engine, payment_outbox, kafka.bootstrap, config) as payments_relay,
            running_consumer(
                payments_db, kafka, idle_topics[0], group, OrderCreated, payments_handler
            ),
            running_consumer(
                orders_db, kafka, idle_topics[1], group, PaymentProcessed, orders_handler
            ),
            notifications_counted(orders_db, channel_for(order_outbox.name)) as received,
            notifier.running(),
        ):
            counts = (counting_polls(orders_relay), counting_polls(payments_relay))
            for sent in range(1, notifications + 1):
                notifier.notify()

                async def arrived(sent: int = sent) -> bool:
                    return received[0] >= sent

                await until(arrived, 10, f"wake-up notification {sent}")
            for relay in (orders_relay, payments_relay):
                await relay.refresh_gauges()

            async def polled() -> bool:
                return min(count[0] for count in counts) >= polls

            await until(polled, 30, f"{polls} polls of each relay")
            if done is not None:
                await done()
    finally:
        await orders_engine.dispose()
        await payments_engine.dispose()


async def test_an_idle_platform_exports_no_spans(
    orders_db: str, payments_db: str, kafka: Kafka, spans: InMemorySpanExporter
) -> None:
    await create_topics_async(kafka.bootstrap, *TOPICS)
    spans.clear()
    await background_work(orders_db, payments_db, kafka, polls=20, notifications=5)
    assert list(spans.get_finished_spans()) == []


@contextlib.contextmanager
def background_traced() -> Any:
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    sampler = provider.sampler
    assert isinstance(sampler, QuietBackground)
    sampler.trace_background = True
    try:
        yield
    finally:
        sampler.trace_background = False


async def test_with_background_tracing_on_a_poll_is_one_trace_with_its_claim_and_commit(
    orders_db: str, payments_db: str, kafka: Kafka, spans: InMemorySpanExporter
) -> None:
    await create_topics_async(kafka.bootstrap, *TOPICS)
    spans.clear()
    with background_traced():
        await background_work(orders_db, payments_db, kafka, polls=3, notifications=1)
    exported = list(spans.get_finished_spans())
    batches = [s for s in exported if s.name == "order_outbox relay batch"]
    assert len(batches) >= 3
    # (the first poll's connection is new: the dialect's first-connect queries are in it too)
    last = batches[-1]
    inside = [s for s in exported if s.parent and s.parent.span_id == last.context.span_id]
    texts = [str((s.attributes or {}).get("db.query.text", "")) for s in inside]
    assert any("FOR UPDATE SKIP LOCKED" in text for text in texts), texts
    # The claim's transaction, begun and ended (an empty claim commits nothing), inside too.
    names = [s.name.rstrip(";") for s in inside]
    assert names[0] == "BEGIN", names
    assert names[-1] in ("COMMIT", "ROLLBACK"), names
    # The notifications and the pruning ran, traced too, as their own (background) roots.
    assert any("pg_notify" in str((s.attributes or {}).get("db.query.text", "")) for s in exported)
    assert any("DELETE" in s.name for s in exported)


async def test_the_pools_connection_check_is_not_traced(
    orders_db: str, spans: InMemorySpanExporter
) -> None:
    engine = create_engine(orders_db, pool_size=1, pre_ping=True)
    tracer = trace.get_tracer(__name__)
    try:
        with tracer.start_as_current_span("work"):
            for _ in range(3):  # the second and third checkouts are checked first
                async with engine.connect() as conn:
                    await conn.execute(select(Order.id).limit(1))
    finally:
        await engine.dispose()
    statements = [s for s in spans.get_finished_spans() if is_statement(s)]
    assert [s.name for s in statements].count("SELECT orders") == 3
    assert not [s for s in statements if (s.attributes or {}).get("db.query.text") == ";"]
    # one transaction per checkout's work, and the dialect's first-connect one; a traced
    # ping would add a BEGIN and a ROLLBACK to each checkout after the first
    names = [s.name for s in statements]
    assert names.count("BEGIN") == names.count("ROLLBACK") == 3 + 1, names


async def test_a_batch_span_links_to_each_rows_trace_only_when_background_tracing_is_on(
    orders_db: str, kafka: Kafka, spans: InMemorySpanExporter
) -> None:
    topic = f"test.relay.{uuid.uuid4().hex[:10]}"
    await create_topics_async(kafka.bootstrap, topic)
    engine = create_async_engine(orders_db)
    traces = [uuid.uuid4().hex for _ in range(4)]

    async def add_rows(trace_ids: Sequence[str]) -> None:
        async with engine.begin() as conn:
            for n, trace_id in enumerate(trace_ids):
                await conn.execute(
                    insert(order_outbox).values(
                        aggregate_id=f"order-{trace_id}",
                        event_type="OrderCreated",
                        topic=topic,
                        message_key=f"user-{n}",
                        payload={"event_id": trace_id},
                        headers={"traceparent": f"00-{trace_id}-{trace_id[:16]}-01"},
                    )
                )

    try:
        async with relay_for(engine, kafka.bootstrap) as relay:
            await add_rows(traces[:3])
            spans.clear()
            with background_traced():
                assert await relay.publish_batch() == 3
            (batch,) = [s for s in spans.get_finished_spans() if s.name.endswith("relay batch")]
            assert batch.attributes is not None
            assert batch.attributes["gozon.batch.rows"] == 3
            assert [format(link.context.trace_id, "032x") for link in batch.links] == traces[:3]

            await add_rows(traces[3:])
            spans.clear()
            assert await relay.publish_batch() == 1  # background tracing off: no batch span
            exported = spans.get_finished_spans()
            assert [s.name for s in exported] == [f"send {topic}"]  # the row's own, kept
            assert format(exported[0].context.trace_id, "032x") == traces[3]
    finally:
        await engine.dispose()
