"""Mixed batches through the real Kafka and PostgreSQL: the consumers handle each partition's
fetched batch in one transaction, and a batch holds duplicates, two orders racing one balance,
poison messages and a database failure in its middle. Each test produces every message before
the consumer starts, so one fetch holds them all (checked: the handler saw one batch)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from decimal import Decimal
from typing import Literal, TypeVar

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from prometheus_client import REGISTRY
from pydantic import BaseModel
from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from devstack import Kafka
from gozon.contracts import (
    OrderCreated,
    PaymentProcessed,
    PaymentProcessedPayload,
    utc_now,
)
from gozon.core.pg import Database, worker_pool
from gozon.messaging.consumer import DLQ_REASON, BatchHandler, Delivery, Outcome, Record
from gozon.messaging.dlq import list_dead_letters, redrive, table
from gozon.messaging.kafka import dlq_topic
from gozon.orders.consumer import make_handler as orders_handler
from gozon.orders.models import Order
from gozon.payments import service
from gozon.payments.consumer import make_handler as payments_handler
from gozon.payments.models import Account, LedgerEntry, PaymentDecision, payment_outbox
from tests.conftest import (
    holds,
    huge_poison,
    largest_value_the_broker_accepts,
    running_consumer,
    until,
)
from tests.integration.conftest import new_topic, role_of_its_own
from tests.integration.test_orders_consumer import committed, until_committed
from tests.integration.test_payments_consumer import order_created
from tests.integration.test_relay import consume

pytestmark = pytest.mark.integration

E = TypeVar("E", bound=BaseModel)


@pytest.fixture
async def topic(kafka: Kafka) -> str:
    return await new_topic(kafka, "test.batch", partitions=1)


@pytest.fixture
async def payments(payments_db: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(payments_db)
    yield engine
    await engine.dispose()


async def produce(producer: AIOKafkaProducer, topic: str, values: Sequence[bytes]) -> list[str]:
    """Sends the values in order, each with a traceparent of its own; returns the trace ids."""
    trace_ids = []
    for value in values:
        trace_id = uuid.uuid4().hex
        traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01".encode()
        await producer.send_and_wait(
            topic, value=value, key=b"k", headers=[("traceparent", traceparent)]
        )
        trace_ids.append(trace_id)
    return trace_ids


def recording(
    make: Callable[[asyncpg.Pool], BatchHandler[E]], sizes: list[int]
) -> Callable[[asyncpg.Pool], BatchHandler[E]]:
    """The handler, recording the size of each batch it is given."""

    def build(pool: asyncpg.Pool) -> BatchHandler[E]:
        handle = make(pool)

        async def recorded(batch: Sequence[Delivery[E]]) -> Sequence[Outcome]:
            sizes.append(len(batch))
            return await handle(batch)

        return recorded

    return build


def messages_count(topic: str, outcome: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "gozon_consumer_messages_total", {"topic": topic, "outcome": outcome}
        )
        or 0.0
    )


# --------------------------------------------------------------------------- payments


def value(event: OrderCreated | PaymentProcessed) -> bytes:
    return event.model_dump_json().encode()


async def deposit(engine: AsyncEngine, user_id: str, amount: str) -> None:
    """A deposit as the payments API makes it (`gozon.core.pg.Database`), into `engine`'s
    database."""
    db = await Database.open(
        engine.url.render_as_string(hide_password=False),
        pool_size=1,
        application_name="test-deposit",
        pool_timeout_s=60,
        statement_timeout_s=60,
    )
    try:
        await service.deposit(db=db, user_id=user_id, amount=Decimal(amount), idempotency_key=None)
    finally:
        await db.close()


async def balance_of(engine: AsyncEngine, user_id: str) -> Decimal | None:
    async with engine.connect() as conn:
        found: Decimal | None = await conn.scalar(
            select(Account.balance).where(Account.user_id == user_id)
        )
    return found


async def answers(engine: AsyncEngine) -> list[tuple[PaymentProcessed, dict[str, str]]]:
    """Every payment_outbox row, in id order: the answer and its headers."""
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(payment_outbox.c.payload, payment_outbox.c.headers).order_by(
                    payment_outbox.c.id
                )
            )
        ).all()
    return [(PaymentProcessed.model_validate(payload), headers) for payload, headers in rows]


async def debits(engine: AsyncEngine, user_id: str) -> list[tuple[uuid.UUID, Decimal, Decimal]]:
    """(order id, amount, balance after) of the user's debits, in ledger order."""
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(LedgerEntry.order_id, LedgerEntry.amount, LedgerEntry.balance_after)
                .where(LedgerEntry.user_id == user_id, LedgerEntry.kind == "DEBIT")
                .order_by(LedgerEntry.id)
            )
        ).all()
    return [(row.order_id, row.amount, row.balance_after) for row in rows]


async def count(engine: AsyncEngine, sql: str) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text(sql)) or 0)


async def test_duplicates_inside_one_batch_debit_once_and_each_delivery_is_answered(
    payments_db: str,
    payments: AsyncEngine,
    kafka: Kafka,
    topic: str,
    producer: AIOKafkaProducer,
) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    await deposit(payments, user, "100")
    first = order_created(user, "30")
    envelope = order_created(user, "30", order_id=first.payload.order_id)  # a new event id
    other = order_created(user, "20")
    batch = [first, first, envelope, other]
    trace_ids = await produce(producer, topic, [value(e) for e in batch])
    sizes: list[int] = []
    processed, duplicates = messages_count(topic, "processed"), messages_count(topic, "duplicate")

    group = f"g-{uuid.uuid4().hex[:8]}"
    handler = recording(payments_handler, sizes)
    async with running_consumer(payments_db, kafka, topic, group, OrderCreated, handler):
        await until_committed(kafka, topic, group, len(batch))

    assert sizes == [4]  # one batch, one transaction
    assert await balance_of(payments, user) == Decimal("50")
    assert await debits(payments, user) == [
        (first.payload.order_id, Decimal("30"), Decimal("70")),
        (other.payload.order_id, Decimal("20"), Decimal("50")),
    ]
    assert await count(payments, "SELECT count(*) FROM payment_inbox") == 3  # 3 event ids
    assert await count(payments, "SELECT count(*) FROM payment_decisions") == 2
    answered = await answers(payments)
    assert [a.payload.order_id for a, _ in answered] == [e.payload.order_id for e in batch]
    assert [a.payload.status for a, _ in answered] == ["PAID"] * 4
    # Each answer continues the trace of the message it answers.
    assert [headers["traceparent"].split("-")[1] for _, headers in answered] == trace_ids
    assert messages_count(topic, "processed") - processed == 2
    assert messages_count(topic, "duplicate") - duplicates == 2


async def test_two_orders_racing_one_balance_are_decided_in_offset_order(
    payments_db: str,
    payments: AsyncEngine,
    kafka: Kafka,
    topic: str,
    producer: AIOKafkaProducer,
) -> None:
    user, bystander = f"u-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    await deposit(payments, user, "100")
    await deposit(payments, bystander, "5")
    batch = [
        order_created(user, "60"),
        order_created(bystander, "5"),
        order_created(user, "50"),  # the balance left (40) does not cover it
        order_created(user, "40"),  # but it covers this later, smaller one
        order_created(bystander, "0.01"),
    ]
    await produce(producer, topic, [value(e) for e in batch])
    sizes: list[int] = []

    group = f"g-{uuid.uuid4().hex[:8]}"
    handler = recording(payments_handler, sizes)
    async with running_consumer(payments_db, kafka, topic, group, OrderCreated, handler):
        await until_committed(kafka, topic, group, len(batch))

    assert sizes == [5]
    statuses = [a.payload.status for a, _ in await answers(payments)]
    assert statuses == ["PAID", "PAID", "INSUFFICIENT_FUNDS", "PAID", "INSUFFICIENT_FUNDS"]
    assert await balance_of(payments, user) == Decimal("0")
    assert await balance_of(payments, bystander) == Decimal("0")
    assert await debits(payments, user) == [
        (batch[0].payload.order_id, Decimal("60"), Decimal("40")),
        (batch[3].payload.order_id, Decimal("40"), Decimal("0")),
    ]
    async with payments.connect() as conn:
        decided = dict(
            (await conn.execute(select(PaymentDecision.order_id, PaymentDecision.status))).all()
        )
    assert decided[batch[2].payload.order_id] == "INSUFFICIENT_FUNDS"
    assert decided[batch[4].payload.order_id] == "INSUFFICIENT_FUNDS"


async def test_a_poison_message_in_the_middle_is_dead_lettered_and_the_rest_commit(
    payments_db: str,
    payments: AsyncEngine,
    kafka: Kafka,
    topic: str,
    producer: AIOKafkaProducer,
) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    await deposit(payments, user, "100")
    before, after = order_created(user, "10"), order_created(user, "15")
    nobody = order_created(f"nobody-{uuid.uuid4().hex[:6]}", "1")
    poison = b'{"event_type": "OrderCreated", "payload": {"amount": -1}}'
    await produce(producer, topic, [value(before), poison, value(nobody), value(after)])
    sizes: list[int] = []

    group = f"g-{uuid.uuid4().hex[:8]}"
    handler = recording(payments_handler, sizes)
    async with running_consumer(payments_db, kafka, topic, group, OrderCreated, handler):
        await until_committed(kafka, topic, group, 4)

    assert sizes == [3]  # the three valid messages, in one transaction
    answered = await answers(payments)
    assert [(a.payload.order_id, a.payload.status) for a, _ in answered] == [
        (before.payload.order_id, "PAID"),
        (nobody.payload.order_id, "ACCOUNT_NOT_FOUND"),
        (after.payload.order_id, "PAID"),
    ]
    assert await balance_of(payments, user) == Decimal("75")
    dead = await consume(kafka.bootstrap, dlq_topic(topic), at_least=1)
    assert [record.value for record in dead] == [poison]
    headers = dict(dead[0].headers)
    assert headers[DLQ_REASON].decode().startswith("invalid message: ")
    assert headers["x-dlq-original-offset"] == b"1"


async def test_a_message_that_fails_the_handler_alone_is_dead_lettered_and_the_rest_commit(
    payments_db: str,
    payments: AsyncEngine,
    kafka: Kafka,
    topic: str,
    producer: AIOKafkaProducer,
) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    await deposit(payments, user, "100")
    batch = [order_created(user, "10"), order_created(user, "20"), order_created(user, "30")]
    bad = batch[1].payload.order_id
    # A fault of this one message that no retry cures (not an outage): the database refuses it.
    async with payments.begin() as conn:
        await conn.execute(
            text(
                f"""
                CREATE FUNCTION refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF NEW.order_id = '{bad}' THEN
                        RAISE EXCEPTION 'this order is refused' USING ERRCODE = 'check_violation';
                    END IF;
                    RETURN NEW;
                END $$
                """
            )
        )
        await conn.execute(
            text(
                "CREATE TRIGGER refuse_one BEFORE INSERT ON payment_outbox "
                "FOR EACH ROW EXECUTE FUNCTION refuse_one()"
            )
        )
    await produce(producer, topic, [value(e) for e in batch])
    sizes: list[int] = []

    group = f"g-{uuid.uuid4().hex[:8]}"
    handler = recording(payments_handler, sizes)
    async with running_consumer(payments_db, kafka, topic, group, OrderCreated, handler):
        await until_committed(kafka, topic, group, 3, within=60)

    # The batch failed (3 attempts), then each message alone: two committed, one refused.
    assert sizes == [3, 3, 3, 1, 1, 1, 1, 1]
    answered = await answers(payments)
    assert [a.payload.order_id for a, _ in answered] == [
        batch[0].payload.order_id,
        batch[2].payload.order_id,
    ]
    assert await balance_of(payments, user) == Decimal("60")  # nothing of the refused one
    dead = await consume(kafka.bootstrap, dlq_topic(topic), at_least=1)
    assert [record.offset for record in dead] == [0]
    assert dict(dead[0].headers)["x-dlq-original-offset"] == b"1"
    reason = dict(dead[0].headers)[DLQ_REASON].decode()
    assert reason.startswith("handler failed: ")
    assert "this order is refused" in reason


async def test_a_database_failure_mid_batch_retries_the_whole_batch_and_nothing_is_doubled(
    payments_db: str,
    payments: AsyncEngine,
    kafka: Kafka,
    topic: str,
    producer: AIOKafkaProducer,
) -> None:
    users = [f"u-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    for user in users:
        await deposit(payments, user, "100")
    batch = [order_created(users[n % 3], "7.50") for n in range(12)]
    # The database drops the consumer's connection twice, in the batch's last statement (after
    # its claims and balance swaps): a real outage in the middle of the transaction.
    async with payments.begin() as conn:
        await conn.execute(text("CREATE SEQUENCE drops"))
        await conn.execute(
            text(
                """
                CREATE FUNCTION drop_connection() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF nextval('drops') <= 2 THEN
                        PERFORM pg_terminate_backend(pg_backend_pid());
                        PERFORM pg_sleep(5);
                    END IF;
                    RETURN NULL;
                END $$
                """
            )
        )
        await conn.execute(
            text(
                "CREATE TRIGGER drop_connection BEFORE INSERT ON payment_outbox "
                "FOR EACH STATEMENT EXECUTE FUNCTION drop_connection()"
            )
        )
    await produce(producer, topic, [value(e) for e in batch])
    sizes: list[int] = []
    dead_lettered = messages_count(topic, "dead_lettered")

    group = f"g-{uuid.uuid4().hex[:8]}"
    handler = recording(payments_handler, sizes)
    async with running_consumer(payments_db, kafka, topic, group, OrderCreated, handler):
        await until_committed(kafka, topic, group, len(batch), within=60)

    assert sizes == [12, 12, 12]  # two attempts lost with their connection, the third committed
    assert await count(payments, "SELECT last_value FROM drops") == 3
    for user in users:
        assert await balance_of(payments, user) == Decimal("70.00")  # 4 × 7.50 each, once
        assert len(await debits(payments, user)) == 4
    assert await count(payments, "SELECT count(*) FROM payment_inbox") == 12
    assert await count(payments, "SELECT count(*) FROM payment_decisions") == 12
    answered = await answers(payments)
    assert [a.payload.order_id for a, _ in answered] == [e.payload.order_id for e in batch]
    assert {a.payload.status for a, _ in answered} == {"PAID"}
    assert messages_count(topic, "dead_lettered") == dead_lettered  # (before the offset)


async def test_a_grant_taken_away_holds_the_batch_until_it_is_back_and_nothing_is_dead_lettered(
    payments: AsyncEngine,
    kafka: Kafka,
    topic: str,
    producer: AIOKafkaProducer,
) -> None:
    """A database that refuses the consumer itself (a grant revoked; a migration not run, a
    wrong role, a read-only standby after a failover are the same kind) refuses every message
    alike: the batch waits for the fix, as in an outage, and no message is dead-lettered for
    what is not its fault."""
    user = f"u-{uuid.uuid4().hex[:8]}"
    await deposit(payments, user, "100")
    batch = [order_created(user, "10"), order_created(user, "20"), order_created(user, "30")]
    await produce(producer, topic, [value(e) for e in batch])
    sizes: list[int] = []
    dead_lettered = messages_count(topic, "dead_lettered")
    group = f"g-{uuid.uuid4().hex[:8]}"
    handler = recording(payments_handler, sizes)

    async with role_of_its_own(payments) as (role, as_role):
        async with payments.begin() as conn:
            await conn.execute(text(f"REVOKE INSERT ON payment_outbox FROM {role}"))
        async with running_consumer(as_role, kafka, topic, group, OrderCreated, handler) as runner:
            # Twice the attempts after which a message's own fault splits the batch.
            await until(holds(lambda: len(sizes) >= 6), 60, "six attempts of the batch")
            assert set(sizes) == {3}  # never split into single messages to dead-letter
            assert runner.refused  # the consumer reports not ready meanwhile (ACCEPTS_WORK)
            assert await committed(kafka, topic, group) is None
            assert await balance_of(payments, user) == Decimal("100")

            async with payments.begin() as conn:
                await conn.execute(text(f"GRANT INSERT ON payment_outbox TO {role}"))
            await until_committed(kafka, topic, group, 3, within=60)
            assert not runner.refused

    assert await balance_of(payments, user) == Decimal("40")
    answered = await answers(payments)
    assert [(a.payload.order_id, a.payload.status) for a, _ in answered] == [
        (e.payload.order_id, "PAID") for e in batch
    ]
    assert messages_count(topic, "dead_lettered") == dead_lettered


# --------------------------------------------------------------------------- orders


@pytest.fixture
async def orders(orders_db: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(orders_db)
    yield engine
    await engine.dispose()


async def new_order(engine: AsyncEngine) -> uuid.UUID:
    order_id = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            insert(Order).values(
                id=order_id,
                user_id="u-1",
                amount=Decimal("10.00"),
                description="x",
                status="NEW",
                created_at=utc_now(),
            )
        )
    return order_id


def payment_result(
    order_id: uuid.UUID, status: Literal["PAID", "INSUFFICIENT_FUNDS", "ACCOUNT_NOT_FOUND"]
) -> bytes:
    return value(
        PaymentProcessed(
            aggregate_id=str(order_id),
            payload=PaymentProcessedPayload(
                order_id=order_id,
                user_id="u-1",
                amount=Decimal("10"),
                status=status,
                reason=None if status == "PAID" else "why",
                processed_at=utc_now(),
            ),
        )
    )


def final_count(status: str) -> float:
    return REGISTRY.get_sample_value("gozon_orders_final_total", {"status": status}) or 0.0


def latency_count(status: str) -> float:
    return (
        REGISTRY.get_sample_value("gozon_order_to_final_seconds_count", {"status": status}) or 0.0
    )


async def test_orders_one_batch_first_result_wins_duplicates_counted_unknown_dead_lettered(
    orders_db: str,
    orders: AsyncEngine,
    kafka: Kafka,
    topic: str,
    producer: AIOKafkaProducer,
) -> None:
    paid, poor, final = await new_order(orders), await new_order(orders), await new_order(orders)
    async with orders.begin() as conn:  # already final before the batch
        await conn.execute(
            text("UPDATE orders SET status = 'FINISHED' WHERE id = :id"), {"id": final}
        )
    unknown = uuid.uuid4()
    batch = [
        payment_result(paid, "PAID"),
        payment_result(poor, "INSUFFICIENT_FUNDS"),
        payment_result(paid, "INSUFFICIENT_FUNDS"),  # later in the batch: the first won
        payment_result(unknown, "PAID"),  # no such order: dead-lettered
        payment_result(final, "INSUFFICIENT_FUNDS"),  # final before: a duplicate
        payment_result(poor, "PAID"),
    ]
    await produce(producer, topic, batch)
    sizes: list[int] = []
    finished, cancelled = final_count("FINISHED"), final_count("CANCELLED")
    finished_seen = latency_count("FINISHED")
    processed, duplicates = messages_count(topic, "processed"), messages_count(topic, "duplicate")

    group = f"g-{uuid.uuid4().hex[:8]}"
    handler = recording(orders_handler, sizes)
    async with running_consumer(orders_db, kafka, topic, group, PaymentProcessed, handler):
        await until_committed(kafka, topic, group, len(batch))

    assert sizes == [6]
    async with orders.connect() as conn:
        states = dict(
            (
                await conn.execute(
                    select(Order.id, Order.status).where(Order.id.in_([paid, poor, final]))
                )
            ).all()
        )
    assert states == {paid: "FINISHED", poor: "CANCELLED", final: "FINISHED"}
    assert final_count("FINISHED") - finished == 1
    assert final_count("CANCELLED") - cancelled == 1
    assert latency_count("FINISHED") - finished_seen == 1
    assert messages_count(topic, "processed") - processed == 2
    assert messages_count(topic, "duplicate") - duplicates == 3
    dead = await consume(kafka.bootstrap, dlq_topic(topic), at_least=1)
    assert [dict(record.headers)["x-dlq-original-offset"] for record in dead] == [b"3"]
    assert dict(dead[0].headers)[DLQ_REASON].decode() == f"rejected: no order {unknown}"


@pytest.fixture
async def roomy(payments_db: str) -> AsyncIterator[AsyncEngine]:
    """An engine with a connection for every racer, patient on a busy machine."""
    engine = create_async_engine(
        payments_db, pool_size=30, pool_timeout=120, connect_args={"timeout": 60}
    )
    yield engine
    await engine.dispose()


@pytest.fixture
async def racers(payments_db: str) -> AsyncIterator[asyncpg.Pool]:
    """The handlers' pool (as the consumer builds it), a connection for every batch."""
    pool = await worker_pool(payments_db, size=6, application_name="test-racers")
    yield pool
    await pool.close()


async def test_concurrent_batches_and_deposits_on_one_account_neither_create_nor_lose_money(
    roomy: AsyncEngine, racers: asyncpg.Pool
) -> None:
    """Batches racing each other and deposits for one balance (as two consumers do while a
    partition moves, with the API taking deposits): lost swaps are re-decided, never doubled."""
    payments = roomy
    user = f"u-{uuid.uuid4().hex[:8]}"
    await deposit(payments, user, "300")
    handle = payments_handler(racers)
    orders = [order_created(user, f"{(n % 7 + 1) * 3}.25") for n in range(120)]
    batches = [orders[n : n + 20] for n in range(0, len(orders), 20)]
    deposits = [f"{n + 10}.50" for n in range(20)]
    conflicts = REGISTRY.get_sample_value(
        "gozon_payments_cas_conflicts_total", {"operation": "debit"}
    )

    await asyncio.gather(
        *(handle([Delivery(e, record_of(e)) for e in batch]) for batch in batches),
        *(deposit(payments, user, amount) for amount in deposits),
    )

    answered = {a.payload.order_id: a.payload.status for a, _ in await answers(payments)}
    assert set(answered) == {e.payload.order_id for e in orders}
    paid = [e.payload.amount for e in orders if answered[e.payload.order_id] == "PAID"]
    assert 0 < len(paid) < len(orders)
    balance = await balance_of(payments, user)
    assert balance == Decimal("300") + sum(Decimal(d) for d in deposits) - sum(paid)
    async with payments.connect() as conn:
        ledger = (
            await conn.execute(
                select(LedgerEntry.kind, LedgerEntry.amount, LedgerEntry.balance_after).order_by(
                    LedgerEntry.id
                )
            )
        ).all()
    running = Decimal(0)
    for kind, amount, balance_after in ledger:  # the ledger replays the balance, never below 0
        running += amount if kind == "DEPOSIT" else -amount
        assert balance_after == running >= 0
    assert running == balance
    assert (
        REGISTRY.get_sample_value("gozon_payments_cas_conflicts_total", {"operation": "debit"}) or 0
    ) > (conflicts or 0), "the batches were meant to race"


def record_of(event: OrderCreated) -> Record:
    data = value(event)
    return ConsumerRecord(
        topic="order.created.event",
        partition=0,
        offset=0,
        timestamp=0,
        timestamp_type=0,
        key=b"k",
        value=data,
        checksum=None,
        serialized_key_size=1,
        serialized_value_size=len(data),
        headers=[],
    )


# --------------------------------------------------------------------------- exact money

# Amounts a float parser would round into valid money (21, 1.00) or cannot hold, and amounts
# out of range: each must be dead-lettered, never rounded and never debited or applied.
INEXACT_AMOUNTS = (
    "20.999999999999999999",
    "1.000000000000000000000000000001",
    "10.001",
    "1e400",
    "-10",
    "100000000000000000000",  # more than NUMERIC(19,2) holds
)


def with_amount(event_value: bytes, amount: str) -> bytes:
    """The event's JSON text with its amount's number replaced by `amount`, as written."""
    head, _, tail = event_value.decode().partition('"amount":')
    number_end = min(i for i in (tail.find(","), tail.find("}")) if i >= 0)
    return f'{head}"amount":{amount}{tail[number_end:]}'.encode()


async def test_payments_dead_letter_an_inexact_amount_and_never_debit_a_rounded_one(
    payments_db: str,
    payments: AsyncEngine,
    kafka: Kafka,
    topic: str,
    producer: AIOKafkaProducer,
) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    await deposit(payments, user, "100")
    inexact = [with_amount(value(order_created(user, "5")), a) for a in INEXACT_AMOUNTS]
    exact = order_created(user, "7.25")
    await produce(producer, topic, [*inexact, value(exact)])

    group = f"g-{uuid.uuid4().hex[:8]}"
    async with running_consumer(payments_db, kafka, topic, group, OrderCreated, payments_handler):
        await until_committed(kafka, topic, group, len(inexact) + 1)

    assert await debits(payments, user) == [
        (exact.payload.order_id, Decimal("7.25"), Decimal("92.75"))
    ]
    answered = await answers(payments)
    assert [a.payload.order_id for a, _ in answered] == [exact.payload.order_id]
    dead = await consume(kafka.bootstrap, dlq_topic(topic), at_least=len(inexact))
    assert [record.value for record in dead] == inexact  # unchanged, as written
    for record in dead:
        reason = dict(record.headers)[DLQ_REASON].decode()
        assert reason.startswith("invalid message: "), reason
        assert "payload.amount" in reason, reason


async def test_orders_dead_letter_a_result_with_an_inexact_amount_and_leave_the_order_new(
    orders_db: str,
    orders: AsyncEngine,
    kafka: Kafka,
    topic: str,
    producer: AIOKafkaProducer,
) -> None:
    waiting = [await new_order(orders) for _ in INEXACT_AMOUNTS]
    paid = await new_order(orders)
    inexact = [
        with_amount(payment_result(order_id, "PAID"), amount)
        for order_id, amount in zip(waiting, INEXACT_AMOUNTS, strict=True)
    ]
    await produce(producer, topic, [*inexact, payment_result(paid, "PAID")])

    group = f"g-{uuid.uuid4().hex[:8]}"
    async with running_consumer(orders_db, kafka, topic, group, PaymentProcessed, orders_handler):
        await until_committed(kafka, topic, group, len(inexact) + 1)

    async with orders.connect() as conn:
        states = dict(
            (
                await conn.execute(
                    select(Order.id, Order.status).where(Order.id.in_([*waiting, paid]))
                )
            ).all()
        )
    assert states == {**dict.fromkeys(waiting, "NEW"), paid: "FINISHED"}
    dead = await consume(kafka.bootstrap, dlq_topic(topic), at_least=len(inexact))
    assert [record.value for record in dead] == inexact


# --------------------------------------------------------------------------- bounded waits


async def test_a_lock_held_past_the_lock_timeout_retries_the_batch_never_skips_it(
    payments_db: str,
    payments: AsyncEngine,
    kafka: Kafka,
    topic: str,
    producer: AIOKafkaProducer,
) -> None:
    """The account's row is locked by someone else (a frozen peer, until the server ends its
    session) for longer than the consumer's `lock_timeout` (2 s), several times over: each
    attempt gives up (55P03) and the batch is retried whole — never dead-lettered as a
    handler failure, its offset never committed before the debit, the order debited once."""
    user = f"u-{uuid.uuid4().hex[:8]}"
    await deposit(payments, user, "100")
    order = order_created(user, "10")
    await produce(producer, topic, [value(order)])
    sizes: list[int] = []
    group = f"g-{uuid.uuid4().hex[:8]}"
    holder = await asyncpg.connect(payments_db.replace("postgresql+asyncpg", "postgresql"))
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT 1 FROM accounts WHERE user_id = $1 FOR UPDATE", user)
        handler = recording(payments_handler, sizes)
        async with running_consumer(payments_db, kafka, topic, group, OrderCreated, handler):
            # more attempts than a failing handler gets (running_consumer's 3)
            await until(lambda: asyncio.sleep(0, len(sizes) >= 4), 60, "four attempts")
            assert await committed(kafka, topic, group) is None  # nothing recorded yet
            assert await debits(payments, user) == []
            await transaction.rollback()
            await until_committed(kafka, topic, group, 1, within=60)
    finally:
        await holder.close()
    assert await debits(payments, user) == [
        (order.payload.order_id, Decimal("10.00"), Decimal("90.00"))
    ]
    assert set(sizes) == {1}  # retried whole, never as a message that failed on its own
    assert messages_count(topic, "dead_lettered") == 0


# --------------------------------------------------------------------------- poison of any size


@pytest.mark.parametrize("service", ["payments", "orders"])
async def test_a_message_of_the_largest_size_the_broker_accepts_is_dead_lettered_bounded(
    service: str,
    payments_db: str,
    orders_db: str,
    orders: AsyncEngine,
    kafka: Kafka,
    topic: str,
    producer: AIOKafkaProducer,
) -> None:
    """Its copy with the `x-dlq-*` headers is over the producer's (and the broker's) limit:
    it is dead-lettered as a bounded record, the consumer goes on with the next message, and
    `dlq list` / `dlq redrive` show it and pass over it."""
    size = await largest_value_the_broker_accepts(kafka.bootstrap)
    assert size > 1_000_000
    poison = huge_poison(size)
    if service == "payments":
        user = f"u-{uuid.uuid4().hex[:8]}"
        after: bytes = value(order_created(user, "3"))
        database, schema, handler = payments_db, OrderCreated, payments_handler
    else:
        paid = await new_order(orders)
        after = payment_result(paid, "PAID")
        database, schema, handler = orders_db, PaymentProcessed, orders_handler  # type: ignore[assignment]
    big = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, max_request_size=4 * 1024 * 1024)
    await big.start()
    try:
        traceparent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01".encode()
        await big.send_and_wait(topic, value=poison, key=b"k", headers=[])
        await big.send_and_wait(
            topic, value=after, key=b"k", headers=[("traceparent", traceparent)]
        )
    finally:
        await big.stop()
    bounded_before = (
        REGISTRY.get_sample_value("gozon_consumer_dead_letters_bounded_total", {"topic": topic})
        or 0.0
    )

    group = f"g-{uuid.uuid4().hex[:8]}"
    async with running_consumer(database, kafka, topic, group, schema, handler) as runner:
        await until_committed(kafka, topic, group, 2, within=60)
        assert runner.database_ok

    if service == "orders":
        async with orders.connect() as conn:
            status = await conn.scalar(select(Order.status).where(Order.id == paid))
        assert status == "FINISHED"
    dead = await consume(kafka.bootstrap, dlq_topic(topic), at_least=1)
    assert len(dead) == 1
    record = dead[0]
    assert record.value is not None
    assert len(record.value) < 8 * 1024  # bounded, whatever the message's size
    headers = dict(record.headers)
    assert headers[DLQ_REASON].decode().startswith("invalid message: ")
    assert headers["x-dlq-original-offset"] == b"0"
    assert headers["x-dlq-bounded"].decode().startswith("too large to copy")
    assert headers["x-dlq-original-size"] == str(size).encode()
    summary = json.loads(record.value)
    assert summary["origin"] == {
        "topic": topic,
        "partition": 0,
        "offset": 0,
        "timestamp_ms": summary["origin"]["timestamp_ms"],
    }
    assert summary["key"] == "k"
    assert summary["value_bytes"] == size
    assert summary["value_sha256"] == hashlib.sha256(poison).hexdigest()
    assert summary["value_prefix"] == poison[:1024].decode()
    assert (
        REGISTRY.get_sample_value("gozon_consumer_dead_letters_bounded_total", {"topic": topic})
        == bounded_before + 1
    )

    letters, total = await list_dead_letters(kafka.bootstrap, dlq_topic(topic))
    assert total == 1
    assert letters[0].bounded
    assert letters[0].original_size == size
    assert "[bounded: " in table(letters)
    result = await redrive(kafka.bootstrap, dlq_topic(topic), group=f"{group}.dlq-redrive")
    assert (result.redriven, [letter.offset for letter in result.bounded]) == ([], [0])
    again = await redrive(kafka.bootstrap, dlq_topic(topic), group=f"{group}.dlq-redrive")
    assert (again.redriven, again.bounded) == ([], [])  # the cursor moved past it
