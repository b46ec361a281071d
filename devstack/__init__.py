"""The development stack: real PostgreSQL and Apache Kafka, and the platform's processes under
supervisord, on this machine without Docker. `make up / down / status / logs` run its CLI
(`python -m devstack …`); the tests and the benches start throwaway servers with it.

The public API, by job (each a module):

- `Postgres` (`devstack.postgres`): a cluster in a data folder; `start()`, `stop()`, `url()`.
- `Kafka` (`devstack.kafka`): a KRaft node from Maven's jars; `start()`, `stop()`,
  `create_topics()`, `allow()` (ACLs); `create_topics` for any broker.
- `Platform`, `StackConfig` (`devstack.platform`): the seven processes under supervisord;
  `start(env)`, `stop()`, `states()`; where `make up`'s stack lives, from GOZON_* variables;
  `migrate_and_create_topics` before a start.
- `supervisor_config` (`devstack.supervisor`): supervisord's configuration, generated from the
  process table (`gozon.processes`).
- `throwaway_postgres`, `throwaway_kafka`, `workdir`, `free_ports`, `stack_env`
  (`devstack.throwaway`): servers on free ports in temporary folders, for tests and benches.
- `GozonProcess`, `GOZON`, `wait_for`, `http_status` (`devstack.processes`): one `gozon …`
  process of the tests' or a bench's own, started, waited for over HTTP, stopped or killed.
- `ComposeStack`, `ComposeProcess`, `COMPOSE_SERVICES`, `COMPOSE_DATABASES`
  (`devstack.compose`): the docker-compose stack as the tests see it (`make test-compose`).
- `prometheus_tool` (`devstack.apt`): Debian's Prometheus binaries, installed where missing.
- `StackError`: a failure a person can act on; its message names the cause.

What it guarantees: installing and starting are idempotent (Debian's packages only where
missing, Kafka's jars downloaded once, a running server of ours reused); a start waits for
readiness against a deadline and fails with a message naming the cause; stopping stops what
we started, found by pid files in our data folder, and nothing else.

Only the standard library (and the process table, itself standard library only) is imported
at module level, so `make down` and `make status` work before the virtualenv exists. The
services never import this package (an import-linter contract).
"""

from __future__ import annotations

import sys
from pathlib import Path

_SERVICES = str(Path(__file__).resolve().parent.parent / "services")
if _SERVICES not in sys.path:  # `make down` may run before the virtualenv exists
    sys.path.append(_SERVICES)

from devstack.apt import prometheus_tool  # noqa: E402 (the process table needs the path above)
from devstack.compose import (  # noqa: E402
    COMPOSE_DATABASES,
    COMPOSE_SERVICES,
    ComposeProcess,
    ComposeStack,
)
from devstack.kafka import Kafka, create_topics  # noqa: E402
from devstack.platform import Platform, StackConfig, migrate_and_create_topics  # noqa: E402
from devstack.postgres import Postgres  # noqa: E402
from devstack.processes import GOZON, GozonProcess, http_status, wait_for  # noqa: E402
from devstack.supervisor import supervisor_config  # noqa: E402
from devstack.system import StackError  # noqa: E402
from devstack.throwaway import (  # noqa: E402
    free_ports,
    stack_env,
    throwaway_kafka,
    throwaway_postgres,
    workdir,
)

__all__ = [
    "COMPOSE_DATABASES",
    "COMPOSE_SERVICES",
    "GOZON",
    "ComposeProcess",
    "ComposeStack",
    "GozonProcess",
    "Kafka",
    "Platform",
    "Postgres",
    "StackConfig",
    "StackError",
    "create_topics",
    "free_ports",
    "http_status",
    "migrate_and_create_topics",
    "prometheus_tool",
    "stack_env",
    "supervisor_config",
    "throwaway_kafka",
    "throwaway_postgres",
    "wait_for",
    "workdir",
]
