"""The gateway's client-side limits over raw sockets, served as `gozon gateway` serves it.

Slow heads and bodies, oversized request lines and heads, too many headers and too many
connections from one address are each answered by the server protocol itself and never reach
an upstream: the upstreams are real HTTP servers that count what they get.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import port_for
import pytest
import uvicorn
from prometheus_client import REGISTRY

from gozon.gateway.app import build_app
from gozon.gateway.server import uvicorn_config
from tests.integration.test_gateway import settings
from tests.integration.upstream import Upstream

pytestmark = pytest.mark.integration

HEADER_TIMEOUT_S = 0.5
BODY_TIMEOUT_S = 0.5
MAX_CONNECTIONS = 3
GET = b"GET /api/orders/x HTTP/1.1\r\nHost: gw\r\nX-User-Id: u1\r\n"


@contextlib.asynccontextmanager
async def edge(orders: Upstream, payments: Upstream, **overrides: Any) -> AsyncIterator[int]:
    """The gateway on a free port, with the limits these tests use; yields the port."""
    port = port_for.select_random()
    values: dict[str, Any] = {
        "gateway_port": port,
        "gateway_header_timeout_s": HEADER_TIMEOUT_S,
        "gateway_body_timeout_s": BODY_TIMEOUT_S,
        "gateway_max_connections_per_client": MAX_CONNECTIONS,
        **overrides,
    }
    gateway_settings = settings(orders, payments, **values)
    server = uvicorn.Server(uvicorn_config(build_app(gateway_settings), gateway_settings))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        await task


def refusals(status: int) -> float:
    sample = REGISTRY.get_sample_value("gozon_gateway_edge_refusals_total", {"status": str(status)})
    return sample or 0.0


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def answer_and_close(reader: asyncio.StreamReader, within: float = 30) -> tuple[int, Any]:
    """Reads until the server closes the connection; the status and the JSON body."""
    raw = await asyncio.wait_for(reader.read(), within)  # to EOF: the connection is closed
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = dict(line.decode().lower().split(": ", 1) for line in head.split(b"\r\n")[1:] if line)
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    problem = json.loads(body)
    assert problem["status"] == status
    return status, problem


async def send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    with contextlib.suppress(ConnectionError):  # the server may refuse before reading it all
        await writer.drain()


async def test_a_head_that_never_finishes_is_408_and_closed_and_never_forwarded(
    orders: Upstream, payments: Upstream
) -> None:
    async with edge(orders, payments) as port:
        reader, writer = await connect(port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await send(writer, GET)  # no blank line: the head never ends
        status, problem = await answer_and_close(reader)
        assert loop.time() - started >= HEADER_TIMEOUT_S
        assert status == 408
        assert "headers" in problem["detail"]
        writer.close()
    assert orders.hits == 0


async def test_a_body_that_never_comes_is_408_and_closed_and_never_forwarded(
    orders: Upstream, payments: Upstream
) -> None:
    async with edge(orders, payments) as port:
        reader, writer = await connect(port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await send(
            writer,
            b"POST /api/orders HTTP/1.1\r\nHost: gw\r\nX-User-Id: u1\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"amount": 1',
        )
        status, problem = await answer_and_close(reader)
        assert loop.time() - started >= BODY_TIMEOUT_S
        assert status == 408
        assert "body" in problem["detail"]
        writer.close()
    assert orders.hits == 0


async def test_a_connection_that_sends_nothing_is_closed(
    orders: Upstream, payments: Upstream
) -> None:
    async with edge(orders, payments) as port:
        reader, writer = await connect(port)
        assert await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (GET + b"X-Big: " + b"a" * 1024 * 1024 + b"\r\n\r\n", 431),  # one 1 MB header
        (GET + b"".join(b"X-H%d: v\r\n" % n for n in range(100)) + b"\r\n", 431),
        (GET + b"".join(b"X-H%d: %s\r\n" % (n, b"v" * 900) for n in range(30)) + b"\r\n", 431),
        (b"GET /api/orders/" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n", 414),
        (b"GET /api/orders HTTP/1.1\r\nHost: gw\r\nBad Header\r\n\r\n", 400),
    ],
    ids=["1 MB header", "100 headers", "27 KB of headers", "10 KB request line", "garbage"],
)
async def test_oversized_or_broken_heads_are_refused_and_never_forwarded(
    orders: Upstream, payments: Upstream, request_bytes: bytes, status: int
) -> None:
    refused_before = refusals(status)
    async with edge(orders, payments) as port:
        reader, writer = await connect(port)
        await send(writer, request_bytes)
        assert (await answer_and_close(reader))[0] == status
        writer.close()
    assert orders.hits == 0
    assert refusals(status) == refused_before + 1


async def test_keep_alive_requests_on_one_connection_are_not_cut_by_the_deadlines(
    orders: Upstream, payments: Upstream
) -> None:
    async with edge(orders, payments) as port:
        reader, writer = await connect(port)
        for _ in range(3):
            await send(writer, GET + b"\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            assert head.startswith(b"HTTP/1.1 200 ")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            await asyncio.sleep(HEADER_TIMEOUT_S)  # idle between requests is keep-alive's
        writer.close()
    assert orders.hits == 3


async def test_one_address_may_hold_only_so_many_connections(
    orders: Upstream, payments: Upstream
) -> None:
    async with edge(orders, payments, gateway_header_timeout_s=60) as port:
        held = [await connect(port) for _ in range(MAX_CONNECTIONS)]
        reader, writer = await connect(port)
        status, problem = await answer_and_close(reader)
        assert status == 429
        assert str(MAX_CONNECTIONS) in problem["detail"]
        writer.close()
        # a held connection still works, and once one closes a new one is let in
        reader, writer = held[0]
        await send(writer, GET + b"Connection: close\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 30)).startswith(b"HTTP/1.1 200 ")
        writer.close()

        async def admitted() -> bool:
            reader, writer = await connect(port)
            await send(writer, GET + b"Connection: close\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            return answer.startswith(b"HTTP/1.1 200 ")

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not await admitted():  # the server notices the close when its loop gets to it
            assert loop.time() < deadline, "a closed connection still counts"
            await asyncio.sleep(0.05)
        for _, held_writer in held[1:]:
            held_writer.close()
