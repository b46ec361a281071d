"""What crosses the gateway in headers, each way (RFC 9110 §7.6.1 for the hop-by-hop rule).

Towards the upstream: hop-by-hop headers (the fixed list and any the `Connection` header names)
are dropped; `Host` becomes the upstream's own; `X-Forwarded-For` gets the client's address
appended, `X-Forwarded-Proto` and `X-Forwarded-Host` say what the client used (set by the
gateway, never trusted from the client: the gateway is the edge); `X-Request-Id`, the W3C
trace headers and `X-Request-Timeout-Ms` (the deadline) are replaced by the gateway's;
identity headers (`X-User-Id` and its kin) are dropped and `X-User-Id` set to the user the
gateway decided on (`gateway.identity`). Towards the client: hop-by-hop headers are dropped
too, `Date` is the gateway's own and `Server` is not sent, `X-Request-Id` appears exactly
once (the request's), a `Location` on the upstream's internal address becomes a path (a client
must never learn, or be sent around the gateway to, an internal address), and the rest
(several `Set-Cookie` included) passes unchanged, names lower-cased.

Pure functions over raw header pairs: no I/O, unit-tested.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping

RawHeaders = Iterable[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Set by the gateway itself on the way to the upstream; a client's values are dropped.
_REPLACED_UPSTREAM = frozenset(
    {
        b"host",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-request-id",
        b"traceparent",
        b"tracestate",
        b"x-request-timeout-ms",  # the gateway's deadline, core.deadline.DEADLINE_HEADER
    }
)
# The gateway's server writes its own (as nginx does not pass a proxied server's either).
_REPLACED_DOWNSTREAM = frozenset({b"date", b"server"})
_LOCATIONS = frozenset({b"location", b"content-location"})
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def connection_named(headers: RawHeaders) -> frozenset[bytes]:
    """The header names a `Connection` header lists: hop-by-hop for this one connection."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return frozenset(named)


def request_id(value: str | None) -> str:
    """The client's `X-Request-Id` if it is a sane token, else a fresh one."""
    if value is not None and REQUEST_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


def upstream_headers(
    headers: list[tuple[bytes, bytes]],
    *,
    client_host: str | None,
    scheme: str,
    request_id: str,
    trace: Mapping[str, str],
    user_id: str,
    dropped: frozenset[bytes] = frozenset(),
) -> list[tuple[str, str]]:
    """The headers to send upstream, from the client's raw ASGI headers.

    `user_id` is who the gateway decided the request acts for; `dropped` are the client's
    identity headers, which never pass (the gateway's `X-User-Id` replaces them).
    """
    drop = HOP_BY_HOP | _REPLACED_UPSTREAM | dropped | {b"x-user-id"} | connection_named(headers)
    out: list[tuple[str, str]] = []
    forwarded_for: list[str] = []
    host = ""
    for raw_name, raw_value in headers:
        name = raw_name.lower()
        if name == b"host":
            host = raw_value.decode("latin-1")
        if name == b"x-forwarded-for":
            forwarded_for.append(raw_value.decode("latin-1"))
        elif name not in drop:
            out.append((name.decode("latin-1"), raw_value.decode("latin-1")))
    if client_host:
        forwarded_for.append(client_host)
    if forwarded_for:
        out.append(("x-forwarded-for", ", ".join(forwarded_for)))
    out.append(("x-forwarded-proto", scheme))
    if host:
        out.append(("x-forwarded-host", host))
    out.append(("x-request-id", request_id))
    out.append(("x-user-id", user_id))
    out.extend(trace.items())
    return out


def downstream_headers(headers: RawHeaders, *, origin: str = "") -> list[tuple[bytes, bytes]]:
    """The upstream's response headers as the client gets them; a `Location` or
    `Content-Location` on the upstream's own `origin` (its internal address) becomes a path."""
    pairs = [(name.lower(), value) for name, value in headers]
    drop = HOP_BY_HOP | _REPLACED_DOWNSTREAM | connection_named(pairs)
    internal = origin.encode("latin-1")
    out: list[tuple[bytes, bytes]] = []
    for name, value in pairs:
        if name in drop:
            continue
        if internal and name in _LOCATIONS and value.lower().startswith(internal.lower()):
            value = value[len(internal) :]
            if not value.startswith(b"/"):
                value = b"/" + value
        out.append((name, value))
    return out


def with_request_id(headers: list[tuple[bytes, bytes]], value: bytes) -> list[tuple[bytes, bytes]]:
    """The response headers with `X-Request-Id` set to `value` (an upstream's own is replaced)."""
    kept = [(name, v) for name, v in headers if name.lower() != b"x-request-id"]
    kept.append((b"x-request-id", value))
    return kept
