"""The gateway's HTTP/1.1 server protocol: uvicorn's httptools protocol with the edge's limits.

uvicorn bounds idle keep-alive connections (`timeout_keep_alive`) and nothing else at the
connection level: with its default parser (httptools) a request line, a header or a whole head
may be any size, a client may take forever to send its headers or its announced body, and one
address may hold any number of connections. `EdgeProtocol` adds exactly those limits:

    request line longer than `max_request_line_bytes`           414, connection closed
    more than `max_headers` headers, or a head (request line
    and headers) larger than `max_head_bytes`                   431, connection closed
    head not complete `header_timeout_s` after its first byte
    (or after the connection opened)                            408, connection closed
    body not complete `body_timeout_s` after the head           408 (if no answer started yet),
                                                                connection closed
    more than `max_connections_per_client` open connections
    from one address                                            429 to the new one, closed
    more than `max_incomplete_per_client` requests from one
    address whose body is still arriving                        429 to the new one, closed
    a body's bytes on the wire (framing and trailers included)
    over twice `max_body_bytes` plus `max_head_bytes`           413, connection closed
    HTTP/1.1 without exactly one `Host` header                  400, connection closed
    an answer the client does not read: writing stalled for
    `write_timeout_s`                                           connection aborted
    more than `max_pipelined` requests read ahead behind the
    one being answered (HTTP/1.1 pipelining)                    the queued ones answered, the
                                                                rest never read; then closed
    `Upgrade: websocket`                                        400, connection closed
    another `Upgrade` (h2c) or CONNECT                          not upgraded: the request is
                                                                served, then the connection closed

Pipelined requests are read ahead only while none is waiting: uvicorn resumes reading after
every answer and parses all that a read brings, so a client that writes requests back to back
and never reads an answer made the queue grow by a read's worth of requests per answer (16,000
queued requests, 270 MB, and garbage-collector pauses of half a second for every other client
in a ten-second flood). Here reading stays paused while requests are queued, and a read that
brings more than `max_pipelined` ends the connection after their answers (`Connection: close`
on the last; RFC 9112 §9.3.2: the client retries the rest on a new connection).

Chunked trailer fields are read and dropped: they never join the request's headers (uvicorn
appends them to the very list the application reads) and never go upstream. Every connection
is counted against its address from `connection_made` to `connection_lost`, whatever ends it
(an answer, a refusal, a parse error, a reset, an abort); the server runs with `ws="none"`, so
no connection is ever handed to another protocol object that would not release the count.

Each refusal is written by the protocol itself (problem+json, `Connection: close`) before the
request reaches the application, so nothing is forwarded: a head refused is never parsed into
a request, and a body cut short by its deadline reaches an upstream, if at all, as an
incomplete request. A head's size is counted from the bytes received while it is incomplete,
so a client cannot make the parser buffer an endless header value either.

Why subclass rather than configure: uvicorn has no setting for these with httptools
(h11's `max_incomplete_event_size` covers only the head size, and only with the slower h11
parser); the subclass keeps httptools' speed and touches only its parser callbacks.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import structlog
import uvicorn
from prometheus_client import Counter as PrometheusCounter
from prometheus_client import Gauge
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gozon.core.problems import PROBLEM_JSON
from gozon.gateway.settings import GatewaySettings

log = structlog.get_logger(__name__)
EDGE_REFUSALS = PrometheusCounter(
    "gozon_gateway_edge_refusals_total",
    "Connections the gateway's server refused before a request reached the app, by status: "
    "400 unparseable, 408 too slow, 414/431 too large, 429 too many connections.",
    ["status"],
)
OPEN_CONNECTIONS = Gauge(
    "gozon_gateway_open_connections", "Client connections the gateway's server holds open."
)
INCOMPLETE_REQUESTS = Gauge(
    "gozon_gateway_incomplete_requests",
    "Requests whose head has arrived and whose body is still arriving (they hold no upstream "
    "slot yet).",
)
PIPELINE_CUTS = PrometheusCounter(
    "gozon_gateway_pipeline_cuts_total",
    "Connections closed after their queued answers because one read brought more pipelined "
    "requests than the gateway reads ahead.",
)
WRITE_TIMEOUTS = PrometheusCounter(
    "gozon_gateway_write_timeouts_total",
    "Connections aborted because the client stopped reading an answer for the write timeout.",
)
# After a refusal the connection is half-closed (FIN after the answer) and what the client
# still sends is read and dropped for this long, so its kernel does not turn our close into a
# reset that destroys the answer before the client reads it (nginx's lingering close).
LINGER_S = 2.0
# A deadline acts after one more turn of the event loop (see `_after_a_turn`).
TURN_S = 0.01


@dataclass
class EdgeLimits:
    """The limits (`limits_from` the settings, whose defaults they are), and the per-address
    connection counts shared by a server's connections."""

    max_request_line_bytes: int
    max_head_bytes: int
    max_headers: int
    header_timeout_s: float
    body_timeout_s: float
    max_connections_per_client: int
    max_incomplete_per_client: int
    max_body_bytes: int
    write_timeout_s: float
    max_pipelined: int
    open_connections: Counter[str] = field(default_factory=Counter)
    incomplete_requests: Counter[str] = field(default_factory=Counter)

    @property
    def max_body_wire_bytes(self) -> int:
        """A body's bytes on the wire: the body, its chunk framing (chunks of 8 bytes or more
        cost less than double), its trailers."""
        return 2 * self.max_body_bytes + self.max_head_bytes


class _Refused(Exception):
    """Raised from a parser callback: the parser stops, `send_400_response` answers it."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class _PipelineCut(Exception):
    """Raised from a parser callback: the parser stops, nothing more is read or answered."""


class _PipelineFlow(FlowControl):
    """uvicorn's flow control, except that reading stays paused while requests are queued
    behind the one being answered: they are read ahead only as far as the queue is empty."""

    def __init__(self, transport: asyncio.Transport, queued: Callable[[], int]) -> None:
        super().__init__(transport)
        self._queued = queued

    def resume_reading(self) -> None:
        if not self._queued():
            super().resume_reading()


def problem_bytes(status: int, detail: str, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 problem+json answer that closes the connection."""
    phrase = HTTPStatus(status).phrase
    body = json.dumps(
        {"type": "about:blank", "title": phrase, "status": status, "detail": detail}
    ).encode()
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        f"content-type: {PROBLEM_JSON}",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with `EdgeLimits` (see the module docstring)."""

    limits: EdgeLimits  # set by `edge_protocol`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counted_as: str | None = None
        self._incomplete_as: str | None = None  # counted in `incomplete_requests`
        self._in_head = True
        self._head_bytes = 0  # received while the head is incomplete
        self._body_bytes = 0  # received while the body is incomplete (framing included)
        self._line_and_headers = 0  # the parsed head's size
        self._header_count = 0
        self._hosts = 0
        self._refused: _Refused | None = None
        self._discarding = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._head_turn_taken = self._body_turn_taken = False
        self._pipeline_cut = False

    # ------------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _PipelineFlow(transport, lambda: len(self.pipeline))
        host = self.client[0] if self.client else ""
        if self.limits.open_connections[host] >= self.limits.max_connections_per_client:
            log.warning("connection refused: too many from one address", client=host)
            self._close_with(
                429,
                f"More than {self.limits.max_connections_per_client} open connections from "
                "this address; reuse one, or retry later.",
                {"retry-after": "1"},
            )
            return
        self.limits.open_connections[host] += 1
        OPEN_CONNECTIONS.inc()
        self._counted_as = host
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        self._cancel_write_timer()
        self._body_done()
        if self._counted_as is not None:
            _release(self.limits.open_connections, self._counted_as)
            OPEN_CONNECTIONS.dec()
            self._counted_as = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discarding or self._pipeline_cut or self.transport.is_closing():
            return
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(
                    self.limits.header_timeout_s, self._head_late
                )
        else:
            self._body_bytes += len(data)
        super().data_received(data)
        if self._discarding or self._pipeline_cut or self.transport.is_closing():
            return
        if self._in_head and self._head_bytes > self.limits.max_head_bytes:
            self._close_with(431, self._head_too_large())
        elif not self._in_head:
            self._body_arriving()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error: ours, when a limit of ours stopped the parser."""
        if self._pipeline_cut:
            return  # the queued requests' answers come first, and the last one closes
        if self._refused is not None:
            self._close_with(self._refused.status, self._refused.detail)
        else:
            self._close_with(400, "The request is not valid HTTP/1.1.")

    def _unsupported_upgrade_warning(self) -> None:
        """uvicorn's note on an `Upgrade` it will not do: the request is served without it (and
        the connection closed after the answer, see `on_headers_complete`), nothing to warn."""

    def pause_writing(self) -> None:
        """The client is not reading as fast as the answer is written: it has `write_timeout_s`
        to catch up before the connection is aborted (nginx's `send_timeout`)."""
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.write_timeout_s, self._write_late)

    def resume_writing(self) -> None:
        self._cancel_write_timer()
        super().resume_writing()

    # ------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._line_and_headers = 0
        self._header_count = 0
        self._hosts = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_request_line_bytes:
            self._refuse(
                414,
                f"The request target is longer than {self.limits.max_request_line_bytes} bytes.",
            )
        self._line_and_headers += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._line_and_headers += len(name) + len(value) + 4
        if self._header_count > self.limits.max_headers:
            self._refuse(431, f"The request has more than {self.limits.max_headers} headers.")
        if self._line_and_headers > self.limits.max_head_bytes:
            self._refuse(431, self._head_too_large())
        if not self._in_head:
            return  # a chunked body's trailer field: read, counted, never a request header
        if name.lower() == b"host":
            self._hosts += 1
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if len(self.pipeline) >= self.limits.max_pipelined:
            self._cut_pipeline()
        self._in_head = False
        self._head_bytes = 0
        self._body_bytes = 0
        self._cancel_timers()
        if self.parser.get_http_version() == "1.1" and self._hosts != 1:
            # RFC 9112 §3.2: which host was meant is unknown, so neither copy may be guessed.
            self._refuse(
                400,
                "An HTTP/1.1 request needs exactly one Host header."
                if self._hosts == 0
                else "The Host header is given more than once.",
            )
        if self.parser.should_upgrade() and any(
            name == b"upgrade" and b"websocket" in value.lower() for name, value in self.headers
        ):
            # No upstream serves one: refused here, at no upstream's cost (it was a 403 from
            # the gateway's own router, after the connection had been handed over).
            self._refuse(400, "The gateway does not upgrade connections to WebSocket.")
        self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_late)
        super().on_headers_complete()
        if self.parser.should_upgrade() and self.cycle is not None:
            # Not upgraded (`ws="none"`): the request is served as plain HTTP, after which the
            # parser, stopped at the upgrade, could read nothing more on this connection.
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        self._cancel_timers()
        self._body_done()
        self._in_head = True  # the next request's head, if any, starts now
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # resumes reading, then starts the next queued request
        if not self.pipeline and not self._pipeline_cut and not self.transport.is_closing():
            self.flow.resume_reading()  # the queue is empty now: read the next requests

    def _cut_pipeline(self) -> None:
        """More requests read ahead than `max_pipelined`: the queued ones are answered, the
        last of them with `Connection: close`, and nothing after them is parsed or read."""
        PIPELINE_CUTS.inc()
        log.info("too many pipelined requests; closing after the queued ones",
                 client=self._counted_as, queued=len(self.pipeline))  # fmt: skip
        newest, _ = self.pipeline[0]  # uvicorn queues with appendleft
        newest.keep_alive = False
        self._pipeline_cut = True
        self._cancel_timers()
        self.flow.pause_reading()
        raise _PipelineCut

    # ------------------------------------------------------------------ incomplete bodies

    def _body_arriving(self) -> None:
        """After a read that left a body incomplete: it now counts against its address."""
        if self._body_bytes > self.limits.max_body_wire_bytes:
            self._close_with(
                413, f"The request body is larger than {self.limits.max_body_bytes} bytes."
            )
            return
        if self._incomplete_as is not None or self._counted_as is None:
            return
        host = self._counted_as
        if self.limits.incomplete_requests[host] >= self.limits.max_incomplete_per_client:
            log.warning("request refused: too many incomplete from one address", client=host)
            self._close_with(
                429,
                f"More than {self.limits.max_incomplete_per_client} requests from this address "
                "are still sending their bodies; finish one, or retry later.",
                {"retry-after": "1"},
            )
            return
        self.limits.incomplete_requests[host] += 1
        INCOMPLETE_REQUESTS.inc()
        self._incomplete_as = host

    def _body_done(self) -> None:
        if self._incomplete_as is not None:
            _release(self.limits.incomplete_requests, self._incomplete_as)
            INCOMPLETE_REQUESTS.dec()
            self._incomplete_as = None

    # ------------------------------------------------------------------ refusals

    def _refuse(self, status: int, detail: str) -> None:
        refused = _Refused(status, detail)
        self._refused = refused
        raise refused

    def _head_too_large(self) -> str:
        return f"The request line and headers are larger than {self.limits.max_head_bytes} bytes."

    def _after_a_turn(self, expired: Callable[[], None]) -> asyncio.TimerHandle:
        """`expired` once the loop has polled the socket again: uvloop runs due timers before
        it reads, so a gateway that fell behind would otherwise refuse a client whose bytes
        it had received but not read yet."""
        return self.loop.call_later(TURN_S, expired)

    def _head_late(self) -> None:
        if self.transport.is_closing():
            return
        if not self._head_turn_taken:
            self._head_turn_taken = True
            self._head_timer = self._after_a_turn(self._head_late)
            return
        self._head_timer = None
        if self._head_bytes == 0:
            self._abandon_cycle()
            self.transport.close()  # a new connection that sent nothing: nothing to answer
            return
        self._close_with(
            408, f"The request headers did not arrive within {self.limits.header_timeout_s:g} s."
        )

    def _body_late(self) -> None:
        if self.transport.is_closing():
            return
        if not self._body_turn_taken:
            self._body_turn_taken = True
            self._body_timer = self._after_a_turn(self._body_late)
            return
        self._body_timer = None
        log.info("request body too slow; closing", client=self._counted_as)
        self._close_with(
            408, f"The request body did not arrive within {self.limits.body_timeout_s:g} s."
        )

    def _write_late(self) -> None:
        self._write_timer = None
        if self.transport.is_closing() and self.transport.get_write_buffer_size() == 0:
            return
        WRITE_TIMEOUTS.inc()
        log.info("client stopped reading the answer; aborting", client=self._counted_as)
        self._abandon_cycle()
        self.transport.abort()  # close() would wait for the buffer the client does not read

    def _close_with(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        """Answers `status` (unless an answer is being sent) and closes the connection."""
        if self._discarding or self.transport.is_closing():
            return  # refused already (a parser callback's refusal, then the size check)
        self._cancel_timers()
        self._body_done()
        EDGE_REFUSALS.labels(str(status)).inc()
        answering = self.cycle is not None and self.cycle.response_started
        self._abandon_cycle()
        if answering and not (self.cycle is not None and self.cycle.response_complete):
            self.transport.close()  # mid-answer: only closing can tell the client it is cut
            return
        self.transport.write(problem_bytes(status, detail, headers))
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self._discarding = True
        self.loop.call_later(LINGER_S, self._end_linger)

    def _end_linger(self) -> None:
        # A client that reads nothing leaves our answer in the buffer, and close() would wait
        # for it forever (holding the address's count): abort that one.
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    def _abandon_cycle(self) -> None:
        # The application, if it runs, now sees the client gone: its reads end, its writes drop.
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None
        self._head_turn_taken = self._body_turn_taken = False

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None


def _release(counts: Counter[str], host: str) -> None:
    counts[host] -= 1
    if counts[host] <= 0:
        del counts[host]


def edge_protocol(limits: EdgeLimits) -> type[EdgeProtocol]:
    """A protocol class for `uvicorn.run(http=…)` bound to `limits` (one per server)."""
    return type("GatewayEdgeProtocol", (EdgeProtocol,), {"limits": limits})


def limits_from(settings: GatewaySettings) -> EdgeLimits:
    return EdgeLimits(
        max_request_line_bytes=settings.gateway_max_request_line_bytes,
        max_head_bytes=settings.gateway_max_head_bytes,
        max_headers=settings.gateway_max_headers,
        header_timeout_s=settings.gateway_header_timeout_s,
        body_timeout_s=settings.gateway_body_timeout_s,
        max_connections_per_client=settings.gateway_max_connections_per_client,
        max_incomplete_per_client=settings.gateway_max_incomplete_per_client,
        max_body_bytes=settings.gateway_max_body_bytes,
        write_timeout_s=settings.gateway_write_timeout_s,
        max_pipelined=settings.gateway_max_pipelined,
    )


def uvicorn_config(app: Any, settings: GatewaySettings) -> uvicorn.Config:
    """How `gozon gateway` serves the app (the tests serve it the same way)."""
    return uvicorn.Config(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        http=edge_protocol(limits_from(settings)),
        log_config=None,
        access_log=False,
        proxy_headers=False,  # the edge: the peer is the client; X-Forwarded-For is not trusted
        server_header=False,  # no version banner on the public port
        ws="none",  # nothing to upgrade to: a WebSocket protocol would take the connection over
    )
