"""W3C trace context: one trace follows an order across HTTP, outbox rows and Kafka headers.

`configure_tracing` installs the SDK tracer provider once per process, so every span has real
ids to propagate even when nothing exports them. The carriers are plain dicts of
`traceparent` / `tracestate`: stored in the outbox row, sent as Kafka headers, read back by the
consumer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gozon.core.metrics import route_template

TRACE_HEADERS = ("traceparent", "tracestate")


def configure_tracing(service: str) -> TracerProvider:
    """Installs the SDK tracer provider (idempotent per process)."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    provider = TracerProvider(resource=Resource.create({"service.name": f"gozon-{service}"}))
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
    """A SERVER span per HTTP request, continuing the caller's `traceparent` if it sent one."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.tracer = trace.get_tracer(f"gozon.{service}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        carrier = {
            key.decode("latin-1"): value.decode("latin-1")
            for key, value in scope["headers"]
            if key in (b"traceparent", b"tracestate")
        }
        with self.tracer.start_as_current_span(
            f"{scope['method']} {scope['path']}",
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
        ) as span:

            async def send_wrapper(message: Message) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", message["status"])
                await send(message)

            await self.app(scope, receive, send_wrapper)
            span.update_name(f"{scope['method']} {route_template(scope)}")
