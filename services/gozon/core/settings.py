"""Settings, read once from `GOZON_*` environment variables and passed in (never global).

One class per process family: here what every process, every worker and every service shares;
the gateway's and each service's own class live in their packages. The names are the same under
`make up` (supervisord's environment), docker-compose and the Helm chart. A bad value fails the
process at start-up with pydantic's message naming the variable; production refuses the
development database password.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_PASSWORD = "postgres"  # noqa: S105 (the local stack's password, refused in production)


class CommonSettings(BaseSettings):
    """Knobs every process reads."""

    # A refused value is not echoed back: it may be a password (GOZON_KAFKA_SASL_PASSWORD,
    # GOZON_GATEWAY_JWT_SECRET), and the messages name the variable anyway.
    model_config = SettingsConfigDict(
        env_prefix="GOZON_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    environment: Literal["local", "test", "production"] = "local"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = True
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_topic_partitions: int = Field(default=3, ge=1)
    kafka_replication_factor: int = Field(default=1, ge=1)
    # How every Kafka client of the process (producers, consumers, the topic check, the dlq
    # commands) reaches the brokers; gozon.messaging.kafka.KafkaAccess applies them. The
    # defaults are the local stack's plaintext listener (compose, `make up`); the chart sets
    # SCRAM credentials from a KafkaUser secret (docs/kafka-security.md).
    kafka_security_protocol: Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_password_file: Path | None = None  # a mounted secret's file: preferred
    kafka_ssl_ca_file: Path | None = None  # PEM; without it the system's CAs are trusted
    # False where an operator (Strimzi's topic operator) owns the topics: the workers then
    # only use them, and their Kafka users need no right to create any.
    kafka_create_topics: bool = True
    # Background work's traces (relay polls, wake-up notifications, pruning): off, so that an
    # idle platform exports nothing (gozon.core.telemetry.QuietBackground).
    trace_background_db: bool = False
    # Where a worker remembers its crashes across restarts, to back off from a crash loop
    # (gozon.core.crashloop); unset: nothing remembered. `make up` sets its data folder's.
    crash_state_dir: Path | None = None
    # The traces' resource: `service.namespace`, and `deployment.environment.name` (empty:
    # the value of GOZON_ENVIRONMENT); docs/observability.md, "Resource".
    service_namespace: str = Field(default="gozon", min_length=1)
    deployment_environment: str = ""

    @property
    def deployment_environment_name(self) -> str:
        return self.deployment_environment or self.environment

    @model_validator(mode="after")
    def _kafka_security_complete(self) -> Self:
        protocol = self.kafka_security_protocol
        sasl = protocol.startswith("SASL_")
        given = [
            name
            for name, value in (
                ("GOZON_KAFKA_SASL_USERNAME", self.kafka_sasl_username),
                ("GOZON_KAFKA_SASL_PASSWORD", self.kafka_sasl_password),
                ("GOZON_KAFKA_SASL_PASSWORD_FILE", self.kafka_sasl_password_file),
            )
            if value is not None
        ]
        if not sasl and given:
            # Credentials that would silently go unused: the broker would not be asked.
            raise ValueError(
                f"{', '.join(given)} set but GOZON_KAFKA_SECURITY_PROTOCOL={protocol} does not "
                "authenticate: use SASL_PLAINTEXT or SASL_SSL, or unset them"
            )
        if sasl:
            if not self.kafka_sasl_username:
                raise ValueError(
                    f"GOZON_KAFKA_SECURITY_PROTOCOL={protocol} needs GOZON_KAFKA_SASL_USERNAME"
                )
            if (self.kafka_sasl_password is None) == (self.kafka_sasl_password_file is None):
                raise ValueError(
                    f"GOZON_KAFKA_SECURITY_PROTOCOL={protocol} needs exactly one of "
                    "GOZON_KAFKA_SASL_PASSWORD_FILE and GOZON_KAFKA_SASL_PASSWORD"
                )
            file = self.kafka_sasl_password_file
            if file is not None and not file.is_file():
                raise ValueError(f"GOZON_KAFKA_SASL_PASSWORD_FILE {file} is missing")
            if not self.kafka_sasl_password_value():
                raise ValueError("the Kafka SASL password is empty")
        ca = self.kafka_ssl_ca_file
        if ca is not None:
            if not protocol.endswith("SSL"):
                raise ValueError(
                    f"GOZON_KAFKA_SSL_CA_FILE set but GOZON_KAFKA_SECURITY_PROTOCOL={protocol} "
                    "does not use TLS: use SSL or SASL_SSL, or unset it"
                )
            if not ca.is_file():
                raise ValueError(f"GOZON_KAFKA_SSL_CA_FILE {ca} is missing")
        return self

    def kafka_sasl_password_value(self) -> str | None:
        """The SASL password: the file's content (one trailing newline dropped), or the
        variable's."""
        if self.kafka_sasl_password_file is not None:
            return self.kafka_sasl_password_file.read_text().removesuffix("\n")
        if self.kafka_sasl_password is not None:
            return self.kafka_sasl_password.get_secret_value()
        return None


@dataclass(frozen=True)
class SessionLimits:
    """How long a worker's database session may wait, set on each of its connections as
    PostgreSQL settings (`gozon.core.pg.worker_pool`, the relays' connections): a statement
    waiting for a lock fails after `lock_timeout_s` (55P03), any statement after
    `statement_timeout_s` (57014), and the server ends a session left idle inside a
    transaction after `idle_in_transaction_s` (25P03), rolling it back and releasing its locks.
    Each failure retries the batch (never skips or dead-letters a message)."""

    lock_timeout_s: float
    statement_timeout_s: float
    idle_in_transaction_s: float

    def server_settings(self) -> dict[str, str]:
        return {
            "lock_timeout": str(int(self.lock_timeout_s * 1000)),
            "statement_timeout": str(int(self.statement_timeout_s * 1000)),
            "idle_in_transaction_session_timeout": str(int(self.idle_in_transaction_s * 1000)),
        }

    @property
    def command_timeout_s(self) -> float:
        """The client's own bound on a round trip, for a server that stopped answering: well
        past the statement timeout (which fires first on a server that answers) and past a
        stall of the whole server. A client-side timeout that fires mid-stall leaves the
        statement to run when the server resumes (a BEGIN, say) while the client has given up
        on it, so it is kept for servers that are really gone."""
        return max(30.0, self.statement_timeout_s + 1)


class MessagingSettings(CommonSettings):
    """The relay and consumer knobs, shared by both services' workers.

    Every worker transaction is bounded (`SessionLimits`; docs/messaging.md, "Bounded waits"):
    `worker_lock_timeout_ms` and `worker_statement_timeout_ms` for relays and consumers,
    `consumer_idle_in_transaction_timeout_ms` for consumers, all under
    `consumer_session_timeout_ms` (the consumer group's session timeout), so that a consumer
    frozen inside its transaction has its locks released by the server before the group
    moves its partitions to a peer, which then never waits for them. A relay's transaction
    spans its publish (up to the producer's 10 s request timeout, twice with a retry), and no
    one waits for its rows (`SKIP LOCKED`): `relay_idle_in_transaction_timeout_ms` is longer,
    and only hands a frozen relay's claimed rows back to its peers.
    """

    relay_batch_size: int = Field(default=200, ge=1, le=5000)
    relay_fallback_poll_ms: int = Field(default=1000, ge=1, le=600_000)
    relay_max_attempts: int = Field(default=10, ge=1)
    relay_backoff_base_ms: int = Field(default=200, ge=1)
    relay_backoff_max_ms: int = Field(default=60_000, ge=1)
    relay_retention_hours: float = Field(default=72, gt=0)
    relay_prune_interval_s: float = Field(default=60, gt=0)
    consumer_max_handler_attempts: int = Field(default=5, ge=1)
    # Done offsets are committed to Kafka together at most this long after the first of them
    # (and at once when idle, before a rebalance and at a stop); 0 commits after every batch.
    # After a crash up to this much of recorded messages is delivered again, as duplicates
    # (docs/messaging.md; measured in docs/adr/0002-consumer-offset-commit-interval.md).
    consumer_commit_interval_ms: int = Field(default=250, ge=0, le=60_000)
    db_pool_size: int = Field(default=10, ge=1, le=100)
    # The consumer group's session timeout: a member silent this long (frozen, its machine
    # gone) loses its partitions to the others. Kafka's broker refuses less than 6 s by default.
    consumer_session_timeout_ms: int = Field(default=10_000, ge=6_000, le=300_000)
    worker_lock_timeout_ms: int = Field(default=2_000, ge=100, le=60_000)
    worker_statement_timeout_ms: int = Field(default=5_000, ge=100, le=300_000)
    consumer_idle_in_transaction_timeout_ms: int = Field(default=5_000, ge=100, le=300_000)
    relay_idle_in_transaction_timeout_ms: int = Field(default=30_000, ge=100, le=600_000)

    @model_validator(mode="after")
    def _waits_end_before_the_partitions_move(self) -> Self:
        session = self.consumer_session_timeout_ms
        for name in (
            "worker_lock_timeout_ms",
            "worker_statement_timeout_ms",
            "consumer_idle_in_transaction_timeout_ms",
        ):
            if getattr(self, name) >= session:
                raise ValueError(
                    f"{name} must be under consumer_session_timeout_ms ({session}): a frozen "
                    "consumer's locks must be released before its partitions move"
                )
        return self

    @property
    def consumer_session_limits(self) -> SessionLimits:
        return SessionLimits(
            lock_timeout_s=self.worker_lock_timeout_ms / 1000,
            statement_timeout_s=self.worker_statement_timeout_ms / 1000,
            idle_in_transaction_s=self.consumer_idle_in_transaction_timeout_ms / 1000,
        )

    @property
    def relay_session_limits(self) -> SessionLimits:
        return SessionLimits(
            lock_timeout_s=self.worker_lock_timeout_ms / 1000,
            statement_timeout_s=self.worker_statement_timeout_ms / 1000,
            idle_in_transaction_s=self.relay_idle_in_transaction_timeout_ms / 1000,
        )


class ServiceSettings(MessagingSettings):
    """What every service has, under its own prefixed names (`GOZON_ORDERS_…`): the base of
    each service's settings, which the service package owns (gozon.orders.settings,
    gozon.payments.settings).

    The API's limits nest under the gateway's 5 s timeout (docs/reliability.md): a request's
    budget is the gateway's `X-Request-Timeout-Ms`, at most `api_timeout_s`; a transaction's
    statements stop after `db_statement_timeout_s` and a pooled connection is waited for at
    most `db_pool_timeout_s`. Past `api_max_in_flight` running and `api_max_queued` waiting,
    a request is answered 503 at once.
    """

    service: ClassVar[str]
    api_timeout_s: float = Field(default=4.0, gt=0)
    api_max_in_flight: int = Field(default=16, ge=1)
    api_max_queued: int = Field(default=16, ge=0)
    db_pool_timeout_s: float = Field(default=2.0, gt=0)
    db_statement_timeout_s: float = Field(default=3.0, gt=0)

    @model_validator(mode="after")
    def _limits_nest(self) -> Self:
        if self.db_pool_timeout_s >= self.api_timeout_s:
            raise ValueError("db_pool_timeout_s must be under api_timeout_s")
        if self.db_statement_timeout_s > self.api_timeout_s:
            raise ValueError("db_statement_timeout_s must not exceed api_timeout_s")
        return self

    def _own(self, name: str) -> object:
        return getattr(self, f"{self.service}_{name}")

    @property
    def database_url(self) -> str:
        return str(self._own("database_url"))

    @property
    def api_host(self) -> str:
        return str(self._own("api_host"))

    @property
    def api_port(self) -> int:
        return int(str(self._own("api_port")))

    @property
    def relay_metrics_port(self) -> int:
        return int(str(self._own("relay_metrics_port")))

    @property
    def consumer_metrics_port(self) -> int:
        return int(str(self._own("consumer_metrics_port")))

    @property
    def group_id(self) -> str:
        return str(self._own("group_id"))

    def _check_database_password(self, url: str) -> None:
        if self.environment == "production" and f":{DEV_PASSWORD}@" in url:
            raise ValueError("the development database password is not allowed in production")
