"""The payments consumer's handler for `order.created.event`: inbox, debit, outbox, one commit.

Guarantees (the runner commits the offset only after this transaction has committed):
- An event is paid for at most once: its event id is the inbox row's key, inserted first with
  `ON CONFLICT DO NOTHING`; a redelivery finds the row and writes nothing ("duplicate"), and a
  concurrent redelivery waits for the first transaction, then finds it.
- The inbox row with its outcome, the debit with its ledger row, and the `PaymentProcessed`
  outbox row commit together or not at all; a crash before the commit leaves nothing, and the
  redelivered event is paid then.
- Every first delivery gets exactly one answer on `payment.processed.event`: PAID,
  INSUFFICIENT_FUNDS (nothing debited) or ACCOUNT_NOT_FOUND.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gozon.contracts import (
    ORDER_CREATED_TOPIC,
    PAYMENT_PROCESSED_TOPIC,
    OrderCreated,
    PaymentProcessed,
    PaymentProcessedPayload,
    utc_now,
)
from gozon.core.settings import PaymentsSettings
from gozon.messaging.consumer import Handler, Record
from gozon.messaging.outbox import add_to_outbox
from gozon.messaging.subscription import Notify, Sessions, Subscription
from gozon.payments import service
from gozon.payments.metrics import PAYMENT_AMOUNT, PAYMENT_OUTCOMES
from gozon.payments.models import InboxEntry, payment_outbox

log = structlog.get_logger(__name__)


def make_handler(
    sessions: async_sessionmaker[AsyncSession], *, notify: Callable[[], None] = lambda: None
) -> Handler[OrderCreated]:
    """The handler; `notify` is called after each commit that added a payment_outbox row."""

    async def handle(event: OrderCreated, _: Record) -> str:
        order = event.payload
        structlog.contextvars.bind_contextvars(order_id=str(order.order_id), user_id=order.user_id)
        try:
            async with sessions() as session, session.begin():
                claimed = await session.scalar(
                    insert(InboxEntry)
                    .values(
                        idempotency_key=event.event_id,
                        order_id=order.order_id,
                        user_id=order.user_id,
                        amount=order.amount,
                    )
                    .on_conflict_do_nothing(index_elements=[InboxEntry.idempotency_key])
                    .returning(InboxEntry.idempotency_key)
                )
                if claimed is None:
                    log.info("order event already handled")
                    return "duplicate"
                payment = await service.pay_for_order(
                    session, order_id=order.order_id, user_id=order.user_id, amount=order.amount
                )
                processed_at = utc_now()
                await session.execute(
                    update(InboxEntry)
                    .where(InboxEntry.idempotency_key == event.event_id)
                    .values(status=payment.status, reason=payment.reason, processed_at=processed_at)
                )
                result = PaymentProcessed(
                    aggregate_id=str(order.order_id),
                    payload=PaymentProcessedPayload(
                        order_id=order.order_id,
                        user_id=order.user_id,
                        amount=order.amount,
                        status=payment.status,
                        reason=payment.reason,
                        processed_at=processed_at,
                    ),
                )
                await add_to_outbox(
                    session,
                    payment_outbox,
                    topic=PAYMENT_PROCESSED_TOPIC,
                    key=order.user_id,
                    event=result,
                    order_id=order.order_id,
                    user_id=order.user_id,
                )
            notify()
            outcome = payment.status.lower()
            PAYMENT_OUTCOMES.labels(outcome).inc()
            PAYMENT_AMOUNT.labels(outcome).observe(float(order.amount))
            log.info("order payment processed", outcome=payment.status)
            return "processed"
        finally:
            structlog.contextvars.unbind_contextvars("order_id", "user_id")

    return handle


def subscription(_: PaymentsSettings) -> Subscription[OrderCreated]:
    """The payments consumer reads created orders and answers each through payment_outbox."""

    def handler(sessions: Sessions, notify: Notify) -> Handler[OrderCreated]:
        return make_handler(sessions, notify=notify)

    return Subscription(
        topic=ORDER_CREATED_TOPIC, schema=OrderCreated, handler=handler, outbox=payment_outbox
    )
