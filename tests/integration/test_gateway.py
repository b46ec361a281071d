"""The gateway against real upstream HTTP servers: edge checks, failure mapping, streaming.

Each upstream is a small aiohttp server on a free port that counts the requests it gets, can be
made slow, and can be stopped and started again on the same port. The gateway runs in-process
(its lifespan and real aiohttp sessions, no socket on the client side), except in the last test,
where uvicorn serves it on a socket as `gozon gateway` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import port_for
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client import REGISTRY

from gozon.gateway.app import build_app
from gozon.gateway.server import uvicorn_config
from gozon.gateway.settings import GatewaySettings
from tests.conftest import serve, until
from tests.integration.upstream import MAX_BODY, Upstream

pytestmark = pytest.mark.integration

USER = {"X-User-Id": "user-1"}
TIMEOUT_S = 0.5
RESET_S = 0.5


def settings(orders: Upstream, payments: Upstream, **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "gateway_orders_url": orders.url,
        "gateway_payments_url": payments.url,
        "gateway_upstream_timeout_s": TIMEOUT_S,
        "gateway_breaker_failures": 2,
        "gateway_breaker_reset_s": RESET_S,
        "gateway_max_body_bytes": MAX_BODY,
        **overrides,
    }
    return GatewaySettings(**values)


@pytest.fixture
async def gateway(orders: Upstream, payments: Upstream) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(build_app(settings(orders, payments))) as client:
        yield client


async def test_requests_reach_their_upstream_with_path_and_query_intact(
    gateway: httpx.AsyncClient, orders: Upstream, payments: Upstream
) -> None:
    response = await gateway.get("/api/orders/a%2Fb?x=1&y=%20", headers=USER)
    assert response.status_code == 200
    assert response.json()["upstream"] == "orders"
    assert orders.last["path_qs"] == "/api/orders/a%2Fb?x=1&y=%20"
    response = await gateway.post("/api/payments/deposit?amount=10", headers=USER)
    assert response.json()["upstream"] == "payments"
    assert (orders.hits, payments.hits) == (1, 1)


async def test_slow_upstream_gets_504_at_the_configured_timeout_without_a_retry(
    gateway: httpx.AsyncClient, orders: Upstream
) -> None:
    orders.delay_s = 3 * TIMEOUT_S
    started = time.perf_counter()
    response = await gateway.get("/api/orders/slow", headers=USER)
    elapsed = time.perf_counter() - started
    assert response.status_code == 504
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["outcome"] == "unknown"
    assert elapsed >= TIMEOUT_S * 0.95  # it waited the timeout (how fast it then answers: bench/)
    assert orders.hits == 1  # and did not retry


async def test_body_over_the_limit_gets_413_and_never_reaches_the_upstream(
    gateway: httpx.AsyncClient, orders: Upstream
) -> None:
    response = await gateway.post("/api/orders", content=b"x" * (MAX_BODY + 1), headers=USER)
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert orders.hits == 0


async def test_chunked_body_over_the_limit_gets_413_while_it_streams(
    gateway: httpx.AsyncClient,
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"x" * 100_000

    response = await gateway.post("/api/orders", content=chunks(), headers=USER)
    assert response.status_code == 413


@pytest.mark.parametrize(
    ("headers", "title"),
    [({}, "Missing X-User-Id"), ({"X-User-Id": "no spaces"}, "Malformed X-User-Id")],
)
async def test_missing_or_malformed_user_id_gets_400_and_never_reaches_the_upstream(
    gateway: httpx.AsyncClient,
    orders: Upstream,
    payments: Upstream,
    headers: dict[str, str],
    title: str,
) -> None:
    for path in ("/api/orders", "/api/payments/balance"):
        response = await gateway.get(path, headers=headers)
        assert response.status_code == 400
        assert response.json()["title"] == title
    assert (orders.hits, payments.hits) == (0, 0)


async def test_unknown_route_gets_404_problem(gateway: httpx.AsyncClient) -> None:
    response = await gateway.get("/api/unknown", headers=USER)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


async def test_stopped_upstream_gets_503_fast_the_other_keeps_working_and_it_recovers(
    gateway: httpx.AsyncClient, orders: Upstream, payments: Upstream
) -> None:
    await payments.stop()
    for _ in range(5):  # refused (retried), then refused again, then the breaker is open
        response = await gateway.get("/api/payments/balance", headers=USER)
        assert response.status_code == 503
        assert (await gateway.get("/api/orders/1", headers=USER)).status_code == 200
    assert "retry-after" in response.headers  # the breaker is open: no upstream call at all
    # the app in-process has no side port: its metrics are the process's registry
    assert REGISTRY.get_sample_value("gozon_gateway_breaker_state", {"upstream": "payments"}) == 2
    ready = await gateway.get("/health/ready")
    assert ready.status_code == 503
    assert ready.json()["checks"] == {"orders": True, "payments": False}

    await payments.start()
    deadline = time.monotonic() + RESET_S + 2
    while (status := (await gateway.get("/api/payments/balance", headers=USER)).status_code) != 200:
        assert status == 503
        assert time.monotonic() < deadline, "the gateway never recovered"
        await asyncio.sleep(0.05)
    assert (await gateway.get("/health/ready")).status_code == 200


@pytest.fixture
async def dropping() -> AsyncIterator[list[int]]:
    """A server that reads each request and closes the connection: counts the attempts."""
    attempts = [0]

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempts[0] += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", port_for.select_random())
    attempts.append(server.sockets[0].getsockname()[1])
    async with server:
        yield attempts


async def test_dropped_connections_are_retried_once_for_get_and_never_for_post(
    orders: Upstream, payments: Upstream, dropping: list[int]
) -> None:
    """A connection lost after the request was sent: the outcome is unknown, and says so."""
    dropped = settings(orders, payments, gateway_payments_url=f"http://127.0.0.1:{dropping[1]}")
    async with serve(build_app(dropped)) as client:
        assert (await client.get("/api/payments/x", headers=USER)).status_code == 502
        assert dropping[0] == 2
        response = await client.post("/api/payments/x", headers=USER)
        assert response.status_code == 502
        assert dropping[0] == 3
    problem = response.json()
    assert problem["outcome"] == "unknown"
    assert "may or may not" in problem["detail"]
    assert "Idempotency-Key" in problem["detail"]


async def test_refused_connection_is_503_not_processed_with_retry_after(
    orders: Upstream, payments: Upstream
) -> None:
    await payments.stop()
    async with serve(build_app(settings(orders, payments))) as client:
        response = await client.post("/api/payments/deposit?amount=1", headers=USER)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["outcome"] == "not_processed"
    assert "not processed" in response.json()["detail"]


async def test_upstream_gets_the_time_left_and_a_clients_own_value_is_replaced(
    gateway: httpx.AsyncClient, orders: Upstream
) -> None:
    await gateway.get("/api/orders/1", headers={**USER, "X-Request-Timeout-Ms": "999999"})
    sent = orders.last["headers"].getall("X-Request-Timeout-Ms")
    assert len(sent) == 1
    # less than the gateway's timeout, less the margin for the answer's way back
    assert 0 < int(sent[0]) <= TIMEOUT_S * 800


async def test_request_id_is_echoed_and_passed_upstream_or_generated(
    gateway: httpx.AsyncClient, orders: Upstream
) -> None:
    response = await gateway.get("/api/orders/1", headers={**USER, "X-Request-Id": "req-42"})
    assert response.headers["x-request-id"] == "req-42"
    assert orders.last["headers"]["X-Request-Id"] == "req-42"
    generated = await gateway.get("/api/orders/1", headers=USER)
    assert len(generated.headers["x-request-id"]) == 32
    assert orders.last["headers"]["X-Request-Id"] == generated.headers["x-request-id"]
    refused = await gateway.get("/api/orders/1", headers={"X-Request-Id": "req-43"})
    assert refused.headers["x-request-id"] == "req-43"


async def test_hop_by_hop_headers_are_stripped_both_ways_and_forwarded_headers_set(
    gateway: httpx.AsyncClient, orders: Upstream
) -> None:
    response = await gateway.get(
        "/api/orders/1",
        headers={
            **USER,
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "s",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic abc",
            "TE": "trailers",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-For": "10.0.0.1",
        },
    )
    sent = orders.last["headers"]
    for name in ("X-Secret", "Keep-Alive", "Proxy-Authorization", "TE"):
        assert name not in sent
    assert sent["X-Forwarded-For"] == "10.0.0.1, 127.0.0.1"
    assert sent["X-Forwarded-Proto"] == "http"
    assert sent["X-Forwarded-Host"] == "test"
    assert sent["Host"] == f"127.0.0.1:{orders.port}"
    assert "x-private" not in response.headers
    assert "keep-alive" not in response.headers


async def test_trace_context_is_continued_and_the_gateway_span_is_sent_upstream(
    gateway: httpx.AsyncClient, orders: Upstream
) -> None:
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    caller = f"00-{trace_id}-b7ad6b7169203331-01"
    await gateway.get("/api/orders/1", headers={**USER, "traceparent": caller})
    sent = orders.last["headers"]["traceparent"]
    assert sent.split("-")[1] == trace_id
    assert sent != caller


async def test_large_allowed_bodies_stream_both_ways(
    gateway: httpx.AsyncClient, orders: Upstream
) -> None:
    payload = bytes(range(256)) * 3500  # ~900 KB, under the 1 MiB limit

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 64 * 1024):
            yield payload[start : start + 64 * 1024]

    for content in (payload, chunks()):
        response = await gateway.put("/api/orders/upload", content=content, headers=USER)
        assert response.status_code == 200, response.text
        assert response.json()["size"] == len(payload)
        assert response.json()["sha256"] == hashlib.sha256(payload).hexdigest()

    big = await gateway.get("/api/orders/big", headers=USER)
    assert big.status_code == 200
    assert big.content == b"".join(bytes([i]) * 64 * 1024 for i in range(64))


async def test_rate_limit_answers_429_with_retry_after_per_user(
    orders: Upstream, payments: Upstream
) -> None:
    limited = settings(orders, payments, gateway_rate_limit_per_s=1, gateway_rate_limit_burst=2)
    async with serve(build_app(limited)) as client:
        statuses = [(await client.get("/api/orders/1", headers=USER)).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        refused = await client.get("/api/orders/1", headers=USER)
        assert refused.headers["retry-after"] == "1"
        other = await client.get("/api/orders/1", headers={"X-User-Id": "user-2"})
        assert other.status_code == 200
    assert orders.hits == 3


async def test_cors_is_answered_at_the_edge_when_configured(
    orders: Upstream, payments: Upstream
) -> None:
    origin = "https://shop.example"
    cors = settings(orders, payments, gateway_cors_origins=[origin])
    async with serve(build_app(cors)) as client:
        preflight = await client.options(
            "/api/orders",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-user-id, content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == origin
        refused = await client.get("/api/orders", headers={"Origin": origin})
        assert refused.status_code == 400
        assert refused.headers["access-control-allow-origin"] == origin
    assert orders.hits == 0


async def test_docs_merge_both_services_and_refetch_a_missing_one(
    gateway: httpx.AsyncClient, payments: Upstream
) -> None:
    await payments.stop()
    document = (await gateway.get("/openapi.json")).json()
    assert set(document["paths"]) == {"/api/orders/{order_id}"}
    assert "payments" in document["info"]["description"]
    await payments.start()
    document = (await gateway.get("/openapi.json")).json()
    assert set(document["paths"]) == {"/api/orders/{order_id}", "/api/payments/balance"}
    assert set(document["components"]["schemas"]) == {
        "Thing",
        "payments_Thing",
        "Problem",
        "FieldError",
    }
    answers = document["paths"]["/api/payments/balance"]["get"]["responses"]
    assert {"400", "404", "408", "413", "429", "431", "503", "504"} <= set(answers)
    assert answers["431"]["content"] == {
        "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
    }
    assert "swagger-ui" in (await gateway.get("/docs")).text


@contextlib.asynccontextmanager
async def uvicorn_serving(app: FastAPI) -> AsyncIterator[str]:
    """An app on a free port, served by uvicorn (the gateway: `gateway_serving`)."""
    port = port_for.select_random()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, proxy_headers=False
    )
    async with _serving(config):
        yield f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def gateway_serving(
    gateway_settings: GatewaySettings, metrics_port: int | None = None
) -> AsyncIterator[str]:
    """The gateway on a free port, served as `gozon gateway` serves it (with its side port
    when `metrics_port` is given)."""
    port = port_for.select_random(exclude_ports=[metrics_port] if metrics_port else None)
    gateway_settings = gateway_settings.model_copy(update={"gateway_port": port})
    app = build_app(gateway_settings, metrics_port=metrics_port)
    async with _serving(uvicorn_config(app, gateway_settings)):
        yield f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def _serving(config: uvicorn.Config) -> AsyncIterator[None]:
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        await task


async def test_over_a_real_socket_a_chunked_body_goes_up_whole_and_no_banner_comes_back(
    orders: Upstream, payments: Upstream
) -> None:
    payload = b"z" * 900_000

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 100_000):
            yield payload[start : start + 100_000]

    async with (
        gateway_serving(settings(orders, payments)) as url,
        aiohttp.ClientSession(headers=USER) as client,
    ):
        async with client.post(f"{url}/api/orders/upload", data=chunks()) as response:
            assert response.status == 200
            assert (await response.json())["size"] == len(payload)
            assert len(response.headers.getall("Date")) == 1
            assert "Server" not in response.headers  # neither the upstream's nor uvicorn's
        assert orders.last["headers"]["X-Forwarded-For"] == "127.0.0.1"
        # read whole before it was admitted upstream, so it goes with its length
        assert orders.last["headers"]["Content-Length"] == str(len(payload))
        async with client.get(f"{url}/api/orders/big") as response:
            assert len(await response.read()) == 64 * 64 * 1024
        await payments.stop()
        async with client.get(f"{url}/api/payments/balance") as response:
            assert response.status == 503
            assert response.content_type == "application/problem+json"


async def test_metrics_are_served_on_the_side_port_and_refused_on_the_public_one(
    orders: Upstream, payments: Upstream
) -> None:
    side = port_for.select_random()
    async with (
        gateway_serving(settings(orders, payments), metrics_port=side) as url,
        httpx.AsyncClient(timeout=10) as client,
    ):
        public = await client.get(f"{url}/metrics")
        assert public.status_code == 404
        assert public.headers["content-type"] == "application/problem+json"
        assert "gozon_" not in public.text
        scraped = await client.get(f"http://127.0.0.1:{side}/metrics")
        assert scraped.status_code == 200
        assert 'gozon_gateway_breaker_state{upstream="orders"}' in scraped.text
        # the side port answers the health checks too, with the gateway's own readiness
        assert (await client.get(f"http://127.0.0.1:{side}/health/live")).status_code == 200
        ready = await client.get(f"http://127.0.0.1:{side}/health/ready")
        assert ready.json()["checks"] == {"orders": True, "payments": True}
        # the public port keeps its probes (a load balancer's health check)
        assert (await client.get(f"{url}/health/live")).status_code == 200


async def test_past_its_in_flight_limit_the_gateway_sheds_503_without_calling_the_upstream(
    orders: Upstream, payments: Upstream
) -> None:
    orders.delay_s = TIMEOUT_S / 2
    one_at_a_time = settings(orders, payments, gateway_upstream_max_in_flight=1)
    async with serve(build_app(one_at_a_time)) as client:
        first = asyncio.create_task(client.get("/api/orders/1", headers=USER))
        await until(lambda: asyncio.sleep(0, result=orders.hits == 1), 10, "the first request")
        shed = await client.post("/api/orders", headers=USER, json={})
        assert (await first).status_code == 200
    assert shed.status_code == 503
    assert shed.headers["retry-after"] == "1"
    assert shed.json()["outcome"] == "not_processed"
    assert orders.hits == 1
