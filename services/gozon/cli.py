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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from gozon import __version__
from gozon.core.settings import OrdersSettings, PaymentsSettings

if TYPE_CHECKING:
    from fastapi import FastAPI
    from sqlalchemy import Table

Command = Callable[[argparse.Namespace], int]


def _start(service: str, settings_class: type) -> object:
    """Reads the settings (failing fast with the variable's name) and sets up the process."""
    from gozon.core.logging import configure_logging
    from gozon.core.telemetry import configure_tracing

    try:
        settings = settings_class()
    except ValidationError as exc:
        raise SystemExit(f"gozon: invalid settings:\n{exc}") from exc
    configure_logging(service, level=settings.log_level, json=settings.log_json)
    configure_tracing(service)
    return settings


# --------------------------------------------------------------------------- the services


@dataclass(frozen=True)
class _Service:
    """What differs between the orders and the payments service's processes."""

    name: str
    settings: type[OrdersSettings] | type[PaymentsSettings]
    build_app: Callable[[Any], FastAPI]
    outbox: Table
    publishes: str
    consumes: str
    schema: type[BaseModel]
    make_handler: Callable[..., Any]
    handler_writes_outbox: bool
    scrape_hooks: Callable[[Any], list[Callable[..., Awaitable[object]]]]


def _service(name: str) -> _Service:
    """Imports only the service asked for."""
    from gozon import contracts

    if name == "orders":
        from gozon.orders import api as orders_api
        from gozon.orders import consumer as orders_consumer
        from gozon.orders.models import order_outbox

        def stuck(settings: OrdersSettings) -> list[Callable[..., Awaitable[object]]]:
            after = timedelta(seconds=settings.orders_stuck_after_s)
            return [partial(orders_consumer.count_stuck_orders, after=after)]

        return _Service(
            name,
            OrdersSettings,
            orders_api.build_app,
            order_outbox,
            publishes=contracts.ORDER_CREATED_TOPIC,
            consumes=contracts.PAYMENT_PROCESSED_TOPIC,
            schema=contracts.PaymentProcessed,
            make_handler=orders_consumer.make_handler,
            handler_writes_outbox=False,
            scrape_hooks=stuck,
        )
    from gozon.payments import api as payments_api
    from gozon.payments import consumer as payments_consumer
    from gozon.payments.models import payment_outbox

    return _Service(
        name,
        PaymentsSettings,
        payments_api.build_app,
        payment_outbox,
        publishes=contracts.PAYMENT_PROCESSED_TOPIC,
        consumes=contracts.ORDER_CREATED_TOPIC,
        schema=contracts.OrderCreated,
        make_handler=payments_consumer.make_handler,
        handler_writes_outbox=True,
        scrape_hooks=lambda _: [],
    )


def _settings(service: _Service, process: str) -> OrdersSettings | PaymentsSettings:
    settings = _start(f"{service.name}-{process}", service.settings)
    assert isinstance(settings, OrdersSettings | PaymentsSettings)
    return settings


def run_api(args: argparse.Namespace) -> int:
    import uvicorn

    service = _service(args.service)
    settings = _settings(service, "api")
    uvicorn.run(
        service.build_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        access_log=False,
    )
    return 0


def run_relay(args: argparse.Namespace) -> int:
    from gozon.messaging.worker import WorkerSpec, run_relay

    service = _service(args.service)
    settings = _settings(service, "relay")
    spec = WorkerSpec(
        service.name, settings.database_url, settings.api_host, settings.relay_metrics_port
    )
    asyncio.run(run_relay(spec, settings, service.outbox, [service.publishes]))
    return 0


def run_consumer(args: argparse.Namespace) -> int:
    from gozon.messaging.worker import WorkerSpec, run_consumer

    service = _service(args.service)
    settings = _settings(service, "consumer")
    spec = WorkerSpec(
        service.name, settings.database_url, settings.api_host, settings.consumer_metrics_port
    )
    asyncio.run(
        run_consumer(
            spec,
            settings,
            topic=service.consumes,
            group_id=settings.group_id,
            schema=service.schema,
            make_handler=service.make_handler,
            outbox=service.outbox.name if service.handler_writes_outbox else None,
            scrape_hooks=service.scrape_hooks(settings),
        )
    )
    return 0


def run_migrate(args: argparse.Namespace) -> int:
    from gozon.core.migrations import upgrade

    service = _service(args.service)
    settings = _settings(service, "migrate")
    upgrade(Path(__file__).parent / service.name / "migrations", settings.database_url)
    return 0


def run_requeue_failed(args: argparse.Namespace) -> int:
    from gozon.core.db import create_engine
    from gozon.messaging.relay import requeue_failed

    service = _service(args.service)
    settings = _settings(service, "outbox")

    async def run() -> int:
        engine = create_engine(settings.database_url, pool_size=1)
        try:
            return await requeue_failed(engine, service.outbox)
        finally:
            await engine.dispose()

    print(f"requeued {asyncio.run(run())} FAILED {service.outbox.name} rows")
    return 0


# --------------------------------------------------------------------------- gateway


def gateway(_: argparse.Namespace) -> int:
    import uvicorn

    from gozon.core.settings import GatewaySettings
    from gozon.gateway.app import build_app
    from gozon.gateway.server import uvicorn_config

    settings = _start("gateway", GatewaySettings)
    assert isinstance(settings, GatewaySettings)
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
