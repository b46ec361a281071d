"""accounts, account_ledger, payment_inbox and payment_outbox

Revision ID: 0001
Revises:
Create Date: 2026-11-24 11:50:36.831224
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("balance", sa.Numeric(precision=19, scale=2), server_default="0", nullable=False),
        sa.Column("version", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "balance >= 0 AND balance <= 9999999999999.99",
            name=op.f("ck_accounts_balance_in_range"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint("user_id", name=op.f("uq_accounts_user_id")),
    )
    op.create_table(
        "payment_inbox",
        sa.Column("idempotency_key", sa.Uuid(), nullable=False),
        sa.Column("order_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("amount", sa.Numeric(precision=19, scale=2), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column(
            "processed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "status IN ('PAID', 'INSUFFICIENT_FUNDS', 'ACCOUNT_NOT_FOUND')",
            name=op.f("ck_payment_inbox_status"),
        ),
        sa.PrimaryKeyConstraint("idempotency_key", name=op.f("pk_payment_inbox")),
    )
    op.create_index("ix_payment_inbox_order_id", "payment_inbox", ["order_id"], unique=False)
    op.create_table(
        "payment_outbox",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("order_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("topic", sa.String(length=249), nullable=False),
        sa.Column("message_key", sa.String(length=255), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "headers",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("status", sa.String(length=16), server_default="PENDING", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('PENDING', 'SENT', 'FAILED')", name=op.f("ck_payment_outbox_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payment_outbox")),
    )
    op.create_index(
        "ix_payment_outbox_pending",
        "payment_outbox",
        ["id"],
        unique=False,
        postgresql_where=sa.text("status = 'PENDING'"),
    )
    op.create_index(
        "ix_payment_outbox_sent_at",
        "payment_outbox",
        ["sent_at"],
        unique=False,
        postgresql_where=sa.text("status = 'SENT'"),
    )
    op.create_table(
        "account_ledger",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.Numeric(precision=19, scale=2), nullable=False),
        sa.Column("balance_after", sa.Numeric(precision=19, scale=2), nullable=False),
        sa.Column("order_id", sa.Uuid(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "kind <> 'DEBIT' OR order_id IS NOT NULL",
            name=op.f("ck_account_ledger_debit_has_order"),
        ),
        sa.CheckConstraint("kind IN ('DEPOSIT', 'DEBIT')", name=op.f("ck_account_ledger_kind")),
        sa.CheckConstraint("amount > 0", name=op.f("ck_account_ledger_amount_positive")),
        sa.CheckConstraint(
            "balance_after >= 0", name=op.f("ck_account_ledger_balance_after_not_negative")
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_account_ledger_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_account_ledger")),
    )
    op.create_index(
        "ix_account_ledger_account_id_id", "account_ledger", ["account_id", "id"], unique=False
    )
    op.create_index(
        "uq_account_ledger_account_id_idempotency_key",
        "account_ledger",
        ["account_id", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.create_index(
        "uq_account_ledger_debit_order_id",
        "account_ledger",
        ["order_id"],
        unique=True,
        postgresql_where=sa.text("kind = 'DEBIT'"),
    )


def downgrade() -> None:
    op.drop_index(
        "uq_account_ledger_debit_order_id",
        table_name="account_ledger",
        postgresql_where=sa.text("kind = 'DEBIT'"),
    )
    op.drop_index(
        "uq_account_ledger_account_id_idempotency_key",
        table_name="account_ledger",
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.drop_index("ix_account_ledger_account_id_id", table_name="account_ledger")
    op.drop_table("account_ledger")
    op.drop_index(
        "ix_payment_outbox_sent_at",
        table_name="payment_outbox",
        postgresql_where=sa.text("status = 'SENT'"),
    )
    op.drop_index(
        "ix_payment_outbox_pending",
        table_name="payment_outbox",
        postgresql_where=sa.text("status = 'PENDING'"),
    )
    op.drop_table("payment_outbox")
    op.drop_index("ix_payment_inbox_order_id", table_name="payment_inbox")
    op.drop_table("payment_inbox")
    op.drop_table("accounts")
