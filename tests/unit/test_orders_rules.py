"""The orders service's pure rules, with no server: the pagination cursor codec, the final
status a payment result gives an order, and the parsing of an order's amount."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from pydantic import ValidationError

from gozon.contracts import PaymentProcessed, PaymentProcessedPayload, PaymentStatus, utc_now
from gozon.core import inputs
from gozon.core.problems import Problem
from gozon.orders.consumer import final_status
from gozon.orders.schemas import OrderCreate
from gozon.orders.service import InvalidCursor, decode_cursor, encode_cursor

ORDER_ID = uuid.UUID("8a6e0804-2bd0-4672-b79d-d97027f9071b")
CREATED_AT = datetime(2026, 12, 7, 11, 58, 3, 123456, tzinfo=UTC)


def cursor_text(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


# --------------------------------------------------------------------------- cursor


def test_a_cursor_decodes_to_the_position_it_was_issued_for() -> None:
    cursor = encode_cursor({"created_at": CREATED_AT, "id": ORDER_ID})

    assert decode_cursor(cursor) == (CREATED_AT, ORDER_ID)
    assert "=" not in cursor


def test_a_cursor_names_its_position_in_utc_whatever_the_rows_zone() -> None:
    moscow = CREATED_AT.astimezone(timezone(timedelta(hours=3)))

    cursor = encode_cursor({"created_at": moscow, "id": ORDER_ID})

    created_at, _ = decode_cursor(cursor)
    assert created_at == CREATED_AT
    assert created_at.utcoffset() == timedelta(0)
    assert cursor == encode_cursor({"created_at": CREATED_AT, "id": ORDER_ID})


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "not a cursor",
        "%%%%",
        cursor_text(f"{CREATED_AT.isoformat()}|{ORDER_ID}") + "==",  # padded
        cursor_text(f"{CREATED_AT.isoformat()}"),  # no order id
        cursor_text(f"{CREATED_AT.isoformat()}|{ORDER_ID}|x"),  # a third part
        cursor_text(f"{CREATED_AT.replace(tzinfo=None).isoformat()}|{ORDER_ID}"),  # no zone
        cursor_text(
            f"{CREATED_AT.astimezone(timezone(timedelta(hours=3))).isoformat()}|{ORDER_ID}"
        ),  # not UTC
        cursor_text(f"{CREATED_AT.isoformat().replace('+00:00', 'Z')}|{ORDER_ID}"),
        cursor_text(f"{CREATED_AT.isoformat()}|{str(ORDER_ID).upper()}"),  # not canonical
        cursor_text(f"{CREATED_AT.isoformat()}|{ORDER_ID.hex}"),  # not canonical
        cursor_text(f"not-a-time|{ORDER_ID}"),
        cursor_text(f"{CREATED_AT.isoformat()}|not-a-uuid"),
        base64.urlsafe_b64encode(b"\xff\xfe|x").decode(),  # not ASCII
    ],
)
def test_a_cursor_this_service_did_not_issue_is_refused(cursor: str) -> None:
    with pytest.raises(InvalidCursor):
        decode_cursor(cursor)


# --------------------------------------------------------------------------- final status


def payment_result(status: PaymentStatus, reason: str | None = None) -> PaymentProcessed:
    order_id = uuid.uuid4()
    return PaymentProcessed(
        aggregate_id=str(order_id),
        payload=PaymentProcessedPayload(
            order_id=order_id,
            user_id="u-1",
            amount=Decimal("10"),
            status=status,
            reason=reason,
            processed_at=utc_now(),
        ),
    )


def test_a_paid_order_is_finished_with_no_reason() -> None:
    assert final_status(payment_result("PAID")) == ("FINISHED", None)
    assert final_status(payment_result("PAID", "ignored")) == ("FINISHED", None)


@pytest.mark.parametrize("status", ["INSUFFICIENT_FUNDS", "ACCOUNT_NOT_FOUND"])
def test_an_unpaid_order_is_cancelled_with_the_payments_reason(status: PaymentStatus) -> None:
    assert final_status(payment_result(status, "Why not.")) == ("CANCELLED", "Why not.")


@pytest.mark.parametrize("status", ["INSUFFICIENT_FUNDS", "ACCOUNT_NOT_FOUND"])
def test_an_unpaid_order_without_a_reason_is_cancelled_with_its_status(
    status: PaymentStatus,
) -> None:
    assert final_status(payment_result(status)) == ("CANCELLED", status)
    assert final_status(payment_result(status, "")) == ("CANCELLED", status)


# --------------------------------------------------------------------------- amount


def order_body(amount: str) -> OrderCreate:
    """An order's body as the API parses it: the JSON text, then the model."""
    return OrderCreate.model_validate(
        inputs.loads(f'{{"amount": {amount}, "description": "d"}}'.encode())
    )


@pytest.mark.parametrize(
    ("text", "amount"),
    [
        ("0.01", "0.01"),
        ("1500.99", "1500.99"),
        ("5.10", "5.10"),
        ("7", "7"),
        ("1E+2", "100"),
        ("1.5e1", "15"),
        ("1000000000", "1000000000"),
        ("1000000000.00", "1000000000.00"),
    ],
)
def test_an_order_amount_is_read_exactly_from_the_json_text(text: str, amount: str) -> None:
    parsed = order_body(text).amount
    assert isinstance(parsed, Decimal)
    assert parsed == Decimal(amount)


@pytest.mark.parametrize(
    "text",
    [
        "0",
        "-0.01",
        "-5",
        "10.001",
        "20.999999999999999999",  # a float would round it to 21
        "5.0000000000000000001",  # a float would round it to 5
        "1000000000.01",
        "1e400",
        '"5"',
        "true",
        "null",
        "[5]",
    ],
)
def test_an_order_amount_that_is_not_exact_money_is_refused_not_rounded(text: str) -> None:
    with pytest.raises(ValidationError) as refused:
        order_body(text)
    assert refused.value.errors()[0]["loc"] == ("amount",)


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity"])
def test_an_order_amount_that_is_not_a_json_number_is_a_bad_request(text: str) -> None:
    with pytest.raises(Problem) as refused:
        order_body(text)
    assert refused.value.status == 400
