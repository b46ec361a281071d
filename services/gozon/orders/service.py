"""The orders rules: create an order with its event in one statement, read a user's orders.

`create_order` writes the order row and its `OrderCreated` outbox row in one statement (one
round trip, one commit: `queries.CREATE_ORDER`), so an order without its event (or the other
way round) cannot exist. With an idempotency key, a
retry of the same request returns the first order and writes nothing; the same key with a
different request is refused.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from gozon.contracts import ORDER_CREATED_TOPIC, OrderCreated, OrderCreatedPayload
from gozon.core.pg import Database
from gozon.core.telemetry import current_trace_headers
from gozon.orders import queries
from gozon.orders.schemas import OrderCreate

OrderRow = dict[str, Any]
"""An order as the API answers it: the columns of `queries.ORDER_COLUMNS`."""


class IdempotencyKeyReused(Exception):
    """The key was used before for a different request."""


class InvalidCursor(ValueError):
    """A pagination cursor this service did not issue."""


@dataclass(frozen=True)
class Created:
    order: OrderRow
    replayed: bool


def _fingerprint(data: OrderCreate) -> str:
    canonical = f"{data.amount:.2f}\x1f{data.description}"
    return hashlib.sha256(canonical.encode()).hexdigest()


async def create_order(
    *, db: Database, user_id: str, data: OrderCreate, idempotency_key: str | None
) -> Created:
    """One statement (`queries.CREATE_ORDER`): the order and its outbox row, or the replay."""
    fingerprint = _fingerprint(data) if idempotency_key else None
    order_id = uuid.uuid4()
    created_at = datetime.now(UTC)
    event = OrderCreated(
        aggregate_id=str(order_id),
        payload=OrderCreatedPayload(
            order_id=order_id,
            user_id=user_id,
            amount=data.amount,
            description=data.description,
            created_at=created_at,
        ),
    )
    rows = await db.write(
        queries.CREATE_ORDER,
        (
            order_id,
            user_id,
            data.amount,
            data.description,
            idempotency_key,
            fingerprint,
            created_at,
            ORDER_CREATED_TOPIC,
            event.model_dump_json(),
            orjson.dumps(current_trace_headers()).decode(),
        ),
    )
    if not rows:  # a concurrent request with this key committed first (see CREATE_ORDER)
        rows = await db.read(queries.ORDER_BY_KEY, (user_id, idempotency_key))
    row = dict(rows[0])
    created = row.pop("created")
    stored_fingerprint = row.pop("request_fingerprint")
    if not created and stored_fingerprint != fingerprint:
        raise IdempotencyKeyReused(idempotency_key)
    return Created(row, replayed=not created)


async def get_order(*, db: Database, user_id: str, order_id: uuid.UUID) -> OrderRow | None:
    """The user's order, or None: another user's order is indistinguishable from none."""
    rows = await db.read(queries.GET_ORDER, (order_id, user_id))
    return dict(rows[0]) if rows else None


def _encode(created_at: datetime, order_id: uuid.UUID) -> str:
    raw = f"{created_at.isoformat()}|{order_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def encode_cursor(order: OrderRow) -> str:
    return _encode(order["created_at"].astimezone(UTC), order["id"])


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The position a cursor names, if this service could have issued it; else InvalidCursor.

    Validated fully rather than signed (no key to share between replicas and rotate): the
    cursor must be exactly what `encode_cursor` writes for the position it decodes to — a UTC
    timestamp (`+00:00`, so every year 1-9999 is in PostgreSQL's range) and a UUID, canonical
    spelling, no padding. A forged but well-formed cursor is harmless: the query is still the
    user's own orders, from some position.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        created_at_text, order_id_text = raw.split("|")
        created_at = datetime.fromisoformat(created_at_text)
        order_id = uuid.UUID(order_id_text)
    except (ValueError, UnicodeDecodeError) as exc:  # binascii.Error is a ValueError
        raise InvalidCursor(cursor) from exc
    if created_at.utcoffset() != timedelta(0) or _encode(created_at, order_id) != cursor:
        raise InvalidCursor(cursor)
    return created_at, order_id


async def list_orders(
    *, db: Database, user_id: str, limit: int, cursor: str | None
) -> tuple[list[OrderRow], str | None]:
    """The user's orders, newest first (keyset pagination); returns the next page's cursor."""
    if cursor:
        created_at, order_id = decode_cursor(cursor)
        rows = await db.read(queries.LIST_ORDERS_AFTER, (user_id, created_at, order_id, limit + 1))
    else:
        rows = await db.read(queries.LIST_ORDERS, (user_id, limit + 1))
    orders = [dict(row) for row in rows]
    if len(orders) > limit:
        return orders[:limit], encode_cursor(orders[limit - 1])
    return orders, None
