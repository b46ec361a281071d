"""Today's code on the next release's schema (docs/adr/0101-expand-contract-migrations.md).

The rollback case, with real processes: both databases are migrated by "the next release"
(today's history plus an expand-only revision, tests/next_release.py), then today's image is
put back on them: its migrations exit 0 and change nothing, its schema gate lets its processes
start, and the seven processes take an order and pay it, cancel one the account cannot pay,
and leave `gozon reconcile` clean.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from devstack import GOZON, Kafka, Postgres, throwaway_kafka
from gozon.core.migrations import upgrade
from gozon.reconcile import reconcile
from tests.conftest import _psql
from tests.e2e.conftest import platform_env, running_platform
from tests.e2e.test_order_payment_flow import balance, deposit, final_order, new_user, order
from tests.next_release import NEXT_REVISION, next_release_migrations

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

GATE = Path(__file__).resolve().parents[2] / "charts" / "gozon" / "files" / "wait_for_schema.py"


@pytest.fixture(scope="module")
def own_kafka(servers_dir: Path) -> Iterator[Kafka]:
    with throwaway_kafka(servers_dir / "kafka-expand-contract") as server:
        yield server


@pytest.fixture
def next_release_databases(postgres: Postgres, tmp_path: Path) -> Iterator[dict[str, str]]:
    urls = {}
    for service in ("orders", "payments"):
        name = f"next_release_{service}"
        _psql(postgres, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        _psql(postgres, f'CREATE DATABASE "{name}"')
        urls[service] = postgres.url(name)
        upgrade(next_release_migrations(service, tmp_path), urls[service])
    yield urls
    for service in urls:
        _psql(postgres, f'DROP DATABASE IF EXISTS "next_release_{service}" WITH (FORCE)')


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, env={**os.environ, **env}, capture_output=True, text=True, timeout=180, check=False
    )


async def test_todays_code_runs_on_the_next_releases_schema(
    next_release_databases: dict[str, str], own_kafka: Kafka, logs_dir: Path
) -> None:
    env = platform_env(
        next_release_databases["orders"], next_release_databases["payments"], own_kafka
    )
    for service in ("orders", "payments"):
        migrated = run([GOZON, service, "migrate"], env)
        assert migrated.returncode == 0, migrated.stderr
        assert "which descends from this image's head" in migrated.stdout
        gate = run([sys.executable, str(GATE), service], env)
        assert gate.returncode == 0, gate.stdout + gate.stderr

    with running_platform(env, logs_dir / "expand-contract") as platform:
        async with httpx.AsyncClient(base_url=platform.gateway, timeout=120) as client:
            user = new_user()
            await deposit(client, user, "100")
            paid = await order(client, user, "30.50")
            assert (await final_order(client, user, paid))["status"] == "FINISHED"
            unpaid = await order(client, user, "1000")
            assert (await final_order(client, user, unpaid))["status"] == "CANCELLED"
            assert await balance(client, user) == Decimal("69.50")
            listed = await client.get("/api/orders", headers={"X-User-Id": user})
            assert sorted(o["id"] for o in listed.json()) == sorted([paid, unpaid])

    report = await reconcile(
        env["GOZON_ORDERS_DATABASE_URL"],
        env["GOZON_PAYMENTS_DATABASE_URL"],
        stuck_after=timedelta(0),
    )
    assert report.ok, report.render()
    assert report.orders == {"FINISHED": 1, "CANCELLED": 1}
    for service in ("orders", "payments"):
        gate = run([sys.executable, str(GATE), service], env)
        assert f"{service} schema at ['{NEXT_REVISION}']" in gate.stdout
