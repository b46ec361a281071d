"""Prometheus metrics of the relay and the consumer runner (labels: outbox, topic, outcome)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

OUTBOX_PUBLISHED = Counter(
    "gozon_outbox_published_total", "Outbox rows published and acknowledged by Kafka.", ["outbox"]
)
OUTBOX_PUBLISH_ERRORS = Counter(
    "gozon_outbox_publish_errors_total",
    "Failed publish attempts: transient (broker unreachable) or permanent (this message).",
    ["outbox", "kind"],
)
OUTBOX_FAILED = Counter(
    "gozon_outbox_failed_total", "Outbox rows marked FAILED after the last attempt.", ["outbox"]
)
OUTBOX_COMMIT_TO_ACK = Histogram(
    "gozon_outbox_commit_to_ack_seconds",
    "From the outbox row's creation to the broker's acknowledgement.",
    ["outbox"],
    buckets=LATENCY_BUCKETS,
)
OUTBOX_PENDING = Gauge(
    "gozon_outbox_pending_rows", "Outbox rows waiting to be published.", ["outbox"]
)
OUTBOX_OLDEST_AGE = Gauge(
    "gozon_outbox_oldest_pending_age_seconds",
    "Age of the oldest pending outbox row (the outbox lag); 0 when none is pending.",
    ["outbox"],
)
OUTBOX_PRUNED = Counter(
    "gozon_outbox_pruned_total", "SENT outbox rows deleted after the retention period.", ["outbox"]
)

CONSUMER_MESSAGES = Counter(
    "gozon_consumer_messages_total",
    "Consumed messages by outcome: processed, duplicate, dead_lettered, failed (retried).",
    ["topic", "outcome"],
)
CONSUMER_LAG = Gauge(
    "gozon_consumer_lag_messages",
    "Messages past the last handled offset (its batch in the database; the committed offset "
    "trails it by at most the commit interval), summed over the assigned partitions.",
    ["topic"],
)
CONSUMER_HANDLE_SECONDS = Histogram(
    "gozon_consumer_handle_seconds",
    "Time to handle one message: its partition's batch, whose one transaction it shares.",
    ["topic"],
    buckets=LATENCY_BUCKETS,
)
DLQ_REDRIVEN = Counter(
    "gozon_dlq_redriven_total",
    "Dead letters published back to their topic by `gozon <service> dlq redrive`.",
    ["topic"],
)
DLQ_BOUNDED = Counter(
    "gozon_consumer_dead_letters_bounded_total",
    "Dead letters published as a bounded record (reason, origin, key, the value's size, digest "
    "and first bytes): the message was too large to copy whole. Also counted as dead_lettered.",
    ["topic"],
)
