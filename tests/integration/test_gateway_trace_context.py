"""W3C Trace Context at the edge: which caller context the gateway continues, and what it
sends upstream (a real upstream server records the headers it got)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gozon.gateway.app import build_app
from gozon.gateway.settings import GatewaySettings
from tests.conftest import serve
from tests.integration.upstream import Upstream

pytestmark = pytest.mark.integration

USER = {"X-User-Id": "user-1"}
TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = f"00-{TRACE}-b7ad6b7169203331-01"
OTHER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
async def gateway(orders: Upstream, payments: Upstream) -> AsyncIterator[httpx.AsyncClient]:
    settings = GatewaySettings(gateway_orders_url=orders.url, gateway_payments_url=payments.url)
    async with serve(build_app(settings)) as client:
        yield client


def sent_upstream(orders: Upstream) -> tuple[str, list[str]]:
    """The upstream's `traceparent` (exactly one) and its `tracestate` headers."""
    headers = orders.last["headers"]
    parents = headers.getall("traceparent", [])
    assert len(parents) == 1, parents
    return parents[0], headers.getall("tracestate", [])


def trace_of(traceparent: str) -> str:
    return traceparent.split("-")[1]


async def test_a_valid_traceparent_is_continued_through_the_gateways_client_span(
    gateway: httpx.AsyncClient, orders: Upstream, spans: InMemorySpanExporter
) -> None:
    answer = await gateway.get("/api/orders/1", headers={**USER, "traceparent": PARENT})
    parent, _ = sent_upstream(orders)
    assert trace_of(parent) == TRACE == answer.headers["x-trace-id"]
    client = next(s for s in spans.get_finished_spans() if s.kind == SpanKind.CLIENT)
    server = next(s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER)
    # Upstream, the parent is the gateway's CLIENT span, itself a child of its SERVER span,
    # whose parent is the caller's span.
    assert parent.split("-")[2] == format(client.context.span_id, "016x")
    assert client.parent is not None
    assert client.parent.span_id == server.context.span_id
    assert server.parent is not None
    assert format(server.parent.span_id, "016x") == PARENT[36:52]


async def test_two_conflicting_traceparents_are_both_dropped_for_a_fresh_trace(
    gateway: httpx.AsyncClient, orders: Upstream
) -> None:
    answer = await gateway.get(
        "/api/orders/1",
        headers=[
            ("X-User-Id", "user-1"),
            ("traceparent", PARENT),
            ("traceparent", OTHER),
            ("tracestate", "vendor=abc"),
        ],
    )
    parent, states = sent_upstream(orders)
    assert trace_of(parent) not in (TRACE, trace_of(OTHER))
    assert trace_of(parent) == answer.headers["x-trace-id"]
    assert states == []  # a tracestate without its traceparent means nothing


async def test_a_repeated_identical_traceparent_is_one_traceparent(
    gateway: httpx.AsyncClient, orders: Upstream
) -> None:
    await gateway.get(
        "/api/orders/1",
        headers=[("X-User-Id", "user-1"), ("traceparent", PARENT), ("traceparent", PARENT)],
    )
    assert trace_of(sent_upstream(orders)[0]) == TRACE


@pytest.mark.parametrize(
    "malformed",
    [
        "garbage",
        f"00-{TRACE}-b7ad6b7169203331",  # no flags
        f"00-{'0' * 32}-b7ad6b7169203331-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"ff-{TRACE}-b7ad6b7169203331-01",  # version ff is invalid
        f"00-{TRACE.upper()}-b7ad6b7169203331-01",  # upper-case hex
        f"00-{TRACE}-b7ad6b7169203331-01-extra",  # version 00 has exactly four fields
    ],
)
async def test_a_malformed_traceparent_starts_a_fresh_trace_and_drops_tracestate(
    gateway: httpx.AsyncClient, orders: Upstream, malformed: str
) -> None:
    answer = await gateway.get(
        "/api/orders/1",
        headers={**USER, "traceparent": malformed, "tracestate": "vendor=abc"},
    )
    parent, states = sent_upstream(orders)
    assert trace_of(parent) != TRACE
    assert trace_of(parent) == answer.headers["x-trace-id"]
    assert states == []


async def test_tracestate_is_carried_upstream_with_the_continued_trace(
    gateway: httpx.AsyncClient, orders: Upstream
) -> None:
    await gateway.get(
        "/api/orders/1",
        headers=[
            ("X-User-Id", "user-1"),
            ("traceparent", PARENT),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("tracestate", "rojo=00f067aa0ba902b7"),
        ],
    )
    parent, states = sent_upstream(orders)
    assert trace_of(parent) == TRACE
    # Several tracestate headers are one list: carried whole, in order.
    assert states == ["congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"]


async def test_probes_and_scrapes_are_not_traced(
    gateway: httpx.AsyncClient, spans: InMemorySpanExporter
) -> None:
    for path in ("/health/live", "/health/ready"):
        assert (await gateway.get(path)).status_code == 200, path
    assert (await gateway.get("/metrics")).status_code == 404  # served on the side port only
    assert list(spans.get_finished_spans()) == []
    await gateway.get("/api/orders/1", headers=USER)
    assert {s.kind for s in spans.get_finished_spans()} == {SpanKind.SERVER, SpanKind.CLIENT}
