"""The reverse proxy: edge checks, then one streamed exchange with the upstream.

For every request under an upstream's prefix, in this order, each refusal a problem+json
answer that never reaches the upstream:

    no identity (gateway/identity.py):
    X-User-Id missing, repeated or
    malformed (header mode)             400
    bearer token missing or invalid
    (jwt mode)                          401 + WWW-Authenticate
    Content-Length over the limit       413 (a body without one is counted as it arrives)
    per-user rate limit exceeded        429 + Retry-After (only when configured)
    ... the whole body is read (over the limit: 413; too slow: the server's 408) ...
    upstream's in-flight limit reached  503 + Retry-After, at once (load shedding)
    upstream's breaker open             503 + Retry-After, at once

Admission comes after the request is whole: a client that sends its body slowly, or never,
waits in the gateway holding no upstream slot, and the server protocol's body deadline
(gateway/server.py) ends it with a 408 that the upstream and its breaker never see. Then the
request goes upstream on that upstream's pooled aiohttp session, and the answer comes back
(small ones read whole, which frees the slot before the client reads them; large ones
streamed), headers filtered as `gateway.headers` says. The request carries
`X-Request-Timeout-Ms`, the time the gateway will still wait (its timeout, less what has
passed and a margin for the answer's way back): the API refuses work it cannot finish in time
and never commits after it (`gozon.core.deadline`). Each attempt is a CLIENT span (HTTP client
conventions: method, `url.full`, `server.address`/`.port`, the status) whose context, with the
caller's `tracestate`, is the `traceparent` the upstream gets.

Failures are told apart by whether the upstream may have acted on the request; every problem
body says which in its `outcome` member:

    nothing sent: connection refused or
    unreachable, breaker open            503 + Retry-After, "outcome": "not_processed"
                                         (idempotent ones retried first, see below)
    sent, no answer headers within the
    configured timeout                   504, "outcome": "unknown"
    sent, connection lost before the
    answer, or a malformed answer        502, "outcome": "unknown"

An upstream's own answers (its 503 when it sheds load, say) pass through unchanged. An unknown
outcome tells the client that a retry with the same `Idempotency-Key` is safe (the APIs
process a key once).

Retries happen only for idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE), only on
connection errors, never on a timeout (the upstream may still be working on it), and at once.
The gateway retries a connection that could not be made (refused, unreachable: a replica going
away) up to `gateway_upstream_retries` times; a pooled connection that the upstream closed under
a sent request is retried once by aiohttp itself (RFC 9112 §9.3.1, idempotent methods only).
The circuit breaker hears only of the upstream's own failures: no connection, no answer
within the timeout to a request that was sent whole, a lost or malformed answer, and an
answered 5xx other than 503 and 504 (the APIs' deadline answers, "not processed" and "outcome
unknown", given on purpose while they shed load or wait out their database: counting them would
turn the upstream's own bounded answers into a gateway-wide outage). Anything the client does
(a slow or abandoned body, a disconnect, a 4xx) happens before admission or is the upstream's
success, so it can never open it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
import structlog
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from prometheus_client import Counter, Gauge
from starlette.types import Receive, Scope, Send
from yarl import URL

from gozon.core.headers import DEADLINE_HEADER
from gozon.core.problems import Problem, problem_response
from gozon.core.telemetry import TRACE_HEADERS, get_tracer, http_method
from gozon.gateway.breaker import CircuitBreaker, State
from gozon.gateway.headers import downstream_headers, upstream_headers
from gozon.gateway.identity import IDENTITY_HEADERS, identity_from
from gozon.gateway.ratelimit import RateLimiter, retry_after
from gozon.gateway.settings import GatewaySettings

UPSTREAM_REQUESTS = Counter(
    "gozon_gateway_upstream_requests_total",
    "Requests for an upstream, by outcome: answered, unavailable (not sent), timeout, lost "
    "(sent, connection lost), bad_response, breaker_open, shed (at the in-flight limit).",
    ["upstream", "outcome"],
)
UPSTREAM_OUTCOMES = (
    "answered",
    "unavailable",
    "timeout",
    "lost",
    "bad_response",
    "breaker_open",
    "shed",
)
BREAKER_STATE = Gauge(
    "gozon_gateway_breaker_state",
    "The upstream's circuit breaker: 0 closed, 1 half-open, 2 open.",
    ["upstream"],
)

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# Answers up to this size with a known length are read whole (the upstream slot is freed
# before the client reads them) and sent in one piece; larger ones stream.
BUFFERED_BYTES = 64 * 1024
# Below uvicorn's default keep-alive (5 s): the gateway drops an idle pooled connection before
# the upstream closes it, so a request rarely meets a connection closing under it.
POOL_KEEPALIVE_S = 4.0
REQUEST_ID_KEY = "gozon.request_id"
USER_KEY = "gozon.user_id"
# The budget sent upstream is the gateway's time left less this share of its timeout: the
# answer's way back (and a busy event loop) must fit in it too.
DEADLINE_MARGIN = 0.2
NOT_PROCESSED = "not_processed"
UNKNOWN = "unknown"

log = structlog.get_logger(__name__)
tracer = get_tracer("gozon.gateway")


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str
    session: aiohttp.ClientSession
    breaker: CircuitBreaker

    async def answers(self) -> bool:
        """Readiness: the upstream's `/health/live` answers 200."""
        async with self.session.get(
            f"{self.url}/health/live", timeout=aiohttp.ClientTimeout(total=1.0)
        ) as response:
            return response.status == 200


def open_upstream(name: str, url: str, settings: GatewaySettings) -> Upstream:
    """The upstream's pooled session and breaker (call inside the lifespan, close the session)."""
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=settings.gateway_upstream_pool_size, keepalive_timeout=POOL_KEEPALIVE_S
        ),
        # The deadline for the answer's headers is the proxy's; these bound the connect and
        # each read of a streamed answer.
        timeout=aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.gateway_upstream_connect_timeout_s,
            sock_read=settings.gateway_upstream_timeout_s,
        ),
        auto_decompress=False,  # bytes pass through as the upstream encoded them
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),  # one session serves every user: keep no cookies
    )

    def on_change(state: State) -> None:
        BREAKER_STATE.labels(name).set(state)
        log.warning("circuit breaker changed", upstream=name, state=state.name)

    BREAKER_STATE.labels(name).set(State.CLOSED)
    for outcome in UPSTREAM_OUTCOMES:  # every series at 0 from the start
        UPSTREAM_REQUESTS.labels(name, outcome)
    breaker = CircuitBreaker(
        failure_threshold=settings.gateway_breaker_failures,
        reset_timeout_s=settings.gateway_breaker_reset_s,
        on_change=on_change,
    )
    return Upstream(name, url, session, breaker)


class _ClientGone(Exception):
    pass


async def read_body(receive: Receive, limit: int) -> bytes:
    """The client's whole request body; 413 past `limit`, `_ClientGone` if it disconnects.

    The server protocol bounds how long this may take (its body deadline answers 408 and
    disconnects the request), so a slow client waits here, holding no upstream slot."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class Gateway:
    """The lifespan's routing state: upstreams by name, the limits, the optional rate limiter."""

    def __init__(self, settings: GatewaySettings, upstreams: dict[str, Upstream]) -> None:
        self.upstreams = upstreams
        self.timeout_s = settings.gateway_upstream_timeout_s
        self.retries = settings.gateway_upstream_retries
        self.max_body = settings.gateway_max_body_bytes
        self.identity = identity_from(settings)
        self.dropped = IDENTITY_HEADERS | self.identity.drops
        self.max_in_flight = settings.gateway_upstream_max_in_flight
        self._in_flight = dict.fromkeys(upstreams, 0)
        self.limiter = (
            RateLimiter(
                rate_per_s=settings.gateway_rate_limit_per_s,
                burst=settings.gateway_rate_limit_burst,
            )
            if settings.gateway_rate_limit_per_s > 0
            else None
        )

    def in_flight(self, name: str) -> int:
        return self._in_flight[name]

    async def close(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.session.close()

    async def forward(self, name: str, scope: Scope, receive: Receive, send: Send) -> None:
        upstream = self.upstreams[name]
        try:
            self._check(scope)
            # Admission after the request is whole: a slow body costs no upstream slot.
            body = await read_body(receive, self.max_body)
            self._admit(upstream)
        except Problem as problem:
            await _refuse(problem, scope, receive, send)
            return
        except _ClientGone:
            log.info("client closed the request before its body was complete", upstream=name)
            return
        self._in_flight[name] += 1
        held = True
        try:
            outcome = await self._exchange_and_read(upstream, scope, body)
            if isinstance(outcome, Problem):
                held = False
                self._in_flight[name] -= 1
                await _refuse(outcome, scope, receive, send)
                return
            response, span, data = outcome
            if data is not None:  # read whole: the upstream is done, the slot is free
                held = False
                self._in_flight[name] -= 1
            try:
                await _relay(response, data, send)
            except BaseException as exc:
                _end_client_span(span, exc)
                raise
            else:
                span.end()
            finally:
                response.release()
        finally:
            if held:
                self._in_flight[name] -= 1

    async def _exchange_and_read(
        self, upstream: Upstream, scope: Scope, body: bytes
    ) -> tuple[aiohttp.ClientResponse, Span, bytes | None] | Problem:
        """One exchange under the upstream timeout: the response, its span and, when it is
        small, its whole body; or the problem to answer when there was no answer."""
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        answer: tuple[aiohttp.ClientResponse, Span] | None = None
        data: bytes | None = None
        try:
            async with asyncio.timeout_at(deadline):
                answer = await self._exchange(upstream, scope, body, deadline)
                length = answer[0].content_length
                if length is not None and length <= BUFFERED_BYTES:
                    data = await answer[0].read()
        except Exception as exc:
            if answer is not None:  # the answer's body failed to arrive
                _end_client_span(answer[1], exc)
                answer[0].release()
            return self._failure(upstream, exc)
        response, span = answer
        self._answered(upstream, response.status)
        return response, span, data

    def _answered(self, upstream: Upstream, status: int) -> None:
        """An answer: the breaker hears of a server error. A 503 (not processed) and a 504
        (outcome unknown) are the APIs' deadline answers (docs/reliability.md), given on
        purpose by their deadline while a dependency stalls: the service is there and keeps
        its own schedule, so neither opens the breaker for every user."""
        if status >= 500 and status not in (503, 504):
            UPSTREAM_REQUESTS.labels(upstream.name, "server_error").inc()
            upstream.breaker.failure()
        else:
            UPSTREAM_REQUESTS.labels(upstream.name, "answered").inc()
            upstream.breaker.success()

    def _check(self, scope: Scope) -> None:
        """The edge checks that need no body: identity, declared length, rate limit."""
        user = self.identity.user(scope["headers"])
        scope[USER_KEY] = user
        length_header: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length_header = value
        if length_header is not None:
            if not length_header.isdigit():
                raise Problem(400, "Content-Length must be a whole number of bytes.")
            if int(length_header) > self.max_body:
                raise _too_large(self.max_body)
        if self.limiter is not None and (wait := self.limiter.acquire(user)):
            raise Problem(
                429,
                "Too many requests for this user; retry after the time in Retry-After.",
                headers={"Retry-After": str(retry_after(wait))},
            )

    def _admit(self, upstream: Upstream) -> None:
        """The upstream's checks, once the request is whole: in-flight limit, then breaker."""
        if self._in_flight[upstream.name] >= self.max_in_flight:
            # Shed here, before the breaker (whose half-open probe slot it must not take):
            # the upstream's own queue is full or nearly, and a request sent now would wait.
            UPSTREAM_REQUESTS.labels(upstream.name, "shed").inc()
            raise Problem(
                503,
                f"The {upstream.name} service is at capacity; the request was not processed. "
                "Retry after the time in Retry-After.",
                headers={"Retry-After": "1"},
                outcome=NOT_PROCESSED,
            )
        if not upstream.breaker.allow():
            UPSTREAM_REQUESTS.labels(upstream.name, "breaker_open").inc()
            raise Problem(
                503,
                f"The {upstream.name} service is unavailable; the request was not processed. "
                "Retry after the time in Retry-After.",
                headers={"Retry-After": str(upstream.breaker.retry_after())},
                outcome=NOT_PROCESSED,
            )

    async def _exchange(
        self, upstream: Upstream, scope: Scope, body: bytes, deadline: float
    ) -> tuple[aiohttp.ClientResponse, Span]:
        """Sends the request (again, on a connection error, if it may), each attempt in a
        CLIENT span whose context goes upstream; answers the response and its open span."""
        method: str = scope["method"]
        query: bytes = scope["query_string"]
        path: bytes = scope.get("raw_path") or scope["path"].encode()
        url = URL(
            upstream.url + (path + b"?" + query if query else path).decode("latin-1"),
            encoded=True,
        )
        client = scope.get("client")
        headers = upstream_headers(
            scope["headers"],
            client_host=client[0] if client else None,
            scheme=scope["scheme"],
            request_id=scope[REQUEST_ID_KEY],
            trace={},  # each attempt's own CLIENT span, below
            user_id=scope[USER_KEY],
            dropped=self.dropped,
        )
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            budget_s = deadline - loop.time() - DEADLINE_MARGIN * self.timeout_s
            span = _start_client_span(method, url, attempt)
            carrier: dict[str, str] = {}
            propagate.inject(carrier, context=trace.set_span_in_context(span))
            sent = [
                *headers,
                (DEADLINE_HEADER, str(max(1, int(budget_s * 1000)))),
                *((name, value) for name, value in carrier.items() if name in TRACE_HEADERS),
            ]
            try:
                response = await upstream.session.request(
                    method,
                    url,
                    headers=sent,
                    data=body or None,
                    allow_redirects=False,
                )
            except BaseException as exc:
                _end_client_span(span, exc)
                # No connection, so not one byte of the request (nor of its body) was read.
                if (
                    not isinstance(exc, aiohttp.ClientConnectorError)
                    or not retryable(method, exc)
                    or attempt == self.retries
                ):
                    raise
                attempt += 1
                continue
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 400:
                span.set_attribute("error.type", str(response.status))
                span.set_status(Status(StatusCode.ERROR))
            return response, span

    def _failure(self, upstream: Upstream, exc: Exception) -> Problem:
        """The answer to a request that was whole and got no answer from the upstream."""
        retry = (
            f"The {upstream.name} service may or may not have processed the request. "
            "Retrying with the same Idempotency-Key is safe: a key is processed once."
        )
        # Connector errors (the connect timeout included) mean no connection: nothing was sent.
        if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
            outcome = "unavailable"
            problem = Problem(
                503,
                f"The {upstream.name} service is unavailable; the request was not processed. "
                "Retry after the time in Retry-After.",
                headers={"Retry-After": "1"},
                outcome=NOT_PROCESSED,
            )
        elif isinstance(exc, TimeoutError):
            outcome = "timeout"
            problem = Problem(
                504,
                f"No answer within {self.timeout_s:g} s. {retry}",
                title="Outcome unknown",
                outcome=UNKNOWN,
            )
        elif isinstance(exc, aiohttp.ClientError):
            # Sent, then the connection was lost or the answer was malformed.
            outcome = (
                "bad_response"
                if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError)
                else "lost"
            )
            problem = Problem(
                502,
                f"The connection was lost before the answer. {retry}",
                title="Outcome unknown",
                outcome=UNKNOWN,
            )
        else:  # a bug of the gateway's, not the upstream's: the breaker is not told
            log.error("proxy failed", upstream=upstream.name, exc_info=exc)
            return Problem(500, "The gateway failed to answer; the error was logged.")
        UPSTREAM_REQUESTS.labels(upstream.name, outcome).inc()
        upstream.breaker.failure()
        log.warning("upstream failed", upstream=upstream.name, outcome=outcome, error=repr(exc))
        return problem


def _start_client_span(method: str, url: URL, attempt: int) -> Span:
    """A CLIENT span for one attempt at the upstream (HTTP client conventions: a resend is a
    span of its own with `http.request.resend_count`)."""
    attributes: dict[str, str | int] = {
        "http.request.method": http_method(method),
        "url.full": str(url),
        "server.address": url.host or "",
    }
    if url.port is not None:
        attributes["server.port"] = url.port
    if attempt:
        attributes["http.request.resend_count"] = attempt
    return tracer.start_span(http_method(method), kind=SpanKind.CLIENT, attributes=attributes)


def _end_client_span(span: Span, exc: BaseException) -> None:
    # The deadline cancels the awaited request: that is a timeout, not a cancellation.
    kind = "timeout" if isinstance(exc, asyncio.CancelledError) else type(exc).__qualname__
    span.set_attribute("error.type", kind)
    span.set_status(Status(StatusCode.ERROR, repr(exc)))
    span.end()


def retryable(method: str, exc: BaseException) -> bool:
    """May the gateway send this failed attempt again (if it has retries left)?"""
    return method in IDEMPOTENT and isinstance(exc, aiohttp.ClientConnectorError)


def _too_large(limit: int) -> Problem:
    return Problem(413, f"The request body is larger than {limit} bytes.")


async def _refuse(problem: Problem, scope: Scope, receive: Receive, send: Send) -> None:
    response = problem_response(
        problem.status,
        problem.detail,
        instance=scope["path"],
        title=problem.title,
        headers=problem.headers,
        **problem.extensions,
    )
    await response(scope, receive, send)


async def _relay(response: aiohttp.ClientResponse, data: bytes | None, send: Send) -> None:
    """Sends the upstream's answer on: in one piece when it was read whole, else as it arrives."""
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": downstream_headers(response.raw_headers, origin=str(response.url.origin())),
        }
    )
    if data is not None:
        await send({"type": "http.response.body", "body": data})
        return
    async for chunk in response.content.iter_any():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
