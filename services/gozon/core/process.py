"""What a process of the platform is: the rows of the process table (gozon.processes).

The gateway and each service declare their own rows with these types (gozon.gateway.processes,
gozon.orders.processes, gozon.payments.processes); gozon.processes joins them into the one
table. Standard library only: launchers read the table before the project's dependencies are
installed.
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
    service: str | None  # the service whose database it uses; None for the gateway
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
    service: str

    @property
    def command(self) -> str:
        return " ".join(("gozon", *self.args))


@dataclass(frozen=True)
class Service:
    """A service: its database, its processes (an API, a relay, a consumer) and its migration.

    Its package declares it (`gozon.<service>.processes.SERVICE`); `gozon …`'s parser lists its
    commands from it."""

    name: str  # `gozon <name> …`, the GOZON_<NAME>_* settings' prefix
    database: str
    outbox_table: str
    consumer_does: str  # the consumer's one-line help
    processes: tuple[Process, ...]
    migration: Migration

    def __post_init__(self) -> None:
        entries: list[Process | Migration] = [*self.processes, self.migration]
        for entry in entries:
            if entry.service != self.name or entry.args[0] != self.name:
                raise ValueError(f"{entry.name} is not a process of the {self.name} service")
