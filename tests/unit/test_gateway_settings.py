"""GatewaySettings: routes from the upstream URLs, CORS origins from one variable."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gozon.gateway.settings import GatewaySettings


def test_routes_send_each_prefix_to_its_upstream() -> None:
    settings = GatewaySettings(
        gateway_orders_url="http://orders:8081/", gateway_payments_url="https://payments"
    )
    assert settings.gateway_routes == {
        "/api/orders": ("orders", "http://orders:8081"),
        "/api/payments": ("payments", "https://payments"),
    }


def test_an_upstream_url_must_be_http() -> None:
    with pytest.raises(ValidationError, match="http:// or https://"):
        GatewaySettings(gateway_orders_url="orders:8081")


def test_cors_origins_come_comma_separated_and_default_to_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert GatewaySettings().gateway_cors_origins == []
    monkeypatch.setenv("GOZON_GATEWAY_CORS_ORIGINS", "https://a.example, https://b.example")
    assert GatewaySettings().gateway_cors_origins == ["https://a.example", "https://b.example"]


def test_the_rate_limit_is_off_by_default() -> None:
    assert GatewaySettings().gateway_rate_limit_per_s == 0


def test_identity_is_the_header_by_default() -> None:
    assert GatewaySettings().gateway_identity == "header"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "exactly one of"),
        ({"gateway_jwt_secret": "s" * 32}, "AUDIENCE"),
        (
            {"gateway_jwt_secret": "short", "gateway_jwt_audience": "a", "gateway_jwt_issuer": "i"},
            "at least 32 bytes",
        ),
        (
            {
                "gateway_jwt_jwks_file": "/nonexistent/jwks.json",
                "gateway_jwt_audience": "a",
                "gateway_jwt_issuer": "i",
            },
            "missing",
        ),
    ],
)
def test_jwt_identity_fails_fast_without_a_complete_configuration(
    values: dict[str, str], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        GatewaySettings(gateway_identity="jwt", **values)  # type: ignore[arg-type]
