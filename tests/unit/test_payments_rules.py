"""The payments service's pure rules: the amount rule, the balance cap, the CAS backoff."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from pydantic import TypeAdapter, ValidationError

from gozon.contracts import Amount, utc_now
from gozon.payments.models import MAX_BALANCE
from gozon.payments.schemas import AccountRead
from gozon.payments.service import CAS_BACKOFF_MAX, cas_backoff

AMOUNT = TypeAdapter(Amount)


@pytest.mark.parametrize("raw", ["0.01", "1", "1500.99", "1e3", "1000000000", "1000000000.00"])
def test_a_deposit_amount_may_be_any_positive_cent_value_up_to_a_billion(raw: str) -> None:
    assert AMOUNT.validate_python(raw) == Decimal(raw)


@pytest.mark.parametrize(
    "raw", ["0", "-0.01", "1.001", "NaN", "Infinity", "-inf", "1000000000.01", "abc", ""]
)
def test_a_deposit_amount_outside_the_rule_is_refused(raw: str) -> None:
    with pytest.raises(ValidationError):
        AMOUNT.validate_python(raw)


def test_the_largest_balance_travels_as_an_exact_json_number() -> None:
    account = AccountRead(
        id=uuid.uuid4(),
        user_id="u",
        balance=MAX_BALANCE,
        created_at=utc_now(),
        updated_at=utc_now(),
    )
    assert '"balance":9999999999999.99' in account.model_dump_json()
    assert Decimal(repr(float(MAX_BALANCE))) == MAX_BALANCE


def test_cas_backoff_grows_with_the_attempt_is_jittered_and_capped() -> None:
    first = [cas_backoff(0) for _ in range(200)]
    late = [cas_backoff(30) for _ in range(200)]
    assert all(0 <= pause <= 0.001 for pause in first)
    assert all(0 <= pause <= CAS_BACKOFF_MAX for pause in late)
    assert len(set(late)) > 1
    assert max(late) > 0.001
