"""The orders service's settings: `GOZON_ORDERS_*` on top of what every service reads.

Read once from the environment by `gozon orders …` and passed in (gozon.core.settings has the
shared part and the rules: failing fast, the production password check). The default ports are
the process table's (gozon.orders.processes).
"""

from __future__ import annotations

from typing import ClassVar, Self

from pydantic import Field, model_validator

from gozon.core.settings import DEV_PASSWORD, ServiceSettings
from gozon.orders.processes import API, CONSUMER, RELAY, SERVICE


class OrdersSettings(ServiceSettings):
    service: ClassVar[str] = "orders"
    orders_database_url: str = (
        f"postgresql+asyncpg://postgres:{DEV_PASSWORD}@127.0.0.1:5432/{SERVICE.database}"
    )
    orders_api_host: str = "127.0.0.1"
    orders_api_port: int = Field(default=API.default_port, ge=1, le=65535)
    orders_relay_metrics_port: int = Field(default=RELAY.default_port, ge=0, le=65535)
    orders_consumer_metrics_port: int = Field(default=CONSUMER.default_port, ge=0, le=65535)
    orders_group_id: str = "orders"
    orders_stuck_after_s: float = Field(default=60, gt=0)

    @model_validator(mode="after")
    def _no_dev_secrets(self) -> Self:
        self._check_database_password(self.orders_database_url)
        return self
