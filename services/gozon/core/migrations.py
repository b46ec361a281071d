"""Alembic, one history per database, run by `gozon <service> migrate` (never at start-up).

Each service's `migrations/env.py` calls `run_env(metadata)`; `upgrade` builds the alembic
configuration in code, so no alembic.ini has to be found on disk.

Migrations are expand/contract (docs/adr/0101-expand-contract-migrations.md): a release's code
runs on the next release's schema. So a database suits an image when it is at the image's head
*or at a later revision that descends from it*; `check_schema` says which, for the chart's
schema gate (charts/gozon/files/wait_for_schema.py) and for `migrate`, which leaves a newer
database alone instead of failing on a revision it does not know. An older image cannot tell
from its own scripts what a newer revision descends from, so every migration run records the
whole history its image ships (each revision and the revisions it revises) in the
`alembic_lineage` table, in the transaction that moves `alembic_version`; an older image walks
that table down from the database's revision towards its own head.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from alembic import command, context
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import to_tuple
from sqlalchemy import MetaData, pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, async_engine_from_config, create_async_engine

LINEAGE_TABLE = "alembic_lineage"
# Two migration runs against one database (an upgrade's Job beside a previous one still
# running) take turns: the second finds the schema at head and has nothing to do.
_MIGRATE_LOCK = "SELECT pg_advisory_xact_lock(hashtext('gozon migrate'))"


def alembic_config(script_location: Path, database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(script_location: Path, database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(script_location, database_url), revision)


def downgrade(script_location: Path, database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(script_location, database_url), revision)


# --------------------------------------------------------------------------- the schema gate


class SchemaState(enum.Enum):
    AT_HEAD = "at head"
    AHEAD = "ahead"  # a later revision that descends from the image's head
    BEHIND = "behind"  # empty, or a revision the image migrates forward from
    UNRELATED = "unrelated"  # neither: another history, or a newer one with no lineage


@dataclass(frozen=True)
class SchemaCheck:
    """What a database's `alembic_version` is to one image's migrations."""

    service: str
    state: SchemaState
    heads: tuple[str, ...]  # the image's
    found: tuple[str, ...]  # the database's

    @property
    def accepted(self) -> bool:
        """The image's code runs on this schema."""
        return self.state in (SchemaState.AT_HEAD, SchemaState.AHEAD)

    def message(self) -> str:
        want, found = list(self.heads), list(self.found)
        if self.state is SchemaState.AT_HEAD:
            return f"{self.service} schema at head {want}"
        if self.state is SchemaState.AHEAD:
            return (
                f"{self.service} schema at {found}, which descends from this image's head "
                f"{want}: a newer release migrated it, and this release's code runs on it "
                "(expand/contract); nothing to migrate"
            )
        if self.state is SchemaState.BEHIND:
            return f"{self.service} schema behind: want {want}, database has {found}"
        return (
            f"{self.service} schema at {found}, which is neither this image's head {want}, "
            "nor behind it, nor recorded as descending from it: refusing to run on it (another "
            "migration history, or one migrated by an image that kept no alembic_lineage)"
        )


def _history(script: ScriptDirectory) -> dict[str, tuple[str, ...]]:
    """Each revision the image ships → the revisions it revises."""
    return {
        rev.revision: to_tuple(rev.down_revision, default=()) for rev in script.walk_revisions()
    }


def judge(
    service: str,
    script: ScriptDirectory,
    found: Collection[str],
    lineage: Mapping[str, Collection[str]],
) -> SchemaCheck:
    """The rule of the module docstring, on values: the image's scripts, the database's
    revisions and the lineage the database has recorded."""
    history = _history(script)
    heads = tuple(sorted(script.get_heads()))
    revisions = tuple(sorted(found))

    def verdict(state: SchemaState) -> SchemaCheck:
        return SchemaCheck(service, state, heads, revisions)

    if set(revisions) == set(heads):
        return verdict(SchemaState.AT_HEAD)
    if set(revisions) <= history.keys():
        return verdict(SchemaState.BEHIND)
    graph: dict[str, Collection[str]] = {**lineage, **history}
    below: set[str] = set()
    todo = list(revisions)
    while todo:
        revision = todo.pop()
        if revision not in below:
            below.add(revision)
            todo.extend(graph.get(revision, ()))
    return verdict(SchemaState.AHEAD if set(heads) <= below else SchemaState.UNRELATED)


async def read_schema(
    connection: AsyncConnection,
) -> tuple[set[str], dict[str, tuple[str, ...]]]:
    """The database's revisions and its recorded lineage (both empty before any migration)."""
    tables = set(
        (
            await connection.execute(
                text(
                    "SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = current_schema() AND table_name = ANY(:names)"
                ),
                {"names": ["alembic_version", LINEAGE_TABLE]},
            )
        ).scalars()
    )
    found: set[str] = set()
    lineage: dict[str, tuple[str, ...]] = {}
    if "alembic_version" in tables:
        rows = await connection.execute(text("SELECT version_num FROM alembic_version"))
        found = set(rows.scalars())
    if LINEAGE_TABLE in tables:
        rows = await connection.execute(
            text(f"SELECT revision, down_revisions FROM {LINEAGE_TABLE}")  # noqa: S608
        )
        lineage = {revision: tuple(down) for revision, down in rows.tuples()}
    return found, lineage


async def check_schema(service: str, script_location: Path, database_url: str) -> SchemaCheck:
    """Reads the database and judges it against the scripts at `script_location`; raises the
    driver's error when the database does not answer."""
    engine = create_async_engine(database_url, poolclass=pool.NullPool, connect_args={"timeout": 5})
    try:
        async with engine.connect() as connection:
            found, lineage = await read_schema(connection)
    finally:
        await engine.dispose()
    return judge(service, ScriptDirectory(str(script_location)), found, lineage)


def migrate(service: str, script_location: Path, database_url: str) -> SchemaCheck:
    """`gozon <service> migrate`: upgrades an empty or older schema to the image's head (and
    records the lineage, also when already at head); leaves a newer descendant alone. Returns
    the outcome; the caller says it and exits 0 unless the schema is `UNRELATED`."""
    before = asyncio.run(check_schema(service, script_location, database_url))
    if before.state in (SchemaState.AHEAD, SchemaState.UNRELATED):
        return before
    upgrade(script_location, database_url)
    return asyncio.run(check_schema(service, script_location, database_url))


# --------------------------------------------------------------------------- env.py


def _record_lineage(connection: Connection, script: ScriptDirectory) -> None:
    connection.execute(
        text(
            f"CREATE TABLE IF NOT EXISTS {LINEAGE_TABLE} ("
            "revision varchar(64) PRIMARY KEY, down_revisions varchar(64)[] NOT NULL, "
            "recorded_at timestamptz NOT NULL DEFAULT now())"
        )
    )
    connection.execute(
        text(
            f"INSERT INTO {LINEAGE_TABLE} (revision, down_revisions) "  # noqa: S608
            "VALUES (:revision, :down) ON CONFLICT (revision) DO NOTHING"
        ),
        [{"revision": rev, "down": list(down)} for rev, down in _history(script).items()],
    )


def _not_lineage(name: str | None, type_: str, _parent: object) -> bool:
    """Autogenerate's filter: the lineage table is alembic's bookkeeping, not the models'."""
    return not (type_ == "table" and name == LINEAGE_TABLE)


def _run(connection: Connection, metadata: MetaData) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        compare_type=True,
        include_name=_not_lineage,
    )
    with context.begin_transaction():
        connection.execute(text(_MIGRATE_LOCK))
        context.run_migrations()
        _record_lineage(connection, context.script)


async def _run_async(metadata: MetaData) -> None:
    engine = async_engine_from_config(
        context.config.get_section(context.config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    async with engine.connect() as connection:
        await connection.run_sync(_run, metadata)
    await engine.dispose()


def run_env(metadata: MetaData) -> None:
    """The body of a service's env.py (online mode only: migrations run against a database)."""
    if context.is_offline_mode():
        raise SystemExit("offline migrations are not supported; run against a database")
    asyncio.run(_run_async(metadata))
