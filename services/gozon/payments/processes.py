"""The payments service's rows of the process table: what runs for it, on which ports.

Its settings (gozon.payments.settings) take their default ports from here; `gozon payments …`, the
local supervisor, compose and the chart follow gozon.processes, which lists these.
"""

from __future__ import annotations

from gozon.core.process import Migration, Process, Service

API = Process(
    "payments-api", ("payments", "api"), "api", "payments", "GOZON_PAYMENTS_API_PORT", 8082
)
RELAY = Process(
    "payments-relay",
    ("payments", "relay"),
    "relay",
    "payments",
    "GOZON_PAYMENTS_RELAY_METRICS_PORT",
    9103,
)
CONSUMER = Process(
    "payments-consumer",
    ("payments", "consumer"),
    "consumer",
    "payments",
    "GOZON_PAYMENTS_CONSUMER_METRICS_PORT",
    9104,
)

SERVICE = Service(
    name="payments",
    database="account_db",
    outbox_table="payment_outbox",
    consumer_does="pays for orders: inbox, debit, outbox",
    processes=(API, RELAY, CONSUMER),
    migration=Migration("payments-migrate", ("payments", "migrate"), "payments"),
)
