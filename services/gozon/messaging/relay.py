"""The outbox relay: publishes committed outbox rows to Kafka, at least once, per key in order.

Guarantees:
- At least once. A row is marked SENT in the same transaction that claimed it, and only
  after the broker acknowledged it (`acks=all`, idempotent producer). A relay that dies
  between the ack and the commit publishes the row again after restart; consumers
  deduplicate by `event_id`.
- Four round trips per batch whatever its size: BEGIN, the claim (one SELECT), the mark (one
  `UPDATE … WHERE id = ANY(:ids)`, the same statement shape for every batch, so its prepared
  statement is reused), COMMIT. A leased claim (one autocommit UPDATE … RETURNING, then the
  mark, no transaction held) was measured and not kept: it writes each row twice, which cost
  PostgreSQL more than the two round trips saved the relay (docs/benchmarks.md).
- Several relays on one outbox are safe: a batch is claimed with
  `SELECT … FOR UPDATE SKIP LOCKED`, so no two relays hold the same row.
- Within one relay, rows go out in id order (enqueued one after another, then every ack
  awaited), so the events of one key keep their order on their partition. Two relays, or a
  row that waits for a retry, can let a later event of the same key overtake an earlier one;
  the consumers are written so that order between different orders does not matter.
- A broker outage does not burn attempts: a transient error while the broker does not answer
  leaves the rows PENDING and the relay backs off (its readiness probe fails meanwhile). An
  error about the message itself (too large, its topic missing while the broker answers)
  counts an attempt, with exponential backoff, and does not hold up the rows behind it; after
  the limit the row is FAILED (counted, and requeued by `requeue_failed`).
- Wake-up without taxing the writers: no NOTIFY in the writers' transactions (it takes a
  database-wide lock at commit). Writers send a coalesced notification after their commit
  (`gozon.messaging.wakeup`), which sets `wake`; the relay re-polls at once while batches
  come back full, and otherwise waits for `wake` or the slow `fallback_poll` (1 s), so a
  lost notification delays a row, never loses it.
- No dependency's outage ends the relay: claiming, publishing and the hourly prune all
  treat a lost database or broker as "not ready, back off, try again".
- SIGTERM: the batch in hand is finished and committed, then the relay exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from opentelemetry import propagate, trace
from sqlalchemy import BigInteger, Table, any_, bindparam, delete, func, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from gozon.core.db import is_database_outage
from gozon.core.runtime import sleep_unless
from gozon.core.telemetry import context_from_headers
from gozon.messaging.kafka import broker_answers, is_transient
from gozon.messaging.metrics import (
    OUTBOX_COMMIT_TO_ACK,
    OUTBOX_FAILED,
    OUTBOX_OLDEST_AGE,
    OUTBOX_PENDING,
    OUTBOX_PRUNED,
    OUTBOX_PUBLISH_ERRORS,
    OUTBOX_PUBLISHED,
)
from gozon.messaging.outbox import FAILED, PENDING, SENT
from gozon.messaging.spans import end_send_span, relay_batch_span, start_send_span

log = structlog.get_logger(__name__)


class BrokerUnavailable(Exception):
    """Kafka did not take the batch for reasons that are not the messages' fault."""


@dataclass(frozen=True)
class RelayConfig:
    batch_size: int = 200
    fallback_poll: float = 1.0
    max_attempts: int = 10
    backoff_base: float = 0.2
    backoff_max: float = 60.0
    retention: timedelta = timedelta(hours=72)
    prune_interval: float = 60.0
    outage_backoff_max: float = 5.0


def retry_delay(attempts: int, base: float, cap: float) -> float:
    """Exponential backoff after `attempts` failed attempts: base, 2·base, 4·base, … ≤ cap."""
    return float(min(cap, base * (2 ** max(0, attempts - 1))))


class OutboxRelay:
    def __init__(
        self,
        *,
        table: Table,
        sessions: async_sessionmaker[AsyncSession],
        producer: AIOKafkaProducer,
        config: RelayConfig,
    ) -> None:
        self.table = table
        self.name = table.name
        self.sessions = sessions
        self.producer = producer
        self.config = config
        self.kafka_ok = False
        self.database_ok = False
        self._last_prune = 0.0
        self.wake = asyncio.Event()
        """Set when rows may be waiting (a notification); the relay then polls at once."""
        # Every series exists from the start (see the consumer runner for why).
        OUTBOX_PUBLISHED.labels(self.name)
        OUTBOX_FAILED.labels(self.name)
        OUTBOX_PRUNED.labels(self.name)
        for kind in ("transient", "permanent"):
            OUTBOX_PUBLISH_ERRORS.labels(self.name, kind)
        # One statement for the whole batch, whatever its size (`ids`: an array).
        # clock_timestamp(): the moment of marking, after the acks (now() would be the start of
        # the claiming transaction, before the publish).
        self._mark_sent = (
            update(table)
            .where(table.c.id == any_(bindparam("ids", type_=ARRAY(BigInteger))))
            .values(status=SENT, sent_at=func.clock_timestamp())
        )

        # Built once: composing the statement anew cost about as much as running it.
        self._claim = self._claim_statement()

    # -- one batch

    def _claim_statement(self) -> Any:
        t = self.table
        return (
            select(
                t.c.id,
                t.c.topic,
                t.c.message_key,
                t.c.payload,
                t.c.headers,
                t.c.attempts,
                t.c.created_at,
            )
            .where(t.c.status == PENDING, t.c.next_attempt_at <= func.now())
            .order_by(t.c.id)
            .limit(self.config.batch_size)
            .with_for_update(skip_locked=True)
        )

    async def publish_batch(self) -> int:
        """Claims, publishes and marks one batch; returns how many rows it claimed."""
        # The poll's span holds the claim, the marking and the commit; background work, so
        # exported only when asked for (gozon.messaging.spans).
        async with (
            relay_batch_span(self.name) as batch,
            self.sessions() as session,
            session.begin(),
        ):
            # Core statements on the session's connection: the ORM's execution path adds
            # nothing these statements need.
            conn = await session.connection()
            rows = (await conn.execute(self._claim)).all()
            if not rows:
                return 0
            # One batch publishes rows of many traces: its span links to each of them.
            for row in rows:
                batch.add_link(
                    trace.get_current_span(context_from_headers(row.headers)).get_span_context()
                )
            batch.set_attribute("gozon.batch.rows", len(rows))
            sent, outage = await self._publish(conn, rows)
        # Committed: only now are the rows SENT.
        now = datetime.now(UTC)
        for row in sent:
            OUTBOX_COMMIT_TO_ACK.labels(self.name).observe(
                max(0.0, (now - row.created_at).total_seconds())
            )
        OUTBOX_PUBLISHED.labels(self.name).inc(len(sent))
        if outage is not None:
            OUTBOX_PUBLISH_ERRORS.labels(self.name, "transient").inc()
            raise BrokerUnavailable(repr(outage)) from outage
        return len(rows)

    async def _publish(
        self, conn: AsyncConnection, rows: Sequence[Any]
    ) -> tuple[list[Any], BaseException | None]:
        """Publishes the claimed rows and marks them, inside the claiming transaction.

        Returns the rows marked SENT, and the error if the broker turned out to be down.
        """
        # Enqueue in id order (the producer keeps that order per partition), then await
        # every acknowledgement before anything is marked.
        deliveries: list[tuple[Any, asyncio.Future[Any] | BaseException]] = []
        for row in rows:
            try:
                deliveries.append((row, await self._send(row)))
            except Exception as exc:
                deliveries.append((row, exc))
                if is_transient(exc):
                    break  # the rows after it stay untouched, claimed again next time
        sent: list[Any] = []
        failed: list[tuple[Any, BaseException]] = []
        for row, delivery in deliveries:
            if isinstance(delivery, BaseException):
                failed.append((row, delivery))
                continue
            try:
                await delivery
            except Exception as exc:
                failed.append((row, exc))
            else:
                sent.append(row)
                log.info(
                    "published",
                    outbox=self.name,
                    row_id=row.id,
                    topic=row.topic,
                    aggregate_id=row.payload.get("aggregate_id"),
                    event_id=row.payload.get("event_id"),
                    **_trace_ids(row.headers),
                )
        # A transient error while the broker answers is about that message (a missing topic,
        # say): it counts an attempt. While the broker does not answer, it is an outage: no
        # attempt is counted and the relay backs off.
        outage = next((error for _, error in failed if is_transient(error)), None)
        if outage is not None and await broker_answers(self.producer):
            outage = None
        for row, error in failed:
            if outage is None or not is_transient(error):
                await self._count_attempt(conn, row, error)
        if sent:
            await conn.execute(self._mark_sent, {"ids": [row.id for row in sent]})
        return sent, outage

    async def _send(self, row: Any) -> asyncio.Future[Any]:
        """Enqueues one row in a PRODUCER span that continues the row's trace.

        The span's own context goes out as the Kafka headers, so the consumer's span is its
        child; it ends when the broker acknowledges (or refuses) the message.
        """
        span = start_send_span(
            row.topic,
            key=row.message_key,
            message_id=str(row.payload.get("event_id", "")),
            context=context_from_headers(row.headers),
            attributes={"gozon.outbox.row_id": row.id},
        )
        headers = dict(row.headers)
        propagate.inject(headers, context=trace.set_span_in_context(span))
        try:
            future: asyncio.Future[Any] = await self.producer.send(
                row.topic,
                value=json.dumps(row.payload, separators=(",", ":")).encode(),
                key=row.message_key.encode(),
                headers=[(name, str(value).encode()) for name, value in headers.items()],
            )
        except BaseException as exc:
            end_send_span(span, exc)
            raise
        future.add_done_callback(lambda done: end_send_span(span, done))
        return future

    async def _count_attempt(self, conn: AsyncConnection, row: Any, exc: BaseException) -> None:
        attempts = row.attempts + 1
        final = attempts >= self.config.max_attempts
        delay = retry_delay(attempts, self.config.backoff_base, self.config.backoff_max)
        OUTBOX_PUBLISH_ERRORS.labels(self.name, "permanent").inc()
        if final:
            OUTBOX_FAILED.labels(self.name).inc()
        log.warning(
            "outbox row not published",
            outbox=self.name,
            row_id=row.id,
            attempts=attempts,
            final=final,
            error=repr(exc),
        )
        await conn.execute(
            update(self.table)
            .where(self.table.c.id == row.id)
            .values(
                attempts=attempts,
                last_error=repr(exc)[:2000],
                status=FAILED if final else PENDING,
                next_attempt_at=func.now() + timedelta(seconds=delay),
            )
        )

    # -- the loop

    async def run(self, stop: asyncio.Event) -> None:
        """Publishes until `stop` is set; the batch in hand is always finished first."""
        stopper = asyncio.create_task(self._wake_on(stop))
        try:
            await self._loop(stop)
        finally:
            stopper.cancel()

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.wake.set()

    async def _loop(self, stop: asyncio.Event) -> None:
        outage_delay = 0.1
        while not stop.is_set():
            self.wake.clear()  # a notification from here on means rows after this claim
            try:
                claimed = await self.publish_batch()
            except BrokerUnavailable as exc:
                self.database_ok = True
                if self.kafka_ok:
                    log.warning(
                        "kafka unavailable, rows stay pending", outbox=self.name, error=str(exc)
                    )
                self.kafka_ok = False
                await sleep_unless(stop, outage_delay)
                outage_delay = min(outage_delay * 2, self.config.outage_backoff_max)
                continue
            except Exception as exc:
                if not is_database_outage(exc):
                    raise
                self._database_down(exc)
                await sleep_unless(stop, outage_delay)
                outage_delay = min(outage_delay * 2, self.config.outage_backoff_max)
                continue
            if not self.database_ok or (claimed and not self.kafka_ok):
                log.info("relay healthy", outbox=self.name)
            self.database_ok = True
            if claimed:
                self.kafka_ok = True
            outage_delay = 0.1
            await self._maybe_prune(stop)
            if claimed < self.config.batch_size:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self.config.fallback_poll)

    def _database_down(self, exc: BaseException) -> None:
        if self.database_ok:
            log.warning("database unavailable", outbox=self.name, error=repr(exc))
        self.database_ok = False

    # -- housekeeping

    async def _maybe_prune(self, stop: asyncio.Event) -> None:
        """Deletes old SENT rows once per `prune_interval` (the first time at start-up).

        Housekeeping never takes the relay down: a database lost meanwhile marks it not
        ready (the next claim finds out when it is back); any other failure is logged, and
        the prune is tried again at the next interval.
        """
        now = time.monotonic()
        if stop.is_set() or now - self._last_prune < self.config.prune_interval:
            return
        self._last_prune = now
        try:
            pruned = await prune_sent(self.sessions, self.table, self.config.retention)
        except Exception as exc:
            if is_database_outage(exc):
                self._database_down(exc)
            else:
                log.error("pruning sent outbox rows failed", outbox=self.name, exc_info=exc)
            return
        if pruned:
            log.info("pruned sent outbox rows", outbox=self.name, rows=pruned)

    async def refresh_gauges(self) -> None:
        """Outbox lag at scrape time: pending rows and the age of the oldest (one cheap query)."""
        t = self.table
        async with self.sessions() as session:
            pending, oldest = (
                await session.execute(
                    select(func.count(), func.min(t.c.created_at)).where(t.c.status == PENDING)
                )
            ).one()
        OUTBOX_PENDING.labels(self.name).set(pending)
        age = (datetime.now(UTC) - oldest).total_seconds() if oldest else 0.0
        OUTBOX_OLDEST_AGE.labels(self.name).set(max(0.0, age))


async def prune_sent(
    sessions: async_sessionmaker[AsyncSession],
    table: Table,
    retention: timedelta,
    *,
    chunk: int = 5000,
) -> int:
    """Deletes SENT rows older than `retention`, in chunks so no transaction grows large."""
    total = 0
    while True:
        async with sessions() as session, session.begin():
            old = (
                select(table.c.id)
                .where(table.c.status == SENT, table.c.sent_at < func.now() - retention)
                .limit(chunk)
                .scalar_subquery()
            )
            result = await session.execute(delete(table).where(table.c.id.in_(old)))
        deleted = int(getattr(result, "rowcount", 0) or 0)
        total += deleted
        OUTBOX_PRUNED.labels(table.name).inc(deleted)
        if deleted < chunk:
            return total


async def requeue_failed(engine: AsyncEngine, table: Table) -> int:
    """Puts every FAILED row back in the queue with a fresh attempt budget."""
    async with engine.begin() as conn:
        result = await conn.execute(
            update(table)
            .where(table.c.status == FAILED)
            .values(status=PENDING, attempts=0, next_attempt_at=func.now())
        )
    return int(getattr(result, "rowcount", 0) or 0)


def _trace_ids(headers: dict[str, str]) -> dict[str, str]:
    """The row's own trace and span ids (its `traceparent` is 00-<trace>-<span>-<flags>), for
    a log line written inside the batch's span, which belongs to no order's trace."""
    parts = headers.get("traceparent", "").split("-")
    return {"trace_id": parts[1], "span_id": parts[2]} if len(parts) == 4 else {}
