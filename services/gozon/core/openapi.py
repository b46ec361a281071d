"""The APIs' OpenAPI documents, made to say what the services really answer.

FastAPI documents every error as `application/json` `HTTPValidationError`; ours are RFC 9457
`application/problem+json` (`core.problems`). `problem_document` rewrites the generated
document: every 4xx/5xx response of every operation has the `Problem` schema under
`application/problem+json`, and every operation lists the errors any request can get (400 for
bad headers, repeated parameters or an unreadable body, 422 for an invalid one, 500, 503 when
the service did not process it, 504 when a commit's outcome is unknown: `core.deadline`); an
optional parameter's schema is its type, not "that type or null" (a query or a header is
absent, never null). The gateway merges these documents and adds its own answers
(`gateway.openapi`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from gozon.core.problems import PROBLEM_JSON, ProblemDetails

PROBLEM_REF = "#/components/schemas/Problem"
# What any operation of the APIs may answer, whatever its own errors are.
COMMON_ERRORS = {
    "400": "Bad request: a header missing or malformed, a parameter repeated, a body that is "
    "not strict JSON.",
    "422": "The request is well formed but invalid; `errors` lists each field.",
    "500": "The server failed; nothing about it is in the answer (it is logged).",
    "503": 'Not processed (overloaded, out of time, or the database down): `"outcome": '
    '"not_processed"`; retry after `Retry-After`.',
    "504": 'The database connection was lost during the commit: `"outcome": "unknown"`; '
    "retry with the same Idempotency-Key.",
}


def problem_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {PROBLEM_JSON: {"schema": {"$ref": PROBLEM_REF}}},
    }


def with_problems(document: dict[str, Any], common: dict[str, str]) -> dict[str, Any]:
    """`document` with every error response a problem, and `common` errors on every operation."""
    for item in document.get("paths", {}).values():
        for method, operation in item.items():
            if method not in {"get", "put", "post", "delete", "patch", "head", "options"}:
                continue
            for parameter in operation.get("parameters", []):
                _drop_null(parameter)
            responses: dict[str, Any] = operation.setdefault("responses", {})
            for status, description in common.items():
                responses.setdefault(status, {"description": description})
            for status, response in responses.items():
                if status[0] in "45":
                    responses[status] = problem_response(response.get("description", ""))
            operation["responses"] = dict(sorted(responses.items()))
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    problem = ProblemDetails.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(problem.pop("$defs", {}))
    schemas["Problem"] = problem
    return document


def _drop_null(parameter: dict[str, Any]) -> None:
    """An optional parameter is absent, never null: `anyOf: [X, null]` is just X."""
    schema = parameter.get("schema", {})
    options = schema.get("anyOf")
    if parameter.get("required") or not isinstance(options, list):
        return
    present = [option for option in options if option != {"type": "null"}]
    if len(present) == 1 and len(options) == 2:
        rest = {key: value for key, value in schema.items() if key != "anyOf"}
        parameter["schema"] = {**present[0], **rest}


def install_problem_document(app: FastAPI) -> None:
    """Makes `app.openapi()` (and `/openapi.json`) the rewritten document, built once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = with_problems(document, COMMON_ERRORS)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
