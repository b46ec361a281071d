"""The request headers every API reads: `X-User-Id`, `Idempotency-Key`, and the deadline
the gateway sets, `X-Request-Timeout-Ms` (read by `gozon.core.deadline`).

Both are declared as FastAPI header parameters with their pattern, so the OpenAPI document
says what is required and what is accepted; a missing or malformed one is a 400 problem (the
validation handler in `core.problems` maps header errors to 400). The gateway checks
`X-User-Id` at the edge with `check_user_id`, the same rule and wording; the services check it
again because they must be safe to call directly (and are, in tests and inside the cluster).
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Header

from gozon.core.problems import Problem

USER_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"
USER_ID = re.compile(USER_ID_PATTERN)
USER_ID_RULE = "X-User-Id must be 1-64 characters of letters, digits, '-', '_' and '.'."
# Milliseconds the caller will still wait for the answer (whole, positive); set by the gateway.
DEADLINE_HEADER = "X-Request-Timeout-Ms"


def check_user_id(value: str | None) -> str:
    """The edge's check of one `X-User-Id` value (None: the header is missing)."""
    if value is None:
        raise Problem(400, "The X-User-Id header is required.", title="Missing X-User-Id")
    if not USER_ID.fullmatch(value):
        raise Problem(400, USER_ID_RULE, title="Malformed X-User-Id")
    return value


UserIdDep = Annotated[
    str,
    Header(
        alias="X-User-Id",
        pattern=USER_ID_PATTERN,
        description="The user the request acts for. " + USER_ID_RULE,
        examples=["123"],
    ),
]
IdempotencyKeyDep = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=IDEMPOTENCY_KEY_PATTERN,
        description="1-255 visible ASCII characters; a retry with the same key and request "
        "answers with the first result and writes nothing.",
    ),
]
