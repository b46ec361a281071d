"""Waking the relay when rows are committed, without taxing the writers.

A `NOTIFY` inside the writer's transaction takes a database-wide lock at commit, which
serialises every writer's commit (docs/adr/0004-relay-claim-and-mark.md). So the writer calls
`OutboxNotifier.notify()` *after* its commit: that only sets a flag, and a background task
sends one `pg_notify` on its own connection for however many commits happened while the
previous one was in flight (coalesced: under load, one notification covers many rows). The
relay listens on the channel (`OutboxListener`) and also polls on a slow fallback interval,
so a lost notification (a dropped connection, a writer that crashed between its commit and
the notify) delays a row by at most that interval and never loses it.

Guarantee: none needed for correctness. Notifications are only a latency optimisation; the
outbox table is the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from functools import partial
from typing import Any

import asyncpg
import structlog

from gozon.core.pg import driver_dsn

log = structlog.get_logger(__name__)


def _set(event: asyncio.Event, *_: object) -> None:
    event.set()


@contextlib.asynccontextmanager
async def _in_background(loop: Callable[[], Coroutine[Any, Any, None]]) -> AsyncIterator[None]:
    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def channel_for(outbox: str) -> str:
    return f"{outbox}_ready"


class OutboxNotifier:
    """Coalesced after-commit notifications for one outbox table, on a connection of its own.

    One `SELECT pg_notify(…)` per wake-up, one round trip (autocommit): no pool checkout, no
    pre-ping, no BEGIN/COMMIT. The connection is made on first use and again after a loss.
    """

    def __init__(self, database_url: str, outbox: str) -> None:
        self.dsn = driver_dsn(database_url)
        self.channel = channel_for(outbox)
        # pg_stat_activity tells the two services' notifiers apart, and from their writers
        self.application_name = f"{outbox}-notifier"
        self._pending = asyncio.Event()
        self._conn: asyncpg.Connection | None = None

    def notify(self) -> None:
        """Call after the transaction that wrote outbox rows has committed; never blocks."""
        self._pending.set()

    async def _send(self) -> None:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(
                self.dsn, timeout=5, server_settings={"application_name": self.application_name}
            )
        await self._conn.execute("SELECT pg_notify($1, '')", self.channel, timeout=5)

    async def _run(self) -> None:
        try:
            while True:
                await self._pending.wait()
                self._pending.clear()
                try:
                    await self._send()
                except Exception as exc:  # the relay's fallback poll covers a lost notification
                    log.debug("outbox notification failed", channel=self.channel, error=repr(exc))
                    if self._conn is not None:
                        self._conn.terminate()
                        self._conn = None
                    await asyncio.sleep(0.1)
        finally:
            if self._conn is not None:
                self._conn.terminate()

    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Sends notifications while the block runs."""
        return _in_background(self._run)


class OutboxListener:
    """Sets `wake` whenever the outbox's channel is notified; reconnects after a loss."""

    def __init__(self, database_url: str, outbox: str, wake: asyncio.Event) -> None:
        self.dsn = driver_dsn(database_url)
        self.channel = channel_for(outbox)
        self.application_name = f"{outbox}-listener"  # the relay's, in pg_stat_activity
        self.wake = wake
        self.listening = False

    def _on_notify(self, *_: object) -> None:
        self.wake.set()

    async def _run(self) -> None:
        """Listens, and reconnects (with capped backoff) whenever the connection is lost.

        Any failure is survivable here (only cancellation ends the loop): the fallback poll
        covers the time without a listener, and the relay is woken after each reconnect.
        """
        delay = 0.1
        while True:
            try:
                conn = await asyncpg.connect(
                    self.dsn, timeout=5, server_settings={"application_name": self.application_name}
                )
            except Exception as exc:
                log.debug("outbox listener cannot connect", error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
            lost = asyncio.Event()
            conn.add_termination_listener(partial(_set, lost))
            try:
                await conn.add_listener(self.channel, self._on_notify)
                self.wake.set()  # rows may have been committed while nobody listened
                self.listening = True
                await lost.wait()
                log.info("outbox listener lost its connection", channel=self.channel)
            except Exception as exc:
                log.info("outbox listener lost", channel=self.channel, error=repr(exc))
            finally:
                self.listening = False
                with contextlib.suppress(Exception):
                    await conn.close(timeout=1)

    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Listens while the block runs."""
        return _in_background(self._run)
