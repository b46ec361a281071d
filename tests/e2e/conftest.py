"""The whole platform as real processes: seven `gozon …` processes over a PostgreSQL and a
Kafka of the end-to-end tests' own, driven over HTTP through the gateway.

Started once per session. Tests use their own user ids, so they share it safely; a test that
kills a process restarts it before it ends. When the session ends, `gozon reconcile`'s check
over both databases must be clean: whatever the tests did, the books add up.

With `GOZON_E2E_COMPOSE_PROJECT` set (by `scripts/test-compose`), the same tests run against
that docker-compose stack instead: the processes are its containers, reached where compose
publishes them; a killed one is brought back by compose's restart policy, and its log is the
container's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest

from devstack import (
    COMPOSE_DATABASES,
    COMPOSE_SERVICES,
    ComposeProcess,
    ComposeStack,
    GozonProcess,
    Kafka,
    Postgres,
    free_ports,
    throwaway_kafka,
)
from gozon.processes import METRICS_PATH, PROCESSES, process
from gozon.reconcile import ReconcileReport, reconcile
from tests.conftest import fresh_database

COMPOSE_PROJECT = os.environ.get("GOZON_E2E_COMPOSE_PROJECT", "")


@dataclass
class Platform:
    env: dict[str, str]
    logs: Path
    processes: dict[str, GozonProcess | ComposeProcess] = field(default_factory=dict)
    restarts: int = 0
    compose: ComposeStack | None = None

    def url(self, name: str) -> str:
        return self.processes[name].health_url

    def metrics_url(self, name: str) -> str:
        """Where the process serves `/metrics`: its own port, or its side port (the gateway)."""
        entry = process(name)
        if entry.side_port_setting is None:
            return f"{self.url(name)}{METRICS_PATH}"
        return f"http://127.0.0.1:{self.env[entry.side_port_setting]}{METRICS_PATH}"

    @property
    def gateway(self) -> str:
        return self.url("gateway")

    def new_process(self, name: str) -> GozonProcess:
        entry = process(name)
        self.restarts += 1
        return GozonProcess(
            entry.args,
            env=self.env,
            log=self.logs / f"{name}.log",
            health_url=f"http://127.0.0.1:{self.env[entry.port_setting]}",
        )

    def start(self, name: str) -> GozonProcess | ComposeProcess:
        """Starts the process again after a kill (under compose: waits for its restart)."""
        current = self.processes.get(name)
        if isinstance(current, ComposeProcess):
            self.restarts += 1
            return current.wait_restarted()
        process = self.new_process(name).start(ready=True, timeout=180)
        self.processes[name] = process
        return process

    def log_of(self, name: str) -> str:
        return self.processes[name].logs()

    def log_text(self) -> str:
        if self.compose is not None:
            return "".join(self.log_of(p.name) for p in PROCESSES)
        return "".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))


def compose_platform(stack: ComposeStack, logs: Path) -> Platform:
    """The compose stack's processes, databases and broker, as this machine reaches them."""
    password = os.environ.get("GOZON_PG_PASSWORD", "postgres")
    orders_db = stack.published(COMPOSE_DATABASES["orders"], 5432)
    payments_db = stack.published(COMPOSE_DATABASES["payments"], 5432)
    env = {
        "GOZON_ORDERS_DATABASE_URL": f"postgresql+asyncpg://postgres:{password}@{orders_db}/order_db",
        "GOZON_PAYMENTS_DATABASE_URL": (
            f"postgresql+asyncpg://postgres:{password}@{payments_db}/account_db"
        ),
        "GOZON_KAFKA_BOOTSTRAP_SERVERS": stack.published("kafka", 9092),
    }
    platform = Platform(env=env, logs=logs, compose=stack)
    for entry in PROCESSES:
        service = COMPOSE_SERVICES[entry.name]
        address = stack.published(service, entry.default_port)
        for setting, port in entry.ports.items():
            published = address if port == entry.default_port else stack.published(service, port)
            env[setting] = published.rpartition(":")[2]
        platform.processes[entry.name] = ComposeProcess(stack, service, f"http://{address}")
    return platform


def books_are_clean(env: dict[str, str], within: float = 120) -> None:
    """After the whole e2e suite: `gozon reconcile` over both databases finds nothing, once
    every order is final (any NEW order counts as stuck until then; `within` seconds)."""

    async def settled() -> ReconcileReport:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            report = await reconcile(
                env["GOZON_ORDERS_DATABASE_URL"],
                env["GOZON_PAYMENTS_DATABASE_URL"],
                stuck_after=timedelta(0),
            )
            if report.ok or loop.time() > deadline:
                return report
            await asyncio.sleep(0.5)

    report = asyncio.run(settled())
    assert report.ok, f"gozon reconcile after the e2e suite:\n{report.render()}"


@pytest.fixture(scope="session")
def e2e_kafka(servers_dir: Path) -> Iterator[Kafka]:
    """A broker of the platform's own: its consumer groups and topics mix with no others'."""
    with throwaway_kafka(servers_dir / "kafka-e2e") as server:
        yield server


@pytest.fixture(scope="session")
def platform(request: pytest.FixtureRequest, logs_dir: Path) -> Iterator[Platform]:
    if COMPOSE_PROJECT:
        yield compose_platform(ComposeStack(COMPOSE_PROJECT), logs_dir / "e2e")
        return
    # the session's own servers, only when the tests start the processes themselves
    postgres: Postgres = request.getfixturevalue("postgres")
    orders_template: str = request.getfixturevalue("orders_template")
    payments_template: str = request.getfixturevalue("payments_template")
    e2e_kafka: Kafka = request.getfixturevalue("e2e_kafka")
    orders_dbs = fresh_database(postgres, orders_template)
    payments_dbs = fresh_database(postgres, payments_template)
    env = platform_env(next(orders_dbs), next(payments_dbs), e2e_kafka)
    env |= {
        # short enough for the slow-client cases of test_bad_input.py to finish quickly
        "GOZON_GATEWAY_HEADER_TIMEOUT_S": "5",
        "GOZON_GATEWAY_BODY_TIMEOUT_S": "5",
    }
    try:
        with running_platform(env, logs_dir / "e2e") as platform:
            yield platform
            books_are_clean(env)
    finally:
        for generator in (orders_dbs, payments_dbs):
            next(generator, None)


def platform_env(orders_url: str, payments_url: str, kafka: Kafka) -> dict[str, str]:
    """The seven processes' environment: free ports, the two databases, the broker."""
    settings = [setting for p in PROCESSES for setting in p.ports]
    ports = free_ports(len(settings))
    env = {setting: str(port) for setting, port in zip(settings, ports, strict=True)}
    return env | {
        "GOZON_ORDERS_DATABASE_URL": orders_url,
        "GOZON_PAYMENTS_DATABASE_URL": payments_url,
        "GOZON_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
        "GOZON_GATEWAY_ORDERS_URL": f"http://127.0.0.1:{env['GOZON_ORDERS_API_PORT']}",
        "GOZON_GATEWAY_PAYMENTS_URL": f"http://127.0.0.1:{env['GOZON_PAYMENTS_API_PORT']}",
        "GOZON_LOG_LEVEL": "INFO",
        "GOZON_GATEWAY_BREAKER_RESET_S": "1",
    }


@contextlib.contextmanager
def running_platform(env: dict[str, str], logs: Path) -> Iterator[Platform]:
    """The seven processes started (the gateway last, once its upstreams answer), stopped
    with SIGTERM at the end."""
    platform = Platform(env=env, logs=logs)
    try:
        for entry in sorted(PROCESSES, key=lambda p: p.kind == "gateway"):
            platform.start(entry.name)
        yield platform
    finally:
        for process in platform.processes.values():
            process.stop()
