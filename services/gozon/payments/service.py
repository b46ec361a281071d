"""The payments rules: accounts, deposits and order debits.

Guarantees:
- Every balance change is a compare-and-swap, `UPDATE accounts … WHERE id = :id AND
  version = :seen`, that bumps the version. When another change got in first, the account is
  read again and the swap retried, at most `CAS_ATTEMPTS` times with a short jittered backoff
  (each lost swap is counted); then `AccountBusy` is raised and nothing is written.
- Every change writes its `account_ledger` row in the same transaction, so at every commit the
  deposits minus the debits in the ledger equal the balance.
- A balance stays within [0, MAX_BALANCE]: checked here for a clear answer, and by the
  database's CHECK whatever happens.
- A deposit with an Idempotency-Key credits once: a retry with the same key and amount answers
  with the first deposit's result; the same key with another amount is refused.
- One payment decision per order: `decide_order_payment` claims the order's
  `payment_decisions` row first (`ON CONFLICT DO NOTHING` on the order id; a concurrent claim
  waits for the first transaction, then finds its row). Only the claim's winner debits; any
  other event about the order, in the same or a new envelope, gets the stored decision and
  debits nothing — a CANCELLED order stays unpaid after a top-up, a FINISHED one is not paid
  twice.
- `pay_for_order` and `decide_order_payment` work inside the caller's transaction (the
  consumer's, which also holds the inbox and outbox rows) and write nothing when the order
  cannot be paid.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gozon.contracts import PaymentStatus
from gozon.core.errors import RetryLater
from gozon.payments.metrics import CAS_CONFLICTS
from gozon.payments.models import (
    ACCOUNT_NOT_FOUND,
    DEBIT,
    DEPOSIT,
    INSUFFICIENT_FUNDS,
    MAX_BALANCE,
    PAID,
    Account,
    LedgerEntry,
    PaymentDecision,
)

CAS_ATTEMPTS = 20
CAS_BACKOFF_BASE = 0.001
CAS_BACKOFF_MAX = 0.050


class AccountExists(Exception):
    """The user already has an account."""


class AccountNotFound(Exception):
    """The user has no account."""


class InsufficientFunds(Exception):
    """The balance is less than the amount to debit."""


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


@dataclass(frozen=True)
class Payment:
    status: PaymentStatus
    reason: str | None = None


@dataclass(frozen=True)
class Decision:
    """An order's payment decision; `replayed` when it was made for an earlier event."""

    order_id: uuid.UUID
    user_id: str
    amount: Decimal
    status: PaymentStatus
    reason: str | None
    decided_at: datetime
    replayed: bool


def cas_backoff(attempt: int) -> float:
    """Full jitter: a random pause up to base·2^attempt, at most CAS_BACKOFF_MAX seconds."""
    ceiling = min(CAS_BACKOFF_MAX, CAS_BACKOFF_BASE * 2**attempt)
    return random.uniform(0, ceiling)  # noqa: S311 (spreading retries, not a secret)


async def change_balance(
    session: AsyncSession, *, user_id: str, delta: Decimal, operation: str
) -> Balance:
    """Adds `delta` (negative: a debit) to the user's balance by compare-and-swap.

    Runs in the caller's transaction (READ COMMITTED: each read sees the latest commit).
    Raises AccountNotFound, InsufficientFunds, BalanceLimitExceeded or AccountBusy, having
    changed nothing.
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
        if seen.balance + delta < 0:
            raise InsufficientFunds(user_id)
        if seen.balance + delta > MAX_BALANCE:
            raise BalanceLimitExceeded(user_id)
        swapped = (
            await session.execute(
                update(Account)
                .where(
                    Account.id == seen.id,
                    Account.version == seen.version,
                    (Account.balance + delta).between(0, MAX_BALANCE),
                )
                .values(
                    balance=Account.balance + delta,
                    version=Account.version + 1,
                    updated_at=func.now(),
                )
                .returning(Account.balance)
                .execution_options(synchronize_session=False)
            )
        ).scalar_one_or_none()
        if swapped is not None:
            return Balance(seen.id, swapped)
        CAS_CONFLICTS.labels(operation).inc()
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
        changed = await change_balance(session, user_id=user_id, delta=amount, operation="deposit")
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


async def pay_for_order(
    session: AsyncSession, *, order_id: uuid.UUID, user_id: str, amount: Decimal
) -> Payment:
    """Debits the order's amount in the caller's transaction, or says why it cannot."""
    try:
        changed = await change_balance(session, user_id=user_id, delta=-amount, operation="debit")
    except AccountNotFound:
        return Payment(ACCOUNT_NOT_FOUND, "The user has no payment account.")
    except InsufficientFunds:
        return Payment(INSUFFICIENT_FUNDS, "Insufficient funds: the balance is below the amount.")
    await session.execute(
        insert(LedgerEntry).values(
            account_id=changed.account_id,
            user_id=user_id,
            kind=DEBIT,
            amount=amount,
            balance_after=changed.balance,
            order_id=order_id,
        )
    )
    return Payment(PAID)


async def decide_order_payment(
    session: AsyncSession,
    *,
    event_id: uuid.UUID,
    order_id: uuid.UUID,
    user_id: str,
    amount: Decimal,
) -> Decision:
    """The order's one payment decision, in the caller's transaction.

    The first event about an order claims its decision row and pays (or not); every later one
    gets the stored decision back, with nothing debited.
    """
    claimed = await session.scalar(
        insert(PaymentDecision)
        .values(order_id=order_id, user_id=user_id, amount=amount, event_id=event_id)
        .on_conflict_do_nothing(index_elements=[PaymentDecision.order_id])
        .returning(PaymentDecision.decided_at)
    )
    if claimed is None:
        stored = await session.scalar(
            select(PaymentDecision).where(PaymentDecision.order_id == order_id)
        )
        assert stored is not None  # the conflicting claim has committed
        assert stored.status is not None  # and set its outcome before committing
        return Decision(
            order_id=order_id,
            user_id=stored.user_id,
            amount=stored.amount,
            status=stored.status,  # type: ignore[arg-type]  # the CHECK keeps it a PaymentStatus
            reason=stored.reason,
            decided_at=stored.decided_at,
            replayed=True,
        )
    payment = await pay_for_order(session, order_id=order_id, user_id=user_id, amount=amount)
    await session.execute(
        update(PaymentDecision)
        .where(PaymentDecision.order_id == order_id)
        .values(status=payment.status, reason=payment.reason)
    )
    return Decision(
        order_id=order_id,
        user_id=user_id,
        amount=amount,
        status=payment.status,
        reason=payment.reason,
        decided_at=claimed,
        replayed=False,
    )
