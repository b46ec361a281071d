"""The orders consumer: moves an order to its final status when its payment result arrives.

The change is guarded (`… WHERE status = 'NEW'`), so a duplicate or late result changes
nothing and is counted as a duplicate; the first result wins. A result for an order that does
not exist is rejected to the dead-letter topic. One transaction per message; the runner
commits the offset after it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import partial

import structlog
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import exists, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gozon.contracts import PAYMENT_PROCESSED_TOPIC, PaymentProcessed
from gozon.core.settings import OrdersSettings
from gozon.messaging.consumer import Handler, Record, RejectMessage
from gozon.messaging.subscription import Notify, Sessions, Subscription
from gozon.orders.models import CANCELLED, FINISHED, NEW, Order

log = structlog.get_logger(__name__)

ORDERS_FINAL = Counter(
    "gozon_orders_final_total", "Orders that reached a final status.", ["status"]
)
ORDERS_STUCK = Gauge(
    "gozon_orders_stuck",
    "Orders still NEW longer than GOZON_ORDERS_STUCK_AFTER_S (their payment result is late).",
)
ORDER_TO_FINAL = Histogram(
    "gozon_order_to_final_seconds",
    "From an order's creation to its final status (the end-to-end latency).",
    ["status"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


def final_status(event: PaymentProcessed) -> tuple[str, str | None]:
    """FINISHED when paid, else CANCELLED with the payment's reason."""
    payload = event.payload
    if payload.status == "PAID":
        return FINISHED, None
    return CANCELLED, payload.reason or payload.status


def make_handler(sessions: async_sessionmaker[AsyncSession]) -> Handler[PaymentProcessed]:
    async def handle(event: PaymentProcessed, _: Record) -> str:
        payload = event.payload
        status, reason = final_status(event)
        structlog.contextvars.bind_contextvars(
            order_id=str(payload.order_id), user_id=payload.user_id
        )
        try:
            async with sessions() as session, session.begin():
                created_at = await session.scalar(
                    update(Order)
                    .where(Order.id == payload.order_id, Order.status == NEW)
                    .values(status=status, cancel_reason=reason, updated_at=datetime.now(UTC))
                    .returning(Order.created_at)
                )
                if created_at is None:
                    known = await session.scalar(
                        select(exists().where(Order.id == payload.order_id))
                    )
                    if not known:
                        raise RejectMessage(f"no order {payload.order_id}")
                    log.info("payment result ignored: order already final")
                    return "duplicate"
            ORDERS_FINAL.labels(status).inc()
            ORDER_TO_FINAL.labels(status).observe(
                max(0.0, (datetime.now(UTC) - created_at).total_seconds())
            )
            log.info("order final", status=status, reason=reason)
            return "processed"
        finally:
            structlog.contextvars.unbind_contextvars("order_id", "user_id")

    return handle


async def count_stuck_orders(sessions: async_sessionmaker[AsyncSession], after: timedelta) -> int:
    """NEW orders older than `after`: every order should have reached a final status by then."""
    async with sessions() as session:
        stuck = await session.scalar(
            select(func.count())
            .select_from(Order)
            .where(Order.status == NEW, Order.created_at < func.now() - after)
        )
    ORDERS_STUCK.set(stuck or 0)
    return int(stuck or 0)


def subscription(settings: OrdersSettings) -> Subscription[PaymentProcessed]:
    """The orders consumer reads payment results; it writes no outbox."""

    def handler(sessions: Sessions, _: Notify) -> Handler[PaymentProcessed]:
        return make_handler(sessions)

    stuck_after = timedelta(seconds=settings.orders_stuck_after_s)
    return Subscription(
        topic=PAYMENT_PROCESSED_TOPIC,
        schema=PaymentProcessed,
        handler=handler,
        scrape_hooks=(partial(count_stuck_orders, after=stuck_after),),
    )
