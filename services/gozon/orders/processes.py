"""The orders service's rows of the process table: what runs for it, on which ports.

Its settings (gozon.orders.settings) take their default ports from here; `gozon orders …`, the
local supervisor, compose and the chart follow gozon.processes, which lists these.
"""

from __future__ import annotations

from gozon.core.process import Migration, Process, Service

API = Process("orders-api", ("orders", "api"), "api", "orders", "GOZON_ORDERS_API_PORT", 8081)
RELAY = Process(
    "orders-relay", ("orders", "relay"), "relay", "orders", "GOZON_ORDERS_RELAY_METRICS_PORT", 9101
)
CONSUMER = Process(
    "orders-consumer",
    ("orders", "consumer"),
    "consumer",
    "orders",
    "GOZON_ORDERS_CONSUMER_METRICS_PORT",
    9102,
)

SERVICE = Service(
    name="orders",
    database="order_db",
    outbox_table="order_outbox",
    consumer_does="moves orders to FINISHED or CANCELLED",
    processes=(API, RELAY, CONSUMER),
    migration=Migration("orders-migrate", ("orders", "migrate"), "orders"),
)
