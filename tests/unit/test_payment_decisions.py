"""The payment decision for a batch (gozon.payments.decisions), with no server: funds, one
decision per order, the compare-and-swap inputs and the statement's parameters."""

from __future__ import annotations

import re
import typing
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from gozon.contracts import PAYMENT_PROCESSED_TOPIC, PaymentProcessed
from gozon.payments import decisions, queries
from gozon.payments.decisions import (
    AccountState,
    Batch,
    BatchRecord,
    Decision,
    OrderToPay,
    Round,
)

DECIDED_AT = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def order(user_id: str, amount: str, order_id: uuid.UUID | None = None) -> OrderToPay:
    return OrderToPay(
        event_id=uuid.uuid4(),
        order_id=order_id or uuid.uuid4(),
        user_id=user_id,
        amount=Decimal(amount),
        trace_headers={"traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"},
    )


def again(event: OrderToPay, *, new_envelope: bool = False) -> OrderToPay:
    """The same order again: a redelivery of the event, or a new envelope about the order."""
    return OrderToPay(
        event_id=uuid.uuid4() if new_envelope else event.event_id,
        order_id=event.order_id,
        user_id=event.user_id,
        amount=event.amount,
    )


def account(balance: str, version: int = 7) -> AccountState:
    return AccountState(account_id=uuid.uuid4(), balance=Decimal(balance), version=version)


def claimed_all(orders: Sequence[OrderToPay]) -> dict[uuid.UUID, datetime]:
    return {o.order_id: DECIDED_AT for o in decisions.first_events(orders)}


def first_round(
    orders: Sequence[OrderToPay],
    accounts: Mapping[str, AccountState],
    *,
    claimed: Mapping[uuid.UUID, datetime] | None = None,
    stored: Mapping[uuid.UUID, Decision] | None = None,
) -> tuple[Batch, Round]:
    batch = decisions.start(
        orders, claimed_all(orders) if claimed is None else claimed, stored or {}
    )
    return batch, decisions.decide(batch, accounts)


def statuses(round_: Round) -> list[str]:
    return [d.status for d in round_.decided.decisions]


# --------------------------------------------------------------------------- funds


def test_an_order_the_balance_covers_is_paid_and_debited_by_one_swap() -> None:
    funds = account("100", version=3)
    paid = order("u", "30")

    _, round_ = first_round([paid], {"u": funds})

    assert statuses(round_) == ["PAID"]
    (decision,) = round_.decided.decisions
    assert (decision.reason, decision.replayed, decision.decided_at) == (None, False, DECIDED_AT)
    (debit,) = round_.decided.debits
    assert (debit.account_id, debit.order_id, debit.amount, debit.balance_after) == (
        funds.account_id,
        paid.order_id,
        Decimal("30"),
        Decimal("70"),
    )
    assert (round_.record.ids, round_.record.versions, round_.record.balances) == (
        [funds.account_id],
        [3],
        [Decimal("70")],
    )


def test_an_order_beyond_the_balance_is_cancelled_for_funds_and_debits_nothing() -> None:
    _, round_ = first_round([order("u", "100.01")], {"u": account("100")})

    assert statuses(round_) == ["INSUFFICIENT_FUNDS"]
    assert round_.decided.decisions[0].reason == decisions.NO_FUNDS_REASON
    assert round_.decided.debits == []
    assert round_.record.ids == []
    assert round_.record.balances == []


def test_an_order_of_exactly_the_balance_is_paid_down_to_zero() -> None:
    _, round_ = first_round([order("u", "100")], {"u": account("100")})

    assert statuses(round_) == ["PAID"]
    assert round_.record.balances == [Decimal("0")]


def test_one_accounts_orders_are_paid_in_offset_order_while_the_balance_lasts() -> None:
    orders = [order("u", "60"), order("u", "50"), order("u", "40"), order("u", "0.01")]

    _, round_ = first_round(orders, {"u": account("100")})

    assert statuses(round_) == ["PAID", "INSUFFICIENT_FUNDS", "PAID", "INSUFFICIENT_FUNDS"]
    assert [d.balance_after for d in round_.decided.debits] == [Decimal("40"), Decimal("0")]
    assert [d.order_id for d in round_.decided.debits] == [orders[0].order_id, orders[2].order_id]
    assert round_.record.balances == [Decimal("0")]


def test_no_debit_ever_takes_a_balance_below_zero() -> None:
    amounts = ["33.33", "0.01", "66.66", "0.02", "12", "0.01", "5"]
    orders = [order("u", a) for a in amounts]

    _, round_ = first_round(orders, {"u": account("100")})

    assert all(d.balance_after >= 0 for d in round_.decided.debits)
    paid = sum(d.amount for d in round_.decided.debits)
    assert round_.record.balances == [Decimal("100") - paid]
    assert paid == Decimal("100.00")


def test_an_order_of_a_user_without_an_account_is_cancelled_for_that() -> None:
    _, round_ = first_round([order("nobody", "1")], {})

    assert statuses(round_) == ["ACCOUNT_NOT_FOUND"]
    assert round_.decided.decisions[0].reason == decisions.NO_ACCOUNT_REASON
    assert round_.decided.debits == []
    assert round_.record.ids == []


def test_each_account_pays_from_its_own_balance_with_its_own_swap() -> None:
    rich, poor = account("100", version=1), account("10", version=2)
    orders = [order("poor", "20"), order("rich", "20"), order("poor", "10")]

    _, round_ = first_round(orders, {"rich": rich, "poor": poor})

    assert statuses(round_) == ["INSUFFICIENT_FUNDS", "PAID", "PAID"]
    swaps = dict(zip(round_.record.ids, round_.record.balances, strict=True))
    assert swaps == {rich.account_id: Decimal("80"), poor.account_id: Decimal("0")}
    versions = dict(zip(round_.record.ids, round_.record.versions, strict=True))
    assert versions == {rich.account_id: 1, poor.account_id: 2}


# --------------------------------------------------------------------------- one decision


def test_a_second_event_about_an_order_in_the_batch_gets_the_first_decision_again() -> None:
    first = order("u", "30")
    orders = [first, again(first, new_envelope=True), again(first)]

    _, round_ = first_round(orders, {"u": account("100")})

    assert statuses(round_) == ["PAID", "PAID", "PAID"]
    assert [d.replayed for d in round_.decided.decisions] == [False, True, True]
    assert len(round_.decided.debits) == 1
    assert round_.record.balances == [Decimal("70")]
    assert round_.record.decided_order_ids == [first.order_id]


def test_a_redelivered_event_before_its_order_is_decided_elsewhere_is_a_replay() -> None:
    """The deciding event is the first with the order's (event id, order id); a later copy of
    that same event is a replay, not a second decision."""
    first = order("u", "30")

    _, round_ = first_round([first, again(first)], {"u": account("20")})

    assert statuses(round_) == ["INSUFFICIENT_FUNDS", "INSUFFICIENT_FUNDS"]
    assert [d.replayed for d in round_.decided.decisions] == [False, True]
    assert len(round_.decided.made) == 1


def test_an_order_decided_before_gets_its_stored_decision_and_is_not_paid_again() -> None:
    before = order("u", "50")
    stored = Decision(
        order_id=before.order_id,
        user_id="u",
        amount=Decimal("50"),
        status="INSUFFICIENT_FUNDS",
        reason=decisions.NO_FUNDS_REASON,
        decided_at=DECIDED_AT - timedelta(hours=1),
        replayed=False,
    )
    new = order("u", "10")
    orders = [again(before, new_envelope=True), new]

    _, round_ = first_round(
        orders,
        {"u": account("1000")},  # topped up since: still not paid
        claimed={new.order_id: DECIDED_AT},
        stored={before.order_id: stored},
    )

    assert statuses(round_) == ["INSUFFICIENT_FUNDS", "PAID"]
    assert round_.decided.decisions[0].replayed
    assert round_.decided.decisions[0].decided_at == stored.decided_at
    assert [d.order_id for d in round_.decided.debits] == [new.order_id]
    assert round_.record.decided_order_ids == [new.order_id]
    assert round_.record.balances == [Decimal("990")]


def test_a_claim_is_made_once_per_order_in_order_id_order() -> None:
    events = [order("u", "1") for _ in range(5)]
    orders = [*events, again(events[2], new_envelope=True), again(events[0])]

    claims = decisions.claims(orders)

    assert [c.order_id for c in claims] == sorted(e.order_id for e in events)
    assert {c.event_id for c in claims} == {e.event_id for e in events}


def test_orders_neither_claimed_nor_stored_are_the_ones_to_read_again() -> None:
    a, b, c = order("u", "1"), order("u", "2"), order("u", "3")
    orders = [a, b, again(b, new_envelope=True), c]

    assert decisions.unseen(orders, claimed={a.order_id}, stored={c.order_id}) == [b.order_id]
    assert decisions.unseen(orders, claimed={a.order_id, b.order_id}, stored={c.order_id}) == []


def test_only_accounts_with_a_claimed_order_take_part_in_the_swaps() -> None:
    decided = order("stored-user", "1")
    new = order("u", "1")
    batch = decisions.start(
        [decided, new],
        {new.order_id: DECIDED_AT},
        {
            decided.order_id: Decision(
                decided.order_id, "stored-user", Decimal(1), "PAID", None, DECIDED_AT, False
            )
        },
    )

    assert list(batch.pending) == ["u"]


# --------------------------------------------------------------------------- lost swaps


def test_a_lost_swap_is_decided_again_against_the_new_balance_and_the_won_one_is_kept() -> None:
    racer, calm = account("50", version=1), account("50", version=1)
    orders = [order("racer", "40"), order("calm", "20"), order("racer", "30")]
    batch, lost_round = first_round(orders, {"racer": racer, "calm": calm})
    assert statuses(lost_round) == ["PAID", "PAID", "INSUFFICIENT_FUNDS"]

    batch = decisions.settle(batch, lost_round, swapped={calm.account_id})

    assert list(batch.pending) == ["racer"]
    topped_up = AccountState(racer.account_id, Decimal("150"), version=2)
    round_ = decisions.decide(batch, {"racer": topped_up})
    assert statuses(round_) == ["PAID", "PAID", "PAID"]
    assert (round_.record.ids, round_.record.versions, round_.record.balances) == (
        [racer.account_id],
        [2],
        [Decimal("80")],
    )
    ledger = sorted((d.user_id, d.amount, d.balance_after) for d in round_.decided.debits)
    assert ledger == [
        ("calm", Decimal("20"), Decimal("30")),
        ("racer", Decimal("30"), Decimal("80")),
        ("racer", Decimal("40"), Decimal("110")),
    ]
    assert round_.record.debit_order_ids.count(orders[1].order_id) == 1


def test_an_account_with_nothing_to_debit_never_loses_a_swap() -> None:
    orders = [order("poor", "20"), order("u", "1")]
    u = account("5")
    batch, lost_round = first_round(orders, {"poor": account("10"), "u": u})

    batch = decisions.settle(batch, lost_round, swapped=set())

    assert list(batch.pending) == ["u"]
    round_ = decisions.decide(batch, {"u": u})
    assert statuses(round_) == ["INSUFFICIENT_FUNDS", "PAID"]


# --------------------------------------------------------------------------- the record


def test_the_record_holds_one_inbox_row_and_one_answer_per_event_in_offset_order() -> None:
    first = order("u", "30")
    orders = [first, order("nobody", "5"), again(first, new_envelope=True)]

    _, round_ = first_round(orders, {"u": account("100")})
    record = round_.record

    assert record.inbox_event_ids == [o.event_id for o in orders]
    assert record.inbox_order_ids == record.outbox_order_ids == [o.order_id for o in orders]
    assert record.inbox_amounts == [o.amount for o in orders]
    assert record.inbox_statuses == ["PAID", "ACCOUNT_NOT_FOUND", "PAID"]
    assert record.inbox_reasons == [None, decisions.NO_ACCOUNT_REASON, None]
    assert record.topic == PAYMENT_PROCESSED_TOPIC
    assert record.outbox_headers[0] == f'{{"traceparent": "{first.trace_headers["traceparent"]}"}}'
    assert record.outbox_headers[2] == "{}"
    answers = [PaymentProcessed.model_validate_json(p) for p in record.outbox_payloads]
    assert [(a.payload.order_id, a.payload.status) for a in answers] == [
        (first.order_id, "PAID"),
        (orders[1].order_id, "ACCOUNT_NOT_FOUND"),
        (first.order_id, "PAID"),
    ]
    assert answers[0].payload.processed_at == DECIDED_AT
    assert answers[1].payload.reason == decisions.NO_ACCOUNT_REASON


SQL_TYPES = {"uuid": uuid.UUID, "text": str, "numeric": Decimal, "bigint": int}


def test_the_record_fields_are_the_statements_parameters_in_order() -> None:
    """`*record` passes SWAP_AND_RECORD's `$n` by position: each field's type is its CAST's."""
    casts = {
        int(n): (sql_type, bool(array))
        for n, sql_type, array in re.findall(
            r"CAST\(\$(\d+) AS (\w+)(\[\])?\)", queries.SWAP_AND_RECORD
        )
    }
    hints = typing.get_type_hints(BatchRecord)

    assert sorted(casts) == list(range(1, len(BatchRecord._fields) + 1))
    for n, name in enumerate(BatchRecord._fields, start=1):
        sql_type, array = casts[n]
        hint = hints[name]
        if array:
            assert typing.get_origin(hint) is list, name
            (element,) = typing.get_args(hint)
            assert SQL_TYPES[sql_type] in (element, *typing.get_args(element)), name
        else:
            assert hint is SQL_TYPES[sql_type], name
