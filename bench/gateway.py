"""Benchmark: one GET straight to the upstream vs through the gateway, same run, same load.

    .venv/bin/python -m bench.gateway --own-stack   # throwaway PostgreSQL, orders API, gateway
    .venv/bin/python -m bench.gateway --stub        # a FastAPI stub upstream and a gateway
    .venv/bin/python -m bench.gateway               # orders API on 8081 vs gateway on 8080
    .venv/bin/python -m bench.gateway --direct URL --gateway URL

The target is `GET /api/orders/{id}`. With `--own-stack` the script starts, on free loopback
ports, a throwaway PostgreSQL, real `gozon orders api` and `gozon gateway` processes (as
`make up` runs them), creates one order and stops everything at the end; with `--stub` the
upstream is a minimal FastAPI app answering a fixed order (the gateway's cost against the
cheapest possible upstream); otherwise it uses the running processes at the given URLs.

The load client is aiohttp: for each `--concurrency` level (default 1 and 32), that many
workers each send one request at a time. After a one-second warm-up of both targets it runs
`--rounds` pairs of phases, direct then gateway (ABAB…), each `--duration` seconds or
`--requests` requests, whichever comes first, and pools each target's phases. It prints req/s
and median / p99 latency for both and the ratios (target: the gateway adds at most 1 ms at the
median and keeps at least 70% of the direct throughput). One client shows the latency the hop
adds; many clients saturate the machine and show the throughput it costs. Figures go to
docs/benchmarks.md. Loopback only; a benchmark, never a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import port_for
import uvicorn
from fastapi import FastAPI

from devstack import GozonProcess, http_status, throwaway_postgres, wait_for, workdir
from gozon.core.migrations import upgrade

ORDERS_MIGRATIONS = (
    Path(__file__).resolve().parent.parent / "services" / "gozon" / "orders" / "migrations"
)

USER = {"X-User-Id": "bench-user"}
STUB_ORDER_ID = "00000000-0000-0000-0000-000000000001"


@dataclass(frozen=True)
class Result:
    name: str
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def load(
    name: str, url: str, *, concurrency: int, duration_s: float, max_requests: int
) -> Result:
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=USER) as session:

        async def worker(deadline: float) -> None:
            nonlocal errors
            while time.perf_counter() < deadline and len(latencies) + errors < max_requests:
                started = time.perf_counter()
                async with session.get(url) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                        continue
                latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker(started + duration_s) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return Result(name, len(latencies), errors, seconds, latencies)


async def create_order(base: str) -> str:
    async with (
        aiohttp.ClientSession(headers=USER) as session,
        session.post(f"{base}/api/orders", json={"amount": 10, "description": "bench"}) as answer,
    ):
        if answer.status != 201:
            raise SystemExit(f"bench: POST /api/orders answered {answer.status}")
        order_id: str = (await answer.json())["id"]
    return order_id


# --------------------------------------------------------------------------- the upstreams


def stub_app() -> FastAPI:
    """The cheapest upstream: what the orders API answers, without its database."""
    app = FastAPI()

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "live"}

    @app.get("/api/orders/{order_id}")
    async def get_order(order_id: str) -> dict[str, object]:
        return {
            "id": order_id,
            "user_id": USER["X-User-Id"],
            "amount": 10,
            "description": "bench",
            "status": "NEW",
            "created_at": "2025-01-01T00:00:00Z",
        }

    return app


def metrics_url(gateway: GozonProcess) -> str:
    """The gateway's `/metrics`, on its side port."""
    return f"http://127.0.0.1:{gateway.env['GOZON_GATEWAY_METRICS_PORT']}/metrics"


def gateway_process(work: Path, upstream: str) -> GozonProcess:
    port = port_for.select_random()
    env = {
        "GOZON_GATEWAY_PORT": str(port),
        "GOZON_GATEWAY_METRICS_PORT": str(port_for.select_random(exclude_ports=[port])),
        "GOZON_GATEWAY_ORDERS_URL": upstream,
        "GOZON_GATEWAY_PAYMENTS_URL": upstream,
        "GOZON_LOG_LEVEL": "WARNING",
    }
    return GozonProcess(
        ["gateway"], env=env, log=work / "gateway.log", health_url=f"http://127.0.0.1:{port}"
    )


@contextlib.contextmanager
def stub_and_gateway(work: Path) -> Iterator[tuple[str, str, str]]:
    stub = f"http://127.0.0.1:{port_for.select_random()}"
    command = [sys.executable, "-m", "bench.gateway", "--serve-stub", stub.rsplit(":", 1)[1]]
    process = subprocess.Popen(command)
    gateway = gateway_process(work, stub)
    try:
        wait_for(lambda: http_status(f"{stub}/health/live") == 200, timeout=20, what="the stub")
        gateway.start(ready=True)
        yield stub, gateway.health_url, metrics_url(gateway)
    finally:
        gateway.stop()
        process.terminate()
        process.wait(timeout=10)


@contextlib.contextmanager
def own_stack(work: Path) -> Iterator[tuple[str, str, str]]:
    port = port_for.select_random()
    with throwaway_postgres(work / "pg", ("order_db",)) as pg:
        upgrade(ORDERS_MIGRATIONS, pg.url("order_db"))
        env = {
            "GOZON_ORDERS_DATABASE_URL": pg.url("order_db"),
            "GOZON_ORDERS_API_PORT": str(port),
            "GOZON_LOG_LEVEL": "WARNING",
        }
        orders = GozonProcess(
            ["orders", "api"],
            env=env,
            log=work / "orders.log",
            health_url=f"http://127.0.0.1:{port}",
        )
        gateway = gateway_process(work, orders.health_url)
        try:
            orders.start(ready=True)
            gateway.start(ready=True)
            yield orders.health_url, gateway.health_url, metrics_url(gateway)
        finally:
            gateway.stop()
            orders.stop()


# --------------------------------------------------------------------------- report


def combined(results: list[Result]) -> Result:
    return Result(
        results[0].name,
        sum(r.requests for r in results),
        sum(r.errors for r in results),
        sum(r.seconds for r in results),
        [latency for r in results for latency in r.latencies_ms],
    )


def report(direct: Result, through: Result, *, concurrency: int) -> None:
    print(f"\nGET /api/orders/{{id}}, {concurrency} concurrent client(s)")
    print(f"{'target':<10}{'requests':>10}{'errors':>8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for result in (direct, through):
        print(
            f"{result.name:<10}{result.requests:>10}{result.errors:>8}{result.rate:>10.0f}"
            f"{result.quantile(0.5):>9.2f}{result.quantile(0.99):>9.2f}"
        )
    added = statistics.median(through.latencies_ms) - statistics.median(direct.latencies_ms)
    print(f"gateway keeps {through.rate / direct.rate:.0%} of direct throughput")
    print(f"gateway adds {added:.2f} ms at the median")


async def run(args: argparse.Namespace, direct_base: str, gateway_base: str) -> None:
    order_id = args.order_id or (STUB_ORDER_ID if args.stub else await create_order(direct_base))
    direct_url = f"{direct_base}/api/orders/{order_id}"
    gateway_url = f"{gateway_base}/api/orders/{order_id}"
    for concurrency in args.concurrency:
        options = {"concurrency": concurrency, "max_requests": args.requests}
        for name, url in (("direct", direct_url), ("gateway", gateway_url)):  # warm-up
            await load(name, url, duration_s=1.0, **options)
        phases: dict[str, list[Result]] = {"direct": [], "gateway": []}
        for _ in range(args.rounds):  # ABAB: a neighbour's burst of load hits both alike
            for name, url in (("direct", direct_url), ("gateway", gateway_url)):
                phases[name].append(await load(name, url, duration_s=args.duration, **options))
        report(combined(phases["direct"]), combined(phases["gateway"]), concurrency=concurrency)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--direct", default="http://127.0.0.1:8081", help="upstream base URL")
    parser.add_argument("--gateway", default="http://127.0.0.1:8080", help="gateway base URL")
    parser.add_argument("--order-id", help="an existing order of X-User-Id bench-user")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--own-stack", action="store_true", help="start PostgreSQL, API, gateway")
    modes.add_argument("--stub", action="store_true", help="start a stub upstream and a gateway")
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(level) for level in text.split(",")],
        default=[1, 32],
        help="comma-separated client counts, each a run of both targets (default 1,32)",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=3, help="direct/gateway phase pairs")
    parser.add_argument("--requests", type=int, default=200_000, help="cap per phase")
    parser.add_argument("--serve-stub", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_stub:
        uvicorn.run(stub_app(), host="127.0.0.1", port=args.serve_stub, log_level="warning")
        return
    if not args.own_stack and not args.stub:
        for url in (args.direct, args.gateway):
            if not url.startswith(("http://127.0.0.1:", "http://localhost:")):
                raise SystemExit("bench: loopback URLs only")
        asyncio.run(run(args, args.direct, args.gateway))
        return
    stack = own_stack if args.own_stack else stub_and_gateway
    with workdir("gozon-bench-") as work, stack(work) as (direct, gateway, _):
        asyncio.run(run(args, direct, gateway))


if __name__ == "__main__":
    main()
