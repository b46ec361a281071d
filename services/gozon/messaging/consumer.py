"""The consumer runner: record, effect, then commit the offset.

Guarantees:
- An offset is committed only after the handler's database transaction has committed (the
  handler commits; the runner commits the offset after it returns). A crash in between
  redelivers the message, and the handler's idempotency (an inbox row, a guarded status
  change) turns the redelivery into a counted duplicate.
- A message that cannot be parsed or validated is published to `<topic>.dlq`, with the reason
  and its origin in headers, and only then is its offset committed: it is never lost, and it
  never blocks the partition. A handler that finds a well-formed message impossible to handle
  raises `RejectMessage`, with the same effect.
- A transient failure (the database unreachable, or a handler's `RetryLater`) is retried with
  capped backoff, for as long as it lasts: never skipped. Any other handler error is retried
  a few times and then dead-lettered with its reason, so one poison message cannot stall
  every order behind it.
- Messages of one partition are handled one at a time, in offset order; the partitions of a
  fetched batch are handled side by side. Offsets are committed per partition after the
  records of the batch that were handled.
- A stop request (SIGTERM) is honoured between messages; an uncommitted message is simply
  delivered again to whoever owns the partition next.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Generic, TypeAlias, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError
from aiokafka.structs import ConsumerRecord
from opentelemetry import trace
from pydantic import BaseModel, ValidationError

from gozon.core.db import is_database_outage
from gozon.core.errors import RetryLater
from gozon.core.runtime import sleep_unless
from gozon.core.telemetry import context_from_headers
from gozon.messaging.kafka import dlq_topic, is_transient
from gozon.messaging.metrics import CONSUMER_HANDLE_SECONDS, CONSUMER_LAG, CONSUMER_MESSAGES
from gozon.messaging.spans import consumer_group, process_span

log = structlog.get_logger(__name__)
tracer = trace.get_tracer(__name__)

E = TypeVar("E", bound=BaseModel)
Record: TypeAlias = ConsumerRecord[bytes, bytes]
Handler = Callable[[E, Record], Awaitable[str]]
"""Handles one event in its own database transaction; returns "processed" or "duplicate"."""

DLQ_REASON = "x-dlq-reason"


class RejectMessage(Exception):
    """Raised by a handler for a well-formed message that can never be handled (it refers to
    something that does not exist, say): the message goes to the dead-letter topic at once."""


class _Stopping(Exception):
    """Raised inside the runner when a stop request interrupts a retry."""


class ConsumerRunner(Generic[E]):
    def __init__(
        self,
        *,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        topic: str,
        schema: type[E],
        handler: Handler[E],
        max_handler_attempts: int = 5,
        retry_backoff_max: float = 5.0,
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.topic = topic
        self.schema = schema
        self.handler = handler
        self.max_handler_attempts = max_handler_attempts
        self.retry_backoff_max = retry_backoff_max
        self.database_ok = True
        self._next_offsets: dict[TopicPartition, int] = {}
        # Every outcome's series exists from the start, so the first dead letter is an
        # increase from 0 that rate() and increase() can see, not a series appearing.
        for outcome in ("processed", "duplicate", "dead_lettered", "failed"):
            CONSUMER_MESSAGES.labels(topic, outcome)
        CONSUMER_LAG.labels(topic)

    async def run(self, stop: asyncio.Event) -> None:
        delay = 0.1
        while not stop.is_set():
            try:
                batches = await self.consumer.getmany(timeout_ms=200)
            except Exception as exc:
                # aiokafka reconnects by itself; a fetch error that says "the broker is not
                # there" is waited out, never a reason to end the process.
                if not is_transient(exc):
                    raise
                log.warning("kafka unavailable, fetching again", topic=self.topic, error=repr(exc))
                await sleep_unless(stop, delay)
                delay = min(delay * 2, self.retry_backoff_max)
                continue
            delay = 0.1
            # Partitions are independent (a key lives on one), so they are handled side by
            # side; within one, strictly in offset order.
            results = await asyncio.gather(
                *(self._partition(tp, records, stop) for tp, records in batches.items()),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, _Stopping):
                    return
                if isinstance(result, BaseException):
                    raise result
            self._update_lag()

    async def _partition(
        self, tp: TopicPartition, records: list[Record], stop: asyncio.Event
    ) -> None:
        """Handles one partition's records in order, then commits how far it got.

        Each handler has committed its transaction before the next record starts, so the
        offset committed at the end never runs ahead of the database. A crash before it
        redelivers records whose effects are already recorded: they count as duplicates.
        """
        done: int | None = None
        try:
            for record in records:
                if stop.is_set():
                    return
                await self.handle(record, stop)
                done = record.offset + 1
        finally:
            if done is not None:
                await self._commit(tp, done)

    async def _commit(self, tp: TopicPartition, offset: int) -> None:
        try:
            await self.consumer.commit({tp: offset})
        except (CommitFailedError, IllegalStateError) as exc:
            # The partition was revoked meanwhile: its new owner will see these records
            # again and find them already recorded.
            log.warning(
                "offset commit refused",
                topic=tp.topic,
                partition=tp.partition,
                offset=offset,
                error=repr(exc),
            )
            return
        self._next_offsets[tp] = offset

    async def handle(self, record: Record, stop: asyncio.Event) -> str:
        """Handles one record to its end: processed, duplicate or dead-lettered."""
        try:
            event = self.parse(record)
        except ValueError as exc:
            await self.dead_letter(record, f"invalid message: {_one_line(exc)}", stop)
            return "dead_lettered"
        context = context_from_headers(record.headers)
        with process_span(
            record,
            context=context,
            group=consumer_group(self.consumer),
            message_id=str(getattr(event, "event_id", "")),
        ):
            structlog.contextvars.bind_contextvars(event_id=str(getattr(event, "event_id", "")))
            try:
                return await self._handle_with_retries(event, record, stop)
            finally:
                structlog.contextvars.unbind_contextvars("event_id")

    def parse(self, record: Record) -> E:
        if not record.value:
            raise ValueError("empty message value")
        try:
            return self.schema.model_validate_json(record.value)
        except ValidationError as exc:
            raise ValueError(str(exc)) from exc

    async def _handle_with_retries(self, event: E, record: Record, stop: asyncio.Event) -> str:
        attempts = 0
        delay = 0.1
        while True:
            started = time.perf_counter()
            try:
                outcome = await self.handler(event, record)
            except RejectMessage as exc:
                await self.dead_letter(record, f"rejected: {_one_line(exc)}", stop)
                return "dead_lettered"
            except Exception as exc:
                if is_database_outage(exc) or isinstance(exc, RetryLater):
                    if self.database_ok:
                        log.warning(
                            "database unavailable, retrying", topic=self.topic, error=repr(exc)
                        )
                    self.database_ok = False
                else:
                    attempts += 1
                    CONSUMER_MESSAGES.labels(self.topic, "failed").inc()
                    log.error(
                        "handler failed",
                        topic=self.topic,
                        attempt=attempts,
                        offset=record.offset,
                        exc_info=exc,
                    )
                    if attempts >= self.max_handler_attempts:
                        await self.dead_letter(record, f"handler failed: {_one_line(exc)}", stop)
                        return "dead_lettered"
                if stop.is_set():
                    raise _Stopping from exc
                await sleep_unless(stop, delay)
                delay = min(delay * 2, self.retry_backoff_max)
                continue
            self.database_ok = True
            CONSUMER_HANDLE_SECONDS.labels(self.topic).observe(time.perf_counter() - started)
            CONSUMER_MESSAGES.labels(self.topic, outcome).inc()
            return outcome

    async def dead_letter(self, record: Record, reason: str, stop: asyncio.Event) -> None:
        """Publishes the record unchanged to `<topic>.dlq` with why and whence in headers."""
        headers = [
            *[(key, value) for key, value in record.headers if not key.startswith("x-dlq-")],
            (DLQ_REASON, reason[:4000].encode()),
            ("x-dlq-original-topic", record.topic.encode()),
            ("x-dlq-original-partition", str(record.partition).encode()),
            ("x-dlq-original-offset", str(record.offset).encode()),
            ("x-dlq-at", datetime.now(UTC).isoformat().encode()),
        ]
        delay = 0.1
        while True:
            try:
                await self.producer.send_and_wait(
                    dlq_topic(record.topic), value=record.value, key=record.key, headers=headers
                )
                break
            except Exception as exc:
                if not is_transient(exc) or stop.is_set():
                    raise
                await sleep_unless(stop, delay)
                delay = min(delay * 2, self.retry_backoff_max)
        CONSUMER_MESSAGES.labels(self.topic, "dead_lettered").inc()
        log.warning(
            "message dead-lettered",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=reason,
        )

    def _update_lag(self) -> None:
        lag = 0
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is not None and tp in self._next_offsets:
                lag += max(0, highwater - self._next_offsets[tp])
        CONSUMER_LAG.labels(self.topic).set(lag)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:1000] or type(exc).__name__
