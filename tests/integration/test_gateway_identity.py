"""The gateway owns identity in jwt mode: a verified bearer token's subject is the user, the
client's `X-User-Id` never passes, and every missing or bad token is a 401 that reaches no
upstream. Real counting upstreams; tokens signed with HS256 or an RSA key from a JWKS file."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gozon.gateway.app import build_app
from tests.conftest import serve
from tests.integration.test_gateway import settings
from tests.integration.upstream import Upstream

pytestmark = pytest.mark.integration

SECRET = "a-test-secret-that-is-32-bytes-or-longer"
AUDIENCE, ISSUER = "gozon-api", "https://id.gozon.test"


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "user-42", "aud": AUDIENCE, "iss": ISSUER, "iat": now, "exp": now + 300} | (
        overrides
    )


def hs256(**overrides: Any) -> str:
    return jwt.encode(claims(**overrides), SECRET, algorithm="HS256")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def gateway(orders: Upstream, payments: Upstream) -> AsyncIterator[httpx.AsyncClient]:
    jwt_settings = settings(
        orders,
        payments,
        gateway_identity="jwt",
        gateway_jwt_secret=SECRET,
        gateway_jwt_audience=AUDIENCE,
        gateway_jwt_issuer=ISSUER,
        gateway_jwt_leeway_s=0,
    )
    async with serve(build_app(jwt_settings)) as client:
        yield client


async def test_a_good_token_acts_as_its_subject_and_the_clients_user_header_is_ignored(
    gateway: httpx.AsyncClient, orders: Upstream
) -> None:
    response = await gateway.get(
        "/api/orders/x",
        headers={**bearer(hs256()), "X-User-Id": "someone-else", "X-Forwarded-User": "admin"},
    )
    assert response.status_code == 200, response.text
    forwarded = orders.last["headers"]
    assert forwarded.getall("X-User-Id") == ["user-42"]
    assert "Authorization" not in forwarded
    assert "X-Forwarded-User" not in forwarded


def expired() -> str:
    now = int(time.time())
    return hs256(iat=now - 600, exp=now - 60)


@pytest.mark.parametrize(
    ("headers", "challenge"),
    [
        ({}, 'Bearer realm="gozon"'),
        ({"X-User-Id": "user-42"}, 'Bearer realm="gozon"'),  # the header alone is not enough
        (bearer(jwt.encode(claims(), "another-secret-of-32-bytes-or-more!", "HS256")), "invalid"),
        (bearer("not.a.token"), "invalid_token"),
        ({"Authorization": f"Basic {hs256()}"}, "invalid_token"),
        (bearer(hs256(aud="another-api")), "invalid_token"),
        (bearer(hs256(iss="https://evil.test")), "invalid_token"),
        (bearer(hs256(sub="no spaces allowed")), "invalid_token"),
        (bearer(jwt.encode({"sub": "user-42", "aud": AUDIENCE, "iss": ISSUER}, SECRET)), "invalid"),
        (bearer(jwt.encode(claims(), "", algorithm="none")), "invalid_token"),
    ],
    ids=[
        "no token",
        "only X-User-Id",
        "bad signature",
        "garbage",
        "not bearer",
        "wrong audience",
        "wrong issuer",
        "malformed subject",
        "no expiry",
        "alg none",
    ],
)
async def test_a_missing_or_bad_token_is_401_with_a_challenge_and_reaches_no_upstream(
    gateway: httpx.AsyncClient, orders: Upstream, headers: dict[str, str], challenge: str
) -> None:
    response = await gateway.get("/api/orders/x", headers=headers)
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"].startswith('Bearer realm="gozon"')
    assert challenge.split('"')[0] in response.headers["www-authenticate"]
    assert orders.hits == 0


async def test_an_expired_token_is_401(gateway: httpx.AsyncClient, orders: Upstream) -> None:
    response = await gateway.get("/api/orders/x", headers=bearer(expired()))
    assert response.status_code == 401
    assert response.json()["detail"] == "The token has expired."
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert orders.hits == 0


async def test_a_token_that_claims_too_long_a_life_or_no_issue_time_is_401(
    gateway: httpx.AsyncClient, orders: Upstream
) -> None:
    now = int(time.time())
    a_day = 86_400  # the default GOZON_GATEWAY_JWT_MAX_LIFETIME_S
    without_iat = {name: value for name, value in claims().items() if name != "iat"}
    for token, detail in (
        (hs256(iat=now, exp=now + 10 * 365 * a_day), "lifetime"),
        (hs256(iat=now - a_day, exp=now + 60), "lifetime"),
        (jwt.encode(without_iat, SECRET, algorithm="HS256"), "iat"),
    ):
        response = await gateway.get("/api/orders/x", headers=bearer(token))
        assert response.status_code == 401, response.text
        assert detail in response.json()["detail"]
    assert (await gateway.get("/api/orders/x", headers=bearer(hs256(exp=now + a_day)))).is_success
    assert orders.hits == 1


async def test_two_authorization_headers_are_400(
    gateway: httpx.AsyncClient, orders: Upstream
) -> None:
    response = await gateway.get(
        "/api/orders/x", headers=[("Authorization", f"Bearer {hs256()}")] * 2
    )
    assert response.status_code == 400
    assert orders.hits == 0


async def test_tokens_signed_by_a_key_of_the_jwks_file_are_accepted(
    orders: Upstream, payments: Upstream, tmp_path: Path
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [public | {"kid": "k1", "alg": "RS256", "use": "sig"}]}))
    jwks_settings = settings(
        orders,
        payments,
        gateway_identity="jwt",
        gateway_jwt_jwks_file=jwks,
        gateway_jwt_audience=AUDIENCE,
        gateway_jwt_issuer=ISSUER,
    )
    good = jwt.encode(claims(sub="rsa-user"), key, algorithm="RS256", headers={"kid": "k1"})
    unknown_kid = jwt.encode(claims(), key, algorithm="RS256", headers={"kid": "k2"})
    # the public key as an HMAC secret: the algorithm-confusion attack
    confused = jwt.encode(claims(), SECRET, algorithm="HS256", headers={"kid": "k1"})
    async with serve(build_app(jwks_settings)) as gateway:
        response = await gateway.get("/api/orders/x", headers=bearer(good))
        assert response.status_code == 200, response.text
        assert orders.last["headers"]["X-User-Id"] == "rsa-user"
        for token in (unknown_kid, confused):
            assert (await gateway.get("/api/orders/x", headers=bearer(token))).status_code == 401
    assert orders.hits == 1
