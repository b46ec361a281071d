"""index NEW orders by age, for the stuck-orders gauge

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 12:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_orders_new_created_at",
        "orders",
        ["created_at"],
        unique=False,
        postgresql_where=sa.text("status = 'NEW'"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_orders_new_created_at", table_name="orders", postgresql_where=sa.text("status = 'NEW'")
    )
