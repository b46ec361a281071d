"""Strict request input: what the APIs accept before any business rule runs.

Every route of the APIs is a `StrictRoute`, which refuses with a 400 problem, before the
route's dependencies or any database call run:

- a query parameter given more than once, or a single-valued header (`X-User-Id`,
  `Idempotency-Key`, `Content-Type`, `Authorization`) given more than once: frameworks, proxies
  and services disagree about which copy wins (the first, the last, a join), so an edge that
  checks one copy and a service that uses another would act for two different users;
- a JSON body that is not UTF-8, has a repeated object key, holds `NaN`/`Infinity`, nests
  deeper than `jsontext.MAX_DEPTH`, or has a string with NUL or a lone surrogate (PostgreSQL
  stores neither).

A body larger than `MAX_BODY_BYTES` is refused with a 413 before it is parsed, and, when its
`Content-Length` says so, before it is read. The APIs' bodies are an amount and a description
of at most 500 characters (6,000 bytes even if every character is an escaped surrogate pair),
and a body's parse costs CPU in proportion to its size whatever it holds, so the limit is
16 KiB; the gateway's is the same by default. FastAPI's own
`max_body_size` answers in plain text, not problem+json, hence this check.

A body object with keys its model forbids (`extra="forbid"`) is refused with a 422 before
validation, by one pass over its keys: pydantic would build an error per unknown
key (a 1 MiB body of 85,000 keys cost seconds of CPU and a 12 MB answer), this lists the first
`MAX_LISTED_ERRORS` and counts the rest.

JSON numbers are parsed from their text as `Decimal` (`loads`, on `gozon.core.jsontext`, as the
consumers parse event values), never through a float, so `5.0000000000000000001` reaches the
amount rule as written and is refused for its places instead of being rounded to 5 on the way.
`JsonAmount` is the body's money type: a JSON number (a string, even `"5"`, is refused), > 0,
at most two decimals, at most `MAX_AMOUNT`.
`AMOUNT_PATTERN` is the same rule for money in a query string, as one regular expression.
"""

from __future__ import annotations

import email.message
import itertools
from collections.abc import Callable, Coroutine
from decimal import Decimal
from typing import Annotated, Any, TypeAlias

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, BeforeValidator, WithJsonSchema

from gozon.contracts import MAX_AMOUNT, Amount
from gozon.core import jsontext
from gozon.core.problems import MAX_LISTED_ERRORS, Problem

MAX_BODY_BYTES = 16 * 1024
SINGLE_VALUED_HEADERS = frozenset(
    {b"x-user-id", b"idempotency-key", b"content-type", b"authorization"}
)
# Money in a query string: 0.01 … 999999999.99, or exactly 1000000000[.0[0]]; no sign, no
# exponent, no spaces, no leading zeros, no separators. No lookarounds, so generators read it.
AMOUNT_PATTERN = r"^([1-9][0-9]{0,8}(\.[0-9]{1,2})?|1000000000(\.00?)?|0\.(0[1-9]|[1-9][0-9]?))$"
AMOUNT_RULE = f"A JSON number > 0 with at most two decimal places, at most {MAX_AMOUNT:.0f}."


def loads(body: bytes) -> Any:
    """Parses a JSON request body under the rules above; raises a 400 `Problem` otherwise."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Problem(400, "The request body is not valid UTF-8.", title="Invalid JSON") from exc
    try:
        value = jsontext.loads(text)
    except jsontext.Refused as exc:
        raise Problem(400, f"The request body is refused: {exc}.", title="Invalid JSON") from exc
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, an int of 4300+ digits
        raise Problem(400, "The request body is not valid JSON.", title="Invalid JSON") from exc
    return value


def _json_number(value: Any) -> Any:
    # `loads` hands numbers over as int or Decimal; anything else did not come as a JSON number.
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise ValueError("must be a JSON number, not a string")
    return value


JsonAmount: TypeAlias = Annotated[
    Amount,
    BeforeValidator(_json_number),
    WithJsonSchema(
        {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": int(MAX_AMOUNT),
            "multipleOf": 0.01,
            "description": AMOUNT_RULE,
            "examples": [1500.99],
        },
        mode="validation",
    ),
]
"""A request body's money: a JSON number, > 0, at most two decimals, at most MAX_AMOUNT."""


def _is_json(content_type: str | None) -> bool:
    if content_type is None:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def _refuse_repeats(request: Request) -> None:
    seen: set[str] = set()
    for name, _ in request.query_params.multi_items():
        if name in seen:
            raise Problem(
                400,
                f"The query parameter {name!r} is given more than once.",
                title="Repeated query parameter",
            )
        seen.add(name)
    headers: set[bytes] = set()
    for raw_name, _ in request.scope["headers"]:
        name = raw_name.lower()
        if name in SINGLE_VALUED_HEADERS:
            if name in headers:
                raise Problem(
                    400,
                    f"The header {name.decode()} is given more than once.",
                    title="Repeated header",
                )
            headers.add(name)


class _ParsedRequest(Request):
    """A request whose JSON body was parsed by `loads` before FastAPI asks for it."""

    parsed: Any = None

    async def json(self) -> Any:
        return self.parsed


def _known_keys(route: APIRoute) -> frozenset[str] | None:
    """The keys the route's body model accepts, when it forbids all others (else None)."""
    field = route.body_field
    model = field.field_info.annotation if field is not None else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    if model.model_config.get("extra") != "forbid":
        return None
    return frozenset(info.alias or name for name, info in model.model_fields.items())


def _refuse_unknown_keys(body: Any, known: frozenset[str]) -> None:
    if not isinstance(body, dict):
        return
    keys = body.keys()
    if keys <= known:
        return
    # counted and listed without a list of every key: a body may hold thousands
    count = len(keys) - len(keys & known)
    first = itertools.islice((key for key in body if key not in known), MAX_LISTED_ERRORS)
    listed = [key if len(key) <= 64 else key[:61] + "..." for key in first]
    raise Problem(
        422,
        f"The request body has {count} unknown field(s), {', '.join(map(repr, listed[:3]))}"
        f"{' …' if count > 3 else ''}; the fields are: {', '.join(sorted(known))}.",
        title="Invalid request",
        errors=[
            {"location": f"body.{key}", "message": "Unknown field", "type": "extra_forbidden"}
            for key in listed
        ],
    )


def _too_large() -> Problem:
    return Problem(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")


class StrictRoute(APIRoute):
    """An `APIRoute` that applies this module's rules before the route runs."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        known = _known_keys(self)

        async def strict(request: Request) -> Response:
            _refuse_repeats(request)
            parsed = _ParsedRequest(request.scope, request.receive)
            declared = parsed.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
                raise _too_large()
            body = await parsed.body()
            if len(body) > MAX_BODY_BYTES:
                raise _too_large()
            if body and _is_json(parsed.headers.get("content-type")):
                parsed.parsed = loads(body)
                if known is not None:
                    _refuse_unknown_keys(parsed.parsed, known)
            return await handle(parsed)

        return strict
