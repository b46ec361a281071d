"""Counting a client's round trips to PostgreSQL on the wire.

`WireCounter` is a TCP proxy between a client and the database that reads the client's side of
the protocol (no TLS: the test servers have none, and the client's SSLRequest is answered "no"
by the server). A round trip is a message the client must wait for ReadyForQuery after: a Sync
(`S`, the end of an extended-protocol exchange: prepare, or bind + execute) or a simple Query
(`Q`: BEGIN, COMMIT, ROLLBACK as asyncpg sends them). Each one is recorded with the SQL it
carried (Parse's or Query's text; a prepared statement's execution shows as `<bind>`), so a
test can assert how many round trips a unit of work took and that none was a BEGIN or COMMIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from sqlalchemy.engine import make_url

SSL_REQUEST, GSSENC_REQUEST = 80877103, 80877104


class WireCounter:
    def __init__(self) -> None:
        self.round_trips: list[str] = []
        """One entry per round trip since the last `reset`: the SQL it carried."""
        self._pending: list[str] = []

    def reset(self) -> None:
        self.round_trips.clear()

    def statements(self) -> list[str]:
        """The round trips' SQL, whitespace folded (`<bind>`: a prepared statement's run)."""
        return [" ".join(sql.split()) for sql in self.round_trips]

    def _message(self, kind: bytes, body: bytes) -> None:
        if kind == b"Q":
            self.round_trips.append(body.rstrip(b"\0").decode())
        elif kind == b"P":  # Parse: name \0 query \0 …
            self._pending.append(body.split(b"\0", 2)[1].decode())
        elif kind == b"B" and not self._pending:
            self._pending.append("<bind>")
        elif kind == b"S":
            self.round_trips.append(" ; ".join(self._pending) or "<sync>")
            self._pending = []

    async def _client_to_server(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        started = False
        while True:
            if not started:  # untyped: SSLRequest, GSSENCRequest, then the startup message
                head = await reader.readexactly(4)
                (length,) = struct.unpack("!i", head)
                body = await reader.readexactly(length - 4)
                code = struct.unpack("!i", body[:4])[0]
                started = code not in (SSL_REQUEST, GSSENC_REQUEST)
                writer.write(head + body)
            else:
                kind = await reader.readexactly(1)
                head = await reader.readexactly(4)
                (length,) = struct.unpack("!i", head)
                body = await reader.readexactly(length - 4)
                self._message(kind, body)
                writer.write(kind + head + body)
            await writer.drain()


async def _quietly(pipe: Coroutine[Any, Any, None]) -> None:
    """A pipe ends when either side closes its connection: that is no error."""
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        await pipe


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


@contextlib.asynccontextmanager
async def counting_proxy(database_url: str) -> AsyncIterator[tuple[str, WireCounter]]:
    """A proxy to the database of `database_url`: yields the URL to connect through it and
    the counter of every connection made through it."""
    url = make_url(database_url)
    host, port = url.host or "127.0.0.1", url.port or 5432
    counter = WireCounter()
    tasks: set[asyncio.Task[None]] = set()

    async def serve(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(host, port)
        pipes = [
            asyncio.create_task(_quietly(counter._client_to_server(client_r, server_w))),
            asyncio.create_task(_quietly(_pipe(server_r, client_w))),
        ]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            for w in (client_w, server_w):
                w.close()

    def accept(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(serve(client_r, client_w))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    proxy_port = server.sockets[0].getsockname()[1]
    try:
        yield url.set(host="127.0.0.1", port=proxy_port).render_as_string(False), counter
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
