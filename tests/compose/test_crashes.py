"""Crashes under load in the compose stack: compose's restart policy brings every crashed
container back and no accepted order is lost or paid twice.

Orders are created through the gateway without pause while the relays, the consumers and the
orders API are crashed one after another (SIGKILL to the container's main process, see
devstack/compose.py). Then, for every order the gateway answered 201: it is FINISHED or
CANCELLED; FINISHED ⇔ exactly one DEBIT in the ledger, CANCELLED ⇔ none; each account's
balance equals its ledger and never went negative; both outboxes drained with nothing FAILED.

These are the reliability invariants (DESIGN.md, "Reliability"), checked by `gozon
reconcile`'s own function limited to this test's users.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from devstack import COMPOSE_SERVICES, ComposeStack
from gozon.reconcile import reconcile
from tests.conftest import until
from tests.e2e.conftest import Platform

pytestmark = pytest.mark.compose

# processes of the process table (their compose services: COMPOSE_SERVICES)
CRASHED = ["orders-relay", "payments-consumer", "payments-relay", "orders-consumer", "orders-api"]
USERS = 12
DEPOSIT = Decimal("1500.00")  # most orders paid, the last ones of each user cancelled


@pytest.fixture
async def databases(platform: Platform) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    orders = create_async_engine(platform.env["GOZON_ORDERS_DATABASE_URL"])
    accounts = create_async_engine(platform.env["GOZON_PAYMENTS_DATABASE_URL"])
    yield orders, accounts
    await orders.dispose()
    await accounts.dispose()


async def deposit(client: httpx.AsyncClient, user: str) -> None:
    """A deposit retried under its Idempotency-Key, as a client should on a 5xx or a timeout
    (the machine may be busy): it lands exactly once."""
    headers = {"X-User-Id": user, "Idempotency-Key": str(uuid.uuid4())}
    last = ""
    for _ in range(10):
        try:
            response = await client.post(f"/api/payments/deposit?amount={DEPOSIT}", headers=headers)
        except httpx.TransportError as exc:
            last = repr(exc)
            continue
        if response.status_code < 500:
            assert response.status_code in (200, 201), response.text
            return
        last = response.text
    raise AssertionError(f"the deposit for {user} failed 10 times, last: {last}")


async def load(
    client: httpx.AsyncClient, users: list[str], accepted: list[str], answers: Counter[int]
) -> None:
    """Creates orders back to back until cancelled; keeps the ids of those answered 201."""
    rng = random.Random()
    while True:
        user = rng.choice(users)
        amount = f"{rng.randint(1, 40)}.{rng.randint(0, 99):02d}"
        try:
            response = await client.post(
                "/api/orders",
                headers={"X-User-Id": user},
                json={"amount": float(amount), "description": "crash test"},
            )
        except httpx.TransportError:
            answers[0] += 1
            continue
        answers[response.status_code] += 1
        if response.status_code == 201:
            accepted.append(response.json()["id"])


async def test_crashed_containers_come_back_and_no_accepted_order_is_lost(
    platform: Platform, stack: ComposeStack, databases: tuple[AsyncEngine, AsyncEngine]
) -> None:
    orders_db, accounts_db = databases
    run = uuid.uuid4().hex[:8]
    users = [f"crash-{run}-{n}" for n in range(USERS)]
    restarts_before = {name: stack.restart_count(COMPOSE_SERVICES[name]) for name in CRASHED}
    accepted: list[str] = []
    answers: Counter[int] = Counter()
    async with httpx.AsyncClient(base_url=platform.gateway, timeout=30) as client:
        for user in users:
            await deposit(client, user)
        workers = [asyncio.create_task(load(client, users, accepted, answers)) for _ in range(6)]
        try:
            for name in CRASHED:
                seen = len(accepted)
                # each crash lands while orders are flowing
                await until(at_least(accepted, seen + 20), 60, f"orders before {name}")
                killed_at = stack.crash(COMPOSE_SERVICES[name])
                await asyncio.to_thread(
                    stack.wait_restarted,
                    COMPOSE_SERVICES[name],
                    killed_at,
                    health_url=f"{platform.url(name)}/health/ready",
                )
            seen = len(accepted)
            await until(at_least(accepted, seen + 20), 60, "orders after the last crash")
        finally:
            for worker in workers:
                worker.cancel()
            for worker in workers:
                with contextlib.suppress(asyncio.CancelledError):
                    await worker

    assert len(accepted) >= 120, answers
    for name in CRASHED:
        assert stack.restart_count(COMPOSE_SERVICES[name]) == restarts_before[name] + 1, name

    # Every order of these users, including any whose 201 was lost to a crashing API: an
    # order that exists is paid or cancelled like any other.
    async def all_final() -> bool:
        async with orders_db.connect() as conn:
            open_orders = await conn.scalar(
                text("SELECT count(*) FROM orders WHERE user_id = ANY(:u) AND status = 'NEW'"),
                {"u": users},
            )
        return bool(open_orders == 0)

    await until(all_final, 120, f"all orders final ({len(accepted)} accepted)")

    async def outboxes_drained() -> bool:
        pending = 0
        for engine, table in ((orders_db, "order_outbox"), (accounts_db, "payment_outbox")):
            async with engine.connect() as conn:
                pending += int(
                    await conn.scalar(text(f"SELECT count(*) FROM {table} WHERE status <> 'SENT'"))
                )
        return pending == 0

    await until(outboxes_drained, 60, "both outboxes drained")

    async with orders_db.connect() as conn:
        existing = set(
            (
                await conn.scalars(
                    text("SELECT id::text FROM orders WHERE user_id = ANY(:u)"), {"u": users}
                )
            ).all()
        )
    assert set(accepted) <= existing, "an order answered 201 is not in order_db"

    # The money invariants are `gozon reconcile`'s, over these users' accounts and orders.
    report = await reconcile(
        platform.env["GOZON_ORDERS_DATABASE_URL"],
        platform.env["GOZON_PAYMENTS_DATABASE_URL"],
        stuck_after=timedelta(0),
        users=users,
    )
    assert report.ok, report.render()
    assert report.accounts == USERS
    assert report.orders.get("FINISHED"), "no order was paid: the load never reached payments"


def at_least(accepted: list[str], count: int) -> Callable[[], Awaitable[bool]]:
    async def enough() -> bool:
        return len(accepted) >= count

    return enough
