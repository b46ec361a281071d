"""`gozon …`: the only place that picks a process to run.

    gozon orders   api | relay | consumer | migrate | outbox requeue-failed|replay-sent
                   | dlq list|redrive
    gozon payments (the same)
    gozon gateway
    gozon reconcile

Each process command reads its settings from `GOZON_*` variables, sets up logging and tracing
for its process, and runs one job until SIGTERM. The operator's commands (`outbox`, `dlq`,
`reconcile`) print to the terminal and exit: 0 done, 1 found a problem (reconcile), 2 could
not run (a usage error, the broker or a database unreachable).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from gozon import __version__
from gozon.contracts import (
    ORDER_CREATED_TOPIC,
    PAYMENT_PROCESSED_TOPIC,
    OrderCreated,
    PaymentProcessed,
)
from gozon.core.settings import CommonSettings
from gozon.orders.settings import OrdersSettings
from gozon.payments.settings import PaymentsSettings
from gozon.processes import SERVICES

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
    configure_tracing(
        process,
        trace_background_db=settings.trace_background_db,
        namespace=settings.service_namespace,
        environment=settings.deployment_environment_name,
    )
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
    consumes: str
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
        PAYMENT_PROCESSED_TOPIC,
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
        ORDER_CREATED_TOPIC,
        consumer.subscription,
    )


# How each service of the process table (gozon.processes.SERVICES) is composed; a test checks
# that the two name the same services.
_COMPOSITIONS: dict[str, Callable[[], _Service[Any, Any]]] = {
    "orders": _orders,
    "payments": _payments,
}


def _for_service(job: _Job) -> Command:
    """The command that runs `job` for the service named on the command line (importing only
    that service)."""

    def run(args: argparse.Namespace) -> int:
        return job(_COMPOSITIONS[args.service]())

    return run


def _api(service: _Service[S, E]) -> int:
    import uvicorn

    from gozon.core.server import serve

    settings = service.start("api")
    serve(
        uvicorn.Config(
            service.build_app(settings),
            host=settings.api_host,
            port=settings.api_port,
            log_config=None,
            access_log=False,
        )
    )
    return 0


def _relay(service: _Service[S, E]) -> int:
    from gozon.core.runtime import run_worker
    from gozon.messaging.worker import WorkerSpec, run_relay

    settings = service.start("relay")
    spec = WorkerSpec(
        service.name, settings.database_url, settings.api_host, settings.relay_metrics_port
    )
    run_worker(run_relay(spec, settings, service.outbox, [service.publishes]))
    return 0


def _consumer(service: _Service[S, E]) -> int:
    from gozon.core.runtime import run_worker
    from gozon.messaging.worker import WorkerSpec, run_consumer

    settings = service.start("consumer")
    spec = WorkerSpec(
        service.name, settings.database_url, settings.api_host, settings.consumer_metrics_port
    )
    subscription = service.subscription(settings)
    run_worker(run_consumer(spec, settings, subscription, group_id=settings.group_id))
    return 0


def _migrate(service: _Service[S, E]) -> int:
    """Upgrades an empty or older schema to the image's head; a schema a newer release has
    migrated past it (expand/contract) is left alone, and that is a success: the rollback of
    an upgrade runs this image's migration against the newer database."""
    from gozon.core.migrations import migrate

    settings = service.start("migrate")
    outcome = migrate(
        service.name, Path(__file__).parent / service.name / "migrations", settings.database_url
    )
    if not outcome.accepted:
        print(f"gozon: {outcome.message()}", file=sys.stderr)
        return 1
    print(outcome.message())
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


def _replay_sent(args: argparse.Namespace) -> int:
    from gozon.core.db import create_engine
    from gozon.messaging.relay import replay_sent

    service = _orders() if args.service == "orders" else _payments()
    settings = _settings(service.settings)
    since = _since(args)
    assert since is not None  # --since is required

    async def run() -> int:
        engine = create_engine(settings.database_url, pool_size=1)
        try:
            return await replay_sent(engine, service.outbox, since)
        finally:
            await engine.dispose()

    print(
        f"requeued {asyncio.run(run())} SENT {service.outbox.name} rows created since "
        f"{since.isoformat()}: the relay publishes them again"
    )
    return 0


def _settings(settings_class: type[T]) -> T:
    """An operator command's settings; a bad value is a clear message, no logging set up."""
    try:
        return settings_class()
    except ValidationError as exc:
        raise SystemExit(f"gozon: invalid settings:\n{exc}") from exc


def _quiet_kafka_client() -> None:
    """The dlq commands report a broker they cannot reach in one line of their own; aiokafka's
    log of each failed connection attempt would only repeat it."""
    import logging

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


def _since(args: argparse.Namespace) -> datetime | None:
    from gozon.messaging.dlq import parse_since

    if args.since is None:
        return None
    try:
        return parse_since(args.since)
    except ValueError as exc:
        raise SystemExit(f"gozon: {exc}") from exc


def _dlq_list(args: argparse.Namespace) -> int:
    import json

    from gozon.messaging.dlq import DeadLetterError, list_dead_letters, table
    from gozon.messaging.kafka import KafkaAccess, dlq_topic

    service = _orders() if args.service == "orders" else _payments()
    settings = _settings(service.settings)
    topic = dlq_topic(service.consumes)
    _quiet_kafka_client()
    try:
        letters, total = asyncio.run(
            list_dead_letters(
                KafkaAccess.from_settings(settings), topic, since=_since(args), limit=args.limit
            )
        )
    except DeadLetterError as exc:
        print(f"gozon: {exc}", file=sys.stderr)
        return 2
    if args.json:
        for letter in letters:
            print(json.dumps(letter.as_dict()))
        return 0
    print(
        f"{topic}: {total} dead letters"
        + (f", showing {len(letters)}" if total > len(letters) else "")
    )
    if letters:
        print(table(letters))
    return 0


def _dlq_redrive(args: argparse.Namespace) -> int:
    from gozon.messaging.dlq import DeadLetterError, redrive, redrive_group, table
    from gozon.messaging.kafka import KafkaAccess, dlq_topic

    service = _orders() if args.service == "orders" else _payments()
    settings = _settings(service.settings)
    topic = dlq_topic(service.consumes)
    _quiet_kafka_client()
    group = redrive_group(settings.group_id)
    try:
        result = asyncio.run(
            redrive(
                KafkaAccess.from_settings(settings),
                topic,
                group=group,
                since=_since(args),
                limit=args.limit,
                dry_run=args.dry_run,
            )
        )
    except DeadLetterError as exc:
        print(f"gozon: {exc}", file=sys.stderr)
        return 2
    if result.redriven:
        print(table(result.redriven))
    verb = "would redrive" if args.dry_run else "redriven"
    print(
        f"{topic} -> {service.consumes}: {verb} {len(result.redriven)}; "
        f"passed over (older than --since) {result.passed_over}; "
        f"left for a next run (--limit) {result.remaining}; cursor: consumer group {group}"
    )
    if result.bounded:
        print(
            f"not redriven: {len(result.bounded)} bounded dead letters (the message was too "
            "large to copy; the dead letter holds its size, SHA-256 and first bytes). The "
            "original is at its ORIGIN while that topic's retention keeps it:"
        )
        print(table(result.bounded))
    if args.pushgateway and not args.dry_run:
        _push_redrive_count(args.pushgateway, service.name, service.consumes, len(result.redriven))
    return 0


def _push_redrive_count(url: str, service: str, topic: str, redriven: int) -> None:
    """A batch job's figures for Prometheus: how many the last run redrove, and when it ran."""
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

    registry = CollectorRegistry()
    last = Gauge(
        "gozon_dlq_redrive_last_redriven",
        "Dead letters the last `dlq redrive` run published back.",
        ["topic"],
        registry=registry,
    )
    last.labels(topic).set(redriven)
    ran = Gauge(
        "gozon_dlq_redrive_last_run_timestamp_seconds",
        "When the last `dlq redrive` run ended.",
        ["topic"],
        registry=registry,
    )
    ran.labels(topic).set_to_current_time()
    try:
        push_to_gateway(url, job=f"gozon-{service}-dlq-redrive", registry=registry, timeout=10)
    except OSError as exc:
        print(f"gozon: the Pushgateway at {url} did not take the figures: {exc}", file=sys.stderr)


def reconcile(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from gozon.reconcile import reconcile as run

    orders = _settings(OrdersSettings)
    payments = _settings(PaymentsSettings)
    stuck_after = timedelta(
        seconds=args.stuck_after if args.stuck_after is not None else orders.orders_stuck_after_s
    )
    try:
        report = asyncio.run(
            run(
                orders.database_url,
                payments.database_url,
                stuck_after=stuck_after,
                users=args.user or None,
            )
        )
    except (OSError, SQLAlchemyError) as exc:
        print(f"gozon: reconcile could not read the databases: {exc}", file=sys.stderr)
        return 2
    print(report.render(limit=args.limit))
    return 0 if report.ok else 1


run_api = _for_service(_api)
run_relay = _for_service(_relay)
run_consumer = _for_service(_consumer)
run_migrate = _for_service(_migrate)
run_requeue_failed = _for_service(_requeue_failed)


# --------------------------------------------------------------------------- gateway


def gateway(_: argparse.Namespace) -> int:
    from gozon.core.server import serve
    from gozon.gateway.app import build_app
    from gozon.gateway.server import uvicorn_config
    from gozon.gateway.settings import GatewaySettings

    settings = _start("gateway", GatewaySettings)
    app = build_app(settings, metrics_port=settings.gateway_metrics_port)
    serve(uvicorn_config(app, settings))
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

    runs = {"api": run_api, "relay": run_relay, "consumer": run_consumer}
    for declared in SERVICES:  # the process table's services, each as its package declares it
        name, outbox_table = declared.name, declared.outbox_table
        helps = {
            "api": "the {name} HTTP API ({port})",
            "relay": f"publishes {outbox_table} rows to Kafka",
            "consumer": declared.consumer_does,
        }
        service = services.add_parser(name, help=f"the {name} service")
        processes = service.add_subparsers(dest="process", metavar="PROCESS", required=True)
        for entry in declared.processes:
            help_ = helps[entry.kind].format(name=name, port=entry.port_setting)
            add(processes, entry.args[-1], runs[entry.kind], help_)
        add(
            processes,
            declared.migration.args[-1],
            run_migrate,
            f"alembic upgrade of {declared.database} to head (or newer)",
        )
        outbox = processes.add_parser("outbox", help=f"{outbox_table} maintenance")
        actions = outbox.add_subparsers(dest="action", metavar="ACTION", required=True)
        add(actions, "requeue-failed", run_requeue_failed, "requeue FAILED rows")
        replay = add(
            actions,
            "replay-sent",
            _replay_sent,
            "publish SENT rows again (after a restore; docs/operations.md)",
        )
        replay.add_argument(
            "--since", required=True, help="rows created since: a time or an age (2h, 1d)"
        )
        dlq = processes.add_parser("dlq", help="dead letters of the topic its consumer reads")
        dlq_actions = dlq.add_subparsers(dest="action", metavar="ACTION", required=True)
        listing = add(dlq_actions, "list", _dlq_list, "list the dead letters, oldest first")
        listing.add_argument("--since", help="only those dead-lettered since: a time or 15m/2h/1d")
        listing.add_argument("--limit", type=_positive, default=100, help="at most N (100)")
        listing.add_argument("--json", action="store_true", help="one JSON object a line")
        again = add(
            dlq_actions,
            "redrive",
            _dlq_redrive,
            "publish the dead letters back to their topic (each once; docs/operations.md)",
        )
        again.add_argument("--since", help="pass over those dead-lettered before: a time or 2h")
        again.add_argument("--limit", type=_positive, help="at most N, the oldest first")
        again.add_argument("--dry-run", action="store_true", help="show them, publish nothing")
        again.add_argument("--pushgateway", help="push the run's count to this Pushgateway URL")
    gateway_command = services.add_parser(
        "gateway",
        help="the API gateway, the one entry point (port GOZON_GATEWAY_PORT; "
        "/metrics on GOZON_GATEWAY_METRICS_PORT)",
    )
    gateway_command.set_defaults(run=gateway)
    check = add(
        services,
        "reconcile",
        reconcile,
        "check balances against the ledger and orders against debits, across both databases",
    )
    check.add_argument(
        "--stuck-after",
        type=float,
        metavar="SECONDS",
        help="a NEW order older than this is stuck (default GOZON_ORDERS_STUCK_AFTER_S)",
    )
    check.add_argument(
        "--user", action="append", help="only this user's account and orders (repeatable)"
    )
    check.add_argument("--limit", type=_positive, default=50, help="findings shown per kind")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


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
