"""The payments consumer's handler against the real PostgreSQL: each `OrderCreated` is paid at
most once, answered exactly once, and no concurrency creates or loses a cent. Here each call
handles one message (a batch of one); mixed batches are in test_batched_consumers.py."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal

import asyncpg
import pytest
from aiokafka.structs import ConsumerRecord
from prometheus_client import REGISTRY
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from gozon.contracts import (
    ORDER_CREATED_TOPIC,
    OrderCreated,
    OrderCreatedPayload,
    PaymentProcessed,
    utc_now,
)
from gozon.core.pg import Database, worker_pool
from gozon.messaging.consumer import Delivery, Record
from gozon.payments import service
from gozon.payments.consumer import make_handler as batch_handler
from gozon.payments.models import (
    DEBIT,
    DEPOSIT,
    Account,
    InboxEntry,
    LedgerEntry,
    payment_outbox,
)

pytestmark = pytest.mark.integration

Sessions = async_sessionmaker[AsyncSession]


@pytest.fixture
async def engine(payments_db: str) -> AsyncIterator[AsyncEngine]:
    # Room for many transactions at once, so that the concurrency tests really race; the
    # handlers are called directly (no runner retries a slow connect), so connecting and
    # waiting for a pooled connection get the patience of a busy machine.
    engine = create_async_engine(
        payments_db,
        pool_size=20,
        max_overflow=20,
        pool_timeout=120,
        connect_args={"timeout": 60, "command_timeout": 120},
    )
    yield engine
    await engine.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> Sessions:
    return async_sessionmaker(engine, expire_on_commit=False)


@pytest.fixture
async def db(payments_db: str) -> AsyncIterator[Database]:
    """The payments API's database access, for the deposits (room for 20 at once, patient)."""
    db = await Database.open(
        payments_db,
        pool_size=10,
        application_name="test-payments-deposits",
        pool_timeout_s=120,
        statement_timeout_s=120,
    )
    yield db
    await db.close()


@pytest.fixture
async def pool(payments_db: str) -> AsyncIterator[asyncpg.Pool]:
    """The handlers' pool (as `gozon payments consumer` builds it), with room for 20
    transactions at once, so that the concurrency tests really race (more calls wait for a
    connection, as batches of more partitions than connections would)."""
    pool = await worker_pool(payments_db, size=20, application_name="test-payments-consumer")
    yield pool
    await pool.close()


def make_handler(pool: asyncpg.Pool) -> Callable[[OrderCreated, Record], Awaitable[str]]:
    """The batch handler, given one message per call (a batch of one, its own transaction):
    concurrent calls race as concurrent consumers' transactions do."""
    handler = batch_handler(pool)

    async def handle(event: OrderCreated, record: Record) -> str:
        (outcome,) = await handler([Delivery(event, record)])
        assert isinstance(outcome, str), outcome
        return outcome

    return handle


def user() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"


def order_created(user_id: str, amount: str, order_id: uuid.UUID | None = None) -> OrderCreated:
    order_id = order_id or uuid.uuid4()
    return OrderCreated(
        aggregate_id=str(order_id),
        payload=OrderCreatedPayload(
            order_id=order_id,
            user_id=user_id,
            amount=Decimal(amount),
            description="test",
            created_at=utc_now(),
        ),
    )


def record_of(event: OrderCreated) -> Record:
    value = event.model_dump_json().encode()
    key = event.payload.user_id.encode()
    return ConsumerRecord(
        topic=ORDER_CREATED_TOPIC,
        partition=0,
        offset=0,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=len(key),
        serialized_value_size=len(value),
        headers=[],
    )


async def deposit(db: Database, user_id: str, amount: str) -> None:
    await service.deposit(db=db, user_id=user_id, amount=Decimal(amount), idempotency_key=None)


async def balance_of(sessions: Sessions, user_id: str) -> Decimal | None:
    async with sessions() as session:
        return await session.scalar(select(Account.balance).where(Account.user_id == user_id))


async def rows_for_order(sessions: Sessions, order_id: uuid.UUID) -> tuple[int, int, int]:
    """(inbox rows, ledger debits, outbox rows) of one order."""
    async with sessions() as session:
        inbox = await session.scalar(
            select(func.count()).select_from(InboxEntry).where(InboxEntry.order_id == order_id)
        )
        debits = await session.scalar(
            select(func.count()).select_from(LedgerEntry).where(LedgerEntry.order_id == order_id)
        )
        outbox = await session.scalar(
            select(func.count())
            .select_from(payment_outbox)
            .where(payment_outbox.c.order_id == order_id)
        )
    return int(inbox or 0), int(debits or 0), int(outbox or 0)


async def answer_for(sessions: Sessions, order_id: uuid.UUID) -> PaymentProcessed:
    async with sessions() as session:
        payload = await session.scalar(
            select(payment_outbox.c.payload).where(payment_outbox.c.order_id == order_id)
        )
    return PaymentProcessed.model_validate(payload)


async def answers_for(sessions: Sessions, order_id: uuid.UUID) -> list[PaymentProcessed]:
    async with sessions() as session:
        payloads = await session.scalars(
            select(payment_outbox.c.payload)
            .where(payment_outbox.c.order_id == order_id)
            .order_by(payment_outbox.c.id)
        )
        return [PaymentProcessed.model_validate(p) for p in payloads]


def outcome_count(outcome: str) -> float:
    return REGISTRY.get_sample_value("gozon_payment_outcomes_total", {"outcome": outcome}) or 0.0


async def test_an_order_within_the_balance_is_debited_recorded_and_answered(
    db: Database,
    sessions: Sessions,
    pool: asyncpg.Pool,
) -> None:
    uid = user()
    await deposit(db, uid, "5000")
    event = order_created(uid, "1500.99")
    handle = make_handler(pool)
    paid_before = outcome_count("paid")

    assert await handle(event, record_of(event)) == "processed"

    assert await balance_of(sessions, uid) == Decimal("3499.01")
    assert await rows_for_order(sessions, event.payload.order_id) == (1, 1, 1)
    async with sessions() as session:
        inbox = await session.scalar(select(InboxEntry))
        debit = await session.scalar(select(LedgerEntry).where(LedgerEntry.kind == DEBIT))
        outbox = (await session.execute(select(payment_outbox))).one()
    assert inbox is not None
    assert inbox.idempotency_key == event.event_id
    assert (inbox.status, inbox.reason, inbox.amount) == ("PAID", None, Decimal("1500.99"))
    assert debit is not None
    assert (debit.amount, debit.balance_after) == (Decimal("1500.99"), Decimal("3499.01"))
    assert debit.order_id == event.payload.order_id
    assert outbox.topic == "payment.processed.event"
    assert outbox.message_key == uid
    assert outbox.user_id == uid
    assert outbox.status == "PENDING"
    answer = PaymentProcessed.model_validate(outbox.payload)
    assert answer.aggregate_id == str(event.payload.order_id)
    assert answer.payload.status == "PAID"
    assert answer.payload.amount == Decimal("1500.99")
    assert outbox.payload["payload"]["amount"] == 1500.99  # an exact JSON number
    assert outcome_count("paid") == paid_before + 1


async def test_duplicate_order_event_debits_once(
    db: Database, sessions: Sessions, pool: asyncpg.Pool
) -> None:
    uid = user()
    await deposit(db, uid, "100")
    event = order_created(uid, "60")
    handle = make_handler(pool)

    outcomes = [await handle(event, record_of(event)) for _ in range(3)]

    assert outcomes == ["processed", "duplicate", "duplicate"]
    assert await balance_of(sessions, uid) == Decimal("40")
    # one inbox row, one debit; each delivery is answered with the one decision
    assert await rows_for_order(sessions, event.payload.order_id) == (1, 1, 3)


async def test_concurrent_deliveries_of_one_order_event_debit_once(
    db: Database, sessions: Sessions, pool: asyncpg.Pool
) -> None:
    uid = user()
    await deposit(db, uid, "100")
    event = order_created(uid, "60")
    handle = make_handler(pool)

    outcomes = await asyncio.gather(*(handle(event, record_of(event)) for _ in range(5)))

    assert sorted(outcomes) == ["duplicate"] * 4 + ["processed"]
    assert await balance_of(sessions, uid) == Decimal("40")
    assert await rows_for_order(sessions, event.payload.order_id) == (1, 1, 5)


async def test_insufficient_funds_leaves_the_balance_unchanged(
    db: Database, sessions: Sessions, pool: asyncpg.Pool
) -> None:
    uid = user()
    await deposit(db, uid, "100")
    event = order_created(uid, "100.01")

    assert await make_handler(pool)(event, record_of(event)) == "processed"

    assert await balance_of(sessions, uid) == Decimal("100")
    assert await rows_for_order(sessions, event.payload.order_id) == (1, 0, 1)
    answer = await answer_for(sessions, event.payload.order_id)
    assert answer.payload.status == "INSUFFICIENT_FUNDS"
    assert answer.payload.reason


async def test_an_order_of_the_whole_balance_is_paid_down_to_zero(
    db: Database, sessions: Sessions, pool: asyncpg.Pool
) -> None:
    uid = user()
    await deposit(db, uid, "100")
    event = order_created(uid, "100.00")

    await make_handler(pool)(event, record_of(event))

    assert await balance_of(sessions, uid) == Decimal("0")
    assert (await answer_for(sessions, event.payload.order_id)).payload.status == "PAID"


async def test_an_order_without_an_account_is_account_not_found_and_opens_none(
    sessions: Sessions,
    pool: asyncpg.Pool,
) -> None:
    uid = user()
    event = order_created(uid, "10")

    assert await make_handler(pool)(event, record_of(event)) == "processed"

    assert await balance_of(sessions, uid) is None
    assert await rows_for_order(sessions, event.payload.order_id) == (1, 0, 1)
    answer = await answer_for(sessions, event.payload.order_id)
    assert answer.payload.status == "ACCOUNT_NOT_FOUND"
    assert answer.payload.reason


async def test_a_new_envelope_for_a_paid_order_debits_nothing_and_answers_paid_again(
    db: Database,
    sessions: Sessions,
    pool: asyncpg.Pool,
) -> None:
    uid = user()
    await deposit(db, uid, "100")
    first = order_created(uid, "30")
    second = order_created(uid, "30", order_id=first.payload.order_id)  # another event id
    handle = make_handler(pool)

    assert await handle(first, record_of(first)) == "processed"
    assert await handle(second, record_of(second)) == "duplicate"

    assert await balance_of(sessions, uid) == Decimal("70")
    assert await rows_for_order(sessions, first.payload.order_id) == (2, 1, 2)
    answers = await answers_for(sessions, first.payload.order_id)
    assert [a.payload.status for a in answers] == ["PAID", "PAID"]


async def test_a_cancelled_order_stays_unpaid_after_a_top_up_whatever_the_envelope(
    db: Database,
    sessions: Sessions,
    pool: asyncpg.Pool,
) -> None:
    uid = user()
    await deposit(db, uid, "10")
    first = order_created(uid, "50")
    handle = make_handler(pool)
    assert await handle(first, record_of(first)) == "processed"
    await deposit(db, uid, "100")  # the user tops up after the cancellation

    retry = order_created(uid, "50", order_id=first.payload.order_id)
    outcomes = await asyncio.gather(
        handle(retry, record_of(retry)), handle(first, record_of(first))
    )

    assert list(outcomes) == ["duplicate", "duplicate"]
    assert await balance_of(sessions, uid) == Decimal("110")
    assert await rows_for_order(sessions, first.payload.order_id) == (2, 0, 3)
    answers = await answers_for(sessions, first.payload.order_id)
    assert {a.payload.status for a in answers} == {"INSUFFICIENT_FUNDS"}


async def test_concurrent_new_envelopes_of_one_order_decide_it_once(
    db: Database, sessions: Sessions, pool: asyncpg.Pool
) -> None:
    uid = user()
    await deposit(db, uid, "100")
    order_id = uuid.uuid4()
    events = [order_created(uid, "60", order_id=order_id) for _ in range(5)]
    handle = make_handler(pool)

    outcomes = await asyncio.gather(*(handle(e, record_of(e)) for e in events))

    assert sorted(outcomes) == ["duplicate"] * 4 + ["processed"]
    assert await balance_of(sessions, uid) == Decimal("40")
    assert await rows_for_order(sessions, order_id) == (5, 1, 5)


async def test_the_ledger_refuses_a_second_debit_of_one_order(
    db: Database, sessions: Sessions, pool: asyncpg.Pool
) -> None:
    """Belt and braces behind the decision: the database allows one debit per order."""
    uid = user()
    await deposit(db, uid, "100")
    event = order_created(uid, "30")
    assert await make_handler(pool)(event, record_of(event)) == "processed"
    async with sessions() as session:
        account_id = await session.scalar(select(Account.id).where(Account.user_id == uid))
    with pytest.raises(IntegrityError, match="uq_account_ledger_debit_order_id"):
        async with sessions() as session, session.begin():
            await session.execute(
                insert(LedgerEntry).values(
                    account_id=account_id,
                    user_id=uid,
                    kind=DEBIT,
                    amount=Decimal(30),
                    balance_after=Decimal(40),
                    order_id=event.payload.order_id,
                )
            )
    assert await balance_of(sessions, uid) == Decimal("70")


async def test_concurrent_orders_and_deposits_on_one_account_neither_create_nor_lose_money(
    db: Database,
    sessions: Sessions,
    pool: asyncpg.Pool,
) -> None:
    uid = user()
    initial = Decimal("1000")
    await deposit(db, uid, str(initial))
    rng = random.Random(20261124)
    orders = [order_created(uid, f"{rng.randint(100, 9999) / 100:.2f}") for _ in range(200)]
    deposits = [f"{rng.randint(100, 4999) / 100:.2f}" for _ in range(50)]
    handle = make_handler(pool)
    conflicts_before = sum(
        REGISTRY.get_sample_value("gozon_payments_cas_conflicts_total", {"operation": op}) or 0
        for op in ("debit", "deposit")
    )
    work: list[Awaitable[object]] = [handle(event, record_of(event)) for event in orders]
    work += [deposit(db, uid, amount) for amount in deposits]
    rng.shuffle(work)

    await asyncio.gather(*work)

    async with sessions() as session:
        inbox = (await session.execute(select(InboxEntry.order_id, InboxEntry.status))).all()
        ledger = (await session.scalars(select(LedgerEntry).order_by(LedgerEntry.id))).all()
        outbox = await session.scalar(select(func.count()).select_from(payment_outbox))
    balance = await balance_of(sessions, uid)
    assert balance is not None

    # Every order has exactly one inbox row and one answer.
    assert sorted(str(order_id) for order_id, _ in inbox) == sorted(
        str(event.payload.order_id) for event in orders
    )
    assert outbox == len(orders)
    statuses = {order_id: status for order_id, status in inbox}
    assert set(statuses.values()) <= {"PAID", "INSUFFICIENT_FUNDS"}
    paid = [e.payload.amount for e in orders if statuses[e.payload.order_id] == "PAID"]
    assert paid, "some orders must have been paid"
    assert len(paid) < len(orders), "the orders were meant to outrun the money"

    # No money created or lost: the balance is the sum of what came in minus what was paid.
    assert balance == initial + sum(Decimal(d) for d in deposits) - sum(paid)
    debits = [entry for entry in ledger if entry.kind == DEBIT]
    credits = [entry for entry in ledger if entry.kind == DEPOSIT]
    assert len(debits) == len(paid)
    assert len(credits) == 1 + len(deposits)
    assert sum(e.amount for e in credits) - sum(e.amount for e in debits) == balance

    # The ledger replays the balance step by step, and it never went below zero.
    running = Decimal(0)
    for entry in ledger:
        running += entry.amount if entry.kind == DEPOSIT else -entry.amount
        assert entry.balance_after == running >= 0
    assert running == balance

    conflicts = sum(
        REGISTRY.get_sample_value("gozon_payments_cas_conflicts_total", {"operation": op}) or 0
        for op in ("debit", "deposit")
    )
    assert conflicts > conflicts_before, "the changes were meant to race"


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE account_ledger SET amount = amount + 1",
        "DELETE FROM account_ledger",
        "TRUNCATE account_ledger",
    ],
)
async def test_the_ledger_refuses_to_be_rewritten(payments_db: str, statement: str) -> None:
    engine = create_async_engine(payments_db)
    db = await Database.open(
        payments_db,
        pool_size=1,
        application_name="test-ledger",
        pool_timeout_s=60,
        statement_timeout_s=60,
    )
    try:
        await service.deposit(db=db, user_id="ledger", amount=Decimal("10"), idempotency_key=None)
        with pytest.raises(DBAPIError, match="account_ledger is append-only"):
            async with engine.begin() as conn:
                await conn.execute(text(statement))
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT sum(amount) FROM account_ledger")) == 10
    finally:
        await db.close()
        await engine.dispose()
