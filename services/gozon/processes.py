"""The platform's process table: the one list of what runs.

Seven long-running processes and two one-shot migrations, each with the `gozon …` command that
starts it and the `GOZON_*` setting that names its HTTP port (the APIs' own port, the workers'
side port). The gateway's port is public, so it has a side port too: its `/metrics` is served
there only, never to clients. Everything that starts the platform is checked against this
table: the local supervisor (`make up`), the test fixtures, docker-compose and the Helm chart
(whose copy, charts/gozon/files/processes.yaml, is generated from it by
`python -m scripts.chart_process_table`). A test fails when one of them disagrees, so a process
added here and forgotten there cannot go unnoticed.

This module imports nothing from the rest of the package: launchers read it without loading
the services.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LIVENESS_PATH = "/health/live"
READINESS_PATH = "/health/ready"
METRICS_PATH = "/metrics"


@dataclass(frozen=True)
class Process:
    """One long-running process of the platform."""

    name: str  # also the Deployment's, the compose service's and the supervisor program's name
    args: tuple[str, ...]  # `gozon <args>`
    kind: Literal["gateway", "api", "relay", "consumer"]
    service: Literal["orders", "payments"] | None  # the database it owns; None for the gateway
    port_setting: str  # the GOZON_* variable naming its HTTP port
    default_port: int
    # A side port for /metrics (and the health checks) when the HTTP port is public.
    side_port_setting: str | None = None
    default_side_port: int | None = None

    @property
    def command(self) -> str:
        return " ".join(("gozon", *self.args))

    @property
    def metrics_port_setting(self) -> str:
        """The GOZON_* variable naming the port that serves its `/metrics`."""
        return self.side_port_setting or self.port_setting

    @property
    def default_metrics_port(self) -> int:
        return self.default_side_port or self.default_port

    @property
    def ports(self) -> dict[str, int]:
        """Every port it listens on: its GOZON_* setting → the default."""
        ports = {self.port_setting: self.default_port}
        if self.side_port_setting is not None and self.default_side_port is not None:
            ports[self.side_port_setting] = self.default_side_port
        return ports

    @property
    def serves_api(self) -> bool:
        """Serves client traffic (the rest serve only health and metrics on a side port)."""
        return self.kind in ("gateway", "api")


@dataclass(frozen=True)
class Migration:
    """A one-shot job that must finish before its service's processes start."""

    name: str
    args: tuple[str, ...]
    service: Literal["orders", "payments"]

    @property
    def command(self) -> str:
        return " ".join(("gozon", *self.args))


PROCESSES: tuple[Process, ...] = (
    Process(
        "gateway",
        ("gateway",),
        "gateway",
        None,
        "GOZON_GATEWAY_PORT",
        8080,
        side_port_setting="GOZON_GATEWAY_METRICS_PORT",
        default_side_port=9105,
    ),
    Process("orders-api", ("orders", "api"), "api", "orders", "GOZON_ORDERS_API_PORT", 8081),
    Process(
        "orders-relay",
        ("orders", "relay"),
        "relay",
        "orders",
        "GOZON_ORDERS_RELAY_METRICS_PORT",
        9101,
    ),
    Process(
        "orders-consumer",
        ("orders", "consumer"),
        "consumer",
        "orders",
        "GOZON_ORDERS_CONSUMER_METRICS_PORT",
        9102,
    ),
    Process(
        "payments-api", ("payments", "api"), "api", "payments", "GOZON_PAYMENTS_API_PORT", 8082
    ),
    Process(
        "payments-relay",
        ("payments", "relay"),
        "relay",
        "payments",
        "GOZON_PAYMENTS_RELAY_METRICS_PORT",
        9103,
    ),
    Process(
        "payments-consumer",
        ("payments", "consumer"),
        "consumer",
        "payments",
        "GOZON_PAYMENTS_CONSUMER_METRICS_PORT",
        9104,
    ),
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration("orders-migrate", ("orders", "migrate"), "orders"),
    Migration("payments-migrate", ("payments", "migrate"), "payments"),
)


def process(name: str) -> Process:
    """The process called `name`; KeyError names the known ones."""
    for candidate in PROCESSES:
        if candidate.name == name:
            return candidate
    known = ", ".join(p.name for p in PROCESSES)
    raise KeyError(f"no process {name!r} (known: {known})")
