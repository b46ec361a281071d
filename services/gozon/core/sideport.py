"""The workers' small HTTP side port: `/metrics`, `/health/live`, `/health/ready`.

Relays and consumers serve no API; this aiohttp server (it installs no signal handlers, so the
worker keeps SIGTERM for itself) answers the same three endpoints as the APIs do.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gozon.core.health import Readiness

log = structlog.get_logger(__name__)


ScrapeHook = Callable[[], Awaitable[object]]

SCRAPE_HOOK_TIMEOUT_S = 2.0
"""How long one scrape waits for each hook. A stalled database must not stall `/metrics`:
Prometheus would drop the whole scrape (every metric of the process, and `up` 0) exactly when
the process's own counters matter; past this, the hook's gauges keep their last values."""


def _app(readiness: Readiness, before_scrape: Sequence[ScrapeHook]) -> web.Application:
    async def live(_: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def ready(_: web.Request) -> web.Response:
        checks = await readiness.report()
        ok = all(checks.values())
        return web.json_response(
            {"status": "ready" if ok else "not ready", "checks": checks}, status=200 if ok else 503
        )

    async def metrics(_: web.Request) -> web.Response:
        for hook in before_scrape:
            try:
                async with asyncio.timeout(SCRAPE_HOOK_TIMEOUT_S):
                    await hook()
            except Exception as exc:  # a gauge left stale must not fail the whole scrape
                log.warning("metrics hook failed", error=repr(exc))
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/metrics", metrics)
    return app


@asynccontextmanager
async def side_port(
    host: str, port: int, readiness: Readiness, before_scrape: Sequence[ScrapeHook] = ()
) -> AsyncIterator[int]:
    """Serves the side port while the block runs; yields the bound port (0 picks a free one).

    `before_scrape` hooks refresh gauges that are computed at scrape time (the outbox lag),
    each for at most `SCRAPE_HOOK_TIMEOUT_S`.
    """
    runner = web.AppRunner(_app(readiness, before_scrape), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()
