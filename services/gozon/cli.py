"""`gozon …`: the only place that picks a process to run.

    gozon orders   api | relay | consumer | migrate | outbox requeue-failed
    gozon payments api | relay | consumer | migrate | outbox requeue-failed
    gozon gateway

Each command reads its settings from `GOZON_*` variables, sets up logging and tracing for its
process, and runs one job until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from gozon import __version__
from gozon.contracts import (
    ORDER_CREATED_TOPIC,
    PAYMENT_PROCESSED_TOPIC,
    OrderCreated,
    PaymentProcessed,
)
from gozon.core.settings import CommonSettings, OrdersSettings, PaymentsSettings

if TYPE_CHECKING:
    from fastapi import FastAPI
    from sqlalchemy import Table

    from gozon.messaging.subscription import Subscription

Command = Callable[[argparse.Namespace], int]
T = TypeVar("T", bound=CommonSettings)
S = TypeVar("S", OrdersSettings, PaymentsSettings)
E = TypeVar("E", bound=BaseModel)


def _start(process: str, settings_class: type[T]) -> T:
    """Reads the settings (failing fast with the variable's name) and sets up the process."""
    from gozon.core.logging import configure_logging
    from gozon.core.telemetry import configure_tracing

    try:
        settings = settings_class()
    except ValidationError as exc:
        raise SystemExit(f"gozon: invalid settings:\n{exc}") from exc
    configure_logging(process, level=settings.log_level, json=settings.log_json)
    configure_tracing(process, trace_background_db=settings.trace_background_db)
    return settings


# --------------------------------------------------------------------------- the services


@dataclass(frozen=True)
class _Service(Generic[S, E]):
    """What differs between the orders and the payments service's processes: its settings,
    its API, the outbox its relay publishes, and the subscription its consumer declares."""

    name: str
    settings: type[S]
    build_app: Callable[[S], FastAPI]
    outbox: Table
    publishes: str
    subscription: Callable[[S], Subscription[E]]

    def start(self, process: str) -> S:
        return _start(f"{self.name}-{process}", self.settings)


class _Job(Protocol):
    """A command that runs for either service."""

    def __call__(self, service: _Service[S, E], /) -> int: ...


def _orders() -> _Service[OrdersSettings, PaymentProcessed]:
    from gozon.orders import api, consumer
    from gozon.orders.models import order_outbox

    return _Service(
        "orders",
        OrdersSettings,
        api.build_app,
        order_outbox,
        ORDER_CREATED_TOPIC,
        consumer.subscription,
    )


def _payments() -> _Service[PaymentsSettings, OrderCreated]:
    from gozon.payments import api, consumer
    from gozon.payments.models import payment_outbox

    return _Service(
        "payments",
        PaymentsSettings,
        api.build_app,
        payment_outbox,
        PAYMENT_PROCESSED_TOPIC,
        consumer.subscription,
    )


def _for_service(job: _Job) -> Command:
    """The command that runs `job` for the service named on the command line (importing only
    that service)."""

    def run(args: argparse.Namespace) -> int:
        return job(_orders()) if args.service == "orders" else job(_payments())

    return run


def _api(service: _Service[S, E]) -> int:
    import uvicorn

    settings = service.start("api")
    uvicorn.run(
        service.build_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        access_log=False,
    )
    return 0


def _relay(service: _Service[S, E]) -> int:
    from gozon.messaging.worker import WorkerSpec, run_relay

    settings = service.start("relay")
    spec = WorkerSpec(
        service.name, settings.database_url, settings.api_host, settings.relay_metrics_port
    )
    asyncio.run(run_relay(spec, settings, service.outbox, [service.publishes]))
    return 0


def _consumer(service: _Service[S, E]) -> int:
    from gozon.messaging.worker import WorkerSpec, run_consumer

    settings = service.start("consumer")
    spec = WorkerSpec(
        service.name, settings.database_url, settings.api_host, settings.consumer_metrics_port
    )
    subscription = service.subscription(settings)
    asyncio.run(run_consumer(spec, settings, subscription, group_id=settings.group_id))
    return 0


def _migrate(service: _Service[S, E]) -> int:
    from gozon.core.migrations import upgrade

    settings = service.start("migrate")
    upgrade(Path(__file__).parent / service.name / "migrations", settings.database_url)
    return 0


def _requeue_failed(service: _Service[S, E]) -> int:
    from gozon.core.db import create_engine
    from gozon.messaging.relay import requeue_failed

    settings = service.start("outbox")

    async def run() -> int:
        engine = create_engine(settings.database_url, pool_size=1)
        try:
            return await requeue_failed(engine, service.outbox)
        finally:
            await engine.dispose()

    print(f"requeued {asyncio.run(run())} FAILED {service.outbox.name} rows")
    return 0


run_api = _for_service(_api)
run_relay = _for_service(_relay)
run_consumer = _for_service(_consumer)
run_migrate = _for_service(_migrate)
run_requeue_failed = _for_service(_requeue_failed)


# --------------------------------------------------------------------------- gateway


def gateway(_: argparse.Namespace) -> int:
    import uvicorn

    from gozon.core.settings import GatewaySettings
    from gozon.gateway.app import build_app
    from gozon.gateway.server import uvicorn_config

    settings = _start("gateway", GatewaySettings)
    uvicorn.Server(uvicorn_config(build_app(settings), settings)).run()
    return 0


# --------------------------------------------------------------------------- wiring


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gozon", description="Gozon order and payment platform")
    parser.add_argument("--version", action="version", version=f"gozon {__version__}")
    services = parser.add_subparsers(dest="service", metavar="SERVICE")

    def add(
        sub: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        run: Command,
        help_: str,
    ) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_)
        command.set_defaults(run=run)
        return command

    for name, database, does in (
        ("orders", "order_db", "moves orders to FINISHED or CANCELLED"),
        ("payments", "account_db", "pays for orders: inbox, debit, outbox"),
    ):
        outbox_table = "order_outbox" if name == "orders" else "payment_outbox"
        service = services.add_parser(name, help=f"the {name} service")
        processes = service.add_subparsers(dest="process", metavar="PROCESS", required=True)
        add(processes, "api", run_api, f"the {name} HTTP API (GOZON_{name.upper()}_API_PORT)")
        add(processes, "relay", run_relay, f"publishes {outbox_table} rows to Kafka")
        add(processes, "consumer", run_consumer, does)
        add(processes, "migrate", run_migrate, f"alembic upgrade of {database} to head")
        outbox = processes.add_parser("outbox", help=f"{outbox_table} maintenance")
        actions = outbox.add_subparsers(dest="action", metavar="ACTION", required=True)
        add(actions, "requeue-failed", run_requeue_failed, "requeue FAILED rows")
    gateway_command = services.add_parser(
        "gateway", help="the API gateway, the one entry point (port GOZON_GATEWAY_PORT)"
    )
    gateway_command.set_defaults(run=gateway)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Command | None = getattr(args, "run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
