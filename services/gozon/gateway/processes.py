"""The gateway's row of the process table: its public port and its metrics side port."""

from __future__ import annotations

from gozon.core.process import Process

GATEWAY = Process(
    "gateway",
    ("gateway",),
    "gateway",
    None,
    "GOZON_GATEWAY_PORT",
    8080,
    side_port_setting="GOZON_GATEWAY_METRICS_PORT",
    default_side_port=9105,
)
