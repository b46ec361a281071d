"""Throwaway servers for the benches: a temporary folder and a PostgreSQL on a free port.

    with workdir("gozon-bench-loop-") as work, postgres(work, "bench") as pg:
        url = pg.url("bench", driver="postgresql")

Both remove what they made on the way out, whatever happened. The whole platform (Kafka, the
seven processes under supervisord) is `bench.capacity`'s `start_stack`.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import port_for

from scripts.stack import Postgres

SERVICES = Path(__file__).resolve().parent.parent / "services" / "gozon"
ORDERS_MIGRATIONS = SERVICES / "orders" / "migrations"


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A temporary folder other users can read (PostgreSQL may run as another user)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    work.chmod(0o755)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def postgres(
    work: Path, *databases: str, migrations: Mapping[str, Path] | None = None
) -> Iterator[Postgres]:
    """A PostgreSQL without fsync in `work`/pg with `databases`, each migrated from its folder."""
    pg = Postgres(work / "pg", port_for.select_random(), durable=False, databases=databases)
    try:
        pg.start()
        if migrations:
            from gozon.core.migrations import upgrade

            for database, folder in migrations.items():
                upgrade(folder, pg.url(database))
        yield pg
    finally:
        pg.stop()
