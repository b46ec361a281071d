"""Dead letters: list them, and redrive them to their topic once their cause is fixed.

The consumer runner (`messaging/consumer.py`) publishes a message it cannot handle, unchanged,
to `<topic>.dlq` with headers saying why (`x-dlq-reason`) and whence (`x-dlq-original-topic`,
`-partition`, `-offset`, `x-dlq-at`). A message that cannot be copied whole (with those headers
it is over the producer's or the broker's size limit) is dead-lettered as a *bounded record*
instead (`bounded_record`): a small JSON document with the reason, the origin, the key, the
value's size, SHA-256 and first `VALUE_PREFIX_BYTES` bytes, marked by the header
`x-dlq-bounded`. This module writes that record, reads dead letters back (`gozon <service> dlq
list`) and puts them back (`gozon <service> dlq redrive`).

Guarantees of a redrive:
- A dead letter goes back to the topic its dead-letter topic belongs to, with its key (so it
  lands on its key's partition, behind that key's earlier events), its value and its headers
  (the trace context included) unchanged; the `x-dlq-*` headers are dropped and
  `x-redrive-from` (`<dlq topic>/<partition>/<offset>`), `x-redrive-at` and `x-redrive-count`
  added. A message that fails again is dead-lettered again, carrying them.
- Each dead letter is redriven once: the redrive keeps a cursor per dead-letter partition as
  the committed offset of the consumer group `<service group>.dlq-redrive`, committed after
  each publish is acknowledged. A second run starts where the first stopped and finds nothing
  new. A crash between a publish and its commit publishes that one message again on the next
  run; the consumers' dedup (the payments inbox and one decision per order; the orders'
  status change guarded by NEW) makes the second copy a counted duplicate.
- `--since` starts a partition's cursor at the first dead letter written at or after that
  time, if the cursor is behind it: the older ones are passed over for good (they still show
  in `list`; resetting the group's offsets with Kafka's `kafka-consumer-groups.sh` brings them
  back, and redriving one twice is harmless, see above). `--limit N` redrives the N oldest.
- Dead letters are read up to the end offsets seen when the command started: a message that
  fails again during the run is not redriven in a loop by the same run.
- A bounded record is never redriven: it holds a digest of the message, not the message. The
  redrive passes over it (the cursor moves past it, it still shows in `list`) and reports it;
  the original is at its origin (topic, partition, offset) for as long as that topic's
  retention keeps it.

Dead-letter topics are small (a message lands there only when it cannot be handled), so a
command reads the selected range into memory.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.structs import ConsumerRecord

from gozon.messaging.kafka import (
    DLQ_SUFFIX,
    Kafka,
    KafkaAccessRefused,
    kafka_access,
    new_producer,
    start_client,
)
from gozon.messaging.metrics import DLQ_REDRIVEN

DLQ_HEADER_PREFIX = "x-dlq-"
REDRIVE_HEADER_PREFIX = "x-redrive-"
REDRIVEN_FROM = "x-redrive-from"
REDRIVEN_AT = "x-redrive-at"
REDRIVE_COUNT = "x-redrive-count"
REDRIVE_GROUP_SUFFIX = ".dlq-redrive"
BOUNDED = f"{DLQ_HEADER_PREFIX}bounded"
# What a bounded record keeps of the message: the value's first bytes, the key's, the reason's.
VALUE_PREFIX_BYTES = 1024
KEY_MAX_BYTES = 256
REASON_MAX_CHARS = 4000
# Headers of the original a bounded record keeps (the trace context), when this small.
KEPT_HEADER_MAX_BYTES = 512
KEPT_HEADERS = frozenset({"traceparent", "tracestate"})


@dataclass(frozen=True, slots=True)
class BoundedRecord:
    """What is published to the dead-letter topic in place of a message too large to copy."""

    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def _text_prefix(data: bytes, limit: int) -> str:
    return data[:limit].decode("utf-8", errors="replace")


def bounded_record(
    *,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    reason: str,
    why_bounded: str,
    at: datetime | None = None,
) -> BoundedRecord:
    """The dead letter of a message that cannot be copied whole: a few kilobytes at most,
    whatever the message's size. Its value is a JSON document (reason, origin, key, the
    value's size, SHA-256 and first bytes, the original headers' names and sizes); its
    headers are the usual `x-dlq-*` ones, `x-dlq-bounded` (why it is bounded), the value's
    size and digest, and the original's trace context when small."""
    value = value or b""
    digest = hashlib.sha256(value).hexdigest()
    key_kept = key if key is None or len(key) <= KEY_MAX_BYTES else key[:KEY_MAX_BYTES]
    document = {
        "bounded_dead_letter": why_bounded,
        "reason": reason[:REASON_MAX_CHARS],
        "origin": {
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "timestamp_ms": timestamp_ms,
        },
        "key": _text_prefix(key, KEY_MAX_BYTES) if key is not None else None,
        "key_bytes": len(key) if key is not None else None,
        "value_bytes": len(value),
        "value_sha256": digest,
        "value_prefix": _text_prefix(value, VALUE_PREFIX_BYTES),
        "headers": [[name[:KEY_MAX_BYTES], len(data)] for name, data in headers[:64]],
    }
    kept = [
        (name, bytes(data))
        for name, data in headers
        if name in KEPT_HEADERS and len(data) <= KEPT_HEADER_MAX_BYTES
    ]
    return BoundedRecord(
        key=key_kept,
        value=json.dumps(document).encode(),
        headers=[
            *kept,
            (f"{DLQ_HEADER_PREFIX}reason", reason[:REASON_MAX_CHARS].encode()),
            (f"{DLQ_HEADER_PREFIX}original-topic", topic.encode()),
            (f"{DLQ_HEADER_PREFIX}original-partition", str(partition).encode()),
            (f"{DLQ_HEADER_PREFIX}original-offset", str(offset).encode()),
            (f"{DLQ_HEADER_PREFIX}at", (at or datetime.now(UTC)).isoformat().encode()),
            (BOUNDED, why_bounded[:REASON_MAX_CHARS].encode()),
            (f"{DLQ_HEADER_PREFIX}original-size", str(len(value)).encode()),
            (f"{DLQ_HEADER_PREFIX}original-sha256", digest.encode()),
        ],
    )


class DeadLetterError(Exception):
    """A failure a person can act on (the broker unreachable, no such topic); the message
    names the cause."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message of a dead-letter topic, with what its headers and value say of it."""

    partition: int
    offset: int
    at: datetime  # when it was dead-lettered (the record's timestamp)
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode(errors="replace")
        return None

    @property
    def reason(self) -> str:
        return self.header(f"{DLQ_HEADER_PREFIX}reason") or "?"

    @property
    def origin(self) -> str:
        """`topic/partition/offset` of the message as it was first consumed."""
        parts = (self.header(f"{DLQ_HEADER_PREFIX}original-{part}") for part in _ORIGIN)
        return "/".join(part or "?" for part in parts)

    @property
    def redrives(self) -> int:
        return int(self.header(REDRIVE_COUNT) or 0)

    @property
    def bounded(self) -> bool:
        """A bounded record: the message was too large to copy; its value is a summary."""
        return self.header(BOUNDED) is not None

    @property
    def original_size(self) -> int | None:
        size = self.header(f"{DLQ_HEADER_PREFIX}original-size")
        return int(size) if size and size.isdigit() else None

    def _envelope(self) -> dict[str, object]:
        try:
            envelope = json.loads(self.value or b"")
        except ValueError:
            return {}
        return envelope if isinstance(envelope, dict) else {}

    @property
    def event_id(self) -> str | None:
        if self.bounded:
            return None
        value = self._envelope().get("event_id")
        return str(value) if value is not None else None

    @property
    def order_id(self) -> str | None:
        if self.bounded:
            return None
        payload = self._envelope().get("payload")
        value = payload.get("order_id") if isinstance(payload, dict) else None
        return str(value) if value is not None else None

    def as_dict(self) -> dict[str, object]:
        return {
            "partition": self.partition,
            "offset": self.offset,
            "at": self.at.isoformat(),
            "reason": self.reason,
            "origin": self.origin,
            "key": self.key.decode(errors="replace") if self.key is not None else None,
            "order_id": self.order_id,
            "event_id": self.event_id,
            "redrives": self.redrives,
            "bounded": self.bounded,
            "original_size": self.original_size,
        }


_ORIGIN = ("topic", "partition", "offset")


@dataclass
class RedriveResult:
    redriven: list[DeadLetter] = field(default_factory=list)
    passed_over: int = 0  # behind --since: the cursor moved past them
    bounded: list[DeadLetter] = field(default_factory=list)  # not redrivable: passed over
    remaining: int = 0  # left for the next run by --limit
    dry_run: bool = False


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC when it names no zone) or an age: `90s`, `15m`, `2h`, `1d`."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", text)
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        return (now or datetime.now(UTC)) - timedelta(**{unit: int(match.group(1))})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"--since {text!r}: not a time (2026-11-25T14:00:00Z) nor an age (90s, 15m, 2h, 1d)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def redrive_group(group_id: str) -> str:
    return f"{group_id}{REDRIVE_GROUP_SUFFIX}"


def _dead_letter(record: ConsumerRecord[bytes, bytes]) -> DeadLetter:
    return DeadLetter(
        partition=record.partition,
        offset=record.offset,
        at=datetime.fromtimestamp(record.timestamp / 1000, UTC),
        key=record.key,
        value=record.value,
        headers=tuple((key, bytes(value)) for key, value in record.headers),
    )


class _Reader:
    """A consumer assigned to every partition of one dead-letter topic; with `group`, the
    redrive cursor's committed offsets are read and written under that group."""

    def __init__(self, kafka: Kafka, topic: str, group: str | None) -> None:
        self.kafka = kafka_access(kafka)
        self.bootstrap_servers = self.kafka.bootstrap_servers
        self.topic = topic
        self.consumer = AIOKafkaConsumer(
            **self.kafka.client_args(),
            group_id=group,
            client_id="gozon-dlq",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            request_timeout_ms=15_000,
            retry_backoff_ms=100,
        )
        self.partitions: list[TopicPartition] = []

    async def __aenter__(self) -> _Reader:
        try:
            await start_client(self.consumer, self.kafka)
            # `consumer.topics()` fetches the metadata but leaves the consumer's own copy
            # stale (`partitions_for_topic` would answer None): ask the client for it.
            cluster = await self.consumer._client.fetch_all_metadata()
        except KafkaAccessRefused as exc:
            await self.consumer.stop()
            raise DeadLetterError(str(exc)) from exc
        except KafkaError as exc:
            await self.consumer.stop()
            raise DeadLetterError(
                f"Kafka at {self.bootstrap_servers} is unreachable ({exc}); check "
                "GOZON_KAFKA_BOOTSTRAP_SERVERS and that the broker runs"
            ) from exc
        if self.topic not in cluster.topics():
            await self.consumer.stop()
            raise DeadLetterError(
                f"no topic {self.topic} on {self.bootstrap_servers} (the consumer creates it "
                "at start-up: has it run against this broker?)"
            )
        numbers = cluster.partitions_for_topic(self.topic) or set()
        self.partitions = [TopicPartition(self.topic, n) for n in sorted(numbers)]
        self.consumer.assign(self.partitions)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.consumer.stop()

    async def starts(self, *, since: datetime | None, cursor: bool) -> dict[TopicPartition, int]:
        """Where each partition's reading starts: the cursor (with `cursor`), moved up to the
        first offset at or after `since`."""
        starts: dict[TopicPartition, int] = dict(
            await self.consumer.beginning_offsets(self.partitions)
        )
        if cursor:
            for tp in self.partitions:
                committed = await self.consumer.committed(tp)
                if committed is not None:
                    starts[tp] = max(starts[tp], committed)
        if since is not None:
            ends = await self.consumer.end_offsets(self.partitions)
            found = await self.consumer.offsets_for_times(
                {tp: int(since.timestamp() * 1000) for tp in self.partitions}
            )
            for tp in self.partitions:
                at = found.get(tp)
                starts[tp] = max(starts[tp], at.offset if at is not None else ends[tp])
        return starts

    async def read(
        self, starts: dict[TopicPartition, int]
    ) -> dict[TopicPartition, list[DeadLetter]]:
        """Every record from `starts` up to the end offsets as they are now, per partition."""
        ends = await self.consumer.end_offsets(self.partitions)
        records: dict[TopicPartition, list[DeadLetter]] = {tp: [] for tp in self.partitions}
        wanted = {tp for tp in self.partitions if starts[tp] < ends[tp]}
        for tp in self.partitions:
            self.consumer.seek(tp, starts[tp])
        if not wanted:
            return records
        self.consumer.pause(*(set(self.partitions) - wanted))
        while wanted:
            batches = await self.consumer.getmany(*wanted, timeout_ms=1000)
            for tp, batch in batches.items():
                records[tp] += [_dead_letter(r) for r in batch if r.offset < ends[tp]]
            for tp in list(wanted):
                if await self.consumer.position(tp) >= ends[tp]:
                    wanted.discard(tp)
                    self.consumer.pause(tp)
        return records


def _oldest_first(records: dict[TopicPartition, list[DeadLetter]]) -> list[DeadLetter]:
    """All partitions merged by time, each partition kept in offset order."""
    return list(heapq.merge(*records.values(), key=lambda letter: letter.at))


async def list_dead_letters(
    kafka: Kafka,
    topic: str,
    *,
    since: datetime | None = None,
    limit: int | None = None,
) -> tuple[list[DeadLetter], int]:
    """The dead letters of `topic` (the dead-letter topic itself), oldest first, at most
    `limit`; and how many there are in all from `since`."""
    async with _Reader(kafka, topic, group=None) as reader:
        letters = _oldest_first(await reader.read(await reader.starts(since=since, cursor=False)))
    return (letters if limit is None else letters[:limit]), len(letters)


async def redrive_cursor(kafka: Kafka, topic: str, *, group: str) -> dict[int, int | None]:
    """The redrive cursor per partition: the next dead letter a redrive would consider."""
    async with _Reader(kafka, topic, group=group) as reader:
        return {tp.partition: await reader.consumer.committed(tp) for tp in reader.partitions}


def redrive_headers(
    letter: DeadLetter, topic: str, *, now: datetime | None = None
) -> list[tuple[str, bytes]]:
    """The dead letter's own headers, without the dead-letter ones, plus the redrive's."""
    kept = [
        (key, value)
        for key, value in letter.headers
        if not key.startswith((DLQ_HEADER_PREFIX, REDRIVE_HEADER_PREFIX))
    ]
    return [
        *kept,
        (REDRIVEN_FROM, f"{topic}/{letter.partition}/{letter.offset}".encode()),
        (REDRIVEN_AT, (now or datetime.now(UTC)).isoformat().encode()),
        (REDRIVE_COUNT, str(letter.redrives + 1).encode()),
    ]


async def redrive(
    kafka: Kafka,
    topic: str,
    *,
    group: str,
    since: datetime | None = None,
    limit: int | None = None,
    dry_run: bool = False,
) -> RedriveResult:
    """Publishes the dead letters of `topic` (a `<topic>.dlq`) past the redrive cursor back to
    `<topic>`, oldest first, moving the cursor after each (see the module docstring)."""
    if not topic.endswith(DLQ_SUFFIX):
        raise DeadLetterError(f"{topic} is not a dead-letter topic (no {DLQ_SUFFIX} suffix)")
    target = topic.removesuffix(DLQ_SUFFIX)
    result = RedriveResult(dry_run=dry_run)
    async with _Reader(kafka, topic, group=group) as reader:
        cursor = await reader.starts(since=None, cursor=True)
        starts = await reader.starts(since=since, cursor=True)
        result.passed_over = sum(starts[tp] - cursor[tp] for tp in reader.partitions)
        letters = _oldest_first(await reader.read(starts))
        chosen = letters if limit is None else letters[:limit]
        result.remaining = len(letters) - len(chosen)
        result.bounded = [letter for letter in chosen if letter.bounded]
        if dry_run:
            result.redriven = [letter for letter in chosen if not letter.bounded]
            return result
        if result.passed_over:
            # The cursor moves past what --since left out, even if nothing else is redriven.
            await reader.consumer.commit(
                {tp: starts[tp] for tp in reader.partitions if starts[tp] > cursor[tp]}
            )
        producer = new_producer(kafka, client_id="gozon-dlq-redrive")
        try:
            await start_client(producer, kafka)
        except KafkaAccessRefused as exc:
            raise DeadLetterError(str(exc)) from exc
        except KafkaConnectionError as exc:
            raise DeadLetterError(
                f"Kafka at {reader.bootstrap_servers} is unreachable ({exc})"
            ) from exc
        try:
            for letter in chosen:
                cursor_past = {TopicPartition(topic, letter.partition): letter.offset + 1}
                if letter.bounded:  # a summary, not the message: never published back
                    await reader.consumer.commit(cursor_past)
                    continue
                await producer.send_and_wait(
                    target,
                    value=letter.value,
                    key=letter.key,
                    headers=redrive_headers(letter, topic),
                )
                await reader.consumer.commit(cursor_past)
                DLQ_REDRIVEN.labels(target).inc()
                result.redriven.append(letter)
        finally:
            await producer.stop()
    return result


def table(letters: Iterable[DeadLetter], *, reason_width: int = 60) -> str:
    """The dead letters as a table for a terminal."""
    columns = ("DLQ OFFSET", "DEAD-LETTERED AT", "ORIGIN", "KEY", "ORDER", "REDRIVES", "REASON")
    rows: list[Sequence[str]] = [columns]
    for letter in letters:
        reason = letter.reason
        if letter.bounded:
            reason = f"[bounded: {letter.original_size} bytes] {reason}"
        if len(reason) > reason_width:
            reason = reason[: reason_width - 1] + "…"
        rows.append(
            (
                f"{letter.partition}/{letter.offset}",
                letter.at.strftime("%Y-%m-%d %H:%M:%S"),
                letter.origin,
                letter.key.decode(errors="replace") if letter.key is not None else "-",
                letter.order_id or "-",
                str(letter.redrives),
                reason,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    )
