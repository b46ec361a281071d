"""Each service's alembic history: up to head matches the models, and down to base and up
again works (every migration is reversible)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic import command

from gozon.core.migrations import alembic_config
from scripts.stack import Postgres
from tests.conftest import MIGRATIONS, _psql

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
