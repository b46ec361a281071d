"""Benchmark: order → final status, through the running platform (`make up`).

Drives N orders for M users at a fixed arrival rate (open loop: the next order leaves on
schedule whatever the answers' speed), waits until every order is FINISHED or CANCELLED, and
prints the throughput, the order → final-status latency (p50/p95/p99, from the order's
`created_at` to its final `updated_at` in order_db, both written by the database's clock),
and the largest outbox lag the relays reported meanwhile.

    make up
    .venv/bin/python -m bench.flow --rate 50 --orders 1500 --users 100
    .venv/bin/python -m bench.flow --rate 300 --orders 9000 --users 100

Loopback only; the run is bounded by --orders and a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
import uuid

import aiohttp
import asyncpg


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def outbox_lag(session: aiohttp.ClientSession, urls: list[str]) -> float:
    worst = 0.0
    for url in urls:
        try:
            async with session.get(f"{url}/metrics") as response:
                body = await response.text()
        except aiohttp.ClientError:
            continue
        for match in re.finditer(
            r"^gozon_outbox_oldest_pending_age_seconds\{.*\} (\S+)$", body, re.MULTILINE
        ):
            worst = max(worst, float(match.group(1)))
    return worst


async def run(args: argparse.Namespace) -> int:
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    users = [f"{prefix}-{n}" for n in range(args.users)]
    connector = aiohttp.TCPConnector(limit=args.connections)
    async with aiohttp.ClientSession(connector=connector) as http:
        for user in users:  # every user can pay for every order
            async with http.post(
                f"{args.url}/api/payments/deposit?amount=1000000", headers={"X-User-Id": user}
            ) as response:
                assert response.status in (200, 201), await response.text()

        errors = 0
        lag_seen = 0.0
        stop_sampling = asyncio.Event()

        async def sample_lag() -> None:
            nonlocal lag_seen
            while not stop_sampling.is_set():
                lag_seen = max(lag_seen, await outbox_lag(http, args.metrics))
                await asyncio.sleep(0.5)

        async def place(n: int) -> None:
            nonlocal errors
            async with http.post(
                f"{args.url}/api/orders",
                json={"amount": 1.25, "description": f"bench order {n}"},
                headers={"X-User-Id": users[n % len(users)]},
            ) as response:
                await response.read()
                if response.status != 201:
                    errors += 1

        sampler = asyncio.create_task(sample_lag())
        tasks = []
        started = time.perf_counter()
        for n in range(args.orders):
            tasks.append(asyncio.create_task(place(n)))
            await asyncio.sleep(max(0.0, started + (n + 1) / args.rate - time.perf_counter()))
        await asyncio.gather(*tasks)
        sent_in = time.perf_counter() - started

        db = await asyncpg.connect(args.orders_db)
        try:
            deadline = time.perf_counter() + args.deadline
            while True:
                open_orders = await db.fetchval(
                    "SELECT count(*) FROM orders WHERE user_id LIKE $1 AND status = 'NEW'",
                    f"{prefix}-%",
                )
                if open_orders == 0 or time.perf_counter() > deadline:
                    break
                await asyncio.sleep(0.1)
            finished_in = time.perf_counter() - started
            rows = await db.fetch(
                "SELECT status, extract(epoch FROM updated_at - created_at) AS s FROM orders "
                "WHERE user_id LIKE $1",
                f"{prefix}-%",
            )
        finally:
            await db.close()
        stop_sampling.set()
        await sampler

    latencies = [float(row["s"]) * 1000 for row in rows if row["status"] != "NEW"]
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    print(
        f"{args.orders} orders for {args.users} users at {args.rate:g}/s: sent in "
        f"{sent_in:.1f} s ({args.orders / sent_in:.0f}/s offered), all final in "
        f"{finished_in:.1f} s ({len(latencies) / finished_in:.0f}/s completed); "
        f"HTTP errors {errors}; statuses {statuses}"
    )
    if latencies:
        print(
            f"order → final: p50 {statistics.median(latencies):.1f} ms, "
            f"p95 {percentile(latencies, 95):.1f} ms, p99 {percentile(latencies, 99):.1f} ms, "
            f"max {max(latencies):.1f} ms; largest outbox lag seen {lag_seen * 1000:.0f} ms"
        )
    return 0 if statuses.get("NEW", 0) == 0 and errors == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway")
    parser.add_argument(
        "--orders-db", default="postgresql://postgres:postgres@127.0.0.1:5432/order_db"
    )
    parser.add_argument(
        "--metrics",
        nargs="*",
        default=["http://127.0.0.1:9101", "http://127.0.0.1:9103"],
        help="the relays' side ports",
    )
    parser.add_argument("--rate", type=float, default=50, help="orders per second")
    parser.add_argument("--orders", type=int, default=1500)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--deadline", type=float, default=120, help="seconds to wait for finals")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
