"""One order, one trace id: from the gateway's answer to the logs of every process it passed."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest

from tests.e2e.conftest import Platform

pytestmark = pytest.mark.e2e

HOPS = [
    "gateway",
    "orders-api",
    "orders-relay",
    "payments-consumer",
    "payments-relay",
    "orders-consumer",
]


def lines_with(platform: Platform, name: str, trace_id: str) -> list[dict[str, object]]:
    found = []
    for line in platform.log_of(name).splitlines():
        if trace_id not in line:
            continue
        record = json.loads(line)
        if record.get("trace_id") == trace_id:
            found.append(record)
    return found


async def test_the_gateways_trace_id_is_in_the_logs_of_every_hop_of_the_order(
    platform: Platform,
) -> None:
    user = f"trace-{uuid.uuid4().hex[:10]}"
    async with httpx.AsyncClient(base_url=platform.gateway, timeout=10) as client:
        assert (
            await client.post("/api/payments/deposit?amount=100", headers={"X-User-Id": user})
        ).status_code == 200
        created = await client.post(
            "/api/orders",
            headers={"X-User-Id": user},
            json={"amount": 12.5, "description": "traced"},
        )
        assert created.status_code == 201
        trace_id = created.headers["x-trace-id"]
        assert len(trace_id) == 32
        order_id = created.json()["id"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while (await client.get(f"/api/orders/{order_id}", headers={"X-User-Id": user})).json()[
            "status"
        ] == "NEW":
            assert loop.time() < deadline
            await asyncio.sleep(0.05)

    missing = HOPS
    while missing and loop.time() < deadline + 5:  # the last lines may still be in flight
        missing = [name for name in HOPS if not lines_with(platform, name, trace_id)]
        await asyncio.sleep(0.1)
    assert missing == [], f"no log line with trace id {trace_id} from {missing}"
    for name in HOPS:
        for record in lines_with(platform, name, trace_id):
            assert record["service"] == name
            assert record["span_id"]
    # The lines that concern the order name it.
    assert any(r.get("order_id") == order_id for r in lines_with(platform, "orders-api", trace_id))
    assert any(
        r.get("order_id") == order_id for r in lines_with(platform, "payments-consumer", trace_id)
    )
    assert any(
        r.get("order_id") == order_id for r in lines_with(platform, "orders-consumer", trace_id)
    )
