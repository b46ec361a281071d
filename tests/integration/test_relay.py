"""The outbox relay against the real PostgreSQL and Kafka: delivery, outages, crashes, replicas."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TypeAlias

import port_for
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from devstack import GozonProcess, Kafka, Postgres, wait_for
from gozon.contracts import ORDER_CREATED_TOPIC, OrderCreated, OrderCreatedPayload, utc_now
from gozon.core.pg import worker_pool
from gozon.core.telemetry import current_trace_headers
from gozon.messaging.kafka import new_producer
from gozon.messaging.relay import (
    OutboxRelay,
    RelayConfig,
    prune_sent,
    replay_sent,
    requeue_failed,
)
from gozon.messaging.wakeup import OutboxListener
from gozon.orders.api import build_app
from gozon.orders.models import order_outbox
from gozon.orders.settings import OrdersSettings
from tests.conftest import serve, until
from tests.integration.conftest import create_topics_async

pytestmark = pytest.mark.integration
Record: TypeAlias = ConsumerRecord[bytes, bytes]


# --------------------------------------------------------------------------- helpers


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


def event_for(user_id: str) -> OrderCreated:
    order_id = uuid.uuid4()
    return OrderCreated(
        aggregate_id=str(order_id),
        payload=OrderCreatedPayload(
            order_id=order_id,
            user_id=user_id,
            amount=Decimal("10.50"),
            description="test",
            created_at=utc_now(),
        ),
    )


async def insert_events(engine: AsyncEngine, topic: str, count: int, keys: int = 10) -> set[str]:
    """Outbox rows as the orders service writes them, in one transaction; returns their
    event ids."""
    ids: set[str] = set()
    async with engine.begin() as conn:
        for n in range(count):
            event = event_for(f"user-{n % keys}")
            ids.add(str(event.event_id))
            await conn.execute(
                insert(order_outbox).values(
                    topic=topic,
                    message_key=event.payload.user_id,
                    payload=event.model_dump(mode="json"),
                    headers=current_trace_headers(),
                    aggregate_id=event.aggregate_id,
                    event_type=event.event_type,
                )
            )
    return ids


async def statuses(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(order_outbox.c.status, func.count()).group_by(order_outbox.c.status)
        )
        return {status: count for status, count in rows.all()}


async def consume(
    bootstrap: str, topic: str, *, at_least: int, within: float = 30, settle: float = 1.0
) -> list[Record]:
    """Every record of the topic from the start: waits for `at_least`, then `settle` more
    seconds so that duplicates have their chance to show up."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    records: list[Record] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        settle_until: float | None = None
        while loop.time() < deadline and (settle_until is None or loop.time() < settle_until):
            batch = await consumer.getmany(timeout_ms=200)
            for part in batch.values():
                records.extend(part)
            if settle_until is None and len(records) >= at_least:
                settle_until = loop.time() + settle
    finally:
        await consumer.stop()
    return records


def event_ids(records: list[Record]) -> list[str]:
    return [json.loads(record.value)["event_id"] for record in records]


@asynccontextmanager
async def running_relay(
    engine: AsyncEngine, bootstrap: str, config: RelayConfig | None = None
) -> AsyncIterator[OutboxRelay]:
    producer = new_producer(bootstrap, client_id="test-relay")
    await producer.start()
    relay = OutboxRelay(
        table=order_outbox,
        producer=producer,
        config=config or RelayConfig(),
        database_url=engine.url.render_as_string(hide_password=False),
        new_producer=lambda: new_producer(bootstrap, client_id="test-relay"),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        yield relay
    finally:
        stop.set()
        await task
        await relay.producer.stop()


def transient_errors(relay: GozonProcess) -> float:
    """The relay's count of publish attempts that found the broker unreachable."""
    metrics = urllib.request.urlopen(relay.health_url + "/metrics", timeout=5).read().decode()  # noqa: S310
    for line in metrics.splitlines():
        if line.startswith("gozon_outbox_publish_errors_total{") and 'kind="transient"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def relay_process(orders_db: str, bootstrap: str, log: Path) -> GozonProcess:
    port = port_for.select_random()
    return GozonProcess(
        ["orders", "relay"],
        env={
            "GOZON_ORDERS_DATABASE_URL": orders_db,
            "GOZON_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "GOZON_ORDERS_RELAY_METRICS_PORT": str(port),
            "GOZON_ORDERS_API_HOST": "127.0.0.1",
        },
        log=log,
        health_url=f"http://127.0.0.1:{port}",
    )


# --------------------------------------------------------------------------- tests


async def test_a_created_order_reaches_kafka_with_envelope_key_and_traceparent(
    orders_db: str, engine: AsyncEngine, kafka: Kafka
) -> None:
    await create_topics_async(kafka.bootstrap, ORDER_CREATED_TOPIC)
    user_id = f"u-{uuid.uuid4().hex[:10]}"
    async with serve(build_app(OrdersSettings(orders_database_url=orders_db))) as client:
        response = await client.post(
            "/api/orders",
            headers={"X-User-Id": user_id},
            json={"amount": 1500.99, "description": "Тестовый заказ"},
        )
    assert response.status_code == 201
    order = response.json()
    async with engine.connect() as conn:
        stored_headers = (await conn.execute(select(order_outbox.c.headers))).scalar_one()

    async with running_relay(engine, kafka.bootstrap):
        await until(lambda: _all_sent(engine), 120, "the row to be SENT")
    records = [
        r
        for r in await consume(kafka.bootstrap, ORDER_CREATED_TOPIC, at_least=1)
        if r.key == user_id.encode()
    ]

    assert len(records) == 1
    record = records[0]
    envelope = json.loads(record.value)
    assert set(envelope) == {
        "event_id",
        "event_type",
        "schema_version",
        "occurred_at",
        "aggregate_id",
        "payload",
    }
    assert envelope["event_type"] == "OrderCreated"
    assert envelope["schema_version"] == 1
    assert envelope["aggregate_id"] == order["id"]
    assert envelope["payload"] == {
        "order_id": order["id"],
        "user_id": user_id,
        "amount": 1500.99,
        "description": "Тестовый заказ",
        "created_at": envelope["payload"]["created_at"],
    }
    # a JSON number with the request's digits (the row's JSON text as stored, sent as it is)
    assert re.search(rb'"amount": ?1500\.99[,}]', record.value), record.value
    # Same trace as the HTTP request; the parent is now the relay's PRODUCER span.
    sent_trace = dict(record.headers)["traceparent"].decode().split("-")
    stored_trace = stored_headers["traceparent"].split("-")
    assert sent_trace[0] == "00"
    assert sent_trace[1] == stored_trace[1]
    assert sent_trace[2] != stored_trace[2]
    assert await statuses(engine) == {"SENT": 1}


async def _all_sent(engine: AsyncEngine) -> bool:
    return set(await statuses(engine)) == {"SENT"}


async def test_relay_keeps_rows_pending_while_kafka_is_down_and_loses_none(
    orders_db: str, engine: AsyncEngine, private_kafka: Kafka, process_logs: Path
) -> None:
    relay = relay_process(orders_db, private_kafka.bootstrap, process_logs / "relay.log")
    relay.start(ready=True)
    try:
        await asyncio.to_thread(private_kafka.stop)
        await asyncio.to_thread(
            wait_for,
            lambda: relay.status() == 503,
            timeout=120,
            what="the relay to report not ready",
        )

        created: set[str] = set()
        async with serve(build_app(OrdersSettings(orders_database_url=orders_db))) as client:
            for n in range(30):
                response = await client.post(
                    "/api/orders",
                    headers={"X-User-Id": f"user-{n % 4}"},
                    json={"amount": n + 1, "description": f"order {n}"},
                )
                assert response.status_code == 201
                created.add(response.json()["id"])
        # The relay has tried them (and found the broker down), not merely not got to them.
        await asyncio.to_thread(
            wait_for,
            lambda: transient_errors(relay) >= 2,
            timeout=120,
            what="the relay to try the rows against the stopped broker",
        )
        assert await statuses(engine) == {"PENDING": 30}
        async with engine.connect() as conn:
            attempts = await conn.scalar(select(func.max(order_outbox.c.attempts)))
        assert attempts == 0  # an outage burns no attempts
        assert relay.status() == 503

        await asyncio.to_thread(private_kafka.start)
        await asyncio.to_thread(
            wait_for,
            lambda: relay.status() == 200,
            timeout=120,
            what="the relay to report ready again",
        )
        await until(lambda: _all_sent(engine), 120, "every row to be SENT")
        records = await consume(private_kafka.bootstrap, ORDER_CREATED_TOPIC, at_least=30)
        published = {json.loads(r.value)["aggregate_id"] for r in records}
        assert published == created
        assert relay.stop() == 0  # SIGTERM: a clean exit
    finally:
        relay.kill()


async def test_a_frozen_broker_counts_transient_publish_errors_while_rows_wait(
    orders_db: str, engine: AsyncEngine, private_kafka: Kafka, process_logs: Path
) -> None:
    """Kafka frozen (SIGSTOP: its sockets stay open, nothing answers) with rows pending: the
    relay's transient publish-error counter rises, as the runbook's first step expects."""
    relay = relay_process(orders_db, private_kafka.bootstrap, process_logs / "relay.log")
    relay.start(ready=True)
    pid = private_kafka.running_pid()
    assert pid is not None
    try:
        async with serve(build_app(OrdersSettings(orders_database_url=orders_db))) as client:
            response = await client.post(
                "/api/orders",
                headers={"X-User-Id": "user-0"},
                json={"amount": 1, "description": "a"},
            )
            assert response.status_code == 201
        await until(lambda: _all_sent(engine), 120, "the first row to be SENT")
        before = transient_errors(relay)
        os.kill(pid, signal.SIGSTOP)
        try:
            async with serve(build_app(OrdersSettings(orders_database_url=orders_db))) as client:
                for n in range(5):
                    response = await client.post(
                        "/api/orders",
                        headers={"X-User-Id": f"user-{n}"},
                        json={"amount": n + 1, "description": f"order {n}"},
                    )
                    assert response.status_code == 201
            await asyncio.to_thread(
                wait_for,
                lambda: transient_errors(relay) > before,
                timeout=120,
                what="a transient publish error counted against the frozen broker",
            )
            assert (await statuses(engine)).get("PENDING", 0) >= 1
        finally:
            os.kill(pid, signal.SIGCONT)
        await until(lambda: _all_sent(engine), 180, "every row to be SENT after the thaw")
    finally:
        os.kill(pid, signal.SIGCONT)
        relay.kill()


async def test_two_relay_processes_publish_every_row_and_none_twice(
    orders_db: str, engine: AsyncEngine, kafka: Kafka, topic: str, process_logs: Path
) -> None:
    expected = await insert_events(engine, topic, 3000, keys=25)
    relays = [
        relay_process(orders_db, kafka.bootstrap, process_logs / f"relay-{n}.log") for n in range(2)
    ]
    try:
        for relay in relays:
            relay.start()
        await until(lambda: _all_sent(engine), 60, "every row to be SENT")
        records = await consume(kafka.bootstrap, topic, at_least=len(expected))
    finally:
        for relay in relays:
            relay.stop()
    ids = event_ids(records)
    duplicates = len(ids) - len(set(ids))
    print(f"two relays: {len(ids)} messages, {len(set(ids))} distinct, {duplicates} duplicates")
    assert set(ids) == expected
    assert duplicates == 0  # SKIP LOCKED: no row is ever held by both relays


async def test_a_relay_killed_after_publishing_and_before_committing_publishes_again(
    orders_db: str, engine: AsyncEngine, kafka: Kafka, topic: str, process_logs: Path
) -> None:
    (event_id,) = await insert_events(engine, topic, 1)
    # Hold the relay between the broker's ack and its commit: the claim marks the row SENT,
    # and a deferred trigger on that update runs at COMMIT, which comes after the ack.
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "CREATE FUNCTION hold() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN PERFORM pg_sleep(600); RETURN NEW; END $$"
            )
        )
        await conn.execute(
            text(
                "CREATE CONSTRAINT TRIGGER hold AFTER UPDATE ON order_outbox "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                "WHEN (NEW.status = 'SENT') EXECUTE FUNCTION hold()"
            )
        )
    first = relay_process(orders_db, kafka.bootstrap, process_logs / "relay-1.log").start()
    try:
        records = await consume(kafka.bootstrap, topic, at_least=1, settle=0)
        assert event_ids(records) == [event_id]
    finally:
        first.kill()
    async with engine.begin() as conn:
        # The server notices the dead client (here at once, rather than at TCP keepalive).
        await conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'orders-relay' AND datname = current_database()"
            )
        )
        await conn.execute(text("DROP TRIGGER hold ON order_outbox"))
    assert await statuses(engine) == {"PENDING": 1}  # the claim's SENT died uncommitted

    second = relay_process(orders_db, kafka.bootstrap, process_logs / "relay-2.log").start()
    try:
        await until(lambda: _all_sent(engine), 120, "the row to be SENT")
    finally:
        second.stop()
    records = await consume(kafka.bootstrap, topic, at_least=2)
    assert event_ids(records) == [event_id, event_id]  # at least once, shown


async def test_a_message_the_broker_refuses_is_retried_then_failed_and_can_be_requeued(
    engine: AsyncEngine, kafka: Kafka, topic: str
) -> None:
    async with engine.begin() as conn:
        big = await conn.scalar(
            insert(order_outbox)
            .values(
                aggregate_id="big",
                event_type="OrderCreated",
                topic=topic,
                message_key="user-big",
                payload={"padding": "x" * 2_000_000},
            )
            .returning(order_outbox.c.id)
        )
    small = await insert_events(engine, topic, 2)
    config = RelayConfig(max_attempts=3, backoff_base=0.05, backoff_max=0.1)
    async with running_relay(engine, kafka.bootstrap, config):
        await until(
            lambda: _statuses_are(engine, {"FAILED": 1, "SENT": 2}),
            20,
            "the big row FAILED and the small ones SENT",
        )
    async with engine.connect() as conn:
        row = (await conn.execute(select(order_outbox).where(order_outbox.c.id == big))).one()
    assert row.attempts == 3
    assert "MessageSizeTooLarge" in row.last_error
    records = await consume(kafka.bootstrap, topic, at_least=2)
    assert set(event_ids(records)) == small  # the refused row held nothing up

    async with engine.begin() as conn:
        await conn.execute(
            update(order_outbox)
            .where(order_outbox.c.id == big)
            .values(payload={"event_id": "requeued"})
        )
    assert await requeue_failed(engine, order_outbox) == 1
    async with running_relay(engine, kafka.bootstrap, config):
        await until(lambda: _all_sent(engine), 120, "the requeued row to be SENT")
    records = await consume(kafka.bootstrap, topic, at_least=3)
    assert "requeued" in event_ids(records)


async def test_a_producer_state_the_broker_refuses_is_replaced_without_burning_attempts(
    engine: AsyncEngine, kafka: Kafka, topic: str
) -> None:
    """The producer's sequence numbers ahead of the broker's, as after a broker's pod was
    deleted under load on the node (`make test-strimzi`): the broker refuses every later
    message of those partitions as OutOfOrderSequenceNumber, which aiokafka never recovers
    from. The relay replaces the producer: the rows are published, none FAILED, no attempt
    burned."""
    config = RelayConfig(max_attempts=3, backoff_base=0.05, backoff_max=0.1)
    async with running_relay(engine, kafka.bootstrap, config) as relay:
        first = await insert_events(engine, topic, 6)
        await until(lambda: _all_sent(engine), 60, "the first rows to be SENT")
        refused = relay.producer
        state = refused._txn_manager  # the desync, made on purpose (aiokafka internals)
        assert state is not None
        for partition in range(3):  # the topic's partitions: each ahead of the broker
            state.increment_sequence_number(TopicPartition(topic, partition), 7)
        then = await insert_events(engine, topic, 6)
        await until(lambda: _all_sent(engine), 60, "the rows after the desync to be SENT")
        assert relay.producer is not refused
    async with engine.connect() as conn:
        attempts = await conn.scalar(select(func.max(order_outbox.c.attempts)))
    assert attempts == 0, "a refused producer is not the messages' fault"
    records = await consume(kafka.bootstrap, topic, at_least=12)
    assert set(event_ids(records)) == first | then


async def _statuses_are(engine: AsyncEngine, wanted: dict[str, int]) -> bool:
    return await statuses(engine) == wanted


async def test_sent_rows_are_pruned_after_the_retention_period(
    engine: AsyncEngine, kafka: Kafka, topic: str
) -> None:
    await insert_events(engine, topic, 5)
    async with running_relay(engine, kafka.bootstrap):
        await until(lambda: _all_sent(engine), 120, "the rows to be SENT")
    await insert_events(engine, topic, 2)  # pending: never pruned
    pool = await worker_pool(
        engine.url.render_as_string(hide_password=False), size=1, application_name="test-prune"
    )
    try:
        assert await prune_sent(pool, order_outbox, timedelta(hours=1)) == 0
        assert await prune_sent(pool, order_outbox, timedelta(0), chunk=2) == 5
    finally:
        await pool.close()
    assert await statuses(engine) == {"PENDING": 2}


async def test_replay_publishes_the_sent_rows_since_a_time_again(
    engine: AsyncEngine, kafka: Kafka, topic: str
) -> None:
    """After a restore (docs/operations.md): SENT rows created since the cut go out again;
    older ones and those still pending are left as they are."""
    await insert_events(engine, topic, 4)
    async with running_relay(engine, kafka.bootstrap):
        await until(lambda: _all_sent(engine), 120, "the rows to be SENT")
    async with engine.begin() as conn:
        await conn.execute(
            update(order_outbox)
            .where(order_outbox.c.id <= 2)
            .values(created_at=func.now() - timedelta(hours=2))
        )
    await insert_events(engine, topic, 1)
    cut = datetime.now(UTC) - timedelta(hours=1)
    assert await replay_sent(engine, order_outbox, cut) == 2
    assert await statuses(engine) == {"SENT": 2, "PENDING": 3}
    async with running_relay(engine, kafka.bootstrap):
        await until(lambda: _all_sent(engine), 120, "the replayed rows to be SENT")
    records = await consume(kafka.bootstrap, topic, at_least=7)
    published = Counter(event_ids(records))
    assert sorted(published.values()) == [1, 1, 1, 2, 2]


async def test_the_requeue_command_reports_what_it_requeued(orders_db: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "gozon",
        "orders",
        "outbox",
        "requeue-failed",
        env={"GOZON_ORDERS_DATABASE_URL": orders_db, "PATH": _venv_path()},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    assert process.returncode == 0, output
    assert b"requeued 0 FAILED order_outbox rows" in output


def _venv_path() -> str:
    import os
    import sys

    return f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"


async def test_a_committed_order_wakes_the_relay_at_once_not_at_the_fallback_poll(
    orders_db: str, engine: AsyncEngine, kafka: Kafka
) -> None:
    await create_topics_async(kafka.bootstrap, ORDER_CREATED_TOPIC)
    # Only a notification can wake it within the test's patience (`until`'s 30 s).
    config = RelayConfig(fallback_poll=600)
    listener = OutboxListener(orders_db, order_outbox.name, asyncio.Event())
    async with running_relay(engine, kafka.bootstrap, config) as relay:
        listener.wake = relay.wake
        async with listener.running():

            async def listening() -> bool:
                return listener.listening

            await until(listening, 120, "the listener to listen")
            await _wake_up_orders(orders_db, engine)


async def _wake_up_orders(orders_db: str, engine: AsyncEngine) -> None:
    async with serve(build_app(OrdersSettings(orders_database_url=orders_db))) as client:
        for n in range(3):
            response = await client.post(
                "/api/orders",
                headers={"X-User-Id": "wake"},
                json={"amount": n + 1, "description": "wake"},
            )
            assert response.status_code == 201
            await until(lambda: _all_sent(engine), 120, f"order {n} to be SENT")
        # the API's wake-ups went on its notifier's own connection, and the relay's listener
        # waits on its own: each named after the outbox, for pg_stat_activity
        async with engine.connect() as conn:
            names = await conn.scalars(
                text(
                    "SELECT application_name FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name LIKE 'order_outbox-%'"
                )
            )
            assert sorted(names) == ["order_outbox-listener", "order_outbox-notifier"]


async def test_the_relay_is_not_ready_while_its_database_is_down_and_recovers(
    private_postgres: Postgres, kafka: Kafka, process_logs: Path
) -> None:
    relay = relay_process(
        private_postgres.url("order_db"), kafka.bootstrap, process_logs / "relay.log"
    )
    relay.start(ready=True)
    try:
        await asyncio.to_thread(private_postgres.stop)
        await asyncio.to_thread(
            wait_for,
            lambda: relay.status() == 503,
            timeout=120,
            what="the relay to report not ready",
        )
        assert relay.status("/health/live") == 200  # alive: an orchestrator must not kill it
        await asyncio.to_thread(private_postgres.start)
        await asyncio.to_thread(
            wait_for,
            lambda: relay.status() == 200,
            timeout=120,
            what="the relay to report ready again",
        )
        engine = create_async_engine(private_postgres.url("order_db"))
        try:
            ids = await insert_events(engine, ORDER_CREATED_TOPIC, 3)
            await until(lambda: _all_sent(engine), 120, "the rows to be SENT after the outage")
        finally:
            await engine.dispose()
        assert len(ids) == 3
    finally:
        relay.stop()
