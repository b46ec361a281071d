"""Fixtures for the tests that take a server down: a PostgreSQL or a Kafka of the test's own,
so that stopping it disturbs no other test."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import port_for
import pytest

from gozon.core.migrations import upgrade
from scripts.stack import Kafka, Postgres, StackConfig
from tests.conftest import MIGRATIONS
from tests.integration.upstream import Upstream


@pytest.fixture
def process_logs(logs_dir: Path, request: pytest.FixtureRequest) -> Path:
    """Where this test's `gozon …` processes log: kept after the run (see tests/conftest.py)."""
    path = logs_dir / re.sub(r"[^\w.-]+", "_", request.node.name)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def private_postgres(servers_dir: Path) -> Iterator[Postgres]:
    """A PostgreSQL of this test's own with a migrated order_db."""
    server = Postgres(
        servers_dir / f"pg-{uuid.uuid4().hex[:6]}",
        port_for.select_random(),
        durable=False,
        databases=("order_db",),
    )
    server.start()
    upgrade(MIGRATIONS / "orders" / "migrations", server.url("order_db"))
    yield server
    server.stop()


@pytest.fixture
def private_kafka(servers_dir: Path) -> Iterator[Kafka]:
    """A Kafka broker of this test's own."""
    port = port_for.select_random()
    server = Kafka(
        servers_dir / f"kafka-{uuid.uuid4().hex[:6]}",
        port,
        port_for.select_random(exclude_ports=[port]),
        cache_dir=StackConfig.from_env().cache_dir,
        heap="384m",
    )
    server.start()
    yield server
    server.stop()


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
