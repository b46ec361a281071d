"""The orders API against the real PostgreSQL: status, rows written, validation, idempotency."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from gozon.orders.api import build_app
from gozon.orders.models import Order, order_outbox
from gozon.orders.settings import OrdersSettings
from tests.conftest import serve

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(orders_db: str) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(build_app(OrdersSettings(orders_database_url=orders_db))) as client:
        yield client


async def count_rows(url: str) -> tuple[int, int]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            orders = await conn.scalar(select(func.count()).select_from(Order))
            outbox = await conn.scalar(select(func.count()).select_from(order_outbox))
    finally:
        await engine.dispose()
    return int(orders or 0), int(outbox or 0)


def user() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"


async def test_create_order_answers_201_new_and_writes_one_order_and_one_outbox_row(
    client: httpx.AsyncClient, orders_db: str
) -> None:
    uid = user()
    response = await client.post(
        "/api/orders",
        json={"amount": 1500.99, "description": "Тестовый заказ"},
        headers={"X-User-Id": uid},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "NEW"
    assert body["user_id"] == uid
    assert body["amount"] == 1500.99
    assert '"amount":1500.99' in response.text  # an exact JSON number, not a string
    assert response.headers["location"] == f"/api/orders/{body['id']}"
    assert await count_rows(orders_db) == (1, 1)

    engine = create_async_engine(orders_db)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(select(order_outbox))).one()
    finally:
        await engine.dispose()
    assert row.status == "PENDING"
    assert row.topic == "order.created.event"
    assert row.message_key == uid
    assert row.aggregate_id == body["id"]
    assert row.event_type == "OrderCreated"
    assert row.payload["payload"]["amount"] == 1500.99
    assert row.headers["traceparent"].startswith("00-")


async def test_another_users_order_is_404(client: httpx.AsyncClient) -> None:
    owner, stranger = user(), user()
    created = await client.post(
        "/api/orders", json={"amount": 10, "description": "x"}, headers={"X-User-Id": owner}
    )
    order_id = created.json()["id"]
    mine = await client.get(f"/api/orders/{order_id}", headers={"X-User-Id": owner})
    theirs = await client.get(f"/api/orders/{order_id}", headers={"X-User-Id": stranger})
    assert mine.status_code == 200
    assert mine.json()["id"] == order_id
    assert theirs.status_code == 404
    assert theirs.headers["content-type"] == "application/problem+json"


async def test_orders_are_listed_newest_first_page_by_page(client: httpx.AsyncClient) -> None:
    uid = user()
    ids = []
    for n in range(5):
        r = await client.post(
            "/api/orders",
            json={"amount": n + 1, "description": f"#{n}"},
            headers={"X-User-Id": uid},
        )
        ids.append(r.json()["id"])
    await client.post(
        "/api/orders", json={"amount": 1, "description": "other"}, headers={"X-User-Id": user()}
    )
    seen: list[str] = []
    url: str | None = "/api/orders?limit=2"
    while url:
        page = await client.get(url, headers={"X-User-Id": uid})
        assert page.status_code == 200
        seen += [order["id"] for order in page.json()]
        link = page.headers.get("link")
        url = link.split(";")[0].strip("<>") if link else None
    assert seen == list(reversed(ids))


async def test_a_retry_with_the_same_idempotency_key_returns_the_same_order(
    client: httpx.AsyncClient, orders_db: str
) -> None:
    uid = user()
    headers = {"X-User-Id": uid, "Idempotency-Key": "checkout-42"}
    body = {"amount": 99.90, "description": "book"}
    first = await client.post("/api/orders", json=body, headers=headers)
    again = await client.post("/api/orders", json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert await count_rows(orders_db) == (1, 1)

    other = await client.post(
        "/api/orders", json={"amount": 1, "description": "book"}, headers=headers
    )
    assert other.status_code == 422
    assert other.json()["title"] == "Idempotency-Key reused"
    assert await count_rows(orders_db) == (1, 1)
    # The key belongs to the user: another user may use the same key.
    theirs = await client.post("/api/orders", json=body, headers={**headers, "X-User-Id": user()})
    assert theirs.status_code == 201
    assert theirs.json()["id"] != first.json()["id"]


BAD_REQUESTS: list[tuple[str, dict[str, str | None], Any, int]] = [
    ("no user", {"X-User-Id": None}, {"amount": 1, "description": "x"}, 400),
    ("empty user", {"X-User-Id": ""}, {"amount": 1, "description": "x"}, 400),
    ("user with a space", {"X-User-Id": "a b"}, {"amount": 1, "description": "x"}, 400),
    ("user too long", {"X-User-Id": "u" * 65}, {"amount": 1, "description": "x"}, 400),
    (
        "bad idempotency key",
        {"Idempotency-Key": "two words"},
        {"amount": 1, "description": "x"},
        400,
    ),
    ("zero amount", {}, {"amount": 0, "description": "x"}, 422),
    ("negative amount", {}, {"amount": -5, "description": "x"}, 422),
    ("three decimals", {}, {"amount": 1.001, "description": "x"}, 422),
    ("text amount", {}, {"amount": "abc", "description": "x"}, 422),
    ("NaN amount", {}, {"amount": "NaN", "description": "x"}, 422),
    ("infinite amount", {}, {"amount": "Infinity", "description": "x"}, 422),
    ("boolean amount", {}, {"amount": True, "description": "x"}, 422),
    ("huge amount", {}, {"amount": 1_000_000_000.01, "description": "x"}, 422),
    ("no amount", {}, {"description": "x"}, 422),
    ("no description", {}, {"amount": 1}, 422),
    ("blank description", {}, {"amount": 1, "description": "   "}, 422),
    ("long description", {}, {"amount": 1, "description": "x" * 501}, 422),
    ("unknown field", {}, {"amount": 1, "description": "x", "status": "FINISHED"}, 422),
    ("array body", {}, [1, 2], 422),
    ("not JSON", {}, b"{amount: 1", 400),
    (
        "amount past a float's precision",
        {},
        b'{"amount": 5.0000000000000000001, "description": "x"}',
        422,
    ),
    ("amount as a padded string", {}, {"amount": "  5 ", "description": "x"}, 422),
    ("amount as an exponent string", {}, {"amount": "1e2", "description": "x"}, 422),
    ("amount as a plain string", {}, {"amount": "5", "description": "x"}, 422),
    ("NaN literal", {}, b'{"amount": NaN, "description": "x"}', 400),
    ("Infinity literal", {}, b'{"amount": Infinity, "description": "x"}', 400),
    ("duplicate key", {}, b'{"amount": 1, "amount": 2, "description": "x"}', 400),
    ("NUL in description", {}, {"amount": 1, "description": "a\u0000b"}, 400),
    ("lone surrogate", {}, b'{"amount": 1, "description": "\\ud800"}', 400),
    ("invalid UTF-8", {}, b'{"amount": 1, "description": "\xff\xfe"}', 400),
    ("blank unicode description", {}, {"amount": 1, "description": "\u3000\u00a0"}, 422),
    ("nested too deep", {}, b"[" * 100 + b"]" * 100, 400),
    ("huge integer", {}, b'{"amount": ' + b"9" * 5000 + b', "description": "x"}', 400),
]


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
async def test_bad_input_gets_a_problem_and_writes_nothing(
    client: httpx.AsyncClient,
    orders_db: str,
    headers: dict[str, str | None],
    body: Any,
    status: int,
) -> None:
    merged = {"X-User-Id": user(), "Content-Type": "application/json", **headers}
    sent = {name: value for name, value in merged.items() if value is not None}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await client.post("/api/orders", headers=sent, content=content)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status
    assert problem["title"]
    assert problem["detail"]
    assert await count_rows(orders_db) == (0, 0)


async def test_an_unknown_order_id_and_a_malformed_one_are_client_errors(
    client: httpx.AsyncClient,
) -> None:
    uid = {"X-User-Id": user()}
    assert (await client.get(f"/api/orders/{uuid.uuid4()}", headers=uid)).status_code == 404
    assert (await client.get("/api/orders/not-a-uuid", headers=uid)).status_code == 422
    assert (await client.get("/api/orders?cursor=zzz", headers=uid)).status_code == 400


@pytest.mark.parametrize(
    "raw",
    [
        "0001-01-01T00:00:00+23:59|00000000-0000-0000-0000-000000000000",
        "9999-12-31T23:59:59-23:59|00000000-0000-0000-0000-000000000000",
        "2026-01-01T00:00:00|00000000-0000-0000-0000-000000000000",  # naive
        "2026-01-01T00:00:00+00:00|0000000000000000000000000000000",  # not canonical
        "2026-01-01T00:00:00+00:00|00000000-0000-0000-0000-000000000000|x",
        "\x00|\x00",
    ],
)
async def test_a_cursor_the_service_did_not_issue_is_a_400(
    client: httpx.AsyncClient, raw: str
) -> None:
    cursor = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
    response = await client.get(f"/api/orders?cursor={cursor}", headers={"X-User-Id": user()})
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("limit=1&limit=2", {}),
        ("cursor=a&cursor=b", {}),
    ],
)
async def test_a_repeated_query_parameter_is_a_400(
    client: httpx.AsyncClient, query: str, headers: dict[str, str]
) -> None:
    response = await client.get(f"/api/orders?{query}", headers={"X-User-Id": user()})
    assert response.status_code == 400, response.text
    assert response.json()["title"] == "Repeated query parameter"


async def test_a_repeated_user_header_is_a_400_and_writes_nothing(
    client: httpx.AsyncClient, orders_db: str
) -> None:
    response = await client.post(
        "/api/orders",
        json={"amount": 1, "description": "x"},
        headers=[("X-User-Id", user()), ("X-User-Id", user())],
    )
    assert response.status_code == 400, response.text
    assert response.json()["title"] == "Repeated header"
    assert await count_rows(orders_db) == (0, 0)


async def test_an_amount_is_stored_exactly_as_written(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/orders",
        content=b'{"amount": 0.1E1, "description": "x"}',
        headers={"X-User-Id": user(), "Content-Type": "application/json"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["amount"] == 1


@pytest.mark.parametrize("broken_table", ["order_outbox", "orders"])
async def test_order_and_outbox_row_are_written_together_or_not_at_all(
    client: httpx.AsyncClient, orders_db: str, broken_table: str
) -> None:
    """A failing insert into either table leaves neither row behind."""
    engine = create_async_engine(orders_db)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'refused by test'; END $$"
                )
            )
            await conn.execute(
                text(
                    f"CREATE TRIGGER refuse BEFORE INSERT ON {broken_table} "
                    "FOR EACH ROW EXECUTE FUNCTION refuse()"
                )
            )
    finally:
        await engine.dispose()
    response = await client.post(
        "/api/orders", json={"amount": 5, "description": "x"}, headers={"X-User-Id": user()}
    )
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert "refused" not in response.text  # nothing internal leaks to the client
    assert await count_rows(orders_db) == (0, 0)
