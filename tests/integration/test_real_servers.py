"""The foundation: the test session's PostgreSQL and Kafka are real servers that do real work."""

from __future__ import annotations

import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from devstack import Kafka, Postgres, create_topics

pytestmark = pytest.mark.integration


async def test_a_committed_row_is_visible_to_another_connection(postgres: Postgres) -> None:
    engine = create_async_engine(postgres.url("order_db"))
    table = f"probe_{uuid.uuid4().hex[:8]}"
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"CREATE TABLE {table} (id int PRIMARY KEY, note text)"))
            await conn.execute(text(f"INSERT INTO {table} VALUES (1, 'заказ')"))
        async with engine.connect() as other:
            rows = (await other.execute(text(f"SELECT id, note FROM {table}"))).all()
            version = (await other.execute(text("SHOW server_version_num"))).scalar_one()
        assert [tuple(row) for row in rows] == [(1, "заказ")]
        assert int(version) >= 150000
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        await engine.dispose()


async def test_a_message_round_trips_through_the_broker_byte_for_byte(kafka: Kafka) -> None:
    topic = f"probe.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka.bootstrap, [topic], partitions=1)
    key = b"user-123"
    value = b'{"amount": 1500.99}\x00\xff\xfe binary tail'
    headers = [
        ("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ("raw", bytes(range(256))),
    ]

    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        sent = await producer.send_and_wait(topic, value=value, key=key, headers=headers)
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=f"probe-{uuid.uuid4().hex[:8]}",
    )
    await consumer.start()
    try:
        received: ConsumerRecord[bytes, bytes] = await consumer.getone()
    finally:
        await consumer.stop()

    assert (received.partition, received.offset) == (sent.partition, sent.offset)
    assert received.key == key
    assert received.value == value
    assert list(received.headers) == headers


async def test_the_broker_runs_with_the_development_tuning(kafka: Kafka) -> None:
    """The broker applied every setting of DEV_BROKER_CONFIG (Kafka ignores a key it does not
    know, with a warning: a renamed setting would silently stop working) and its JVM runs with
    DEV_JVM_OPTIONS."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from devstack.kafka import DEV_BROKER_CONFIG, DEV_JVM_OPTIONS
    from devstack.system import cmdline

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.BROKER, "1", dict.fromkeys(DEV_BROKER_CONFIG))]
        )
    finally:
        await admin.close()
    ((error, _, _, _, entries),) = response.resources
    assert error == 0
    applied = {entry[0]: entry[1] for entry in entries}
    assert applied == dict(DEV_BROKER_CONFIG)
    pid = kafka.running_pid()
    assert pid is not None
    assert set(DEV_JVM_OPTIONS) <= set(cmdline(pid).split())
