"""Benchmark: the outbox relay's commit → Kafka-ack latency, and what the relay costs writers.

Starts its own throwaway PostgreSQL and Kafka (as the tests do) and real `gozon orders api` and
`gozon orders relay` processes, then:

1. latency: orders at a light, fixed arrival rate (open loop) with the relay running; the
   commit → claim time of each is `sent_at - created_at` of its outbox row (`created_at` is
   the start of the order's transaction, `sent_at` the relay's clock when it claimed the row,
   just before the publish; it was the clock after the broker's acks until the claim and the
   mark became one statement, so the figures in docs/benchmarks.md, "Relay (issue 3)", are
   commit → ack and new ones leave out the publish itself, ~1 ms);
2. cost: order-creation throughput at fixed concurrency (closed loop), alternating phases with
   the relay running and stopped (ABAB…), reporting the median of each and the ratio.

    .venv/bin/python -m bench.relay [--rate 50] [--seconds 15] [--concurrency 16]

Figures go to docs/benchmarks.md. Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import asyncpg
import port_for

from scripts.processes import GozonProcess, wait_for
from scripts.stack import Kafka, Postgres, StackConfig

MIGRATIONS = Path(__file__).resolve().parent.parent / "services" / "gozon" / "orders" / "migrations"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def post_order(session: aiohttp.ClientSession, url: str, n: int) -> None:
    async with session.post(
        f"{url}/api/orders",
        json={"amount": 10.5, "description": f"bench {n}"},
        headers={"X-User-Id": f"bench-{n % 50}"},
    ) as response:
        if response.status != 201:
            raise RuntimeError(f"POST /api/orders answered {response.status}")
        await response.read()


async def open_loop(url: str, rate: float, seconds: float) -> int:
    """Sends orders at a fixed arrival rate, whatever the answers' speed; returns the count."""
    interval = 1 / rate
    tasks: list[asyncio.Task[None]] = []
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        n = 0
        while (elapsed := time.perf_counter() - started) < seconds:
            tasks.append(asyncio.create_task(post_order(session, url, n)))
            n += 1
            await asyncio.sleep(max(0.0, n * interval - elapsed))
        await asyncio.gather(*tasks)
    return n


async def closed_loop(url: str, concurrency: int, seconds: float) -> float:
    """Orders per second with `concurrency` clients each sending the next on an answer."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def client(session: aiohttp.ClientSession, worker: int) -> None:
        nonlocal done
        n = worker
        while time.perf_counter() < deadline:
            await post_order(session, url, n)
            done += 1
            n += concurrency

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session, w) for w in range(concurrency)))
        return done / (time.perf_counter() - started)


async def pending(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM order_outbox WHERE status='PENDING'"))
    finally:
        await conn.close()


async def commit_to_ack(dsn: str, since: float) -> list[float]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT extract(epoch FROM sent_at - created_at) AS s FROM order_outbox "
            "WHERE status = 'SENT' AND created_at >= to_timestamp($1)",
            since,
        )
    finally:
        await conn.close()
    return [float(row["s"]) for row in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50, help="orders/s in the latency run")
    parser.add_argument("--seconds", type=float, default=15, help="length of the latency run")
    parser.add_argument("--concurrency", type=int, default=16, help="clients in the cost run")
    parser.add_argument("--phase-seconds", type=float, default=8)
    parser.add_argument("--phases", type=int, default=3, help="phases per state (ABAB…)")
    args = parser.parse_args()
    # SIGTERM (a timeout, Ctrl-C from a runner) still runs the clean-up below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))

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
    api_port, relay_port = port_for.select_random(), port_for.select_random()
    env = {
        "GOZON_ORDERS_DATABASE_URL": pg.url("order_db"),
        "GOZON_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
        "GOZON_ORDERS_API_PORT": str(api_port),
        "GOZON_ORDERS_RELAY_METRICS_PORT": str(relay_port),
        "GOZON_LOG_LEVEL": "WARNING",
    }
    api = GozonProcess(
        ["orders", "api"], env=env, log=work / "api.log", health_url=f"http://127.0.0.1:{api_port}"
    )
    dsn = pg.url("order_db", driver="postgresql")
    url = f"http://127.0.0.1:{api_port}"

    def relay() -> GozonProcess:
        return GozonProcess(
            ["orders", "relay"],
            env=env,
            log=work / "relay.log",
            health_url=f"http://127.0.0.1:{relay_port}",
        )

    try:
        pg.start()
        kafka.start()
        from gozon.core.migrations import upgrade

        upgrade(MIGRATIONS, pg.url("order_db"))
        api.start(ready=True)
        running = relay().start(ready=True)

        asyncio.run(closed_loop(url, args.concurrency, 3))  # warm-up
        wait_for(lambda: asyncio.run(pending(dsn)) == 0, timeout=60, what="the backlog")

        since = time.time()
        sent = asyncio.run(open_loop(url, args.rate, args.seconds))
        wait_for(lambda: asyncio.run(pending(dsn)) == 0, timeout=60, what="the backlog")
        latencies = [s * 1000 for s in asyncio.run(commit_to_ack(dsn, since))]
        print(
            f"commit → ack at {args.rate:g} orders/s for {args.seconds:g} s "
            f"({sent} orders, {len(latencies)} rows): "
            f"median {statistics.median(latencies):.1f} ms, "
            f"p95 {percentile(latencies, 95):.1f} ms, p99 {percentile(latencies, 99):.1f} ms, "
            f"max {max(latencies):.1f} ms"
        )

        with_relay: list[float] = []
        without_relay: list[float] = []
        for _ in range(args.phases):
            wait_for(lambda: asyncio.run(pending(dsn)) == 0, timeout=120, what="the backlog")
            with_relay.append(asyncio.run(closed_loop(url, args.concurrency, args.phase_seconds)))
            running.stop()
            without_relay.append(
                asyncio.run(closed_loop(url, args.concurrency, args.phase_seconds))
            )
            running = relay().start(ready=True)
        on, off = statistics.median(with_relay), statistics.median(without_relay)
        print(
            f"order creation, {args.concurrency} clients, {args.phases}×{args.phase_seconds:g} s "
            f"per state: relay running {on:.0f}/s (phases {[round(x) for x in with_relay]}), "
            f"relay stopped {off:.0f}/s (phases {[round(x) for x in without_relay]}); "
            f"running/stopped = {on / off:.3f} (the relay costs the writers "
            f"{(1 - on / off) * 100:.1f}%)"
        )
        running.stop()
        return 0
    finally:
        api.stop()
        kafka.stop()
        pg.stop()
        if not os.environ.get("GOZON_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
