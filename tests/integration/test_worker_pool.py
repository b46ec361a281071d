"""The workers' asyncpg pool against the real PostgreSQL: which connections a failed batch
gives back to the pool (`gozon.core.pg.batch_connection`) and which it drops."""

from __future__ import annotations

import contextlib

import asyncpg
import pytest

from gozon.core.pg import batch_connection, worker_pool
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
