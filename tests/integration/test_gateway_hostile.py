"""What a few cheap, slow or misbehaving clients can do to the gateway: nothing to anyone else.

Each test runs the gateway as `gozon gateway` serves it (uvicorn with the edge protocol, on a
socket) in front of real upstream HTTP servers that count what they get, plays a hostile
client over raw sockets, and checks that a well-behaved client keeps getting answers, that
the upstream and its breaker never hear of it, and that every count returns to zero. How fast
the well-behaved client is answered meanwhile is a figure for `bench/gateway_hostile.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import REGISTRY

from tests.conftest import until
from tests.integration.test_gateway_edge import (
    MAX_CONNECTIONS,
    answer_and_close,
    connect,
    edge,
    send,
)
from tests.integration.upstream import Upstream

pytestmark = pytest.mark.integration

USER = {"X-User-Id": "u1"}
HALF_SENT = (
    b"POST /api/orders HTTP/1.1\r\nHost: gw\r\nX-User-Id: u1\r\n"
    b"Content-Type: application/json\r\nContent-Length: 40\r\n\r\n{"
)


def gauge(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def breaker(upstream: str) -> float:
    return gauge("gozon_gateway_breaker_state", {"upstream": upstream})


def requests(route: str, status: int) -> float:
    return gauge(
        "gozon_http_requests_total", {"method": "POST", "route": route, "status": str(status)}
    )


@contextlib.asynccontextmanager
async def user(port: int) -> AsyncIterator[httpx.AsyncClient]:
    """A well-behaved client on connections of its own."""
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", headers=USER, timeout=30
    ) as client:
        yield client


async def counts_return_to_zero() -> None:
    async def zero() -> bool:
        return (
            gauge("gozon_gateway_open_connections") == 0
            and gauge("gozon_gateway_incomplete_requests") == 0
        )

    await until(zero, 30, "the connection and incomplete-request counts to return to zero")


async def test_half_sent_bodies_hold_no_upstream_slot_and_end_in_408(
    orders: Upstream, payments: Upstream
) -> None:
    async with edge(
        orders,
        payments,
        gateway_upstream_max_in_flight=2,
        gateway_upstream_timeout_s=10,
        gateway_body_timeout_s=3,
        gateway_max_connections_per_client=64,
    ) as port:
        held = [await connect(port) for _ in range(10)]
        for _, writer in held:
            await send(writer, HALF_SENT)
        await until(
            lambda: asyncio.sleep(0, result=gauge("gozon_gateway_incomplete_requests") == 10),
            30,
            "the gateway to read the ten heads",
        )
        async with user(port) as client:  # five times the in-flight limit, all answered
            for _ in range(5):
                assert (await client.get("/api/orders/1")).status_code == 200
                created = await client.post("/api/orders", json={"amount": 1})
                assert created.status_code == 200
        for reader, writer in held:
            status, problem = await answer_and_close(reader)
            assert status == 408
            assert "body" in problem["detail"]
            writer.close()
        assert orders.hits == 10  # the well-behaved ones only
        assert breaker("orders") == 0
        await counts_return_to_zero()


async def test_trickling_chunked_bodies_get_408_and_never_open_the_breaker(
    orders: Upstream, payments: Upstream
) -> None:
    # The body deadline is past the upstream timeout (0.5 s): a body still streaming to the
    # upstream at that point used to be a 504 counted against the upstream.
    async with edge(orders, payments, gateway_body_timeout_s=1.5) as port:

        async def trickle() -> int:
            reader, writer = await connect(port)
            await send(
                writer,
                b"POST /api/orders HTTP/1.1\r\nHost: gw\r\nX-User-Id: u1\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n",
            )
            first = b""
            for _ in range(600):  # a byte every 50 ms, until the gateway answers
                await send(writer, b"1\r\nx\r\n")
                with contextlib.suppress(TimeoutError):
                    first = await asyncio.wait_for(reader.read(1), 0.05)
                    break
            assert first == b"H"
            answer = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            return int(answer.split(b" ", 2)[1])

        assert await asyncio.gather(*(trickle() for _ in range(MAX_CONNECTIONS))) == [408] * 3
        assert breaker("orders") == 0
        assert orders.hits == 0
        async with user(port) as client:
            assert (await client.get("/api/orders/1")).status_code == 200
        await counts_return_to_zero()


async def test_one_address_may_have_only_so_many_incomplete_requests(
    orders: Upstream, payments: Upstream
) -> None:
    async with edge(
        orders,
        payments,
        gateway_max_incomplete_per_client=2,
        gateway_max_connections_per_client=64,
        gateway_body_timeout_s=30,
    ) as port:
        held = [await connect(port) for _ in range(2)]
        for _, writer in held:
            await send(writer, HALF_SENT)
        await until(
            lambda: asyncio.sleep(0, result=gauge("gozon_gateway_incomplete_requests") == 2),
            30,
            "the two heads",
        )
        reader, writer = await connect(port)
        await send(writer, HALF_SENT)
        status, problem = await answer_and_close(reader)
        assert status == 429
        assert "still sending" in problem["detail"]
        writer.close()
        async with user(port) as client:  # a request sent whole is never incomplete
            assert (await client.post("/api/orders", json={"amount": 1})).status_code == 200
        for _, held_writer in held:
            held_writer.close()
        await counts_return_to_zero()


async def test_upgrade_attempts_are_never_upgraded_and_release_their_count(
    orders: Upstream, payments: Upstream
) -> None:
    attempts = [
        b"GET /api/orders/ws HTTP/1.1\r\nHost: gw\r\nX-User-Id: u1\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        b"GET /api/orders/h2 HTTP/1.1\r\nHost: gw\r\nX-User-Id: u1\r\nConnection: Upgrade, "
        b"HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    ]
    async with edge(orders, payments) as port:
        for _ in range(10 * MAX_CONNECTIONS):
            reader, writer = await connect(port)  # a WebSocket: refused at the edge
            await send(writer, attempts[0])
            status, problem = await answer_and_close(reader)
            assert status == 400
            assert "WebSocket" in problem["detail"]
            writer.close()
            reader, writer = await connect(port)  # h2c: served as HTTP/1.1, then closed
            await send(writer, attempts[1])
            answer = await asyncio.wait_for(reader.read(), 30)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
            writer.close()
        async with user(port) as client:
            assert (await client.get("/api/orders/1")).status_code == 200
        await counts_return_to_zero()
    assert orders.hits == 10 * MAX_CONNECTIONS + 1  # the h2c ones and the user's
    assert "upgrade" not in {name.lower() for name in orders.last["headers"]}


async def test_protocol_errors_and_resets_release_their_count(
    orders: Upstream, payments: Upstream
) -> None:
    async with edge(orders, payments) as port:
        for _ in range(5 * MAX_CONNECTIONS):
            reader, writer = await connect(port)  # a protocol error: 400, closed
            await send(writer, b"GET /api/orders HTTP/1.1\r\nHost: gw\r\nBad Header\r\n\r\n")
            assert (await answer_and_close(reader))[0] == 400
            writer.close()
        for request in (GET_HEAD_PART, HALF_SENT):  # resets mid-head and mid-body
            for _ in range(5 * MAX_CONNECTIONS):
                reader, writer = await connect(port)
                await send(writer, request)
                await asyncio.sleep(0.01)
                reset(writer)
        await counts_return_to_zero()
        async with user(port) as client:
            assert (await client.get("/api/orders/1")).status_code == 200


GET_HEAD_PART = b"GET /api/orders/x HTTP/1.1\r\nHost: gw\r\n"


def reset(writer: asyncio.StreamWriter) -> None:
    """Closes with a TCP reset (SO_LINGER 0), as a crashed client or a middlebox would."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()


@pytest.mark.parametrize(
    ("request_bytes", "detail"),
    [
        (b"GET /api/orders/1 HTTP/1.1\r\nX-User-Id: u1\r\n\r\n", "exactly one Host"),
        (
            b"GET /api/orders/1 HTTP/1.1\r\nHost: gw\r\nHost: other\r\nX-User-Id: u1\r\n\r\n",
            "more than once",
        ),
    ],
    ids=["no Host", "two Hosts"],
)
async def test_an_http_1_1_request_without_exactly_one_host_is_400(
    orders: Upstream, payments: Upstream, request_bytes: bytes, detail: str
) -> None:
    async with edge(orders, payments) as port:
        reader, writer = await connect(port)
        await send(writer, request_bytes)
        status, problem = await answer_and_close(reader)
        writer.close()
        assert status == 400
        assert detail in problem["detail"]
        reader, writer = await connect(port)  # HTTP/1.0 needs none
        await send(writer, b"GET /api/orders/1 HTTP/1.0\r\nX-User-Id: u1\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 30)).startswith(b"HTTP/1.1 200 ")
        writer.close()
    assert orders.hits == 1


async def test_trailer_fields_never_become_headers_nor_go_upstream(
    orders: Upstream, payments: Upstream
) -> None:
    chunked = b"POST /api/orders HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
    trailers = b"0\r\nX-User-Id: from-trailer\r\nX-Injected: 1\r\n\r\n"
    async with edge(orders, payments) as port:
        reader, writer = await connect(port)  # the identity only in a trailer: none at all
        await send(writer, chunked + b"Connection: close\r\n\r\n2\r\n{}\r\n" + trailers)
        answer = await asyncio.wait_for(reader.read(), 30)
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert b"X-User-Id" in answer
        writer.close()
        assert orders.hits == 0
        reader, writer = await connect(port)
        await send(
            writer,
            chunked + b"X-User-Id: u1\r\nConnection: close\r\n\r\n2\r\n{}\r\n" + trailers,
        )
        assert (await asyncio.wait_for(reader.read(), 30)).startswith(b"HTTP/1.1 200 ")
        writer.close()
    assert orders.hits == 1
    assert orders.last["headers"]["X-User-Id"] == "u1"
    assert "X-Injected" not in orders.last["headers"]


async def test_a_client_that_does_not_read_its_answer_is_cut_and_frees_the_slot(
    orders: Upstream, payments: Upstream
) -> None:
    aborted = gauge("gozon_gateway_write_timeouts_total")
    async with edge(
        orders, payments, gateway_upstream_max_in_flight=1, gateway_write_timeout_s=0.5
    ) as port:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: no growth
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        _reader, writer = await asyncio.open_connection(sock=sock)
        await send(writer, b"GET /api/orders/big HTTP/1.1\r\nHost: gw\r\nX-User-Id: u1\r\n\r\n")
        await until(
            lambda: asyncio.sleep(0, result=gauge("gozon_gateway_write_timeouts_total") > aborted),
            30,
            "the gateway to give up on the client that does not read",
        )
        async with user(port) as client:  # the only in-flight slot is free again
            assert (await client.get("/api/orders/1")).status_code == 200
        writer.close()
        await counts_return_to_zero()


async def test_pipelined_requests_are_read_ahead_only_so_far(
    orders: Upstream, payments: Upstream
) -> None:
    """A client that writes requests back to back and reads nothing gets the one in flight
    and `max_pipelined` queued answered, the last with `Connection: close`; the rest are never
    read (uvicorn alone read and queued them all, a read's worth more after every answer)."""
    cuts = gauge("gozon_gateway_pipeline_cuts_total")
    orders.delay_s = 0.05  # the first still in flight while the rest arrive
    async with edge(orders, payments, gateway_max_pipelined=4) as port:
        reader, writer = await connect(port)
        await send(writer, b"".join(
            b"GET /api/orders/%d HTTP/1.1\r\nHost: gw\r\nX-User-Id: u1\r\n\r\n" % n
            for n in range(1000)
        ))  # fmt: skip
        raw = await asyncio.wait_for(reader.read(), 30)  # to EOF: the gateway closes
        heads = raw.split(b"HTTP/1.1 ")[1:]
        assert [head[:3] for head in heads] == [b"200"] * 5, raw[:2000]
        assert b"connection: close" in heads[-1].lower()
        assert all(b"connection: close" not in head.lower() for head in heads[:-1])
        writer.close()
        await counts_return_to_zero()
    assert orders.hits == 5
    assert gauge("gozon_gateway_pipeline_cuts_total") == cuts + 1


async def test_a_client_disconnect_is_counted_as_499_never_as_a_server_error(
    orders: Upstream, payments: Upstream
) -> None:
    route = "/api/orders/**"
    closed, failed = requests(route, 499), requests(route, 500)
    async with edge(orders, payments, gateway_body_timeout_s=30) as port:
        _reader, writer = await connect(port)
        await send(writer, HALF_SENT)
        await until(
            lambda: asyncio.sleep(0, result=gauge("gozon_gateway_incomplete_requests") == 1),
            30,
            "the head",
        )
        writer.close()
        await until(
            lambda: asyncio.sleep(0, result=requests(route, 499) == closed + 1),
            30,
            "the disconnect to be counted",
        )
    assert requests(route, 500) == failed
    assert orders.hits == 0


async def test_the_breaker_counts_upstream_5xx_but_not_503_504_nor_4xx(
    orders: Upstream, payments: Upstream
) -> None:
    async with edge(orders, payments) as port, user(port) as client:
        for code in (503, 404, 422, 503, 400, 503, 504, 504, 504):
            assert (await client.get(f"/api/orders/status/{code}")).status_code == code
        assert breaker("orders") == 0
        for _ in range(2):  # the tests' threshold
            assert (await client.get("/api/orders/status/500")).status_code == 500
        assert breaker("orders") == 2
        refused = await client.get("/api/orders/1")
        assert refused.status_code == 503
        assert refused.json()["outcome"] == "not_processed"


async def test_no_answer_names_an_internal_address_or_redirects_by_the_clients_host(
    orders: Upstream, payments: Upstream
) -> None:
    async with edge(orders, payments) as port, user(port) as client:
        redirected = await client.get("/api/orders/redirect")
        assert redirected.status_code == 307
        assert redirected.headers["location"] == "/api/orders/x?y=1"
        for path in ("/docs/", "/openapi.json/", "/health/live/"):
            own = await client.get(path, headers={"Host": "evil.example"})
            assert own.status_code == 404
            assert "location" not in own.headers
        assert "server" not in redirected.headers
        assert str(orders.port) not in redirected.text
