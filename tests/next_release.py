"""The next release's migrations, as the tests stand them in: each service's own history copied
to a folder of the test's, plus one expand-only revision on top of today's head.

An expand-only revision adds what the next release's code will use (a nullable column on each
table the code writes, a new table) and changes or drops nothing, so today's code must keep
working on it (docs/adr/0101-expand-contract-migrations.md). The tests migrate a database with
it and then run today's gate, `migrate` and processes against that newer schema.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from alembic.script import ScriptDirectory

SERVICES = Path(__file__).resolve().parent.parent / "services" / "gozon"
NEXT_REVISION = "9001"

# service -> (tables that get a nullable column, the new table)
_EXPAND = {
    "orders": (("orders", "order_outbox"), "order_gift_notes"),
    "payments": (("accounts", "account_ledger", "payment_inbox", "payment_outbox"), "payouts"),
}

_TEMPLATE = '''"""next release: expand only ({tables} get a nullable column; {new} is new)

Revision ID: {revision}
Revises: {down}
"""

import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in {tables!r}:
        op.add_column(table, sa.Column("next_release_note", sa.Text(), nullable=True))
    op.create_table(
        "{new}",
        sa.Column("id", sa.BigInteger(), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    )


def downgrade() -> None:
    op.drop_table("{new}")
    for table in {tables!r}:
        op.drop_column(table, "next_release_note")
'''


def shipped_migrations(service: str) -> Path:
    return SERVICES / service / "migrations"


def head(service: str) -> str:
    (only,) = ScriptDirectory(str(shipped_migrations(service))).get_heads()
    return only


def next_release_migrations(service: str, folder: Path) -> Path:
    """A script location in `folder`: today's history of `service` plus revision 9001, an
    expand-only migration whose down revision is today's head."""
    target = folder / f"{service}-next-migrations"
    shutil.copytree(
        shipped_migrations(service), target, ignore=shutil.ignore_patterns("__pycache__")
    )
    tables, new = _EXPAND[service]
    (target / "versions" / f"{NEXT_REVISION}_next_release_expand.py").write_text(
        _TEMPLATE.format(revision=NEXT_REVISION, down=head(service), tables=tables, new=new)
    )
    return target
