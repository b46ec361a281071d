"""The payments service's hand-written SQL, in one place: each statement named, with what it
guarantees. Every statement here is exercised against the real PostgreSQL by the integration
tests (tests/integration/test_payments_consumer.py, test_batched_consumers.py).

Statements take arrays (`CAST(:x AS type[])` + `unnest`): one round trip handles a whole batch,
whatever its size, and the statement text — so its prepared plan — stays the same.
"""

from __future__ import annotations

from sqlalchemy import text

# --- consumer ---
# The batched `order.created.event` handler (gozon.payments.consumer). One transaction per
# partition's batch: CLAIM_DECISIONS, then STORED_DECISIONS for the orders decided before,
# READ_ACCOUNTS + SWAP_BALANCES (the compare-and-swap, retried for the accounts that lost),
# then RECORD_BATCH; one COMMIT.

CLAIM_DECISIONS = text(
    """
    INSERT INTO payment_decisions (order_id, user_id, amount, event_id)
    SELECT order_id, user_id, amount, event_id
    FROM unnest(
        CAST(:order_ids AS uuid[]), CAST(:user_ids AS text[]),
        CAST(:amounts AS numeric[]), CAST(:event_ids AS uuid[])
    ) AS claim(order_id, user_id, amount, event_id)
    ORDER BY order_id
    ON CONFLICT (order_id) DO NOTHING
    RETURNING order_id, decided_at
    """
)
"""Claims each order's one decision (status NULL until RECORD_BATCH sets it, in this same
transaction). Returns the orders this transaction claimed: only they may be debited. An order
claimed by a committed transaction is skipped; one claimed by a transaction still open waits
for it (then is skipped, or claimed here if it rolled back). Rows go in order-id order, so two
batches claiming overlapping orders lock them in the same order. Pass one row per order."""

STORED_DECISIONS = text(
    """
    SELECT order_id, user_id, amount, status, reason, decided_at
    FROM payment_decisions
    WHERE order_id = ANY(CAST(:order_ids AS uuid[]))
    """
)
"""The decisions made before (by committed transactions: CLAIM_DECISIONS waited for them), to be
sent again; their status is never NULL (the deciding transaction set it before committing)."""

READ_ACCOUNTS = text(
    """
    SELECT id, user_id, balance, version
    FROM accounts
    WHERE user_id = ANY(CAST(:user_ids AS text[]))
    """
)
"""The accounts' latest committed balance and version (READ COMMITTED), without locking them:
the version is what SWAP_BALANCES compares against."""

SWAP_BALANCES = text(
    """
    UPDATE accounts AS account
    SET balance = swap.balance, version = account.version + 1, updated_at = now()
    FROM unnest(
        CAST(:ids AS uuid[]), CAST(:versions AS bigint[]), CAST(:balances AS numeric[])
    ) AS swap(id, version, balance)
    WHERE account.id = swap.id
      AND account.version = swap.version
      AND swap.balance >= 0
    RETURNING account.id
    """
)
"""Compare-and-swap of many accounts at once: each account's new balance is written only if its
version is still the one read (a concurrent deposit or debit bumped it otherwise), and the
version is bumped. Returns the accounts swapped; the others lost and are re-read and retried.
Never below zero (here and by the table's CHECK)."""

RECORD_BATCH = text(
    """
    WITH ledger AS (
        INSERT INTO account_ledger (account_id, user_id, kind, amount, balance_after, order_id)
        SELECT account_id, user_id, 'DEBIT', amount, balance_after, order_id
        FROM unnest(
            CAST(:debit_account_ids AS uuid[]), CAST(:debit_user_ids AS text[]),
            CAST(:debit_amounts AS numeric[]), CAST(:debit_balances_after AS numeric[]),
            CAST(:debit_order_ids AS uuid[])
        ) WITH ORDINALITY AS debit(account_id, user_id, amount, balance_after, order_id, n)
        ORDER BY n
    ),
    decided AS (
        UPDATE payment_decisions AS decision
        SET status = outcome.status, reason = outcome.reason
        FROM unnest(
            CAST(:decided_order_ids AS uuid[]), CAST(:decided_statuses AS text[]),
            CAST(:decided_reasons AS text[])
        ) AS outcome(order_id, status, reason)
        WHERE decision.order_id = outcome.order_id
    ),
    inbox AS (
        INSERT INTO payment_inbox (idempotency_key, order_id, user_id, amount, status, reason)
        SELECT event_id, order_id, user_id, amount, status, reason
        FROM unnest(
            CAST(:inbox_event_ids AS uuid[]), CAST(:inbox_order_ids AS uuid[]),
            CAST(:inbox_user_ids AS text[]), CAST(:inbox_amounts AS numeric[]),
            CAST(:inbox_statuses AS text[]), CAST(:inbox_reasons AS text[])
        ) AS event(event_id, order_id, user_id, amount, status, reason)
        ON CONFLICT (idempotency_key) DO NOTHING
    ),
    outbox AS (
        INSERT INTO payment_outbox (order_id, user_id, topic, message_key, payload, headers)
        SELECT order_id, user_id, :topic, user_id, CAST(payload AS jsonb),
               CAST(headers AS jsonb)
        FROM unnest(
            CAST(:outbox_order_ids AS uuid[]), CAST(:outbox_user_ids AS text[]),
            CAST(:outbox_payloads AS text[]), CAST(:outbox_headers AS text[])
        ) WITH ORDINALITY AS answer(order_id, user_id, payload, headers, n)
        ORDER BY n
    )
    SELECT 1
    """
)
"""Everything else the batch writes, in one statement (the data-modifying CTEs all run to
completion): the debits' ledger rows in offset order (with the balance after each, so the
ledger replays the balance; one DEBIT per order, by a unique index), the claimed decisions'
outcomes, one inbox row per event id (a redelivered event adds none), and one
`PaymentProcessed` outbox row per delivery in offset order (ids in that order, so the relay
publishes them in it), each with its own trace headers."""
