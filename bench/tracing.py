"""Benchmark: what exporting traces costs the orders API's order creation.

Starts its own throwaway PostgreSQL and a real `gozon orders api`, plus a minimal OTLP/HTTP
sink (it accepts and counts `POST /v1/traces`), then alternates phases (ABAB…) of closed-loop
order creation with the API restarted between them: exporting (OTEL_EXPORTER_OTLP_ENDPOINT
set: a server span and a span per database query, batched to the sink) and off (no OTEL_*
variable: spans still get ids for propagation, nothing is exported, asyncpg not instrumented).

    .venv/bin/python -m bench.tracing [--concurrency 16] [--phase-seconds 8] [--phases 3]

Loopback only; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import port_for
from aiohttp import web

from bench.relay import MIGRATIONS, closed_loop
from scripts.processes import GozonProcess
from scripts.stack import Postgres


class Sink:
    """An OTLP/HTTP endpoint that takes every export and counts it, in a thread of its own."""

    def __init__(self) -> None:
        self.port = port_for.select_random()
        self.requests = 0
        self.bytes = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def _traces(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.bytes += len(await request.read())
        return web.Response(status=200, content_type="application/x-protobuf")

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> Sink:
        self._thread.start()
        self._ready.wait(10)
        return self


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--phase-seconds", type=float, default=8)
    parser.add_argument("--phases", type=int, default=3, help="phases per state (ABAB…)")
    args = parser.parse_args()
    # SIGTERM (a timeout, Ctrl-C from a runner) still runs the clean-up below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))

    work = Path(tempfile.mkdtemp(prefix="gozon-bench-"))
    work.chmod(0o755)
    pg = Postgres(work / "pg", port_for.select_random(), durable=True, databases=("order_db",))
    sink = Sink().start()
    api_port = port_for.select_random()
    base = {
        "GOZON_ORDERS_DATABASE_URL": pg.url("order_db"),
        "GOZON_ORDERS_API_PORT": str(api_port),
        "GOZON_LOG_LEVEL": "WARNING",
    }
    exporting = {**base, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}"}
    url = f"http://127.0.0.1:{api_port}"

    def measure(env: dict[str, str]) -> float:
        api = GozonProcess(["orders", "api"], env=env, log=work / "api.log", health_url=url)
        api.start(ready=True)
        try:
            asyncio.run(closed_loop(url, args.concurrency, 1))  # warm-up
            return asyncio.run(closed_loop(url, args.concurrency, args.phase_seconds))
        finally:
            api.stop()

    try:
        pg.start()
        from gozon.core.migrations import upgrade

        upgrade(MIGRATIONS, pg.url("order_db"))
        on: list[float] = []
        off: list[float] = []
        for _ in range(args.phases):
            on.append(measure(exporting))
            off.append(measure(base))
        with_export, without = statistics.median(on), statistics.median(off)
        print(
            f"order creation, {args.concurrency} clients, {args.phases}×{args.phase_seconds:g} s "
            f"per state: exporting {with_export:.0f}/s (phases {[round(x) for x in on]}), "
            f"off {without:.0f}/s (phases {[round(x) for x in off]}); exporting/off = "
            f"{with_export / without:.3f}; the sink took {sink.requests} exports, "
            f"{sink.bytes / 1e6:.1f} MB"
        )
        if sink.requests == 0:
            print("error: nothing was exported: the exporting phases measured nothing")
            return 1
        return 0
    finally:
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
