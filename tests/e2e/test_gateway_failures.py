"""The gateway with the real platform behind it: a dead service costs its clients nothing."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.e2e.conftest import Platform

pytestmark = pytest.mark.e2e


async def test_a_dead_payments_api_answers_503_fast_while_orders_work_and_recovers(
    platform: Platform,
) -> None:
    if platform.compose is not None:
        pytest.skip(
            "under compose the restart policy brings a killed API back at once, so it cannot "
            "be held down; tests/compose/test_crashes.py covers crashes there"
        )
    headers = {"X-User-Id": "gw-e2e"}
    async with httpx.AsyncClient(base_url=platform.gateway, timeout=10) as client:
        assert (await client.get("/api/payments/balance", headers=headers)).status_code in (
            200,
            404,
        )
        platform.processes["payments-api"].kill()
        try:
            # How fast these 503s come is a figure for bench/gateway.py, not a test.
            for _ in range(10):
                response = await client.get("/api/payments/balance", headers=headers)
                assert response.status_code == 503
                assert response.headers["content-type"] == "application/problem+json"
            created = await client.post(
                "/api/orders", headers=headers, json={"amount": 1, "description": "still works"}
            )
            assert created.status_code == 201
            listed = await client.get("/api/orders", headers=headers)
            assert listed.status_code == 200
        finally:
            await asyncio.to_thread(platform.start, "payments-api")

        deadline = time.monotonic() + 15
        while True:  # the breaker's half-open probe lets the first request through
            response = await client.get("/api/payments/balance", headers=headers)
            if response.status_code != 503:
                break
            assert time.monotonic() < deadline, "the gateway never recovered"
            await asyncio.sleep(0.2)
        assert response.status_code in (200, 404)


async def test_the_gateway_shows_both_services_apis_in_one_document(platform: Platform) -> None:
    async with httpx.AsyncClient(base_url=platform.gateway, timeout=10) as client:
        document = (await client.get("/openapi.json")).json()
        docs = await client.get("/docs")
    assert {
        "/api/orders",
        "/api/orders/{order_id}",
        "/api/payments/deposit",
        "/api/payments/balance",
        "/api/payments/accounts",
    } <= set(document["paths"])
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
