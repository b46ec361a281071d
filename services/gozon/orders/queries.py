"""The orders service's hand-written SQL, in one place: each statement named, with what it
guarantees. Every statement here is exercised against the real PostgreSQL by the integration
tests (tests/integration/test_orders_consumer.py, test_batched_consumers.py).

Statements take arrays (`CAST(:x AS type[])` + `unnest`): one round trip handles a whole batch,
whatever its size, and the statement text — so its prepared plan — stays the same.
"""

from __future__ import annotations

from sqlalchemy import text

# --- consumer ---
# The batched `payment.processed.event` handler (gozon.orders.consumer): FINALIZE_ORDERS, then
# KNOWN_ORDERS for the results that changed nothing; one transaction per partition's batch.

FINALIZE_ORDERS = text(
    """
    UPDATE orders AS o
    SET status = result.status, cancel_reason = result.reason, updated_at = clock_timestamp()
    FROM unnest(
        CAST(:order_ids AS uuid[]), CAST(:statuses AS text[]), CAST(:reasons AS text[])
    ) AS result(order_id, status, reason)
    WHERE o.id = result.order_id AND o.status = 'NEW'
    RETURNING o.id, o.status, o.created_at, o.updated_at
    """
)
"""Moves each order still NEW to its final status; returns the orders it moved. Guarded by
`status = 'NEW'`: an order already final keeps its first result (a concurrent change of the
same order waits for the other transaction, then re-checks the guard). Pass one row per
order: with two, PostgreSQL would apply an unpredictable one."""

KNOWN_ORDERS = text(
    """
    SELECT id FROM orders WHERE id = ANY(CAST(:order_ids AS uuid[]))
    """
)
"""Which of these orders exist: a result for an order FINALIZE_ORDERS did not move is a
duplicate if the order exists, and refers to no order otherwise."""
