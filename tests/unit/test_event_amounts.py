"""Money on the wire is exact: the consumers read an event's amount from its JSON text as a
Decimal, so an amount with more than two places, more digits than money has, or out of range
is refused (and so dead-lettered by the runner), never rounded on the way in."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest

from gozon.contracts import (
    OrderCreated,
    OrderCreatedPayload,
    PaymentProcessed,
    PaymentProcessedPayload,
    utc_now,
)
from gozon.messaging.consumer import parse_event

AMOUNT_TEXT = "20.5"


def order_created_text(amount: str) -> bytes:
    event = OrderCreated(
        aggregate_id="a",
        payload=OrderCreatedPayload(
            order_id=uuid.uuid4(),
            user_id="u-1",
            amount=Decimal(AMOUNT_TEXT),
            description="d",
            created_at=utc_now(),
        ),
    )
    text = event.model_dump_json()
    assert f'"amount":{AMOUNT_TEXT},' in text
    return text.replace(f'"amount":{AMOUNT_TEXT},', f'"amount":{amount},').encode()


def payment_processed_text(amount: str) -> bytes:
    event = PaymentProcessed(
        aggregate_id="a",
        payload=PaymentProcessedPayload(
            order_id=uuid.uuid4(),
            user_id="u-1",
            amount=Decimal(AMOUNT_TEXT),
            status="PAID",
            processed_at=utc_now(),
        ),
    )
    text = event.model_dump_json()
    assert f'"amount":{AMOUNT_TEXT},' in text
    return text.replace(f'"amount":{AMOUNT_TEXT},', f'"amount":{amount},').encode()


REFUSED = {
    # more places than money has, which a float would round to 21 / 1.00
    "20.999999999999999999": "digits",
    "1.000000000000000000000000000001": "digits",
    "10.001": "decimal places",
    # beyond any double: a float parser gives inf (or fails); the Decimal is out of range
    "1e400": "digits",
    "-1e400": "digits",
    # not positive
    "-5": "greater than 0",
    "0": "greater than 0",
    "-0.00": "greater than 0",
    # more than NUMERIC(19,2) holds (17 integer digits), and more than MAX_AMOUNT
    "100000000000000000": "digits",
    "99999999999999999.99": "digits",
    "1000000000.01": "less than or equal",
    # not a JSON number
    '"5"': "JSON number",
    "true": "JSON number",
    "NaN": "NaN is not a JSON number",
    "Infinity": "Infinity is not a JSON number",
}
EXACT = {
    "20.99": Decimal("20.99"),
    "0.01": Decimal("0.01"),
    "1000000000": Decimal("1000000000"),
    "1000000000.00": Decimal("1000000000.00"),
    "5.10": Decimal("5.10"),
    "1E+2": Decimal("100"),
    "1.5e1": Decimal("15"),
}
SCHEMAS = {OrderCreated: order_created_text, PaymentProcessed: payment_processed_text}


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("amount", REFUSED)
def test_an_event_amount_that_is_not_exact_money_is_refused_not_rounded(
    schema: type[OrderCreated | PaymentProcessed], amount: str
) -> None:
    with pytest.raises(ValueError, match=REFUSED[amount]) as refused:
        parse_event(schema, SCHEMAS[schema](amount))
    # the schema's own refusal names the field; NaN and Infinity are refused as JSON already
    assert "payload.amount" in str(refused.value) or "is not a JSON number" in str(refused.value)


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("amount", EXACT)
def test_an_event_amount_is_read_as_the_decimal_its_text_says(
    schema: type[OrderCreated | PaymentProcessed], amount: str
) -> None:
    event = parse_event(schema, SCHEMAS[schema](amount))
    assert event.payload.amount == EXACT[amount]


def test_an_event_with_a_key_given_twice_is_refused() -> None:
    text = order_created_text("5").replace(b'"user_id":"u-1"', b'"user_id":"u-1","user_id":"x"')
    with pytest.raises(ValueError, match="appears twice"):
        parse_event(OrderCreated, text)


def test_an_event_that_is_not_utf8_or_not_json_is_refused() -> None:
    with pytest.raises(ValueError, match="not UTF-8"):
        parse_event(OrderCreated, b"\xff\xfe")
    with pytest.raises(ValueError, match="not an accepted JSON document"):
        parse_event(OrderCreated, b"{")
    with pytest.raises(ValueError, match="empty"):
        parse_event(OrderCreated, b"")
