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
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

DLQ_SUFFIX = ".dlq"


def dlq_topic(topic: str) -> str:
    return f"{topic}{DLQ_SUFFIX}"


def new_producer(bootstrap_servers: str, *, client_id: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
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
# per FETCH_MAX_WAIT_MS it waits for anyway (docs/benchmarks.md, "Idle platform").
FETCHER_TIMEOUT_MS = 1_000


def new_consumer(
    bootstrap_servers: str,
    *,
    group_id: str,
    client_id: str,
    topics: Iterable[str] = (),
    fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS,
) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        fetch_max_wait_ms=fetch_max_wait_ms,
        fetch_min_bytes=1,
        consumer_timeout_ms=FETCHER_TIMEOUT_MS,
        max_poll_records=100,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=3_000,
        retry_backoff_ms=100,
    )


def is_transient(exc: BaseException) -> bool:
    """Errors that say "the broker is not reachable now", not "this message is bad"."""
    if isinstance(exc, KafkaConnectionError | KafkaTimeoutError | asyncio.TimeoutError | OSError):
        return True
    return isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))


async def broker_answers(producer: AIOKafkaProducer) -> bool:
    """Readiness: a metadata round trip to the cluster through the producer's connection."""
    try:
        await producer.client.fetch_all_metadata()
    except KafkaError:
        return False
    return True


async def ensure_topics(
    bootstrap_servers: str,
    topics: Iterable[str],
    *,
    partitions: int = 3,
    replication_factor: int = 1,
    with_dlq: bool = True,
) -> list[str]:
    """Creates the missing topics (and their `.dlq` twins); returns the ones it created."""
    wanted = set(topics)
    if with_dlq:
        wanted |= {dlq_topic(topic) for topic in wanted if not topic.endswith(DLQ_SUFFIX)}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=10_000)
    try:
        await admin.start()
        missing = sorted(wanted - set(await admin.list_topics()))
        if missing:
            await admin.create_topics(
                [NewTopic(name, partitions, replication_factor) for name in missing]
            )
        return missing
    finally:
        with contextlib.suppress(Exception):  # a client that never started has nothing open
            await admin.close()
