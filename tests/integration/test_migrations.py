"""Each service's alembic history: up to head matches the models, and down to base and up
again works (every migration is reversible); `gozon <service> migrate` records the lineage,
leaves a schema a newer release migrated alone and refuses one of another history."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic import command
from alembic.script import ScriptDirectory
from alembic.util import to_tuple

from devstack import GOZON, Postgres
from gozon.core.migrations import LINEAGE_TABLE, alembic_config
from tests.conftest import MIGRATIONS, _psql
from tests.next_release import NEXT_REVISION, head, next_release_migrations

pytestmark = pytest.mark.integration


@pytest.fixture(params=["orders", "payments"])
def service_db(request: pytest.FixtureRequest, postgres: Postgres) -> Iterator[tuple[str, str]]:
    service: str = request.param
    name = f"migrations_{service}"
    _psql(postgres, f'DROP DATABASE IF EXISTS "{name}"')
    _psql(postgres, f'CREATE DATABASE "{name}"')
    yield service, postgres.url(name)
    _psql(postgres, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_migrations_reach_the_models_and_are_reversible(service_db: tuple[str, str]) -> None:
    service, url = service_db
    config = alembic_config(MIGRATIONS / service / "migrations", url)
    command.upgrade(config, "head")
    command.check(config)  # raises if the models and the migrated schema differ
    command.downgrade(config, "base")
    command.upgrade(config, "head")
    command.check(config)


def gozon_migrate(service: str, url: str) -> subprocess.CompletedProcess[str]:
    """`gozon <service> migrate` as the chart's Job runs it: today's image's migrations."""
    return subprocess.run(
        [GOZON, service, "migrate"],
        env={**os.environ, f"GOZON_{service.upper()}_DATABASE_URL": url, "GOZON_LOG_JSON": "0"},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


async def _fetch(url: str, query: str) -> list[tuple[Any, ...]]:
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return [tuple(row) for row in await connection.fetch(query)]
    finally:
        await connection.close()


def fetch(url: str, query: str) -> list[tuple[Any, ...]]:
    return asyncio.run(_fetch(url, query))


def test_migrate_upgrades_an_empty_database_and_records_its_lineage(
    service_db: tuple[str, str],
) -> None:
    service, url = service_db
    done = gozon_migrate(service, url)
    assert done.returncode == 0, done.stderr
    assert f"{service} schema at head ['{head(service)}']" in done.stdout
    shipped = ScriptDirectory(str(MIGRATIONS / service / "migrations")).walk_revisions()
    recorded = dict(fetch(url, f"SELECT revision, down_revisions FROM {LINEAGE_TABLE}"))
    assert recorded == {rev.revision: list(to_tuple(rev.down_revision, ())) for rev in shipped}


def test_migrate_records_the_lineage_of_a_database_already_at_head(
    service_db: tuple[str, str],
) -> None:
    """A database migrated before lineage was recorded gets it on the next run, so the next
    release's rollback can tell its schema from another history's."""
    service, url = service_db
    command.upgrade(alembic_config(MIGRATIONS / service / "migrations", url), "head")
    fetch(url, f"DROP TABLE {LINEAGE_TABLE}")
    assert gozon_migrate(service, url).returncode == 0
    assert fetch(url, f"SELECT count(*) FROM {LINEAGE_TABLE}")[0][0] > 0


def test_migrate_of_an_older_image_leaves_a_newer_schema_alone(
    service_db: tuple[str, str], tmp_path: Path
) -> None:
    """The rollback case: the previous release's migration Job meets the schema the newer
    release migrated. It must succeed, say so, and change nothing."""
    service, url = service_db
    command.upgrade(alembic_config(next_release_migrations(service, tmp_path), url), "head")
    done = gozon_migrate(service, url)
    assert done.returncode == 0, done.stderr
    assert (
        f"{service} schema at ['{NEXT_REVISION}'], which descends from this image's head "
        f"['{head(service)}']: a newer release migrated it, and this release's code runs on it "
        "(expand/contract); nothing to migrate"
    ) in done.stdout
    assert fetch(url, "SELECT version_num FROM alembic_version") == [(NEXT_REVISION,)]


def test_migrate_refuses_a_schema_of_another_history(service_db: tuple[str, str]) -> None:
    service, url = service_db
    command.upgrade(alembic_config(MIGRATIONS / service / "migrations", url), "head")
    fetch(url, "UPDATE alembic_version SET version_num = 'c0ffee'")
    done = gozon_migrate(service, url)
    assert done.returncode == 1
    assert done.stderr.startswith(
        f"gozon: {service} schema at ['c0ffee'], which is neither this image's head"
    ), done.stderr
    assert fetch(url, "SELECT version_num FROM alembic_version") == [("c0ffee",)]
