"""RFC 9457 problem details: every error answer is `application/problem+json`.

Raise `Problem` from a route or a service call; FastAPI's own validation errors and HTTP
exceptions are translated too, and an unexpected exception becomes a 500 that names nothing
internal (the details go to the log, with the trace id). A request whose headers are missing or
malformed is a 400 (the client sent a bad request, not a bad entity); other validation errors
are 422 with the list of `errors`, at most `MAX_LISTED_ERRORS` of them (the detail says how
many there were): an answer never grows with what the client sent. A client that disconnected
before the answer gets none; it is logged at info, without a traceback, and counted as 499
(core.metrics), never as a server error. `ProblemDetails` is the body's schema, for the OpenAPI
documents (`core.openapi`). Every 503 says `"outcome": "not_processed"`: nothing was done, a
retry is safe (see gozon.core.deadline).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Match, Route

PROBLEM_JSON = "application/problem+json"
# The failure contract, as the OpenAPI documents state it (README, docs/reliability.md).
FAILURE_CONTRACT = (
    "Errors are RFC 9457 problem+json. A 503 (with Retry-After) means the request was not "
    'processed: retrying it is safe. A 502 or 504 whose body says "outcome": "unknown" '
    "means the request may or may not have been processed: retry it with the same "
    "Idempotency-Key, which the APIs process once. A 429 means the per-user rate limit was "
    "reached (not processed; see Retry-After)."
)
# A 422 lists this many problems at most; the detail names the first few and the count.
MAX_LISTED_ERRORS = 20
_SUMMARISED = 3
log = structlog.get_logger(__name__)


class FieldError(BaseModel):
    location: str = Field(description="Where: `body.amount`, `query.limit`, `header.X-User-Id`.")
    message: str
    type: str


class ProblemDetails(BaseModel):
    """An RFC 9457 problem: every 4xx and 5xx answer's body (`application/problem+json`)."""

    model_config = ConfigDict(extra="allow", title="Problem")

    type: str = Field(default="about:blank", description="A URI naming the problem type.")
    title: str = Field(description="A short summary of the problem type.")
    status: int = Field(ge=100, le=599, description="The HTTP status code.")
    detail: str | None = Field(default=None, description="What to fix, for this request.")
    instance: str | None = Field(default=None, description="The request path.")
    errors: list[FieldError] | None = Field(
        default=None, description="Each invalid field (422 answers)."
    )


class Problem(Exception):
    """An error answer: status, a short title, and a detail that tells the client what to fix."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        type_: str = "about:blank",
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title or HTTPStatus(status).phrase
        self.detail = detail
        self.type = type_
        self.headers = headers
        self.extensions = extensions


def problem_response(
    status: int,
    detail: str | None,
    *,
    instance: str | None = None,
    title: str | None = None,
    type_: str = "about:blank",
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": type_,
        "title": title or HTTPStatus(status).phrase,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    if instance:
        body["instance"] = instance
    if status == 503:
        # The platform's contract (docs/reliability.md): a 503 always means "not processed,
        # safe to retry"; an answer whose outcome is unknown is a 502 or 504 and says so.
        body["outcome"] = "not_processed"
    body.update(extensions)
    return JSONResponse(
        jsonable_encoder(body), status_code=status, media_type=PROBLEM_JSON, headers=headers
    )


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    errors = []
    for error in exc.errors()[:MAX_LISTED_ERRORS]:
        errors.append(
            {
                "location": ".".join(str(part) for part in error.get("loc", ())),
                "message": error.get("msg", ""),
                "type": error.get("type", ""),
            }
        )
    return errors


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(
        exc.status,
        exc.detail,
        instance=request.url.path,
        title=exc.title,
        type_=exc.type,
        headers=exc.headers,
        **exc.extensions,
    )


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = _validation_errors(exc)
    if any(error["type"] == "json_invalid" for error in errors):
        return problem_response(
            400, "The request body is not valid JSON.", instance=request.url.path
        )
    summary = "; ".join(f"{e['location']}: {e['message']}" for e in errors[:_SUMMARISED])
    if (total := len(exc.errors())) > _SUMMARISED:
        summary += f" (and {total - _SUMMARISED} more; {len(errors)} listed in errors)"
    if all(error["location"].startswith("header.") for error in errors):
        return problem_response(
            400,
            f"A request header is missing or malformed: {summary}",
            instance=request.url.path,
            title="Invalid header",
            errors=errors,
        )
    return problem_response(
        422,
        f"The request is not valid: {summary}",
        instance=request.url.path,
        title="Invalid request",
        errors=errors,
    )


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette's 405 names only the first
    route's, so a path with GET and POST routes would answer `Allow: POST` to a DELETE)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches({**request.scope, "method": "__NONE__"})
            if match is Match.PARTIAL:
                methods |= route.methods
    return ", ".join(sorted(methods))


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers) if exc.headers else {}
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    return problem_response(
        exc.status_code,
        str(exc.detail) if exc.detail != HTTPStatus(exc.status_code).phrase else None,
        instance=request.url.path,
        headers=headers or None,
    )


async def _on_client_gone(request: Request, exc: Exception) -> Response:
    # Nobody to answer: the status is for the metrics (core.metrics counts it as 499 anyway).
    log.info("client closed the request", path=request.url.path)
    return Response(status_code=499)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", path=request.url.path, exc_info=exc)
    return problem_response(
        500, "The server failed to answer; the error was logged.", instance=request.url.path
    )


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(ClientDisconnect, _on_client_gone)
    app.add_exception_handler(Exception, _on_unexpected)
