"""The async SQLAlchemy engine and session factory, built by each process's composition root."""

from __future__ import annotations

import asyncpg
from sqlalchemy import MetaData, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

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
    """The engine, for the migrations and the command-line tools (the APIs, the consumers and
    the relays run on asyncpg: `gozon.core.pg`). `pre_ping` tests each pooled connection
    before use."""
    engine = create_async_engine(
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
    event.listen(engine.sync_engine, "handle_error", _read_only_is_a_lost_server)
    return engine


def _read_only_is_a_lost_server(context: ExceptionContext) -> None:
    """A connection that reached a read-only server (a standby, say before or after a
    failover) is handled as one that lost its server: dropped with the pool's older ones, so
    that the next connections may reach the primary, instead of refusing writes for ever."""
    if getattr(context.original_exception, "sqlstate", None) == READ_ONLY_SQLSTATE:
        context.is_disconnect = True


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


# SQLSTATE classes of a server going away or refusing work: 08 connection exception, 53
# insufficient resources (too many connections), 57 operator intervention (admin shutdown,
# "the database system is shutting down / starting up", a statement cancelled by its timeout).
# asyncpg's errors of these classes reach SQLAlchemy as plain DBAPIErrors.
OUTAGE_SQLSTATE_CLASSES = frozenset({"08", "53", "57"})


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of asyncpg's error, raised by the driver itself (the consumers' and the
    relays' batches run on it) or wrapped in a DBAPIError (SQLAlchemy copies it onto `orig`)."""
    error = exc if isinstance(exc, asyncpg.PostgresError) else getattr(exc, "orig", None)
    code = getattr(error, "sqlstate", None)
    return code if isinstance(code, str) else None


# SQLSTATEs with which the database refuses the service itself, whatever the work it is given:
# 28 invalid authorization (a wrong password, a role dropped), 3D a missing database, 3F a
# missing schema, 42 a statement the schema or the grants do not allow (a migration not run,
# a privilege revoked: our statements are fixed, so no message's content can cause one), 58
# the server's own system error (its disk failing), and 25006, a read-only transaction (the
# service reached a standby, e.g. after a failover). Not outages (the server answers), not a
# message's fault either: the same statement fails for every message.
REFUSAL_SQLSTATE_CLASSES = frozenset({"28", "3D", "3F", "42", "58"})
READ_ONLY_SQLSTATE = "25006"


def is_database_refusal(exc: BaseException) -> bool:
    """The database refuses this service (its role, grants, schema, a read-only server), not
    this piece of work: wait for the fix and retry, never skip the work as a bad message."""
    code = sqlstate(exc)
    return code is not None and (code[:2] in REFUSAL_SQLSTATE_CLASSES or code == READ_ONLY_SQLSTATE)


# SQLSTATEs of a transaction that lost a wait, not of bad work: a serialization failure or a
# deadlock (40001, 40P01), rolled back by the server, and a lock not granted within the
# session's `lock_timeout` (55P03, lock_not_available: someone else holds the row, a frozen
# peer say, until its own session's idle_in_transaction_session_timeout ends it). Retry the
# whole transaction later; never skip its work.
BUSY_SQLSTATES = frozenset({"40001", "40P01", "55P03"})
# The server ended this session because it sat idle inside a transaction past
# `idle_in_transaction_session_timeout` (its process frozen, say): rolled back, and the
# connection is gone, as in an outage.
IDLE_IN_TRANSACTION_TIMEOUT = "25P03"


def is_database_busy(exc: BaseException) -> bool:
    """A transaction that lost a wait (`BUSY_SQLSTATES`): retry it, never skip its work."""
    return sqlstate(exc) in BUSY_SQLSTATES


def is_database_outage(exc: BaseException) -> bool:
    """A lost, refused or timed-out database connection: retry later, never skip the work."""
    if isinstance(exc, OSError | TimeoutError | ConnectionError):
        return True
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    # The same, from asyncpg itself (the relays' batches run on the driver): its connection
    # closed or unusable (InternalClientError: still digesting the server's goodbye, its
    # FATAL read and its EOF not yet, as the API's pool knows too: gozon.core.pg), or the
    # server's error of an outage class.
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.InternalClientError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        code = exc.sqlstate
        return isinstance(code, str) and (
            code[:2] in OUTAGE_SQLSTATE_CLASSES or code == IDLE_IN_TRANSACTION_TIMEOUT
        )
    if not isinstance(exc, DBAPIError):
        return False
    code = sqlstate(exc)
    return bool(exc.connection_invalidated) or (
        code is not None
        and (code[:2] in OUTAGE_SQLSTATE_CLASSES or code == IDLE_IN_TRANSACTION_TIMEOUT)
    )
