"""W3C trace context: one trace follows an order across HTTP, outbox rows and Kafka headers.

`configure_tracing` installs the SDK tracer provider once per process, so every span has real
ids to propagate even when nothing exports them. The carriers are plain dicts of
`traceparent` / `tracestate`: stored in the outbox row, sent as Kafka headers, read back by the
consumer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping

import structlog
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gozon.core.metrics import route_template

TRACE_HEADERS = ("traceparent", "tracestate")
access_log = structlog.get_logger("gozon.access")


def exporting(env: Mapping[str, str]) -> bool:
    """Whether the standard `OTEL_*` variables ask for OTLP export (off when none is set)."""
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").lower() in ("none", ""):
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure_tracing(service: str, env: Mapping[str, str] = os.environ) -> TracerProvider:
    """Installs the SDK tracer provider (idempotent per process).

    Spans always get real ids, so the trace context propagates through HTTP, outbox rows and
    Kafka even when nothing is exported. With OTLP export configured by the standard
    variables (`OTEL_EXPORTER_OTLP_ENDPOINT`, …), spans are batched to the collector and the
    database driver is instrumented too (a span per query is worth its cost only then).
    """
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    provider = TracerProvider(resource=Resource.create({"service.name": f"gozon-{service}"}))
    if exporting(env):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    trace.set_tracer_provider(provider)
    return provider


def current_trace_headers() -> dict[str, str]:
    """The current context as W3C headers (empty outside any span)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return {key: value for key, value in carrier.items() if key in TRACE_HEADERS}


def context_from_headers(headers: Mapping[str, str] | Iterable[tuple[str, bytes]]) -> Context:
    if isinstance(headers, Mapping):
        carrier = dict(headers)
    else:
        carrier = {key: value.decode("latin-1") for key, value in headers if key in TRACE_HEADERS}
    return propagate.extract(carrier)


class ServerSpanMiddleware:
    """A SERVER span per HTTP request, continuing the caller's `traceparent` if it sent one.

    At the edge (the gateway) it also tells the client its trace id (`X-Trace-Id`) and writes
    one access-log line per request, inside the span, so the line carries the trace id.
    """

    def __init__(self, app: ASGIApp, service: str, *, edge: bool = False) -> None:
        self.app = app
        self.tracer = trace.get_tracer(f"gozon.{service}")
        self.edge = edge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        carrier = {
            key.decode("latin-1"): value.decode("latin-1")
            for key, value in scope["headers"]
            if key in (b"traceparent", b"tracestate")
        }
        started = time.perf_counter()
        status = 500
        with self.tracer.start_as_current_span(
            f"{scope['method']} {scope['path']}",
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
        ) as span:
            trace_id = format(span.get_span_context().trace_id, "032x").encode()

            async def send_wrapper(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    span.set_attribute("http.response.status_code", status)
                    if self.edge:
                        message["headers"] = [
                            *message.get("headers", []),
                            (b"x-trace-id", trace_id),
                        ]
                await send(message)

            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                route = route_template(scope)
                span.update_name(f"{scope['method']} {route}")
                if self.edge:
                    access_log.info(
                        "request",
                        method=scope["method"],
                        route=route,
                        status=status,
                        duration_ms=round((time.perf_counter() - started) * 1000, 2),
                    )
