"""The docker-compose stack as the tests see it: where each service is published, its
container's state, a crash, and the wait for compose's restart policy to bring it back.

Used by the end-to-end tests when they run against the compose stack
(`GOZON_E2E_COMPOSE_PROJECT`, set by `scripts/test-compose`) and by `tests/compose/`. Standard
library only.

A crash is a SIGKILL to the container's main process from the host, as an OOM kill or a
segfault would be. `docker kill` is not used for it: the engine records it as a manual stop
and its restart policy then leaves the container down (measured on engine 20.10), which is
what an operator asks for and not what a crash looks like. It needs the engine on this host
and the permission to signal its processes (root, as in CI).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devstack.processes import http_status, wait_for
from devstack.system import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"

# docker-compose.yml's service of each process and migration of the process table: the spec's
# names (its README runs `docker-compose logs order-service`, `exec db_order psql …`) and the
# rest in their style (README, "With Docker").
COMPOSE_SERVICES: Mapping[str, str] = {
    "gateway": "gateway",
    "orders-api": "order-service",
    "orders-relay": "order-relay",
    "orders-consumer": "order-consumer",
    "payments-api": "payment-service",
    "payments-relay": "payment-relay",
    "payments-consumer": "payment-consumer",
    "orders-migrate": "order-migrate",
    "payments-migrate": "payment-migrate",
}
# The databases' services, by the service that owns them.
COMPOSE_DATABASES: Mapping[str, str] = {"orders": "db_order", "payments": "db_account"}


@dataclass(frozen=True)
class ComposeStack:
    """One compose project of docker-compose.yml, addressed by its project name."""

    project: str
    file: Path = COMPOSE_FILE
    env: Mapping[str, str] | None = None

    def compose(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(
            ["docker", "compose", "-p", self.project, "-f", str(self.file), *args],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, **(self.env or {})},
            cwd=self.file.parent,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"docker compose {' '.join(args)} failed ({result.returncode}): {result.stderr}"
            )
        return result.stdout

    def published(self, service: str, port: int) -> str:
        """`host:port` where the service's container port is published on this machine."""
        address = self.compose("port", service, str(port)).strip()
        if not address:
            raise RuntimeError(f"{service}'s port {port} is not published")
        host, _, published = address.rpartition(":")
        everywhere = host in ("0.0.0.0", "::", "[::]")  # noqa: S104 (reads an address, binds none)
        return f"{'127.0.0.1' if everywhere else host}:{published}"

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-q", service).split()
        if len(ids) != 1:
            raise RuntimeError(f"expected one container for {service}, found {ids}")
        return ids[0]

    def inspect(self, service: str) -> dict[str, Any]:
        out = subprocess.run(
            ["docker", "inspect", self.container(service)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        state: dict[str, Any] = json.loads(out)[0]
        return state

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", "--no-log-prefix", service)

    def crash(self, service: str) -> str:
        """SIGKILLs the service's main process; returns the container's start time before."""
        state = self.inspect(service)["State"]
        if not state["Running"]:
            raise RuntimeError(f"{service} is not running: {state['Status']}")
        os.kill(int(state["Pid"]), signal.SIGKILL)
        started: str = state["StartedAt"]
        return started

    def wait_restarted(
        self, service: str, before: str, *, health_url: str | None = None, timeout: float = 120
    ) -> None:
        """Waits until compose's restart policy has started the container again and it is
        healthy (its own health check) and, when given, `health_url` answers 200."""

        def back() -> bool:
            state = self.inspect(service)["State"]
            return bool(
                state["Running"]
                and state["StartedAt"] != before
                and state.get("Health", {}).get("Status", "healthy") == "healthy"
                and (health_url is None or http_status(health_url) == 200)
            )

        wait_for(back, timeout=timeout, what=f"{service} restarted and healthy", interval=0.5)

    def restart_count(self, service: str) -> int:
        return int(self.inspect(service)["RestartCount"])


class ComposeProcess:
    """A compose service in the place of a `GozonProcess`: the e2e tests kill it and wait
    for it the same way, and compose's restart policy does the restarting."""

    def __init__(self, stack: ComposeStack, service: str, health_url: str) -> None:
        self.stack = stack
        self.service = service
        self.health_url = health_url
        self._killed_at: str | None = None

    def kill(self) -> None:
        self._killed_at = self.stack.crash(self.service)

    def wait_restarted(self, timeout: float = 120) -> ComposeProcess:
        if self._killed_at is not None:
            self.stack.wait_restarted(
                self.service,
                self._killed_at,
                health_url=f"{self.health_url}/health/ready",
                timeout=timeout,
            )
            self._killed_at = None
        return self

    def status(self, endpoint: str = "/health/ready") -> int | None:
        return http_status(self.health_url + endpoint)

    def stop(self, timeout: float = 20) -> None:
        """Compose owns the container's life: `docker compose down` stops it."""

    def logs(self) -> str:
        return self.stack.logs(self.service)
