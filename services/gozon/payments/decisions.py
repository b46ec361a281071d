"""The payment decision for a batch of order events: pure rules, no I/O (docs/payments.md).

`service.decide_order_payments` reads and writes; this module decides, from typed values:
- One decision per order: the first event about an order (offset order) decides it, if this
  transaction claimed it; every other event about it gets that decision, or the one stored
  before, back as a replay with nothing debited.
- Funds: one account's claimed orders are paid in offset order while the balance read covers
  them; the rest are cancelled for funds; an order of a user with no account is cancelled for
  that. A debit never takes a balance below zero.
- The compare-and-swap inputs: one swap per debited account (its id, the version read, the
  balance after its last debit), and everything the batch records, as one `BatchRecord` whose
  fields are `queries.SWAP_AND_RECORD`'s parameters in `$n` order.
- A lost round: the accounts whose swap lost are decided again against their new balance;
  those whose swap won keep their payments and debits (`settle`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Final, NamedTuple

from gozon.contracts import (
    PAYMENT_PROCESSED_TOPIC,
    PaymentProcessed,
    PaymentProcessedPayload,
    PaymentStatus,
)

PAID: Final = "PAID"
INSUFFICIENT_FUNDS: Final = "INSUFFICIENT_FUNDS"
ACCOUNT_NOT_FOUND: Final = "ACCOUNT_NOT_FOUND"
NO_ACCOUNT_REASON: Final = "The user has no payment account."
NO_FUNDS_REASON: Final = "Insufficient funds: the balance is below the amount."


@dataclass(frozen=True)
class OrderToPay:
    """What an `OrderCreated` event asks: pay `amount` from `user_id`'s account for the order.
    `trace_headers` travel with the answer."""

    event_id: uuid.UUID
    order_id: uuid.UUID
    user_id: str
    amount: Decimal
    trace_headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AccountState:
    """An account as read: the swap compares against `version`."""

    account_id: uuid.UUID
    balance: Decimal
    version: int


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


@dataclass(frozen=True)
class Debit:
    """A debit of one order, for its ledger row."""

    account_id: uuid.UUID
    user_id: str
    order_id: uuid.UUID
    amount: Decimal
    balance_after: Decimal


@dataclass(frozen=True)
class Swap:
    """One account's compare-and-swap: `balance` is written only if the version is `version`."""

    account_id: uuid.UUID
    version: int
    balance: Decimal


@dataclass(frozen=True)
class Plan:
    """One account's orders decided against its balance: their payments, the debits in offset
    order, and the swap that makes them (None when nothing is debited)."""

    payments: Mapping[uuid.UUID, Payment]
    debits: Sequence[Debit]
    swap: Swap | None


@dataclass(frozen=True)
class Decided:
    """What a batch decided."""

    decisions: list[Decision]
    """One per order event, in the events' order; `replayed` for every event but the one that
    decided its order here."""
    made: list[Decision]
    """The decisions made by this transaction, whose outcomes are still to be recorded."""
    debits: list[Debit]
    """The debits made, per account in the events' order."""


class BatchRecord(NamedTuple):
    """`queries.SWAP_AND_RECORD`'s parameters, in `$n` order (`*record` passes them): the swaps,
    then what the batch records — ledger rows, the decisions made, one inbox row and one
    `PaymentProcessed` answer per event."""

    ids: list[uuid.UUID]
    versions: list[int]
    balances: list[Decimal]
    debit_account_ids: list[uuid.UUID]
    debit_user_ids: list[str]
    debit_amounts: list[Decimal]
    debit_balances_after: list[Decimal]
    debit_order_ids: list[uuid.UUID]
    decided_order_ids: list[uuid.UUID]
    decided_statuses: list[str]
    decided_reasons: list[str | None]
    inbox_event_ids: list[uuid.UUID]
    inbox_order_ids: list[uuid.UUID]
    inbox_user_ids: list[str]
    inbox_amounts: list[Decimal]
    inbox_statuses: list[str]
    inbox_reasons: list[str | None]
    topic: str
    outbox_order_ids: list[uuid.UUID]
    outbox_user_ids: list[str]
    outbox_payloads: list[str]
    outbox_headers: list[str]


@dataclass(frozen=True)
class Round:
    """One round of a batch's decision: the plans of the accounts still to swap, the whole
    batch's decisions as they stand, and the statement's parameters."""

    plans: Mapping[str, Plan]
    decided: Decided
    record: BatchRecord


@dataclass(frozen=True)
class Batch:
    """A batch of order events (offset order) being decided: the orders this transaction
    claimed (with their decision time), the decisions stored before, the payments and debits
    of the accounts whose swap has won, and the users whose accounts are still to swap."""

    orders: Sequence[OrderToPay]
    claimed: Mapping[uuid.UUID, datetime]
    stored: Mapping[uuid.UUID, Decision]
    payments: Mapping[uuid.UUID, Payment]
    debits: Sequence[Debit]
    pending: Sequence[str]

    def to_pay(self) -> list[OrderToPay]:
        """The first event of each order claimed here, in offset order."""
        return [order for order in first_events(self.orders) if order.order_id in self.claimed]


def first_events(orders: Sequence[OrderToPay]) -> list[OrderToPay]:
    """The first event about each order, in offset order."""
    first: dict[uuid.UUID, OrderToPay] = {}
    for order in orders:
        first.setdefault(order.order_id, order)
    return list(first.values())


def claims(orders: Sequence[OrderToPay]) -> list[OrderToPay]:
    """The claims to make, one per order, in order-id order (so two batches claiming
    overlapping orders lock them in the same order)."""
    return sorted(first_events(orders), key=lambda order: order.order_id)


def unseen(
    orders: Sequence[OrderToPay],
    claimed: Collection[uuid.UUID],
    stored: Collection[uuid.UUID],
) -> list[uuid.UUID]:
    """The orders neither claimed here nor decided before: a concurrent claimer committed."""
    return [
        order.order_id
        for order in first_events(orders)
        if order.order_id not in claimed and order.order_id not in stored
    ]


def start(
    orders: Sequence[OrderToPay],
    claimed: Mapping[uuid.UUID, datetime],
    stored: Mapping[uuid.UUID, Decision],
) -> Batch:
    """The batch before its first round: every account with a claimed order is to swap."""
    batch = Batch(orders, claimed, stored, payments={}, debits=(), pending=())
    return replace(batch, pending=sorted({order.user_id for order in batch.to_pay()}))


def plan(account: AccountState | None, user_id: str, orders: Sequence[OrderToPay]) -> Plan:
    """The balance rule for one account's orders (offset order) against the balance read."""
    if account is None:
        unpaid = Payment(ACCOUNT_NOT_FOUND, NO_ACCOUNT_REASON)
        return Plan({order.order_id: unpaid for order in orders}, [], None)
    payments: dict[uuid.UUID, Payment] = {}
    debits: list[Debit] = []
    balance = account.balance
    for order in orders:
        if balance - order.amount < 0:
            payments[order.order_id] = Payment(INSUFFICIENT_FUNDS, NO_FUNDS_REASON)
            continue
        balance -= order.amount
        payments[order.order_id] = Payment(PAID)
        debits.append(Debit(account.account_id, user_id, order.order_id, order.amount, balance))
    swap = Swap(account.account_id, account.version, balance) if debits else None
    return Plan(payments, debits, swap)


def decide(batch: Batch, accounts: Mapping[str, AccountState]) -> Round:
    """A round: the pending accounts' orders decided against `accounts` (as read), with the
    settled accounts' payments, into every event's decision and the statement's parameters."""
    to_pay = batch.to_pay()
    by_user: dict[str, list[OrderToPay]] = {}
    for order in to_pay:
        by_user.setdefault(order.user_id, []).append(order)
    plans = {
        user_id: plan(accounts.get(user_id), user_id, by_user[user_id]) for user_id in batch.pending
    }
    payments = dict(batch.payments)
    debits = list(batch.debits)
    for planned in plans.values():
        payments.update(planned.payments)
        debits += planned.debits
    decided = _decided(batch, to_pay, payments, debits)
    swaps = [planned.swap for planned in plans.values() if planned.swap is not None]
    return Round(plans, decided, batch_record(swaps, decided, batch.orders))


def settle(batch: Batch, lost_round: Round, swapped: Collection[uuid.UUID]) -> Batch:
    """The batch after a round whose statement recorded nothing: the accounts whose swap won
    keep their payments and debits; those whose swap lost (`pending`) are to decide again."""
    payments = dict(batch.payments)
    debits = list(batch.debits)
    lost: list[str] = []
    for user_id in batch.pending:
        planned = lost_round.plans[user_id]
        if planned.swap is not None and planned.swap.account_id not in swapped:
            lost.append(user_id)
            continue
        payments.update(planned.payments)
        debits += planned.debits
    return replace(batch, payments=payments, debits=debits, pending=lost)


def _decided(
    batch: Batch,
    to_pay: Sequence[OrderToPay],
    payments: Mapping[uuid.UUID, Payment],
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
            decided_at=batch.claimed[order.order_id],
            replayed=False,
        )
        for order in to_pay
    }
    decisions: list[Decision] = []
    deciding = {(order.event_id, order.order_id) for order in to_pay}
    for order in batch.orders:
        decision = made.get(order.order_id) or batch.stored[order.order_id]
        key = (order.event_id, order.order_id)
        if key in deciding:
            deciding.discard(key)  # the deciding event; a redelivery of it later is a replay
        else:
            decision = replace(decision, replayed=True)
        decisions.append(decision)
    return Decided(decisions=decisions, made=list(made.values()), debits=debits)


def answer(decision: Decision) -> PaymentProcessed:
    """The `PaymentProcessed` event that tells the orders service a decision."""
    return PaymentProcessed(
        aggregate_id=str(decision.order_id),
        payload=PaymentProcessedPayload(
            order_id=decision.order_id,
            user_id=decision.user_id,
            amount=decision.amount,
            status=decision.status,
            reason=decision.reason,
            processed_at=decision.decided_at,
        ),
    )


def batch_record(
    swaps: Sequence[Swap], decided: Decided, orders: Sequence[OrderToPay]
) -> BatchRecord:
    """SWAP_AND_RECORD's parameters for the swaps and a decided batch of `orders` (offset
    order, one decision each)."""
    return BatchRecord(
        ids=[s.account_id for s in swaps],
        versions=[s.version for s in swaps],
        balances=[s.balance for s in swaps],
        debit_account_ids=[d.account_id for d in decided.debits],
        debit_user_ids=[d.user_id for d in decided.debits],
        debit_amounts=[d.amount for d in decided.debits],
        debit_balances_after=[d.balance_after for d in decided.debits],
        debit_order_ids=[d.order_id for d in decided.debits],
        decided_order_ids=[d.order_id for d in decided.made],
        decided_statuses=[d.status for d in decided.made],
        decided_reasons=[d.reason for d in decided.made],
        inbox_event_ids=[o.event_id for o in orders],
        inbox_order_ids=[o.order_id for o in orders],
        inbox_user_ids=[o.user_id for o in orders],
        inbox_amounts=[o.amount for o in orders],
        inbox_statuses=[d.status for d in decided.decisions],
        inbox_reasons=[d.reason for d in decided.decisions],
        topic=PAYMENT_PROCESSED_TOPIC,
        outbox_order_ids=[d.order_id for d in decided.decisions],
        outbox_user_ids=[d.user_id for d in decided.decisions],
        outbox_payloads=[answer(d).model_dump_json() for d in decided.decisions],
        outbox_headers=[json.dumps(dict(o.trace_headers)) for o in orders],
    )
