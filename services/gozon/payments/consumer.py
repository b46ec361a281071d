"""The payments consumer's batch handler for `order.created.event`: inbox, debits, outbox, one
commit per partition's batch.

Four round trips per batch on the common path, whatever its size: BEGIN,
`queries.CLAIM_AND_READ`, `queries.SWAP_AND_RECORD`, COMMIT; then one coalesced `pg_notify`.
The batch holds one connection of the consumer's asyncpg pool (`gozon.core.pg`). Design:
docs/messaging.md, "The consumers' transactions"; docs/payments.md.

Guarantees (the runner commits the offsets only after this transaction has committed):
- An order is paid for at most once, whatever envelope it comes in: its one decision is made
  by the first event about it, in offset order; any later event about it (same batch or not,
  a redelivery, a new event id) debits nothing and gets the stored decision again.
- One account's orders in a batch are paid in offset order while the balance lasts; the rest
  are cancelled for funds.
- The batch's inbox rows, decisions, debits, ledger rows and `PaymentProcessed` outbox rows
  commit together or not at all; a failed batch is retried whole on a fresh connection.
- Every delivery gets an answer on `payment.processed.event` with its own trace context:
  PAID, INSUFFICIENT_FUNDS or ACCOUNT_NOT_FOUND.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import asyncpg
import structlog

from gozon.contracts import ORDER_CREATED_TOPIC, OrderCreated
from gozon.core.pg import batch_connection
from gozon.messaging.consumer import BatchHandler, Delivery, Outcome
from gozon.messaging.subscription import Notify, Subscription
from gozon.payments import service
from gozon.payments.decisions import Decision, OrderToPay
from gozon.payments.metrics import PAYMENT_AMOUNT, PAYMENT_OUTCOMES, start_consumer_series
from gozon.payments.models import payment_outbox
from gozon.payments.settings import PaymentsSettings

log = structlog.get_logger(__name__)


def make_handler(
    pool: asyncpg.Pool, *, notify: Callable[[], None] = lambda: None
) -> BatchHandler[OrderCreated]:
    """The batch handler; `notify` is called once after each commit (which always adds
    payment_outbox rows: every delivery is answered)."""

    async def handle(batch: Sequence[Delivery[OrderCreated]]) -> list[Outcome]:
        orders = [
            OrderToPay(
                event_id=d.event.event_id,
                order_id=d.event.payload.order_id,
                user_id=d.event.payload.user_id,
                amount=d.event.payload.amount,
                trace_headers=d.trace_headers(),
            )
            for d in batch
        ]
        async with batch_connection(pool) as conn, conn.transaction():
            decided = await service.decide_order_payments(conn, orders)
        notify()
        return [_report(d, decision) for d, decision in zip(batch, decided.decisions, strict=True)]

    return handle


def _report(delivery: Delivery[OrderCreated], decision: Decision) -> Outcome:
    """Metrics and the log line of one committed delivery, inside its own span."""
    order = delivery.event.payload
    with delivery.active():
        if decision.replayed:
            if (decision.user_id, decision.amount) != (order.user_id, order.amount):
                log.warning(
                    "order event disagrees with the order's payment decision",
                    order_id=str(order.order_id),
                    user_id=order.user_id,
                    event_amount=str(order.amount),
                    decided_amount=str(decision.amount),
                    decided_user_id=decision.user_id,
                )
            log.info(
                "order already decided; outcome sent again",
                order_id=str(order.order_id),
                user_id=order.user_id,
                outcome=decision.status,
            )
            return "duplicate"
        outcome = decision.status.lower()
        PAYMENT_OUTCOMES.labels(outcome).inc()
        PAYMENT_AMOUNT.labels(outcome).observe(float(order.amount))
        log.info(
            "order payment processed",
            order_id=str(order.order_id),
            user_id=order.user_id,
            outcome=decision.status,
        )
        return "processed"


def subscription(_: PaymentsSettings) -> Subscription[OrderCreated]:
    """The payments consumer reads created orders and answers each through payment_outbox."""
    start_consumer_series()

    def handler(pool: asyncpg.Pool, notify: Notify) -> BatchHandler[OrderCreated]:
        return make_handler(pool, notify=notify)

    return Subscription(
        topic=ORDER_CREATED_TOPIC, schema=OrderCreated, handler=handler, outbox=payment_outbox
    )
