"""The platform's process table: the one list of what runs.

Seven long-running processes and two one-shot migrations, each with the `gozon …` command that
starts it and the `GOZON_*` setting that names its HTTP port (the APIs' own port, the workers'
side port). The gateway's port is public, so it has a side port too: its `/metrics` is served
there only, never to clients. The rows are declared where they belong: the gateway's in
gozon.gateway.processes, each service's (with its database and migration) in
gozon.<service>.processes; this module joins them, in that order.

Everything that starts the platform is checked against this table: the local supervisor
(`make up`), the test fixtures, docker-compose, `gozon …`'s parser and the Helm chart (whose
copy, charts/gozon/files/processes.yaml, is generated from it by
`python -m scripts.chart_process_table`). A test fails when one of them disagrees, so a process
added here and forgotten there cannot go unnoticed.

Standard library only (the declarations and gozon.core.process too): launchers read it without
loading the services.
"""

from __future__ import annotations

from gozon.core.process import (
    LIVENESS_PATH,
    METRICS_PATH,
    READINESS_PATH,
    Migration,
    Process,
    Service,
)
from gozon.gateway.processes import GATEWAY
from gozon.orders.processes import SERVICE as ORDERS
from gozon.payments.processes import SERVICE as PAYMENTS

__all__ = [
    "LIVENESS_PATH",
    "METRICS_PATH",
    "MIGRATIONS",
    "PROCESSES",
    "READINESS_PATH",
    "SERVICES",
    "Migration",
    "Process",
    "Service",
    "process",
]

SERVICES: tuple[Service, ...] = (ORDERS, PAYMENTS)

PROCESSES: tuple[Process, ...] = (GATEWAY, *(p for s in SERVICES for p in s.processes))

MIGRATIONS: tuple[Migration, ...] = tuple(s.migration for s in SERVICES)


def process(name: str) -> Process:
    """The process called `name`; KeyError names the known ones."""
    for candidate in PROCESSES:
        if candidate.name == name:
            return candidate
    known = ", ".join(p.name for p in PROCESSES)
    raise KeyError(f"no process {name!r} (known: {known})")
