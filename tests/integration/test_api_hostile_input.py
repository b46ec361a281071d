"""The APIs' answers to hostile input stay small, name no internal address, and a client that
goes away is not a server error. Against the real PostgreSQL; the disconnect over a socket."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY

from gozon.core.inputs import MAX_BODY_BYTES
from gozon.core.problems import MAX_LISTED_ERRORS
from gozon.orders.api import build_app as orders_app
from gozon.orders.settings import OrdersSettings
from gozon.payments.api import build_app as payments_app
from gozon.payments.settings import PaymentsSettings
from tests.conftest import serve, until
from tests.integration.test_gateway import uvicorn_serving

pytestmark = pytest.mark.integration

USER = {"X-User-Id": "hostile-1"}


@pytest.fixture
def orders(orders_db: str) -> FastAPI:
    return orders_app(OrdersSettings(orders_database_url=orders_db))


@pytest.fixture
def payments(payments_db: str) -> FastAPI:
    return payments_app(PaymentsSettings(payments_database_url=payments_db))


@pytest.fixture
async def orders_client(orders: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(orders) as client:
        yield client


async def test_a_trailing_slash_is_a_404_never_a_redirect_to_an_internal_address(
    orders: FastAPI, payments: FastAPI
) -> None:
    for app, paths in (
        (orders, ("/api/orders/", "/api/orders/?limit=1")),
        (payments, ("/api/payments/balance/", "/api/payments/accounts/")),
    ):
        async with serve(app) as client:
            for path in paths:
                response = await client.get(path, headers={**USER, "Host": "10.0.0.7:8081"})
                assert response.status_code == 404, path
                assert "location" not in response.headers
                assert "10.0.0.7" not in response.text


async def test_a_body_over_the_apis_limit_is_413_before_it_is_parsed(
    orders_client: httpx.AsyncClient,
) -> None:
    # ~80,000 keys just under the gateway's 1 MiB limit: the answer used to echo each, twice.
    keys = {f"k{n:05d}": 0 for n in range(80_000)}
    body = json.dumps({"amount": 1, "description": "x", **keys}).encode()
    assert len(body) < 1024 * 1024
    response = await orders_client.post(
        "/api/orders", content=body, headers={**USER, "Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert str(MAX_BODY_BYTES) in response.json()["detail"]


async def test_unknown_fields_are_refused_before_validation_with_a_bounded_answer(
    orders_client: httpx.AsyncClient,
) -> None:
    keys = {f"k{n:04d}": 0 for n in range(1_000)}
    body = json.dumps({"amount": 1, "description": "x", **keys}).encode()
    assert len(body) < MAX_BODY_BYTES
    response = await orders_client.post(
        "/api/orders", content=body, headers={**USER, "Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert len(response.content) < 8 * 1024
    problem = response.json()
    assert "1000 unknown field" in problem["detail"]
    assert len(problem["errors"]) == MAX_LISTED_ERRORS
    assert problem["errors"][0] == {
        "location": "body.k0000",
        "message": "Unknown field",
        "type": "extra_forbidden",
    }


async def test_one_unknown_field_is_named_and_the_known_ones_listed(
    orders_client: httpx.AsyncClient,
) -> None:
    response = await orders_client.post(
        "/api/orders", json={"amount": 1, "colour": "red"}, headers=USER
    )
    assert response.status_code == 422
    problem = response.json()
    assert "'colour'" in problem["detail"]
    assert "amount, description" in problem["detail"]


def requests(route: str, status: int) -> float:
    labels = {"method": "POST", "route": route, "status": str(status)}
    return REGISTRY.get_sample_value("gozon_http_requests_total", labels) or 0.0


@pytest.mark.parametrize(
    ("app", "route"),
    [("orders", "/api/orders"), ("payments", "/api/payments/accounts")],
)
async def test_a_client_that_disconnects_mid_body_is_499_never_a_5xx(
    orders: FastAPI,
    payments: FastAPI,
    app: str,
    route: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = orders if app == "orders" else payments
    closed, failed = requests(route, 499), requests(route, 500)
    async with uvicorn_serving(api) as url:
        host, port = url.removeprefix("http://").split(":")
        _reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST {route} HTTP/1.1\r\nHost: api\r\nX-User-Id: u1\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode()
        )
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        counted: Callable[[], bool] = lambda: requests(route, 499) == closed + 1  # noqa: E731
        await until(lambda: asyncio.sleep(0, result=counted()), 30, "the 499")
    assert requests(route, 500) == failed
    assert "client closed the request" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
