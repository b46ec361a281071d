"""The services' one way to PostgreSQL at run time: asyncpg, named statements.

SQLAlchemy keeps the schema, the migrations and the command-line tools; both APIs' requests,
the consumers' batches and the relays' housekeeping run here (docs/reliability.md,
docs/adr/0015-one-data-path.md), and so do the caller's deadline (`RequestBudget`, set for
each request by gozon.core.deadline.Admission) and what a failure means
(`is_database_outage`, `is_database_refusal`, `is_database_busy`: the workers retry the
work, the APIs answer 503). Guarantees:

- **One round trip per statement**: no pre-ping, no reset query (the statements leave no
  session state), each statement prepared once per connection.
- **A write is one autocommit statement**, bounded by every connection's `statement_timeout`,
  the API's cap; a request with less time left than the cap runs it in a transaction instead.
- **A transaction** (`Database.transaction`: the payments API's deposit, a write short of
  time) begins with `SET LOCAL statement_timeout` = the time left, has its connection cut at
  the deadline (a server that stopped answering cancels nothing), and sends no COMMIT past
  it; one lost during COMMIT is of unknown outcome. A connection that ran out of time is
  dropped, never rolled back.
- **A dead pooled connection is retried once when that is safe**: closed before the statement
  was sent, terminated by the server with 57P01/57P02/57P03, or read-only (25006: a standby,
  dropped). A second failure is a 503.
- **Every failure has an honest answer**: `NotProcessed` (503, nothing written),
  `OutcomeUnknown` (504, a write may have committed), `DeadlineExceeded` (503); inside a
  transaction the driver's errors pass through to the API's handlers, which answer the same
  way (gozon.core.deadline); any other database error is a bug (500).

The consumers' batches run on `worker_pool` (the same connections, generic plans), each on a
connection held by `batch_connection`: one lost or left inside a transaction is dropped, so a
retried batch starts on a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import asyncpg
import structlog
from sqlalchemy.engine import make_url

from gozon.core.settings import MessagingSettings, SessionLimits

log = structlog.get_logger(__name__)

T = TypeVar("T")

# ---------------------------------------------------------------------- the caller's deadline

# Less than this left: the work is refused rather than started (it could not finish).
MIN_BUDGET_S: Final = 0.05


@dataclass
class RequestBudget:
    """The running request's deadline (time.monotonic) and whether it is committing."""

    deadline: float
    committing: bool = False
    cut: bool = False  # a transaction's connection was closed at the deadline

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def left_to_start(self) -> float:
        """The time left for work about to start: `DeadlineExceeded` when too little is left
        for it to finish."""
        left = self.left()
        if left < MIN_BUDGET_S:
            raise DeadlineExceeded
        return left


_budget: ContextVar[RequestBudget | None] = ContextVar("gozon_request_budget", default=None)


def current_budget() -> RequestBudget | None:
    return _budget.get()


@contextlib.contextmanager
def budget_scope(budget: RequestBudget) -> Iterator[RequestBudget]:
    """Runs the block under `budget` (as `gozon.core.deadline.Admission` runs a request)."""
    token = _budget.set(budget)
    try:
        yield budget
    finally:
        _budget.reset(token)


def request_budget(seconds: float) -> contextlib.AbstractContextManager[RequestBudget]:
    """Runs the block under a deadline `seconds` from now."""
    return budget_scope(RequestBudget(time.monotonic() + seconds))


class DeadlineExceeded(Exception):
    """The caller's deadline passed before the work could start or commit: nothing written."""


class NotProcessed(Exception):
    """The database did not do the work (nothing was committed): answer 503, retry later."""


class OutcomeUnknown(Exception):
    """A write was in flight when the connection was lost: it may or may not have committed."""


# ---------------------------------------------------------------------- what a failure means

# SQLSTATE classes of a server going away or refusing work: 08 connection exception, 53
# insufficient resources (too many connections), 57 operator intervention (admin shutdown,
# "the database system is shutting down / starting up", a statement cancelled by its timeout).
OUTAGE_SQLSTATE_CLASSES: Final = frozenset({"08", "53", "57"})
# The server ended this session because it sat idle inside a transaction past
# `idle_in_transaction_session_timeout` (its process frozen, say): rolled back, and the
# connection is gone, as in an outage.
IDLE_IN_TRANSACTION_TIMEOUT: Final = "25P03"
# SQLSTATEs with which the database refuses the service itself, whatever the work it is given:
# 28 invalid authorization (a wrong password, a role dropped), 3D a missing database, 3F a
# missing schema, 42 a statement the schema or the grants do not allow (a migration not run,
# a privilege revoked: our statements are fixed, so no message's content can cause one), 58
# the server's own system error (its disk failing), and 25006, a read-only transaction (the
# service reached a standby, e.g. after a failover). Not outages (the server answers), not a
# message's fault either: the same statement fails for every message.
REFUSAL_SQLSTATE_CLASSES: Final = frozenset({"28", "3D", "3F", "42", "58"})
READ_ONLY_SQLSTATE: Final = "25006"
# SQLSTATEs of a transaction that lost a wait, not of bad work: a serialization failure or a
# deadlock (40001, 40P01), rolled back by the server, and a lock not granted within the
# session's `lock_timeout` (55P03, lock_not_available: someone else holds the row, a frozen
# peer say, until its own session's idle_in_transaction_session_timeout ends it). Retry the
# whole transaction later; never skip its work.
BUSY_SQLSTATES: Final = frozenset({"40001", "40P01", "55P03"})
# SQLSTATE 57014: the statement was cancelled (here: by statement_timeout).
QUERY_CANCELED: Final = "57014"
# The server said it is terminating or not yet accepting this connection, or that this
# connection reached a read-only server (a standby; such a session stays read-only for its
# life): the statement did not run (or was rolled back), and a fresh connection may well
# succeed.
_RETRY_SQLSTATES: Final = frozenset({"57P01", "57P02", "57P03", READ_ONLY_SQLSTATE})
# Server-reported failures of an API's statement that roll it back and mean "later", not
# "never": the outages' classes and 40, transaction rollback (serialization, deadlock).
_NOT_PROCESSED_CLASSES: Final = OUTAGE_SQLSTATE_CLASSES | {"40"}


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of the server's error, None for any other failure."""
    code = exc.sqlstate if isinstance(exc, asyncpg.PostgresError) else None
    return code if isinstance(code, str) else None


def is_database_outage(exc: BaseException) -> bool:
    """A lost, refused or timed-out database connection: retry later, never skip the work.

    The driver's connection closed or unusable counts (InternalClientError: still digesting
    the server's goodbye, its FATAL read and its EOF not yet), as does the server's error of
    an outage class."""
    if isinstance(exc, OSError | TimeoutError | ConnectionError):
        return True
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.InternalClientError):
        return True
    code = sqlstate(exc)
    return code is not None and (
        code[:2] in OUTAGE_SQLSTATE_CLASSES or code == IDLE_IN_TRANSACTION_TIMEOUT
    )


def is_database_refusal(exc: BaseException) -> bool:
    """The database refuses this service (its role, grants, schema, a read-only server), not
    this piece of work: wait for the fix and retry, never skip the work as a bad message."""
    code = sqlstate(exc)
    return code is not None and (code[:2] in REFUSAL_SQLSTATE_CLASSES or code == READ_ONLY_SQLSTATE)


def is_database_busy(exc: BaseException) -> bool:
    """A transaction that lost a wait (`BUSY_SQLSTATES`): retry it, never skip its work."""
    return sqlstate(exc) in BUSY_SQLSTATES


def is_not_processed(exc: BaseException) -> bool:
    """The server rolled the API's statement back for a reason that passes (an outage, a
    conflict): nothing was written, and the same request may succeed later."""
    code = sqlstate(exc)
    return is_database_outage(exc) or (code is not None and code[:2] in _NOT_PROCESSED_CLASSES)


# ---------------------------------------------------------------------- the APIs' pool

# A COMMIT sent just before the deadline may take this much past it before the client gives
# up on the server (the outcome is then unknown): well inside the gateway's margin of a second
# past the API's budget, and a thousand times what a COMMIT takes on a server that answers.
COMMIT_GRACE_S: Final = 0.5


def driver_dsn(url: str) -> str:
    """asyncpg's DSN from the SQLAlchemy URL the settings carry (`postgresql+asyncpg://…`)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _no_reset(connection: asyncpg.Connection) -> None:
    """Release without asyncpg's reset query (a round trip): the statements here leave no
    session state behind, and asyncpg itself rolls back a transaction a request left open."""


class Database:
    """One API process's connection pool and its three ways to run a statement."""

    def __init__(self, pool: asyncpg.Pool, *, pool_timeout_s: float, statement_timeout_s: float):
        self.pool = pool
        self.pool_timeout_s = pool_timeout_s
        self.statement_timeout_s = statement_timeout_s

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        pool_size: int,
        application_name: str,
        pool_timeout_s: float,
        statement_timeout_s: float,
    ) -> Database:
        """The pool, empty at first (connections are made on demand, so an API starts while its
        database is down and becomes ready when it answers)."""
        pool = await asyncpg.create_pool(
            driver_dsn(url),
            min_size=0,
            # As the SQLAlchemy engines had it: pool_size kept, as many again under bursts.
            max_size=2 * pool_size,
            max_inactive_connection_lifetime=60,
            reset=_no_reset,
            timeout=5,  # connect
            # The client's own limit only for a server that stopped answering: the server's
            # statement_timeout fires first.
            command_timeout=statement_timeout_s + 1,
            server_settings={
                "application_name": application_name,
                "statement_timeout": str(int(statement_timeout_s * 1000)),
            },
        )
        return cls(pool, pool_timeout_s=pool_timeout_s, statement_timeout_s=statement_timeout_s)

    async def close(self) -> None:
        await asyncio.wait_for(self.pool.close(), timeout=5)

    async def answers(self) -> bool:
        """Readiness: one round trip to the database."""
        try:
            await self.read(_SELECT_1, ())
        except Exception:  # any failure means "not ready"
            return False
        return True

    # ------------------------------------------------------------------ the three ways

    async def read(self, query: str, args: Sequence[Any]) -> list[asyncpg.Record]:
        """A read-only statement. Safe to repeat, so any lost connection is retried once."""

        async def run(conn: asyncpg.Connection, left: float) -> list[asyncpg.Record]:
            # A read has nothing to commit: the client-side timeout (asyncpg cancels the
            # statement on the server) is enough to keep it inside the deadline.
            rows: list[asyncpg.Record] = await conn.fetch(
                query, *args, timeout=min(left, self.statement_timeout_s)
            )
            return rows

        return await self._run(run, write=False)

    async def write(self, query: str, args: Sequence[Any]) -> list[asyncpg.Record]:
        """A statement that writes and commits by itself, bounded by the request's deadline:
        one autocommit round trip, bounded by the connections' statement_timeout (the cap),
        unless the request has less time left than the cap; then it runs in `transaction()`,
        which commits nothing after the deadline."""

        async def run(conn: asyncpg.Connection, left: float) -> list[asyncpg.Record] | None:
            if left < self.statement_timeout_s:
                return None  # the pool wait took the time: a transaction instead (below)
            rows: list[asyncpg.Record] = await conn.fetch(query, *args)
            return rows

        if self._left() >= self.statement_timeout_s:
            done = await self._run(run, write=True)
            if done is not None:
                return done
        for attempt in (1, 2):
            rows: list[asyncpg.Record] | None = None
            try:
                async with self.transaction() as conn:
                    rows = await conn.fetch(query, *args)
                return rows
            except asyncpg.PostgresError as exc:
                # The statement's connection was terminated by the server saying so, or is on
                # a read-only server (dropped): rolled back, and a fresh connection may
                # succeed. Never once the statement ran (its COMMIT's outcome is unknown).
                said = _server_said(exc) or exc.sqlstate
                if attempt == 2 or rows is not None or said not in _RETRY_SQLSTATES:
                    raise
                log.info("database refused the statement's connection; retrying", sqlstate=said)
        raise AssertionError("unreachable")  # pragma: no cover

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A transaction of several statements, bounded by the request's deadline: `BEGIN;
        SET LOCAL statement_timeout` = the time left (at most the cap), its connection cut
        at the deadline on the client's side (a server that stopped answering cancels
        nothing), and no COMMIT once the deadline has passed (`DeadlineExceeded`).

        A connection found dead at BEGIN is retried once on a fresh one, as for `read`.
        Inside, the driver's errors pass through (the outage handlers answer them), except
        once the deadline has cut the connection: then any failure inside is
        `DeadlineExceeded` and `budget.cut` is set (503); a connection lost during COMMIT leaves
        `budget.committing` set (504, the outcome unknown). A connection that failed unusable
        (`unusable_after`) or ran out of time is dropped, never pooled again."""
        conn = await self._begin()
        budget = current_budget()
        cut = (
            asyncio.get_running_loop().call_later(max(0.0, budget.left()), _cut, budget, conn)
            if budget is not None
            else None
        )
        try:
            try:
                yield conn
                if budget is not None and budget.left() <= 0:
                    raise DeadlineExceeded
            except BaseException as exc:
                await _roll_back(conn, exc)
                if (
                    budget is not None
                    and budget.cut
                    and isinstance(exc, Exception)
                    and not isinstance(exc, DeadlineExceeded)
                ):
                    # The deadline closed the connection under the statement: whatever the
                    # driver raised for it is the deadline's doing, and nothing was committed.
                    # asyncpg may raise AttributeError (a protocol it has dropped) when the cut
                    # falls between a statement's preparation and its execution.
                    raise DeadlineExceeded("the deadline closed the transaction") from exc
                raise
            if budget is not None:
                budget.committing = True
            try:
                await conn.execute("COMMIT", timeout=self._time_left() + COMMIT_GRACE_S)
            except BaseException:
                _drop(conn)
                raise
            if budget is not None:
                budget.committing = False
        finally:
            if cut is not None:
                cut.cancel()
            await self._release(conn)

    async def _begin(self) -> asyncpg.pool.PoolConnectionProxy:
        """A pooled connection inside a new transaction."""
        for attempt in (1, 2):
            left = self._left()
            started = time.monotonic()
            conn = await self._acquire(left)
            left -= time.monotonic() - started
            try:
                if left < MIN_BUDGET_S:  # the pool wait took it
                    raise DeadlineExceeded
                ms = int(1000 * min(left, self.statement_timeout_s))
                await conn.execute(f"BEGIN; SET LOCAL statement_timeout = {ms}", timeout=left)
                return conn
            except DeadlineExceeded:
                await self._release(conn)
                raise
            except Exception as exc:
                _drop(conn)  # nothing ran: the server ends whatever was begun
                await self._release(conn)
                if attempt == 1 and _dead_at_begin(exc):
                    log.info("pooled connection unusable at BEGIN; retrying", error=repr(exc))
                    continue
                code = str(getattr(exc, "sqlstate", None) or "")
                if (
                    isinstance(exc, asyncpg.PostgresError)
                    and code[:2] not in _NOT_PROCESSED_CLASSES
                ):
                    raise
                raise NotProcessed(f"no transaction begun: {exc!r}") from exc
            except BaseException:  # cancelled: the server ends whatever was begun
                _drop(conn)
                await self._release(conn)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _time_left(self) -> float:
        budget = current_budget()
        return max(0.0, budget.left()) if budget is not None else self.statement_timeout_s

    # ------------------------------------------------------------------ failures

    def _left(self) -> float:
        budget = current_budget()
        left = budget.left() if budget is not None else self.statement_timeout_s
        if left < MIN_BUDGET_S:
            raise DeadlineExceeded
        return left

    async def _acquire(self, left: float) -> asyncpg.pool.PoolConnectionProxy:
        try:
            return await self.pool.acquire(timeout=min(left, self.pool_timeout_s))
        except TimeoutError as exc:  # no free connection in time, or connecting timed out
            raise NotProcessed("pool exhausted or connect timed out") from exc
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise NotProcessed(f"cannot connect: {exc!r}") from exc

    async def _run(
        self, run: Callable[[asyncpg.Connection, float], Awaitable[T]], *, write: bool
    ) -> T:
        for attempt in (1, 2):
            left = self._left()
            started = time.monotonic()
            conn = await self._acquire(left)
            broken = True  # unless the server answered: then the connection is as good as new
            try:
                result = await run(conn, left - (time.monotonic() - started))
                broken = False
                return result
            except asyncpg.ConnectionDoesNotExistError as exc:  # lost mid-statement
                said = _server_said(exc)
                if said is not None:  # the server rolled back and closed: nothing committed
                    if said in _RETRY_SQLSTATES and attempt == 1:
                        log.info("database closed the connection; retrying", sqlstate=said)
                        continue
                    raise NotProcessed(f"{said}: {exc}") from exc
                if write:
                    raise OutcomeUnknown(repr(exc)) from exc
                if attempt == 2:
                    raise NotProcessed(f"connection lost: {exc!r}") from exc
            except asyncpg.PostgresError as exc:  # the server's answer: nothing committed
                code = exc.sqlstate or ""
                if code in _RETRY_SQLSTATES and attempt == 1:
                    log.info("database connection refused a statement; retrying", sqlstate=code)
                    continue
                # Never pooled again: a connection the server said it will not serve (the
                # retry above drops it too), or one a "later" failure may have left unusable.
                broken = code in _RETRY_SQLSTATES or (
                    code[:2] in _NOT_PROCESSED_CLASSES and code != QUERY_CANCELED
                )
                if code[:2] in _NOT_PROCESSED_CLASSES:
                    raise NotProcessed(f"{code}: {exc}") from exc
                raise
            except asyncpg.DataError:  # a value the driver cannot encode: a bug, not an outage
                broken = False
                raise
            except (asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
                # Refused by the driver before anything was sent: the connection was closed,
                # or is still digesting the server's goodbye (its FATAL read, its EOF not yet).
                if attempt == 2:
                    raise NotProcessed(repr(exc)) from exc
                log.info("pooled connection unusable; retrying", error=repr(exc))
            except TimeoutError as exc:  # no answer in time (asyncpg cancelled the statement)
                if write:
                    raise OutcomeUnknown(repr(exc)) from exc
                raise NotProcessed(f"no answer in time: {exc!r}") from exc  # not worth a retry
            except OSError as exc:  # the socket failed
                if write:
                    raise OutcomeUnknown(repr(exc)) from exc
                if attempt == 2:
                    raise NotProcessed(repr(exc)) from exc
            except BaseException:
                broken = False  # ours (a rule, the deadline) or a cancellation: asyncpg copes
                raise
            finally:
                if broken:
                    with contextlib.suppress(Exception):
                        conn.terminate()
                await self._release(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _release(self, conn: asyncpg.pool.PoolConnectionProxy) -> None:
        try:
            await self.pool.release(conn, timeout=1)
        except Exception as exc:  # a broken connection is dropped by the pool either way
            log.debug("releasing a connection failed", error=repr(exc))


def _dead_at_begin(exc: Exception) -> bool:
    """BEGIN failed on a connection that was dead or dying (closed, lost, or terminated by the
    server saying so): nothing ran, and a fresh connection may well succeed."""
    if isinstance(exc, TimeoutError):
        return False  # the server does not answer: the time is spent
    code = getattr(exc, "sqlstate", None)
    return code in _RETRY_SQLSTATES or isinstance(
        exc,
        asyncpg.InterfaceError
        | asyncpg.InternalClientError
        | asyncpg.ConnectionDoesNotExistError
        | OSError,
    )


def _closed(conn: asyncpg.Connection) -> bool:
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:  # the pool let go of it: its connection was closed
        return True


def _drop(conn: asyncpg.Connection) -> None:
    """Closes the connection at once, never to be pooled again; the server rolls back."""
    if not _closed(conn):
        conn.terminate()


def _cut(budget: RequestBudget, conn: asyncpg.Connection) -> None:
    """The deadline passed with the transaction still open: its connection is closed at once
    (never pooled again), so a statement waiting on it fails at once and no ROLLBACK waits
    for the server. The server rolls the transaction back; a COMMIT already sent makes the
    outcome unknown (`committing`), as for any connection lost during COMMIT."""
    if _closed(conn):
        return
    budget.cut = True
    log.warning("deadline passed inside a transaction; closing its connection")
    conn.terminate()


async def _roll_back(conn: asyncpg.Connection, exc: BaseException) -> None:
    """Ends a failed transaction: ROLLBACK when the server is answering, else (out of time,
    cancelled, lost) the connection is dropped and the server rolls back. A connection left
    unusable (`unusable_after`: a read-only server, say) is dropped too."""
    if _closed(conn):
        return
    if isinstance(exc, TimeoutError | asyncio.CancelledError):
        conn.terminate()  # no ROLLBACK: it would first wait for the cancelled statement
        return
    try:
        await conn.execute("ROLLBACK", timeout=COMMIT_GRACE_S)
        unusable = unusable_after(conn, exc)
    except Exception:
        unusable = True
    if unusable:
        _drop(conn)


# ---------------------------------------------------------------------- the workers' pool

# The consumers' limits at their documented defaults (GOZON_WORKER_*_MS and
# GOZON_CONSUMER_IDLE_IN_TRANSACTION_TIMEOUT_MS): what a pool gets unless told otherwise.
CONSUMER_LIMITS: Final = MessagingSettings.model_construct().consumer_session_limits


async def worker_pool(
    url: str,
    *,
    size: int,
    application_name: str,
    limits: SessionLimits = CONSUMER_LIMITS,
) -> asyncpg.Pool:
    """A worker's pool: `size` connections at most, made on demand (the worker starts while
    its database is down), no pre-ping, no reset query on release (a batch leaves no session
    state: its transaction ended, or its connection is dropped by `batch_connection`).

    Every session is bounded by `limits` (`lock_timeout`, `statement_timeout`,
    `idle_in_transaction_session_timeout`; the consumer's from its settings), and every round
    trip by the client too (`limits.command_timeout_s`): a stalled server fails the batch,
    which is retried as an outage, instead of holding its rows' locks for ever.

    The batches' statements, which take arrays (one entry per event), are planned once per
    connection (`plan_cache_mode = force_generic_plan`): their plans do not depend on the
    arrays' contents, and the server's default planned them anew at every batch
    (docs/adr/0006-batched-consumers.md)."""
    return await asyncpg.create_pool(
        driver_dsn(url),
        min_size=0,
        max_size=size,
        max_inactive_connection_lifetime=60,
        reset=_no_reset,
        timeout=5,  # connect
        command_timeout=limits.command_timeout_s,
        server_settings={
            "application_name": application_name,
            "plan_cache_mode": "force_generic_plan",
            **limits.server_settings(),
        },
    )


def unusable_after(conn: asyncpg.Connection, exc: BaseException) -> bool:
    """Whether a connection a batch failed on must be dropped, never used again: it is
    closed, still inside the transaction (its ROLLBACK failed: lost mid-transaction),
    refused by the driver while it digests the server's goodbye (InternalClientError, its
    FATAL read and its EOF not yet), or connected to a read-only server (a standby: a new
    connection may reach the primary). The server rolls back whatever it had open."""
    return (
        conn.is_closed()
        or conn.is_in_transaction()
        or isinstance(exc, asyncpg.InternalClientError | asyncpg.ReadOnlySQLTransactionError)
    )


@contextlib.asynccontextmanager
async def batch_connection(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection for one batch; dropped instead of pooled again when the batch
    failed with it unusable (`unusable_after`: closed, still inside a transaction, refused by
    the driver while it digests the server's goodbye, or on a read-only server). The server
    rolls back whatever the dropped one had open."""
    try:
        conn: asyncpg.Connection = await pool.acquire()
    except asyncpg.PostgresError as exc:
        # The server refused a new connection (starting up, too many clients, the database
        # or role not there yet): an outage to wait out, never a reason to dead-letter.
        raise ConnectionError(f"cannot connect: {exc!r}") from exc
    if conn.is_in_transaction():
        # Left inside a transaction (a statement the client gave up on ran when the server
        # resumed): a batch would only nest in it. Dropped; the server rolls it back.
        conn.terminate()
        with contextlib.suppress(Exception):
            await pool.release(conn, timeout=1)
        raise ConnectionError("a pooled connection was left inside a transaction: dropped")
    try:
        yield conn
    except BaseException as exc:
        try:
            drop = unusable_after(conn, exc)
        except asyncpg.InterfaceError:
            # The pool has let go of it already: its server closed it (ended the session for
            # sitting idle in a transaction, say), and the batch's error says so.
            drop = False
        if drop:
            conn.terminate()
        raise
    finally:
        with contextlib.suppress(Exception):  # a dropped connection leaves the pool anyway
            await pool.release(conn, timeout=1)


async def pool_answers(pool: asyncpg.Pool) -> bool:
    """Readiness of a worker's pool: one round trip to the database."""
    try:
        async with batch_connection(pool) as conn:
            await conn.fetchval(_SELECT_1, timeout=5)
    except Exception:  # any failure means "not ready"
        return False
    return True


def _server_said(exc: BaseException) -> str | None:
    """The SQLSTATE of the error the server sent before closing the connection, if it did
    (asyncpg chains it as the cause of ConnectionDoesNotExistError)."""
    cause = exc.__cause__
    if isinstance(cause, asyncpg.PostgresError) and not isinstance(
        cause, asyncpg.ConnectionDoesNotExistError
    ):
        return str(cause.sqlstate or "") or None
    return None


_SELECT_1: Final = "SELECT 1"
