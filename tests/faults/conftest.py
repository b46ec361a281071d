"""The fault suite's fixtures: the e2e platform (its fixtures reused, not a second launcher),
funded users, and the figures each fault test records for docs/reliability.md.

The figures are printed at the end of the run and, when `GOZON_FAULTS_REPORT` names a file,
written there as JSON lines.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.e2e import conftest as e2e
from tests.e2e.conftest import Platform

# The e2e suite's platform (seven processes, their own Kafka), reused as it is.
platform = e2e.platform
e2e_kafka = e2e.e2e_kafka

FIGURES: list[dict[str, Any]] = []
RICH = tuple(f"fault-rich-{n}" for n in range(20))
POOR = tuple(f"fault-poor-{n}" for n in range(3))
NO_ACCOUNT = ("fault-nobody",)


@pytest.fixture(scope="session", autouse=True)
def api_limits() -> None:
    """The production deadlines and limits, not the functional tests' lifted ones."""


@dataclass(frozen=True)
class Users:
    all: tuple[str, ...]


@pytest.fixture(scope="session")
async def users(platform: Platform) -> Users:
    """Twenty users with plenty of money, three with little (their orders get CANCELLED), and
    one with no account."""
    async with httpx.AsyncClient(base_url=platform.gateway, timeout=30) as client:
        for user, amount in [*((u, 1_000_000) for u in RICH), *((u, 20) for u in POOR)]:
            response = await client.post(
                f"/api/payments/deposit?amount={amount}",
                headers={"X-User-Id": user, "Idempotency-Key": f"fund-{user}"},
            )
            assert response.status_code == 200, response.text
    return Users((*RICH, *RICH, *RICH, *POOR, *NO_ACCOUNT))


def record(figures: dict[str, Any]) -> None:
    FIGURES.append(figures)
    path = os.environ.get("GOZON_FAULTS_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps(figures) + "\n")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("fault suite figures")
    for figures in FIGURES:
        terminalreporter.write_line(json.dumps(figures))
