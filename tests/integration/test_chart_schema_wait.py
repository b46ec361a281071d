"""The chart's init-container script (charts/gozon/files/wait_for_schema.py) on a real database.

A process of the chart starts only once its database's schema suits the image: at the image's
migration head, or at a later revision a newer release migrated to that descends from it
(expand/contract: a rollback's pods must start on the newer schema). The script must keep
waiting on an empty or older schema, say what it sees, exit 0 as soon as the migration has run
or at once on a descendant, and exit 1 saying why on a schema of another history; with
`--database-only` it only waits for the server.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import Postgres
from gozon.core.migrations import LINEAGE_TABLE, upgrade
from tests.conftest import MIGRATIONS, _psql
from tests.next_release import NEXT_REVISION, head, next_release_migrations

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "charts" / "gozon" / "files" / "wait_for_schema.py"


@pytest.fixture
def empty_db(postgres: Postgres) -> Iterator[str]:
    name = "chart_schema_wait"
    _psql(postgres, f'DROP DATABASE IF EXISTS "{name}"')
    _psql(postgres, f'CREATE DATABASE "{name}"')
    yield postgres.url(name)
    _psql(postgres, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start(url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        env={"GOZON_ORDERS_DATABASE_URL": url, "GOZON_PAYMENTS_DATABASE_URL": url, "PATH": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def first_line(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    return process.stdout.readline()


@pytest.mark.parametrize("start_at", [None, "0001"], ids=["empty", "one-migration-behind"])
def test_waits_for_the_migration_then_exits(empty_db: str, start_at: str | None) -> None:
    migrations = MIGRATIONS / "orders" / "migrations"
    if start_at:
        upgrade(migrations, empty_db, start_at)
    with start(empty_db, "orders") as waiting:
        try:
            seen = "[]" if start_at is None else f"['{start_at}']"
            assert first_line(waiting).startswith(
                f"waiting for the orders migration: want ['0002'], database has {seen}"
            )
            assert waiting.poll() is None  # it printed that it waits, and it still does
            upgrade(migrations, empty_db)
            assert waiting.wait(timeout=60) == 0
            assert waiting.stdout is not None
            assert "orders schema at head ['0002']" in waiting.stdout.read()
        finally:
            waiting.kill()


def test_database_only_returns_once_the_server_answers(empty_db: str) -> None:
    with start(empty_db, "--database-only", "orders") as done:
        assert done.wait(timeout=60) == 0
        assert first_line(done) == "orders database answers\n"


def test_says_why_a_database_cannot_be_read(postgres: Postgres) -> None:
    url = postgres.url("postgres").replace(f":{postgres.password}@", ":wrong-password@")
    with start(url, "--database-only", "orders") as waiting:
        try:
            line = first_line(waiting)
            assert "database not reachable (InvalidPasswordError" in line, line
            assert waiting.poll() is None  # still waiting, as an init container would
        finally:
            waiting.kill()


def test_refuses_an_unknown_service() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "shipping"], capture_output=True, text=True, check=False
    )
    assert done.returncode != 0
    assert "usage: wait_for_schema.py [--database-only] orders|payments" in done.stderr


def sql(url: str, statement: str) -> None:
    import asyncio

    import asyncpg

    async def run() -> None:
        connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run())


@pytest.mark.parametrize("service", ["orders", "payments"])
def test_starts_at_once_on_a_schema_a_newer_release_migrated(
    empty_db: str, tmp_path: Path, service: str
) -> None:
    upgrade(next_release_migrations(service, tmp_path), empty_db)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), service],
        env={f"GOZON_{service.upper()}_DATABASE_URL": empty_db, "PATH": ""},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(
        f"{service} schema at ['{NEXT_REVISION}'], which descends from this image's head "
        f"['{head(service)}']"
    ), done.stdout


def test_refuses_a_schema_of_another_history(empty_db: str) -> None:
    upgrade(MIGRATIONS / "orders" / "migrations", empty_db)
    sql(empty_db, "UPDATE alembic_version SET version_num = 'c0ffee'")
    with start(empty_db, "orders") as refused:
        assert refused.wait(timeout=120) == 1
        assert refused.stdout is not None
        said = refused.stdout.read()
    assert said.startswith(
        "orders schema at ['c0ffee'], which is neither this image's head ['0002'], nor behind "
        "it, nor recorded as descending from it: refusing to run on it"
    ), said


def test_refuses_a_newer_schema_that_recorded_no_lineage(empty_db: str, tmp_path: Path) -> None:
    upgrade(next_release_migrations("orders", tmp_path), empty_db)
    sql(empty_db, f"DELETE FROM {LINEAGE_TABLE} WHERE revision = '{NEXT_REVISION}'")
    with start(empty_db, "orders") as refused:
        assert refused.wait(timeout=120) == 1
        assert refused.stdout is not None
        assert "nor recorded as descending from it" in refused.stdout.read()
