"""W3C trace context: one trace follows an order across HTTP, outbox rows and Kafka headers.

`configure_tracing` installs the SDK tracer provider once per process, so every span has real
ids to propagate even when nothing exports them. The carriers are plain dicts of
`traceparent` / `tracestate`: stored in the outbox row, sent as Kafka headers, read back by the
consumer.

Guarantees (docs/observability.md, "Traces"):
- Every exported span belongs to a trace that means something. Background work (a relay's
  poll, claim and commit, the wake-up notifications, pruning, the scrape-time gauge queries)
  starts no trace of its own: `QuietBackground` drops a root span that is a database
  statement or is marked `gozon.background`, and so everything under it, unless
  `GOZON_TRACE_BACKGROUND_DB=true` asks for it. Statements run for a request or a message
  are children of its span and are kept.
- Sampling follows `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default
  `parentbased_always_on`); the decision travels with the context, through outbox rows and
  Kafka headers, so an order's trace is kept or dropped whole. A process that exports nothing
  and names no sampler records nothing (`recording_sampler`); its spans keep their real ids.
- A request with two different `traceparent` headers, or a malformed one, starts a fresh
  trace (W3C Trace Context: the vendor must not guess); `tracestate` travels with a valid
  `traceparent` only.
- Every span says where it comes from and which conventions it follows: the resource carries
  `service.name`, `service.namespace`, `service.version` (the package's) and
  `deployment.environment.name`; every tracer of the project declares `SCHEMA_URL`; database
  statements are named by their query summary (`SELECT orders`, `BEGIN`) with
  `db.query.summary`, `db.operation.name` and `db.collection.name` (`DatabaseSpanNames`).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version

import structlog
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, TraceState
from opentelemetry.util.types import Attributes
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gozon.core.metrics import route_template

# The semantic conventions the project's spans follow (docs/observability.md): the newest
# schema of the `opentelemetry-semantic-conventions` package in the lock.
SCHEMA_URL = "https://opentelemetry.io/schemas/1.44.0"
TRACE_HEADERS = ("traceparent", "tracestate")
BACKGROUND = "gozon.background"
"""Set (True) on the root span of background work: dropped unless background tracing is on."""
# The database semantic conventions the asyncpg instrumentation writes, unless the operator
# chose otherwise: the stable names (db.query.text, db.system.name, server.address, …) only.
DEFAULT_SEMCONV_OPT_IN = "database"
access_log = structlog.get_logger("gozon.access")


def get_tracer(name: str) -> trace.Tracer:
    """The project's tracers: named by module, declaring the conventions' schema URL."""
    return trace.get_tracer(name, schema_url=SCHEMA_URL)


def package_version() -> str:
    try:
        return version("gozon")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def service_resource(service: str, *, namespace: str, environment: str) -> Resource:
    """The resource of a process's spans; `OTEL_RESOURCE_ATTRIBUTES` may add to it."""
    return Resource.create(
        {
            "service.name": f"gozon-{service}",
            "service.namespace": namespace,
            "service.version": package_version(),
            "deployment.environment.name": environment,
        },
        schema_url=SCHEMA_URL,
    )


# -- database spans: named by their query summary

_LITERALS = re.compile(r"'(?:[^']|'')*'|--[^\n]*|/\*.*?\*/", re.DOTALL)
# a table, maybe schema-qualified and quoted; after FROM, not a function (`unnest(...)`)
_TABLE = r'("?[A-Za-z_][\w$]*"?(?:\."?[A-Za-z_][\w$]*"?)?)'
_FROM_TABLE = _TABLE + r"(?![\w$.]|\s?\()"
_OPERATIONS = re.compile(
    r"\b(?:(INSERT) INTO "
    + _TABLE
    # not the row locks `FOR [NO KEY] UPDATE` nor the upsert's `DO UPDATE`
    + r"|(?<!FOR )(?<!KEY )(?<!DO )(UPDATE) (?:ONLY )?"
    + _TABLE
    + r"|(DELETE) FROM "
    + _TABLE
    + r"|(SELECT)\b(?:(?!\b(?:SELECT|INSERT|UPDATE|DELETE)\b).)*?\bFROM "
    + _FROM_TABLE
    + r"|(SELECT)\b)",
    re.IGNORECASE,
)
_CTE = re.compile(
    r"(?:\bWITH(?: RECURSIVE)?|,) ?(\w+) AS (?:NOT )?(?:MATERIALIZED )?\(", re.IGNORECASE
)
_SUMMARY_MAX = 255


def query_summary(query: str) -> tuple[str, str | None, str | None]:
    """The summary of a SQL statement as the database conventions describe it (each operation
    with its collection, in order, once: `UPDATE order_outbox SELECT order_outbox`; a common
    table expression's name is not a collection; a statement of another kind by its first
    word: `BEGIN`), its first operation and its first collection.
    """
    text = " ".join(_LITERALS.sub(" ", query).split()).rstrip(";").strip()
    words = [w.upper() for w in re.findall(r"(?:^|;)\s*([A-Za-z]+)", text)]
    first = words[0] if words else ""
    if first not in ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH"):
        # a command, or several in one string (`BEGIN; SET LOCAL …`): their first words
        return (" ".join(words) or "SQL"), (first or None), None
    ctes = {name.lower() for name in _CTE.findall(text)}  # names, not collections
    parts: list[str] = []
    for match in _OPERATIONS.finditer(text):
        groups = [g for g in match.groups() if g is not None]
        op = groups[0].upper()
        table = groups[1].replace('"', "") if len(groups) > 1 else None
        part = f"{op} {table}" if table and table.lower() not in ctes else op
        if part not in parts:
            parts.append(part)
    if any(" " in part for part in parts):  # a bare SELECT beside tables says nothing more
        parts = [part for part in parts if " " in part]
    summary = " ".join(parts) or first
    if len(summary) > _SUMMARY_MAX:
        summary = summary[:_SUMMARY_MAX].rsplit(" ", 1)[0]
    operation = parts[0].split()[0] if parts else first
    collection = next((part.split()[1] for part in parts if " " in part), None)
    return summary, operation, collection


class DatabaseSpanNames(SpanProcessor):
    """Names each database statement's CLIENT span by its query summary and adds
    `db.query.summary`, `db.operation.name` and `db.collection.name` (the asyncpg
    instrumentation names it by the statement's first word: `WITH`, `BEGIN;`)."""

    def on_start(self, span: SdkSpan, parent_context: Context | None = None) -> None:
        attributes = span.attributes or {}
        query = attributes.get("db.query.text", attributes.get("db.statement"))
        if span.kind != SpanKind.CLIENT or not isinstance(query, str):
            return
        summary, operation, collection = query_summary(query)
        span.update_name(summary)
        span.set_attribute("db.query.summary", summary)
        if operation:
            span.set_attribute("db.operation.name", operation)
        if collection:
            span.set_attribute("db.collection.name", collection)

    def on_end(self, span: ReadableSpan) -> None:
        pass


def exporting(env: Mapping[str, str]) -> bool:
    """Whether the standard `OTEL_*` variables ask for OTLP export (off when none is set)."""
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").lower() in ("none", ""):
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def flag(env: Mapping[str, str], name: str) -> bool:
    """A boolean variable; anything but the usual spellings is an error naming the variable."""
    value = env.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name} must be true or false, not {env[name]!r}")


def sampler_from(env: Mapping[str, str]) -> Sampler:
    """The sampler the standard `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` name.

    The SDK's own choices: `always_on`, `always_off`, `traceidratio` and their `parentbased_`
    forms; the default is `parentbased_always_on`. An unknown name or a ratio outside [0, 1]
    fails the process at start-up rather than silently sampling everything.
    """
    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
    raw_ratio = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip() or "1.0"
    try:
        ratio = float(raw_ratio)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG must be a ratio in [0, 1], not {raw_ratio!r}")
    base = name.removeprefix("parentbased_")
    root: Sampler
    if base == "always_on":
        root = ALWAYS_ON
    elif base == "always_off":
        root = ALWAYS_OFF
    elif base == "traceidratio":
        root = TraceIdRatioBased(ratio)
    else:
        raise ValueError(
            f"OTEL_TRACES_SAMPLER={name!r} is not supported: use always_on, always_off, "
            "traceidratio, or one of them prefixed with parentbased_"
        )
    return ParentBased(root) if name.startswith("parentbased_") else root


def recording_sampler(env: Mapping[str, str]) -> Sampler:
    """`sampler_from(env)` when spans are exported or `OTEL_TRACES_SAMPLER` names a sampler;
    otherwise `ALWAYS_OFF`: with no exporter nothing reads a recorded span, and recording one
    (its attributes, events and end) at every hop is CPU spent for nothing. Unrecorded spans
    still get real ids, so the trace context, the `x-trace-id` header and the logs' trace_id
    work as before; the `traceparent` they pass on says "not sampled" (flags 00).
    """
    chosen = sampler_from(env)  # validates the variables either way
    if exporting(env) or env.get("OTEL_TRACES_SAMPLER", "").strip():
        return chosen
    return ALWAYS_OFF


def is_background(kind: SpanKind | None, attributes: Attributes) -> bool:
    """Whether a span, were it a root, would be background work: a database statement run
    outside any request or message, or a span its code marked `gozon.background`."""
    if not attributes:
        return False
    if attributes.get(BACKGROUND) is True:
        return True
    return kind == SpanKind.CLIENT and ("db.system.name" in attributes or "db.system" in attributes)


class QuietBackground(Sampler):
    """Drops root spans of background work (see `is_background`); everything else, and every
    span with a parent, is decided by `delegate`.

    A child of a dropped span is dropped too by a parent-based delegate (the default), so a
    relay's poll, with its claim and its commit, leaves no trace unless background tracing
    is on; a statement run for a request or a message has that span as its parent and is
    decided with it.
    """

    def __init__(self, delegate: Sampler, *, trace_background: bool = False) -> None:
        self.delegate = delegate
        self.trace_background = trace_background

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if (
            not self.trace_background
            and not trace.get_current_span(parent_context).get_span_context().is_valid
            and is_background(kind, attributes)
        ):
            return SamplingResult(Decision.DROP)
        return self.delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"QuietBackground{{{self.delegate.get_description()}}}"


def configure_tracing(
    service: str,
    env: Mapping[str, str] = os.environ,
    *,
    trace_background_db: bool | None = None,
    namespace: str = "gozon",
    environment: str = "local",
) -> TracerProvider:
    """Installs the SDK tracer provider (idempotent per process).

    Spans always get real ids, so the trace context propagates through HTTP, outbox rows and
    Kafka even when nothing is exported. With OTLP export configured by the standard
    variables (`OTEL_EXPORTER_OTLP_ENDPOINT`, …), spans are batched to the collector and the
    database driver is instrumented too (a span per query is worth its cost only then).
    `trace_background_db` (default: `GOZON_TRACE_BACKGROUND_DB`, false) keeps background
    work's traces (see `QuietBackground`). The sampler is `recording_sampler(env)`'s.
    `namespace` and `environment` are the resource's `service.namespace` and
    `deployment.environment.name` (`service_resource`).
    """
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    if trace_background_db is None:
        trace_background_db = flag(env, "GOZON_TRACE_BACKGROUND_DB")
    provider = TracerProvider(
        resource=service_resource(service, namespace=namespace, environment=environment),
        sampler=QuietBackground(recording_sampler(env), trace_background=trace_background_db),
    )
    provider.add_span_processor(DatabaseSpanNames())
    if exporting(env):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        instrument_database(provider, env)
    trace.set_tracer_provider(provider)
    return provider


def instrument_database(provider: TracerProvider, env: Mapping[str, str] = os.environ) -> None:
    """A CLIENT span per asyncpg statement, with the stable database conventions by default.

    The instrumentation reads `OTEL_SEMCONV_STABILITY_OPT_IN` from the process environment
    once; unless the operator set it (`database/dup` emits the old names too, for dashboards
    in transition), it is set here to `database`.
    """
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    key = "OTEL_SEMCONV_STABILITY_OPT_IN"
    os.environ[key] = env.get(key) or os.environ.get(key) or DEFAULT_SEMCONV_OPT_IN
    AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    _untraced_pool_ping()


def _untraced_pool_ping() -> None:
    """The pool's connection check (`pool_pre_ping`: BEGIN; `;`; ROLLBACK on every checkout)
    runs with instrumentation suppressed: three spans per request that say nothing about it.

    SQLAlchemy offers no hook around its ping, so its asyncpg adapter's ping coroutine is
    wrapped (once; it runs in the calling task's context, where the suppression is visible).
    """
    from opentelemetry.instrumentation.utils import suppress_instrumentation
    from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection

    ping = AsyncAdapt_asyncpg_connection._async_ping
    if getattr(ping, "_gozon_untraced", False):
        return

    async def untraced(self: AsyncAdapt_asyncpg_connection) -> None:
        with suppress_instrumentation():
            await ping(self)  # type: ignore[no-untyped-call]

    untraced._gozon_untraced = True  # type: ignore[attr-defined]
    AsyncAdapt_asyncpg_connection._async_ping = untraced  # type: ignore[method-assign]


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


def w3c_carrier(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The W3C trace headers of an HTTP request, as a carrier for `propagate.extract`.

    Two different `traceparent` headers cannot both be the caller's parent: both are dropped,
    and `tracestate` with them (it means nothing without its `traceparent`), so the request
    starts a fresh trace. Several `tracestate` headers are one list, joined in order (RFC 9110
    §5.3). A malformed `traceparent` is left to the propagator, which ignores it (and its
    `tracestate`): a fresh trace too.
    """
    parents: list[str] = []
    states: list[str] = []
    for name, value in headers:
        key = name.lower()
        if key == b"traceparent":
            parents.append(value.decode("latin-1").strip())
        elif key == b"tracestate":
            states.append(value.decode("latin-1").strip())
    if len(set(parents)) != 1:
        return {}
    carrier = {"traceparent": parents[0]}
    if any(states):
        carrier["tracestate"] = ",".join(state for state in states if state)
    return carrier


# The methods HTTP defines (RFC 9110 §9, RFC 5789); anything else is reported as `_OTHER`, so
# a client cannot blow up the attribute's cardinality.
KNOWN_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"}
)


def http_method(method: str) -> str:
    return method if method in KNOWN_METHODS else "_OTHER"


# Probes and scrapes (every few seconds from the kubelet and Prometheus) are not the work
# anyone traces: no span, so an idle platform exports nothing. Their metrics still count them.
UNTRACED_PATHS = frozenset({"/health/live", "/health/ready", "/metrics"})


class ServerSpanMiddleware:
    """A SERVER span per HTTP request, continuing the caller's `traceparent` if it sent one.

    The span follows the HTTP server conventions: named `{method} {route}`, with
    `http.request.method`, `http.route`, `url.path`, `url.scheme`,
    `http.response.status_code`, `network.protocol.version`, `client.address`,
    `user_agent.original`, and `error.type` (the status) on a 5xx answer.

    At the edge (the gateway) it also tells the client its trace id (`X-Trace-Id`) and writes
    one access-log line per request, inside the span, so the line carries the trace id. The
    health probes and `/metrics` get neither (`UNTRACED_PATHS`).
    """

    def __init__(self, app: ASGIApp, service: str, *, edge: bool = False) -> None:
        self.app = app
        self.tracer = get_tracer(f"gozon.{service}")
        self.edge = edge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACED_PATHS:
            await self.app(scope, receive, send)
            return
        method = http_method(scope["method"])
        attributes: dict[str, str | int] = {
            "http.request.method": method,
            "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"),
            "network.protocol.version": scope.get("http_version", "1.1"),
        }
        client = scope.get("client")
        if client:
            attributes["client.address"] = client[0]
        agent = next((v for k, v in scope["headers"] if k == b"user-agent"), None)
        if agent is not None:
            attributes["user_agent.original"] = agent.decode("latin-1")
        started = time.perf_counter()
        status = 500
        with self.tracer.start_as_current_span(
            method,
            context=propagate.extract(w3c_carrier(scope["headers"])),
            kind=SpanKind.SERVER,
            attributes=attributes,
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
                if route != "unmatched":  # no route: the name stays the method alone
                    span.set_attribute("http.route", route)
                    span.update_name(f"{method} {route}")
                if status >= 500:
                    span.set_attribute("error.type", str(status))
                    span.set_status(Status(StatusCode.ERROR))
                if self.edge:
                    access_log.info(
                        "request",
                        method=scope["method"],
                        route=route,
                        status=status,
                        duration_ms=round((time.perf_counter() - started) * 1000, 2),
                    )
