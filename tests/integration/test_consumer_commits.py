"""The consumer runner's coalesced offset commits, through the real Kafka and PostgreSQL (the
orders consumer's handler: one guarded status change per payment result).

Done offsets (their batch's transaction committed) are committed together: every
`commit_interval` even while the fetch loop waits, at once when a fetch comes back empty, at a
stop after the batch in hand, and before a rebalance takes the partitions away; never past what
the database holds. A crash redelivers the uncommitted tail, which the handler counts as
duplicates. A test seam holds the fetch loop where it must not commit by itself: a handler
that blocks on one message (a batch in hand), or a `getmany` that does not return (a fetch
that waits), so that each commit below has one possible cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from devstack import Kafka
from gozon.contracts import PaymentProcessed
from gozon.core.pg import worker_pool
from gozon.messaging.consumer import BatchHandler, ConsumerRunner, Delivery, Outcome
from gozon.messaging.kafka import new_consumer, new_producer
from gozon.orders.consumer import make_handler
from tests.conftest import until
from tests.integration.conftest import new_topic
from tests.integration.test_batched_consumers import messages_count
from tests.integration.test_orders_consumer import new_order, order_state, result

pytestmark = pytest.mark.integration

HOUR = 3600.0  # a commit interval that never elapses within a test


@pytest.fixture
async def engine(orders_db: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(orders_db)
    yield engine
    await engine.dispose()


async def committed(kafka: Kafka, topic: str, group: str) -> dict[int, int]:
    """The group's committed offset of each partition of `topic` that has one."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: int(meta.offset) for tp, meta in offsets.items() if tp.topic == topic}


async def until_committed(
    kafka: Kafka, topic: str, group: str, wanted: dict[int, int], within: float = 30
) -> None:
    async def reached() -> bool:
        return await committed(kafka, topic, group) == wanted

    await until(reached, within, f"offsets {wanted} to be committed")


def order_of(delivery: Delivery[PaymentProcessed]) -> uuid.UUID:
    return delivery.event.payload.order_id


@dataclass
class Gate:
    """A handler seam: records the orders each batch holds; when the batch holding `trigger`
    comes, runs `on_trigger` first (to produce the next message only now, so that it comes
    in a later fetch); a batch holding `blocker` waits for `release` (the first time only)."""

    trigger: uuid.UUID | None = None
    on_trigger: Callable[[], Awaitable[object]] | None = None
    blocker: uuid.UUID | None = None
    seen: list[uuid.UUID] = field(default_factory=list)
    blocked: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def around(
        self, make: Callable[[asyncpg.Pool], BatchHandler[PaymentProcessed]]
    ) -> Callable[[asyncpg.Pool], BatchHandler[PaymentProcessed]]:
        def build(pool: asyncpg.Pool) -> BatchHandler[PaymentProcessed]:
            handle = make(pool)

            async def gated(batch: Sequence[Delivery[PaymentProcessed]]) -> Sequence[Outcome]:
                orders = [order_of(delivery) for delivery in batch]
                self.seen += orders
                if self.trigger in orders and self.on_trigger is not None:
                    await self.on_trigger()
                if self.blocker in orders and not self.blocked.is_set():
                    self.blocked.set()
                    await self.release.wait()
                return await handle(batch)

            return gated

        return build


def hang_fetches_after(
    seen_all: asyncio.Event, resume: asyncio.Event
) -> Callable[[ConsumerRunner[Any]], None]:
    """A seam: once `seen_all` is set, the runner's next fetch waits (returns nothing) until
    `resume` is set: no empty fetch, so no idle commit, meanwhile."""

    def install(runner: ConsumerRunner[Any]) -> None:
        getmany = runner.consumer.getmany

        async def waiting(*args: Any, **kwargs: Any) -> Any:
            if seen_all.is_set() and not resume.is_set():
                await resume.wait()
            return await getmany(*args, **kwargs)

        runner.consumer.getmany = waiting

    return install


@dataclass
class Running:
    runner: ConsumerRunner[PaymentProcessed]
    stop: asyncio.Event
    task: asyncio.Task[None]


@contextlib.asynccontextmanager
async def runner_task(
    orders_db: str,
    kafka: Kafka,
    topic: str,
    group: str,
    make: Callable[[asyncpg.Pool], BatchHandler[PaymentProcessed]],
    *,
    commit_interval: float,
    before_start: Callable[[ConsumerRunner[PaymentProcessed]], object] = lambda _: None,
) -> AsyncIterator[Running]:
    """A runner in a task of its own: the test may stop it (`stop`) or crash it (cancel)."""
    pool = await worker_pool(orders_db, size=4, application_name="test-consumer")
    producer = new_producer(kafka.bootstrap, client_id="test-dlq")
    consumer = new_consumer(kafka.bootstrap, group_id=group, client_id="test")
    runner = ConsumerRunner(
        consumer=consumer,
        producer=producer,
        topic=topic,
        schema=PaymentProcessed,
        handler=make(pool),
        max_handler_attempts=3,
        commit_interval=commit_interval,
    )
    before_start(runner)
    await producer.start()
    await consumer.start()
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        yield Running(runner, stop, task)
    finally:
        stop.set()
        if not task.done():
            await asyncio.wait_for(task, 30)
        await consumer.stop()  # never commits by itself (enable_auto_commit=False)
        await producer.stop()
        await pool.close()


async def results_for(
    engine: AsyncEngine, producer: AIOKafkaProducer, topic: str, count: int, partition: int = 0
) -> list[uuid.UUID]:
    """`count` NEW orders, and a PAID result for each on `partition`, in order."""
    orders = [await new_order(engine) for _ in range(count)]
    for order_id in orders:
        await producer.send_and_wait(
            topic, value=result(order_id, "PAID"), key=b"u-1", partition=partition
        )
    return orders


async def states(engine: AsyncEngine, orders: Sequence[uuid.UUID]) -> list[str]:
    return [(await order_state(engine, order_id))[0] for order_id in orders]


async def test_done_offsets_are_committed_every_interval_while_the_fetch_loop_waits(
    orders_db: str, engine: AsyncEngine, kafka: Kafka, producer: AIOKafkaProducer
) -> None:
    topic = await new_topic(kafka, "test.commits", partitions=1)
    group = f"g-{uuid.uuid4().hex[:8]}"
    orders = await results_for(engine, producer, topic, 5)
    seen_all, resume = asyncio.Event(), asyncio.Event()
    gate = Gate(trigger=orders[-1], on_trigger=lambda: _set(seen_all))
    async with runner_task(
        orders_db,
        kafka,
        topic,
        group,
        gate.around(make_handler),
        commit_interval=0.2,
        before_start=hang_fetches_after(seen_all, resume),
    ):
        # The fetch loop now waits in a fetch that does not return: neither an empty fetch
        # nor a stop can commit; only the interval's task does.
        await until_committed(kafka, topic, group, {0: 5})
        assert await states(engine, orders) == ["FINISHED"] * 5
        resume.set()


async def _set(event: asyncio.Event) -> None:
    event.set()


async def test_a_committed_offset_never_passes_a_batch_still_in_hand(
    orders_db: str, engine: AsyncEngine, kafka: Kafka, producer: AIOKafkaProducer
) -> None:
    topic = await new_topic(kafka, "test.commits", partitions=1)
    group = f"g-{uuid.uuid4().hex[:8]}"
    orders = await results_for(engine, producer, topic, 5)
    late = await new_order(engine)
    gate = Gate(
        trigger=orders[-1],
        on_trigger=lambda: producer.send_and_wait(topic, value=result(late, "PAID"), key=b"u-1"),
        blocker=late,
    )
    async with runner_task(
        orders_db, kafka, topic, group, gate.around(make_handler), commit_interval=0.2
    ):
        await until(lambda: _is_set(gate.blocked), 30, "the late message's batch to block")
        await until_committed(kafka, topic, group, {0: 5})
        assert await states(engine, [*orders, late]) == ["FINISHED"] * 5 + ["NEW"]
        for _ in range(5):  # five intervals more: still not past what the database holds
            await asyncio.sleep(0.2)
            assert await committed(kafka, topic, group) == {0: 5}
        gate.release.set()
        await until_committed(kafka, topic, group, {0: 6})
        assert await order_state(engine, late) == ("FINISHED", None)


async def _is_set(event: asyncio.Event) -> bool:
    return event.is_set()


async def test_an_empty_fetch_commits_the_done_offsets_at_once(
    orders_db: str, engine: AsyncEngine, kafka: Kafka, producer: AIOKafkaProducer
) -> None:
    topic = await new_topic(kafka, "test.commits", partitions=1)
    group = f"g-{uuid.uuid4().hex[:8]}"
    orders = await results_for(engine, producer, topic, 3)
    # An hour's interval: only an idle fetch can commit these.
    async with runner_task(
        orders_db, kafka, topic, group, make_handler, commit_interval=HOUR
    ) as running:
        await until_committed(kafka, topic, group, {0: 3})
        orders += await results_for(engine, producer, topic, 1)
        await until_committed(kafka, topic, group, {0: 4})
        assert not running.task.done()
    assert await states(engine, orders) == ["FINISHED"] * 4


async def test_a_stop_commits_after_the_batch_in_hand(
    orders_db: str, engine: AsyncEngine, kafka: Kafka, producer: AIOKafkaProducer
) -> None:
    topic = await new_topic(kafka, "test.commits", partitions=1)
    group = f"g-{uuid.uuid4().hex[:8]}"
    orders = await results_for(engine, producer, topic, 3)
    late = await new_order(engine)
    gate = Gate(
        trigger=orders[-1],
        on_trigger=lambda: producer.send_and_wait(topic, value=result(late, "PAID"), key=b"u-1"),
        blocker=late,
    )
    async with runner_task(
        orders_db, kafka, topic, group, gate.around(make_handler), commit_interval=HOUR
    ) as running:
        await until(lambda: _is_set(gate.blocked), 30, "the late message's batch to block")
        assert (await committed(kafka, topic, group)).get(0, 0) <= 3
        running.stop.set()  # SIGTERM while the batch is in hand
        gate.release.set()
        await asyncio.wait_for(running.task, 30)
        # The batch finished, no fetch came after the stop: only the stop's commit did this.
        assert await committed(kafka, topic, group) == {0: 4}
    assert await states(engine, [*orders, late]) == ["FINISHED"] * 4


async def test_a_crash_redelivers_the_uncommitted_tail_as_duplicates_and_loses_nothing(
    orders_db: str, engine: AsyncEngine, kafka: Kafka, producer: AIOKafkaProducer
) -> None:
    topic = await new_topic(kafka, "test.commits", partitions=1)
    group = f"g-{uuid.uuid4().hex[:8]}"
    orders = await results_for(engine, producer, topic, 5)
    seen_all, resume = asyncio.Event(), asyncio.Event()
    gate = Gate(trigger=orders[-1], on_trigger=lambda: _set(seen_all))
    async with runner_task(
        orders_db,
        kafka,
        topic,
        group,
        gate.around(make_handler),
        commit_interval=HOUR,
        before_start=hang_fetches_after(seen_all, resume),
    ) as running:
        await until(lambda: _is_set(seen_all), 30, "every result to be handled")
        await until(lambda: _all_finished(engine, orders), 30, "every order to be FINISHED")
        # The crash: every order is in the database, the last batch's offset is not committed
        # (an hour's interval, a fetch that waits), and the process ends without a commit.
        running.task.cancel()
        await asyncio.wait([running.task])
        resume.set()
    before = (await committed(kafka, topic, group)).get(0, 0)
    assert before < 5
    duplicates = messages_count(topic, "duplicate")
    processed = messages_count(topic, "processed")

    again = Gate()
    async with runner_task(
        orders_db, kafka, topic, group, again.around(make_handler), commit_interval=0.2
    ):
        await until_committed(kafka, topic, group, {0: 5})
    # Exactly the uncommitted tail came again, each message a counted duplicate, and no order
    # was lost or changed twice.
    assert again.seen == orders[before:]
    assert messages_count(topic, "duplicate") - duplicates == 5 - before
    assert messages_count(topic, "processed") == processed
    assert await states(engine, orders) == ["FINISHED"] * 5


async def _all_finished(engine: AsyncEngine, orders: Sequence[uuid.UUID]) -> bool:
    return await states(engine, orders) == ["FINISHED"] * len(orders)


async def test_a_rebalance_commits_the_done_offsets_before_the_partitions_go(
    orders_db: str, engine: AsyncEngine, kafka: Kafka, producer: AIOKafkaProducer
) -> None:
    topic = await new_topic(kafka, "test.commits", partitions=2)
    group = f"g-{uuid.uuid4().hex[:8]}"
    first = await results_for(engine, producer, topic, 5, partition=0)
    second = await results_for(engine, producer, topic, 5, partition=1)
    late = await new_order(engine)
    # The first consumer handles all ten, then blocks in a batch holding `late` (so no empty
    # fetch commits for it), with an hour's interval: its done offsets are pending.
    gate = Gate(
        trigger=second[-1],
        on_trigger=lambda: producer.send_and_wait(
            topic, value=result(late, "PAID"), key=b"u-1", partition=1
        ),
        blocker=late,
    )
    newcomer = Gate()
    async with runner_task(
        orders_db, kafka, topic, group, gate.around(make_handler), commit_interval=HOUR
    ) as one:
        await until(lambda: _is_set(gate.blocked), 30, "the late message's batch to block")
        assert await states(engine, [*first, *second]) == ["FINISHED"] * 10
        async with runner_task(
            orders_db, kafka, topic, group, newcomer.around(make_handler), commit_interval=0.2
        ) as two:
            both = {TopicPartition(topic, 0), TopicPartition(topic, 1)}

            async def split() -> bool:
                mine, theirs = one.runner.consumer.assignment(), two.runner.consumer.assignment()
                return bool(mine) and bool(theirs) and mine | theirs == both

            await until(split, 60, "the two consumers to share the partitions")

            # The first consumer committed what it had done before it gave its partitions up
            # (its batch in hand, `late`, recorded nothing); the newcomer may have handled
            # `late` since, if it got partition 1.
            async def handed_over() -> bool:
                offsets = await committed(kafka, topic, group)
                return offsets.get(0) == 5 and offsets.get(1) in (5, 6)

            await until(handed_over, 30, "the done offsets committed before the rebalance")
            gate.release.set()
            # Whoever owns partition 1 now handles `late` (again, if the first consumer kept
            # it: its batch in hand recorded nothing); nobody redoes the first ten.
            await until_committed(kafka, topic, group, {0: 5, 1: 6})
            assert set(newcomer.seen) <= {late}
            assert gate.seen.count(late) + newcomer.seen.count(late) in (1, 2)
            for order_id in [*first, *second]:
                assert gate.seen.count(order_id) == 1
    assert await states(engine, [*first, *second, late]) == ["FINISHED"] * 11
