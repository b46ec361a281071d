"""Init container of the gozon chart: waits until a service's database schema is at head.

`gozon <service> migrate` (a hook Job, or with bundled PostgreSQL an ordinary Job of the
release) upgrades the schema; a process that started before it finished would fail on a
missing table or column. This compares the database's `alembic_version` with the heads of the
migrations shipped in the same image, prints what it sees whenever that changes, and exits 0
once they are equal. It never migrates anything itself.

With `--database-only` it waits only until the database answers (the migration Job's own init
container, while a bundled database starts).

Usage: python3 wait_for_schema.py [--database-only] orders|payments
       (reads GOZON_<SERVICE>_DATABASE_URL)
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import asyncpg
from alembic.config import Config
from alembic.script import ScriptDirectory

import gozon


def heads(service: str) -> set[str]:
    config = Config()
    migrations = Path(gozon.__file__).parent / service / "migrations"
    config.set_main_option("script_location", str(migrations))
    return set(ScriptDirectory.from_config(config).get_heads())


def dsn(url: str) -> str:
    """SQLAlchemy's URL to asyncpg's (`ssl=` is SQLAlchemy's spelling of libpq's `sslmode=`)."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1).replace("ssl=", "sslmode=")


async def current(url: str) -> set[str] | str:
    """The database's revisions, or why they could not be read."""
    try:
        connection = await asyncpg.connect(dsn(url), timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as error:
        return f"database not reachable ({type(error).__name__}: {error})"
    try:
        rows = await connection.fetch("SELECT version_num FROM alembic_version")
    except asyncpg.UndefinedTableError:
        return set()
    finally:
        await connection.close()
    return {row["version_num"] for row in rows}


async def wait(service: str, database_only: bool) -> None:
    url = os.environ[f"GOZON_{service.upper()}_DATABASE_URL"]
    wanted = heads(service)
    last: object = None
    while True:
        seen = await current(url)
        if database_only and not isinstance(seen, str):
            print(f"{service} database answers", flush=True)
            return
        if seen == wanted:
            print(f"{service} schema at head {sorted(wanted)}", flush=True)
            return
        if seen != last:
            print(
                f"waiting for the {service} migration: want {sorted(wanted)}, "
                f"database has {seen if isinstance(seen, str) else sorted(seen)}",
                flush=True,
            )
            last = seen
        await asyncio.sleep(2)


if __name__ == "__main__":
    args = sys.argv[1:]
    database_only = "--database-only" in args
    services = [arg for arg in args if arg != "--database-only"]
    if len(services) != 1 or services[0] not in ("orders", "payments"):
        sys.exit("usage: wait_for_schema.py [--database-only] orders|payments")
    asyncio.run(wait(services[0], database_only))
