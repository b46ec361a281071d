"""Bad input through the gateway, with every process real: each request gets its 4xx
`application/problem+json` answer, and neither database changes (every table's row count and
the sum of all balances are the same before and after)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tests.e2e.conftest import Platform

pytestmark = pytest.mark.e2e

USER = "bad-input-user"
ORDER = {"amount": 10, "description": "x"}
TABLES = {
    "GOZON_ORDERS_DATABASE_URL": ["orders", "order_outbox"],
    "GOZON_PAYMENTS_DATABASE_URL": [
        "accounts",
        "account_ledger",
        "payment_inbox",
        "payment_outbox",
        "payment_decisions",
    ],
}


def cursor(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@dataclass(frozen=True)
class Bad:
    """One bad request: sent by httpx (`headers` as pairs, so they may repeat)."""

    name: str
    method: str
    path: str
    status: int
    body: bytes | None = None
    headers: list[tuple[str, str]] = field(default_factory=lambda: [("X-User-Id", USER)])


def order(body: bytes | object, *extra: tuple[str, str]) -> tuple[bytes, list[tuple[str, str]]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return raw, [("X-User-Id", USER), ("Content-Type", "application/json"), *extra]


def post_order(name: str, body: bytes | object, status: int, *extra: tuple[str, str]) -> Bad:
    raw, headers = order(body, *extra)
    return Bad(name, "POST", "/api/orders", status, raw, headers)


def deposit(name: str, query: str, status: int) -> Bad:
    return Bad(name, "POST", f"/api/payments/deposit?{query}", status)


HTTP_CASES = [
    Bad("no X-User-Id", "POST", "/api/orders", 400, json.dumps(ORDER).encode(), []),
    post_order("empty X-User-Id", ORDER, 400, ("X-User-Id", "")),
    Bad("X-User-Id with a space", "GET", "/api/orders", 400, headers=[("X-User-Id", "a b")]),
    Bad("X-User-Id of 65 chars", "GET", "/api/orders", 400, headers=[("X-User-Id", "u" * 65)]),
    Bad(
        "two X-User-Id headers",
        "POST",
        "/api/orders",
        400,
        json.dumps(ORDER).encode(),
        [("X-User-Id", USER), ("X-User-Id", "victim"), ("Content-Type", "application/json")],
    ),
    post_order("malformed Idempotency-Key", ORDER, 400, ("Idempotency-Key", "two words")),
    post_order(
        "two Idempotency-Keys", ORDER, 400, ("Idempotency-Key", "a"), ("Idempotency-Key", "b")
    ),
    post_order("zero amount", {"amount": 0, "description": "x"}, 422),
    post_order("negative amount", {"amount": -5, "description": "x"}, 422),
    post_order("three decimals", {"amount": 1.001, "description": "x"}, 422),
    post_order(
        "decimals past a float's precision",
        b'{"amount": 5.0000000000000000001, "description": "x"}',
        422,
    ),
    post_order("padded string amount", {"amount": "  5 ", "description": "x"}, 422),
    post_order("exponent string amount", {"amount": "1e2", "description": "x"}, 422),
    post_order("plain string amount", {"amount": "5", "description": "x"}, 422),
    post_order("boolean amount", {"amount": True, "description": "x"}, 422),
    post_order("null amount", {"amount": None, "description": "x"}, 422),
    post_order("amount over the cap", {"amount": 1_000_000_000.01, "description": "x"}, 422),
    post_order("NaN literal", b'{"amount": NaN, "description": "x"}', 400),
    post_order("Infinity literal", b'{"amount": Infinity, "description": "x"}', 400),
    post_order("duplicate JSON key", b'{"amount": 1, "amount": 9999, "description": "x"}', 400),
    post_order("NUL in description", {"amount": 1, "description": "a\u0000b"}, 400),
    post_order("lone surrogate", b'{"amount": 1, "description": "\\ud800"}', 400),
    post_order("invalid UTF-8", b'{"amount": 1, "description": "\xff\xfe"}', 400),
    post_order("blank description", {"amount": 1, "description": "  \t "}, 422),
    post_order("ideographic-space description", {"amount": 1, "description": "\u3000"}, 422),
    post_order("501-character description", {"amount": 1, "description": "x" * 501}, 422),
    post_order("unknown field", {**ORDER, "status": "FINISHED"}, 422),
    post_order("array body", [1, 2], 422),
    post_order("not JSON", b"{amount: 1", 400),
    post_order("nested 100 deep", b"[" * 100 + b"]" * 100, 400),
    post_order(
        "a 5000-digit integer", b'{"amount": ' + b"9" * 5000 + b', "description": "x"}', 400
    ),
    post_order("body over 1 MiB", b'{"description": "' + b"x" * (1024 * 1024) + b'"}', 413),
    Bad(
        "cursor at +23:59",
        "GET",
        "/api/orders?cursor=" + cursor(f"0001-01-01T00:00:00+23:59|{uuid.UUID(int=0)}"),
        400,
    ),
    Bad(
        "cursor at -23:59",
        "GET",
        "/api/orders?cursor=" + cursor(f"9999-12-31T23:59:59-23:59|{uuid.UUID(int=0)}"),
        400,
    ),
    Bad("cursor never issued", "GET", "/api/orders?cursor=zzz", 400),
    Bad("cursor with a bad character", "GET", "/api/orders?cursor=a%21b", 422),
    Bad("limit 0", "GET", "/api/orders?limit=0", 422),
    Bad("repeated limit", "GET", "/api/orders?limit=1&limit=2", 400),
    Bad("order id not a UUID", "GET", "/api/orders/not-a-uuid", 422),
    Bad("someone else's order", "GET", f"/api/orders/{uuid.uuid4()}", 404),
    deposit("deposit 1_000", "amount=1_000", 422),
    deposit("deposit +5", "amount=%2B5", 422),
    deposit("deposit 1e2", "amount=1e2", 422),
    deposit("deposit padded", "amount=%205%20", 422),
    deposit("deposit 0", "amount=0", 422),
    deposit("deposit 5.001", "amount=5.001", 422),
    deposit("deposit NaN", "amount=NaN", 422),
    deposit("deposit NUL", "amount=1%00", 422),
    deposit("deposit over the cap", "amount=1000000000.01", 422),
    deposit("repeated amount", "amount=1&amount=1000", 400),
    deposit("no amount", "", 422),
    Bad("deposit without a user", "POST", "/api/payments/deposit?amount=5", 400, headers=[]),
    Bad(
        "balance with two users",
        "GET",
        "/api/payments/balance",
        400,
        headers=[("X-User-Id", USER), ("X-User-Id", "victim")],
    ),
    Bad(
        "account with a bad user",
        "POST",
        "/api/payments/accounts",
        400,
        headers=[("X-User-Id", "a/b")],
    ),
    Bad("unknown path", "GET", "/api/nowhere", 404),
    Bad("unknown method", "DELETE", "/api/orders", 405),
]

HEAD = b"GET /api/orders HTTP/1.1\r\nHost: gozon\r\nX-User-Id: " + USER.encode() + b"\r\n"
RAW_CASES = [
    ("a 1 MB header", HEAD + b"X-Big: " + b"a" * 1024 * 1024 + b"\r\n\r\n", 431),
    ("100 headers", HEAD + b"".join(b"X-H%d: v\r\n" % n for n in range(100)) + b"\r\n", 431),
    ("a 10 KB request line", b"GET /api/orders?" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n", 414),
    ("a head that never ends", HEAD, 408),
    (
        "a body that never comes",
        b"POST /api/orders HTTP/1.1\r\nHost: gozon\r\nX-User-Id: " + USER.encode() + b"\r\n"
        b'Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{"amount": 10',
        408,
    ),
    ("a malformed Content-Length", HEAD + b"Content-Length: 1x\r\n\r\n", 400),
    ("not HTTP", b"HELLO\r\n\r\n", 400),
]


@pytest.fixture(scope="module")
async def engines(platform: Platform) -> AsyncIterator[dict[str, AsyncEngine]]:
    engines = {name: create_async_engine(platform.env[name]) for name in TABLES}
    yield engines
    for engine in engines.values():
        await engine.dispose()


async def snapshot(engines: dict[str, AsyncEngine]) -> dict[str, object]:
    """Every table's row count, and the sum of all balances."""
    state: dict[str, object] = {}
    for name, tables in TABLES.items():
        async with engines[name].connect() as conn:
            for table in tables:
                state[table] = await conn.scalar(text(f"SELECT count(*) FROM {table}"))
    async with engines["GOZON_PAYMENTS_DATABASE_URL"].connect() as conn:
        state["balances"] = await conn.scalar(
            text("SELECT coalesce(sum(balance), 0) FROM accounts")
        )
    return state


def check_problem(status: int, content_type: str, body: bytes, expected: int) -> None:
    assert status == expected, body[:500]
    assert content_type == "application/problem+json"
    problem = json.loads(body)
    assert problem["status"] == expected
    assert problem["title"]


def test_the_table_has_at_least_forty_bad_inputs() -> None:
    assert len(HTTP_CASES) + len(RAW_CASES) >= 40
    assert len({case.name for case in HTTP_CASES} | {name for name, _, _ in RAW_CASES}) == len(
        HTTP_CASES
    ) + len(RAW_CASES)


@pytest.mark.parametrize("case", HTTP_CASES, ids=[case.name for case in HTTP_CASES])
async def test_a_bad_request_is_a_4xx_problem_and_writes_nothing(
    platform: Platform, engines: dict[str, AsyncEngine], case: Bad
) -> None:
    before = await snapshot(engines)
    async with httpx.AsyncClient(base_url=platform.gateway, timeout=30) as client:
        response = await client.request(
            case.method, case.path, content=case.body, headers=case.headers
        )
    check_problem(
        response.status_code, response.headers["content-type"], response.content, case.status
    )
    assert await snapshot(engines) == before


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [case[1:] for case in RAW_CASES],
    ids=[case[0] for case in RAW_CASES],
)
async def test_a_bad_connection_is_a_4xx_problem_closed_and_writes_nothing(
    platform: Platform, engines: dict[str, AsyncEngine], request_bytes: bytes, status: int
) -> None:
    before = await snapshot(engines)
    address = urlsplit(platform.gateway)
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    writer.write(request_bytes)
    with contextlib.suppress(ConnectionError):  # refused before it read all; the answer waits
        await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 60)  # to EOF: the gateway closed it
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    headers = dict(line.decode().lower().split(": ", 1) for line in head.split(b"\r\n")[1:] if line)
    assert headers["connection"] == "close"
    check_problem(int(head.split(b" ", 2)[1]), headers["content-type"], body, status)
    assert await snapshot(engines) == before
