"""The orders service's hand-written SQL: every statement by name, with what it guarantees.

The schema is SQLAlchemy's (`gozon.orders.models`, migrations); these statements are written
out because each does a request's whole unit of work in one round trip (PostgreSQL plans a
data-modifying CTE as one statement, committed as one). The API's run on asyncpg
(`gozon.core.pg`), which prepares each once per connection. Every one is exercised against
the real database: the API's by `tests/integration/test_orders_queries.py`, the consumer's
by `tests/integration/test_orders_consumer.py` and `test_batched_consumers.py`.

The consumer's statement takes arrays (`CAST($n AS type[])` + `unnest`), so one round trip
handles a whole batch whatever its size; it runs on the consumer's own asyncpg pool
(`gozon.core.pg.worker_pool`), outside any transaction (autocommit: no BEGIN and no COMMIT),
so a batch costs exactly one round trip once the statement is prepared on its connection.
"""

from __future__ import annotations

from typing import Final

# --- API ---------------------------------------------------------------------------------

ORDER_COLUMNS: Final = (
    "id, user_id, amount, description, status, cancel_reason, created_at, updated_at"
)

CREATE_ORDER: Final = f"""
WITH inserted AS (
    INSERT INTO orders (id, user_id, amount, description, status, idempotency_key,
                        request_fingerprint, created_at, updated_at)
    VALUES ($1, $2, $3, $4, 'NEW', $5, $6, $7, $7)
    ON CONFLICT (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING {ORDER_COLUMNS}
), event AS (
    INSERT INTO order_outbox (aggregate_id, event_type, topic, message_key, payload, headers)
    SELECT id::text, 'OrderCreated', $8, user_id, $9::jsonb, $10::jsonb FROM inserted
)
SELECT true AS created, NULL::text AS request_fingerprint, {ORDER_COLUMNS} FROM inserted
UNION ALL
SELECT false, request_fingerprint, {ORDER_COLUMNS} FROM orders
WHERE $5::text IS NOT NULL AND user_id = $2 AND idempotency_key = $5
  AND NOT EXISTS (SELECT 1 FROM inserted)
"""
"""create_order($1 id, $2 user_id, $3 amount, $4 description, $5 idempotency_key or NULL,
$6 request fingerprint or NULL, $7 created_at, $8 topic, $9 event JSON, $10 trace headers JSON).

Guarantees: the order and its `OrderCreated` outbox row are written together or not at all
(one statement, one commit), so no order exists without its event. With a key already used
by this user, nothing is written and the first order comes back (`created` false) with its
fingerprint for the caller to compare. Zero rows means a concurrent request with the same
key committed while this one waited on the unique index, after this statement's snapshot:
read it with `ORDER_BY_KEY`.
"""

ORDER_BY_KEY: Final = f"""
SELECT false AS created, request_fingerprint, {ORDER_COLUMNS} FROM orders
WHERE user_id = $1 AND idempotency_key = $2
"""
"""order_by_key($1 user_id, $2 idempotency_key): the order a key created, for a replay."""

GET_ORDER: Final = f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1 AND user_id = $2"
"""get_order($1 id, $2 user_id): the user's order; another user's order is not found."""

LIST_ORDERS: Final = f"""
SELECT {ORDER_COLUMNS} FROM orders WHERE user_id = $1
ORDER BY created_at DESC, id DESC LIMIT $2
"""
"""list_orders($1 user_id, $2 limit): the newest page (ix_orders_user_id_created_at)."""

LIST_ORDERS_AFTER: Final = f"""
SELECT {ORDER_COLUMNS} FROM orders
WHERE user_id = $1 AND (created_at, id) < ($2, $3)
ORDER BY created_at DESC, id DESC LIMIT $4
"""
"""list_orders_after($1 user_id, $2 created_at, $3 id, $4 limit): the page after a position,
in the same order (keyset pagination: stable under inserts, no OFFSET scan)."""

# --- consumer ---
# The batched `payment.processed.event` handler (gozon.orders.consumer): FINALIZE_ORDERS, one
# statement per partition's batch, run in autocommit (its own implicit transaction: no BEGIN
# and no COMMIT round trips).

FINALIZE_ORDERS: Final = """
    WITH result AS (
        SELECT order_id, status, reason
        FROM unnest(
            CAST($1 AS uuid[]), CAST($2 AS text[]), CAST($3 AS text[])
        ) AS result(order_id, status, reason)
    ),
    moved AS (
        UPDATE orders AS o
        SET status = result.status, cancel_reason = result.reason,
            updated_at = clock_timestamp()
        FROM result
        WHERE o.id = result.order_id AND o.status = 'NEW'
        RETURNING o.id, o.status, o.created_at, o.updated_at
    )
    SELECT result.order_id AS id,
           CASE
               WHEN moved.id IS NOT NULL THEN 'moved'
               WHEN EXISTS (SELECT 1 FROM orders WHERE orders.id = result.order_id) THEN 'final'
               ELSE 'unknown'
           END AS outcome,
           moved.status, moved.created_at, moved.updated_at
    FROM result LEFT JOIN moved ON moved.id = result.order_id
"""
"""finalize_orders($1 order ids, $2 final statuses, $3 cancel reasons or NULL), one entry per
order, in the same order.

Moves each order still NEW to its final status and tells, for every order id passed, what
happened: `moved` (with its new status and timestamps), `final` (it exists but was not NEW:
a duplicate or late result, nothing changed) or `unknown` (no such order).

One statement, so it is all-or-nothing on its own and is run in autocommit: when it returns,
it has committed. Guarded by `status = 'NEW'`: an order already final keeps its first result
(a concurrent change of the same order waits for the other transaction, then re-checks the
guard, and the order is `final`). `final`/`unknown` are read from the statement's snapshot,
which holds every order created before it (an order is committed before its payment result
can exist). Pass one row per order: with two, PostgreSQL would apply an unpredictable one."""

STUCK_ORDERS: Final = """
SELECT count(*) FROM orders WHERE status = 'NEW' AND created_at < now() - $1::interval
"""
"""stuck_orders($1 age): how many orders are still NEW though older than the age (their
payment result is late), for the consumer's `gozon_orders_stuck` gauge at each scrape. Reads
only; a scan of the NEW orders by status (rare: once per scrape)."""
