"""The HTTP processes' server (gozon.core.server): uvicorn's, ticking once a second, and still
stopping at once on a signal. A real server on a loopback port, a real HTTP request."""

from __future__ import annotations

import asyncio
import signal
import socket
from typing import Any

import pytest
import uvicorn

from gozon.core import server as server_module
from gozon.core.server import STARTUP_FAILURE, Server, serve
from tests.conftest import until


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def config(port: int) -> uvicorn.Config:
    return uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)


async def get(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await reader.read()
    writer.close()
    return answer


async def test_a_signal_stops_the_server_at_once_whatever_the_tick(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With an hour between ticks, only the signal's own wake-up can end the loop in time.
    monkeypatch.setattr(server_module, "TICK", 3600.0)
    port = free_port()
    server = Server(config(port))
    serving = asyncio.create_task(server.serve())

    async def started() -> bool:
        return server.started

    await until(started, within=30, what="the server to start")
    answer = await get(port)
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"\r\ndate: " in answer.lower()  # the first tick set the date header
    server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
    server._captured_signals.clear()  # this is a test, not the process: re-raise nothing
    await asyncio.wait_for(serving, timeout=30)
    assert server.should_exit


def test_a_server_that_cannot_start_exits_as_uvicorn_run_does() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = int(squatter.getsockname()[1])
        with pytest.raises(SystemExit) as exit_:
            serve(config(port))
    assert exit_.value.code == STARTUP_FAILURE
