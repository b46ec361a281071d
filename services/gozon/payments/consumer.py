"""The payments consumer's handler for `order.created.event`: inbox, debit, outbox, one commit.

Guarantees (the runner commits the offset only after this transaction has committed):
- An order is paid for at most once, whatever envelope it comes in: every event is recorded in
  the inbox by its event id, and the order's one payment decision (`service.
  decide_order_payment`, keyed by the order id) is made by the first event about it. A later
  event about the same order — a redelivery, or the producer's retry under a new event id —
  debits nothing and gets the stored decision sent again ("duplicate"); a concurrent one waits
  for the first transaction, then finds its decision.
- The inbox row, the decision, the debit with its ledger row, and the `PaymentProcessed`
  outbox row commit together or not at all; a crash before the commit leaves nothing, and the
  redelivered event is decided then.
- Every delivery gets an answer on `payment.processed.event`: the order's decision, PAID,
  INSUFFICIENT_FUNDS (nothing debited) or ACCOUNT_NOT_FOUND. The orders consumer applies only
  the first (its status change is guarded), so a repeated answer changes nothing.
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
                new_event = await session.scalar(
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
                decision = await service.decide_order_payment(
                    session,
                    event_id=event.event_id,
                    order_id=order.order_id,
                    user_id=order.user_id,
                    amount=order.amount,
                )
                if new_event is not None:
                    await session.execute(
                        update(InboxEntry)
                        .where(InboxEntry.idempotency_key == event.event_id)
                        .values(
                            status=decision.status, reason=decision.reason, processed_at=utc_now()
                        )
                    )
                result = PaymentProcessed(
                    aggregate_id=str(order.order_id),
                    payload=PaymentProcessedPayload(
                        order_id=order.order_id,
                        user_id=decision.user_id,
                        amount=decision.amount,
                        status=decision.status,
                        reason=decision.reason,
                        processed_at=decision.decided_at,
                    ),
                )
                await add_to_outbox(
                    session,
                    payment_outbox,
                    topic=PAYMENT_PROCESSED_TOPIC,
                    key=decision.user_id,
                    event=result,
                    order_id=order.order_id,
                    user_id=decision.user_id,
                )
            notify()
            if decision.replayed:
                if (decision.user_id, decision.amount) != (order.user_id, order.amount):
                    log.warning(
                        "order event disagrees with the order's payment decision",
                        event_amount=str(order.amount),
                        decided_amount=str(decision.amount),
                        decided_user_id=decision.user_id,
                    )
                log.info(
                    "order already decided; outcome sent again",
                    outcome=decision.status,
                    same_event=new_event is None,
                )
                return "duplicate"
            outcome = decision.status.lower()
            PAYMENT_OUTCOMES.labels(outcome).inc()
            PAYMENT_AMOUNT.labels(outcome).observe(float(order.amount))
            log.info("order payment processed", outcome=decision.status)
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
