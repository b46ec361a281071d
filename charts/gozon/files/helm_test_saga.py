"""`helm test` for the gozon chart: the spec's basic scenario through the gateway.

Deposit 5000 for a fresh user, order 1500.99, wait until the order is FINISHED, and check that
the balance is exactly 3499.01. Any other outcome (an error status, a CANCELLED order, an order
still NEW at the deadline, a wrong amount or balance) exits 1 with what was seen. Runs on the
gozon image's Python with the standard library only; both writes carry an Idempotency-Key, so
a write whose connection failed before an answer is retried without paying twice.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from decimal import Decimal
from typing import Any

GATEWAY = os.environ["GATEWAY_URL"].rstrip("/")
TIMEOUT_S = float(os.environ.get("TIMEOUT_SECONDS", "120"))
USER = f"helm-test-{uuid.uuid4().hex[:12]}"


class Failed(Exception):
    """A wrong outcome: the test fails with this message."""


def call(method: str, path: str, body: str | None = None, key: str | None = None) -> Any:
    """One request; JSON numbers come back as Decimal. Connection errors of a request that
    carries an Idempotency-Key (or a GET) are retried until the deadline."""
    headers = {"X-User-Id": USER, "Accept": "application/json"}
    data = None
    if body is not None:
        data = body.encode()
        headers["Content-Type"] = "application/json"
    if key is not None:
        headers["Idempotency-Key"] = key
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        request = urllib.request.Request(GATEWAY + path, data, headers, method=method)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                text = response.read().decode()
                print(f"{method} {path} -> {response.status} {text}")
                return json.loads(text, parse_float=Decimal)
        except urllib.error.HTTPError as error:
            raise Failed(f"{method} {path} -> {error.code} {error.read().decode()}") from error
        except (urllib.error.URLError, OSError) as error:
            if (key is None and method != "GET") or time.monotonic() > deadline:
                raise Failed(f"{method} {path}: {error}") from error
            print(f"{method} {path}: {error}; retrying")
            time.sleep(1)


def expect(what: str, seen: object, wanted: object) -> None:
    if seen != wanted:
        raise Failed(f"{what}: expected {wanted!r}, got {seen!r}")


def main() -> None:
    if not GATEWAY.startswith(("http://", "https://")):
        raise Failed(f"GATEWAY_URL must be an http(s) URL, not {GATEWAY!r}")
    print(f"gateway {GATEWAY}, user {USER}")
    deposit = call("POST", "/api/payments/deposit?amount=5000", key=str(uuid.uuid4()))
    expect("balance after the deposit", Decimal(deposit["balance"]), Decimal("5000"))

    order = call(
        "POST",
        "/api/orders",
        '{"amount": 1500.99, "description": "helm test"}',  # the spec's body, byte for byte
        key=str(uuid.uuid4()),
    )
    expect("new order's status", order["status"], "NEW")
    expect("new order's amount", Decimal(order["amount"]), Decimal("1500.99"))

    deadline = time.monotonic() + TIMEOUT_S
    while order["status"] == "NEW":
        if time.monotonic() > deadline:
            raise Failed(f"order {order['id']} still NEW after {TIMEOUT_S:g} s")
        time.sleep(0.5)
        order = call("GET", f"/api/orders/{order['id']}")
    expect("final status", order["status"], "FINISHED")

    balance = call("GET", "/api/payments/balance")
    expect("balance after the order", Decimal(balance["balance"]), Decimal("3499.01"))
    print("OK: deposit 5000, order 1500.99 FINISHED, balance 3499.01")


if __name__ == "__main__":
    try:
        main()
    except Failed as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        sys.exit(1)
