"""The consumers' statements against the real PostgreSQL, and their round trips counted on the
wire (tests/integration/roundtrips.py): the orders consumer's batch is ONE statement in
autocommit (no BEGIN, no COMMIT), the payments consumer's common path is four (BEGIN,
CLAIM_AND_READ, SWAP_AND_RECORD, COMMIT). Its slow paths are exercised here too: an order
claimed by a concurrent transaction while the claim waited, and a compare-and-swap that loses
to a concurrent deposit."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from decimal import Decimal

import asyncpg
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from gozon.contracts import OrderCreated, PaymentProcessed
from gozon.core.pg import worker_pool
from gozon.messaging.consumer import Delivery, Outcome, Rejected, is_retryable
from gozon.orders.consumer import make_handler as orders_handler
from gozon.payments import decisions
from gozon.payments.consumer import make_handler as payments_handler
from gozon.payments.models import LedgerEntry, PaymentDecision
from tests.integration.roundtrips import counting_proxy
from tests.integration.test_batched_consumers import (
    answers,
    balance_of,
    count,
    debits,
    deposit,
    final_count,
    new_order,
    payment_result,
)
from tests.integration.test_batched_consumers import record_of as payments_record
from tests.integration.test_payments_consumer import order_created

pytestmark = pytest.mark.integration


async def counted(url: str) -> asyncpg.Pool:
    """The consumers' pool (as `gozon … consumer` builds it), through a counting proxy."""
    return await worker_pool(url, size=2, application_name="test-counted")


# --------------------------------------------------------------------------- orders


def results(*pairs: tuple[uuid.UUID, str]) -> list[Delivery[PaymentProcessed]]:
    deliveries = []
    for order_id, status in pairs:
        event = PaymentProcessed.model_validate_json(payment_result(order_id, status))  # type: ignore[arg-type]
        deliveries.append(Delivery(event, payments_record(event)))  # type: ignore[arg-type]
    return deliveries


@pytest.fixture
async def orders(orders_db: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(orders_db)
    yield engine
    await engine.dispose()


async def test_the_orders_batch_is_one_statement_in_autocommit(
    orders_db: str, orders: AsyncEngine
) -> None:
    warm = await new_order(orders)
    paid, poor, final = await new_order(orders), await new_order(orders), await new_order(orders)
    async with orders.begin() as conn:
        await conn.execute(
            text("UPDATE orders SET status = 'FINISHED' WHERE id = :id"), {"id": final}
        )
    unknown = uuid.uuid4()
    finished = final_count("FINISHED")
    async with counting_proxy(orders_db) as (url, counter):
        pool = await counted(url)
        try:
            handle = orders_handler(pool)
            # The first batch on a connection also prepares the statement: not counted.
            assert await handle(results((warm, "PAID"))) == ["processed"]
            counter.reset()

            outcomes: Sequence[Outcome] = await handle(
                results(
                    (paid, "PAID"),
                    (poor, "INSUFFICIENT_FUNDS"),
                    (paid, "INSUFFICIENT_FUNDS"),  # later in the batch: the first won
                    (unknown, "PAID"),  # no such order
                    (final, "INSUFFICIENT_FUNDS"),  # final before the batch
                )
            )
            trips = counter.statements()
        finally:
            await pool.close()

    assert outcomes == [
        "processed",
        "processed",
        "duplicate",
        Rejected(f"no order {unknown}"),
        "duplicate",
    ]
    assert trips == ["<bind>"], trips  # one prepared statement, no BEGIN, no COMMIT
    # Committed when it returned: another connection sees it.
    async with orders.connect() as conn:
        states: dict[uuid.UUID, str] = dict(
            (
                await conn.execute(
                    text("SELECT id, status FROM orders WHERE id = ANY(:ids)"),
                    {"ids": [paid, poor, final]},
                )
            ).all()
        )
    assert states == {paid: "FINISHED", poor: "CANCELLED", final: "FINISHED"}
    assert final_count("FINISHED") - finished == 2  # warm + paid


async def test_an_orders_batch_that_fails_changes_nothing(
    orders_db: str, orders: AsyncEngine
) -> None:
    """Autocommit is per statement, and the batch is one: a failure leaves no order moved."""
    one, two = await new_order(orders), await new_order(orders)
    async with orders.begin() as conn:  # the second order's status change fails
        await conn.execute(
            text(
                f"""
                CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF NEW.id = '{two}' THEN RAISE EXCEPTION 'refused'; END IF;
                    RETURN NEW;
                END $$
                """
            )
        )
        await conn.execute(
            text(
                "CREATE TRIGGER refuse BEFORE UPDATE ON orders "
                "FOR EACH ROW EXECUTE FUNCTION refuse()"
            )
        )
    pool = await worker_pool(orders_db, size=1, application_name="test-refused")
    try:
        with pytest.raises(asyncpg.RaiseError, match="refused"):
            await orders_handler(pool)(results((one, "PAID"), (two, "PAID")))
    finally:
        await pool.close()

    async with orders.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM orders WHERE status = 'NEW'")) == 2


# --------------------------------------------------------------------------- payments


def deliveries(events: Sequence[OrderCreated]) -> list[Delivery[OrderCreated]]:
    return [Delivery(e, payments_record(e)) for e in events]


@pytest.fixture
async def payments(payments_db: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(payments_db, pool_size=5)
    yield engine
    await engine.dispose()


@pytest.fixture
async def pool(payments_db: str) -> AsyncIterator[asyncpg.Pool]:
    """The handler's pool, as the consumer builds it (a connection per partition + 1)."""
    pool = await worker_pool(payments_db, size=2, application_name="test-payments-consumer")
    yield pool
    await pool.close()


async def test_the_payments_common_path_is_four_round_trips(
    payments_db: str, payments: AsyncEngine
) -> None:
    rich, other, broke = (f"u-{uuid.uuid4().hex[:8]}" for _ in range(3))
    await deposit(payments, rich, "100")
    await deposit(payments, other, "10")
    async with counting_proxy(payments_db) as (url, counter):
        pool = await counted(url)
        try:
            handle = payments_handler(pool)
            assert await handle(deliveries([order_created(rich, "1")])) == ["processed"]
            counter.reset()

            batch = [
                order_created(rich, "30"),
                order_created(other, "10"),
                order_created(rich, "80"),  # the balance left (69) does not cover it
                order_created(broke, "5"),  # no account
                order_created(rich, "9"),
            ]
            outcomes = await handle(deliveries(batch))
            trips = counter.statements()
        finally:
            await pool.close()

    assert outcomes == ["processed"] * 5
    assert len(trips) == 4, trips
    assert trips[0].startswith("BEGIN"), trips
    assert trips[-1].startswith("COMMIT"), trips
    assert trips[1:3] == ["<bind>", "<bind>"], trips  # CLAIM_AND_READ, SWAP_AND_RECORD
    statuses = [a.payload.status for a, _ in await answers(payments)][1:]
    assert statuses == ["PAID", "PAID", "INSUFFICIENT_FUNDS", "ACCOUNT_NOT_FOUND", "PAID"]
    assert await balance_of(payments, rich) == Decimal("60")
    assert await balance_of(payments, other) == Decimal("0")
    assert [(d[1], d[2]) for d in await debits(payments, rich)] == [
        (Decimal("1"), Decimal("99")),
        (Decimal("30"), Decimal("69")),
        (Decimal("9"), Decimal("60")),
    ]


async def test_an_order_claimed_concurrently_is_waited_for_and_its_decision_sent_again(
    payments: AsyncEngine, pool: asyncpg.Pool
) -> None:
    """The claim waits for the transaction that claimed the order first; that decision was
    committed after CLAIM_AND_READ's snapshot, so it is read again (STORED_DECISIONS)."""
    uid = f"u-{uuid.uuid4().hex[:8]}"
    await deposit(payments, uid, "100")
    theirs, mine = order_created(uid, "40"), order_created(uid, "25")
    handle = payments_handler(pool)
    async with payments.connect() as other:
        await other.begin()  # a concurrent consumer's transaction, still open
        await other.execute(
            text(
                "INSERT INTO payment_decisions"
                " (order_id, user_id, amount, event_id, status, reason)"
                " VALUES (:order_id, :user_id, 40, :event_id, 'INSUFFICIENT_FUNDS', 'theirs')"
            ),
            {"order_id": theirs.payload.order_id, "user_id": uid, "event_id": uuid.uuid4()},
        )
        handled = asyncio.ensure_future(handle(deliveries([theirs, mine])))
        await until_waiting_on_a_lock(payments)
        await other.commit()
        outcomes = await asyncio.wait_for(handled, 60)

    assert outcomes == ["duplicate", "processed"]
    answered = {a.payload.order_id: a.payload for a, _ in await answers(payments)}
    assert answered[theirs.payload.order_id].status == "INSUFFICIENT_FUNDS"
    assert answered[theirs.payload.order_id].reason == "theirs"
    assert answered[mine.payload.order_id].status == "PAID"
    assert await balance_of(payments, uid) == Decimal("75")  # only mine debited
    assert await count(payments, "SELECT count(*) FROM account_ledger WHERE kind = 'DEBIT'") == 1


async def test_an_order_whose_concurrent_claimer_rolled_back_is_claimed_and_paid(
    payments: AsyncEngine, pool: asyncpg.Pool
) -> None:
    uid = f"u-{uuid.uuid4().hex[:8]}"
    await deposit(payments, uid, "100")
    event = order_created(uid, "40")
    handle = payments_handler(pool)
    async with payments.connect() as other:
        await other.begin()
        await claim_undecided(other, event)
        handled = asyncio.ensure_future(handle(deliveries([event])))
        await until_waiting_on_a_lock(payments)
        await other.rollback()
        outcomes = await asyncio.wait_for(handled, 60)

    assert outcomes == ["processed"]
    assert await balance_of(payments, uid) == Decimal("60")
    async with payments.connect() as conn:
        decided = (await conn.execute(select(PaymentDecision.status))).scalars().all()
    assert decided == ["PAID"]


async def test_a_connection_lost_mid_batch_is_an_outage_and_the_retry_pays_once(
    payments: AsyncEngine,
) -> None:
    """The server ends the batch's connection while its transaction is open (the claim waits
    on another's lock): the handler raises an outage (the runner retries the batch), nothing
    of the batch is kept, the dead connection is not pooled again, and the retry, on the same
    pool, pays the order once."""
    uid = f"u-{uuid.uuid4().hex[:8]}"
    await deposit(payments, uid, "100")
    event = order_created(uid, "40")
    single = await worker_pool(
        payments.url.render_as_string(hide_password=False), size=1, application_name="lost"
    )
    try:
        handle = payments_handler(single)
        async with payments.connect() as other:
            await other.begin()  # holds the order's claim: the batch's claim waits for it
            await claim_undecided(other, event)
            handled = asyncio.ensure_future(handle(deliveries([event])))
            await until_waiting_on_a_lock(payments)
            async with payments.connect() as killer:
                await killer.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE application_name = 'lost'"
                    )
                )
            with pytest.raises(Exception) as lost:  # noqa: PT011 (asserted just below)
                await asyncio.wait_for(handled, 60)
            assert is_retryable(lost.value), repr(lost.value)
            await other.rollback()
        assert await count(payments, "SELECT count(*) FROM payment_decisions") == 0

        assert await asyncio.wait_for(handle(deliveries([event])), 60) == ["processed"]
    finally:
        await single.close()
    assert await balance_of(payments, uid) == Decimal("60")
    assert await count(payments, "SELECT count(*) FROM account_ledger WHERE kind = 'DEBIT'") == 1


async def claim_undecided(conn: AsyncConnection, event: OrderCreated) -> None:
    """Claims the order in `conn`'s open transaction, as a concurrent consumer's claim does
    before it decides (no status yet): a batch claiming the same order waits on its lock."""
    await conn.execute(
        text(
            "INSERT INTO payment_decisions (order_id, user_id, amount, event_id)"
            " VALUES (:order_id, :user_id, :amount, :event_id)"
        ),
        {
            "order_id": event.payload.order_id,
            "user_id": event.payload.user_id,
            "amount": event.payload.amount,
            "event_id": uuid.uuid4(),
        },
    )


async def until_waiting_on_a_lock(engine: AsyncEngine) -> None:
    """Until some backend of this database waits for a lock (the claim, for the other's)."""
    for _ in range(600):
        async with engine.connect() as conn:
            waiting = await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
        if waiting:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the claim never waited for the concurrent transaction")


async def test_a_lost_swap_is_read_again_decided_again_and_recorded_once(
    payments_db: str, payments: AsyncEngine, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deposit commits between the batch's read and its swap: that account's swap loses,
    nothing is recorded; the account is read again, its orders decided again against the new
    balance, and the batch is recorded once, with the other account's swap kept."""
    racer, calm = f"u-{uuid.uuid4().hex[:8]}", f"u-{uuid.uuid4().hex[:8]}"
    await deposit(payments, racer, "50")
    await deposit(payments, calm, "50")
    batch = [order_created(racer, "40"), order_created(calm, "20"), order_created(racer, "30")]
    real_decide = decisions.decide
    calls: list[list[str]] = []

    def racing_decide(
        batch: decisions.Batch, accounts: Mapping[str, decisions.AccountState]
    ) -> decisions.Round:
        decided = real_decide(batch, accounts)
        calls.append([d.status for d in decided.decided.decisions])
        if len(calls) == 1:  # a deposit commits before the first swap (its own connection)
            in_thread(deposit_elsewhere(payments_db, racer, "100"))
        return decided

    monkeypatch.setattr(decisions, "decide", racing_decide)
    conflicts = cas_conflicts()
    handle = payments_handler(pool)

    assert await handle(deliveries(batch)) == ["processed"] * 3

    # First decided against 50 (the second order unpaid), then against 150: both paid.
    assert calls == [
        ["PAID", "PAID", "INSUFFICIENT_FUNDS"],
        ["PAID", "PAID", "PAID"],
    ]
    assert cas_conflicts() - conflicts == 1
    assert await balance_of(payments, racer) == Decimal("80")  # 50 + 100 − 40 − 30
    assert await balance_of(payments, calm) == Decimal("30")
    assert [a.payload.status for a, _ in await answers(payments)] == ["PAID"] * 3
    async with payments.connect() as conn:
        ledger = (
            await conn.execute(
                select(LedgerEntry.user_id, LedgerEntry.amount, LedgerEntry.balance_after)
                .where(LedgerEntry.kind == "DEBIT")
                .order_by(LedgerEntry.id)
            )
        ).all()
    assert sorted(ledger) == sorted(
        [
            (calm, Decimal("20"), Decimal("30")),
            (racer, Decimal("40"), Decimal("110")),
            (racer, Decimal("30"), Decimal("80")),
        ]
    )
    assert await count(payments, "SELECT count(*) FROM payment_inbox") == 3
    assert await count(payments, "SELECT count(*) FROM payment_decisions") == 3


def cas_conflicts() -> float:
    return (
        REGISTRY.get_sample_value("gozon_payments_cas_conflicts_total", {"operation": "debit"})
        or 0.0
    )


async def deposit_elsewhere(url: str, user_id: str, amount: str) -> None:
    engine = create_async_engine(url)
    try:
        await deposit(engine, user_id, amount)
    finally:
        await engine.dispose()


def in_thread(work: object) -> None:
    """Runs a coroutine to its end on a loop of its own, in another thread, and waits."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(work)  # type: ignore[arg-type]
        except BaseException as exc:  # reported in the test's thread
            failures.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    assert not failures, failures


# --------------------------------------------------------------------------- plans


async def plans(pool: asyncpg.Pool, table: str) -> list[tuple[int, int]]:
    """(generic plans, custom plans) of each statement this pool's one connection prepared
    that names `table`."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
            " WHERE statement LIKE '%' || $1 || '%'",
            table,
        )
    return [(row["generic_plans"], row["custom_plans"]) for row in rows]


async def test_the_consumers_statements_are_planned_once_per_connection(
    orders: AsyncEngine, payments: AsyncEngine, orders_db: str, payments_db: str
) -> None:
    """Under PostgreSQL's default (`plan_cache_mode = auto`) the first five executions of a
    prepared statement are planned anew, and then every one whose plan for the actual arrays
    looks cheaper than the generic plan (the orders consumer's UPDATE: all seven here); the
    consumers' pool plans each statement once and reuses that plan."""
    uid = f"u-{uuid.uuid4().hex[:8]}"
    await deposit(payments, uid, "100")
    pay_pool = await worker_pool(payments_db, size=1, application_name="test-plans")
    order_pool = await worker_pool(orders_db, size=1, application_name="test-plans")
    try:
        pay, finish = payments_handler(pay_pool), orders_handler(order_pool)
        for _ in range(7):  # more than the five custom plans `auto` would make first
            assert await pay(deliveries([order_created(uid, "1")])) == ["processed"]
            assert await finish(results((await new_order(orders), "PAID"))) == ["processed"]
        # CLAIM_AND_READ and SWAP_AND_RECORD; the orders consumer's one UPDATE
        payment_plans, order_plans = (
            await plans(pay_pool, "payment_decisions"),
            await plans(order_pool, "UPDATE orders"),
        )
    finally:
        await pay_pool.close()
        await order_pool.close()
    assert len(payment_plans) == 2, payment_plans
    assert len(order_plans) == 1, order_plans
    every = payment_plans + order_plans
    assert [custom for _, custom in every] == [0, 0, 0], every  # never planned for its arrays
    assert all(generic >= 7 for generic, _ in every), every  # one generic plan, reused
