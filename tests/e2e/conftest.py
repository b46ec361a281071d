"""The whole platform as real processes: seven `gozon …` processes over a PostgreSQL and a
Kafka of the end-to-end tests' own, driven over HTTP through the gateway.

Started once per session. Tests use their own user ids, so they share it safely; a test that
kills a process restarts it before it ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import port_for
import pytest

from gozon.processes import PROCESSES, process
from scripts.processes import GozonProcess
from scripts.stack import Kafka, Postgres, StackConfig
from tests.conftest import fresh_database


@dataclass
class Platform:
    env: dict[str, str]
    logs: Path
    processes: dict[str, GozonProcess] = field(default_factory=dict)
    restarts: int = 0

    def url(self, name: str) -> str:
        return self.processes[name].health_url

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

    def start(self, name: str) -> GozonProcess:
        process = self.new_process(name).start(ready=True, timeout=180)
        self.processes[name] = process
        return process

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))


@pytest.fixture(scope="session")
def e2e_kafka(servers_dir: Path) -> Iterator[Kafka]:
    port = port_for.select_random()
    server = Kafka(
        servers_dir / "kafka-e2e",
        port,
        port_for.select_random(exclude_ports=[port]),
        cache_dir=StackConfig.from_env().cache_dir,
        heap="512m",
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def platform(
    postgres: Postgres,
    orders_template: str,
    payments_template: str,
    e2e_kafka: Kafka,
    logs_dir: Path,
) -> Iterator[Platform]:
    orders_dbs = fresh_database(postgres, orders_template)
    payments_dbs = fresh_database(postgres, payments_template)
    ports: list[int] = []
    for _ in PROCESSES:
        ports.append(port_for.select_random(exclude_ports=ports))
    env = {p.port_setting: str(port) for p, port in zip(PROCESSES, ports, strict=True)}
    env |= {
        "GOZON_ORDERS_DATABASE_URL": next(orders_dbs),
        "GOZON_PAYMENTS_DATABASE_URL": next(payments_dbs),
        "GOZON_KAFKA_BOOTSTRAP_SERVERS": e2e_kafka.bootstrap,
        "GOZON_GATEWAY_ORDERS_URL": f"http://127.0.0.1:{env['GOZON_ORDERS_API_PORT']}",
        "GOZON_GATEWAY_PAYMENTS_URL": f"http://127.0.0.1:{env['GOZON_PAYMENTS_API_PORT']}",
        "GOZON_LOG_LEVEL": "INFO",
        "GOZON_GATEWAY_BREAKER_RESET_S": "1",
    }
    logs = logs_dir / "e2e"
    platform = Platform(env=env, logs=logs)
    try:
        # the gateway last, once its upstreams answer
        for entry in sorted(PROCESSES, key=lambda p: p.kind == "gateway"):
            platform.start(entry.name)
        yield platform
    finally:
        for process in platform.processes.values():
            process.stop()
        for generator in (orders_dbs, payments_dbs):
            next(generator, None)
