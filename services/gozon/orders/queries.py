"""The orders service's hand-written SQL: every statement by name, with what it guarantees.

The schema is SQLAlchemy's (`gozon.orders.models`, migrations); these statements are written
out because each does a request's whole unit of work in one round trip (PostgreSQL plans a
data-modifying CTE as one statement, committed as one). They run on asyncpg
(`gozon.core.pg`), which prepares each once per connection. Every one is exercised against
the real database by `tests/integration/test_orders_queries.py`.
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
