"""Kafka clients with their settings chosen on purpose, and topic administration.

aiokafka's defaults suit none of this platform's jobs (`acks=1`, no idempotence,
`auto_offset_reset="latest"`, auto-commit on). Here:
- producers are idempotent with `acks="all"`: an acknowledged send is on every in-sync replica
  and a retried send is never written twice;
- consumers start from the earliest offset (a new group misses nothing), never auto-commit
  (the runner commits what the database holds, coalesced: `gozon.messaging.consumer`), and
  long-poll: `fetch_min_bytes=1` makes the broker answer a fetch as soon as any record lands,
  so the 500 ms maximum wait adds no latency and only bounds how often an idle consumer asks
  (docs/adr/0001-consumer-long-poll.md). The background fetch routine's own
  re-check timer is raised to match (`FETCHER_TIMEOUT_MS`): records, answers and
  rebalances wake it, not the timer.

Every client is made from one `KafkaAccess` (the brokers and how to authenticate to them:
`GOZON_KAFKA_SECURITY_PROTOCOL` and the SASL/TLS settings), so none can miss the credentials.
A bare bootstrap string is plaintext, as on the local stack. A broker that refuses the
credentials (or whose certificate does not verify) is reported as `KafkaAccessRefused`, in
words, instead of aiokafka's "Unable to bootstrap". With `GOZON_KAFKA_CREATE_TOPICS=false`
the workers never create a topic: they wait until the topics exist (an operator makes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import create_conn
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)

from gozon.core.settings import CommonSettings

DLQ_SUFFIX = ".dlq"


@dataclass(frozen=True)
class KafkaAccess:
    """The brokers and how a client authenticates to them: what every client is made with."""

    bootstrap_servers: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "SCRAM-SHA-512"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl_ca_file: Path | None = None

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> KafkaAccess:
        return cls(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            security_protocol=settings.kafka_security_protocol,
            sasl_mechanism=settings.kafka_sasl_mechanism,
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password_value(),
            ssl_ca_file=settings.kafka_ssl_ca_file,
        )

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.security_protocol.endswith("SSL")

    def client_args(self) -> dict[str, Any]:
        """aiokafka's connection arguments, the same for producers, consumers and admins."""
        args: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
        }
        if self.sasl:
            args |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.username,
                "sasl_plain_password": self.password,
            }
        if self.tls:
            # The system's CAs unless a CA file is given (Strimzi's cluster CA); the broker's
            # name is checked against its certificate.
            args["ssl_context"] = ssl.create_default_context(
                cafile=str(self.ssl_ca_file) if self.ssl_ca_file else None
            )
        return args

    def __str__(self) -> str:
        who = f" as {self.username} ({self.sasl_mechanism})" if self.sasl else ""
        return f"{self.bootstrap_servers} over {self.security_protocol}{who}"


Kafka = KafkaAccess | str
"""Where a client connects: a `KafkaAccess`, or bootstrap servers for plaintext."""


def kafka_access(kafka: Kafka) -> KafkaAccess:
    return kafka if isinstance(kafka, KafkaAccess) else KafkaAccess(kafka)


class KafkaAccessRefused(KafkaError):  # type: ignore[misc]  # aiokafka.errors is untyped
    """The broker answered but refused this client: wrong credentials or mechanism, or a
    certificate that does not verify. Waiting does not help; the settings must change."""


class TopicsNotCreated(KafkaError):  # type: ignore[misc]
    """The broker refused to create topics (a right, a replication factor it cannot meet)."""


# CreateTopics answers: the topic was there already (made meanwhile by another worker or the
# operator), and the rights a user lacks to create it.
_TOPIC_ALREADY_EXISTS = 36
_NOT_ALLOWED = {29: "TOPIC_AUTHORIZATION_FAILED", 31: "CLUSTER_AUTHORIZATION_FAILED"}


class TopicsMissing(KafkaError):  # type: ignore[misc]
    """Topics the process needs do not exist, and it is not to create them."""

    retriable = True


async def why_refused(kafka: Kafka) -> str | None:
    """After a client failed to bootstrap: why the first broker refused it, in words, or None
    when it is only unreachable (or takes plaintext, which refuses nobody)."""
    access = kafka_access(kafka)
    if not (access.sasl or access.tls):
        return None
    host, _, port = access.bootstrap_servers.split(",")[0].strip().rpartition(":")
    args = access.client_args()
    del args["bootstrap_servers"]
    try:
        conn = await asyncio.wait_for(
            create_conn(host, int(port), client_id="gozon-access-check", **args), timeout=15
        )
    except (SaslAuthenticationFailed, UnsupportedSaslMechanismError, IllegalSaslStateError) as exc:
        return (
            f"Kafka at {host}:{port} refused user {access.username!r} with "
            f"{access.sasl_mechanism} ({exc}): check GOZON_KAFKA_SASL_USERNAME, the password "
            "and GOZON_KAFKA_SASL_MECHANISM"
        )
    except ssl.SSLError as exc:
        return (
            f"TLS with Kafka at {host}:{port} failed ({exc}): check GOZON_KAFKA_SSL_CA_FILE "
            "and that the listener is the TLS one"
        )
    except Exception:  # unreachable, or a different failure: the caller's error stands
        return None
    conn.close()
    return None


class _Startable(Protocol):
    async def start(self) -> None: ...


async def start_client(client: _Startable, kafka: Kafka) -> None:
    """Starts a producer, consumer or admin client; a refusal is raised as
    `KafkaAccessRefused` with the broker's reason."""
    try:
        await client.start()
    except KafkaConnectionError as exc:
        reason = await why_refused(kafka)
        if reason is None:
            raise
        raise KafkaAccessRefused(reason) from exc


def dlq_topic(topic: str) -> str:
    return f"{topic}{DLQ_SUFFIX}"


def new_producer(kafka: Kafka, *, client_id: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **kafka_access(kafka).client_args(),
        client_id=client_id,
        acks="all",
        enable_idempotence=True,
        linger_ms=0,
        request_timeout_ms=10_000,
        retry_backoff_ms=100,
        metadata_max_age_ms=60_000,
    )


# How long the broker may hold a fetch that finds no data (bench/fetch_wait.py measures it).
FETCH_MAX_WAIT_MS = 500
# How long aiokafka's background fetch routine sleeps when nothing wakes it. A fetch's answer,
# records consumed, an assignment change or a partition resumed all wake it at once; the
# timeout only re-checks the partitions that have no fetch in flight. At aiokafka's default
# (200 ms) it woke every idle consumer 5 times a second for nothing, beside the one answer
# per FETCH_MAX_WAIT_MS it waits for anyway (docs/adr/0011-development-broker.md).
FETCHER_TIMEOUT_MS = 1_000


def new_consumer(
    kafka: Kafka,
    *,
    group_id: str,
    client_id: str,
    topics: Iterable[str] = (),
    fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS,
    session_timeout_ms: int = 10_000,
) -> AIOKafkaConsumer:
    """`session_timeout_ms`: how long the group waits for a silent member before moving its
    partitions (GOZON_CONSUMER_SESSION_TIMEOUT_MS); heartbeats go every third of it, at most
    every 3 s."""
    return AIOKafkaConsumer(
        *topics,
        **kafka_access(kafka).client_args(),
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        fetch_max_wait_ms=fetch_max_wait_ms,
        fetch_min_bytes=1,
        consumer_timeout_ms=FETCHER_TIMEOUT_MS,
        max_poll_records=100,
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=min(3_000, session_timeout_ms // 3),
        retry_backoff_ms=100,
    )


def is_transient(exc: BaseException) -> bool:
    """Errors that say "the broker is not reachable now", not "this message is bad"."""
    if isinstance(exc, KafkaConnectionError | KafkaTimeoutError | asyncio.TimeoutError | OSError):
        return True
    return isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))


# How long `broker_answers` waits: a frozen broker keeps its sockets open and never answers.
METADATA_TIMEOUT_S = 10.0


async def broker_answers(producer: AIOKafkaProducer) -> bool:
    """Readiness: a metadata round trip to the cluster through the producer's connection,
    within METADATA_TIMEOUT_S."""
    try:
        async with asyncio.timeout(METADATA_TIMEOUT_S):
            await producer.client.fetch_all_metadata()
    except (KafkaError, TimeoutError):
        return False
    return True


async def ensure_topics(
    kafka: Kafka,
    topics: Iterable[str],
    *,
    partitions: int = 3,
    replication_factor: int = 1,
    with_dlq: bool = True,
    create: bool = True,
) -> list[str]:
    """Creates the missing topics (and their `.dlq` twins); returns the ones it created.

    With `create=False` (`GOZON_KAFKA_CREATE_TOPICS=false`) it only checks: a missing topic
    raises `TopicsMissing`, which the workers wait out, and nothing is created.
    """
    wanted = set(topics)
    if with_dlq:
        wanted |= {dlq_topic(topic) for topic in wanted if not topic.endswith(DLQ_SUFFIX)}
    admin = AIOKafkaAdminClient(**kafka_access(kafka).client_args(), request_timeout_ms=10_000)
    try:
        await start_client(admin, kafka)
        missing = sorted(wanted - set(await admin.list_topics()))
        if missing and not create:
            raise TopicsMissing(
                f"topics {', '.join(missing)} do not exist (or this user may not describe "
                "them); GOZON_KAFKA_CREATE_TOPICS=false leaves creating them to an operator"
            )
        if missing:
            response = await admin.create_topics(
                [NewTopic(name, partitions, replication_factor) for name in missing]
            )
            # aiokafka returns the broker's per-topic answers without looking at them.
            refused = {
                topic: (code, rest[0] if rest else None)
                for topic, code, *rest in response.topic_errors
                if code not in (0, _TOPIC_ALREADY_EXISTS)
            }
            if refused:
                raise TopicsNotCreated(_refusal(refused))
        return missing
    finally:
        with contextlib.suppress(Exception):  # a client that never started has nothing open
            await admin.close()


def _refusal(refused: dict[str, tuple[int, str | None]]) -> str:
    if any(code in _NOT_ALLOWED for code, _ in refused.values()):
        return (
            f"Kafka refused to create topics {', '.join(sorted(refused))}: this user may not "
            "create topics. Give it the right (Create), or make the topics otherwise and set "
            "GOZON_KAFKA_CREATE_TOPICS=false"
        )
    return "Kafka refused to create " + "; ".join(
        f"{topic} (error {code}: {message or 'no message'})"
        for topic, (code, message) in sorted(refused.items())
    )
