"""the ledger is append-only: the database refuses UPDATE, DELETE and TRUNCATE on it

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 13:05:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION account_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'account_ledger is append-only: % refused', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER account_ledger_append_only BEFORE UPDATE OR DELETE ON account_ledger "
        "FOR EACH ROW EXECUTE FUNCTION account_ledger_append_only()"
    )
    op.execute(
        "CREATE TRIGGER account_ledger_no_truncate BEFORE TRUNCATE ON account_ledger "
        "FOR EACH STATEMENT EXECUTE FUNCTION account_ledger_append_only()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER account_ledger_no_truncate ON account_ledger")
    op.execute("DROP TRIGGER account_ledger_append_only ON account_ledger")
    op.execute("DROP FUNCTION account_ledger_append_only()")
