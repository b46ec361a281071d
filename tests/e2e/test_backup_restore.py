"""A backup taken under load, the database server destroyed, the documented restore
(docs/operations.md, "Restoring from a backup"), and nothing acknowledged before the backup lost.

The platform's seven processes run on a PostgreSQL cluster and a Kafka of this test's own.
Orders are written through the gateway while the chart's own backup script
(charts/gozon/files/backup.sh, what the CronJob runs) dumps account_db and then order_db.
Then the platform is stopped, the cluster's data folder deleted and a new, empty cluster made
(as a new volume under the StatefulSet would), and the runbook's steps run: the chart's
restore script for each database, `gozon <service> migrate` (nothing to do), `gozon <service>
outbox replay-sent --since <the backup's start minus a margin>`, the platform started again.
`gozon reconcile` must come back clean and every order acknowledged before the backup started
must be there, final.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest

from devstack import GOZON, Kafka, Postgres, throwaway_kafka, throwaway_postgres
from devstack.postgres import postgres_bin_dir
from gozon.reconcile import ReconcileReport, reconcile
from tests.e2e.conftest import platform_env, running_platform
from tests.e2e.test_order_payment_flow import deposit, new_user, post_as_a_client_does

# Two platform starts, a dump, a new cluster and a restore: minutes on a busy machine.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

FILES = Path(__file__).resolve().parents[2] / "charts" / "gozon" / "files"
USERS = 4


@pytest.fixture(scope="module")
def own_kafka(servers_dir: Path) -> Iterator[Kafka]:
    with throwaway_kafka(servers_dir / "kafka-backup-restore") as server:
        yield server


@pytest.fixture
def own_postgres(servers_dir: Path) -> Iterator[Postgres]:
    with throwaway_postgres(servers_dir / "pg-backup-restore") as server:
        yield server


def libpq_env(postgres: Postgres, database: str) -> dict[str, str]:
    """What the CronJob's containers get: libpq's variables, the PostgreSQL tools on PATH."""
    bin_dir = postgres_bin_dir()
    assert bin_dir is not None
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PGHOST": "127.0.0.1",
        "PGPORT": str(postgres.port),
        "PGUSER": postgres.user,
        "PGPASSWORD": postgres.password,
        "PGDATABASE": database,
    }


def sh(script: str, *args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        ["sh", str(FILES / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{script}: {done.stdout}{done.stderr}"
    return done.stdout


def gozon(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GOZON, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


async def settled(env: dict[str, str], within: float = 240) -> ReconcileReport:
    """`reconcile` once every order is final (a NEW order counts as stuck until then)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        report = await reconcile(
            env["GOZON_ORDERS_DATABASE_URL"],
            env["GOZON_PAYMENTS_DATABASE_URL"],
            stuck_after=timedelta(0),
        )
        if report.ok or loop.time() > deadline:
            return report
        await asyncio.sleep(1)


class Shoppers:
    """Orders through the gateway, one user after another, each acknowledged id with when."""

    def __init__(self, client: httpx.AsyncClient, users: list[str]) -> None:
        self.client = client
        self.users = users
        self.acknowledged: list[tuple[str, float]] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        rng = random.Random(7)
        while not self.stop.is_set():
            user = rng.choice(self.users)
            amount = f"{rng.randint(100, 4000) / 100:.2f}"
            response = await post_as_a_client_does(
                self.client,
                "/api/orders",
                user,
                json={"amount": float(amount), "description": "backup"},
            )
            assert response.status_code == 201, response.text
            self.acknowledged.append((response.json()["id"], time.time()))
            await asyncio.sleep(0.05)

    async def until(self, count: int, within: float = 180) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while len(self.acknowledged) < count:
            assert loop.time() < deadline, f"only {len(self.acknowledged)} orders in {within} s"
            await asyncio.sleep(0.1)


async def order_ids(url: str) -> dict[str, str]:
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        rows = await connection.fetch("SELECT id, status FROM orders")
    finally:
        await connection.close()
    return {str(row["id"]): row["status"] for row in rows}


async def test_a_restored_backup_keeps_every_order_acknowledged_before_it(
    own_postgres: Postgres, own_kafka: Kafka, logs_dir: Path, tmp_path: Path
) -> None:
    env = platform_env(own_postgres.url("order_db"), own_postgres.url("account_db"), own_kafka)
    backups = tmp_path / "backups"
    for service in ("orders", "payments"):
        assert gozon(env, service, "migrate").returncode == 0

    # 1. Orders under way while the CronJob's script dumps account_db, then order_db.
    with running_platform(env, logs_dir / "backup-restore" / "before") as platform:
        async with httpx.AsyncClient(base_url=platform.gateway, timeout=120) as client:
            users = [new_user() for _ in range(USERS)]
            for user in users:
                await deposit(client, user, "300")
            shoppers = Shoppers(client, users)
            writing = asyncio.create_task(shoppers.run())
            try:
                await shoppers.until(30)
                backup_started = time.time()
                for database in ("account_db", "order_db"):
                    said = await asyncio.to_thread(
                        sh,
                        "backup.sh",
                        env={
                            **libpq_env(own_postgres, database),
                            "BACKUP_DIR": str(backups),
                            "BACKUP_KEEP": "2",
                        },
                    )
                    assert said.startswith(f"backup: {database} -> {backups / database}/")
                await shoppers.until(len(shoppers.acknowledged) + 10)  # lost with the server
            finally:
                shoppers.stop.set()
                await writing
        before = await settled(env)
        assert before.ok, before.render()
    kept = [oid for oid, acked_at in shoppers.acknowledged if acked_at < backup_started]
    assert len(kept) >= 30

    # 2. The server is lost: a new, empty cluster where the old one was.
    own_postgres.stop()
    shutil.rmtree(own_postgres.pgdata)
    own_postgres.start()
    with pytest.raises(asyncpg.UndefinedTableError):  # order_db is there, and empty
        await order_ids(env["GOZON_ORDERS_DATABASE_URL"])

    # 3. The runbook: restore each database from its newest dump, migrate (nothing to do),
    # publish again what the outboxes sent since shortly before the backup, start.
    for database in ("account_db", "order_db"):
        (dump,) = sorted((backups / database).glob(f"{database}-*.dump"))[-1:]
        said = sh("restore.sh", str(dump), env=libpq_env(own_postgres, database))
        assert said.strip() == f"restore: {dump} -> {database}"
    since = datetime.fromtimestamp(backup_started, UTC) - timedelta(minutes=10)
    for service in ("orders", "payments"):
        migrated = gozon(env, service, "migrate")
        assert migrated.returncode == 0, migrated.stderr
        assert f"{service} schema at head" in migrated.stdout
        replayed = gozon(env, service, "outbox", "replay-sent", "--since", since.isoformat())
        assert replayed.returncode == 0, replayed.stderr
        assert replayed.stdout.startswith("requeued ")

    with running_platform(env, logs_dir / "backup-restore" / "after"):
        after = await settled(env)
        assert after.ok, after.render()
        checked = gozon(env, "reconcile", "--stuck-after", "0")
        assert checked.returncode == 0, checked.stdout + checked.stderr

    restored = await order_ids(env["GOZON_ORDERS_DATABASE_URL"])
    missing = [oid for oid in kept if oid not in restored]
    assert not missing, f"{len(missing)} acknowledged orders lost: {missing[:5]}"
    assert all(restored[oid] in ("FINISHED", "CANCELLED") for oid in kept)
