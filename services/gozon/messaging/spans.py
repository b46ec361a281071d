"""Messaging spans, named and described as the OpenTelemetry semantic conventions say (v1.44).

    relay, one per outbox row      PRODUCER  `send <topic>`     operation send/send
    consumer, one per message      CONSUMER  `process <topic>`  operation process/process
    relay, one per poll            INTERNAL  `<outbox> relay batch`  background (see below)

Both sides carry `messaging.system` (kafka), `messaging.destination.name`,
`messaging.destination.partition.id`, `messaging.kafka.offset` (with its partition: an offset
means nothing alone), `messaging.kafka.message.key` and `messaging.message.id` (the envelope's
`event_id`, the idempotency key). The producer learns the partition and offset from the
broker's acknowledgement and sets them just before its span ends; the consumer adds
`messaging.consumer.group.name`.

The relay's batch span is background work (`gozon.core.telemetry.BACKGROUND`): a root span
that is dropped, with the claim, the marking and the commit under it, unless
`GOZON_TRACE_BACKGROUND_DB=true`. The rows' own traces never depend on it: each PRODUCER span
continues the context stored in its row, and the batch span links to those contexts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from gozon.core.telemetry import BACKGROUND

tracer = trace.get_tracer("gozon.messaging")

SYSTEM = "kafka"


def send_name(topic: str) -> str:
    return f"send {topic}"


def process_name(topic: str) -> str:
    return f"process {topic}"


def _common(topic: str, key: bytes | str | None, message_id: str) -> dict[str, str]:
    attributes = {"messaging.system": SYSTEM, "messaging.destination.name": topic}
    if key is not None:
        attributes["messaging.kafka.message.key"] = (
            key.decode("utf-8", "replace") if isinstance(key, bytes) else key
        )
    if message_id:
        attributes["messaging.message.id"] = message_id
    return attributes


def start_send_span(
    topic: str,
    *,
    key: str | None,
    message_id: str,
    context: Context,
    attributes: Mapping[str, str | int] | None = None,
) -> Span:
    """A PRODUCER span for one message, continuing `context` (the row's stored trace).

    End it with `end_send_span` once the broker has answered.
    """
    return tracer.start_span(
        send_name(topic),
        context=context,
        kind=SpanKind.PRODUCER,
        attributes={
            **_common(topic, key, message_id),
            "messaging.operation.name": "send",
            "messaging.operation.type": "send",
            **(attributes or {}),
        },
    )


def end_send_span(span: Span, delivery: asyncio.Future[Any] | BaseException) -> None:
    """Ends a PRODUCER span with the broker's answer: the partition and offset it gave the
    message (aiokafka's `RecordMetadata`), or the error, recorded on the span."""
    if isinstance(delivery, BaseException):
        error: BaseException | None = delivery
    elif delivery.cancelled():  # the producer was closed under it
        error = asyncio.CancelledError()
    else:
        error = delivery.exception()
    if error is not None:
        span.record_exception(error)
        span.set_attribute("error.type", type(error).__qualname__)
        span.set_status(Status(StatusCode.ERROR, repr(error)))
    elif isinstance(delivery, asyncio.Future):
        metadata = delivery.result()
        span.set_attribute("messaging.destination.partition.id", str(metadata.partition))
        span.set_attribute("messaging.kafka.offset", metadata.offset)
    span.end()


def consumer_group(consumer: AIOKafkaConsumer) -> str | None:
    """The consumer's group id (aiokafka keeps it only in a private attribute)."""
    group = getattr(consumer, "_group_id", None)
    return group if isinstance(group, str) else None


def process_attributes(
    record: ConsumerRecord[bytes, bytes], *, group: str | None, message_id: str
) -> dict[str, str | int]:
    attributes: dict[str, str | int] = {
        **_common(record.topic, record.key, message_id),
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.partition.id": str(record.partition),
        "messaging.kafka.offset": record.offset,
    }
    if group:
        attributes["messaging.consumer.group.name"] = group
    return attributes


@contextmanager
def process_span(
    record: ConsumerRecord[bytes, bytes],
    *,
    context: Context,
    group: str | None,
    message_id: str,
) -> Iterator[Span]:
    """The current CONSUMER span while one message is handled, a child of its producer's."""
    with tracer.start_as_current_span(
        process_name(record.topic),
        context=context,
        kind=SpanKind.CONSUMER,
        attributes=process_attributes(record, group=group, message_id=message_id),
    ) as span:
        yield span


@asynccontextmanager
async def relay_batch_span(outbox: str) -> AsyncIterator[Span]:
    """The current span of one relay poll: the claim, the sends, the marking, the commit
    (async, to share one `async with` with the session and its transaction)."""
    with tracer.start_as_current_span(
        f"{outbox} relay batch", attributes={BACKGROUND: True}
    ) as span:
        yield span
