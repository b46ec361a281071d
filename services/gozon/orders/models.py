"""The orders database (`order_db`): `orders` and `order_outbox`, with the spec's columns."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Numeric,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from gozon.core.db import new_metadata
from gozon.messaging.outbox import outbox_table

NEW, FINISHED, CANCELLED = "NEW", "FINISHED", "CANCELLED"


class Base(DeclarativeBase):
    metadata = new_metadata()


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[str] = mapped_column(String(64))
    amount: Mapped[Decimal] = mapped_column(Numeric(19, 2))
    description: Mapped[str] = mapped_column(String(500))
    status: Mapped[str] = mapped_column(String(16), server_default=NEW)
    cancel_reason: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint(f"status IN ('{NEW}', '{FINISHED}', '{CANCELLED}')", name="status"),
        Index("ix_orders_user_id_created_at", "user_id", text("created_at DESC"), text("id DESC")),
        # The stuck-orders gauge counts old NEW orders at every scrape: only NEW ones indexed.
        Index("ix_orders_new_created_at", "created_at", postgresql_where=text(f"status = '{NEW}'")),
        Index(
            "uq_orders_user_id_idempotency_key",
            "user_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )


order_outbox = outbox_table(
    "order_outbox",
    Base.metadata,
    Column("aggregate_id", String(64), nullable=False),
    Column("event_type", String(64), nullable=False),
)
