"""payment_decisions: one payment decision per order, whatever event envelope it came in

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 13:40:00

Existing inbox rows are carried over: each order's earliest decided inbox row becomes its
decision, so an order decided before this migration is not decided again.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "payment_decisions",
        sa.Column("order_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("amount", sa.Numeric(precision=19, scale=2), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("event_id", sa.Uuid(), nullable=False, comment="The event that decided it."),
        sa.Column(
            "decided_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "status IN ('PAID', 'INSUFFICIENT_FUNDS', 'ACCOUNT_NOT_FOUND')",
            name=op.f("ck_payment_decisions_status"),
        ),
        sa.PrimaryKeyConstraint("order_id", name=op.f("pk_payment_decisions")),
    )
    op.execute(
        """
        INSERT INTO payment_decisions
            (order_id, user_id, amount, status, reason, event_id, decided_at)
        SELECT DISTINCT ON (order_id)
            order_id, user_id, amount, status, reason, idempotency_key, processed_at
        FROM payment_inbox
        WHERE status IS NOT NULL
        ORDER BY order_id, processed_at, idempotency_key
        """
    )


def downgrade() -> None:
    op.drop_table("payment_decisions")
