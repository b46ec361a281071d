"""Composition roots of the relay and consumer processes, shared by both services.

Each builds its engine, Kafka clients and side port in `main`, waits (reporting not ready)
while Kafka or the database is not there yet, runs until SIGTERM, and closes what it built.
A worker that crashed in a row before this start first backs off (`gozon.core.crashloop`).
A worker whose Kafka password file changes under it (a rotated KafkaUser secret) stops
cleanly and exits with `RESTART_FOR_NEW_CREDENTIALS`, so that its supervisor starts it again
with the new password: a client logs in only when it connects, and would otherwise keep the
old password until the broker refuses it, for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import TypeVar

import structlog
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from pydantic import BaseModel
from sqlalchemy import Table

from gozon.core.crashloop import CrashMemory
from gozon.core.health import Readiness
from gozon.core.pg import pool_answers, worker_pool
from gozon.core.runtime import sleep_unless, stop_on_signals
from gozon.core.settings import MessagingSettings
from gozon.core.sideport import side_port
from gozon.messaging.consumer import ConsumerRunner
from gozon.messaging.kafka import (
    KafkaAccess,
    KafkaAccessRefused,
    broker_answers,
    ensure_topics,
    is_transient,
    new_consumer,
    new_producer,
    start_client,
)
from gozon.messaging.relay import OutboxRelay, RelayConfig
from gozon.messaging.subscription import Subscription, no_notify
from gozon.messaging.wakeup import OutboxListener, OutboxNotifier

log = structlog.get_logger(__name__)
E = TypeVar("E", bound=BaseModel)

RESTART_FOR_NEW_CREDENTIALS = 75  # EX_TEMPFAIL: every supervisor here restarts on it
PASSWORD_CHECK_EVERY_S = 5.0


async def _stop_when_password_changes(
    settings: MessagingSettings, kafka: KafkaAccess, stop: asyncio.Event, changed: asyncio.Event
) -> None:
    """Sets `changed` and `stop` once GOZON_KAFKA_SASL_PASSWORD_FILE no longer holds the
    password the clients log in with, `kafka`'s (a missing or unreadable file is not a
    change)."""
    if settings.kafka_sasl_password_file is None:
        return
    started_with = kafka.password
    while not stop.is_set():
        await sleep_unless(stop, PASSWORD_CHECK_EVERY_S)
        try:
            now = settings.kafka_sasl_password_value()
        except OSError:  # a secret volume between two updates
            continue
        if now != started_with:
            log.warning(
                "the Kafka password file changed: stopping, to be started again with it",
                password_file=str(settings.kafka_sasl_password_file),
            )
            changed.set()
            stop.set()
            return


@contextlib.asynccontextmanager
async def _restart_on_new_password(
    settings: MessagingSettings, kafka: KafkaAccess, stop: asyncio.Event
) -> AsyncIterator[None]:
    changed = asyncio.Event()
    watcher = asyncio.create_task(_stop_when_password_changes(settings, kafka, stop, changed))
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if changed.is_set():
        raise SystemExit(RESTART_FOR_NEW_CREDENTIALS)


@dataclass(frozen=True)
class WorkerSpec:
    """What differs between the services' workers."""

    service: str
    database_url: str
    metrics_host: str
    metrics_port: int


def relay_config(settings: MessagingSettings) -> RelayConfig:
    return RelayConfig(
        batch_size=settings.relay_batch_size,
        fallback_poll=settings.relay_fallback_poll_ms / 1000,
        max_attempts=settings.relay_max_attempts,
        backoff_base=settings.relay_backoff_base_ms / 1000,
        backoff_max=settings.relay_backoff_max_ms / 1000,
        retention=timedelta(hours=settings.relay_retention_hours),
        prune_interval=settings.relay_prune_interval_s,
    )


# Readiness check: the database answers, and also runs the worker's statements (false while it
# refuses them: a revoked grant, a migration not run, a read-only standby).
ACCEPTS_WORK = "database_accepts_work"


def _not(refused: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return not refused()

    return check


def _flag(readiness: Readiness, name: str) -> asyncio.Event:
    """An event that readiness reports as the check `name`."""
    flag = asyncio.Event()

    async def check() -> bool:
        return flag.is_set()

    readiness.add(name, check)
    return flag


async def _until_started(
    what: str, start: Callable[[], Awaitable[object]], stop: asyncio.Event
) -> bool:
    """Retries a start-up step that needs Kafka until it works; False if stopped first.

    Any Kafka error is waited out (a broker that is starting answers with errors that are
    not marked retriable, such as an unknown API version): the process stays live and not
    ready, and carries on once the broker answers. Only an error that is not Kafka's (a bug)
    ends the process. A broker refusing the credentials is waited out too (a user operator
    may not have made the user yet), logged as an error that says so.
    """
    delay = 0.2
    while not stop.is_set():
        try:
            await start()
            return True
        except Exception as exc:
            if not (is_transient(exc) or isinstance(exc, KafkaError)):
                raise
            if isinstance(exc, KafkaAccessRefused):
                log.error("kafka refuses this process", step=what, error=str(exc))
            else:
                log.warning("waiting for kafka", step=what, error=repr(exc))
            await sleep_unless(stop, delay)
            delay = min(delay * 2, 5.0)
    return False


async def _backed_off(memory: CrashMemory, stop: asyncio.Event) -> bool:
    """Waits out the crash-loop back-off (`gozon.core.crashloop`) before the worker starts its
    work, live and not ready, its metrics served; False if stopped first."""
    if memory.backoff_s:
        log.warning(
            "crashed in a row before this start: waiting before starting its work",
            crashes=memory.crashes,
            backoff_s=memory.backoff_s,
            last_error=memory.last_error,
        )
        await sleep_unless(stop, memory.backoff_s)
    return not stop.is_set()


async def run_relay(
    spec: WorkerSpec, settings: MessagingSettings, table: Table, topics: list[str]
) -> None:
    stop = stop_on_signals()
    kafka = KafkaAccess.from_settings(settings)  # the password is read here, once
    async with _restart_on_new_password(settings, kafka, stop):
        await _run_relay(spec, settings, kafka, table, topics, stop)


async def _run_relay(
    spec: WorkerSpec,
    settings: MessagingSettings,
    kafka: KafkaAccess,
    table: Table,
    topics: list[str],
    stop: asyncio.Event,
) -> None:
    memory = CrashMemory.load(settings.crash_state_dir, f"{spec.service}-relay")
    limits = settings.relay_session_limits
    # the first producer, and each one in place of a producer whose state the broker refuses
    # (see gozon.messaging.relay)
    make_producer = partial(new_producer, kafka, client_id=f"{spec.service}-relay")
    producer = make_producer()
    relay = OutboxRelay(
        table=table,
        producer=producer,
        config=relay_config(settings),
        database_url=spec.database_url,
        application_name=f"{spec.service}-relay",
        limits=limits,
        new_producer=make_producer,
    )
    readiness = Readiness()
    readiness.add("database", relay.database_answers)
    readiness.add(ACCEPTS_WORK, _not(lambda: relay.refused))
    readiness.add("kafka", lambda: broker_answers(relay.producer))
    started = _flag(readiness, "started")  # its start-up steps done (they wait for Kafka)
    try:
        async with side_port(
            spec.metrics_host, spec.metrics_port, readiness, before_scrape=[relay.refresh_gauges]
        ):
            listener = OutboxListener(spec.database_url, table.name, relay.wake)
            if (
                await _backed_off(memory, stop)
                and await _until_started("producer", lambda: start_client(producer, kafka), stop)
                and await _until_started(
                    "topics",
                    lambda: ensure_topics(
                        kafka,
                        topics,
                        partitions=settings.kafka_topic_partitions,
                        replication_factor=settings.kafka_replication_factor,
                        # Creating, it makes the topic's dead-letter twin too; only checking, it
                        # looks at what it writes (its user need not see the other's DLQ).
                        with_dlq=settings.kafka_create_topics,
                        create=settings.kafka_create_topics,
                    ),
                    stop,
                )
            ):
                log.info("relay started", outbox=table.name, topics=topics)
                started.set()
                async with listener.running():
                    await relay.run(stop)
    except Exception as exc:
        memory.crashed(exc)
        raise
    else:
        memory.stopped_cleanly()
    finally:
        await relay.producer.stop()  # the one in use: a replaced one was stopped then
        await relay.close()
        log.info("relay stopped", outbox=table.name)


async def run_consumer(
    spec: WorkerSpec, settings: MessagingSettings, subscription: Subscription[E], *, group_id: str
) -> None:
    """Runs the service's subscription (see `gozon.messaging.subscription`) until SIGTERM."""
    stop = stop_on_signals()
    kafka = KafkaAccess.from_settings(settings)  # the password is read here, once
    async with _restart_on_new_password(settings, kafka, stop):
        await _run_consumer(spec, settings, kafka, subscription, group_id, stop)


async def _run_consumer(
    spec: WorkerSpec,
    settings: MessagingSettings,
    kafka: KafkaAccess,
    subscription: Subscription[E],
    group_id: str,
    stop: asyncio.Event,
) -> None:
    topic = subscription.topic
    memory = CrashMemory.load(settings.crash_state_dir, f"{spec.service}-consumer")
    # The batches' pool: one connection per partition handled side by side, one spare (the
    # scrape hooks, readiness). Made on demand: the process starts while the database is down.
    pool = await worker_pool(
        spec.database_url,
        size=settings.kafka_topic_partitions + 1,
        application_name=f"{spec.service}-consumer",
        limits=settings.consumer_session_limits,
    )
    producer = new_producer(kafka, client_id=f"{spec.service}-consumer-dlq")
    consumer: AIOKafkaConsumer = new_consumer(
        kafka,
        group_id=group_id,
        client_id=f"{spec.service}-consumer",
        session_timeout_ms=settings.consumer_session_timeout_ms,
    )  # the runner subscribes it to the topic, with its rebalance listener
    notifier = (  # on a connection of its own
        OutboxNotifier(spec.database_url, subscription.outbox.name)
        if subscription.outbox is not None
        else None
    )
    runner = ConsumerRunner(
        consumer=consumer,
        producer=producer,
        topic=topic,
        schema=subscription.schema,
        handler=subscription.handler(pool, notifier.notify if notifier else no_notify),
        max_handler_attempts=settings.consumer_max_handler_attempts,
        commit_interval=settings.consumer_commit_interval_ms / 1000,
    )
    readiness = Readiness()
    readiness.add("database", lambda: pool_answers(pool))
    readiness.add(ACCEPTS_WORK, _not(lambda: runner.refused))
    readiness.add("kafka", lambda: broker_answers(producer))
    started = _flag(readiness, "started")  # its start-up steps done (they wait for Kafka)
    try:
        hooks = [partial(hook, pool) for hook in subscription.scrape_hooks]
        async with side_port(spec.metrics_host, spec.metrics_port, readiness, hooks):
            if (
                await _backed_off(memory, stop)
                and await _until_started("producer", lambda: start_client(producer, kafka), stop)
                and await _until_started(
                    "topics",
                    lambda: ensure_topics(
                        kafka,
                        [topic],
                        partitions=settings.kafka_topic_partitions,
                        replication_factor=settings.kafka_replication_factor,
                        create=settings.kafka_create_topics,
                    ),
                    stop,
                )
                and await _until_started("consumer", lambda: start_client(consumer, kafka), stop)
            ):
                log.info("consumer started", topic=topic, group_id=group_id)
                started.set()
                async with contextlib.AsyncExitStack() as stack:
                    if notifier:
                        await stack.enter_async_context(notifier.running())
                    await runner.run(stop)
    except Exception as exc:
        memory.crashed(exc)
        raise
    else:
        memory.stopped_cleanly()
    finally:
        await consumer.stop()
        await producer.stop()
        try:
            await asyncio.wait_for(pool.close(), timeout=5)
        except Exception:  # closing is best effort: the server ends the sessions anyway
            pool.terminate()
        log.info("consumer stopped", topic=topic)
