"""The operator's commands against the running platform: `gozon orders dlq redrive` puts a
dead letter back once its cause is fixed (and a second run changes nothing), and `gozon
reconcile` finds the books clean after the spec's scenario."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from devstack import GOZON
from gozon.contracts import PAYMENT_PROCESSED_TOPIC, PaymentProcessed, PaymentProcessedPayload
from gozon.messaging.dlq import list_dead_letters
from gozon.messaging.kafka import dlq_topic, new_producer
from tests.conftest import until
from tests.e2e.conftest import Platform

pytestmark = pytest.mark.e2e


def gozon(platform: Platform, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GOZON, *args],
        env={**os.environ, **platform.env},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@dataclass
class Pushed:
    url: str
    paths: list[str] = field(default_factory=list)
    body: str = ""


@contextlib.contextmanager
def pushgateway() -> Iterator[Pushed]:
    """An HTTP server on a free port that takes a Pushgateway push (PUT) and keeps it."""
    pushed = Pushed(url="")

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            pushed.paths.append(self.path)
            pushed.body += self.rfile.read(int(self.headers["Content-Length"])).decode()
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    pushed.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield pushed
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
async def orders_db(platform: Platform) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(platform.env["GOZON_ORDERS_DATABASE_URL"])
    yield engine
    await engine.dispose()


@pytest.fixture
async def producer(platform: Platform) -> AsyncIterator[AIOKafkaProducer]:
    producer = new_producer(platform.env["GOZON_KAFKA_BOOTSTRAP_SERVERS"], client_id="test")
    await producer.start()
    yield producer
    await producer.stop()


async def order_status(orders_db: AsyncEngine, order_id: uuid.UUID) -> str | None:
    async with orders_db.connect() as conn:
        status = await conn.scalar(
            text("SELECT status FROM orders WHERE id = :id"), {"id": order_id}
        )
    return None if status is None else str(status)


async def test_a_dead_letter_is_redriven_once_after_its_cause_is_fixed(
    platform: Platform, orders_db: AsyncEngine, producer: AIOKafkaProducer
) -> None:
    bootstrap = platform.env["GOZON_KAFKA_BOOTSTRAP_SERVERS"]
    user = f"e2e-dlq-{uuid.uuid4().hex[:8]}"
    order_id = uuid.uuid4()
    since = datetime.now(UTC)
    # A payment result for an order the orders service does not know (yet): dead-lettered.
    result = PaymentProcessed(
        aggregate_id=str(order_id),
        payload=PaymentProcessedPayload(
            order_id=order_id,
            user_id=user,
            amount=Decimal("12.50"),
            status="ACCOUNT_NOT_FOUND",
            processed_at=since,
        ),
    )
    await producer.send_and_wait(
        PAYMENT_PROCESSED_TOPIC, value=result.model_dump_json().encode(), key=user.encode()
    )

    async def dead_lettered() -> bool:
        letters, _ = await list_dead_letters(
            bootstrap, dlq_topic(PAYMENT_PROCESSED_TOPIC), since=since
        )
        return any(letter.order_id == str(order_id) for letter in letters)

    await until(dead_lettered, 120, "the orders consumer to dead-letter the result")
    listed = await asyncio.to_thread(gozon, platform, "orders", "dlq", "list", "--since", "1h")
    assert listed.returncode == 0, listed.stderr
    assert f"rejected: no order {order_id}" in listed.stdout

    # The cause, fixed: the order is there now (as if restored from where it was missing).
    async with orders_db.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO orders (id, user_id, amount, description, status, created_at) "
                "VALUES (:id, :user, 12.50, 'restored', 'NEW', now())"
            ),
            {"id": order_id, "user": user},
        )
    first = await asyncio.to_thread(
        gozon, platform, "orders", "dlq", "redrive", "--since", since.isoformat()
    )
    assert first.returncode == 0, first.stderr
    assert "redriven 1;" in first.stdout, first.stdout

    async def cancelled() -> bool:
        return await order_status(orders_db, order_id) == "CANCELLED"

    await until(cancelled, 120, "the redriven result to reach the order")

    with pushgateway() as pushed:
        second = await asyncio.to_thread(
            gozon, platform, "orders", "dlq", "redrive", "--pushgateway", pushed.url
        )
    assert second.returncode == 0, second.stderr
    assert "redriven 0;" in second.stdout, second.stdout
    # The run's figures, as a Pushgateway receives them.
    assert pushed.paths == ["/metrics/job/gozon-orders-dlq-redrive"]
    assert 'gozon_dlq_redrive_last_redriven{topic="payment.processed.event"} 0.0' in pushed.body
    assert await order_status(orders_db, order_id) == "CANCELLED"

    clean = await asyncio.to_thread(gozon, platform, "reconcile", "--user", user)
    assert clean.returncode == 0, clean.stdout + clean.stderr


async def test_reconcile_is_clean_after_the_specs_scenario(platform: Platform) -> None:
    user = f"e2e-rec-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(base_url=platform.gateway, timeout=60) as client:
        deposit = await client.post(
            "/api/payments/deposit?amount=5000", headers={"X-User-Id": user}
        )
        assert deposit.status_code in (200, 201), deposit.text
        created = await client.post(
            "/api/orders",
            headers={"X-User-Id": user},
            json={"amount": 1500.99, "description": "Тестовый заказ"},
        )
        assert created.status_code == 201, created.text
        order_id = created.json()["id"]

        async def final() -> bool:
            response = await client.get(f"/api/orders/{order_id}", headers={"X-User-Id": user})
            return bool(response.json()["status"] in ("FINISHED", "CANCELLED"))

        await until(final, 120, "the order to be final")
    run = await asyncio.to_thread(gozon, platform, "reconcile", "--user", user)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "orders: 1 (1 FINISHED)" in run.stdout
    assert "accounts: 1 (ledger rows: 2)" in run.stdout
