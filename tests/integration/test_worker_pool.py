"""The workers' asyncpg pool against the real PostgreSQL: which connections a failed batch
gives back to the pool (`gozon.core.pg.batch_connection`) and which it drops, and the bounded
waits every worker session carries (`SessionLimits`)."""

from __future__ import annotations

import contextlib

import asyncpg
import pytest

from gozon.core.pg import (
    batch_connection,
    driver_dsn,
    is_database_busy,
    is_database_refusal,
    worker_pool,
)
from gozon.core.settings import SessionLimits
from gozon.messaging.consumer import is_retryable
from tests.conftest import until
from tests.integration.conftest import read_only_switch

pytestmark = pytest.mark.integration

_PID = "SELECT pg_backend_pid()"


class BatchFailed(Exception):
    pass


async def failed_batch(pool: asyncpg.Pool, *, inside_a_transaction: bool) -> int:
    """A batch that fails, its connection left inside a transaction or not (as when the
    ROLLBACK could not be sent); returns that connection's backend pid."""
    pid = 0
    with contextlib.suppress(BatchFailed):
        async with batch_connection(pool) as conn:
            pid = await conn.fetchval(_PID)
            if inside_a_transaction:
                await conn.execute("BEGIN")
                assert conn.is_in_transaction()
            raise BatchFailed
    return pid


async def backend_alive(pool: asyncpg.Pool, pid: int) -> bool:
    async with batch_connection(pool) as conn:
        return bool(
            await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)
        )


async def test_a_batch_that_fails_on_a_clean_connection_gives_it_back(orders_db: str) -> None:
    pool = await worker_pool(orders_db, size=1, application_name="test-pool-kept")
    try:
        first = await failed_batch(pool, inside_a_transaction=False)
        async with batch_connection(pool) as conn:
            assert await conn.fetchval(_PID) == first
    finally:
        await pool.close()


async def test_a_batch_that_fails_inside_a_transaction_drops_its_connection(
    orders_db: str,
) -> None:
    """The connection is closed, never pooled again: the next batch gets a new backend with
    no transaction open, and the server ends the old one (rolling back what it had open)."""
    pool = await worker_pool(orders_db, size=1, application_name="test-pool-dropped")
    try:
        first = await failed_batch(pool, inside_a_transaction=True)
        async with batch_connection(pool) as conn:
            assert await conn.fetchval(_PID) != first
            assert not conn.is_in_transaction()

        async def ended() -> bool:
            return not await backend_alive(pool, first)

        await until(ended, 30, f"backend {first} to end after its connection was dropped")
    finally:
        await pool.close()


async def test_a_batch_refused_as_read_only_drops_its_connection(orders_db: str) -> None:
    """A session made while the server was read-only (a standby, before or after a failover)
    stays read-only for its life, and nothing else would end it: the batch it refused drops
    it, so the retried batch gets a new session, which writes once the server does."""
    write = "UPDATE orders SET status = status WHERE false"
    pool = await worker_pool(orders_db, size=1, application_name="test-pool-read-only")
    try:
        async with read_only_switch(orders_db) as switch:
            await switch.read_only(True)
            first = 0

            async def batch() -> None:
                nonlocal first
                async with batch_connection(pool) as conn:  # the pool's first: made read-only
                    first = await conn.fetchval(_PID)
                    await conn.execute(write)

            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await batch()
            await switch.read_only(False)

            async with batch_connection(pool) as conn:
                assert await conn.fetchval(_PID) != first
                assert await conn.execute(write) == "UPDATE 0"
    finally:
        await pool.close()


# --------------------------------------------------------------------------- bounded waits

QUICK = SessionLimits(lock_timeout_s=0.3, statement_timeout_s=2, idle_in_transaction_s=0.5)
_LOCK_ONE_ORDER = "SELECT id FROM orders ORDER BY id LIMIT 1 FOR UPDATE"


async def an_order(orders_db: str) -> None:
    conn = await asyncpg.connect(driver_dsn(orders_db))
    try:
        await conn.execute(
            "INSERT INTO orders (id, user_id, amount, description, status, created_at) "
            "VALUES (gen_random_uuid(), 'u-pool', 1, 'x', 'NEW', now())"
        )
    finally:
        await conn.close()


async def test_every_worker_session_carries_its_bounded_waits(orders_db: str) -> None:
    pool = await worker_pool(orders_db, size=1, application_name="test-pool-limits")
    try:
        async with batch_connection(pool) as conn:
            shown = {
                name: await conn.fetchval(f"SHOW {name}")
                for name in (
                    "lock_timeout",
                    "statement_timeout",
                    "idle_in_transaction_session_timeout",
                )
            }
    finally:
        await pool.close()
    assert shown == {
        "lock_timeout": "2s",
        "statement_timeout": "5s",
        "idle_in_transaction_session_timeout": "5s",
    }


async def test_a_session_frozen_inside_its_transaction_is_ended_and_its_locks_released(
    orders_db: str,
) -> None:
    """A worker that stops between two statements of its transaction (frozen, say) keeps its
    row locks only until `idle_in_transaction_session_timeout`: the server ends its session,
    a peer then takes the lock, and the frozen worker's next statement fails as an outage
    (retried on a fresh connection, never a bad message)."""
    await an_order(orders_db)
    frozen = await worker_pool(orders_db, size=1, application_name="test-pool-frozen", limits=QUICK)
    peer = await worker_pool(orders_db, size=1, application_name="test-pool-peer")
    try:
        ended: BaseException | None = None
        try:
            async with batch_connection(frozen) as conn, conn.transaction():
                await conn.fetch(_LOCK_ONE_ORDER)
                async with batch_connection(peer) as other:  # its lock_timeout is 2 s
                    assert await other.fetch(_LOCK_ONE_ORDER)  # granted once the server ends it
                await conn.fetch("SELECT 1")
        except Exception as exc:  # any error: it is classified below
            ended = exc
        assert ended is not None, "the frozen session was not ended"
        assert is_retryable(ended), repr(ended)
        assert not is_database_refusal(ended)
        async with batch_connection(frozen) as conn:  # a fresh session: the old one was dropped
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await frozen.close()
        await peer.close()


async def test_a_statement_waiting_for_a_lock_gives_up_and_says_retry(orders_db: str) -> None:
    await an_order(orders_db)
    holder = await asyncpg.connect(driver_dsn(orders_db))
    pool = await worker_pool(orders_db, size=1, application_name="test-pool-lock", limits=QUICK)
    try:
        async with holder.transaction():
            await holder.fetch(_LOCK_ONE_ORDER)
            with pytest.raises(asyncpg.LockNotAvailableError) as waited:
                async with batch_connection(pool) as conn, conn.transaction():
                    await conn.fetch(_LOCK_ONE_ORDER)
        assert is_retryable(waited.value)
        assert is_database_busy(waited.value)
        async with batch_connection(pool) as conn:  # the connection is as good as new
            assert await conn.fetch(_LOCK_ONE_ORDER)
    finally:
        await holder.close()
        await pool.close()
