"""Benchmark: how fast a consumer drains a pre-filled topic, old code against new, same run.

Starts its own throwaway PostgreSQL and Kafka, fills `order.created.event` with N orders of
users who all have funds (and `payment.processed.event` with N results of N NEW orders), then
runs `gozon payments consumer` (and `gozon orders consumer`) from two checkouts in alternating
phases (old, new, old, new, …): the old code is a git worktree of `--old-ref` made for the run,
the new one is this checkout. Each phase gets a fresh database (copied from a prepared
template) and a new consumer group, so it drains the whole topic from offset 0.

Per phase it reports events/s, from the first to the last row the consumer wrote (the
database's own timestamps: payment_outbox.created_at, orders.updated_at, so process start-up
and the group join are not counted), and CPU ms per event of the consumer process (utime +
stime from /proc/PID/stat, from the moment it reported ready until the topic was drained).
Before a phase counts, its effects are checked in the database: every order answered once,
decided once and debited once, balances = deposits − debits (payments); every order final
(orders).

    .venv/bin/python -m bench.consumers [--events 5000] [--pairs 2] [--old-ref ad627e8]

`--old-ref` defaults to main before the batched consumers (issue 11). Figures go to
docs/benchmarks.md. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import asyncpg
import port_for
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from scripts.processes import http_status, wait_for
from scripts.stack import Kafka, Postgres, StackConfig

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ROOT / "services" / "gozon"
ORDER_CREATED, PAYMENT_PROCESSED = "order.created.event", "payment.processed.event"
PARTITIONS = 3
USERS = 200
AMOUNT = Decimal("10.50")


@dataclass(frozen=True)
class Phase:
    code: str  # "old" or "new"
    events_per_s: float
    cpu_ms_per_event: float
    seconds: float


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def create_topics(bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [ORDER_CREATED, PAYMENT_PROCESSED]
        names += [f"{name}.dlq" for name in names]
        await admin.create_topics([NewTopic(name, PARTITIONS, 1) for name in names])
    finally:
        await admin.close()


async def fill(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value=v, key=k) for k, v in messages]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


async def prepare(pg: Postgres, kafka: Kafka, events: int) -> None:
    """Migrated templates with the users' accounts / the NEW orders; the two topics filled."""
    from gozon.core.migrations import upgrade

    admin = await asyncpg.connect(pg.url("postgres", driver="postgresql"))
    try:
        for name in ("payments_template", "orders_template"):
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    await asyncio.to_thread(
        upgrade, SERVICES / "payments" / "migrations", pg.url("payments_template")
    )
    await asyncio.to_thread(upgrade, SERVICES / "orders" / "migrations", pg.url("orders_template"))
    users = [f"bench-{n}" for n in range(USERS)]
    conn = await asyncpg.connect(pg.url("payments_template", driver="postgresql"))
    try:
        for user in users:
            account = uuid.uuid4()
            await conn.execute(
                "INSERT INTO accounts (id, user_id, balance) VALUES ($1, $2, 1000000)",
                account,
                user,
            )
            await conn.execute(
                "INSERT INTO account_ledger (account_id, user_id, kind, amount, balance_after)"
                " VALUES ($1, $2, 'DEPOSIT', 1000000, 1000000)",
                account,
                user,
            )
    finally:
        await conn.close()
    created, results, orders = [], [], []
    for n in range(events):
        order_id, user = str(uuid.uuid4()), users[n % USERS]
        payload = {"order_id": order_id, "user_id": user, "amount": float(AMOUNT)}
        created.append(
            (
                user.encode(),
                json.dumps(
                    {
                        "event_id": str(uuid.uuid4()),
                        "aggregate_id": order_id,
                        "event_type": "OrderCreated",
                        "payload": {
                            **payload,
                            "description": f"bench {n}",
                            "created_at": now_iso(),
                        },
                    }
                ).encode(),
            )
        )
        results.append(
            (
                user.encode(),
                json.dumps(
                    {
                        "event_id": str(uuid.uuid4()),
                        "aggregate_id": order_id,
                        "event_type": "PaymentProcessed",
                        "payload": {**payload, "status": "PAID", "processed_at": now_iso()},
                    }
                ).encode(),
            )
        )
        orders.append((uuid.UUID(order_id), user))
    conn = await asyncpg.connect(pg.url("orders_template", driver="postgresql"))
    try:
        await conn.copy_records_to_table(
            "orders",
            records=[(o, u, AMOUNT, "bench", "NEW", datetime.now(UTC)) for o, u in orders],
            columns=["id", "user_id", "amount", "description", "status", "created_at"],
        )
    finally:
        await conn.close()
    await create_topics(kafka.bootstrap)
    await fill(kafka.bootstrap, ORDER_CREATED, created)
    await fill(kafka.bootstrap, PAYMENT_PROCESSED, results)


async def fresh_database(pg: Postgres, template: str) -> str:
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg.url("postgres", driver="postgresql"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await admin.close()
    return name


async def payments_progress(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM payment_outbox"))
    finally:
        await conn.close()


async def orders_progress(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM orders WHERE status <> 'NEW'"))
    finally:
        await conn.close()


async def payments_check(dsn: str, events: int) -> float:
    """Checks the effects; returns the seconds from the first answer row to the last."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS answers, count(DISTINCT order_id) AS orders,"
            " extract(epoch FROM max(created_at) - min(created_at)) AS seconds,"
            " count(*) FILTER (WHERE payload->'payload'->>'status' <> 'PAID') AS unpaid"
            " FROM payment_outbox"
        )
        assert (row["answers"], row["orders"], row["unpaid"]) == (events, events, 0), dict(row)
        assert await conn.fetchval("SELECT count(*) FROM payment_inbox") == events
        assert await conn.fetchval("SELECT count(*) FROM payment_decisions") == events
        debits = await conn.fetchval("SELECT count(*) FROM account_ledger WHERE kind = 'DEBIT'")
        assert debits == events, debits
        total = await conn.fetchval("SELECT sum(balance) FROM accounts")
        assert total == USERS * Decimal(1_000_000) - events * AMOUNT, total
        return float(row["seconds"])
    finally:
        await conn.close()


async def orders_check(dsn: str, events: int) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE status = 'FINISHED') AS finished,"
            " extract(epoch FROM max(updated_at) - min(updated_at)) AS seconds FROM orders"
        )
        assert row["finished"] == events, dict(row)
        return float(row["seconds"])
    finally:
        await conn.close()


def run_phase(
    code: str,
    tree: Path,
    service: str,
    pg: Postgres,
    kafka: Kafka,
    events: int,
    work: Path,
) -> Phase:
    template = f"{service}_template"
    database = asyncio.run(fresh_database(pg, template))
    dsn = pg.url(database, driver="postgresql")
    port = port_for.select_random()
    env = {
        **os.environ,
        "PYTHONPATH": str(tree / "services"),
        "PYTHONUNBUFFERED": "1",
        "GOZON_LOG_JSON": "true",
        f"GOZON_{service.upper()}_DATABASE_URL": pg.url(database),
        f"GOZON_{service.upper()}_GROUP_ID": f"bench-{uuid.uuid4().hex[:8]}",
        f"GOZON_{service.upper()}_CONSUMER_METRICS_PORT": str(port),
        "GOZON_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
        "GOZON_KAFKA_TOPIC_PARTITIONS": str(PARTITIONS),
    }
    log = work / f"{service}-{code}-{database}.log"
    progress = payments_progress if service == "payments" else orders_progress
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gozon.cli", service, "consumer"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tree,
        )
    try:
        wait_for(
            lambda: (
                process.poll() is None
                and http_status(f"http://127.0.0.1:{port}/health/ready") == 200
            ),
            timeout=120,
            what=f"the {code} {service} consumer to be ready (log: {log})",
        )
        cpu_before = cpu_seconds(process.pid)
        wait_for(
            lambda: asyncio.run(progress(dsn)) >= events,
            timeout=1800,
            what=f"the {code} {service} consumer to drain the topic (log: {log})",
            interval=0.2,
        )
        cpu = cpu_seconds(process.pid) - cpu_before
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    check = payments_check if service == "payments" else orders_check
    seconds = asyncio.run(check(dsn, events))
    return Phase(code, (events - 1) / seconds, cpu * 1000 / events, seconds)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def old_worktree(ref: str, work: Path) -> Path:
    path = work / "old"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref],
        check=True,
        capture_output=True,
    )
    return path


def report(service: str, phases: list[Phase]) -> None:
    for code in ("old", "new"):
        mine = [p for p in phases if p.code == code]
        print(
            f"{service} {code}: events/s {[round(p.events_per_s) for p in mine]}, "
            f"CPU ms/event {[round(p.cpu_ms_per_event, 3) for p in mine]}"
        )
    old = [p for p in phases if p.code == "old"]
    new = [p for p in phases if p.code == "new"]
    old_rate = statistics.median(p.events_per_s for p in old)
    new_rate = statistics.median(p.events_per_s for p in new)
    old_cpu = statistics.median(p.cpu_ms_per_event for p in old)
    new_cpu = statistics.median(p.cpu_ms_per_event for p in new)
    print(
        f"{service} consumer, medians: old {old_rate:.0f} events/s at {old_cpu:.2f} CPU ms/event;"
        f" new {new_rate:.0f} events/s at {new_cpu:.2f} CPU ms/event;"
        f" new/old throughput {new_rate / old_rate:.1f}x,"
        f" CPU per event {old_cpu / new_cpu:.1f}x less"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000, help="events pre-filled per topic")
    parser.add_argument("--pairs", type=int, default=2, help="old/new phase pairs per consumer")
    parser.add_argument("--old-ref", default="ad627e8", help="the old code's git revision")
    parser.add_argument("--services", default="payments,orders", help="which consumers to measure")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))

    work = Path(tempfile.mkdtemp(prefix="gozon-bench-consumers-"))
    work.chmod(0o755)
    pg = Postgres(work / "pg", port_for.select_random(), durable=True, databases=())
    kafka_port = port_for.select_random()
    kafka = Kafka(
        work / "kafka",
        kafka_port,
        port_for.select_random(exclude_ports=[kafka_port]),
        cache_dir=StackConfig.from_env().cache_dir,
    )
    old = None
    try:
        old = old_worktree(args.old_ref, work)
        pg.start()
        kafka.start()
        asyncio.run(prepare(pg, kafka, args.events))
        print(
            f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}"
        )
        for service in args.services.split(","):
            phases: list[Phase] = []
            for _ in range(args.pairs):
                for code, tree in (("old", old), ("new", ROOT)):
                    phase = run_phase(code, tree, service, pg, kafka, args.events, work)
                    print(
                        f"  {service} {code}: {args.events} events in {phase.seconds:.2f} s,"
                        f" {phase.events_per_s:.0f}/s, {phase.cpu_ms_per_event:.3f} CPU ms/event",
                        flush=True,
                    )
                    phases.append(phase)
            report(service, phases)
        print(
            f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}"
        )
        return 0
    finally:
        kafka.stop()
        pg.stop()
        if old is not None:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)],
                check=False,
                capture_output=True,
            )
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
