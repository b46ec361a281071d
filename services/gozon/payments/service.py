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

import asyncpg
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gozon.core.errors import RetryLater
from gozon.payments import decisions, queries
from gozon.payments.decisions import AccountState, Decided, Decision, OrderToPay
from gozon.payments.metrics import CAS_CONFLICTS
from gozon.payments.models import DEPOSIT, MAX_BALANCE, Account, LedgerEntry

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


@dataclass(frozen=True)
class Deposited:
    entry: LedgerEntry
    replayed: bool


def cas_backoff(attempt: int) -> float:
    """Full jitter: a random pause up to base·2^attempt, at most CAS_BACKOFF_MAX seconds."""
    ceiling = min(CAS_BACKOFF_MAX, CAS_BACKOFF_BASE * 2**attempt)
    return random.uniform(0, ceiling)  # noqa: S311 (spreading retries, not a secret)


async def credit(session: AsyncSession, *, user_id: str, amount: Decimal) -> Balance:
    """Adds `amount` to the user's balance by compare-and-swap.

    Runs in the caller's transaction (READ COMMITTED: each read sees the latest commit).
    Raises AccountNotFound, BalanceLimitExceeded or AccountBusy, having changed nothing.
    """
    for attempt in range(CAS_ATTEMPTS):
        seen = (
            await session.execute(
                select(Account.id, Account.balance, Account.version).where(
                    Account.user_id == user_id
                )
            )
        ).one_or_none()
        if seen is None:
            raise AccountNotFound(user_id)
        if seen.balance + amount > MAX_BALANCE:
            raise BalanceLimitExceeded(user_id)
        swapped = (
            await session.execute(
                update(Account)
                .where(
                    Account.id == seen.id,
                    Account.version == seen.version,
                    Account.balance + amount <= MAX_BALANCE,
                )
                .values(
                    balance=Account.balance + amount,
                    version=Account.version + 1,
                    updated_at=func.now(),
                )
                .returning(Account.balance)
                .execution_options(synchronize_session=False)
            )
        ).scalar_one_or_none()
        if swapped is not None:
            return Balance(seen.id, swapped)
        CAS_CONFLICTS.labels("deposit").inc()
        await asyncio.sleep(cas_backoff(attempt))
    raise AccountBusy(f"the balance of {user_id} changed under {CAS_ATTEMPTS} attempts")


async def create_account(*, sessions: async_sessionmaker[AsyncSession], user_id: str) -> Account:
    async with sessions() as session, session.begin():
        account: Account | None = await session.scalar(
            insert(Account)
            .values(id=uuid.uuid4(), user_id=user_id)
            .on_conflict_do_nothing(index_elements=[Account.user_id])
            .returning(Account)
        )
    if account is None:
        raise AccountExists(user_id)
    return account


async def get_account(
    *, sessions: async_sessionmaker[AsyncSession], user_id: str
) -> Account | None:
    async with sessions() as session:
        return await session.scalar(select(Account).where(Account.user_id == user_id))


async def deposit(
    *,
    sessions: async_sessionmaker[AsyncSession],
    user_id: str,
    amount: Decimal,
    idempotency_key: str | None,
) -> Deposited:
    """Credits the user's account, creating it on the first deposit."""
    try:
        return await _deposit(sessions, user_id, amount, idempotency_key)
    except _KeyTakenMeanwhile:
        # The other request has committed: this attempt now finds its deposit and replays it.
        return await _deposit(sessions, user_id, amount, idempotency_key)


async def _deposit(
    sessions: async_sessionmaker[AsyncSession],
    user_id: str,
    amount: Decimal,
    idempotency_key: str | None,
) -> Deposited:
    async with sessions() as session, session.begin():
        await session.execute(
            insert(Account)
            .values(id=uuid.uuid4(), user_id=user_id)
            .on_conflict_do_nothing(index_elements=[Account.user_id])
        )
        if idempotency_key is not None:
            first = await session.scalar(
                select(LedgerEntry)
                .join(Account)
                .where(Account.user_id == user_id, LedgerEntry.idempotency_key == idempotency_key)
            )
            if first is not None:
                if first.amount != amount:
                    raise IdempotencyKeyReused(idempotency_key)
                return Deposited(first, replayed=True)
        changed = await credit(session, user_id=user_id, amount=amount)
        entry = await session.scalar(
            insert(LedgerEntry)
            .values(
                account_id=changed.account_id,
                user_id=user_id,
                kind=DEPOSIT,
                amount=amount,
                balance_after=changed.balance,
                idempotency_key=idempotency_key,
            )
            .on_conflict_do_nothing(
                index_elements=[LedgerEntry.account_id, LedgerEntry.idempotency_key],
                index_where=LedgerEntry.idempotency_key.is_not(None),
            )
            .returning(LedgerEntry)
        )
        if entry is None:
            raise _KeyTakenMeanwhile(idempotency_key)  # rolls this credit back
    return Deposited(entry, replayed=False)


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
