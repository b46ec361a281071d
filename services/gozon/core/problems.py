"""RFC 9457 problem details: every error answer is `application/problem+json`.

Raise `Problem` from a route or a service call; FastAPI's own validation errors and HTTP
exceptions are translated too, and an unexpected exception becomes a 500 that names nothing
internal (the details go to the log, with the trace id). Every 503 says `"outcome":
"not_processed"`: nothing was done, a retry is safe (see gozon.core.deadline).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_JSON = "application/problem+json"
# The failure contract, as the OpenAPI documents state it (README, docs/reliability.md).
FAILURE_CONTRACT = (
    "Errors are RFC 9457 problem+json. A 503 (with Retry-After) means the request was not "
    'processed: retrying it is safe. A 502 or 504 whose body says "outcome": "unknown" '
    "means the request may or may not have been processed: retry it with the same "
    "Idempotency-Key, which the APIs process once. A 429 means the per-user rate limit was "
    "reached (not processed; see Retry-After)."
)
log = structlog.get_logger(__name__)


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
    for error in exc.errors():
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
    summary = "; ".join(f"{e['location']}: {e['message']}" for e in errors)
    return problem_response(
        422,
        f"The request is not valid: {summary}",
        instance=request.url.path,
        title="Invalid request",
        errors=errors,
    )


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return problem_response(
        exc.status_code,
        str(exc.detail) if exc.detail != HTTPStatus(exc.status_code).phrase else None,
        instance=request.url.path,
        headers=dict(exc.headers) if exc.headers else None,
    )


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", path=request.url.path, exc_info=exc)
    return problem_response(
        500, "The server failed to answer; the error was logged.", instance=request.url.path
    )


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)
