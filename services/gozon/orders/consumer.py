"""The orders consumer: moves orders to their final status as their payment results arrive.

One statement per partition's batch, `queries.FINALIZE_ORDERS`, run in autocommit on the
consumer's asyncpg pool (`gozon.core.pg.worker_pool`): a single statement is its own
transaction, so the batch costs one round trip (no BEGIN, no COMMIT; the statement is
prepared once per connection) and has committed when it returns. It is one `UPDATE … FROM
unnest(…)` guarded by `status = 'NEW'`, so a duplicate or late result changes nothing and is
counted as a duplicate; the first result wins, in offset order within a batch too. The same
statement tells which orders do not exist: a result for one is rejected to the dead-letter
topic, and the rest of its batch commits. The runner commits the offsets after the statement;
a connection lost meanwhile is dropped (`gozon.core.pg.batch_connection`) and the runner
retries the batch (the statement is idempotent: a result applied before the loss is a
duplicate the second time).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from functools import partial

import asyncpg
import structlog
from prometheus_client import Counter, Gauge, Histogram

from gozon.contracts import PAYMENT_PROCESSED_TOPIC, PaymentProcessed
from gozon.core.pg import batch_connection
from gozon.messaging.consumer import BatchHandler, Delivery, Outcome, Rejected
from gozon.messaging.subscription import Notify, Subscription
from gozon.orders import queries
from gozon.orders.models import CANCELLED, FINISHED
from gozon.orders.settings import OrdersSettings

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


def make_handler(pool: asyncpg.Pool) -> BatchHandler[PaymentProcessed]:
    async def handle(batch: Sequence[Delivery[PaymentProcessed]]) -> list[Outcome]:
        first: dict[uuid.UUID, tuple[str, str | None]] = {}
        for delivery in batch:  # offset order: the first result of an order is the one applied
            first.setdefault(delivery.event.payload.order_id, final_status(delivery.event))
        async with batch_connection(pool) as conn:
            # One statement outside a transaction: its own, no BEGIN/COMMIT round trips.
            rows = await conn.fetch(
                queries.FINALIZE_ORDERS,
                list(first),
                [status for status, _ in first.values()],
                [reason for _, reason in first.values()],
            )
        found = {row["id"]: row for row in rows}
        moved = {order_id: row for order_id, row in found.items() if row["outcome"] == "moved"}
        outcomes: list[Outcome] = []
        for delivery in batch:
            payload = delivery.event.payload
            row = moved.pop(payload.order_id, None)
            with delivery.active():
                if row is not None:
                    status = row["status"]
                    ORDERS_FINAL.labels(status).inc()
                    ORDER_TO_FINAL.labels(status).observe(
                        max(0.0, (row["updated_at"] - row["created_at"]).total_seconds())
                    )
                    log.info(
                        "order final",
                        order_id=str(payload.order_id),
                        user_id=payload.user_id,
                        status=status,
                        reason=first[payload.order_id][1],
                    )
                    outcomes.append("processed")
                elif found[payload.order_id]["outcome"] != "unknown":
                    # Already final, or moved by an earlier result of this batch.
                    log.info(
                        "payment result ignored: order already final",
                        order_id=str(payload.order_id),
                        user_id=payload.user_id,
                    )
                    outcomes.append("duplicate")
                else:
                    outcomes.append(Rejected(f"no order {payload.order_id}"))
        return outcomes

    return handle


async def count_stuck_orders(pool: asyncpg.Pool, after: timedelta) -> int:
    """NEW orders older than `after`: every order should have reached a final status by then."""
    async with batch_connection(pool) as conn:
        stuck = int(await conn.fetchval(queries.STUCK_ORDERS, after) or 0)
    ORDERS_STUCK.set(stuck)
    return stuck


def subscription(settings: OrdersSettings) -> Subscription[PaymentProcessed]:
    """The orders consumer reads payment results; it writes no outbox."""
    for status in (FINISHED, CANCELLED):  # every series at 0 from the start
        ORDERS_FINAL.labels(status)
        ORDER_TO_FINAL.labels(status)

    def handler(pool: asyncpg.Pool, _: Notify) -> BatchHandler[PaymentProcessed]:
        return make_handler(pool)

    stuck_after = timedelta(seconds=settings.orders_stuck_after_s)
    return Subscription(
        topic=PAYMENT_PROCESSED_TOPIC,
        schema=PaymentProcessed,
        handler=handler,
        scrape_hooks=(partial(count_stuck_orders, after=stuck_after),),
    )
