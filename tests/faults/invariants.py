"""The money and honesty invariants, checked over both databases and what the clients saw.

Reusable: give it the two databases' URLs (SQLAlchemy's `postgresql+asyncpg://…` or plain
`postgresql://…`) and the clients' log (`ClientRecord`s: one per request the clients sent).
The fault suite runs it after every fault. The checks that need only the two databases are
`gozon reconcile`'s (`gozon.reconcile`): this module runs them and adds what only the suite
knows, the clients' log and the outboxes drained.

What it checks (docs/reliability.md, DESIGN.md "Reliability"):

1. every order a client got 201 for exists;
2. every order is final (FINISHED or CANCELLED) — `wait_until_settled` first waits for that
   within a deadline, and for the outboxes to empty;
3. no order is debited twice;
4. per account, balance = deposits − debits in the ledger, and no balance or ledger row is
   negative;
5. FINISHED ⇔ exactly one debit for the order (a CANCELLED order has none);
6. no outbox row is left PENDING or FAILED (in either database; FAILED rows are reconcile's);
7. no client was told "not processed" (503, 429, or no connection) for an order that exists;
   the requests are traced to orders by their `Idempotency-Key` (unique per request);
8. every answer of unknown outcome (502/504) said so in its body.

It also counts what the clients saw (by status), the unknown outcomes and how many of them
did create an order, so that the suite can report them.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg

from gozon.reconcile import reconcile

FINAL = ("FINISHED", "CANCELLED")
NOT_PROCESSED = (429, 503)
UNKNOWN = (502, 504)


@dataclass(frozen=True, slots=True)
class ClientRecord:
    """One request a client sent to create an order, and what it got back."""

    key: str  # the Idempotency-Key, unique per request
    user_id: str
    sent_at: float  # time.time()
    latency_s: float
    status: int  # 0: no HTTP answer at all (the client's own timeout or connection error)
    # The problem body's `outcome`, when it had one; for status 0 the client's own verdict:
    # "not_sent" (no connection) or "unknown" (sent, no answer).
    outcome: str | None = None
    order_id: str | None = None  # from a 201
    detail: str | None = None  # the problem body's `detail`, for the figures


@dataclass
class Report:
    violations: list[str] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    orders: int = 0
    unknown_outcomes: int = 0
    unknown_that_exist: int = 0
    by_status: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> dict[str, Any]:
        return {
            "statuses": self.statuses,
            "orders": self.orders,
            "unknown_outcomes": self.unknown_outcomes,
            "unknown_that_exist": self.unknown_that_exist,
            "orders_by_status": self.by_status,
            "violations": self.violations[:20],
        }


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _sqlalchemy_url(url: str) -> str:
    return (
        url
        if url.startswith("postgresql+asyncpg://")
        else url.replace("postgresql://", "postgresql+asyncpg://", 1)
    )


async def _fetch(url: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(_dsn(url))
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


async def _unsettled(orders_url: str, payments_url: str) -> tuple[int, int]:
    open_orders = await _fetch(orders_url, "SELECT count(*) AS n FROM orders WHERE status = 'NEW'")
    pending = 0
    for url, table in ((orders_url, "order_outbox"), (payments_url, "payment_outbox")):
        rows = await _fetch(url, f"SELECT count(*) AS n FROM {table} WHERE status = 'PENDING'")
        pending += int(rows[0]["n"])
    return int(open_orders[0]["n"]), pending


async def wait_until_settled(orders_url: str, payments_url: str, *, within: float) -> float:
    """Waits until no order is NEW and no outbox row PENDING; answers how long it took (s).

    Gives up after `within` seconds and returns it; `check` then reports what is left.
    """
    started = time.monotonic()
    while time.monotonic() - started < within:
        try:
            if await _unsettled(orders_url, payments_url) == (0, 0):
                return time.monotonic() - started
        except (OSError, asyncpg.PostgresError):
            pass  # the database is coming back: ask again
        await asyncio.sleep(0.25)
    return within


async def check(orders_url: str, payments_url: str, log: Iterable[ClientRecord]) -> Report:
    """Every invariant over both databases and the clients' log (see the module docstring).

    The database invariants (2-5, and 6's FAILED rows) are `gozon reconcile`'s checks, run
    with a stuck threshold of zero (after `wait_until_settled`, any NEW order is one too
    many); what only the suite knows (the clients' log, PENDING outbox rows) is checked here.
    """
    records = list(log)
    report = Report(statuses=dict(Counter(r.status for r in records)))
    books = await reconcile(
        _sqlalchemy_url(orders_url), _sqlalchemy_url(payments_url), stuck_after=timedelta(0)
    )
    orders = await _fetch(orders_url, "SELECT id::text AS id, user_id, idempotency_key FROM orders")
    pending = []
    for url, table in ((orders_url, "order_outbox"), (payments_url, "payment_outbox")):
        rows = await _fetch(url, f"SELECT count(*) AS n FROM {table} WHERE status = 'PENDING'")
        if rows[0]["n"]:
            pending.append(f"{table}: {rows[0]['n']} PENDING")

    v = report.violations
    report.orders = sum(books.orders.values())
    report.by_status = dict(books.orders)
    by_id = {row["id"] for row in orders}
    by_key = {(row["user_id"], row["idempotency_key"]) for row in orders}

    # 1. every 201 exists
    for r in records:
        if r.status == 201 and r.order_id not in by_id:
            v.append(f"201 for order {r.order_id} (key {r.key}) but no such order")
    # 2.-5. and FAILED outbox rows: the reconciliation's findings
    v.extend(str(finding) for finding in books.findings)
    # 6. no outbox row left PENDING
    v.extend(f"outbox rows left behind: {entry}" for entry in pending)
    # 7. "not processed" never for an order that exists; 8. unknown outcomes say so
    for r in records:
        exists = (r.user_id, r.key) in by_key
        if (r.status in NOT_PROCESSED or r.outcome == "not_sent") and exists:
            v.append(f"{r.status} 'not processed' for key {r.key}, but its order exists")
        if r.status == 0 and r.outcome == "unknown":
            report.unknown_outcomes += 1
            report.unknown_that_exist += exists
        if r.status in UNKNOWN:
            report.unknown_outcomes += 1
            report.unknown_that_exist += exists
            if r.outcome != "unknown":
                v.append(f"{r.status} for key {r.key} without outcome 'unknown' in its body")
    return report
