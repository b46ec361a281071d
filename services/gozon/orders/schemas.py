"""The orders API's request and response bodies (snake_case, money as exact JSON numbers)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from gozon.contracts import Amount, Money

Description = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]


class OrderCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"amount": 1500.99, "description": "Тестовый заказ"}]},
    )

    amount: Amount = Field(description="Positive, at most two decimal places, at most 1e9.")
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
