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
from datetime import timedelta
from functools import partial
from pathlib import Path

from pydantic import ValidationError

from gozon import __version__

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


# --------------------------------------------------------------------------- orders


def orders_api(_: argparse.Namespace) -> int:
    import uvicorn

    from gozon.core.settings import OrdersSettings
    from gozon.orders.api import build_app

    settings = _start("orders-api", OrdersSettings)
    assert isinstance(settings, OrdersSettings)
    uvicorn.run(
        build_app(settings),
        host=settings.orders_api_host,
        port=settings.orders_api_port,
        log_config=None,
        access_log=False,
    )
    return 0


def orders_relay(_: argparse.Namespace) -> int:
    from gozon.contracts import ORDER_CREATED_TOPIC
    from gozon.core.settings import OrdersSettings
    from gozon.messaging.worker import WorkerSpec, run_relay
    from gozon.orders.models import order_outbox

    settings = _start("orders-relay", OrdersSettings)
    assert isinstance(settings, OrdersSettings)
    spec = WorkerSpec(
        "orders",
        settings.orders_database_url,
        settings.orders_api_host,
        settings.orders_relay_metrics_port,
    )
    asyncio.run(run_relay(spec, settings, order_outbox, [ORDER_CREATED_TOPIC]))
    return 0


def orders_consumer(_: argparse.Namespace) -> int:
    from gozon.contracts import PAYMENT_PROCESSED_TOPIC, PaymentProcessed
    from gozon.core.settings import OrdersSettings
    from gozon.messaging.worker import WorkerSpec, run_consumer
    from gozon.orders.consumer import count_stuck_orders, make_handler

    settings = _start("orders-consumer", OrdersSettings)
    assert isinstance(settings, OrdersSettings)
    stuck_after = timedelta(seconds=settings.orders_stuck_after_s)
    spec = WorkerSpec(
        "orders",
        settings.orders_database_url,
        settings.orders_api_host,
        settings.orders_consumer_metrics_port,
    )
    asyncio.run(
        run_consumer(
            spec,
            settings,
            topic=PAYMENT_PROCESSED_TOPIC,
            group_id=settings.orders_group_id,
            schema=PaymentProcessed,
            make_handler=make_handler,
            scrape_hooks=[partial(count_stuck_orders, after=stuck_after)],
        )
    )
    return 0


def orders_migrate(_: argparse.Namespace) -> int:
    from gozon.core.migrations import upgrade
    from gozon.core.settings import OrdersSettings

    settings = _start("orders-migrate", OrdersSettings)
    assert isinstance(settings, OrdersSettings)
    upgrade(_migrations("orders"), settings.orders_database_url)
    return 0


def orders_requeue_failed(_: argparse.Namespace) -> int:
    from gozon.core.db import create_engine
    from gozon.core.settings import OrdersSettings
    from gozon.messaging.relay import requeue_failed
    from gozon.orders.models import order_outbox

    settings = _start("orders-outbox", OrdersSettings)
    assert isinstance(settings, OrdersSettings)

    async def run() -> int:
        engine = create_engine(settings.orders_database_url, pool_size=1)
        try:
            return await requeue_failed(engine, order_outbox)
        finally:
            await engine.dispose()

    print(f"requeued {asyncio.run(run())} FAILED order_outbox rows")
    return 0


# --------------------------------------------------------------------------- payments


def payments_api(_: argparse.Namespace) -> int:
    import uvicorn

    from gozon.core.settings import PaymentsSettings
    from gozon.payments.api import build_app

    settings = _start("payments-api", PaymentsSettings)
    assert isinstance(settings, PaymentsSettings)
    uvicorn.run(
        build_app(settings),
        host=settings.payments_api_host,
        port=settings.payments_api_port,
        log_config=None,
        access_log=False,
    )
    return 0


def payments_relay(_: argparse.Namespace) -> int:
    from gozon.contracts import PAYMENT_PROCESSED_TOPIC
    from gozon.core.settings import PaymentsSettings
    from gozon.messaging.worker import WorkerSpec, run_relay
    from gozon.payments.models import payment_outbox

    settings = _start("payments-relay", PaymentsSettings)
    assert isinstance(settings, PaymentsSettings)
    spec = WorkerSpec(
        "payments",
        settings.payments_database_url,
        settings.payments_api_host,
        settings.payments_relay_metrics_port,
    )
    asyncio.run(run_relay(spec, settings, payment_outbox, [PAYMENT_PROCESSED_TOPIC]))
    return 0


def payments_consumer(_: argparse.Namespace) -> int:
    from gozon.contracts import ORDER_CREATED_TOPIC, OrderCreated
    from gozon.core.settings import PaymentsSettings
    from gozon.messaging.worker import WorkerSpec, run_consumer
    from gozon.payments.consumer import make_handler
    from gozon.payments.models import payment_outbox

    settings = _start("payments-consumer", PaymentsSettings)
    assert isinstance(settings, PaymentsSettings)
    spec = WorkerSpec(
        "payments",
        settings.payments_database_url,
        settings.payments_api_host,
        settings.payments_consumer_metrics_port,
    )
    asyncio.run(
        run_consumer(
            spec,
            settings,
            topic=ORDER_CREATED_TOPIC,
            group_id=settings.payments_group_id,
            schema=OrderCreated,
            make_handler=make_handler,
            outbox=payment_outbox.name,
        )
    )
    return 0


def payments_migrate(_: argparse.Namespace) -> int:
    from gozon.core.migrations import upgrade
    from gozon.core.settings import PaymentsSettings

    settings = _start("payments-migrate", PaymentsSettings)
    assert isinstance(settings, PaymentsSettings)
    upgrade(_migrations("payments"), settings.payments_database_url)
    return 0


def payments_requeue_failed(_: argparse.Namespace) -> int:
    from gozon.core.db import create_engine
    from gozon.core.settings import PaymentsSettings
    from gozon.messaging.relay import requeue_failed
    from gozon.payments.models import payment_outbox

    settings = _start("payments-outbox", PaymentsSettings)
    assert isinstance(settings, PaymentsSettings)

    async def run() -> int:
        engine = create_engine(settings.payments_database_url, pool_size=1)
        try:
            return await requeue_failed(engine, payment_outbox)
        finally:
            await engine.dispose()

    print(f"requeued {asyncio.run(run())} FAILED payment_outbox rows")
    return 0


# --------------------------------------------------------------------------- gateway


def gateway(_: argparse.Namespace) -> int:
    import uvicorn

    from gozon.core.settings import GatewaySettings
    from gozon.gateway.app import build_app

    settings = _start("gateway", GatewaySettings)
    assert isinstance(settings, GatewaySettings)
    uvicorn.run(
        build_app(settings),
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_config=None,
        access_log=False,
        proxy_headers=False,  # the edge: the peer is the client; X-Forwarded-For is not trusted
    )
    return 0


# --------------------------------------------------------------------------- wiring


def _migrations(service: str) -> Path:
    return Path(__file__).parent / service / "migrations"


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

    orders = services.add_parser("orders", help="the orders service")
    orders_sub = orders.add_subparsers(dest="process", metavar="PROCESS", required=True)
    add(orders_sub, "api", orders_api, "the orders HTTP API (port GOZON_ORDERS_API_PORT)")
    add(orders_sub, "relay", orders_relay, "publishes order_outbox rows to Kafka")
    add(orders_sub, "consumer", orders_consumer, "moves orders to FINISHED or CANCELLED")
    add(orders_sub, "migrate", orders_migrate, "alembic upgrade of order_db to head")
    outbox = orders_sub.add_parser("outbox", help="order_outbox maintenance")
    outbox_sub = outbox.add_subparsers(dest="action", metavar="ACTION", required=True)
    add(outbox_sub, "requeue-failed", orders_requeue_failed, "requeue FAILED rows")

    payments = services.add_parser("payments", help="the payments service")
    payments_sub = payments.add_subparsers(dest="process", metavar="PROCESS", required=True)
    add(payments_sub, "api", payments_api, "the payments HTTP API (port GOZON_PAYMENTS_API_PORT)")
    add(payments_sub, "relay", payments_relay, "publishes payment_outbox rows to Kafka")
    add(payments_sub, "consumer", payments_consumer, "pays for orders: inbox, debit, outbox")
    add(payments_sub, "migrate", payments_migrate, "alembic upgrade of account_db to head")
    payments_outbox = payments_sub.add_parser("outbox", help="payment_outbox maintenance")
    payments_outbox_sub = payments_outbox.add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    add(payments_outbox_sub, "requeue-failed", payments_requeue_failed, "requeue FAILED rows")
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
