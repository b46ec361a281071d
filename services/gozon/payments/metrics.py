"""Prometheus metrics of the payments service (the `gozon_` prefix, bounded labels only)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

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
