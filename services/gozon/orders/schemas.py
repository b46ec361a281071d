"""The orders API's request and response bodies (snake_case, money as exact JSON numbers)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from gozon.contracts import Money
from gozon.core.inputs import JsonAmount

# Whitespace as Python, JSON Schema (ECMAScript) and Unicode each define it, so that every
# validator of the published schema agrees on which descriptions are blank.
_SPACE = r"\t-\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
DESCRIPTION_PATTERN = rf"^[^\x00]*[^\x00{_SPACE}][^\x00]*$"
Description = Annotated[
    str,
    StringConstraints(min_length=1, max_length=500, pattern=DESCRIPTION_PATTERN),
    Field(
        description="1-500 characters, stored as sent; at least one is not whitespace; no NUL.",
        examples=["Тестовый заказ"],
    ),
]


class OrderCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"amount": 1500.99, "description": "Тестовый заказ"}]},
    )

    amount: JsonAmount
    description: Description


class OrderRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    user_id: str
    amount: Money
    description: str
    status: Literal["NEW", "FINISHED", "CANCELLED"]
    cancel_reason: str | None = Field(
        default=None, description="Why a CANCELLED order was cancelled."
    )
    created_at: datetime
    updated_at: datetime
