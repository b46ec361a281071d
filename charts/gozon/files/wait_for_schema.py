"""Init container of the gozon chart: waits until a service's database schema suits the image.

`gozon <service> migrate` (a hook Job, or with bundled PostgreSQL an ordinary Job of the
release) upgrades the schema; a process that started before it finished would fail on a
missing table or column. This reads the database's `alembic_version` and judges it against the
migrations shipped in the same image (`gozon.core.migrations.check_schema`), prints what it
sees whenever that changes, and

- exits 0 once the schema is at the image's head, or at a later revision that descends from
  it (a newer release migrated it: migrations are expand/contract, so this release's code runs
  on it; a rollback's pods start at once);
- keeps waiting while the schema is empty or behind (the migration has not run yet);
- exits 1 with the reason when the schema is unrelated to the image's history (another
  history, or a newer one that recorded no lineage): the kubelet restarts the container, so
  the pod shows Init:CrashLoopBackOff with that line in its log instead of waiting silently.

It never migrates anything itself. With `--database-only` it waits only until the database
answers (the migration Job's own init container, while a bundled database starts).

Usage: python3 wait_for_schema.py [--database-only] orders|payments
       (reads GOZON_<SERVICE>_DATABASE_URL)
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

import gozon
from gozon.core.migrations import SchemaCheck, SchemaState, check_schema


def why(error: BaseException) -> str:
    """The driver's own error (SQLAlchemy wraps asyncpg's) with its message."""
    cause = getattr(error, "orig", None) or error
    cause = cause.__cause__ or cause
    return f"{type(cause).__name__}: {cause}"


async def current(service: str, url: str) -> SchemaCheck | str:
    """The schema judged against the image, or why the database could not be read."""
    try:
        return await check_schema(
            service, Path(gozon.__file__).parent / service / "migrations", url
        )
    except (OSError, SQLAlchemyError, TimeoutError) as error:
        return f"database not reachable ({why(error)})"


async def wait(service: str, database_only: bool) -> int:
    url = os.environ[f"GOZON_{service.upper()}_DATABASE_URL"]
    last: object = None
    while True:
        seen = await current(service, url)
        if isinstance(seen, SchemaCheck):
            if database_only:
                print(f"{service} database answers", flush=True)
                return 0
            if seen.accepted:
                print(seen.message(), flush=True)
                return 0
            if seen.state is SchemaState.UNRELATED:
                print(seen.message(), flush=True)
                return 1
            line = (
                f"waiting for the {service} migration: want {list(seen.heads)}, "
                f"database has {list(seen.found)}"
            )
        else:
            line = seen
        if line != last:
            print(line if line.startswith("waiting") else f"waiting: {line}", flush=True)
            last = line
        await asyncio.sleep(2)


if __name__ == "__main__":
    args = sys.argv[1:]
    database_only = "--database-only" in args
    services = [arg for arg in args if arg != "--database-only"]
    if len(services) != 1 or services[0] not in ("orders", "payments"):
        sys.exit("usage: wait_for_schema.py [--database-only] orders|payments")
    sys.exit(asyncio.run(wait(services[0], database_only)))
