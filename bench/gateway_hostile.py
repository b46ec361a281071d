"""Benchmark: a well-behaved user's latency through the gateway while hostile clients try to
deny service (issue 33's "must show"), each scenario against the same running stack.

    .venv/bin/python -m bench.gateway_hostile   # own stack: PostgreSQL, orders API, gateway
    .venv/bin/python -m bench.gateway_hostile --duration 20

The script starts, on free loopback ports, a throwaway PostgreSQL, real `gozon orders api`
and `gozon gateway` processes (bench.gateway's `--own-stack`, default settings), creates one
order, and for each scenario runs the attackers while one user sends `GET /api/orders/{id}`
one request at a time for `--duration` seconds on a connection of its own, from the same
address as the attackers (the per-address limits apply to it too):

    baseline       no attacker
    half_sent      100 connections each holding a half-sent body (Content-Length: 40, 1 byte)
    trickle        50 chunked bodies, a byte every 100 ms
    upgrades       500 `Upgrade: websocket` attempts, 20 at a time
    unknown_keys   8 clients each posting bodies of unknown keys just under the gateway's body
                   limit (16 KiB, ~1,250 keys), back to back on one
                   connection, never reading an answer

It prints, per scenario, the user's requests, errors, p50 / p99 / max latency, the orders
breaker's state afterwards and the gateway's open-connection and incomplete-request counts
once the attackers have gone. Figures go to docs/gateway.md ("What a hostile client can and
cannot do"). Loopback only; a benchmark, never a test (the functional side is asserted in
tests/integration/test_gateway_hostile.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp

from bench.gateway import USER, create_order, own_stack
from gozon.gateway.settings import GatewaySettings

HALF_SENT = (
    b"POST /api/orders HTTP/1.1\r\nHost: bench\r\nX-User-Id: attacker\r\n"
    b"Content-Type: application/json\r\nContent-Length: 40\r\n\r\n{"
)
CHUNKED_HEAD = (
    b"POST /api/orders HTTP/1.1\r\nHost: bench\r\nX-User-Id: attacker\r\n"
    b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
)
UPGRADE = (
    b"GET /api/orders HTTP/1.1\r\nHost: bench\r\nX-User-Id: attacker\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


def unknown_keys_request() -> bytes:
    limit: int = GatewaySettings.model_fields["gateway_max_body_bytes"].default
    keys = {f"k{n:05d}": 0 for n in range(limit // 13)}  # `"k00000": 0, ` is 13 bytes
    body = json.dumps({"amount": 1, "description": "x", **keys}).encode()[: limit - 2]
    body = body[: body.rindex(b",")] + b"}"
    head = (
        b"POST /api/orders HTTP/1.1\r\nHost: bench\r\nX-User-Id: attacker\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    return head + body


Attack = Callable[[str, int, asyncio.Event], Coroutine[Any, Any, None]]


async def _open(host: str, port: int) -> asyncio.StreamWriter:
    _, writer = await asyncio.open_connection(host, port)
    return writer


async def half_sent(host: str, port: int, stop: asyncio.Event) -> None:
    writers = [await _open(host, port) for _ in range(100)]
    for writer in writers:
        writer.write(HALF_SENT)
    await stop.wait()
    for writer in writers:
        writer.close()


async def trickle(host: str, port: int, stop: asyncio.Event) -> None:
    async def one() -> None:
        while not stop.is_set():  # a new body when the gateway has cut the last one (408)
            writer = await _open(host, port)
            writer.write(CHUNKED_HEAD)
            with contextlib.suppress(ConnectionError):
                while not stop.is_set() and not writer.is_closing():
                    writer.write(b"1\r\n \r\n")
                    await writer.drain()
                    await asyncio.sleep(0.1)
            writer.close()

    await asyncio.gather(*(one() for _ in range(50)))


async def upgrades(host: str, port: int, stop: asyncio.Event) -> None:
    left = 500

    async def one() -> None:
        nonlocal left
        while left > 0 and not stop.is_set():
            left -= 1
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(UPGRADE)
            with contextlib.suppress(ConnectionError):
                await reader.read()
            writer.close()

    await asyncio.gather(*(one() for _ in range(20)))
    await stop.wait()


async def unknown_keys(host: str, port: int, stop: asyncio.Event) -> None:
    request = unknown_keys_request()

    async def one() -> None:
        while not stop.is_set():
            writer = await _open(host, port)
            with contextlib.suppress(ConnectionError):
                while not stop.is_set():
                    writer.write(request)  # never reads an answer
                    await writer.drain()
            writer.close()

    await asyncio.gather(*(one() for _ in range(8)))


SCENARIOS: dict[str, Attack | None] = {
    "baseline": None,
    "half_sent": half_sent,
    "trickle": trickle,
    "upgrades": upgrades,
    "unknown_keys": unknown_keys,
}


async def user(base: str, order_id: str, duration_s: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration_s
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(headers=USER, timeout=timeout) as session:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                async with session.get(f"{base}/api/orders/{order_id}") as answer:
                    await answer.read()
                    ok = answer.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                latencies.append((time.perf_counter() - started) * 1000)
            else:
                errors += 1
    return latencies, errors


async def gateway_metrics(url: str) -> dict[str, float]:
    wanted = {
        'gozon_gateway_breaker_state{upstream="orders"}': "breaker",
        "gozon_gateway_open_connections": "open",
        "gozon_gateway_incomplete_requests": "incomplete",
    }
    async with aiohttp.ClientSession() as session, session.get(url) as answer:
        text = await answer.text()
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in wanted:
            found[wanted[name]] = float(value)
    return found


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _attack_main(name: str, host: str, port: int, seconds: float) -> None:
    """The attackers' own process: they must not slow the user's client down themselves."""
    attack = SCENARIOS[name]
    assert attack is not None

    async def attacking() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        with contextlib.suppress(ConnectionError):
            await attack(host, port, stop)

    asyncio.run(attacking())


async def run(args: argparse.Namespace, base: str, metrics: str) -> None:
    order_id = await create_order(base)
    host, port = base.removeprefix("http://").rsplit(":", 1)
    print(
        f"{'scenario':<14}{'requests':>9}{'errors':>7}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}"
        f"{'breaker':>8}{'open':>6}{'incompl':>8}"
    )
    spawn = multiprocessing.get_context("spawn")
    for name in args.scenarios:
        attacker = None
        if SCENARIOS[name] is not None:
            attacker = spawn.Process(
                target=_attack_main, args=(name, host, int(port), args.duration + 1.5)
            )
            attacker.start()
            await asyncio.sleep(1.0)  # the attack in place before the user starts
        latencies, errors = await user(base, order_id, args.duration)
        if attacker is not None:
            await asyncio.to_thread(attacker.join, 60)
            if attacker.is_alive():
                attacker.kill()
        await asyncio.sleep(args.settle)
        counts = await gateway_metrics(metrics)
        print(
            f"{name:<14}{len(latencies):>9}{errors:>7}{quantile(latencies, 0.5):>8.1f}"
            f"{quantile(latencies, 0.99):>8.1f}{max(latencies, default=float('nan')):>8.1f}"
            f"{counts.get('breaker', -1):>8.0f}{counts.get('open', -1):>6.0f}"
            f"{counts.get('incomplete', -1):>8.0f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per scenario")
    parser.add_argument(
        "--settle", type=float, default=3.0, help="seconds after an attack before the counts"
    )
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gozon-bench-") as work:
        Path(work).chmod(0o755)  # PostgreSQL runs as the postgres user when the bench is root
        with own_stack(Path(work)) as (_, gateway, metrics):
            asyncio.run(run(args, gateway, metrics))


if __name__ == "__main__":
    main()
