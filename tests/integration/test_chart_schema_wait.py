"""The chart's init-container script (charts/gozon/files/wait_for_schema.py) on a real database.

A process of the chart starts only once its database's schema is at the image's migration
head: the script must keep waiting on an empty or older schema, say what it sees, and exit 0
as soon as the migration has run; with `--database-only` it only waits for the server.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gozon.core.migrations import upgrade
from scripts.stack import Postgres
from tests.conftest import MIGRATIONS, _psql

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
        env={"GOZON_ORDERS_DATABASE_URL": url, "PATH": ""},
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
