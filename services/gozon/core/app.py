"""The FastAPI app factory shared by the APIs: problem+json, health, metrics, server spans,
and (core.deadline) admission control, request deadlines and 503s for database outages.

The caller passes a lifespan that builds the process's resources (engine, session factory,
clients) and yields them as lifespan state with a `readiness` entry; nothing is built at
import time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import Lifespan

from gozon import __version__
from gozon.core.deadline import Admission, install_outage_handlers
from gozon.core.health import Readiness
from gozon.core.metrics import HttpMetricsMiddleware
from gozon.core.openapi import install_problem_document
from gozon.core.problems import FAILURE_CONTRACT, install_problem_handlers
from gozon.core.telemetry import ServerSpanMiddleware

health = APIRouter(include_in_schema=False)


@health.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "live"}


@health.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    readiness: Readiness = request.state.readiness
    checks = await readiness.report()
    ok = all(checks.values())
    return JSONResponse(
        {"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503
    )


ops = APIRouter(include_in_schema=False)
ops.include_router(health)


@ops.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@dataclass(frozen=True, slots=True)
class ApiLimits:
    """How much work an API takes on at once, and its budget for a request (core.deadline)."""

    max_in_flight: int
    max_queued: int
    timeout_s: float


def create_app(
    *,
    service: str,
    title: str,
    description: str,
    lifespan: Lifespan[Any],
    routers: Sequence[APIRouter],
    limits: ApiLimits | None = None,
) -> FastAPI:
    app = FastAPI(
        title=title,
        description=f"{description} {FAILURE_CONTRACT}",
        version=__version__,
        lifespan=lifespan,
        # `/api/orders/` is a 404, never a 307 to `http://<this server's address>/api/orders`:
        # a redirect built from the Host the gateway sends would name an internal address.
        redirect_slashes=False,
        # Spans and metrics are ours (ServerSpanMiddleware, HttpMetricsMiddleware): FastAPI's
        # own would add a second server span per request, in a trace of its own.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_problem_handlers(app)
    install_problem_document(app)
    install_outage_handlers(app)
    if limits is not None:
        # Innermost of the three: a shed request is still traced and counted.
        app.add_middleware(
            Admission,
            service=service,
            max_in_flight=limits.max_in_flight,
            max_queued=limits.max_queued,
            timeout_s=limits.timeout_s,
        )
    app.add_middleware(HttpMetricsMiddleware)
    app.add_middleware(ServerSpanMiddleware, service=service)
    app.include_router(ops)
    for router in routers:
        app.include_router(router)
    return app
