"""The orders rules: create an order with its event in one transaction, read a user's orders.

`create_order` writes the order row and its `OrderCreated` outbox row in one transaction, so
an order without its event (or the other way round) cannot exist. With an idempotency key, a
retry of the same request returns the first order and writes nothing; the same key with a
different request is refused.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, or_, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gozon.contracts import ORDER_CREATED_TOPIC, OrderCreated, OrderCreatedPayload
from gozon.messaging.outbox import add_to_outbox
from gozon.orders.models import NEW, Order, order_outbox
from gozon.orders.schemas import OrderCreate


class IdempotencyKeyReused(Exception):
    """The key was used before for a different request."""


class InvalidCursor(ValueError):
    """A pagination cursor this service did not issue."""


@dataclass(frozen=True)
class Created:
    order: Order
    replayed: bool


def _fingerprint(data: OrderCreate) -> str:
    canonical = f"{data.amount:.2f}\x1f{data.description}"
    return hashlib.sha256(canonical.encode()).hexdigest()


async def create_order(
    *,
    sessions: async_sessionmaker[AsyncSession],
    user_id: str,
    data: OrderCreate,
    idempotency_key: str | None,
) -> Created:
    fingerprint = _fingerprint(data)
    now = datetime.now(UTC)
    async with sessions() as session, session.begin():
        inserted = await session.scalar(
            insert(Order)
            .values(
                id=uuid.uuid4(),
                user_id=user_id,
                amount=data.amount,
                description=data.description,
                status=NEW,
                idempotency_key=idempotency_key,
                request_fingerprint=fingerprint if idempotency_key else None,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(
                index_elements=["user_id", "idempotency_key"],
                index_where=Order.idempotency_key.is_not(None),
            )
            .returning(Order)
        )
        if inserted is None:  # only possible with a key: the first request's order exists
            existing = await session.scalar(
                select(Order).where(
                    Order.user_id == user_id, Order.idempotency_key == idempotency_key
                )
            )
            assert existing is not None
            if existing.request_fingerprint != fingerprint:
                raise IdempotencyKeyReused(idempotency_key)
            return Created(existing, replayed=True)
        event = OrderCreated(
            aggregate_id=str(inserted.id),
            payload=OrderCreatedPayload(
                order_id=inserted.id,
                user_id=user_id,
                amount=inserted.amount,
                description=inserted.description,
                created_at=inserted.created_at,
            ),
        )
        await add_to_outbox(
            session,
            order_outbox,
            topic=ORDER_CREATED_TOPIC,
            key=user_id,
            event=event,
            aggregate_id=str(inserted.id),
            event_type=event.event_type,
        )
    return Created(inserted, replayed=False)


async def get_order(
    *, sessions: async_sessionmaker[AsyncSession], user_id: str, order_id: uuid.UUID
) -> Order | None:
    """The user's order, or None: another user's order is indistinguishable from none."""
    async with sessions() as session:
        return await session.scalar(
            select(Order).where(Order.id == order_id, Order.user_id == user_id)
        )


def _encode(created_at: datetime, order_id: uuid.UUID) -> str:
    raw = f"{created_at.isoformat()}|{order_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def encode_cursor(order: Order) -> str:
    return _encode(order.created_at.astimezone(UTC), order.id)


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
    *,
    sessions: async_sessionmaker[AsyncSession],
    user_id: str,
    limit: int,
    cursor: str | None,
) -> tuple[list[Order], str | None]:
    """The user's orders, newest first (keyset pagination); returns the next page's cursor."""
    query = select(Order).where(Order.user_id == user_id)
    if cursor:
        created_at, order_id = decode_cursor(cursor)
        query = query.where(
            or_(
                Order.created_at < created_at,
                and_(Order.created_at == created_at, Order.id < order_id),
            )
        )
    query = query.order_by(Order.created_at.desc(), Order.id.desc()).limit(limit + 1)
    async with sessions() as session:
        orders = list((await session.scalars(query)).all())
    if len(orders) > limit:
        return orders[:limit], encode_cursor(orders[limit - 1])
    return orders, None
