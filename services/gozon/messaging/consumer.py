"""The consumer runner: record, effect, then commit the offset — a partition's batch at a time.

Guarantees:
- Each fetched batch is handled per partition: the partition's records (in offset order) go to
  the service's batch handler together, which records all their effects in ONE database
  transaction. Only after that transaction has committed (and any dead letters of the batch
  are acknowledged) does the runner record the partition's next offset as *done*; only done
  offsets are ever committed to Kafka, so a committed offset never runs ahead of the database.
- Done offsets are committed together, one OffsetCommit for every partition that has one:
  at most `commit_interval` after the first of them was recorded (a task of the runner's
  own, so a batch that is slow on one partition does not hold back the others'), at once
  when a fetch comes back empty (idle, after `poll_timeout` with no records), before
  partitions are revoked in a rebalance, and at a stop (SIGTERM) after the batch in hand.
  `commit_interval` 0 commits after every batch.
  A commit the group refuses (the partition was revoked meanwhile) is logged and dropped;
  after a revocation, a batch still in hand for it records nothing and is never committed.
- A crash redelivers what was not committed: the batch in hand and up to one interval of
  done offsets. The handler's idempotency (an inbox row, a decision per order, a guarded
  status change) turns each redelivery into a counted duplicate — the same at-least-once
  contract as a commit after every batch, with one commit request per interval instead of
  one per batch and partition.
- A message is read from its JSON text exactly (`gozon.core.jsontext`): a number is the
  `Decimal` of its text, so an amount with more than two places or out of range fails its
  schema and is dead-lettered, never rounded on the way in.
- A message that cannot be parsed or validated, or that the handler rejects (`Rejected`: it
  refers to something that does not exist, say), is published to `<topic>.dlq` with the
  reason and its origin in headers; the rest of its batch commits. It is never lost and never
  blocks the partition. A message of any size: one whose copy is too large for the producer
  or the broker (the largest value the broker accepts, plus the `x-dlq-*` headers) is
  dead-lettered as a bounded record (`gozon.messaging.dlq.bounded_record`: reason, origin,
  key, the value's size, SHA-256 and first bytes), counted by
  `gozon_consumer_dead_letters_bounded_total`. No message ends the process: a dead letter the
  broker refuses for another reason is sent again with backoff, its partition waiting.
- A transient failure (the database unreachable, a deadlock or serialization failure, a
  lock not granted within the session's `lock_timeout`, a statement past its
  `statement_timeout`, the session ended by `idle_in_transaction_session_timeout`, or a
  handler's `RetryLater`) retries the whole batch with capped backoff, for as long as it
  lasts: the batch's transaction was rolled back, so nothing is done twice and nothing is
  skipped. So does a database that refuses the consumer itself (a revoked grant, a migration
  not run, a wrong role, a read-only standby: `is_database_refusal`), with the consumer not
  ready meanwhile (`refused`): every message would fail alike, so none is dead-lettered for it.
  Any other handler error retries the batch a few times; then its messages are handled one
  at a time, so that only the message that fails on its own is dead-lettered with its reason
  ("handler failed: …") and the others commit.
- Each message keeps its own trace: its CONSUMER span continues the `traceparent` it came
  with, the batch's span links to every message's span, and what a handler writes for a
  message (an outbox row's headers) carries that message's context (`Delivery.trace_headers`).
- Partitions of a fetch are handled side by side (a key lives on one partition; each has its
  own transaction). A stop request (SIGTERM) is honoured between batches, and when idle within
  `poll_timeout` (1 s: a fetch call is not interrupted); an uncommitted batch is simply
  delivered again to whoever owns the partition next.
- The lag gauge counts from the done offsets (what the database holds), not from the committed
  ones, which trail them by at most one interval.

The runner subscribes its consumer to its topic with its own rebalance listener: give it a
consumer that is not subscribed and not started yet (`new_consumer` without topics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Literal, TypeAlias, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from aiokafka.structs import ConsumerRecord
from opentelemetry import propagate, trace
from opentelemetry.trace import Span
from pydantic import BaseModel, ValidationError

from gozon.core import jsontext
from gozon.core.errors import RetryLater
from gozon.core.pg import is_database_busy, is_database_outage, is_database_refusal
from gozon.core.runtime import sleep_unless
from gozon.core.telemetry import TRACE_HEADERS, context_from_headers
from gozon.messaging.dlq import bounded_record
from gozon.messaging.kafka import dlq_topic, is_transient
from gozon.messaging.metrics import (
    CONSUMER_HANDLE_SECONDS,
    CONSUMER_LAG,
    CONSUMER_MESSAGES,
    DLQ_BOUNDED,
)
from gozon.messaging.spans import (
    batch_process_span,
    consumer_cluster,
    consumer_group,
    start_process_span,
)

log = structlog.get_logger(__name__)

E = TypeVar("E", bound=BaseModel)
Record: TypeAlias = ConsumerRecord[bytes, bytes]

DLQ_REASON = "x-dlq-reason"
# The producer's own size check and the broker's answers for a message over its limits.
TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)
# How long a commit at a stop or before a revocation may take (the broker may be away).
LAST_COMMIT_TIMEOUT = 5.0
# How long one fetch call waits for records before the loop turns anyway (to commit at idle,
# update the lag gauge, notice a stop or a failed commit task). Records end the wait at once,
# so it adds no latency; it bounds how often an idle consumer wakes (5 times a second at
# 200 ms) and how long a stop (SIGTERM) waits when idle (docs/adr/0011-development-broker.md).
POLL_TIMEOUT = 1.0


@dataclass(frozen=True)
class Rejected:
    """A handler's answer for a well-formed message that can never be handled (it refers to
    something that does not exist, say): it goes to the dead-letter topic with `reason`."""

    reason: str


Outcome: TypeAlias = Literal["processed", "duplicate"] | Rejected


@dataclass(frozen=True)
class Delivery(Generic[E]):
    """One valid message of a batch: its event, its record and its own processing span."""

    event: E
    record: Record
    span: Span = field(default_factory=trace.get_current_span)

    def trace_headers(self) -> dict[str, str]:
        """This message's trace context as W3C headers, for what the handler writes for it."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(self.span))
        return {key: value for key, value in carrier.items() if key in TRACE_HEADERS}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Makes this message's span current (its log lines carry its trace id)."""
        with trace.use_span(self.span, end_on_exit=False):
            yield


BatchHandler = Callable[[Sequence[Delivery[E]]], Awaitable[Sequence[Outcome]]]
"""Handles a partition's valid messages (offset order) in ONE database transaction and returns
one outcome per delivery, in the same order. It raises only when nothing was committed."""


class _HandlerFailed(Rejected):
    """The runner's own rejection: the handler kept failing on this message alone."""


class _Stopping(Exception):
    """Raised inside the runner when a stop request interrupts a retry."""


def is_retryable(exc: BaseException) -> bool:
    """A failure that says "try the whole batch again", never "this message is bad"."""
    return (
        is_database_outage(exc)
        or is_database_refusal(exc)
        or isinstance(exc, RetryLater)
        or is_database_busy(exc)  # a deadlock, a serialization failure, a lock timeout
    )


def parse_event(schema: type[E], value: bytes | None) -> E:
    """The event a record's value holds, read from its JSON text exactly (`gozon.core.
    jsontext`: a number is the `Decimal` of its text, never a float), as the APIs read a
    body; a ValueError says why it is not one."""
    if not value:
        raise ValueError("empty message value")
    try:
        document = jsontext.loads(value.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError("the value is not UTF-8") from exc
    except RecursionError as exc:
        raise ValueError("the value nests too deep") from exc
    except ValueError as exc:  # not JSON, or JSON the platform refuses (jsontext.Refused)
        raise ValueError(f"not an accepted JSON document: {exc}") from exc
    try:
        return schema.model_validate(document)
    except ValidationError as exc:
        raise ValueError(str(exc)) from exc


class ConsumerRunner(Generic[E]):
    def __init__(
        self,
        *,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        topic: str,
        schema: type[E],
        handler: BatchHandler[E],
        max_handler_attempts: int = 5,
        retry_backoff_max: float = 5.0,
        commit_interval: float = 0.25,
        poll_timeout: float = POLL_TIMEOUT,
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.topic = topic
        self.schema = schema
        self.handler = handler
        self.max_handler_attempts = max_handler_attempts
        self.retry_backoff_max = retry_backoff_max
        self.commit_interval = commit_interval
        self.poll_timeout = poll_timeout
        self.database_ok = True
        # The database refused the last attempt (`is_database_refusal`): readiness says so.
        self.refused = False
        # The next offset of each partition whose records are all in the database ("done"):
        # what the lag counts from, and, until committed, what `_pending` holds.
        self._done: dict[TopicPartition, int] = {}
        self._pending: dict[TopicPartition, int] = {}
        self._pending_since = 0.0
        self._has_pending = asyncio.Event()
        self._commit_now = asyncio.Event()  # idle: the interval's task commits at once
        self._commit_lock = asyncio.Lock()
        # Bumped when partitions are revoked: a batch fetched before records nothing after.
        self._generation = 0
        consumer.subscribe([topic], listener=_Rebalance(self))
        # Every outcome's series exists from the start, so the first dead letter is an
        # increase from 0 that rate() and increase() can see, not a series appearing. The
        # series are kept, not looked up (a lock and a dict) for every message.
        self._messages = {
            outcome: CONSUMER_MESSAGES.labels(topic, outcome)
            for outcome in ("processed", "duplicate", "dead_lettered", "failed")
        }
        DLQ_BOUNDED.labels(topic)
        self._handle_seconds = CONSUMER_HANDLE_SECONDS.labels(topic)
        self._lag = CONSUMER_LAG.labels(topic)

    async def run(self, stop: asyncio.Event) -> None:
        """Fetches and handles batches until `stop` is set; then commits what is done.

        Cancelling it is a crash: nothing more is committed (what is done but uncommitted is
        delivered again, as duplicates)."""
        flusher = asyncio.create_task(self._commit_every_interval())
        try:
            await self._fetch_and_handle(stop, flusher)
        except asyncio.CancelledError:
            raise
        except Exception:
            # What is done is in the database, whatever ended the loop: commit it if we can.
            await self._last_commit(flusher)
            raise
        else:
            await self._last_commit(flusher)
        finally:
            await _cancelled(flusher)

    async def _last_commit(self, flusher: asyncio.Task[None]) -> None:
        await _cancelled(flusher)  # a commit it had in flight is put back and sent again here
        try:
            await self._commit_done(last=True)
        except Exception as exc:
            log.warning("offset commit at stop failed", topic=self.topic, error=repr(exc))

    async def _fetch_and_handle(self, stop: asyncio.Event, flusher: asyncio.Task[None]) -> None:
        delay = 0.1
        while not stop.is_set():
            if flusher.done():
                flusher.result()  # a commit error that is not "revoked meanwhile": raise it
            try:
                batches = await self.consumer.getmany(timeout_ms=int(self.poll_timeout * 1000))
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
            if not batches:
                # Idle: nothing is saved by waiting. The interval's task commits, so that a
                # commit that waits for the broker never holds up the fetch loop (or a stop).
                if self._pending:
                    self._commit_now.set()
                self._update_lag()
                continue
            # Partitions are independent (a key lives on one), so they are handled side by
            # side, each in its own transaction; within one, the batch keeps offset order.
            generation = self._generation
            results = await asyncio.gather(
                *(
                    self._partition(tp, records, stop, generation)
                    for tp, records in batches.items()
                ),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, _Stopping):
                    return
                if isinstance(result, BaseException):
                    raise result
            self._update_lag()

    async def _partition(
        self, tp: TopicPartition, records: list[Record], stop: asyncio.Event, generation: int
    ) -> None:
        """Handles one partition's records as one batch, then records the offset past them
        as done (to be committed with the others).

        The handler's transaction has committed and every dead letter of the batch has been
        acknowledged before the offset is recorded, so a commit never runs ahead of the
        database. A batch whose partitions were revoked meanwhile records nothing: its
        partition's new owner handles it again.
        """
        if not records or stop.is_set() or generation != self._generation:
            return
        await self.handle_batch(records, stop)
        if generation != self._generation:
            return
        offset = records[-1].offset + 1
        self._done[tp] = offset
        if not self._pending:
            self._pending_since = time.monotonic()
            self._has_pending.set()
        self._pending[tp] = offset
        if self.commit_interval <= 0:
            await self._commit_done()

    async def _commit_every_interval(self) -> None:
        """Commits the done offsets at most `commit_interval` after the first was recorded."""
        if self.commit_interval <= 0:
            return
        while True:
            await self._has_pending.wait()
            wait = self._pending_since + self.commit_interval - time.monotonic()
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancel that
            # lands as it times out, and this task is cancelled at every stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wait)):
                    await self._commit_now.wait()
            self._commit_now.clear()
            await self._commit_done()

    async def _commit_done(
        self, only: Collection[TopicPartition] | None = None, *, last: bool = False
    ) -> None:
        """Commits the pending done offsets (of `only`'s partitions, if given) in one request.

        `last`: the runner is stopping; the commit is bounded by LAST_COMMIT_TIMEOUT.
        """
        async with self._commit_lock:
            offsets = {
                tp: offset for tp, offset in self._pending.items() if only is None or tp in only
            }
            if not offsets:
                return
            for tp in offsets:
                del self._pending[tp]
            if not self._pending:
                self._has_pending.clear()
            generation = self._generation
            try:
                async with asyncio.timeout(LAST_COMMIT_TIMEOUT if last else None):
                    await self.consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError) as exc:
                # Revoked meanwhile: the new owner sees these records again and finds them
                # already recorded. Dropped, not retried.
                log.warning(
                    "offset commit refused",
                    topic=self.topic,
                    # str keys: the JSON renderer (orjson) refuses int keys, and a log line
                    # that raises would end the consumer
                    offsets={str(tp.partition): offset for tp, offset in offsets.items()},
                    error=repr(exc),
                )
            except BaseException:
                # Not sent, or its answer lost (cancelled, the broker away): still to commit,
                # unless the partitions were revoked meanwhile or a later batch is done.
                if generation == self._generation:
                    for tp, offset in offsets.items():
                        self._pending.setdefault(tp, offset)
                    if self._pending and not self._has_pending.is_set():
                        self._pending_since = time.monotonic()
                        self._has_pending.set()
                raise

    async def _revoked(self, revoked: Collection[TopicPartition]) -> None:
        """Before `revoked` go to another consumer: commit their done offsets (waiting for a
        commit in flight), and make sure nothing is committed for them afterwards."""
        self._generation += 1  # a batch in hand records nothing now
        for tp in revoked:
            self._done.pop(tp, None)
        try:
            await self._commit_done(revoked, last=True)
        except Exception as exc:
            log.warning(
                "offset commit before a rebalance failed", topic=self.topic, error=repr(exc)
            )
        finally:
            for tp in revoked:  # what a failed commit put back, if anything
                self._pending.pop(tp, None)
            if not self._pending:
                self._has_pending.clear()

    async def handle_batch(self, records: Sequence[Record], stop: asyncio.Event) -> list[str]:
        """Handles records of one partition to their end; returns each one's outcome:
        processed, duplicate or dead_lettered (in the records' order)."""
        deliveries: list[Delivery[E]] = []
        positions: list[int] = []  # each delivery's index in `records`
        dead: dict[int, str] = {}  # index in `records` -> reason
        for index, record in enumerate(records):
            try:
                event = self.parse(record)
            except ValueError as exc:
                dead[index] = f"invalid message: {_one_line(exc)}"
                continue
            deliveries.append(Delivery(event, record, self._start_span(record, event)))
            positions.append(index)
        outcomes: dict[int, str] = {}
        try:
            if deliveries:
                handled = await self._handle_with_retries(deliveries, stop)
                for index, outcome in zip(positions, handled, strict=True):
                    if isinstance(outcome, _HandlerFailed):
                        dead[index] = outcome.reason
                    elif isinstance(outcome, Rejected):
                        dead[index] = f"rejected: {outcome.reason}"
                    else:
                        outcomes[index] = outcome
                        self._messages[outcome].inc()
            for index in sorted(dead):
                await self.dead_letter(records[index], dead[index], stop)
                outcomes[index] = "dead_lettered"
        finally:
            for delivery in deliveries:
                delivery.span.end()
        return [outcomes[index] for index in range(len(records))]

    def _start_span(self, record: Record, event: E) -> Span:
        """The message's own CONSUMER span, continuing the trace its headers carry."""
        return start_process_span(
            record,
            context=context_from_headers(record.headers),
            group=consumer_group(self.consumer),
            message_id=str(getattr(event, "event_id", "")),
            cluster=consumer_cluster(self.consumer),
        )

    def parse(self, record: Record) -> E:
        return parse_event(self.schema, record.value)

    async def _handle_with_retries(
        self, deliveries: list[Delivery[E]], stop: asyncio.Event
    ) -> list[Outcome]:
        """The handler's outcomes for the batch, retrying it whole while that makes sense."""
        attempts = 0
        delay = 0.1
        while True:
            started = time.perf_counter()
            try:
                # The batch's statements sit in the first message's trace (alone in its batch
                # at a low rate, every order's trace holds its statements); the batch's span
                # links to every message's span.
                with batch_process_span(
                    self.topic,
                    deliveries[0].record.partition,
                    [d.span for d in deliveries],
                    group=consumer_group(self.consumer),
                    cluster=consumer_cluster(self.consumer),
                ):
                    outcomes = list(await self.handler(deliveries))
                if len(outcomes) != len(deliveries):
                    raise RuntimeError(
                        f"handler answered {len(outcomes)} outcomes for {len(deliveries)} messages"
                    )
            except Exception as exc:
                if is_database_refusal(exc):
                    if not self.refused:
                        log.error(
                            "the database refuses the consumer (its role, grants or schema, or "
                            "a read-only server), not the messages: the batch waits for the fix",
                            topic=self.topic,
                            messages=len(deliveries),
                            error=repr(exc),
                        )
                    self.database_ok = False
                    self.refused = True
                elif is_retryable(exc):
                    if self.database_ok:
                        log.warning(
                            "database unavailable or busy, retrying the batch",
                            topic=self.topic,
                            messages=len(deliveries),
                            error=repr(exc),
                        )
                    self.database_ok = not (is_database_outage(exc) or isinstance(exc, RetryLater))
                else:
                    attempts += 1
                    self._messages["failed"].inc(len(deliveries))
                    log.error(
                        "handler failed",
                        topic=self.topic,
                        attempt=attempts,
                        first_offset=deliveries[0].record.offset,
                        messages=len(deliveries),
                        exc_info=exc,
                    )
                    if attempts >= self.max_handler_attempts:
                        if len(deliveries) == 1:
                            return [_HandlerFailed(f"handler failed: {_one_line(exc)}")]
                        # One message of the batch may be what fails: one at a time, only it
                        # is dead-lettered and the others commit.
                        singles: list[Outcome] = []
                        for delivery in deliveries:
                            singles += await self._handle_with_retries([delivery], stop)
                        return singles
                if stop.is_set():
                    raise _Stopping from exc
                await sleep_unless(stop, delay)
                delay = min(delay * 2, self.retry_backoff_max)
                continue
            self.database_ok = True
            self.refused = False
            elapsed = time.perf_counter() - started
            for _ in deliveries:  # each message waited for the whole batch's transaction
                self._handle_seconds.observe(elapsed)
            return outcomes

    async def dead_letter(self, record: Record, reason: str, stop: asyncio.Event) -> None:
        """Publishes the record unchanged to `<topic>.dlq` with why and whence in headers; if
        that copy is too large for the producer or the broker, a bounded record in its place
        (`gozon.messaging.dlq.bounded_record`). Never gives up on a message: the broker's
        unavailability is waited out, and any other refusal is retried with backoff (the
        partition waits, the process does not exit)."""
        headers = [
            *[(key, value) for key, value in record.headers if not key.startswith("x-dlq-")],
            (DLQ_REASON, reason[:4000].encode()),
            ("x-dlq-original-topic", record.topic.encode()),
            ("x-dlq-original-partition", str(record.partition).encode()),
            ("x-dlq-original-offset", str(record.offset).encode()),
            ("x-dlq-at", datetime.now(UTC).isoformat().encode()),
        ]
        bounded = False
        try:
            await self._publish_dead_letter(record.key, record.value, headers, stop)
        except TOO_LARGE as exc:
            bounded = True
            letter = bounded_record(
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                timestamp_ms=record.timestamp,
                key=record.key,
                value=record.value,
                headers=list(record.headers),
                reason=reason,
                why_bounded=f"too large to copy: {_one_line(exc)}",
            )
            await self._publish_dead_letter(letter.key, letter.value, letter.headers, stop)
        self._messages["dead_lettered"].inc()
        if bounded:
            DLQ_BOUNDED.labels(record.topic).inc()
        log.warning(
            "message dead-lettered",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=reason[:1000],
            bounded=bounded,
            value_bytes=len(record.value or b""),
        )

    async def _publish_dead_letter(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
        stop: asyncio.Event,
    ) -> None:
        """Sends one dead letter, retrying until the broker takes it. A message too large is
        raised (the caller sends a bounded record instead); any other refusal (the dead-letter
        topic missing or not writable, say) is retried with capped backoff: the partition
        waits for it, and nothing is skipped or committed past it."""
        delay = 0.1
        while True:
            try:
                await self.producer.send_and_wait(
                    dlq_topic(self.topic), value=value, key=key, headers=headers
                )
                return
            except TOO_LARGE:
                raise
            except Exception as exc:
                if not (is_transient(exc) or isinstance(exc, KafkaError)):
                    raise  # a bug, not the broker's answer
                if stop.is_set():
                    raise _Stopping from exc
                log.log(
                    logging.WARNING if is_transient(exc) else logging.ERROR,
                    "dead letter not accepted, sending again",
                    topic=self.topic,
                    error=repr(exc),
                )
                await sleep_unless(stop, delay)
                delay = min(delay * 2, self.retry_backoff_max)

    def _update_lag(self) -> None:
        """Messages past the done offsets (in the database), not past the committed ones."""
        lag = 0
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is not None and tp in self._done:
                lag += max(0, highwater - self._done[tp])
        self._lag.set(lag)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """The runner's rebalance listener: done offsets are committed before a revocation."""

    def __init__(self, runner: ConsumerRunner[Any]) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        await self.runner._revoked(revoked)

    async def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        pass


async def _cancelled(task: asyncio.Task[None]) -> None:
    """Cancels `task` and waits until it has ended (cancelling again if it swallowed one)."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=1)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:1000] or type(exc).__name__
