"""Benchmark: what the outbox relay costs per row, by batch size, and its round trips.

Starts its own throwaway PostgreSQL and Kafka (as the tests do), fills order_outbox with
`--rows` rows shaped as the orders service writes them (a real OrderCreated envelope and a
`traceparent`), and drains it with `OutboxRelay.publish_batch` in this process, once per batch
size. It prints, per batch size: rows/s, this process's CPU per row (the relay's own cost:
SQL, publishing, spans, logs, metrics; logging and tracing configured as the processes
configure them, nothing exported), PostgreSQL's CPU per row (all its processes, from
/proc), the round trips to PostgreSQL per batch (writes to its sockets, BEGIN and COMMIT
included, the final empty poll too) and the statements SQLAlchemy saw per batch (its events;
none for a relay that runs its batches on asyncpg itself). `--count-turns` also counts, per
batch, the event loop's callbacks and its selector waits, and of those the ones that may sleep
(each a wake-up when the socket answers): what a one-row batch costs is mostly these.

`--compare FILE` (repeatable) loads another relay module from FILE (e.g. the previous version:
`git show HEAD~1:services/gozon/messaging/relay.py > /tmp/relay_old.py`) and alternates the
two in the same run (A, B, B, A, A, B, …: each round starts with the next one), so the
machine's load hits both alike.

    .venv/bin/python -m bench.relay_rows --rows 5000 --batch-sizes 1,20,200
    .venv/bin/python -m bench.relay_rows --compare /tmp/relay_old.py

Loopback only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import inspect
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import port_for
from sqlalchemy import event

from bench.capacity import Watched
from gozon.contracts import OrderCreated, OrderCreatedPayload, utc_now
from gozon.core.db import create_engine, session_factory
from gozon.core.logging import configure_logging
from gozon.core.telemetry import configure_tracing
from gozon.messaging import relay as installed_relay
from gozon.messaging.kafka import new_producer
from gozon.orders.models import order_outbox
from scripts.stack import Kafka, Postgres, StackConfig, create_topics

MIGRATIONS = Path(__file__).resolve().parent.parent / "services" / "gozon" / "orders" / "migrations"
TOPIC = "bench.relay.rows"


def load_relay(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"relay_{uuid.uuid4().hex[:6]}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load a relay module from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


async def fill(dsn: str, rows: int) -> None:
    records = []
    for n in range(rows):
        order_id = uuid.uuid4()
        envelope = OrderCreated(
            aggregate_id=str(order_id),
            payload=OrderCreatedPayload(
                order_id=order_id,
                user_id=f"bench-{n % 100}",
                amount=Decimal("10.50"),
                description=f"bench {n}",
                created_at=utc_now(),
            ),
        )
        traceparent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
        records.append(
            (
                str(order_id),
                "OrderCreated",
                TOPIC,
                str(order_id),
                json.dumps(envelope.model_dump(mode="json")),
                json.dumps({"traceparent": traceparent}),
            )
        )
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_records_to_table(
            "order_outbox",
            records=records,
            columns=["aggregate_id", "event_type", "topic", "message_key", "payload", "headers"],
        )
        await conn.execute("VACUUM ANALYZE order_outbox")
    finally:
        await conn.close()


class Turns:
    """Counts, while `on`, the event loop's callbacks and its selector waits (those with a
    timeout other than 0 may sleep: the process gives up the CPU until a socket answers)."""

    def __init__(self) -> None:
        self.on = False
        self.callbacks = self.waits = self.sleeps = 0

    @contextlib.contextmanager
    def installed(self, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
        handle_run = asyncio.events.Handle._run
        selector_type = type(loop._selector)  # type: ignore[attr-defined]
        select = selector_type.select

        def run(handle: asyncio.Handle) -> None:
            if self.on:
                self.callbacks += 1
            handle_run(handle)

        def waited(selector: Any, timeout: float | None = None) -> Any:
            if self.on:
                self.waits += 1
                self.sleeps += timeout is None or timeout > 0
            return select(selector, timeout)

        asyncio.events.Handle._run = run  # type: ignore[method-assign,assignment]
        selector_type.select = waited
        try:
            yield
        finally:
            asyncio.events.Handle._run = handle_run  # type: ignore[method-assign]
            selector_type.select = select


async def drain(
    module: ModuleType,
    url: str,
    bootstrap: str,
    batch_size: int,
    pg: Watched,
    turns: Turns | None = None,
) -> dict[str, float]:
    engine = create_engine(url, pool_size=2, pre_ping=False)
    statements = round_trips = 0

    def count(*_: Any) -> None:
        nonlocal statements
        statements += 1

    # BEGIN and COMMIT do not pass through cursor execution: count them as well. (Statements
    # a relay sends on the driver's connection itself pass no SQLAlchemy event.)
    event.listen(engine.sync_engine, "before_cursor_execute", count)
    event.listen(engine.sync_engine, "begin", count)
    event.listen(engine.sync_engine, "commit", count)
    event.listen(engine.sync_engine, "rollback", count)

    def count_writes(connection: Any) -> None:
        """Round trips, whatever sends them: every write to PostgreSQL's socket is one
        (asyncpg sends a statement's messages, its Sync included, in one write and waits)."""
        transport = connection._transport
        write = transport.write

        def counted(data: Any) -> None:
            nonlocal round_trips
            round_trips += 1
            write(data)

        transport.write = counted

    # The pool's connections, and the relay's own connection where it has one.
    event.listen(
        engine.sync_engine, "connect", lambda dbapi, _: count_writes(dbapi.driver_connection)
    )
    producer = new_producer(bootstrap, client_id="bench-relay")
    await producer.start()
    options: dict[str, Any] = {}
    if "database_url" in inspect.signature(module.OutboxRelay).parameters:
        options["database_url"] = url
    relay = module.OutboxRelay(
        table=order_outbox,
        sessions=session_factory(engine),
        producer=producer,
        config=module.RelayConfig(batch_size=batch_size),
        **options,
    )
    try:
        await relay.publish_batch()  # warm: the connection, prepared statements, metadata
        if getattr(relay, "connection", None) is not None:
            count_writes(relay.connection)
        statements = round_trips = 0
        rows = batches = 0
        times, pg_before = os.times(), pg.snapshot()
        started = time.perf_counter()
        if turns is not None:
            turns.on, turns.callbacks, turns.waits, turns.sleeps = True, 0, 0, 0
        while claimed := await relay.publish_batch():
            rows += claimed
            batches += 1
        if turns is not None:
            turns.on = False
        elapsed = time.perf_counter() - started
        after = os.times()
        user, system = after.user - times.user, after.system - times.system
        pg_cpu = sum(pg.snapshot().values()) - sum(pg_before.values())
    finally:
        if hasattr(relay, "close"):
            await relay.close()
        await producer.stop()
        await engine.dispose()
    return {
        "rows": rows,
        "rows_per_s": rows / elapsed,
        "relay_us_per_row": 1e6 * (user + system) / rows,
        "relay_sys_share": system / (user + system) if user + system else 0.0,
        "pg_us_per_row": 1e6 * pg_cpu / rows,
        "statements_per_batch": statements / batches,
        "round_trips_per_batch": round_trips / batches,
        "callbacks_per_batch": turns.callbacks / batches if turns else 0.0,
        "waits_per_batch": turns.waits / batches if turns else 0.0,
        "sleeps_per_batch": turns.sleeps / batches if turns else 0.0,
    }


async def run(args: argparse.Namespace, pg: Postgres, kafka: Kafka) -> None:
    dsn = pg.url("order_db", driver="postgresql")
    url = pg.url("order_db")
    await create_topics(kafka.bootstrap, [TOPIC], partitions=3)
    watched = Watched({"postgresql": (pg.running_pid() or 0, False)})
    variants: dict[str, ModuleType] = {"installed": installed_relay}
    for path in args.compare:
        variants[f"from {path}"] = load_relay(path)
    figures: dict[tuple[str, int], list[dict[str, float]]] = {}
    turns = Turns() if args.count_turns else None
    with contextlib.ExitStack() as stack:
        if turns is not None:
            stack.enter_context(turns.installed(asyncio.get_running_loop()))
        await _rounds(args, dsn, url, kafka, watched, variants, figures, turns)
    report(args, figures)


async def _rounds(
    args: argparse.Namespace,
    dsn: str,
    url: str,
    kafka: Kafka,
    watched: Watched,
    variants: dict[str, ModuleType],
    figures: dict[tuple[str, int], list[dict[str, float]]],
    turns: Turns | None,
) -> None:
    for batch_size in args.batch_sizes:
        rows = args.rows if batch_size > 1 else min(args.rows, args.rows_single)
        for round_ in range(args.rounds):
            # Each round starts with the next variant (A, B, C; B, C, A; …): none always goes
            # first after a fill of a growing table, or after the previous batch size.
            names = list(variants)
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                module = variants[name]
                await fill(dsn, rows)
                result = await drain(module, url, kafka.bootstrap, batch_size, watched, turns)
                figures.setdefault((name, batch_size), []).append(result)
                print(f"{name} batch {batch_size}: {result}", file=sys.stderr)


Figures = dict[tuple[str, int], list[dict[str, float]]]


def report(args: argparse.Namespace, figures: Figures) -> None:
    print(
        f"\n`bench.relay_rows`, {args.rounds} rounds per variant (medians), load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
    )
    print(
        "| relay | batch size | rows/s | relay CPU µs/row (system share) "
        "| PostgreSQL CPU µs/row | round trips per batch | SQLAlchemy statements per batch |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (name, batch_size), results in figures.items():

        def median(key: str, results: list[dict[str, float]] = results) -> float:
            return statistics.median(r[key] for r in results)

        print(
            f"| {name} | {batch_size} | {median('rows_per_s'):,.0f} "
            f"| {median('relay_us_per_row'):,.0f} ({median('relay_sys_share'):.0%}) "
            f"| {median('pg_us_per_row'):,.0f} "
            f"| {median('round_trips_per_batch'):.1f} "
            f"| {median('statements_per_batch'):.1f} |"
        )
    if args.count_turns:
        print(
            "\n| relay | batch size | event-loop callbacks per batch | selector waits per batch "
            "| of which may sleep |\n| --- | --- | --- | --- | --- |"
        )
        for (name, batch_size), results in figures.items():
            print(
                f"| {name} | {batch_size} "
                + "".join(
                    f"| {statistics.median(r[key] for r in results):.1f} "
                    for key in ("callbacks_per_batch", "waits_per_batch", "sleeps_per_batch")
                )
                + "|"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000, help="rows per drain")
    parser.add_argument("--rows-single", type=int, default=1000, help="rows at batch size 1")
    parser.add_argument(
        "--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 20, 200]
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--count-turns",
        action="store_true",
        help="also count event-loop callbacks and selector waits per batch (adds a little CPU)",
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        help="another relay module's file, alternated with ours (repeatable)",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    # The processes' own logging (JSON lines at INFO): part of the cost, written to /dev/null.
    stdout, sys.stdout = sys.stdout, open(os.devnull, "w")  # noqa: SIM115 (for the process)
    try:
        configure_logging("orders")
    finally:
        sys.stdout = stdout
    # As every process does (gozon.cli): the SDK tracer provider, nothing exported, so each
    # row's PRODUCER span is a real, sampled span and the batch span a dropped background one.
    configure_tracing("orders", env={})

    work = Path(tempfile.mkdtemp(prefix="gozon-bench-"))
    work.chmod(0o755)
    pg = Postgres(work / "pg", port_for.select_random(), durable=True, databases=("order_db",))
    kafka_port = port_for.select_random()
    kafka = Kafka(
        work / "kafka",
        kafka_port,
        port_for.select_random(exclude_ports=[kafka_port]),
        cache_dir=StackConfig.from_env().cache_dir,
    )
    try:
        pg.start()
        kafka.start()
        from gozon.core.migrations import upgrade

        upgrade(MIGRATIONS, pg.url("order_db"))
        asyncio.run(run(args, pg, kafka))
        return 0
    finally:
        kafka.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
