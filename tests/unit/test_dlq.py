"""What a dead letter says of itself, and the headers its redrive carries (pure logic)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from gozon.messaging.dlq import (
    REDRIVE_COUNT,
    REDRIVEN_AT,
    REDRIVEN_FROM,
    DeadLetter,
    bounded_record,
    redrive_headers,
    table,
)

AT = datetime(2026, 11, 25, 14, 0, tzinfo=UTC)


def letter(value: bytes, *headers: tuple[str, bytes]) -> DeadLetter:
    return DeadLetter(partition=2, offset=41, at=AT, key=b"u-7", value=value, headers=headers)


def test_a_dead_letter_reads_its_reason_origin_and_order() -> None:
    dead = letter(
        json.dumps({"event_id": "e-1", "payload": {"order_id": "o-1"}}).encode(),
        ("traceparent", b"00-abc"),
        ("x-dlq-reason", b"rejected: no order o-1"),
        ("x-dlq-original-topic", b"payment.processed.event"),
        ("x-dlq-original-partition", b"2"),
        ("x-dlq-original-offset", b"1234"),
    )
    assert dead.reason == "rejected: no order o-1"
    assert dead.origin == "payment.processed.event/2/1234"
    assert (dead.order_id, dead.event_id, dead.redrives) == ("o-1", "e-1", 0)
    shown = table([dead])
    assert "2/41" in shown
    assert "payment.processed.event/2/1234" in shown
    assert "rejected: no order o-1" in shown


def test_an_unparseable_dead_letter_still_lists() -> None:
    dead = letter(b"{not json")
    assert (dead.reason, dead.origin, dead.order_id, dead.event_id) == ("?", "?/?/?", None, None)
    assert "u-7" in table([dead])


def test_a_redrive_drops_the_dead_letter_headers_and_says_whence_and_how_often() -> None:
    dead = letter(
        b"{}",
        ("traceparent", b"00-abc"),
        ("x-dlq-reason", b"handler failed"),
        (REDRIVEN_FROM, b"t.dlq/0/3"),
        (REDRIVE_COUNT, b"1"),
    )
    headers = redrive_headers(dead, "t.dlq", now=AT)
    assert headers == [
        ("traceparent", b"00-abc"),
        (REDRIVEN_FROM, b"t.dlq/2/41"),
        (REDRIVEN_AT, AT.isoformat().encode()),
        (REDRIVE_COUNT, b"2"),
    ]


def test_a_bounded_record_stays_small_whatever_the_message_and_reads_back_as_bounded() -> None:
    huge_value = b"v" * 5_000_000
    record = bounded_record(
        topic="order.created.event",
        partition=1,
        offset=7,
        timestamp_ms=1,
        key=b"k" * 100_000,
        value=huge_value,
        headers=[("traceparent", b"00-abc"), ("x-big", b"h" * 200_000)],
        reason="invalid message: " + "r" * 100_000,
        why_bounded="too large to copy: MessageSizeTooLargeError",
        at=AT,
    )
    assert len(record.value) + sum(len(n) + len(v) for n, v in record.headers) < 16 * 1024
    assert record.key == b"k" * 256
    summary = json.loads(record.value)
    assert summary["value_bytes"] == 5_000_000
    assert summary["value_prefix"] == "v" * 1024
    assert summary["headers"] == [["traceparent", 6], ["x-big", 200_000]]
    dead = DeadLetter(
        partition=0,
        offset=3,
        at=AT,
        key=record.key,
        value=record.value,
        headers=tuple(record.headers),
    )
    assert dead.bounded
    assert dead.original_size == 5_000_000
    assert dead.origin == "order.created.event/1/7"
    assert dead.header("traceparent") == "00-abc"  # the trace context is kept, the rest is not
    assert dead.header("x-big") is None
    assert (dead.order_id, dead.event_id) == (None, None)
    assert dead.as_dict()["bounded"] is True
    assert "[bounded: 5000000 bytes] invalid message" in table([dead], reason_width=200)
