"""The sampling rules, the W3C carrier, the resource and the database spans' query summaries
(pure functions; the real hops are in tests/integration/test_tracing.py and
test_gateway_trace_context.py)."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.util.types import Attributes

from gozon.core.telemetry import (
    BACKGROUND,
    SCHEMA_URL,
    QuietBackground,
    flag,
    http_method,
    package_version,
    query_summary,
    recording_sampler,
    sampler_from,
    service_resource,
    w3c_carrier,
)

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
OTHER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
DB: Attributes = {"db.system.name": "postgresql", "db.query.text": "SELECT 1"}


def inside_a_span(sampled: bool = True) -> Context:
    parent = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else 0),
    )
    return trace.set_span_in_context(NonRecordingSpan(parent))


def decide(
    sampler: QuietBackground,
    kind: SpanKind,
    attributes: Attributes,
    parent: Context | None = None,
) -> Decision:
    return sampler.should_sample(parent, 1, "span", kind, attributes).decision


def test_a_statement_outside_any_span_is_dropped_and_inside_one_is_kept() -> None:
    quiet = QuietBackground(sampler_from({}))
    assert decide(quiet, SpanKind.CLIENT, DB) == Decision.DROP
    assert decide(quiet, SpanKind.CLIENT, {"db.system": "postgresql"}) == Decision.DROP
    assert decide(quiet, SpanKind.CLIENT, DB, inside_a_span()) == Decision.RECORD_AND_SAMPLE


def test_a_span_marked_background_is_dropped_as_a_root_only() -> None:
    quiet = QuietBackground(sampler_from({}))
    assert decide(quiet, SpanKind.INTERNAL, {BACKGROUND: True}) == Decision.DROP
    assert decide(quiet, SpanKind.INTERNAL, {BACKGROUND: True}, inside_a_span()) == (
        Decision.RECORD_AND_SAMPLE
    )


def test_requests_and_messages_start_traces_as_the_delegate_says() -> None:
    quiet = QuietBackground(sampler_from({}))
    assert decide(quiet, SpanKind.SERVER, {"http.request.method": "GET"}) == (
        Decision.RECORD_AND_SAMPLE
    )
    assert decide(quiet, SpanKind.CLIENT, {"http.request.method": "GET"}) == (
        Decision.RECORD_AND_SAMPLE
    )
    # Parent-based: the caller's decision (an outbox row's, a Kafka header's) is followed.
    assert decide(quiet, SpanKind.CONSUMER, {}, inside_a_span(sampled=False)) == Decision.DROP


def test_background_tracing_on_keeps_background_roots() -> None:
    loud = QuietBackground(sampler_from({}), trace_background=True)
    assert decide(loud, SpanKind.CLIENT, DB) == Decision.RECORD_AND_SAMPLE
    assert decide(loud, SpanKind.INTERNAL, {BACKGROUND: True}) == Decision.RECORD_AND_SAMPLE


def test_nothing_is_recorded_when_nothing_exports_unless_a_sampler_is_named() -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    silent = QuietBackground(recording_sampler({}))
    assert decide(silent, SpanKind.SERVER, {"http.request.method": "POST"}) == Decision.DROP
    # Not even under a sampled parent (a client's traceparent, an outbox row's).
    assert decide(silent, SpanKind.CONSUMER, {}, inside_a_span()) == Decision.DROP
    exported = QuietBackground(recording_sampler(endpoint))
    assert decide(exported, SpanKind.SERVER, {}) == Decision.RECORD_AND_SAMPLE
    named = QuietBackground(recording_sampler({"OTEL_TRACES_SAMPLER": "parentbased_always_on"}))
    assert decide(named, SpanKind.SERVER, {}) == Decision.RECORD_AND_SAMPLE
    # A bad ratio fails at start-up whether or not anything exports.
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER_ARG"):
        recording_sampler({"OTEL_TRACES_SAMPLER_ARG": "2"})


def test_the_standard_sampler_variables_are_honoured() -> None:
    default = sampler_from({})
    assert isinstance(default, ParentBased)
    assert "AlwaysOnSampler" in default.get_description()  # type: ignore[no-untyped-call]
    ratio = sampler_from(
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    )
    assert isinstance(ratio, ParentBased)
    assert "TraceIdRatioBased{0.1}" in ratio.get_description()  # type: ignore[no-untyped-call]
    assert isinstance(sampler_from({"OTEL_TRACES_SAMPLER": "traceidratio"}), TraceIdRatioBased)
    assert sampler_from({"OTEL_TRACES_SAMPLER": "always_off"}).get_description() == (
        "AlwaysOffSampler"
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}, "SAMPLER_ARG"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"}, "SAMPLER_ARG"),
    ],
)
def test_a_bad_sampler_setting_fails_with_its_name(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sampler_from(env)


def test_the_background_flag_reads_the_usual_spellings_and_refuses_others() -> None:
    assert flag({"X": "true"}, "X") is True
    assert flag({"X": "0"}, "X") is False
    assert flag({}, "X") is False
    with pytest.raises(ValueError, match="X must be true or false"):
        flag({"X": "maybe"}, "X")


def test_the_carrier_drops_conflicting_traceparents_and_joins_tracestates() -> None:
    assert w3c_carrier([(b"traceparent", PARENT.encode())]) == {"traceparent": PARENT}
    assert w3c_carrier([(b"traceparent", PARENT.encode()), (b"traceparent", OTHER.encode())]) == {}
    assert w3c_carrier([(b"traceparent", PARENT.encode()), (b"traceparent", PARENT.encode())]) == {
        "traceparent": PARENT
    }
    assert w3c_carrier(
        [(b"tracestate", b"a=1"), (b"traceparent", PARENT.encode()), (b"tracestate", b"b=2")]
    ) == {"traceparent": PARENT, "tracestate": "a=1,b=2"}
    assert w3c_carrier([(b"tracestate", b"a=1")]) == {}


def test_unknown_http_methods_are_reported_as_other() -> None:
    assert http_method("POST") == "POST"
    assert http_method("BREW") == "_OTHER"


@pytest.mark.parametrize(
    ("query", "summary", "operation", "collection"),
    [
        ("BEGIN;", "BEGIN", "BEGIN", None),
        ("BEGIN; SET LOCAL statement_timeout = 2500", "BEGIN SET", "BEGIN", None),
        ("COMMIT;", "COMMIT", "COMMIT", None),
        ("SELECT 1", "SELECT", "SELECT", None),
        ("select pg_notify($1, $2)", "SELECT", "SELECT", None),
        (
            "SELECT orders.id, orders.amount \nFROM orders WHERE orders.user_id = $1",
            "SELECT orders",
            "SELECT",
            "orders",
        ),
        (
            "INSERT INTO order_outbox (topic) VALUES ($1)",
            "INSERT order_outbox",
            "INSERT",
            "order_outbox",
        ),
        (
            'DELETE FROM "public"."order_outbox" WHERE id < 3',
            "DELETE public.order_outbox",
            "DELETE",
            "public.order_outbox",
        ),
        (
            "UPDATE order_outbox SET status = 'SENT' WHERE id IN (SELECT id FROM order_outbox "
            "WHERE status = 'PENDING' ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING id",
            "UPDATE order_outbox SELECT order_outbox",
            "UPDATE",
            "order_outbox",
        ),
        (
            "WITH new AS (INSERT INTO payment_inbox (event_id) SELECT * FROM unnest($1::uuid[]) "
            "ON CONFLICT DO NOTHING RETURNING event_id) "
            "UPDATE accounts SET balance = balance - 1 FROM new -- 'FROM x'",
            "INSERT payment_inbox UPDATE accounts",
            "INSERT",
            "payment_inbox",
        ),
        (
            "WITH inserted AS (INSERT INTO orders (id) VALUES ($1) RETURNING id), "
            "o AS (INSERT INTO order_outbox (aggregate_id) SELECT id FROM inserted) "
            "SELECT orders.id FROM orders, inserted",
            "INSERT orders INSERT order_outbox SELECT orders",
            "INSERT",
            "orders",
        ),
    ],
)
def test_a_statement_is_summarised_by_its_operations_and_collections(
    query: str, summary: str, operation: str, collection: str | None
) -> None:
    assert query_summary(query) == (summary, operation, collection)


def test_the_resource_names_the_service_its_version_namespace_and_environment() -> None:
    resource = service_resource("orders-api", namespace="shop", environment="staging")
    assert resource.attributes["service.name"] == "gozon-orders-api"
    assert resource.attributes["service.namespace"] == "shop"
    assert resource.attributes["service.version"] == package_version() != "0+unknown"
    assert resource.attributes["deployment.environment.name"] == "staging"
    assert resource.schema_url == SCHEMA_URL
