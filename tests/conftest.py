"""Session fixtures: a real PostgreSQL and a real Kafka of the test session's own.

Each starts once per session, on free ports, in a throwaway folder, through the same launcher
as `make up` (devstack's `throwaway_postgres` and `throwaway_kafka`), and stops at the end.
A test run never touches the `make up` stack. Fixtures start lazily: a unit-test run starts
no server.

Logging is configured once, here, as plain text (no colours, plain tracebacks). The logs of the
processes the tests start go to a folder that outlives the run (`.gozon/test-logs/<run>/`, or
`GOZON_TEST_LOGS`); when a test failed, the servers' logs are copied there too. The run prints
where it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import BaseModel

from devstack import Kafka, Postgres, create_topics, throwaway_kafka, throwaway_postgres, workdir
from gozon.core.pg import worker_pool
from gozon.core.settings import MessagingSettings
from gozon.messaging.consumer import BatchHandler, ConsumerRunner
from gozon.messaging.kafka import new_consumer, new_producer

if TYPE_CHECKING:
    from xdist.workermanage import WorkerController

E = TypeVar("E", bound=BaseModel)
ROOT = Path(__file__).resolve().parent.parent
KEEP_RUNS = 5
_run_logs = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    from gozon.core.logging import configure_logging

    configure_logging("tests", level="INFO", json=False)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request drowns the rest
    worker: dict[str, str] | None = getattr(config, "workerinput", None)
    if worker is not None:  # a pytest-xdist worker: a folder of its own in the controller's run
        config.stash[_run_logs] = Path(worker["gozon_run_logs"]) / worker["workerid"]
        return
    base = Path(os.environ.get("GOZON_TEST_LOGS", ROOT / ".gozon" / "test-logs"))
    run = base / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    config.stash[_run_logs] = run
    if base.is_dir():  # keep the last few runs' logs, not every run's forever
        for old in sorted(p for p in base.iterdir() if p.is_dir())[:-KEEP_RUNS]:
            shutil.rmtree(old, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: WorkerController) -> None:
    """pytest-xdist: each worker is told the controller's run folder (see pytest_configure)."""
    node.workerinput["gozon_run_logs"] = str(node.config.stash[_run_logs])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    run = terminalreporter.config.stash.get(_run_logs, None)
    if run is not None and run.exists():
        terminalreporter.write_line(f"logs of the processes the tests started: {run}")


# The APIs' own deadlines (4 s budget, 3 s statements, 2 s pool wait) are production values,
# tested by tests/integration/test_deadlines.py with values of its own. Elsewhere they would
# only turn a busy machine's slowness into 503s: the functional tests lift them (the e2e
# platform's processes inherit this environment; the gateway's deadline header still applies).
# The fault suite keeps the production values (tests/faults/conftest.py).
FUNCTIONAL_TEST_LIMITS = {
    "GOZON_API_TIMEOUT_S": "60",
    "GOZON_DB_STATEMENT_TIMEOUT_S": "60",
    "GOZON_DB_POOL_TIMEOUT_S": "30",
    # Outcome tests, not speed tests: on a busy machine an answer may take longer than the
    # gateway's default 5 s, and a 504 would fail a test about money, not time. The gateway's
    # timeout itself is tested with its own settings in tests/integration/test_gateway.py.
    "GOZON_GATEWAY_UPSTREAM_TIMEOUT_S": "60",
}


@pytest.fixture(scope="session", autouse=True)
def api_limits() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in FUNCTIONAL_TEST_LIMITS.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="session")
def logs_dir(request: pytest.FixtureRequest) -> Path:
    """This run's log folder, kept after the run (see the module's docstring)."""
    path = request.config.stash[_run_logs]
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def servers_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    with workdir("gozon-test-") as path:
        yield path
        if request.session.testsfailed:
            kept = request.config.stash[_run_logs] / "servers"
            for log in path.rglob("*.log"):
                target = kept / log.relative_to(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(OSError):
                    shutil.copy2(log, target)


@pytest.fixture(scope="session")
def postgres(servers_dir: Path) -> Iterator[Postgres]:
    with throwaway_postgres(servers_dir / "postgres") as server:
        yield server


@pytest.fixture(scope="session")
def kafka(servers_dir: Path) -> Iterator[Kafka]:
    with throwaway_kafka(servers_dir / "kafka", heap="512m") as server:
        yield server


# --------------------------------------------------------------------------- databases

MIGRATIONS = Path(__file__).resolve().parent.parent / "services" / "gozon"


def _admin_url(postgres: Postgres) -> str:
    return postgres.url("postgres", driver="postgresql")


def _psql(postgres: Postgres, sql: str) -> None:
    """Runs one statement on the maintenance database (CREATE/DROP DATABASE need no tx)."""
    import asyncio

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(_admin_url(postgres))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def _migrated_template(postgres: Postgres, service: str) -> str:
    """A database migrated to head once per session, used as the template of fresh ones."""
    from gozon.core.migrations import upgrade

    name = f"{service}_template"
    _psql(postgres, f'DROP DATABASE IF EXISTS "{name}"')
    _psql(postgres, f'CREATE DATABASE "{name}"')
    upgrade(MIGRATIONS / service / "migrations", postgres.url(name))
    return name


@pytest.fixture(scope="session")
def orders_template(postgres: Postgres) -> str:
    return _migrated_template(postgres, "orders")


@pytest.fixture(scope="session")
def payments_template(postgres: Postgres) -> str:
    return _migrated_template(postgres, "payments")


def fresh_database(postgres: Postgres, template: str) -> Iterator[str]:
    """A new database copied from a migrated template: each test gets its own tables."""
    import uuid

    name = f"t_{uuid.uuid4().hex[:12]}"
    _psql(postgres, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    yield postgres.url(name)
    _psql(postgres, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def orders_db(postgres: Postgres, orders_template: str) -> Iterator[str]:
    """The URL of a fresh, migrated order_db of this test's own."""
    yield from fresh_database(postgres, orders_template)


@pytest.fixture
def payments_db(postgres: Postgres, payments_template: str) -> Iterator[str]:
    """The URL of a fresh, migrated account_db of this test's own."""
    yield from fresh_database(postgres, payments_template)


# --------------------------------------------------------------------------- HTTP


@contextlib.asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Runs the app's lifespan and gives an HTTP client to it (in-process, no socket)."""
    async with LifespanManager(app) as manager:
        # As a real server does: an unhandled error is a 500 answer, not an exception here.
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


@pytest.fixture(scope="session", autouse=True)
def tracing() -> InMemorySpanExporter:
    """As every process's entry point does when it exports: real span ids, so trace context
    propagates, the default sampler (background work dropped), a span per database statement;
    the finished spans are kept in memory for the tests that look at them. The sampler is
    named, as a process with no OTLP endpoint records nothing (`recording_sampler`)."""
    from gozon.core.telemetry import configure_tracing, instrument_database

    exporter = InMemorySpanExporter()
    provider = configure_tracing("tests", env={"OTEL_TRACES_SAMPLER": "parentbased_always_on"})
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrument_database(provider, env={})
    return exporter


@pytest.fixture(autouse=True)
def spans(tracing: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    """The spans finished during this test (forgotten after every test, so the session's
    in-process requests do not pile up in memory)."""
    tracing.clear()
    yield tracing
    tracing.clear()


def holds(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """A plain predicate as `until` takes one."""

    async def check() -> bool:
        return bool(predicate())

    return check


async def until(predicate: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """Polls `predicate` every 50 ms until it is true; fails after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.05)


# The consumers' default commit interval (GOZON_CONSUMER_COMMIT_INTERVAL_MS).
COMMIT_INTERVAL_MS: int = MessagingSettings.model_fields["consumer_commit_interval_ms"].default


@contextlib.asynccontextmanager
async def running_consumer(
    database_url: str,
    kafka: Kafka,
    topic: str,
    group: str,
    schema: type[E],
    make_handler: Callable[[asyncpg.Pool], BatchHandler[E]],
    *,
    commit_interval: float = COMMIT_INTERVAL_MS / 1000,
) -> AsyncIterator[ConsumerRunner[E]]:
    """A consumer runner on `topic` in this process, as `gozon … consumer` runs one."""
    pool = await worker_pool(database_url, size=4, application_name="test-consumer")
    producer = new_producer(kafka.bootstrap, client_id="test-dlq")
    consumer = new_consumer(kafka.bootstrap, group_id=group, client_id="test")
    runner = ConsumerRunner(  # subscribes the consumer, so before it starts
        consumer=consumer,
        producer=producer,
        topic=topic,
        schema=schema,
        handler=make_handler(pool),
        max_handler_attempts=3,
        commit_interval=commit_interval,
    )
    await producer.start()
    await consumer.start()
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        yield runner
    finally:
        stop.set()
        await task
        await consumer.stop()
        await producer.stop()
        await pool.close()


async def largest_value_the_broker_accepts(bootstrap: str) -> int:
    """The largest value (small key, no headers) the broker takes on a topic of its defaults,
    found by sending (a producer whose own size limit is out of the way); a few kilobytes
    either side of `message.max.bytes` (1,048,588 by default)."""
    scratch = f"test.sizes.{uuid.uuid4().hex[:10]}"
    await asyncio.to_thread(lambda: asyncio.run(create_topics(bootstrap, [scratch], partitions=1)))
    big = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=4 * 1024 * 1024)
    await big.start()
    try:
        accepted, refused = 1_040_000, 1_060_000
        while refused - accepted > 1:
            size = (accepted + refused) // 2
            try:
                await big.send_and_wait(scratch, value=b"x" * size, key=b"k")
            except (MessageSizeTooLargeError, RecordListTooLargeError):
                refused = size
            else:
                accepted = size
        return accepted
    finally:
        await big.stop()


def huge_poison(size: int) -> bytes:
    """A value of exactly `size` bytes that is JSON but no event."""
    head, tail = b'{"poison": "', b'"}'
    return head + b"p" * (size - len(head) - len(tail)) + tail
