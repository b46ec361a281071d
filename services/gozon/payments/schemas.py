"""The payments API's response bodies and its amount rule (snake_case, exact JSON money)."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from gozon.contracts import Money


class AccountRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    user_id: str
    balance: Money
    created_at: datetime
    updated_at: datetime


class DepositRead(BaseModel):
    """One deposit; a retry with the same Idempotency-Key answers with the same body."""

    account_id: uuid.UUID
    user_id: str
    amount: Money = Field(description="The amount this deposit credited.")
    balance: Money = Field(description="The balance right after this deposit.")
    created_at: datetime = Field(description="When the deposit was credited.")
