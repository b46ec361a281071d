"""Reconciliation across the two databases: money against the ledger, orders against debits.

`gozon reconcile` runs `reconcile()` and prints its report; the fault suite
(`tests/faults/invariants.py`) and the compose crash test call the same function, so one set
of queries defines what "consistent" means.

What it checks (DESIGN.md, "Reliability"):
- every account's balance equals the sum of its ledger (deposits − debits), and no balance or
  ledger row is negative;
- no order is debited more than once, and every debit's amount and user match its order;
- every FINISHED order has exactly one debit, every CANCELLED order none;
- no debit refers to an order that does not exist;
- every NEW order older than `stuck_after` is reported as stuck (its payment result is late);
- no outbox row is FAILED (an event that will not leave until someone requeues it); not
  checked when limited to some users.

Reading two databases is not one snapshot, so the order of the reads is what makes a
consistent platform read as consistent: each database is read in one REPEATABLE READ
transaction, `order_db` first. A debit commits before its order turns FINISHED, so an order
read as FINISHED has its debit in the later ledger read. A debit whose order was not in the
first read (created meanwhile) is looked up again before it is called unknown. An order read
as NEW with a debit is in flight, not a mismatch.

Cost: one pass over `orders` and over the ledger's debits, held in memory (about 100 bytes an
order); `users=` limits both to some accounts.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gozon.core.db import create_engine

NEW, FINISHED, CANCELLED = "NEW", "FINISHED", "CANCELLED"

# The kinds of finding, as the report names them (and a dashboard or a script can match).
BALANCE_MISMATCH = "balance_mismatch"
NEGATIVE_BALANCE = "negative_balance"
DEBITED_TWICE = "debited_twice"
DEBIT_MISMATCH = "debit_mismatch"
FINISHED_NOT_DEBITED_ONCE = "finished_not_debited_once"
CANCELLED_WITH_DEBIT = "cancelled_with_debit"
DEBIT_WITHOUT_ORDER = "debit_without_order"
STUCK_ORDER = "stuck_order"
FAILED_OUTBOX = "failed_outbox_rows"


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    subject: str  # the account's user id, the order id, or the outbox table
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.subject}: {self.detail}"


@dataclass
class ReconcileReport:
    findings: list[Finding] = field(default_factory=list)
    accounts: int = 0
    ledger_rows: int = 0
    orders: dict[str, int] = field(default_factory=dict)  # by status
    debits: int = 0

    @property
    def ok(self) -> bool:
        return not self.findings

    def of_kind(self, kind: str) -> list[Finding]:
        return [finding for finding in self.findings if finding.kind == kind]

    def render(self, *, limit: int = 50) -> str:
        """The report a person reads: what was compared, then each finding (at most `limit`
        per kind, with how many more)."""
        statuses = ", ".join(f"{n} {status}" for status, n in sorted(self.orders.items()))
        lines = [
            f"accounts: {self.accounts} (ledger rows: {self.ledger_rows})",
            f"orders: {sum(self.orders.values())} ({statuses or 'none'})",
            f"debits: {self.debits}",
        ]
        if self.ok:
            lines.append("OK: no mismatch")
            return "\n".join(lines)
        kinds: dict[str, list[Finding]] = {}
        for finding in self.findings:
            kinds.setdefault(finding.kind, []).append(finding)
        lines.append(f"MISMATCH: {len(self.findings)} findings")
        for kind, found in kinds.items():
            lines.append(f"{kind} ({len(found)}):")
            lines += [f"  {finding.subject}: {finding.detail}" for finding in found[:limit]]
            if len(found) > limit:
                lines.append(f"  … and {len(found) - limit} more")
        return "\n".join(lines)


async def _read(conn: AsyncConnection, sql: str, **params: Any) -> list[Any]:
    return list((await conn.execute(text(sql), params)).all())


async def _snapshot(engine: AsyncEngine) -> AsyncConnection:
    """A connection in a read-only REPEATABLE READ transaction: one snapshot of a database."""
    conn = await engine.connect()
    await conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
    await conn.begin()
    return conn


async def check(
    orders_engine: AsyncEngine,
    payments_engine: AsyncEngine,
    *,
    stuck_after: timedelta,
    users: Sequence[str] | None = None,
) -> ReconcileReport:
    """Every check of the module docstring; `users` limits them to those accounts' data."""
    report = ReconcileReport()
    found = report.findings
    # `users=None` is everyone; otherwise only those users' rows.
    params: dict[str, Any] = {"everyone": users is None, "users": list(users or ())}

    conn = await _snapshot(orders_engine)
    try:
        orders = await _read(
            conn,
            "SELECT id, user_id, amount, status, "
            "created_at < now() - CAST(:stuck AS interval) AS stuck FROM orders "
            "WHERE (CAST(:everyone AS boolean) OR user_id = ANY(CAST(:users AS text[])))",
            stuck=stuck_after,
            **params,
        )
        order_failed = await _read(
            conn, "SELECT count(*) FROM order_outbox WHERE status = 'FAILED'"
        )
        await conn.rollback()
    finally:
        await conn.close()

    conn = await _snapshot(payments_engine)
    try:
        accounts = await _read(
            conn,
            "SELECT a.user_id, a.balance, count(l.id) AS entries, "
            "coalesce(sum(CASE l.kind WHEN 'DEPOSIT' THEN l.amount ELSE -l.amount END), 0) "
            "AS ledger, coalesce(min(l.balance_after), 0) AS lowest "
            "FROM accounts a LEFT JOIN account_ledger l ON l.account_id = a.id "
            "WHERE (CAST(:everyone AS boolean) OR a.user_id = ANY(CAST(:users AS text[]))) "
            "GROUP BY a.id, a.user_id, a.balance "
            "ORDER BY a.user_id",
            **params,
        )
        debits = await _read(
            conn,
            "SELECT order_id, count(*) AS n, sum(amount) AS amount, min(user_id) AS user_id "
            "FROM account_ledger WHERE kind = 'DEBIT' "
            "AND (CAST(:everyone AS boolean) OR user_id = ANY(CAST(:users AS text[]))) "
            "GROUP BY order_id",
            **params,
        )
        payment_failed = await _read(
            conn, "SELECT count(*) FROM payment_outbox WHERE status = 'FAILED'"
        )
        await conn.rollback()
    finally:
        await conn.close()

    # Money: balance = its ledger, never negative.
    report.accounts = len(accounts)
    for user_id, balance, entries, ledger, lowest in accounts:
        report.ledger_rows += entries
        if balance != ledger:
            found.append(
                Finding(
                    BALANCE_MISMATCH,
                    user_id,
                    f"balance {balance} but the ledger sums to {ledger} "
                    f"(off by {balance - ledger})",
                )
            )
        if balance < 0 or lowest < 0:
            found.append(Finding(NEGATIVE_BALANCE, user_id, f"balance {balance}, lowest {lowest}"))

    # Orders against debits.
    by_id = {row.id: row for row in orders}
    for row in orders:
        report.orders[row.status] = report.orders.get(row.status, 0) + 1
    debit_of: dict[uuid.UUID, tuple[int, Decimal, str]] = {
        order_id: (n, amount, user_id) for order_id, n, amount, user_id in debits
    }
    report.debits = sum(n for n, _, _ in debit_of.values())
    for order_id, (n, amount, user_id) in debit_of.items():
        if n > 1:
            found.append(Finding(DEBITED_TWICE, str(order_id), f"{n} debits totalling {amount}"))
        order = by_id.get(order_id)
        if order is not None and n == 1 and (amount, user_id) != (order.amount, order.user_id):
            found.append(
                Finding(
                    DEBIT_MISMATCH,
                    str(order_id),
                    f"debit of {amount} from {user_id}, order of {order.amount} by {order.user_id}",
                )
            )
    for row in orders:
        n = debit_of.get(row.id, (0, Decimal(0), ""))[0]
        if row.status == FINISHED and n != 1:
            found.append(
                Finding(FINISHED_NOT_DEBITED_ONCE, str(row.id), f"FINISHED with {n} debits")
            )
        elif row.status == CANCELLED and n != 0:
            found.append(Finding(CANCELLED_WITH_DEBIT, str(row.id), f"CANCELLED with {n} debits"))
        elif row.status == NEW and row.stuck:
            found.append(Finding(STUCK_ORDER, str(row.id), f"NEW for more than {stuck_after}"))
    unknown = [order_id for order_id in debit_of if order_id not in by_id]
    if unknown:
        # Orders created after the first read: look again before calling a debit orphaned.
        async with orders_engine.connect() as conn:
            known = {
                order_id
                for (order_id,) in await _read(
                    conn, "SELECT id FROM orders WHERE id = ANY(:ids)", ids=unknown
                )
            }
        for order_id in unknown:
            if order_id not in known:
                found.append(
                    Finding(DEBIT_WITHOUT_ORDER, str(order_id), "a debit for no known order")
                )

    for table, rows in (("order_outbox", order_failed), ("payment_outbox", payment_failed)):
        if rows[0][0] and users is None:  # outbox rows are not all by user: only unscoped
            found.append(
                Finding(
                    FAILED_OUTBOX,
                    table,
                    f"{rows[0][0]} FAILED rows (gozon <service> outbox requeue-failed)",
                )
            )
    return report


async def reconcile(
    orders_url: str,
    payments_url: str,
    *,
    stuck_after: timedelta,
    users: Sequence[str] | None = None,
) -> ReconcileReport:
    """`check` over the two databases at these SQLAlchemy URLs (`postgresql+asyncpg://…`)."""
    orders_engine = create_engine(orders_url, pool_size=1, application_name="gozon-reconcile")
    payments_engine = create_engine(payments_url, pool_size=1, application_name="gozon-reconcile")
    try:
        return await check(orders_engine, payments_engine, stuck_after=stuck_after, users=users)
    finally:
        await orders_engine.dispose()
        await payments_engine.dispose()
