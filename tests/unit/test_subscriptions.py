"""Each service declares its own subscription; the consumer process runs it as declared."""

from __future__ import annotations

from gozon import contracts
from gozon.orders import consumer as orders_consumer
from gozon.orders.settings import OrdersSettings
from gozon.payments import consumer as payments_consumer
from gozon.payments.models import payment_outbox
from gozon.payments.settings import PaymentsSettings


def test_orders_read_payment_results_write_no_outbox_and_count_stuck_orders() -> None:
    subscription = orders_consumer.subscription(OrdersSettings())
    assert subscription.topic == contracts.PAYMENT_PROCESSED_TOPIC
    assert subscription.schema is contracts.PaymentProcessed
    assert subscription.outbox is None
    assert len(subscription.scrape_hooks) == 1


def test_payments_read_created_orders_and_answer_through_their_outbox() -> None:
    subscription = payments_consumer.subscription(PaymentsSettings())
    assert subscription.topic == contracts.ORDER_CREATED_TOPIC
    assert subscription.schema is contracts.OrderCreated
    assert subscription.outbox is payment_outbox
    assert subscription.scrape_hooks == ()


def test_the_services_read_what_the_other_publishes() -> None:
    orders = orders_consumer.subscription(OrdersSettings())
    payments = payments_consumer.subscription(PaymentsSettings())
    assert {orders.topic, payments.topic} == {
        contracts.ORDER_CREATED_TOPIC,
        contracts.PAYMENT_PROCESSED_TOPIC,
    }
