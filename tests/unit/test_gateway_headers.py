"""Header rules at the gateway, the retry rule and the OpenAPI merge: pure functions."""

from __future__ import annotations

import aiohttp

from gozon.gateway.headers import (
    connection_named,
    downstream_headers,
    request_id,
    upstream_headers,
    with_request_id,
)
from gozon.gateway.identity import IDENTITY_HEADERS
from gozon.gateway.openapi import merge
from gozon.gateway.proxy import retryable


def forward(headers: list[tuple[bytes, bytes]], **kwargs: object) -> dict[str, str]:
    options: dict[str, object] = {
        "client_host": "10.1.1.1",
        "scheme": "https",
        "request_id": "rid",
        "trace": {"traceparent": "00-gateway-span"},
        "user_id": "u1",
    }
    options.update(kwargs)
    sent = upstream_headers(headers, **options)  # type: ignore[arg-type]
    names = [name for name, _ in sent]
    assert len(names) == len(set(names)), names
    return dict(sent)


def test_hop_by_hop_headers_and_those_named_in_connection_are_dropped() -> None:
    sent = forward(
        [
            (b"connection", b"keep-alive, X-Private"),
            (b"x-private", b"1"),
            (b"keep-alive", b"timeout=5"),
            (b"proxy-authorization", b"Basic x"),
            (b"te", b"trailers"),
            (b"trailer", b"x"),
            (b"transfer-encoding", b"chunked"),
            (b"upgrade", b"websocket"),
            (b"x-user-id", b"u1"),
            (b"content-type", b"application/json"),
        ]
    )
    assert sent["x-user-id"] == "u1"
    assert sent["content-type"] == "application/json"
    assert not {"connection", "x-private", "keep-alive", "proxy-authorization", "te"} & set(sent)
    assert not {"trailer", "transfer-encoding", "upgrade"} & set(sent)


def test_identity_headers_are_the_gateways_and_the_clients_never_pass() -> None:
    sent = forward(
        [
            (b"x-user-id", b"someone-else"),
            (b"X-Forwarded-User", b"admin"),
            (b"x-remote-user", b"admin"),
            (b"authorization", b"Bearer t"),
        ],
        user_id="u7",
        dropped=IDENTITY_HEADERS | {b"authorization"},
    )
    assert sent["x-user-id"] == "u7"
    assert not {"x-forwarded-user", "x-remote-user", "authorization"} & set(sent)


def test_forwarded_headers_are_set_by_the_gateway_and_for_is_appended() -> None:
    sent = forward(
        [
            (b"host", b"shop.example"),
            (b"x-forwarded-for", b"1.2.3.4"),
            (b"x-forwarded-for", b"5.6.7.8"),
            (b"x-forwarded-proto", b"gopher"),
            (b"x-forwarded-host", b"evil.example"),
        ]
    )
    assert sent["x-forwarded-for"] == "1.2.3.4, 5.6.7.8, 10.1.1.1"
    assert sent["x-forwarded-proto"] == "https"
    assert sent["x-forwarded-host"] == "shop.example"
    assert "host" not in sent  # aiohttp sets the upstream's own


def test_request_id_and_trace_context_are_the_gateways() -> None:
    sent = forward([(b"x-request-id", b"client"), (b"traceparent", b"00-client")])
    assert sent["x-request-id"] == "rid"
    assert sent["traceparent"] == "00-gateway-span"


def test_a_sane_request_id_is_kept_and_anything_else_replaced() -> None:
    assert request_id("abc-123_X.y:z") == "abc-123_X.y:z"
    for bad in (None, "", "has space", "x" * 129, "line\nbreak"):
        generated = request_id(bad)
        assert len(generated) == 32
        assert generated != bad


def test_response_headers_lose_hop_by_hop_date_and_server_and_keep_repeated_ones() -> None:
    kept = downstream_headers(
        [
            (b"Connection", b"X-Hop"),
            (b"X-Hop", b"1"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Set-Cookie", b"a=1"),
            (b"Set-Cookie", b"b=2"),
            (b"Date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
            (b"Server", b"uvicorn"),
            (b"Content-Type", b"application/json"),
        ]
    )
    assert kept == [
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"content-type", b"application/json"),
    ]


def test_connection_tokens_are_case_insensitive() -> None:
    assert connection_named([(b"Connection", b"Keep-Alive,  X-A")]) == {b"keep-alive", b"x-a"}


def test_the_answer_carries_the_request_id_once() -> None:
    headers = with_request_id([(b"X-Request-Id", b"upstream"), (b"a", b"1")], b"rid")
    assert headers == [(b"a", b"1"), (b"x-request-id", b"rid")]


def test_only_idempotent_requests_that_never_connected_are_retried() -> None:
    refused = aiohttp.ClientConnectorError(
        aiohttp.client_reqrep.ConnectionKey("h", 1, False, True, None, None, None, None),
        ConnectionRefusedError(111, "refused"),
    )
    for method in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE"):
        assert retryable(method, refused)
    for method in ("POST", "PATCH"):
        assert not retryable(method, refused)
    assert not retryable("GET", aiohttp.ServerDisconnectedError())
    assert not retryable("GET", aiohttp.SocketTimeoutError())


def test_openapi_merge_keeps_each_prefix_and_renames_clashing_components() -> None:
    def doc(path: str, title: str) -> dict[str, object]:
        ref = {"$ref": "#/components/schemas/Read"}
        return {
            "paths": {
                path: {"get": {"responses": {"200": {"content": {"x": {"schema": ref}}}}}},
                "/health/live": {},
            },
            "components": {"schemas": {"Read": {"title": title}, "Error": {"title": "same"}}},
            "tags": [{"name": title}],
        }

    merged = merge(
        title="Gozon API",
        version="1",
        documents=[
            ("orders", "/api/orders", doc("/api/orders/{id}", "orders")),
            ("payments", "/api/payments", doc("/api/payments/balance", "payments")),
            ("stock", "/api/stock", None),
        ],
    )
    assert list(merged["paths"]) == ["/api/orders/{id}", "/api/payments/balance"]
    assert merged["components"]["schemas"] == {
        "Read": {"title": "orders"},
        "Error": {"title": "same"},
        "payments_Read": {"title": "payments"},
    }
    payments_get = merged["paths"]["/api/payments/balance"]["get"]
    schema = payments_get["responses"]["200"]["content"]["x"]["schema"]
    assert schema == {"$ref": "#/components/schemas/payments_Read"}
    assert [tag["name"] for tag in merged["tags"]] == ["orders", "payments"]
    assert "stock" in merged["info"]["description"]
