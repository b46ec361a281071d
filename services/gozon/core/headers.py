"""The request headers every API reads: `X-User-Id`, `Idempotency-Key`, and the deadline
the gateway sets, `X-Request-Timeout-Ms` (read by `gozon.core.deadline`).

The gateway checks `X-User-Id` at the edge too; the services check it again because they must
be safe to call directly (and are, in tests and inside the cluster).
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Header

from gozon.core.problems import Problem

USER_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
# Milliseconds the caller will still wait for the answer (whole, positive); set by the gateway.
DEADLINE_HEADER = "X-Request-Timeout-Ms"


def user_id(x_user_id: Annotated[str | None, Header(include_in_schema=True)] = None) -> str:
    if x_user_id is None:
        raise Problem(400, "The X-User-Id header is required.", title="Missing X-User-Id")
    if not USER_ID.fullmatch(x_user_id):
        raise Problem(
            400,
            "X-User-Id must be 1-64 characters of letters, digits, '-', '_' and '.'.",
            title="Malformed X-User-Id",
        )
    return x_user_id


def idempotency_key(
    key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> str | None:
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        raise Problem(
            400,
            "Idempotency-Key must be 1-255 visible ASCII characters.",
            title="Malformed Idempotency-Key",
        )
    return key


UserIdDep = Annotated[str, Depends(user_id)]
IdempotencyKeyDep = Annotated[str | None, Depends(idempotency_key)]
