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
- `pay_for_order` and `decide_order_payments` work inside the caller's transaction;
  `pay_for_order` writes nothing when the order cannot be paid.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal

import asyncpg
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gozon.contracts import PaymentStatus
from gozon.core.errors import RetryLater
from gozon.payments import queries
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


@dataclass(frozen=True)
class OrderToPay:
    """What an `OrderCreated` event asks: pay `amount` from `user_id`'s account for the order."""

    event_id: uuid.UUID
    order_id: uuid.UUID
    user_id: str
    amount: Decimal


@dataclass(frozen=True)
class Debit:
    """A debit made by `decide_order_payments`, for its ledger row."""

    account_id: uuid.UUID
    user_id: str
    order_id: uuid.UUID
    amount: Decimal
    balance_after: Decimal


@dataclass(frozen=True)
class Decided:
    """What `decide_order_payments` decided; the caller turns it into the rows the batch records
    (ledger rows, decision outcomes, and its own inbox and outbox rows), which are written by the
    same statement as the balances' compare-and-swap (`queries.SWAP_AND_RECORD`)."""

    decisions: list[Decision]
    """One per order event, in the events' order; `replayed` for every event but the one that
    decided its order here."""
    made: list[Decision]
    """The decisions made by this transaction, whose outcomes are still to be recorded."""
    debits: list[Debit]
    """The debits made, per account in the events' order."""


BatchRecords = Callable[[Decided], Mapping[str, object]]
"""The caller's part of SWAP_AND_RECORD's parameters for a decided batch (everything but the
swap's `ids`, `versions` and `balances`)."""


async def decide_order_payments(
    conn: asyncpg.Connection, orders: Sequence[OrderToPay], records: BatchRecords
) -> Decided:
    """Each order's one payment decision, for a batch of order events in offset order, made
    and recorded in the caller's transaction.

    The first event about an order claims its decision row and pays (or not); every later one,
    in this batch or after it, gets the stored decision back with nothing debited. The orders
    claimed here are debited per account in the events' order: each is paid if the balance
    left by the ones before it covers it, else cancelled for funds (nothing debited). The
    balances change by compare-and-swap, in the statement that also writes `records(decided)`
    when every swap won (`queries.SWAP_AND_RECORD`); an account whose swap loses to a
    concurrent change is read again and its orders decided again, at most `CAS_ATTEMPTS`
    times, then `AccountBusy` (the caller's transaction rolls back and the batch is retried).

    Runs on the caller's asyncpg connection, inside its transaction (the consumer's).
    Round trips: CLAIM_AND_READ and SWAP_AND_RECORD on the common path; STORED_DECISIONS when
    a concurrent transaction claimed an order meanwhile; READ_ACCOUNTS + SWAP_AND_RECORD
    again per lost round of swaps.
    """
    first: dict[uuid.UUID, OrderToPay] = {}
    for order in orders:
        first.setdefault(order.order_id, order)
    claims = sorted(first.values(), key=lambda order: order.order_id)
    claimed: dict[uuid.UUID, datetime] = {}
    stored: dict[uuid.UUID, Decision] = {}
    accounts: dict[str, asyncpg.Record] = {}
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
            accounts[row["user_id"]] = row
    unseen = [order_id for order_id in first if order_id not in claimed and order_id not in stored]
    if unseen:  # claimed by a transaction that committed while the claim waited for it
        for row in await conn.fetch(queries.STORED_DECISIONS, unseen):
            stored[row["order_id"]] = _stored(row)
        if missing := [order_id for order_id in unseen if order_id not in stored]:
            raise RuntimeError(f"orders neither claimed nor decided: {missing}")
    to_pay = [order for order_id, order in first.items() if order_id in claimed]  # offset order
    by_user: dict[str, list[OrderToPay]] = {}
    for order in to_pay:
        by_user.setdefault(order.user_id, []).append(order)
    payments: dict[uuid.UUID, Payment] = {}
    debits: list[Debit] = []
    pending = sorted(by_user)
    for attempt in range(CAS_ATTEMPTS):
        if attempt:
            accounts = {
                row["user_id"]: row for row in await conn.fetch(queries.READ_ACCOUNTS, pending)
            }
        planned = {
            user_id: _plan(accounts.get(user_id), user_id, by_user[user_id]) for user_id in pending
        }
        swaps = [
            (made[0].account_id, accounts[user_id]["version"], made[-1].balance_after)
            for user_id, (_, made) in planned.items()
            if made
        ]
        decided = _decided(
            orders,
            to_pay,
            claimed,
            stored,
            payments | {o: p for outcome, _ in planned.values() for o, p in outcome.items()},
            debits + [debit for _, made in planned.values() for debit in made],
        )
        params = {
            "ids": [s[0] for s in swaps],
            "versions": [s[1] for s in swaps],
            "balances": [s[2] for s in swaps],
            **records(decided),
        }
        result = await conn.fetchrow(
            queries.SWAP_AND_RECORD, *(params[name] for name in queries.SWAP_AND_RECORD_PARAMS)
        )
        if result is None:  # pragma: no cover (the statement always answers one row)
            raise RuntimeError("SWAP_AND_RECORD answered no row")
        if result["recorded"]:
            return decided
        swapped = set(result["swapped"])
        lost: list[str] = []
        for user_id in pending:
            outcome, made = planned[user_id]
            if made and made[0].account_id not in swapped:
                lost.append(user_id)
                continue
            payments.update(outcome)
            debits += made
        CAS_CONFLICTS.labels("debit").inc(len(lost))
        await asyncio.sleep(cas_backoff(attempt))
        pending = lost
    raise AccountBusy(f"the balances of {pending} changed under {CAS_ATTEMPTS} attempts")


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


def _plan(
    account: asyncpg.Record | None, user_id: str, orders: Sequence[OrderToPay]
) -> tuple[dict[uuid.UUID, Payment], list[Debit]]:
    """The balance rule for one account's orders (offset order) against the balance read:
    each order's payment, and the debits to make (the last one's balance is the new balance)."""
    outcome: dict[uuid.UUID, Payment] = {}
    made: list[Debit] = []
    if account is None:
        for order in orders:
            outcome[order.order_id] = Payment(ACCOUNT_NOT_FOUND, "The user has no payment account.")
        return outcome, made
    balance: Decimal = account["balance"]
    for order in orders:
        if balance - order.amount < 0:
            outcome[order.order_id] = Payment(
                INSUFFICIENT_FUNDS, "Insufficient funds: the balance is below the amount."
            )
            continue
        balance -= order.amount
        outcome[order.order_id] = Payment(PAID)
        made.append(Debit(account["account_id"], user_id, order.order_id, order.amount, balance))
    return outcome, made


def _decided(
    orders: Sequence[OrderToPay],
    to_pay: Sequence[OrderToPay],
    claimed: dict[uuid.UUID, datetime],
    stored: dict[uuid.UUID, Decision],
    payments: dict[uuid.UUID, Payment],
    debits: list[Debit],
) -> Decided:
    """Every event's decision (offset order) from the payments of the orders claimed here and
    the decisions stored before."""
    made = {
        order.order_id: Decision(
            order_id=order.order_id,
            user_id=order.user_id,
            amount=order.amount,
            status=payments[order.order_id].status,
            reason=payments[order.order_id].reason,
            decided_at=claimed[order.order_id],
            replayed=False,
        )
        for order in to_pay
    }
    decisions: list[Decision] = []
    deciding = {(order.event_id, order.order_id) for order in to_pay}
    for order in orders:
        decision = made.get(order.order_id) or stored[order.order_id]
        key = (order.event_id, order.order_id)
        if key in deciding:
            deciding.discard(key)  # the deciding event; a redelivery of it later is a replay
        else:
            decision = replace(decision, replayed=True)
        decisions.append(decision)
    return Decided(decisions=decisions, made=list(made.values()), debits=debits)
