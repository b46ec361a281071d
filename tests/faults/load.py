"""Client load through the gateway, every request logged as a `ClientRecord`.

`SteadyLoad` offers orders at a fixed rate from this event loop (open loop up to its
concurrency cap: a slow answer does not slow the offered rate down until that many are
outstanding), each with a unique `Idempotency-Key` that is also its description, so that every
answer can be traced to the order it did or did not create. `overload` runs vegeta (an
open-loop generator in Go, `scripts/install-vegeta`) for rates one Python client cannot offer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import re
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

from tests.faults.invariants import ClientRecord

ROOT = Path(__file__).resolve().parents[2]
_RFC3339 = re.compile(r"(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)")


def new_key() -> str:
    return f"f-{uuid.uuid4().hex}"


def order_body(key: str) -> dict[str, object]:
    # Mostly small amounts; about one in ten is more than the poor users have: CANCELLED.
    return {"amount": random.choice([1, 2, 5, 10, 20, 50]), "description": key}


def record_from(
    key: str, user: str, sent_at: float, latency: float, status: int, body: bytes
) -> ClientRecord:
    outcome = order_id = detail = None
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        outcome = parsed.get("outcome")
        detail = parsed.get("detail")
        if status == 201:
            order_id = parsed.get("id")
    return ClientRecord(key, user, sent_at, latency, status, outcome, order_id, detail)


@dataclass
class SteadyLoad:
    gateway: str
    users: Sequence[str]
    rate_per_s: float = 35.0
    max_outstanding: int = 200
    client_timeout_s: float = 15.0
    log: list[ClientRecord] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SteadyLoad:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def _run(self) -> None:
        # Idle connections dropped after 1 s, well before the gateway's keep-alive timeout
        # (5 s): a POST sent on a connection the server is closing at that moment gets no
        # answer, which would count as an unknown outcome the platform did not cause.
        limits = httpx.Limits(max_connections=self.max_outstanding, keepalive_expiry=1)
        async with httpx.AsyncClient(
            base_url=self.gateway, timeout=self.client_timeout_s, limits=limits
        ) as client:
            outstanding: set[asyncio.Task[None]] = set()
            loop = asyncio.get_running_loop()
            interval = 1 / self.rate_per_s
            next_at = loop.time()
            while not self._stop.is_set():
                if len(outstanding) < self.max_outstanding:
                    task = asyncio.create_task(self._one(client))
                    outstanding.add(task)
                    task.add_done_callback(outstanding.discard)
                next_at += interval
                delay = next_at - loop.time()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), delay)
                else:
                    next_at = loop.time()  # fell behind (a busy machine): do not burst
            if outstanding:
                await asyncio.wait(outstanding)

    async def _one(self, client: httpx.AsyncClient) -> None:
        key = new_key()
        user = random.choice(self.users)
        sent_at = time.time()
        started = time.perf_counter()
        try:
            response = await client.post(
                "/api/orders",
                json=order_body(key),
                headers={"X-User-Id": user, "Idempotency-Key": key},
            )
            status, body = response.status_code, response.content
        except httpx.ConnectError as exc:  # no connection: nothing was sent
            status, body = 0, json.dumps({"outcome": "not_sent", "detail": repr(exc)}).encode()
        except httpx.HTTPError as exc:  # sent, then no answer: the outcome is unknown
            status, body = 0, json.dumps({"outcome": "unknown", "detail": repr(exc)}).encode()
        self.log.append(
            record_from(key, user, sent_at, time.perf_counter() - started, status, body)
        )


def vegeta() -> str:
    """The vegeta binary, installed once into the tools cache."""
    out = subprocess.run(
        [str(ROOT / "scripts" / "install-vegeta")], check=True, capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[-1]


def overload(
    gateway: str, users: Sequence[str], *, rate_per_s: int, duration_s: int, workdir: Path
) -> list[ClientRecord]:
    """Offers `rate_per_s` orders a second for `duration_s` seconds, open loop (vegeta).

    Blocking: run it in a thread. Each target carries its key in the URL's query too, so that
    vegeta's results (which name the URL, not the headers) trace back to the request.
    """
    binary = vegeta()
    count = rate_per_s * duration_s
    targets = workdir / "targets.jsonl"
    users_of: dict[str, str] = {}
    with targets.open("w") as out:
        for _ in range(count):
            key = new_key()
            user = random.choice(users)
            users_of[key] = user
            body = json.dumps(order_body(key)).encode()
            target = {
                "method": "POST",
                "url": f"{gateway}/api/orders?k={key}",
                "body": base64.b64encode(body).decode(),
                "header": {
                    "X-User-Id": [user],
                    "Idempotency-Key": [key],
                    "Content-Type": ["application/json"],
                },
            }
            out.write(json.dumps(target) + "\n")
    results = workdir / "results.bin"
    subprocess.run(
        [
            binary,
            "attack",
            "-format=json",
            f"-targets={targets}",
            f"-rate={rate_per_s}/1s",
            f"-duration={duration_s}s",
            "-timeout=15s",
            "-keepalive=true",
            f"-output={results}",
        ],
        check=True,
        capture_output=True,
    )
    encoded = subprocess.run(
        [binary, "encode", "--to", "json", str(results)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    records = []
    for line in encoded.splitlines():
        hit = json.loads(line)
        key = hit["url"].rsplit("k=", 1)[1]
        sent_at = _unix(hit["timestamp"])
        records.append(
            record_from(
                key,
                users_of[key],
                sent_at,
                hit["latency"] / 1e9,
                int(hit["code"]),
                base64.b64decode(hit.get("body") or b""),
            )
        )
    return records


def _unix(timestamp: str) -> float:
    """vegeta's RFC 3339 timestamp (nanoseconds) as Unix seconds."""
    match = _RFC3339.fullmatch(timestamp)
    assert match is not None, timestamp
    head, fraction, zone = match.groups()
    zone = "+00:00" if zone == "Z" else zone
    return datetime.fromisoformat(f"{head}.{(fraction or '0')[:6]:0<6}{zone}").timestamp()
