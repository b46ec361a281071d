"""One trace per order across the real Kafka hop: HTTP → outbox row → relay publish → Kafka
headers → consumer → the next outbox row, joined by parent links (and span links for the
relay's batches)."""

from __future__ import annotations

import uuid

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from gozon.contracts import ORDER_CREATED_TOPIC, OrderCreated
from gozon.core.settings import OrdersSettings, PaymentsSettings
from gozon.messaging.kafka import dlq_topic
from gozon.orders.api import build_app as orders_app
from gozon.payments.api import build_app as payments_app
from gozon.payments.consumer import make_handler
from gozon.payments.models import payment_outbox
from scripts.stack import Kafka
from tests.conftest import running_consumer, serve, until
from tests.integration.test_relay import create_topics_async, running_relay

pytestmark = pytest.mark.integration


def by_name(spans: list[ReadableSpan], name: str, trace_id: int) -> ReadableSpan:
    found = [s for s in spans if s.name == name and s.context.trace_id == trace_id]
    assert len(found) == 1, f"{name}: {[s.name for s in spans if s.context.trace_id == trace_id]}"
    return found[0]


async def test_an_order_is_one_trace_across_the_kafka_hop(
    orders_db: str, payments_db: str, kafka: Kafka, spans: InMemorySpanExporter
) -> None:
    await create_topics_async(kafka.bootstrap, ORDER_CREATED_TOPIC, dlq_topic(ORDER_CREATED_TOPIC))
    user = f"u-{uuid.uuid4().hex[:10]}"
    async with serve(payments_app(PaymentsSettings(payments_database_url=payments_db))) as pay:
        assert (
            await pay.post("/api/payments/deposit?amount=100", headers={"X-User-Id": user})
        ).status_code == 200
    async with serve(orders_app(OrdersSettings(orders_database_url=orders_db))) as orders:
        created = await orders.post(
            "/api/orders", headers={"X-User-Id": user}, json={"amount": 10, "description": "traced"}
        )
    order_id = uuid.UUID(created.json()["id"])

    orders_engine = create_async_engine(orders_db)
    payments_engine = create_async_engine(payments_db)
    try:
        async with (
            running_relay(orders_engine, kafka.bootstrap),
            running_consumer(
                payments_db,
                kafka,
                ORDER_CREATED_TOPIC,
                f"g-{uuid.uuid4().hex[:8]}",
                OrderCreated,
                make_handler,
            ),
        ):

            async def payment_headers() -> dict[str, str] | None:
                async with payments_engine.connect() as conn:
                    found: dict[str, str] | None = await conn.scalar(
                        select(payment_outbox.c.headers).where(
                            payment_outbox.c.order_id == order_id
                        )
                    )
                return found

            async def paid() -> bool:
                return await payment_headers() is not None

            await until(paid, 20, "the order to be paid")
            headers = await payment_headers()
            assert headers is not None
    finally:
        await orders_engine.dispose()
        await payments_engine.dispose()

    finished = list(spans.get_finished_spans())
    server = next(s for s in finished if s.name == "POST /api/orders" and s.kind == SpanKind.SERVER)
    trace_id = server.context.trace_id
    publish = by_name(finished, f"{ORDER_CREATED_TOPIC} publish", trace_id)
    process = by_name(finished, f"{ORDER_CREATED_TOPIC} process", trace_id)
    assert publish.kind == SpanKind.PRODUCER
    assert process.kind == SpanKind.CONSUMER
    assert publish.parent is not None
    assert publish.parent.span_id == server.context.span_id  # the row carried the HTTP span
    assert process.parent is not None
    assert process.parent.span_id == publish.context.span_id  # the Kafka headers carried it
    # The payment's outbox row continues the same trace, from inside the consumer's span.
    assert headers["traceparent"].split("-")[1] == format(trace_id, "032x")
    batch = [
        s
        for s in finished
        if s.name == "order_outbox relay batch"
        and any(link.context.trace_id == trace_id for link in s.links)
    ]
    assert len(batch) == 1  # the batch's span links to the order's trace
