"""The processes against a Kafka that authenticates (SASL SCRAM-SHA-512) and authorizes (ACLs),
as the chart's Strimzi Kafka does: a broker of this module's own with both listeners, and one
whose SCRAM listener is TLS (SASL_SSL) with a certificate from a CA of the test's own.

The orders relay and consumer and the `dlq` command connect with a user that has only the
rights their jobs need, and no right to create topics: with `GOZON_KAFKA_CREATE_TOPICS=false`
they create none, and wait for a missing topic instead. A wrong password is refused in words.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import port_for
import pytest
import trustme
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from cryptography.hazmat.primitives import serialization
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from devstack import GozonProcess, Kafka, throwaway_kafka, wait_for
from gozon.contracts import ORDER_CREATED_TOPIC, PAYMENT_PROCESSED_TOPIC
from gozon.messaging.kafka import (
    KafkaAccess,
    KafkaAccessRefused,
    TopicsNotCreated,
    dlq_topic,
    ensure_topics,
    new_producer,
    start_client,
)
from tests.integration.test_relay import insert_events

pytestmark = pytest.mark.integration

USER, PASSWORD = "orders-worker", "orders-secret-1"
GROUP = "orders-auth"


@pytest.fixture(scope="module")
def sasl_kafka(servers_dir: Path) -> Iterator[Kafka]:
    """A broker with a SCRAM listener and ACLs: the orders user may write the topic its relay
    publishes, read the one its consumer consumes (in its group) and write that one's DLQ.
    No Create anywhere; the payments topic's DLQ does not exist yet."""
    folder = servers_dir / f"kafka-sasl-{uuid.uuid4().hex[:6]}"
    with throwaway_kafka(folder, heap="384m", scram_users={USER: PASSWORD}) as server:
        server.create_topics([ORDER_CREATED_TOPIC, PAYMENT_PROCESSED_TOPIC])
        server.allow(USER, ["WRITE", "DESCRIBE"], topics=[ORDER_CREATED_TOPIC])
        server.allow(USER, ["READ", "DESCRIBE"], topics=[PAYMENT_PROCESSED_TOPIC])
        server.allow(
            USER, ["WRITE", "READ", "DESCRIBE"], topics=[dlq_topic(PAYMENT_PROCESSED_TOPIC)]
        )
        server.allow(USER, ["READ"], groups=[GROUP])
        yield server


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_kafka(servers_dir: Path, tls_ca: trustme.CA) -> Iterator[Kafka]:
    """A broker whose SCRAM listener is TLS, its certificate issued by `tls_ca` for
    127.0.0.1; the orders user may write the orders topic."""
    folder = servers_dir / f"kafka-tls-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    cert = tls_ca.issue_cert("127.0.0.1", "localhost")
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
    keystore = folder / "keystore.pem"  # Kafka's PEM key store: a PKCS#8 key, then the chain
    keystore.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        + b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    )
    with throwaway_kafka(
        folder / "kafka", heap="384m", scram_users={USER: PASSWORD}, tls_keystore=keystore
    ) as server:
        server.create_topics([ORDER_CREATED_TOPIC])
        server.allow(USER, ["WRITE", "DESCRIBE"], topics=[ORDER_CREATED_TOPIC])
        yield server


@pytest.fixture
async def engine(orders_db: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(orders_db)
    yield engine
    await engine.dispose()


def sasl_env(kafka: Kafka, password_file: Path) -> dict[str, str]:
    return {
        "GOZON_KAFKA_BOOTSTRAP_SERVERS": kafka.sasl_bootstrap,
        "GOZON_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "GOZON_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "GOZON_KAFKA_SASL_USERNAME": USER,
        "GOZON_KAFKA_SASL_PASSWORD_FILE": str(password_file),
        "GOZON_KAFKA_CREATE_TOPICS": "false",
    }


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "password"
    path.write_text(PASSWORD + "\n")  # as a mounted secret may end
    return path


def worker(kind: str, orders_db: str, env: dict[str, str], log: Path) -> GozonProcess:
    port = port_for.select_random()
    return GozonProcess(
        ["orders", kind],
        env={
            **env,
            "GOZON_ORDERS_DATABASE_URL": orders_db,
            f"GOZON_ORDERS_{kind.upper()}_METRICS_PORT": str(port),
            "GOZON_ORDERS_GROUP_ID": GROUP,
        },
        log=log,
        health_url=f"http://127.0.0.1:{port}",
    )


def gozon(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gozon.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def topics_on(kafka: Kafka) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)  # the super user's listener
    await admin.start()
    try:
        return {name for name in await admin.list_topics() if not name.startswith("__")}
    finally:
        await admin.close()


async def read_all(kafka: Kafka, topic: str, count: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        async with asyncio.timeout(120):
            while len(values) < count:
                batches = await consumer.getmany(timeout_ms=1000)
                values += [r.value for batch in batches.values() for r in batch if r.value]
    finally:
        await consumer.stop()
    return values


async def test_the_orders_workers_authenticate_with_scram_under_acls_and_create_no_topic(
    sasl_kafka: Kafka, engine: AsyncEngine, orders_db: str, password_file: Path, process_logs: Path
) -> None:
    env = sasl_env(sasl_kafka, password_file)
    dlq = dlq_topic(PAYMENT_PROCESSED_TOPIC)
    relay = worker("relay", orders_db, env, process_logs / "relay.log").start(ready=True)
    consumer = worker("consumer", orders_db, env, process_logs / "consumer.log").start()
    try:
        # The relay publishes as the orders user: what it reads from the outbox lands.
        ids = await insert_events(engine, ORDER_CREATED_TOPIC, 3)
        published = await read_all(sasl_kafka, ORDER_CREATED_TOPIC, 3)
        assert {json.loads(value)["event_id"] for value in published} == ids

        # The consumer's dead-letter topic is missing and it may not create it: it waits,
        # live and not ready, and nothing is created behind the operator's back.
        await asyncio.sleep(5)
        assert consumer.status("/health/ready") == 503
        assert consumer.status("/health/live") == 200
        assert dlq not in await topics_on(sasl_kafka)
        assert "do not exist" in consumer.logs()
        await asyncio.to_thread(sasl_kafka.create_topics, [dlq])  # the operator's turn
        await asyncio.to_thread(
            wait_for, lambda: consumer.status() == 200, timeout=120, what="the consumer ready"
        )

        # It consumes in its group as the orders user, and dead-letters what it cannot read.
        plain = new_producer(sasl_kafka.bootstrap, client_id="test")
        await plain.start()
        try:
            await plain.send_and_wait(PAYMENT_PROCESSED_TOPIC, b"not an event", key=b"k")
        finally:
            await plain.stop()
        assert await read_all(sasl_kafka, dlq, 1) == [b"not an event"]
        assert await topics_on(sasl_kafka) == {ORDER_CREATED_TOPIC, PAYMENT_PROCESSED_TOPIC, dlq}

        # The operator's command reads the dead letters with the same credentials.
        listed = await asyncio.to_thread(gozon, "orders", "dlq", "list", env=env)
        assert listed.returncode == 0, listed.stderr
        assert f"{dlq}: 1 dead letters" in listed.stdout
        assert relay.stop() == 0
        assert consumer.stop() == 0
    finally:
        relay.kill()
        consumer.kill()
    logs = relay.logs() + consumer.logs()
    assert "refuses this process" not in logs
    assert "CreateTopics" not in logs


async def test_a_wrong_password_is_refused_in_words(
    sasl_kafka: Kafka, orders_db: str, tmp_path: Path, process_logs: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password")
    env = sasl_env(sasl_kafka, wrong)

    listed = await asyncio.to_thread(gozon, "orders", "dlq", "list", env=env)
    assert listed.returncode == 2
    assert f"refused user '{USER}' with SCRAM-SHA-512" in listed.stderr
    assert "GOZON_KAFKA_SASL_USERNAME" in listed.stderr

    relay = worker("relay", orders_db, env, process_logs / "relay.log").start()
    try:
        await asyncio.to_thread(
            wait_for,
            lambda: "kafka refuses this process" in relay.logs(),
            timeout=120,
            what="the relay to log the refusal",
        )
        assert relay.status("/health/ready") == 503
        assert relay.status("/health/live") == 200
        assert relay.stop() == 0
    finally:
        relay.kill()

    # In process: the same refusal as a KafkaAccessRefused, and the right password passes.
    access = KafkaAccess(
        sasl_kafka.sasl_bootstrap, "SASL_PLAINTEXT", "SCRAM-SHA-512", USER, "not-the-password"
    )
    producer = new_producer(access, client_id="test-wrong")
    with pytest.raises(KafkaAccessRefused, match="invalid credentials"):
        await start_client(producer, access)
    await producer.stop()
    right = KafkaAccess(
        sasl_kafka.sasl_bootstrap, "SASL_PLAINTEXT", "SCRAM-SHA-512", USER, PASSWORD
    )
    producer = new_producer(right, client_id="test-right")
    await start_client(producer, right)
    await producer.stop()


async def test_a_user_without_create_is_told_so_instead_of_a_silent_success(
    sasl_kafka: Kafka,
) -> None:
    name = f"auth.none.{uuid.uuid4().hex[:8]}"
    access = KafkaAccess(
        sasl_kafka.sasl_bootstrap, "SASL_PLAINTEXT", "SCRAM-SHA-512", USER, PASSWORD
    )
    with pytest.raises(TopicsNotCreated, match="this user may not create topics"):
        await ensure_topics(access, [name], with_dlq=False)
    assert name not in await topics_on(sasl_kafka)


async def test_a_topic_the_broker_cannot_make_is_an_error(kafka: Kafka) -> None:
    """One broker cannot hold three replicas: the broker's refusal, not a silent success."""
    name = f"auth.rf3.{uuid.uuid4().hex[:8]}"
    with pytest.raises(TopicsNotCreated, match=rf"{name} \(error 38: .*replication factor"):
        await ensure_topics(kafka.bootstrap, [name], replication_factor=3, with_dlq=False)


async def test_the_relay_publishes_over_tls_with_the_ca_it_is_given(
    tls_kafka: Kafka,
    tls_ca: trustme.CA,
    orders_db: str,
    engine: AsyncEngine,
    password_file: Path,
    tmp_path: Path,
    process_logs: Path,
) -> None:
    """SASL_SSL with GOZON_KAFKA_SSL_CA_FILE (Strimzi's cluster CA in the chart): the relay
    verifies the broker's certificate against that CA and publishes as its own user."""
    ca_file = tmp_path / "ca.crt"
    tls_ca.cert_pem.write_to_path(str(ca_file))
    env = sasl_env(tls_kafka, password_file) | {
        "GOZON_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "GOZON_KAFKA_SSL_CA_FILE": str(ca_file),
    }
    ids = await insert_events(engine, ORDER_CREATED_TOPIC, 5)
    relay = worker("relay", orders_db, env, process_logs / "relay-tls.log").start()
    try:
        await asyncio.to_thread(
            wait_for, lambda: relay.status() == 200, timeout=120, what="the relay ready"
        )
        published = await read_all(tls_kafka, ORDER_CREATED_TOPIC, len(ids))
        assert {json.loads(value)["event_id"] for value in published} == ids
        assert relay.stop() == 0
    finally:
        relay.kill()


async def test_a_broker_certificate_from_another_ca_is_refused_in_words(
    tls_kafka: Kafka, tmp_path: Path, password_file: Path
) -> None:
    """Trusting another CA (or the system's) the client refuses the broker: no fallback to an
    unverified connection, and the reason names the CA setting."""
    stranger = tmp_path / "other-ca.crt"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    env = sasl_env(tls_kafka, password_file) | {
        "GOZON_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "GOZON_KAFKA_SSL_CA_FILE": str(stranger),
    }
    listed = await asyncio.to_thread(gozon, "orders", "dlq", "list", env=env)
    assert listed.returncode == 2, listed.stdout + listed.stderr
    assert f"TLS with Kafka at {tls_kafka.sasl_bootstrap} failed" in listed.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in listed.stderr
    assert "GOZON_KAFKA_SSL_CA_FILE" in listed.stderr

    access = KafkaAccess(
        tls_kafka.sasl_bootstrap, "SASL_SSL", "SCRAM-SHA-512", USER, PASSWORD
    )  # the system's CAs
    producer = new_producer(access, client_id="test-system-cas")
    with pytest.raises(KafkaAccessRefused, match="CERTIFICATE_VERIFY_FAILED"):
        await start_client(producer, access)
    await producer.stop()


async def test_a_worker_restarts_itself_when_its_password_file_changes(
    sasl_kafka: Kafka, orders_db: str, password_file: Path, process_logs: Path
) -> None:
    """A rotated KafkaUser secret: the mounted file changes under a running relay, which logs
    in only when it connects. It stops cleanly and exits 75 (its supervisor starts it again,
    with the new password) instead of failing its next login for ever."""
    env = sasl_env(sasl_kafka, password_file)
    relay = worker("relay", orders_db, env, process_logs / "relay-rotated.log").start()
    try:
        await asyncio.to_thread(
            wait_for, lambda: relay.status() == 200, timeout=120, what="the relay ready"
        )
        await asyncio.sleep(6)  # a check with the same password: no restart
        assert relay.process is not None
        assert relay.process.poll() is None
        await asyncio.to_thread(password_file.write_text, "rotated-" + PASSWORD + "\n")
        await asyncio.to_thread(
            wait_for,
            lambda: relay.process is not None and relay.process.poll() is not None,
            timeout=60,
            what="the relay to exit",
        )
        assert relay.process.returncode == 75
        assert "the Kafka password file changed" in relay.logs()
        assert "relay stopped" in relay.logs()  # stopped cleanly, not killed
    finally:
        relay.kill()
