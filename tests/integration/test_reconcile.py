"""`gozon reconcile` against real databases: clean when the money adds up, and a hand-made
mismatch (a ledger row changed behind the append-only trigger's back, a stray debit) is
named in the report with a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from gozon.reconcile import (
    BALANCE_MISMATCH,
    CANCELLED_WITH_DEBIT,
    DEBIT_WITHOUT_ORDER,
    FINISHED_NOT_DEBITED_ONCE,
    STUCK_ORDER,
    reconcile,
)

pytestmark = pytest.mark.integration


async def books(orders_db: str, payments_db: str, user: str) -> dict[str, uuid.UUID]:
    """A consistent history: a deposit of 100, a paid order of 30, a cancelled order, and an
    order just created (in flight, not stuck)."""
    paid, cancelled, fresh = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    account = uuid.uuid4()
    orders, payments = create_async_engine(orders_db), create_async_engine(payments_db)
    try:
        async with orders.begin() as conn:
            for order_id, status in ((paid, "FINISHED"), (cancelled, "CANCELLED"), (fresh, "NEW")):
                await conn.execute(
                    text(
                        "INSERT INTO orders (id, user_id, amount, description, status, "
                        "created_at) VALUES (:id, :user, 30, 'x', :status, now())"
                    ),
                    {"id": order_id, "user": user, "status": status},
                )
        async with payments.begin() as conn:
            await conn.execute(
                text("INSERT INTO accounts (id, user_id, balance) VALUES (:id, :user, 70)"),
                {"id": account, "user": user},
            )
            await conn.execute(
                text(
                    "INSERT INTO account_ledger (account_id, user_id, kind, amount, "
                    "balance_after, order_id) VALUES "
                    "(:account, :user, 'DEPOSIT', 100, 100, NULL), "
                    "(:account, :user, 'DEBIT', 30, 70, :paid)"
                ),
                {"account": account, "user": user, "paid": paid},
            )
    finally:
        await orders.dispose()
        await payments.dispose()
    return {"paid": paid, "cancelled": cancelled, "fresh": fresh, "account": account}


def gozon_reconcile(
    orders_db: str, payments_db: str, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "GOZON_ORDERS_DATABASE_URL": orders_db,
        "GOZON_PAYMENTS_DATABASE_URL": payments_db,
    }
    return subprocess.run(
        [sys.executable, "-m", "gozon.cli", "reconcile", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_consistent_books_reconcile_clean(orders_db: str, payments_db: str) -> None:
    await books(orders_db, payments_db, "rec-clean")
    report = await reconcile(orders_db, payments_db, stuck_after=timedelta(minutes=1))
    assert report.ok, report.render()
    assert report.orders == {"FINISHED": 1, "CANCELLED": 1, "NEW": 1}
    assert (report.accounts, report.ledger_rows, report.debits) == (1, 2, 1)

    run = gozon_reconcile(orders_db, payments_db)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "OK: no mismatch" in run.stdout


async def test_a_tampered_ledger_is_reported_with_a_non_zero_exit(
    orders_db: str, payments_db: str
) -> None:
    ids = await books(orders_db, payments_db, "rec-bad")
    payments: AsyncEngine = create_async_engine(payments_db)
    try:
        async with payments.begin() as conn:
            # The ledger refuses UPDATE (migration 0002): only with its trigger disabled can
            # a row be changed, which is exactly what reconcile is there to catch.
            await conn.execute(
                text("ALTER TABLE account_ledger DISABLE TRIGGER account_ledger_append_only")
            )
            await conn.execute(
                text(
                    "UPDATE account_ledger SET amount = 130 "
                    "WHERE kind = 'DEPOSIT' AND account_id = :account"
                ),
                {"account": ids["account"]},
            )
            await conn.execute(
                text("ALTER TABLE account_ledger ENABLE TRIGGER account_ledger_append_only")
            )
            # A stray debit of the cancelled order, and one of an order nobody made.
            stranger = uuid.uuid4()
            await conn.execute(
                text(
                    "INSERT INTO account_ledger (account_id, user_id, kind, amount, "
                    "balance_after, order_id) VALUES "
                    "(:account, 'rec-bad', 'DEBIT', 30, 70, :cancelled), "
                    "(:account, 'rec-bad', 'DEBIT', 5, 70, :stranger)"
                ),
                {"account": ids["account"], "cancelled": ids["cancelled"], "stranger": stranger},
            )
    finally:
        await payments.dispose()

    report = await reconcile(orders_db, payments_db, stuck_after=timedelta(minutes=1))
    kinds = {finding.kind for finding in report.findings}
    assert kinds == {BALANCE_MISMATCH, CANCELLED_WITH_DEBIT, DEBIT_WITHOUT_ORDER}, report.render()
    (mismatch,) = report.of_kind(BALANCE_MISMATCH)
    # deposits 130 - debits (30 + 30 + 5) = 65, the balance says 70
    assert mismatch.subject == "rec-bad"
    assert "ledger sums to 65" in mismatch.detail
    assert report.of_kind(CANCELLED_WITH_DEBIT)[0].subject == str(ids["cancelled"])
    assert report.of_kind(DEBIT_WITHOUT_ORDER)[0].subject == str(stranger)

    run = gozon_reconcile(orders_db, payments_db)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "MISMATCH" in run.stdout
    assert "balance_mismatch (1):" in run.stdout
    assert "rec-bad: balance 70.00 but the ledger sums to 65.00" in run.stdout
    assert str(ids["cancelled"]) in run.stdout


async def test_old_new_orders_are_stuck_and_finished_ones_need_their_debit(
    orders_db: str, payments_db: str
) -> None:
    ids = await books(orders_db, payments_db, "rec-stuck")
    orders = create_async_engine(orders_db)
    try:
        async with orders.begin() as conn:
            await conn.execute(
                text("UPDATE orders SET created_at = now() - interval '2 hours' WHERE id = :id"),
                {"id": ids["fresh"]},
            )
            await conn.execute(
                text(
                    "INSERT INTO orders (id, user_id, amount, description, status, created_at) "
                    "VALUES (:id, 'rec-stuck', 10, 'x', 'FINISHED', now())"
                ),
                {"id": uuid.uuid4()},
            )
    finally:
        await orders.dispose()
    report = await reconcile(orders_db, payments_db, stuck_after=timedelta(minutes=1))
    assert {f.kind for f in report.findings} == {STUCK_ORDER, FINISHED_NOT_DEBITED_ONCE}
    assert report.of_kind(STUCK_ORDER)[0].subject == str(ids["fresh"])
    # Scoped to another user, the same books are clean; a longer threshold, not stuck.
    assert (await reconcile(orders_db, payments_db, stuck_after=timedelta(0), users=["someone"])).ok
    longer = await reconcile(orders_db, payments_db, stuck_after=timedelta(hours=3))
    assert {f.kind for f in longer.findings} == {FINISHED_NOT_DEBITED_ONCE}


def test_an_unreachable_database_is_a_clear_error() -> None:
    url = "postgresql+asyncpg://postgres:postgres@127.0.0.1:1/order_db"
    run = gozon_reconcile(url, url)
    assert run.returncode == 2
    assert run.stderr.startswith("gozon: reconcile could not read the databases:")
    assert "Traceback" not in run.stderr
