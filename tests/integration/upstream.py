"""A real HTTP server standing in for an upstream service in the gateway's tests, and the
`orders` and `payments` fixtures (tests/integration/conftest.py) that start one each."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import port_for
from aiohttp import web

MAX_BODY = 1024 * 1024
OPENAPI_PATHS = {
    "orders": {"/api/orders/{order_id}": {"get": {"responses": {"200": {"description": "ok"}}}}},
    "payments": {"/api/payments/balance": {"get": {"responses": {"200": {"description": "ok"}}}}},
}


class Upstream:
    """A real HTTP server standing in for a service: counts hits, can be slow or stopped."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = port_for.select_random()
        self.url = f"http://127.0.0.1:{self.port}"
        self.hits = 0
        self.delay_s = 0.0
        self.last: dict[str, Any] = {}
        self._runner: web.AppRunner | None = None

    @web.middleware
    async def _count(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path.startswith("/api/"):
            self.hits += 1
        return await handler(request)

    async def _echo(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.delay_s)
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        self.last = {"headers": request.headers.copy(), "path_qs": request.raw_path}
        return web.json_response(
            {"upstream": self.name, "size": size, "sha256": digest.hexdigest()},
            headers={"Connection": "x-private", "X-Private": "1", "Keep-Alive": "timeout=9"},
        )

    async def _big(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for index in range(64):
            await response.write(bytes([index]) * 64 * 1024)
        await response.write_eof()
        return response

    async def _status(self, request: web.Request) -> web.Response:
        status = int(request.match_info["code"])
        return web.json_response({"upstream": self.name, "status": status}, status=status)

    async def _redirect(self, request: web.Request) -> web.Response:
        # What a framework's trailing-slash redirect builds: the URL it was called by.
        raise web.HTTPTemporaryRedirect(f"{self.url}/api/{self.name}/x?y=1")

    async def _openapi(self, _: web.Request) -> web.Response:
        return web.json_response(
            {
                "openapi": "3.1.0",
                "info": {"title": self.name, "version": "1"},
                "paths": OPENAPI_PATHS[self.name],
                "components": {"schemas": {"Thing": {"title": self.name}}},
            }
        )

    async def start(self) -> None:
        app = web.Application(middlewares=[self._count], client_max_size=16 * MAX_BODY)
        app.router.add_get("/health/live", self._live)
        app.router.add_get("/openapi.json", self._openapi)
        app.router.add_get(f"/api/{self.name}/big", self._big)
        app.router.add_get(f"/api/{self.name}/status/{{code}}", self._status)
        app.router.add_get(f"/api/{self.name}/redirect", self._redirect)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @staticmethod
    async def _live(_: web.Request) -> web.Response:
        return web.json_response({"status": "live"})
