"""Settings, read once from `GOZON_*` environment variables and passed in (never global).

One class per process family. The names are the same in `make up`'s Procfile environment,
docker-compose and the Helm chart. A bad value fails the process at start-up with pydantic's
message naming the variable; production refuses the development database password.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_PASSWORD = "postgres"  # noqa: S105 (the local stack's password, refused in production)


class CommonSettings(BaseSettings):
    """Knobs every process reads."""

    model_config = SettingsConfigDict(env_prefix="GOZON_", extra="ignore", frozen=True)

    environment: Literal["local", "test", "production"] = "local"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = True
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_topic_partitions: int = Field(default=3, ge=1)
    kafka_replication_factor: int = Field(default=1, ge=1)


class MessagingSettings(CommonSettings):
    """The relay and consumer knobs, shared by both services' workers."""

    relay_batch_size: int = Field(default=200, ge=1, le=5000)
    relay_idle_poll_ms: int = Field(default=10, ge=1, le=60_000)
    relay_max_attempts: int = Field(default=10, ge=1)
    relay_backoff_base_ms: int = Field(default=200, ge=1)
    relay_backoff_max_ms: int = Field(default=60_000, ge=1)
    relay_retention_hours: float = Field(default=72, gt=0)
    relay_prune_interval_s: float = Field(default=60, gt=0)
    consumer_max_handler_attempts: int = Field(default=5, ge=1)
    db_pool_size: int = Field(default=10, ge=1, le=100)


class _ServiceSettings(MessagingSettings):
    def _check_database_password(self, url: str) -> None:
        if self.environment == "production" and f":{DEV_PASSWORD}@" in url:
            raise ValueError("the development database password is not allowed in production")


class OrdersSettings(_ServiceSettings):
    orders_database_url: str = (
        f"postgresql+asyncpg://postgres:{DEV_PASSWORD}@127.0.0.1:5432/order_db"
    )
    orders_api_host: str = "127.0.0.1"
    orders_api_port: int = Field(default=8081, ge=1, le=65535)
    orders_relay_metrics_port: int = Field(default=9101, ge=0, le=65535)
    orders_consumer_metrics_port: int = Field(default=9102, ge=0, le=65535)
    orders_group_id: str = "orders"

    @model_validator(mode="after")
    def _no_dev_secrets(self) -> Self:
        self._check_database_password(self.orders_database_url)
        return self


class PaymentsSettings(_ServiceSettings):
    payments_database_url: str = (
        f"postgresql+asyncpg://postgres:{DEV_PASSWORD}@127.0.0.1:5432/account_db"
    )
    payments_api_host: str = "127.0.0.1"
    payments_api_port: int = Field(default=8082, ge=1, le=65535)
    payments_relay_metrics_port: int = Field(default=9103, ge=0, le=65535)
    payments_consumer_metrics_port: int = Field(default=9104, ge=0, le=65535)
    payments_group_id: str = "payments"

    @model_validator(mode="after")
    def _no_dev_secrets(self) -> Self:
        self._check_database_password(self.payments_database_url)
        return self
