"""Who a request acts for, decided at the edge (`GOZON_GATEWAY_IDENTITY`).

- `header` (the default, as the spec has it): the client's `X-User-Id`, exactly one, matching
  core's rule; missing, repeated or malformed → 400.
- `jwt`: a bearer token in `Authorization`, verified with PyJWT: the signature (HS256 with
  `GOZON_GATEWAY_JWT_SECRET`, or an asymmetric key from the JWKS file
  `GOZON_GATEWAY_JWT_JWKS_FILE`, chosen by the token's `kid`), `exp`, `aud` and `iss` (all
  required), and a `sub` that is a valid user id; with `GOZON_GATEWAY_JWT_MAX_LIFETIME_S`
  (a day by default, 0 is off) also `iat`, and `exp − iat` at most that long, so a leaked
  token issued to live for years is refused. Missing → 401 with `WWW-Authenticate:
  Bearer realm="gozon"`; anything wrong → 401 with `error="invalid_token"` (RFC 6750 §3). The
  client's `X-User-Id` is ignored in this mode: the upstream gets the token's subject.

Either way the proxy drops every identity header the client sent (`IDENTITY_HEADERS`, and
`Authorization` in jwt mode) and sets `X-User-Id` itself, so the services — which trust
`X-User-Id` — only ever see the gateway's answer. That is only as strong as the network: the
services must be reachable through the gateway alone (docs/gateway.md, "Identity").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt

from gozon.core.headers import USER_ID, check_user_id
from gozon.core.problems import Problem
from gozon.gateway.settings import GatewaySettings

REALM = 'Bearer realm="gozon"'
# Asymmetric algorithms a JWKS key may use; a symmetric key in a JWKS file is refused, so a
# public key can never be used as an HMAC secret (the classic algorithm-confusion attack).
ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
# Headers that carry who the user is; the gateway drops the client's and sets its own.
IDENTITY_HEADERS = frozenset(
    {
        b"x-user-id",
        b"x-forwarded-user",
        b"x-forwarded-email",
        b"x-auth-request-user",
        b"x-auth-request-email",
        b"x-remote-user",
        b"remote-user",
        b"x-authenticated-userid",
    }
)


class Identity(Protocol):
    """Finds the request's user in its raw headers, or raises a 400/401 `Problem`."""

    @property
    def drops(self) -> frozenset[bytes]:
        """The client's headers not to forward, beyond IDENTITY_HEADERS."""

    def user(self, headers: list[tuple[bytes, bytes]]) -> str: ...


def _only(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    values = [value for key, value in headers if key == name]
    if len(values) > 1:  # which copy counts differs between servers: refuse, never guess
        raise Problem(
            400, f"The header {name.decode()} is given more than once.", title="Repeated header"
        )
    return values[0].decode("latin-1") if values else None


class HeaderIdentity:
    drops: frozenset[bytes] = frozenset()

    def user(self, headers: list[tuple[bytes, bytes]]) -> str:
        return check_user_id(_only(headers, b"x-user-id"))


def _unauthorized(detail: str, *, error: str | None = "invalid_token") -> Problem:
    challenge = REALM if error is None else f'{REALM}, error="{error}"'
    return Problem(401, detail, headers={"WWW-Authenticate": challenge})


@dataclass(frozen=True)
class JwtIdentity:
    audience: str
    issuer: str
    leeway_s: float
    max_lifetime_s: float = 0.0
    secret: str | None = None
    jwks: jwt.PyJWKSet | None = None
    drops: frozenset[bytes] = frozenset({b"authorization"})

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> JwtIdentity:
        assert settings.gateway_jwt_audience is not None  # the settings enforce it in jwt mode
        assert settings.gateway_jwt_issuer is not None
        jwks = None
        if settings.gateway_jwt_jwks_file is not None:
            jwks = load_jwks(settings.gateway_jwt_jwks_file)
        secret = settings.gateway_jwt_secret
        return cls(
            audience=settings.gateway_jwt_audience,
            issuer=settings.gateway_jwt_issuer,
            leeway_s=settings.gateway_jwt_leeway_s,
            max_lifetime_s=settings.gateway_jwt_max_lifetime_s,
            secret=secret.get_secret_value() if secret is not None else None,
            jwks=jwks,
        )

    def user(self, headers: list[tuple[bytes, bytes]]) -> str:
        authorization = _only(headers, b"authorization")
        if authorization is None:
            raise _unauthorized("A bearer token is required (Authorization: Bearer …).", error=None)
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("The Authorization header must be 'Bearer <token>'.")
        claims = self._verify(token.strip())
        subject = claims.get("sub")
        if not isinstance(subject, str) or not USER_ID.fullmatch(subject):
            raise _unauthorized("The token's subject is not a valid user id.")
        return subject

    def _verify(self, token: str) -> dict[str, Any]:
        try:
            key, algorithms = self._key_for(token)
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={
                    "require": ["exp", "sub", "aud", "iss"]
                    + (["iat"] if self.max_lifetime_s else [])
                },
            )
        except jwt.ExpiredSignatureError as exc:
            raise _unauthorized("The token has expired.") from exc
        except jwt.PyJWTError as exc:
            raise _unauthorized(f"The token is not valid: {exc}.") from exc
        if self.max_lifetime_s and claims["exp"] - claims["iat"] > self.max_lifetime_s:
            raise _unauthorized(
                f"The token's lifetime (exp - iat) is longer than {self.max_lifetime_s:g} s."
            )
        return claims

    def _key_for(self, token: str) -> tuple[Any, list[str]]:
        if self.secret is not None:
            return self.secret, ["HS256"]
        assert self.jwks is not None
        kid = jwt.get_unverified_header(token).get("kid")
        try:
            key = self.jwks[kid] if isinstance(kid, str) else None
        except KeyError:
            key = None
        if key is None or key.algorithm_name not in ASYMMETRIC:
            raise jwt.InvalidKeyError("no usable key for this token's kid")
        return key.key, [key.algorithm_name]


def load_jwks(path: Path) -> jwt.PyJWKSet:
    """The JWKS file's keys; every key must name its `alg`, an asymmetric one."""
    document = json.loads(path.read_text())
    keys = jwt.PyJWKSet.from_dict(document)
    for key in keys.keys:
        if key.algorithm_name not in ASYMMETRIC or not key.key_id:
            raise ValueError(
                f"{path}: every key needs a kid and an asymmetric alg ({', '.join(ASYMMETRIC)})"
            )
    return keys


def identity_from(settings: GatewaySettings) -> Identity:
    if settings.gateway_identity == "jwt":
        return JwtIdentity.from_settings(settings)
    return HeaderIdentity()
