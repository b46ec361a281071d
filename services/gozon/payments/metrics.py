"""Prometheus metrics of the payments service (the `gozon_` prefix, bounded labels only).

Each process creates its series at 0 for every known label when it starts (`start_api_series`,
`start_consumer_series`), so a dashboard shows 0, not "No data", before the first event.
"""

from __future__ import annotations

from typing import get_args

from prometheus_client import Counter, Histogram

from gozon.contracts import PaymentStatus

CAS_CONFLICTS = Counter(
    "gozon_payments_cas_conflicts_total",
    "Balance compare-and-swaps that lost to a concurrent change and were retried.",
    ["operation"],
)
PAYMENT_OUTCOMES = Counter(
    "gozon_payment_outcomes_total",
    "Order payments by outcome: paid, insufficient_funds, account_not_found.",
    ["outcome"],
)
PAYMENT_AMOUNT = Histogram(
    "gozon_payment_amount",
    "Order amounts by payment outcome (the sum is the money asked for, per outcome).",
    ["outcome"],
    buckets=(1, 10, 100, 1_000, 10_000, 100_000, 1_000_000, 1_000_000_000),
)

# The operations that compare-and-swap a balance (gozon.payments.service.credit and the
# consumer's batched debit).
CAS_OPERATIONS = ("deposit", "debit")
OUTCOMES = tuple(status.lower() for status in get_args(PaymentStatus))


def start_api_series() -> None:
    """The payments API's series at 0: its deposits' conflicts."""
    CAS_CONFLICTS.labels("deposit")


def start_consumer_series() -> None:
    """The payments consumer's series at 0: every outcome, and its debits' conflicts."""
    CAS_CONFLICTS.labels("debit")
    for outcome in OUTCOMES:
        PAYMENT_OUTCOMES.labels(outcome)
        PAYMENT_AMOUNT.labels(outcome)
