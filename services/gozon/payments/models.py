"""The payments database (`account_db`): accounts, their ledger, the inbox and the outbox.

What the database itself guarantees, whatever the code does:
- one account per user, and a balance that never leaves [0, MAX_BALANCE] (a CHECK);
- the ledger is append-only (triggers refuse UPDATE, DELETE and TRUNCATE: migration 0002)
  and holds one DEBIT per order at most (a partial unique index) and one deposit per
  (account, Idempotency-Key) (another);
- one inbox row per event id (its primary key), so an event is recorded once;
- one payment decision per order (`payment_decisions`, keyed by the order id), so whatever
  envelope an order arrives in, it is decided once (migration 0003).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Numeric,
    String,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from gozon.core.db import new_metadata
from gozon.messaging.outbox import outbox_table
from gozon.payments.decisions import ACCOUNT_NOT_FOUND, INSUFFICIENT_FUNDS, PAID

MAX_BALANCE = Decimal("9999999999999.99")
"""The largest balance: 15 significant digits, so a balance travels as an exact JSON number."""


DEPOSIT, DEBIT = "DEPOSIT", "DEBIT"


class Base(DeclarativeBase):
    metadata = new_metadata()


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[str] = mapped_column(String(64), unique=True)
    balance: Mapped[Decimal] = mapped_column(Numeric(19, 2), server_default="0")
    # Compare-and-swap: every balance change is `… WHERE version = :seen`, then version + 1.
    version: Mapped[int] = mapped_column(BigInteger, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        CheckConstraint(f"balance >= 0 AND balance <= {MAX_BALANCE}", name="balance_in_range"),
    )


class LedgerEntry(Base):
    """One balance change, written in the transaction that made it: the balance's history."""

    __tablename__ = "account_ledger"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id"))
    user_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    amount: Mapped[Decimal] = mapped_column(Numeric(19, 2))
    balance_after: Mapped[Decimal] = mapped_column(Numeric(19, 2))
    order_id: Mapped[uuid.UUID | None] = mapped_column()
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        CheckConstraint(f"kind IN ('{DEPOSIT}', '{DEBIT}')", name="kind"),
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("balance_after >= 0", name="balance_after_not_negative"),
        CheckConstraint(f"kind <> '{DEBIT}' OR order_id IS NOT NULL", name="debit_has_order"),
        Index("ix_account_ledger_account_id_id", "account_id", "id"),
        # Belt and braces behind the inbox: the database refuses a second debit of one order.
        Index(
            "uq_account_ledger_debit_order_id",
            "order_id",
            unique=True,
            postgresql_where=text(f"kind = '{DEBIT}'"),
        ),
        # A retried deposit with the same Idempotency-Key finds its first entry here.
        Index(
            "uq_account_ledger_account_id_idempotency_key",
            "account_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )


class InboxEntry(Base):
    """One consumed `OrderCreated` event, keyed by its event id, with the payment's outcome."""

    __tablename__ = "payment_inbox"

    idempotency_key: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    order_id: Mapped[uuid.UUID] = mapped_column()
    user_id: Mapped[str] = mapped_column(String(64))
    amount: Mapped[Decimal] = mapped_column(Numeric(19, 2))
    # NULL only inside the handler's open transaction: the outcome is set before it commits.
    status: Mapped[str | None] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    processed_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )

    __table_args__ = (
        CheckConstraint(
            f"status IN ('{PAID}', '{INSUFFICIENT_FUNDS}', '{ACCOUNT_NOT_FOUND}')", name="status"
        ),
        Index("ix_payment_inbox_order_id", "order_id"),
    )


class PaymentDecision(Base):
    """The one outcome of an order's payment; every later event about the order gets it again."""

    __tablename__ = "payment_decisions"

    order_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64))
    amount: Mapped[Decimal] = mapped_column(Numeric(19, 2))
    # NULL only inside the deciding transaction: the outcome is set before it commits.
    status: Mapped[str | None] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    event_id: Mapped[uuid.UUID] = mapped_column(comment="The event that decided it.")
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        CheckConstraint(
            f"status IN ('{PAID}', '{INSUFFICIENT_FUNDS}', '{ACCOUNT_NOT_FOUND}')", name="status"
        ),
    )


payment_outbox = outbox_table(
    "payment_outbox",
    Base.metadata,
    Column("order_id", Uuid, nullable=False),
    Column("user_id", String(64), nullable=False),
)
