"""The gateway's settings: `GOZON_GATEWAY_*` on top of what every process reads.

Read once from the environment by `gozon gateway` and passed in (gozon.core.settings has the
shared part and the rules). The default ports are the process table's (gozon.gateway.processes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from gozon.core.settings import CommonSettings
from gozon.gateway.processes import GATEWAY


class GatewaySettings(CommonSettings):
    """The gateway: where it listens, its two upstreams, and how it protects them and clients."""

    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=GATEWAY.default_port, ge=1, le=65535)
    # The side port of /metrics and the health checks: the public port serves no metrics.
    gateway_metrics_port: int = Field(default=GATEWAY.default_metrics_port, ge=0, le=65535)
    gateway_orders_url: str = "http://127.0.0.1:8081"
    gateway_payments_url: str = "http://127.0.0.1:8082"
    gateway_upstream_connect_timeout_s: float = Field(default=1.0, gt=0)
    gateway_upstream_timeout_s: float = Field(default=5.0, gt=0)
    gateway_upstream_retries: int = Field(default=2, ge=0, le=5)
    gateway_upstream_pool_size: int = Field(default=100, ge=1)
    # Requests outstanding per upstream; past it, 503 at once. The APIs' own limit is 16
    # running + 16 queued: more sent would only wait (or be shed there, at a higher cost).
    gateway_upstream_max_in_flight: int = Field(default=32, ge=1)
    # The APIs refuse bodies over 16 KiB themselves (core.inputs): the gateway forwards none.
    gateway_max_body_bytes: int = Field(default=16 * 1024, ge=0)
    gateway_breaker_failures: int = Field(default=5, ge=1)
    gateway_breaker_reset_s: float = Field(default=5.0, gt=0)
    gateway_rate_limit_per_s: float = Field(default=0, ge=0)  # per user; 0 turns it off
    gateway_rate_limit_burst: int = Field(default=20, ge=1)
    # comma-separated; empty is off
    gateway_cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # The client side of the edge (gateway/server.py): what one connection may send, how fast.
    gateway_max_request_line_bytes: int = Field(default=8 * 1024, ge=256)
    gateway_max_head_bytes: int = Field(default=16 * 1024, ge=1024)  # request line + headers
    gateway_max_headers: int = Field(default=64, ge=8)
    gateway_header_timeout_s: float = Field(default=10.0, gt=0)
    gateway_body_timeout_s: float = Field(default=30.0, gt=0)
    gateway_max_connections_per_client: int = Field(default=256, ge=1)
    # Requests from one address whose body is still arriving (each may buffer up to the body
    # limit in the gateway before it is admitted upstream).
    gateway_max_incomplete_per_client: int = Field(default=64, ge=1)
    gateway_write_timeout_s: float = Field(default=10.0, gt=0)  # a client not reading an answer
    # Requests one connection may have waiting, read ahead, behind the one being answered
    # (HTTP/1.1 pipelining); past it the connection closes after the queued ones' answers.
    gateway_max_pipelined: int = Field(default=16, ge=1)
    # Who a request acts for (gateway/identity.py): the client's X-User-Id, or a verified JWT.
    gateway_identity: Literal["header", "jwt"] = "header"
    gateway_jwt_secret: SecretStr | None = None  # HS256
    gateway_jwt_jwks_file: Path | None = None  # or asymmetric keys, chosen by the token's kid
    gateway_jwt_audience: str | None = None
    gateway_jwt_issuer: str | None = None
    gateway_jwt_leeway_s: float = Field(default=30.0, ge=0, le=300)
    # jwt mode: the longest lifetime (exp - iat) a token may claim; 0 turns the check off.
    # Tokens then need `iat`. Header mode has no tokens, so nothing to check.
    gateway_jwt_max_lifetime_s: float = Field(default=86_400.0, ge=0)

    @field_validator("gateway_orders_url", "gateway_payments_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("an upstream URL must start with http:// or https://")
        return url.rstrip("/")

    @field_validator("gateway_cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @model_validator(mode="after")
    def _identity_complete(self) -> Self:
        if self.gateway_identity != "jwt":
            return self
        if (self.gateway_jwt_secret is None) == (self.gateway_jwt_jwks_file is None):
            raise ValueError(
                "jwt identity needs exactly one of GOZON_GATEWAY_JWT_SECRET and "
                "GOZON_GATEWAY_JWT_JWKS_FILE"
            )
        if not self.gateway_jwt_audience or not self.gateway_jwt_issuer:
            raise ValueError(
                "jwt identity needs GOZON_GATEWAY_JWT_AUDIENCE and GOZON_GATEWAY_JWT_ISSUER"
            )
        secret = self.gateway_jwt_secret
        if secret is not None and len(secret.get_secret_value().encode()) < 32:
            raise ValueError("GOZON_GATEWAY_JWT_SECRET must be at least 32 bytes (RFC 7518 3.2)")
        if self.gateway_jwt_jwks_file is not None and not self.gateway_jwt_jwks_file.is_file():
            raise ValueError(f"GOZON_GATEWAY_JWT_JWKS_FILE {self.gateway_jwt_jwks_file} is missing")
        return self

    @property
    def gateway_routes(self) -> dict[str, tuple[str, str]]:
        """Path prefix → (upstream name, base URL): `/api/orders/**` goes to the orders API."""
        return {
            "/api/orders": ("orders", self.gateway_orders_url),
            "/api/payments": ("payments", self.gateway_payments_url),
        }
