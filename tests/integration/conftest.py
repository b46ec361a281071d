"""Fixtures of the integration tests: topics and a producer on the session's Kafka, the
in-process upstreams, and, for the tests that take a server down, a PostgreSQL or a Kafka of
the test's own, so that stopping it disturbs no other test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine

from devstack import Kafka, Postgres, create_topics, throwaway_kafka, throwaway_postgres
from gozon.core.migrations import upgrade
from gozon.core.pg import driver_dsn
from gozon.messaging.kafka import dlq_topic, new_producer
from tests.conftest import MIGRATIONS, until
from tests.integration.upstream import Upstream


async def create_topics_async(bootstrap: str, *names: str, partitions: int = 3) -> None:
    """Creates the topics (in a thread of its own: the admin client runs its own loop)."""
    await asyncio.to_thread(
        lambda: asyncio.run(create_topics(bootstrap, list(names), partitions=partitions))
    )


async def new_topic(kafka: Kafka, prefix: str, partitions: int) -> str:
    """A topic of the test's own, `<prefix>.<random>`, with its dead-letter topic."""
    name = f"{prefix}.{uuid.uuid4().hex[:10]}"
    await create_topics_async(kafka.bootstrap, name, dlq_topic(name), partitions=partitions)
    return name


@pytest.fixture
async def producer(kafka: Kafka) -> AsyncIterator[AIOKafkaProducer]:
    producer = new_producer(kafka.bootstrap, client_id="test")
    await producer.start()
    yield producer
    await producer.stop()


@pytest.fixture
def process_logs(logs_dir: Path, request: pytest.FixtureRequest) -> Path:
    """Where this test's `gozon …` processes log: kept after the run (see tests/conftest.py)."""
    path = logs_dir / re.sub(r"[^\w.-]+", "_", request.node.name)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def private_postgres(servers_dir: Path) -> Iterator[Postgres]:
    """A PostgreSQL of this test's own with a migrated order_db."""
    with throwaway_postgres(servers_dir / f"pg-{uuid.uuid4().hex[:6]}", ("order_db",)) as server:
        upgrade(MIGRATIONS / "orders" / "migrations", server.url("order_db"))
        yield server


@contextlib.asynccontextmanager
async def role_of_its_own(engine: AsyncEngine) -> AsyncIterator[tuple[str, str]]:
    """A login role (not a superuser) granted every table and sequence of `engine`'s
    database, as a deployment grants its service: (its name, the database's URL as it).
    Dropped afterwards; the test may revoke and grant meanwhile."""
    role = f"service_{uuid.uuid4().hex[:8]}"
    async with engine.begin() as conn:
        await conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD '{role}'"))
        await conn.execute(text(f"GRANT USAGE ON SCHEMA public TO {role}"))
        await conn.execute(text(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}"))
        await conn.execute(text(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}"))
    url = engine.url.set(username=role, password=role).render_as_string(hide_password=False)
    try:
        yield role, url
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP OWNED BY {role}"))
            await conn.execute(text(f"DROP ROLE {role}"))


@dataclass
class ReadOnlySwitch:
    """Turns a database's `default_transaction_read_only` on and off, as a failover to a
    standby and back does: sessions made meanwhile take it (and keep it), older ones do not.
    `admin` is a superuser connection to the database, for the test's own statements."""

    admin: asyncpg.Connection
    database: str

    async def read_only(self, on: bool) -> None:
        setting = "default_transaction_read_only"
        change = f"SET {setting} = on" if on else f"RESET {setting}"
        await self.admin.execute(f'ALTER DATABASE "{self.database}" {change}')


@contextlib.asynccontextmanager
async def read_only_switch(url: str) -> AsyncIterator[ReadOnlySwitch]:
    """A `ReadOnlySwitch` for `url`'s database; writable again at the end, whatever happened
    (the database is shared by the test's other fixtures)."""
    switch = ReadOnlySwitch(await asyncpg.connect(driver_dsn(url)), str(make_url(url).database))
    try:
        yield switch
    finally:
        await switch.read_only(False)
        await switch.admin.close()


@contextlib.asynccontextmanager
async def frozen_when_it_waits_for_a_lock(
    admin: asyncpg.Connection, application_name: str
) -> AsyncIterator[int]:
    """Waits until a backend serving `application_name` waits for a lock (one the test holds
    on `admin`), then stops it (SIGSTOP) until the block ends: a server that stopped answering
    in the middle of that client's transaction, its connection open and nothing cancelled.
    Yields the backend's pid."""
    waiting: list[int] = []

    async def one_waits() -> bool:
        found = await admin.fetchval(
            "SELECT array_agg(pid) FROM pg_stat_activity "
            "WHERE application_name = $1 AND wait_event_type = 'Lock'",
            application_name,
        )
        waiting[:] = found or []
        return bool(waiting)

    await until(one_waits, 10, f"a backend of {application_name} to wait for a lock")
    os.kill(waiting[0], signal.SIGSTOP)
    try:
        yield waiting[0]
    finally:
        os.kill(waiting[0], signal.SIGCONT)


@pytest.fixture
def private_kafka(servers_dir: Path) -> Iterator[Kafka]:
    """A Kafka broker of this test's own."""
    with throwaway_kafka(servers_dir / f"kafka-{uuid.uuid4().hex[:6]}", heap="384m") as server:
        yield server


@pytest.fixture
async def orders() -> AsyncIterator[Upstream]:
    upstream = Upstream("orders")
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture
async def payments() -> AsyncIterator[Upstream]:
    upstream = Upstream("payments")
    await upstream.start()
    yield upstream
    await upstream.stop()
