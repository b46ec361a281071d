"""Benchmark: what a consumer costs per event, old code against new, same run.

Starts its own throwaway PostgreSQL and Kafka, fills `order.created.event` with N orders of
users who all have funds (and `payment.processed.event` with N results of N NEW orders), then
runs `gozon payments consumer` (and `gozon orders consumer`) from two checkouts in alternating
phases (old, new, old, new, …): the old code is a git worktree of `--old-ref` made for the run,
the new one is this checkout. Each phase gets a fresh database (copied from a prepared
template) and a new consumer group. Two modes (`--modes`, both by default):

- drain: the group starts at offset 0 and drains the whole pre-filled topic (big batches).
  Reports events/s, from the first to the last row the consumer wrote (the database's own
  timestamps: payment_outbox.created_at, orders.updated_at, so process start-up and the group
  join are not counted).
- trickle: the group starts at the topic's end; once the consumer is ready, the bench offers
  `--trickle-events` of the same events at `--rate` per second (50 by default: at that rate
  a fetch usually holds one event, so each pays a whole batch's fixed cost).

Both report the mean events per batch (the rows the consumer wrote per transaction: their
xmin), and CPU ms per event and per batch (how many events share a batch varies with the
machine's load, and the per-batch cost is what fewer round trips cut) of the consumer process
(utime + stime from /proc/PID/stat) and of PostgreSQL (every postgres process: the postmaster
with its reaped children's times and each live backend), from the moment the consumer
reported ready (drain) or the first event was offered (trickle) until the last effect was in
the database. Progress is polled on one connection, the same for old and new. Before a phase
counts, its effects are checked in the database: every order answered once, decided once and
debited once, balances = deposits − debits (payments); every order final (orders).

    .venv/bin/python -m bench.consumers [--events 5000] [--pairs 2] [--old-ref ad627e8] \
        [--modes drain,trickle] [--rate 50] [--trickle-events 1000]

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
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import asyncpg
import port_for
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
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
    pg_cpu_ms_per_event: float = 0.0
    events_per_batch: float = 1.0


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds(pg: Postgres) -> float:
    """utime + stime of every postgres process: the postmaster (with cutime + cstime, its
    children that exited) and each live child (backends, background workers)."""
    postmaster = pg.running_pid()
    assert postmaster is not None, "PostgreSQL is not running"
    tick = os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    total = sum(int(f) for f in fields[11:15])
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            child = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile: its times are in the postmaster's cutime/cstime
        if int(child[1]) == postmaster:
            total += int(child[11]) + int(child[12])
    return total / tick


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


Messages = dict[str, list[tuple[bytes, bytes]]]


async def prepare(pg: Postgres, kafka: Kafka, events: int) -> Messages:
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
    return {"payments": created, "orders": results}


async def fresh_database(pg: Postgres, template: str) -> str:
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg.url("postgres", driver="postgresql"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await admin.close()
    return name


PROGRESS = {
    "payments": "SELECT count(*) FROM payment_outbox",
    "orders": "SELECT count(*) FROM orders WHERE status <> 'NEW'",
}


async def until_done(
    dsn: str, service: str, events: int, process: subprocess.Popen[bytes], log: Path
) -> None:
    """Polls the phase's progress on one connection until `events` are done (bounded)."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + 1800
        while int(await conn.fetchval(PROGRESS[service])) < events:
            assert process.poll() is None, f"the {service} consumer ended (log: {log})"
            assert time.monotonic() < deadline, f"the {service} consumer is stuck (log: {log})"
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def start_at_end(bootstrap: str, topic: str, group: str) -> None:
    """Commits the group's offsets at the topic's end: its consumer reads only what comes next."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        await consumer.commit(dict(ends.items()))
    finally:
        await consumer.stop()


async def offer(
    bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], rate: float
) -> None:
    """Sends the messages at `rate` per second, each on its own (open loop, no batching)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    try:
        started = time.monotonic()
        futures = []
        for n, (key, value) in enumerate(messages):
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
            futures.append(await producer.send(topic, value=value, key=key))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


BATCHES = {
    # Every row a batch wrote carries its transaction's id (xmin): one transaction per batch.
    "payments": "SELECT count(*) AS rows, count(DISTINCT xmin::text) AS batches"
    " FROM payment_outbox",
    "orders": "SELECT count(*) AS rows, count(DISTINCT xmin::text) AS batches"
    " FROM orders WHERE status <> 'NEW'",
}


async def events_per_batch(dsn: str, service: str) -> float:
    """The consumer's mean batch: the rows it wrote per transaction that wrote them."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(BATCHES[service])
        return float(row["rows"]) / max(1, int(row["batches"]))
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
    trickle: tuple[list[tuple[bytes, bytes]], float] | None = None,
) -> Phase:
    """One phase: drains the topic, or (`trickle`: the messages and the rate) offers those
    messages at that rate to a group that starts at the topic's end."""
    template = f"{service}_template"
    database = asyncio.run(fresh_database(pg, template))
    dsn = pg.url(database, driver="postgresql")
    port = port_for.select_random()
    group = f"bench-{uuid.uuid4().hex[:8]}"
    topic = ORDER_CREATED if service == "payments" else PAYMENT_PROCESSED
    if trickle is not None:
        events = len(trickle[0])
        asyncio.run(start_at_end(kafka.bootstrap, topic, group))
    env = {
        **os.environ,
        "PYTHONPATH": str(tree / "services"),
        "PYTHONUNBUFFERED": "1",
        "GOZON_LOG_JSON": "true",
        f"GOZON_{service.upper()}_DATABASE_URL": pg.url(database),
        f"GOZON_{service.upper()}_GROUP_ID": group,
        f"GOZON_{service.upper()}_CONSUMER_METRICS_PORT": str(port),
        "GOZON_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
        "GOZON_KAFKA_TOPIC_PARTITIONS": str(PARTITIONS),
    }
    log = work / f"{service}-{code}-{database}.log"
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
        if trickle is not None:
            time.sleep(3)  # the group's join settles (the consumer is ready before it is assigned)
        cpu_before, pg_before = cpu_seconds(process.pid), postgres_cpu_seconds(pg)
        started = time.monotonic()

        async def measured() -> None:
            if trickle is not None:
                await offer(kafka.bootstrap, topic, trickle[0], trickle[1])
            await until_done(dsn, service, events, process, log)

        asyncio.run(measured())
        cpu = cpu_seconds(process.pid) - cpu_before
        pg_cpu = postgres_cpu_seconds(pg) - pg_before
        elapsed = time.monotonic() - started
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    check = payments_check if service == "payments" else orders_check
    seconds = asyncio.run(check(dsn, events))
    per_batch = asyncio.run(events_per_batch(dsn, service))
    rate = (events - 1) / seconds if trickle is None else events / elapsed
    return Phase(
        code,
        rate,
        cpu * 1000 / events,
        seconds if trickle is None else elapsed,
        pg_cpu * 1000 / events,
        per_batch,
    )


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


def report(service: str, mode: str, phases: list[Phase]) -> None:
    def per_batch(p: Phase) -> tuple[float, float]:
        return p.cpu_ms_per_event * p.events_per_batch, p.pg_cpu_ms_per_event * p.events_per_batch

    for code in ("old", "new"):
        mine = [p for p in phases if p.code == code]
        print(
            f"{service} {mode} {code}: events/s {[round(p.events_per_s) for p in mine]}, "
            f"events/batch {[round(p.events_per_batch, 2) for p in mine]}, "
            f"consumer CPU ms/event {[round(p.cpu_ms_per_event, 3) for p in mine]}, "
            f"PostgreSQL CPU ms/event {[round(p.pg_cpu_ms_per_event, 3) for p in mine]}"
        )
    medians: dict[str, list[float]] = {}
    for code in ("old", "new"):
        mine = [p for p in phases if p.code == code]
        medians[code] = [
            statistics.median(p.events_per_s for p in mine),
            statistics.median(p.events_per_batch for p in mine),
            statistics.median(p.cpu_ms_per_event for p in mine),
            statistics.median(p.pg_cpu_ms_per_event for p in mine),
            statistics.median(per_batch(p)[0] for p in mine),
            statistics.median(per_batch(p)[1] for p in mine),
        ]
    old, new = medians["old"], medians["new"]
    print(
        f"{service} consumer, {mode}, medians (old → new, ×less):"
        f" events/s {old[0]:.0f} → {new[0]:.0f};"
        f" events/batch {old[1]:.2f} → {new[1]:.2f};"
        f" consumer CPU ms/event {old[2]:.3f} → {new[2]:.3f} ({old[2] / new[2]:.2f}×);"
        f" PostgreSQL CPU ms/event {old[3]:.3f} → {new[3]:.3f} ({old[3] / new[3]:.2f}×);"
        f" consumer CPU ms/batch {old[4]:.3f} → {new[4]:.3f} ({old[4] / new[4]:.2f}×);"
        f" PostgreSQL CPU ms/batch {old[5]:.3f} → {new[5]:.3f} ({old[5] / new[5]:.2f}×)",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000, help="events pre-filled per topic")
    parser.add_argument("--pairs", type=int, default=2, help="old/new phase pairs per consumer")
    parser.add_argument("--old-ref", default="ad627e8", help="the old code's git revision")
    parser.add_argument("--services", default="payments,orders", help="which consumers to measure")
    parser.add_argument("--modes", default="drain,trickle", help="drain and/or trickle")
    parser.add_argument("--rate", type=float, default=50, help="trickle: events offered per s")
    parser.add_argument(
        "--trickle-events", type=int, default=1000, help="trickle: events offered per phase"
    )
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
        messages = asyncio.run(prepare(pg, kafka, args.events))
        print(
            f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}"
        )
        for service in args.services.split(","):
            # Drain first: it reads the topic from offset 0, which the trickle phases extend.
            for mode in [m for m in ("drain", "trickle") if m in args.modes.split(",")]:
                trickle = (
                    (messages[service][: args.trickle_events], args.rate)
                    if mode == "trickle"
                    else None
                )
                phases: list[Phase] = []
                for _ in range(args.pairs):
                    for code, tree in (("old", old), ("new", ROOT)):
                        phase = run_phase(
                            code, tree, service, pg, kafka, args.events, work, trickle
                        )
                        print(
                            f"  {service} {mode} {code}: {phase.seconds:.2f} s,"
                            f" {phase.events_per_s:.0f}/s, consumer"
                            f" {phase.cpu_ms_per_event:.3f} + PostgreSQL"
                            f" {phase.pg_cpu_ms_per_event:.3f} CPU ms/event,"
                            f" {phase.events_per_batch:.2f} events/batch",
                            flush=True,
                        )
                        phases.append(phase)
                report(service, mode, phases)
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
