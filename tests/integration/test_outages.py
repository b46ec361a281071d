"""No background task dies of a dependency's outage: each one, against the real servers.

The relay's prune, the relay's LISTEN connection, the start-up steps that need Kafka (the
topics among them), the consumer's fetch loop and the scrape-time gauges all outlive the
database or the broker going away: the process stays live, reports not ready, and recovers
by itself once the dependency is back.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import port_for
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from devstack import GozonProcess, Kafka, Postgres, http_status, wait_for
from gozon.contracts import ORDER_CREATED_TOPIC, PAYMENT_PROCESSED_TOPIC
from gozon.messaging.relay import RelayConfig
from gozon.messaging.wakeup import OutboxListener
from gozon.messaging.worker import ACCEPTS_WORK
from gozon.orders.models import order_outbox
from tests.conftest import holds, until
from tests.integration.conftest import role_of_its_own
from tests.integration.test_relay import insert_events, running_relay, statuses

pytestmark = pytest.mark.integration


@pytest.fixture
async def engine(orders_db: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(orders_db)
    yield engine
    await engine.dispose()


def worker(kind: str, orders_db: str, bootstrap: str, log: Path) -> GozonProcess:
    """`gozon orders relay` or `gozon orders consumer` on a side port of its own."""
    port = port_for.select_random()
    return GozonProcess(
        ["orders", kind],
        env={
            "GOZON_ORDERS_DATABASE_URL": orders_db,
            "GOZON_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            f"GOZON_ORDERS_{kind.upper()}_METRICS_PORT": str(port),
            "GOZON_ORDERS_GROUP_ID": f"outage-{uuid.uuid4().hex[:8]}",
        },
        log=log,
        health_url=f"http://127.0.0.1:{port}",
    )


def ready_checks(process: GozonProcess) -> dict[str, bool]:
    import urllib.error
    import urllib.request

    try:
        url = process.health_url + "/health/ready"
        with urllib.request.urlopen(url, timeout=3) as answer:  # noqa: S310 (loopback)
            body = answer.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    checks: dict[str, bool] = json.loads(body)["checks"]
    return checks


async def wait_status(process: GozonProcess, endpoint: str, status: int, what: str) -> None:
    await asyncio.to_thread(
        wait_for, lambda: process.status(endpoint) == status, timeout=120, what=what
    )


async def test_a_prune_that_loses_its_connection_leaves_the_relay_running(
    engine: AsyncEngine, kafka: Kafka
) -> None:
    topic = f"test.outage.{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(kafka.create_topics, [topic])
    # Every prune's DELETE kills its own connection, as a database restart would mid-prune;
    # a sequence (not rolled back with the transaction) counts the prunes that died.
    async with engine.begin() as conn:
        await conn.execute(text("CREATE SEQUENCE prunes_killed"))
        await conn.execute(
            text(
                "CREATE FUNCTION kill_prune() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "PERFORM nextval('prunes_killed'); PERFORM pg_terminate_backend(pg_backend_pid());"
                " RETURN NULL; END $$"
            )
        )
        await conn.execute(
            text(
                "CREATE TRIGGER kill_prune BEFORE DELETE ON order_outbox "
                "FOR EACH STATEMENT EXECUTE FUNCTION kill_prune()"
            )
        )

    async def prunes_killed() -> int:
        async with engine.connect() as conn:
            row = (
                await conn.execute(text("SELECT last_value, is_called FROM prunes_killed"))
            ).one()
        return int(row.last_value) if row.is_called else 0

    config = RelayConfig(prune_interval=0.05, retention=timedelta(0), fallback_poll=0.1)
    async with running_relay(engine, kafka.bootstrap, config) as relay:
        task = next(t for t in asyncio.all_tasks() if "OutboxRelay.run" in repr(t.get_coro()))
        await insert_events(engine, topic, 5)
        await until(lambda: _statuses_are(engine, {"SENT": 5}), 120, "the rows to be SENT")
        await until(lambda: _at_least(prunes_killed, 3), 120, "three prunes to lose their line")
        assert not task.done()  # the relay lived through every one of them

        async with engine.begin() as conn:
            await conn.execute(text("DROP TRIGGER kill_prune ON order_outbox"))
        await insert_events(engine, topic, 2)
        # It goes on publishing, and its next prune (the database answering again) works.
        await until(lambda: _statuses_are(engine, {}), 120, "every row published and pruned")
        assert relay.database_ok
        assert not task.done()


async def test_a_relay_the_database_refuses_waits_not_ready_with_its_rows_pending_until_the_fix(
    engine: AsyncEngine, kafka: Kafka, process_logs: Path
) -> None:
    """A grant taken away (as a migration not run, a wrong role or a read-only standby after a
    failover would) is not an outage, and the relay lives through it all the same: not ready
    while the database refuses its claims, its rows PENDING, then it carries on."""
    topic = f"test.refused.{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(kafka.create_topics, [topic])
    async with role_of_its_own(engine) as (role, as_role):
        relay = worker("relay", as_role, kafka.bootstrap, process_logs / "relay.log")
        relay.start(ready=True, timeout=120)
        try:
            await insert_events(engine, topic, 1)
            await until(lambda: _statuses_are(engine, {"SENT": 1}), 60, "a first row SENT")

            async with engine.begin() as conn:
                await conn.execute(text(f"REVOKE UPDATE ON order_outbox FROM {role}"))
            await insert_events(engine, topic, 3)
            await wait_status(relay, "/health/ready", 503, "the relay to report not ready")
            checks = ready_checks(relay)
            assert checks[ACCEPTS_WORK] is False
            assert checks["database"] is True  # it answers; it refuses the relay's claims
            assert relay.status("/health/live") == 200
            assert await statuses(engine) == {"SENT": 1, "PENDING": 3}

            async with engine.begin() as conn:
                await conn.execute(text(f"GRANT UPDATE ON order_outbox TO {role}"))
            await until(lambda: _statuses_are(engine, {"SENT": 4}), 60, "the rows SENT")
            await wait_status(relay, "/health/ready", 200, "the relay to be ready again")
            assert relay.stop() == 0  # a clean exit: it never crashed meanwhile
        finally:
            relay.kill()
    # One error naming the refusal for the whole incident, not one per retried claim.
    lines = (process_logs / "relay.log").read_text().splitlines()
    refusals = [line for line in lines if "the database refuses the relay" in line]
    assert len(refusals) == 1, refusals
    assert "permission denied for table order_outbox" in refusals[0]


async def _statuses_are(engine: AsyncEngine, wanted: dict[str, int]) -> bool:
    return await statuses(engine) == wanted


async def _at_least(count: Callable[[], Awaitable[int]], wanted: int) -> bool:
    return bool(await count() >= wanted)


async def test_the_listener_reconnects_after_a_database_restart_and_wakes_the_relay(
    private_postgres: Postgres,
) -> None:
    url = private_postgres.url("order_db")
    wake = asyncio.Event()
    listener = OutboxListener(url, order_outbox.name, wake)
    engine = create_async_engine(url)

    async def notify() -> None:
        async with engine.begin() as conn:
            await conn.execute(text("SELECT pg_notify(:c, '')"), {"c": listener.channel})

    try:
        async with listener.running():
            await until(holds(lambda: listener.listening), 120, "the listener to listen")
            await asyncio.to_thread(private_postgres.stop)
            await until(holds(lambda: not listener.listening), 120, "the listener to notice")
            await asyncio.to_thread(private_postgres.start)
            await engine.dispose()  # the pool's connections died with the server
            await until(holds(lambda: listener.listening), 60, "the listener to reconnect")
            wake.clear()
            await notify()
            await until(holds(wake.is_set), 120, "a notification to wake the relay")
    finally:
        await engine.dispose()


async def test_a_consumer_rides_out_a_database_outage_and_its_metrics_keep_answering(
    private_postgres: Postgres, kafka: Kafka, process_logs: Path
) -> None:
    consumer = worker(
        "consumer", private_postgres.url("order_db"), kafka.bootstrap, process_logs / "c.log"
    )
    consumer.start(ready=True, timeout=120)
    try:
        await asyncio.to_thread(private_postgres.stop)
        await wait_status(consumer, "/health/ready", 503, "the consumer to report not ready")
        assert ready_checks(consumer)["database"] is False
        assert consumer.status("/health/live") == 200
        # The stuck-orders gauge cannot be computed now: the scrape still answers.
        assert consumer.status("/metrics") == 200

        await asyncio.to_thread(private_postgres.start)
        await wait_status(consumer, "/health/ready", 200, "the consumer to be ready again")
        assert consumer.status("/metrics") == 200
        assert consumer.stop() == 0  # a clean exit: it never crashed meanwhile
    finally:
        consumer.kill()


async def test_workers_started_before_kafka_wait_create_their_topics_and_outlive_its_loss(
    orders_db: str, private_kafka: Kafka, process_logs: Path
) -> None:
    await asyncio.to_thread(private_kafka.stop)
    workers = [
        worker(kind, orders_db, private_kafka.bootstrap, process_logs / f"{kind}.log")
        for kind in ("relay", "consumer")
    ]
    try:
        for process in workers:
            process.start(ready=False, timeout=120)  # live, though Kafka is not there
            assert process.status("/health/ready") == 503
            assert ready_checks(process)["started"] is False

        await asyncio.to_thread(private_kafka.start)
        for process in workers:
            await wait_status(process, "/health/ready", 200, f"{process.args} ready")
        admin = AIOKafkaAdminClient(bootstrap_servers=private_kafka.bootstrap)
        await admin.start()
        try:
            topics = set(await admin.list_topics())
        finally:
            await admin.close()
        assert {
            ORDER_CREATED_TOPIC,
            f"{ORDER_CREATED_TOPIC}.dlq",
            PAYMENT_PROCESSED_TOPIC,
            f"{PAYMENT_PROCESSED_TOPIC}.dlq",
        } <= topics

        # Kafka lost while they run: live and not ready, then ready again by themselves.
        await asyncio.to_thread(private_kafka.stop)
        for process in workers:
            await wait_status(process, "/health/ready", 503, f"{process.args} not ready")
            assert process.status("/health/live") == 200
        await asyncio.to_thread(private_kafka.start)
        for process in workers:
            await wait_status(process, "/health/ready", 200, f"{process.args} ready again")
        for process in workers:
            assert process.stop() == 0
    finally:
        for process in workers:
            process.kill()
    assert http_status(workers[0].health_url + "/health/live") is None
