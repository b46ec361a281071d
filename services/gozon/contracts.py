"""The published language: the events both services speak, and nothing else they share.

Every event is an envelope (`event_id` is the consumers' idempotency key) around a payload.
Money is `Decimal` with at most two places and at most 15 significant digits in total, so
that it travels as an exact JSON number: a JSON number of up to 15 significant digits reads
back as the same decimal through any IEEE double parser. The consumers read it from the JSON
text as `Decimal` (`gozon.core.jsontext`), never through a float, so an amount on the wire
with more places, more digits or out of range (`20.999999999999999999`, `1e400`, `-1`) fails
validation and is dead-lettered instead of being rounded; an amount must be a JSON number (a
string, even `"5"`, is refused, as the APIs refuse one). Schemas evolve by adding optional
fields; a breaking change gets a new `schema_version`, and consumers reject versions they do
not know (to the dead-letter topic) rather than guess.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Literal, TypeAlias

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

ORDER_CREATED_TOPIC = "order.created.event"
PAYMENT_PROCESSED_TOPIC = "payment.processed.event"
MAX_AMOUNT = Decimal("1000000000.00")
"""The largest single order or deposit; with a balance cap this keeps money within 15 digits."""


def _money_to_json(value: Decimal) -> float | int:
    # The shortest float repr of a <=15-significant-digit decimal prints that decimal exactly.
    return int(value) if value == value.to_integral_value() else float(value)


Money: TypeAlias = Annotated[
    Decimal,
    Field(max_digits=15, decimal_places=2),
    PlainSerializer(_money_to_json, return_type=float | int, when_used="json"),
]
Amount: TypeAlias = Annotated[Money, Field(gt=0, le=MAX_AMOUNT, allow_inf_nan=False)]
"""An order's or a deposit's amount: positive, two places at most, at most MAX_AMOUNT."""


def _a_number(value: object) -> object:
    if isinstance(value, bool | str | bytes):
        raise ValueError("must be a JSON number, not a string or a boolean")
    return value


WireAmount: TypeAlias = Annotated[Amount, BeforeValidator(_a_number)]
"""An event's amount: an `Amount` that came as a number (never a string or a boolean)."""
UserId: TypeAlias = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
PaymentStatus: TypeAlias = Literal["PAID", "INSUFFICIENT_FUNDS", "ACCOUNT_NOT_FOUND"]


def utc_now() -> datetime:
    return datetime.now(UTC)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class OrderCreatedPayload(_Model):
    order_id: uuid.UUID
    user_id: UserId
    amount: WireAmount
    description: str
    created_at: AwareDatetime


class PaymentProcessedPayload(_Model):
    order_id: uuid.UUID
    user_id: UserId
    amount: WireAmount
    status: PaymentStatus
    reason: str | None = None
    processed_at: AwareDatetime


class _Envelope(_Model):
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    schema_version: Literal[1] = 1
    occurred_at: AwareDatetime = Field(default_factory=utc_now)
    aggregate_id: str


class OrderCreated(_Envelope):
    event_type: Literal["OrderCreated"] = "OrderCreated"
    payload: OrderCreatedPayload


class PaymentProcessed(_Envelope):
    event_type: Literal["PaymentProcessed"] = "PaymentProcessed"
    payload: PaymentProcessedPayload


Event: TypeAlias = OrderCreated | PaymentProcessed
