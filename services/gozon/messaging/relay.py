"""The outbox relay: publishes committed outbox rows to Kafka, at least once, per key in order.

Design and figures: docs/messaging.md, "Decisions"; docs/adr/0004-relay-claim-and-mark.md.

Guarantees:
- At least once: a batch's transaction claims its rows and marks them SENT in one statement
  (`CLAIM`, `FOR UPDATE SKIP LOCKED`) and commits only after the broker acknowledged every row
  still marked; the others are put back first (`RELEASE`). A relay that dies before the
  commit leaves its rows PENDING; consumers deduplicate by `event_id`.
- Three round trips per batch whatever its size (BEGIN, CLAIM, COMMIT; RELEASE only when a
  row was not acknowledged), on the relay's own asyncpg connection. `sent_at` is the claim's
  moment. Several relays on one outbox never hold the same row and never wait for another.
- Within one relay rows go out in id order, so one key's events keep their order on their
  partition; two relays, or a row waiting for a retry, may let a later one overtake.
- A broker outage does not burn attempts: the rows not acknowledged while the broker does not
  answer go back to PENDING without an attempt (the acknowledged ones commit SENT) and the
  relay backs off (its readiness probe fails meanwhile). Each such batch counts one
  `transient` publish error, whether the broker refuses connections or is frozen: a batch
  waits at most `ack_timeout` for its acknowledgements (the producer itself retries a frozen
  broker for ever), so a frozen broker neither hides from the metrics nor holds the batch's
  row locks. A message acknowledged after that is published twice; consumers deduplicate.
  An error about the message itself (too large, its topic missing while the broker answers)
  counts an attempt, with exponential backoff, and does not hold up the rows behind it;
  after the limit the row is FAILED (counted, and requeued by `requeue_failed`). After a
  transient error the rows behind it in the batch are not tried: PENDING again, no attempt.
- A producer whose idempotence state the broker refuses (`PRODUCER_STATE_ERRORS`: seen after
  a broker's pod was deleted under load, every later message of the partition refused as out
  of order) is replaced: its rows go back to PENDING without an attempt, and the next batch
  goes through a new producer (`new_producer`), with a new producer id. aiokafka never
  recovers from these errors by itself (the Java client bumps its epoch).
- Wake-up without taxing the writers: no NOTIFY in the writers' transactions (it takes a
  database-wide lock at commit). Writers send a coalesced notification after their commit
  (`gozon.messaging.wakeup`); the relay re-polls at once while batches come back full, else
  waits for `wake` or `fallback_poll` (1 s): a lost notification delays a row, never loses it.
- No outage ends the relay: a lost database or broker, or a database that refuses the relay
  itself (`is_database_refusal`), means not ready, back off, try again (`refused` and an
  error logged for the latter).
- Every wait is bounded (`SessionLimits` on the relay's sessions): a claim waiting for a lock
  fails after `lock_timeout` and is tried again; a statement stops after `statement_timeout`;
  a relay frozen inside its transaction has its session ended after
  `idle_in_transaction_session_timeout` (above the producer's request timeout, so a slow
  broker never cuts a live batch), which hands its claimed rows back PENDING.
- SIGTERM: the batch in hand is finished and committed, then the relay exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaTimeoutError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from sqlalchemy import Table, func, update
from sqlalchemy.ext.asyncio import AsyncEngine

from gozon.core.pg import (
    batch_connection,
    driver_dsn,
    is_database_busy,
    is_database_outage,
    is_database_refusal,
    pool_answers,
    unusable_after,
    worker_pool,
)
from gozon.core.runtime import sleep_unless
from gozon.core.settings import MessagingSettings, SessionLimits
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


# The relays' limits at their documented defaults (GOZON_WORKER_*_MS and
# GOZON_RELAY_IDLE_IN_TRANSACTION_TIMEOUT_MS).
RELAY_LIMITS: Final = MessagingSettings.model_construct().relay_session_limits


class BrokerUnavailable(Exception):
    """Kafka did not take the batch for reasons that are not the messages' fault."""


# The broker refuses the producer's idempotence state (its id, epoch or a partition's sequence
# number), not the message: every later message of that producer fails the same way.
PRODUCER_STATE_ERRORS: Final = (
    OutOfOrderSequenceNumber,
    UnknownProducerId,
    InvalidProducerEpoch,
    ProducerFenced,
)
STOP_OLD_PRODUCER_S: Final = 10.0


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
    ack_timeout: float = 10.0
    """How long a batch waits for the broker's acknowledgements (the producer's request
    timeout): past it, the rows not acknowledged are an outage."""


def retry_delay(attempts: int, base: float, cap: float) -> float:
    """Exponential backoff after `attempts` failed attempts: base, 2·base, 4·base, … ≤ cap."""
    return float(min(cap, base * (2 ** max(0, attempts - 1))))


# --- the relay's SQL (hand-written: each is one round trip whatever the batch's size) ------

CLAIM: Final = """
UPDATE {table} SET status = 'SENT', sent_at = clock_timestamp()
WHERE id IN (
    SELECT id FROM {table}
    WHERE status = 'PENDING' AND next_attempt_at <= now()
    ORDER BY id LIMIT $1
    FOR UPDATE SKIP LOCKED
)
RETURNING id, topic, message_key, payload, headers, attempts, created_at,
          payload->>'event_id', payload->>'aggregate_id'
"""
"""claim($1 batch_size): the claim and the mark in one statement, inside the batch's transaction.

Guarantees: at most `batch_size` due PENDING rows, the lowest ids first, locked (`FOR UPDATE
SKIP LOCKED`: another relay skips them, never waits for them or takes them too) and marked
SENT with `sent_at` = the moment of the claim. Nobody else sees them SENT before the
transaction commits, and the relay commits only after every row left is acknowledged (the
others are put back by RELEASE first); a relay that dies before the commit leaves them PENDING,
untouched. So each row is written once on the happy path. RETURNING has no order: the caller
sorts by id before publishing. The payload comes back as its stored JSON text (asyncpg's jsonb
codec), published as it is; its `event_id` and `aggregate_id`, for the span and the log line,
are read by PostgreSQL, so the relay never decodes a payload.
"""

RELEASE: Final = """
UPDATE {table} AS o
SET status = u.status,
    attempts = o.attempts + u.counted,
    last_error = coalesce(u.error, o.last_error),
    next_attempt_at = CASE WHEN u.counted = 1
                           THEN now() + make_interval(secs => u.delay)
                           ELSE o.next_attempt_at END,
    sent_at = NULL
FROM unnest($1::bigint[], $2::text[], $3::int[], $4::text[], $5::float8[])
     AS u(id, status, counted, error, delay)
WHERE o.id = u.id
"""
"""release($1 ids, $2 statuses, $3 counted, $4 errors, $5 delays): the claimed rows that were not
acknowledged, back out of SENT, in the claiming transaction, before its commit.

Guarantees: one statement for the whole failed set. A row with `counted` 1 (the broker refused
it) gets an attempt, its error and its next attempt after `delay` seconds from the
transaction's start, and the status the caller chose (PENDING, or FAILED at the limit); a row
with `counted` 0 (an outage, or not tried after a transient error) is PENDING again exactly as
it was claimed. Only the rows named, which this transaction holds locked.
"""

PRUNE: Final = """
DELETE FROM {table}
WHERE id IN (
    SELECT id FROM {table}
    WHERE status = 'SENT' AND sent_at < now() - CAST($1 AS interval)
    LIMIT $2
)
"""
"""prune($1 retention, $2 chunk): deletes at most `chunk` SENT rows sent longer than `retention`
ago (housekeeping; never a PENDING or FAILED row)."""

GAUGES: Final = """
SELECT count(*), min(created_at) FROM {table} WHERE status = 'PENDING'
"""
"""gauges(): the outbox's pending rows and the creation time of the oldest (or NULL)."""


class _Release:
    """The RELEASE statement's arrays, one entry per row not acknowledged."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.statuses: list[str] = []
        self.counted: list[int] = []
        self.errors: list[str | None] = []
        self.delays: list[float] = []

    def add(
        self, row_id: int, *, status: str = PENDING, error: str | None = None, delay: float = 0.0
    ) -> None:
        self.ids.append(row_id)
        self.statuses.append(status)
        self.counted.append(0 if error is None else 1)
        self.errors.append(None if error is None else error[:2000])
        self.delays.append(delay)

    def args(self) -> tuple[list[Any], ...]:
        return self.ids, self.statuses, self.counted, self.errors, self.delays


class Claimed(NamedTuple):
    """One row as CLAIM returns it, with the trace context stored in its headers.

    asyncpg leaves jsonb as text: the payload stays the JSON text PostgreSQL wrote out (the
    message's value, as it is), only the small headers object is decoded."""

    id: int
    topic: str
    message_key: str
    payload: str
    headers: dict[str, str]
    attempts: int
    created_at: datetime
    event_id: str | None
    aggregate_id: str | None
    context: Context
    """The row's own trace context (its `traceparent`), extracted once per row: the PRODUCER
    span continues it and the batch span links to it."""

    @classmethod
    def of(cls, record: asyncpg.Record) -> Claimed:
        row_id, topic, key, payload, headers, attempts, created_at, event_id, aggregate_id = record
        headers = json.loads(headers)
        return cls(
            row_id,
            topic,
            key,
            payload,
            headers,
            attempts,
            created_at,
            event_id,
            aggregate_id,
            context_from_headers(headers),
        )


class OutboxRelay:
    def __init__(
        self,
        *,
        table: Table,
        producer: AIOKafkaProducer,
        config: RelayConfig,
        database_url: str,
        application_name: str = "gozon-relay",
        limits: SessionLimits = RELAY_LIMITS,
        new_producer: Callable[[], AIOKafkaProducer] | None = None,
    ) -> None:
        self.table = table
        self.name = table.name
        self.producer = producer
        """The producer in use: replaced when the broker refuses its state (its owner stops
        the last one)."""
        self._new_producer = new_producer
        self._producer_refused: BaseException | None = None
        """The error that condemned the producer in use; the next batch replaces it."""
        self.config = config
        self.kafka_ok = False
        self.database_ok = False
        # The database refused the last claim (`is_database_refusal`): readiness says so.
        self.refused = False
        self._last_prune = 0.0
        self.wake = asyncio.Event()
        """Set when rows may be waiting (a notification); the relay then polls at once."""
        # Every series exists from the start (see the consumer runner for why); the two
        # touched on every batch are kept, not looked up each time.
        self._published = OUTBOX_PUBLISHED.labels(self.name)
        self._commit_to_ack = OUTBOX_COMMIT_TO_ACK.labels(self.name)
        OUTBOX_FAILED.labels(self.name)
        OUTBOX_PRUNED.labels(self.name)
        for kind in ("transient", "permanent"):
            OUTBOX_PUBLISH_ERRORS.labels(self.name, kind)
        self._dsn = driver_dsn(database_url)
        self._application_name = application_name
        self._limits = limits
        self.connection: asyncpg.Connection | None = None
        """The relay's own connection for its batches (made at the first batch, made again
        after a loss)."""
        self._database_url = database_url
        self._housekeeping: asyncpg.Pool | None = None
        """The prune's, the gauges' and readiness's connection (`housekeeping`), apart from
        the batches' so that a scrape never waits for a batch."""
        self._claim = CLAIM.format(table=table.name)
        self._release = RELEASE.format(table=table.name)
        self._gauges = GAUGES.format(table=table.name)

    # -- one batch

    async def publish_batch(self) -> int:
        """Claims (marking SENT), publishes and commits one batch; returns how many rows it
        claimed. Rows the broker did not acknowledge go back to PENDING before the commit."""
        if self._producer_refused is not None:
            await self._replace_producer()
        conn = await self._connect()
        try:
            # The poll's span holds the claim, the release of failed rows and the commit;
            # background work, so exported only when asked for (gozon.messaging.spans).
            async with relay_batch_span(self.name) as batch, conn.transaction():
                records = await conn.fetch(self._claim, self.config.batch_size)
                if not records:
                    return 0
                # RETURNING gives no order: publish in id order.
                rows = sorted(map(Claimed.of, records))  # tuples: by id, their first field
                if batch.is_recording():  # background tracing on (a dropped span keeps nothing)
                    # One batch publishes rows of many traces: its span links to each of them.
                    for row in rows:
                        batch.add_link(trace.get_current_span(row.context).get_span_context())
                    batch.set_attribute("gozon.batch.rows", len(rows))
                sent, outage = await self._publish(conn, rows)
        except BaseException as exc:
            # A connection lost, or left inside the transaction by a failed rollback, or
            # refused by the driver while it digests the server's goodbye, is dropped: the
            # server rolls the batch back, and the next batch connects anew.
            if unusable_after(conn, exc):
                conn.terminate()
                self.connection = None
            raise
        # Committed: only now are the rows SENT.
        now = datetime.now(UTC)
        for row in sent:
            self._commit_to_ack.observe(max(0.0, (now - row.created_at).total_seconds()))
        self._published.inc(len(sent))
        if outage is not None:
            OUTBOX_PUBLISH_ERRORS.labels(self.name, "transient").inc()
            raise BrokerUnavailable(repr(outage)) from outage
        return len(rows)

    async def _replace_producer(self) -> None:
        """Starts a new producer (a new producer id) in place of the refused one, then
        stops that one; a broker that cannot be reached meanwhile is an outage."""
        assert self._new_producer is not None
        fresh = self._new_producer()
        try:
            await fresh.start()
        except Exception as exc:
            await _stop_quietly(fresh)
            raise BrokerUnavailable(repr(exc)) from exc
        old, self.producer = self.producer, fresh
        refused, self._producer_refused = self._producer_refused, None
        log.info("a new producer took over", outbox=self.name, refused=repr(refused))
        await _stop_quietly(old)

    async def _connect(self) -> asyncpg.Connection:
        if self.connection is not None and self.connection.is_in_transaction():
            # Left inside a transaction (a statement the client gave up on ran when the server
            # resumed): a new batch would only nest in it. Dropped; the server rolls it back.
            self.connection.terminate()
            self.connection = None
        if self.connection is None or self.connection.is_closed():
            self.connection = await asyncpg.connect(
                self._dsn,
                timeout=5,
                # a stalled server fails the batch, which is retried as an outage, instead
                # of holding its rows' locks for ever; the server bounds every wait
                command_timeout=self._limits.command_timeout_s,
                server_settings={
                    "application_name": self._application_name,
                    **self._limits.server_settings(),
                },
            )
        return self.connection

    async def housekeeping(self) -> asyncpg.Pool:
        """The pool of one connection, bounded as the batches' (`SessionLimits`), for the
        prune, the gauges and readiness; made on demand (the relay starts while its database
        is down)."""
        if self._housekeeping is None:
            self._housekeeping = await worker_pool(
                self._database_url,
                size=1,
                application_name=self._application_name,
                limits=self._limits,
            )
        return self._housekeeping

    async def database_answers(self) -> bool:
        """Readiness: one round trip to the database."""
        return await pool_answers(await self.housekeeping())

    async def close(self) -> None:
        """Closes the relay's connections (`run` does it on its way out)."""
        pool, self._housekeeping = self._housekeeping, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except Exception:  # closing is best effort: the server ends the sessions anyway
                pool.terminate()
        conn, self.connection = self.connection, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), timeout=5)
            except Exception:  # closing is best effort: the server ends the session anyway
                conn.terminate()

    async def _publish(
        self, conn: asyncpg.Connection, rows: Sequence[Claimed]
    ) -> tuple[list[Claimed], BaseException | None]:
        """Publishes the claimed rows inside the claiming transaction; the rows not
        acknowledged go back to PENDING (one statement) before the caller commits.

        Returns the rows acknowledged, and the error if the broker turned out to be down.
        """
        # Enqueue in id order (the producer keeps that order per partition), then await
        # every acknowledgement.
        deliveries: list[tuple[Claimed, asyncio.Future[Any] | BaseException]] = []
        for row in rows:
            try:
                deliveries.append((row, await self._send(row)))
            except Exception as exc:
                deliveries.append((row, exc))
                if is_transient(exc):
                    break  # the rows after it are not tried: back to PENDING, no attempt
        sent: list[Claimed] = []
        failed: list[tuple[Claimed, BaseException]] = []
        deadline = asyncio.get_running_loop().time() + self.config.ack_timeout
        for row, delivery in deliveries:
            if isinstance(delivery, BaseException):
                failed.append((row, delivery))
                continue
            try:
                # shielded: the producer owns the future (and may still deliver it later)
                async with asyncio.timeout_at(deadline):
                    await asyncio.shield(delivery)
            except TimeoutError:
                failed.append((row, KafkaTimeoutError("no acknowledgement in time")))
            except Exception as exc:
                failed.append((row, exc))
            else:
                sent.append(row)
                log.info(
                    "published",
                    outbox=self.name,
                    row_id=row.id,
                    topic=row.topic,
                    aggregate_id=row.aggregate_id,
                    event_id=row.event_id,
                    **_trace_ids(row.headers),
                )
        if len(sent) == len(rows):
            return sent, None  # the happy path: nothing more to write
        # A transient error while the broker answers is about that message (a missing topic,
        # say): it counts an attempt. While the broker does not answer, it is an outage: no
        # attempt is counted and the relay backs off.
        outage = next((error for _, error in failed if is_transient(error)), None)
        if outage is not None and await broker_answers(self.producer):
            outage = None
        refused = next((e for _, e in failed if isinstance(e, PRODUCER_STATE_ERRORS)), None)
        if refused is not None and self._new_producer is not None:
            # The producer's fault, not the messages': no attempt, a new producer next batch.
            log.warning(
                "the broker refuses the producer's state: rows stay pending, a new producer "
                "takes over",
                outbox=self.name,
                error=repr(refused),
            )
            self._producer_refused = outage = refused
        release = _Release()
        for row, error in failed:
            if self._producer_refused is not None:
                release.add(row.id)
            elif outage is None or not is_transient(error):
                self._count_attempt(release, row, error)
            else:
                release.add(row.id)
        for row in rows[len(deliveries) :]:  # after a transient error: not tried
            release.add(row.id)
        await conn.execute(self._release, *release.args())
        return sent, outage

    async def _send(self, row: Claimed) -> asyncio.Future[Any]:
        """Enqueues one row in a PRODUCER span that continues the row's trace.

        The span's own context goes out as the Kafka headers, so the consumer's span is its
        child; it ends when the broker acknowledges (or refuses) the message.
        """
        span = start_send_span(
            row.topic,
            key=row.message_key,
            message_id=row.event_id or "",
            context=row.context,
            cluster=self.producer.client.cluster,
            attributes={"gozon.outbox.row_id": row.id},
        )
        headers = dict(row.headers)
        propagate.inject(headers, context=trace.set_span_in_context(span))
        try:
            future: asyncio.Future[Any] = await self.producer.send(
                row.topic,
                value=row.payload.encode(),
                key=row.message_key.encode(),
                headers=[(name, str(value).encode()) for name, value in headers.items()],
            )
        except BaseException as exc:
            end_send_span(span, exc)
            raise
        cluster = self.producer.client.cluster
        future.add_done_callback(lambda done: end_send_span(span, done, cluster))
        return future

    def _count_attempt(self, release: _Release, row: Any, exc: BaseException) -> None:
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
        release.add(row.id, status=FAILED if final else PENDING, error=repr(exc), delay=delay)

    # -- the loop

    async def run(self, stop: asyncio.Event) -> None:
        """Publishes until `stop` is set; the batch in hand is always finished first."""
        stopper = asyncio.create_task(self._wake_on(stop))
        try:
            await self._loop(stop)
        finally:
            stopper.cancel()
            await self.close()

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
                if is_database_busy(exc):  # a lock not granted in time, say: try again
                    log.warning("database busy, claiming again", outbox=self.name, error=repr(exc))
                    await sleep_unless(stop, outage_delay)
                    outage_delay = min(outage_delay * 2, self.config.outage_backoff_max)
                    continue
                if not (is_database_outage(exc) or is_database_refusal(exc)):
                    raise
                self._database_down(exc)
                await sleep_unless(stop, outage_delay)
                outage_delay = min(outage_delay * 2, self.config.outage_backoff_max)
                continue
            if not self.database_ok or (claimed and not self.kafka_ok):
                log.info("relay healthy", outbox=self.name)
            self.database_ok = True
            self.refused = False
            if claimed:
                self.kafka_ok = True
            outage_delay = 0.1
            await self._maybe_prune(stop)
            if claimed < self.config.batch_size:
                # asyncio.timeout, not wait_for: no task made per wait (wait_for wraps the
                # wait in one, a loop turn more between the notification and the claim)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.fallback_poll):
                        await self.wake.wait()

    def _database_down(self, exc: BaseException) -> None:
        refused = is_database_refusal(exc)
        if refused and not self.refused:  # logged from the first claim on, start-up included
            log.error(
                "the database refuses the relay (its role, grants or schema, or a read-only "
                "server): rows stay pending until it is fixed",
                outbox=self.name,
                error=repr(exc),
            )
        elif not refused and self.database_ok:
            log.warning("database unavailable", outbox=self.name, error=repr(exc))
        self.database_ok = False
        self.refused = refused

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
            pruned = await prune_sent(await self.housekeeping(), self.table, self.config.retention)
        except Exception as exc:
            if is_database_outage(exc):
                self._database_down(exc)
            elif is_database_busy(exc):
                log.warning("pruning waited too long for a lock", outbox=self.name, error=repr(exc))
            else:
                log.error("pruning sent outbox rows failed", outbox=self.name, exc_info=exc)
            return
        if pruned:
            log.info("pruned sent outbox rows", outbox=self.name, rows=pruned)

    async def refresh_gauges(self) -> None:
        """Outbox lag at scrape time: pending rows and the age of the oldest (one cheap query)."""
        async with batch_connection(await self.housekeeping()) as conn:
            pending, oldest = await conn.fetchrow(self._gauges)
        OUTBOX_PENDING.labels(self.name).set(pending)
        age = (datetime.now(UTC) - oldest).total_seconds() if oldest else 0.0
        OUTBOX_OLDEST_AGE.labels(self.name).set(max(0.0, age))


async def prune_sent(
    pool: asyncpg.Pool, table: Table, retention: timedelta, *, chunk: int = 5000
) -> int:
    """Deletes SENT rows older than `retention`, in chunks so no transaction grows large
    (each chunk one autocommit statement, `PRUNE`)."""
    statement = PRUNE.format(table=table.name)
    total = 0
    while True:
        async with batch_connection(pool) as conn:
            status = await conn.execute(statement, retention, chunk)
        deleted = int(status.split()[-1])  # "DELETE n"
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


async def replay_sent(engine: AsyncEngine, table: Table, since: datetime) -> int:
    """Puts every SENT row created at or after `since` back in the queue, to be published
    again: after a database is restored from a backup, the events of its last minutes may not
    have reached the other service's (restored) database. The consumers are idempotent (the
    payments inbox, the orders' guarded status change), so what was already applied is
    skipped as a duplicate (docs/operations.md, "Restoring from a backup")."""
    async with engine.begin() as conn:
        result = await conn.execute(
            update(table)
            .where(table.c.status == SENT, table.c.created_at >= since)
            .values(status=PENDING, attempts=0, next_attempt_at=func.now(), sent_at=None)
        )
    return int(getattr(result, "rowcount", 0) or 0)


async def _stop_quietly(producer: AIOKafkaProducer) -> None:
    """Stops a producer given up on: its undelivered messages are PENDING rows again."""
    try:
        async with asyncio.timeout(STOP_OLD_PRODUCER_S):
            await producer.stop()
    except Exception as exc:  # best effort: the broker forgets the producer anyway
        log.warning("stopping a replaced producer failed", error=repr(exc))


def _trace_ids(headers: dict[str, str]) -> dict[str, str]:
    """The row's own trace and span ids (its `traceparent` is 00-<trace>-<span>-<flags>), for
    a log line written inside the batch's span, which belongs to no order's trace."""
    parts = headers.get("traceparent", "").split("-")
    return {"trace_id": parts[1], "span_id": parts[2]} if len(parts) == 4 else {}
