"""The payments rules: accounts, deposits and order debits (docs/payments.md).

Guarantees:
- Every balance change is a compare-and-swap on the account's version, retried with a short
  jittered backoff up to `CAS_ATTEMPTS` times, then `AccountBusy` with nothing written.
- Every change writes its `account_ledger` row in the same transaction: deposits minus debits
  equal the balance at every commit.
- A balance stays within [0, MAX_BALANCE]: checked here for a clear answer, and by the
  database's CHECK whatever happens.
- A deposit with an Idempotency-Key credits once; the same key with another amount is refused.
- One payment decision per order: `decide_order_payments` claims the orders'
  `payment_decisions` rows first; only the claim's winner debits, any other event about the
  order gets the stored decision (a CANCELLED order stays unpaid after a top-up, a FINISHED
  one is not paid twice).
- A batch is decided per account in offset order (paid while the balance lasts, else cancelled
  for funds), with one compare-and-swap per account for the whole batch, in the statement that
  writes the batch's records only when every swap won (`queries.SWAP_AND_RECORD`).
- The batch's rules are `decisions`' (no I/O); `decide_order_payments` reads what they need
  and writes what they decide, inside the caller's transaction.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from gozon.core.errors import RetryLater
from gozon.core.pg import Database
from gozon.payments import decisions, queries
from gozon.payments.decisions import AccountState, Decided, Decision, OrderToPay
from gozon.payments.metrics import CAS_CONFLICTS
from gozon.payments.models import MAX_BALANCE

CAS_ATTEMPTS = 20
CAS_BACKOFF_BASE = 0.001
CAS_BACKOFF_MAX = 0.050


class AccountExists(Exception):
    """The user already has an account."""


class AccountNotFound(Exception):
    """The user has no account."""


class BalanceLimitExceeded(Exception):
    """The change would take the balance over MAX_BALANCE."""


class IdempotencyKeyReused(Exception):
    """The key was used before for a deposit of another amount."""


class AccountBusy(RetryLater):
    """Every compare-and-swap lost to a concurrent change: nothing was written, retry later.

    The consumer runner retries a `RetryLater` for as long as it lasts, instead of
    dead-lettering an order because its account was busy; the API answers 503.
    """


class _KeyTakenMeanwhile(Exception):
    """A concurrent deposit with the same Idempotency-Key committed first."""


@dataclass(frozen=True)
class Balance:
    account_id: uuid.UUID
    balance: Decimal


Row = dict[str, Any]
"""A row as the API answers it: an account (`queries.ACCOUNT_COLUMNS`) or a ledger entry
(`queries.LEDGER_COLUMNS`)."""


@dataclass(frozen=True)
class Deposited:
    entry: Row
    replayed: bool


def cas_backoff(attempt: int) -> float:
    """Full jitter: a random pause up to base·2^attempt, at most CAS_BACKOFF_MAX seconds."""
    ceiling = min(CAS_BACKOFF_MAX, CAS_BACKOFF_BASE * 2**attempt)
    return random.uniform(0, ceiling)  # noqa: S311 (spreading retries, not a secret)


async def credit(conn: asyncpg.Connection, *, user_id: str, amount: Decimal) -> Balance:
    """Adds `amount` to the user's balance by compare-and-swap (`queries.CREDIT`).

    Runs in the caller's transaction (READ COMMITTED: each read sees the latest commit).
    Raises AccountNotFound, BalanceLimitExceeded or AccountBusy, having changed nothing.
    """
    for attempt in range(CAS_ATTEMPTS):
        seen = await conn.fetchrow(queries.READ_BALANCE, user_id)
        if seen is None:
            raise AccountNotFound(user_id)
        if seen["balance"] + amount > MAX_BALANCE:
            raise BalanceLimitExceeded(user_id)
        swapped = await conn.fetchval(
            queries.CREDIT, seen["id"], seen["version"], amount, MAX_BALANCE
        )
        if swapped is not None:
            return Balance(seen["id"], swapped)
        CAS_CONFLICTS.labels("deposit").inc()
        await asyncio.sleep(cas_backoff(attempt))
    raise AccountBusy(f"the balance of {user_id} changed under {CAS_ATTEMPTS} attempts")


async def create_account(*, db: Database, user_id: str) -> Row:
    rows = await db.write(queries.CREATE_ACCOUNT, (uuid.uuid4(), user_id))
    if not rows:
        raise AccountExists(user_id)
    return dict(rows[0])


async def get_account(*, db: Database, user_id: str) -> Row | None:
    rows = await db.read(queries.GET_ACCOUNT, (user_id,))
    return dict(rows[0]) if rows else None


async def deposit(
    *, db: Database, user_id: str, amount: Decimal, idempotency_key: str | None
) -> Deposited:
    """Credits the user's account, creating it on the first deposit."""
    try:
        return await _deposit(db, user_id, amount, idempotency_key)
    except _KeyTakenMeanwhile:
        # The other request has committed: this attempt now finds its deposit and replays it.
        return await _deposit(db, user_id, amount, idempotency_key)


async def _deposit(
    db: Database, user_id: str, amount: Decimal, idempotency_key: str | None
) -> Deposited:
    async with db.transaction() as conn:
        await conn.execute(queries.OPEN_ACCOUNT, uuid.uuid4(), user_id)
        if idempotency_key is not None:
            first = await conn.fetchrow(queries.DEPOSIT_BY_KEY, user_id, idempotency_key)
            if first is not None:
                if first["amount"] != amount:
                    raise IdempotencyKeyReused(idempotency_key)
                return Deposited(dict(first), replayed=True)
        changed = await credit(conn, user_id=user_id, amount=amount)
        entry = await conn.fetchrow(
            queries.RECORD_DEPOSIT,
            changed.account_id,
            user_id,
            amount,
            changed.balance,
            idempotency_key,
        )
        if entry is None:
            raise _KeyTakenMeanwhile(idempotency_key)  # rolls this credit back
    return Deposited(dict(entry), replayed=False)


async def decide_order_payments(conn: asyncpg.Connection, orders: Sequence[OrderToPay]) -> Decided:
    """Each order's one payment decision, for a batch of order events in offset order, made
    and recorded in the caller's transaction.

    The rules are `decisions`' (one decision per order, funds, the swaps' inputs); this
    function reads what they need and writes what they decide. The first event about an order
    claims its decision row and pays (or not); every later one, in this batch or after it,
    gets the stored decision back with nothing debited. The balances change by
    compare-and-swap, in the statement that also writes the batch's records when every swap
    won (`queries.SWAP_AND_RECORD`); an account whose swap loses to a concurrent change is read
    again and its orders decided again, at most `CAS_ATTEMPTS` times, then `AccountBusy` (the
    caller's transaction rolls back and the batch is retried).

    Runs on the caller's asyncpg connection, inside its transaction (the consumer's).
    Round trips: CLAIM_AND_READ and SWAP_AND_RECORD on the common path; STORED_DECISIONS when
    a concurrent transaction claimed an order meanwhile; READ_ACCOUNTS + SWAP_AND_RECORD
    again per lost round of swaps.
    """
    claims = decisions.claims(orders)
    claimed: dict[uuid.UUID, datetime] = {}
    stored: dict[uuid.UUID, Decision] = {}
    accounts: dict[str, AccountState] = {}
    for row in await conn.fetch(
        queries.CLAIM_AND_READ,
        [c.order_id for c in claims],
        [c.user_id for c in claims],
        [c.amount for c in claims],
        [c.event_id for c in claims],
        sorted({c.user_id for c in claims}),
    ):
        kind = row["kind"]
        if kind == "claimed":
            claimed[row["order_id"]] = row["decided_at"]
        elif kind == "stored":
            stored[row["order_id"]] = _stored(row)
        else:
            accounts[row["user_id"]] = _account(row)
    if unseen := decisions.unseen(orders, claimed, stored):
        # Claimed by a transaction that committed while the claim waited for it.
        for row in await conn.fetch(queries.STORED_DECISIONS, unseen):
            stored[row["order_id"]] = _stored(row)
        if missing := decisions.unseen(orders, claimed, stored):
            raise RuntimeError(f"orders neither claimed nor decided: {missing}")
    batch = decisions.start(orders, claimed, stored)
    for attempt in range(CAS_ATTEMPTS):
        if attempt:
            accounts = {
                row["user_id"]: _account(row)
                for row in await conn.fetch(queries.READ_ACCOUNTS, list(batch.pending))
            }
        round_ = decisions.decide(batch, accounts)
        result = await conn.fetchrow(queries.SWAP_AND_RECORD, *round_.record)
        if result is None:  # pragma: no cover (the statement always answers one row)
            raise RuntimeError("SWAP_AND_RECORD answered no row")
        if result["recorded"]:
            return round_.decided
        batch = decisions.settle(batch, round_, set(result["swapped"]))
        CAS_CONFLICTS.labels("debit").inc(len(batch.pending))
        await asyncio.sleep(cas_backoff(attempt))
    lost = list(batch.pending)
    raise AccountBusy(f"the balances of {lost} changed under {CAS_ATTEMPTS} attempts")


def _stored(row: asyncpg.Record) -> Decision:
    return Decision(
        order_id=row["order_id"],
        user_id=row["user_id"],
        amount=row["amount"],
        status=row["status"],
        reason=row["reason"],
        decided_at=row["decided_at"],
        replayed=True,
    )


def _account(row: asyncpg.Record) -> AccountState:
    return AccountState(row["account_id"], row["balance"], row["version"])
