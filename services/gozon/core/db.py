"""SQLAlchemy's side: the models' metadata, and the engine of the migrations and the
command-line tools (`gozon … outbox`, `gozon reconcile`).

The APIs, the consumers and the relays never use it: they run on asyncpg (`gozon.core.pg`,
which also says what a database failure means; docs/adr/0015-one-data-path.md).
"""

from __future__ import annotations

from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

# Stable constraint names, so that migrations can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_metadata() -> MetaData:
    return MetaData(naming_convention=NAMING_CONVENTION)


def create_engine(
    url: str, *, pool_size: int = 10, application_name: str = "gozon", pre_ping: bool = True
) -> AsyncEngine:
    """The engine of a command-line tool. `pre_ping` tests each pooled connection before use."""
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=pre_ping,
        pool_timeout=10,
        connect_args={
            "server_settings": {"application_name": application_name},
            "timeout": 5,
            "command_timeout": 30,
        },
    )
