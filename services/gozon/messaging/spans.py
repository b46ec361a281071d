"""Messaging spans, named and described as the OpenTelemetry semantic conventions say (v1.44).

    relay, one per outbox row      PRODUCER  `send <topic>`     operation send/send
    consumer, one per message      CONSUMER  `process <topic>`  operation process/process
    consumer, one per batch        CONSUMER  `process <topic>`  process/process, batch count
    relay, one per poll            INTERNAL  `<outbox> relay batch`  background (see below)

Both sides carry `messaging.system` (kafka), `messaging.destination.name`,
`messaging.destination.partition.id`, `messaging.kafka.offset` (with its partition: an offset
means nothing alone), `messaging.kafka.message.key`, `messaging.message.id` (the envelope's
`event_id`, the idempotency key), and `server.address` / `server.port`: the partition
leader's, else a known broker's (`broker_address`). The producer learns the partition and
offset from the broker's acknowledgement and sets them just before its span ends; the consumer
adds `messaging.consumer.group.name`.

A consumer handles a partition's fetched batch in one transaction: the batch's own `process`
span (`batch_process_span`, with `messaging.batch.message_count`) holds its statements, is a
child of the first message's span and links to every message's span.

The relay's batch span is background work (`gozon.core.telemetry.BACKGROUND`): a root span
that is dropped, with the claim, the marking and the commit under it, unless
`GOZON_TRACE_BACKGROUND_DB=true`. The rows' own traces never depend on it: each PRODUCER span
continues the context stored in its row, and the batch span links to those contexts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.cluster import ClusterMetadata
from aiokafka.structs import ConsumerRecord, TopicPartition
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from gozon.core.telemetry import BACKGROUND, get_tracer

tracer = get_tracer("gozon.messaging")

SYSTEM = "kafka"


def send_name(topic: str) -> str:
    return f"send {topic}"


def process_name(topic: str) -> str:
    return f"process {topic}"


def broker_address(
    cluster: ClusterMetadata | None, topic: str, partition: int | None
) -> dict[str, str | int]:
    """`server.address` / `server.port`: the partition's leader, else any broker the client
    knows (empty before the client's first metadata)."""
    if cluster is None:
        return {}
    broker = None
    if partition is not None:
        leader = cluster.leader_for_partition(TopicPartition(topic, partition))
        if leader is not None and leader >= 0:
            broker = cluster.broker_metadata(leader)
    if broker is None:
        broker = min(cluster.brokers(), default=None, key=lambda b: b.nodeId)
    if broker is None:
        return {}
    return {"server.address": broker.host, "server.port": broker.port}


def consumer_cluster(consumer: AIOKafkaConsumer) -> ClusterMetadata | None:
    """The consumer's view of the cluster (aiokafka keeps its client in a private attribute)."""
    client = getattr(consumer, "_client", None)
    cluster = getattr(client, "cluster", None)
    return cluster if isinstance(cluster, ClusterMetadata) else None


def _common(topic: str, key: bytes | str | None, message_id: str) -> dict[str, str | int]:
    attributes: dict[str, str | int] = {
        "messaging.system": SYSTEM,
        "messaging.destination.name": topic,
    }
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
    cluster: ClusterMetadata | None = None,
    attributes: Mapping[str, str | int] | None = None,
) -> Span:
    """A PRODUCER span for one message, continuing `context` (the row's stored trace).

    End it with `end_send_span` once the broker has answered (which sets the partition's
    leader as `server.*`; a known broker until then).
    """
    return tracer.start_span(
        send_name(topic),
        context=context,
        kind=SpanKind.PRODUCER,
        attributes={
            **_common(topic, key, message_id),
            "messaging.operation.name": "send",
            "messaging.operation.type": "send",
            **broker_address(cluster, topic, None),
            **(attributes or {}),
        },
    )


def end_send_span(
    span: Span,
    delivery: asyncio.Future[Any] | BaseException,
    cluster: ClusterMetadata | None = None,
) -> None:
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
        span.set_attributes(broker_address(cluster, metadata.topic, metadata.partition))
    span.end()


def consumer_group(consumer: AIOKafkaConsumer) -> str | None:
    """The consumer's group id (aiokafka keeps it only in a private attribute)."""
    group = getattr(consumer, "_group_id", None)
    return group if isinstance(group, str) else None


def process_attributes(
    record: ConsumerRecord[bytes, bytes],
    *,
    group: str | None,
    message_id: str,
    cluster: ClusterMetadata | None = None,
) -> dict[str, str | int]:
    attributes: dict[str, str | int] = {
        **_common(record.topic, record.key, message_id),
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.partition.id": str(record.partition),
        "messaging.kafka.offset": record.offset,
        **broker_address(cluster, record.topic, record.partition),
    }
    if group:
        attributes["messaging.consumer.group.name"] = group
    return attributes


def start_process_span(
    record: ConsumerRecord[bytes, bytes],
    *,
    context: Context,
    group: str | None,
    message_id: str,
    cluster: ClusterMetadata | None = None,
) -> Span:
    """A CONSUMER span for one message, a child of its producer's; the caller ends it (a
    batch's messages are handled together, each keeping its own span)."""
    return tracer.start_span(
        process_name(record.topic),
        context=context,
        kind=SpanKind.CONSUMER,
        attributes=process_attributes(record, group=group, message_id=message_id, cluster=cluster),
    )


def batch_process_span(
    topic: str,
    partition: int,
    messages: Sequence[Span],
    *,
    group: str | None,
    cluster: ClusterMetadata | None = None,
) -> AbstractContextManager[Span]:
    """The current span while a partition's batch is handled: CONSUMER `process <topic>`, with
    `messaging.batch.message_count`, a child of the first message's span, linked to each
    message's span (the statements inside it belong to every message of the batch)."""
    attributes: dict[str, str | int] = {
        "messaging.system": SYSTEM,
        "messaging.destination.name": topic,
        "messaging.destination.partition.id": str(partition),
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.batch.message_count": len(messages),
        **broker_address(cluster, topic, partition),
    }
    if group:
        attributes["messaging.consumer.group.name"] = group
    return tracer.start_as_current_span(
        process_name(topic),
        context=trace.set_span_in_context(messages[0]),
        kind=SpanKind.CONSUMER,
        links=[Link(span.get_span_context()) for span in messages],
        attributes=attributes,
    )


@asynccontextmanager
async def relay_batch_span(outbox: str) -> AsyncIterator[Span]:
    """The current span of one relay poll: the claim, the sends, the marking, the commit
    (async, to share one `async with` with the session and its transaction)."""
    with tracer.start_as_current_span(
        f"{outbox} relay batch", attributes={BACKGROUND: True}
    ) as span:
        yield span
