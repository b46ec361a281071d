"""The transactional outbox: an event is a row written in the same transaction as the change.

Guarantee: the event exists if and only if the business change committed. The relay
(`gozon.messaging.relay`) publishes it at least once afterwards; consumers deduplicate by
`event_id`. Each service has its own outbox table (`order_outbox`, `payment_outbox`) with the
spec's columns plus the relay's columns defined here; the W3C trace context of the writing
transaction is stored in `headers` and sent as Kafka headers.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

PENDING, SENT, FAILED = "PENDING", "SENT", "FAILED"


def outbox_table(name: str, metadata: MetaData, *service_columns: Column[Any]) -> Table:
    """An outbox table: the relay's columns plus the service's own (the spec's) columns."""
    return Table(
        name,
        metadata,
        Column("id", BigInteger, Identity(), primary_key=True),
        *service_columns,
        Column("topic", String(249), nullable=False),
        Column("message_key", String(255), nullable=False),
        Column("payload", JSONB, nullable=False),
        Column("headers", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
        Column("status", String(16), nullable=False, server_default=PENDING),
        Column("attempts", Integer, nullable=False, server_default="0"),
        Column("last_error", Text),
        Column(
            "next_attempt_at", DateTime(timezone=True), nullable=False, server_default=func.now()
        ),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("sent_at", DateTime(timezone=True)),
        CheckConstraint(f"status IN ('{PENDING}', '{SENT}', '{FAILED}')", name="status"),
        # The relay's claim query walks only pending rows, in id order.
        Index(f"ix_{name}_pending", "id", postgresql_where=text(f"status = '{PENDING}'")),
        # Pruning finds old sent rows without scanning the pending ones.
        Index(f"ix_{name}_sent_at", "sent_at", postgresql_where=text(f"status = '{SENT}'")),
    )
