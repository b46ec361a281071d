"""The chart's backup and restore scripts (charts/gozon/files/backup.sh, restore.sh) on a real
database, with the machine's PostgreSQL tools: what the CronJob and the restore runbook run.

A dump file that exists is whole and readable; old dumps beyond BACKUP_KEEP go; a failed dump
leaves nothing behind; a restore reads the whole archive before it changes anything, so a
truncated file is refused with the database untouched. The whole backup → lost server →
restore path with the platform running is tests/e2e/test_backup_restore.py.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import Postgres
from devstack.postgres import postgres_bin_dir
from tests.conftest import _psql
from tests.integration.test_migrations import fetch

pytestmark = pytest.mark.integration

FILES = Path(__file__).resolve().parents[2] / "charts" / "gozon" / "files"


@pytest.fixture
def db(postgres: Postgres) -> Iterator[str]:
    _psql(postgres, 'DROP DATABASE IF EXISTS "backup_scripts" WITH (FORCE)')
    _psql(postgres, 'CREATE DATABASE "backup_scripts"')
    url = postgres.url("backup_scripts")
    fetch(url, "CREATE TABLE orders (id int PRIMARY KEY, note text)")
    fetch(url, "INSERT INTO orders SELECT n, 'order ' || n FROM generate_series(1, 500) n")
    yield url
    _psql(postgres, 'DROP DATABASE IF EXISTS "backup_scripts" WITH (FORCE)')


def env(postgres: Postgres, **extra: str) -> dict[str, str]:
    bin_dir = postgres_bin_dir()
    assert bin_dir is not None
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PGHOST": "127.0.0.1",
        "PGPORT": str(postgres.port),
        "PGUSER": postgres.user,
        "PGPASSWORD": postgres.password,
        "PGDATABASE": "backup_scripts",
        **extra,
    }


def sh(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(FILES / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_keeps_the_newest_dumps_and_only_whole_ones(
    postgres: Postgres, db: str, tmp_path: Path
) -> None:
    for _ in range(3):
        done = sh("backup.sh", env=env(postgres, BACKUP_DIR=str(tmp_path), BACKUP_KEEP="2"))
        assert done.returncode == 0, done.stderr
        time.sleep(1.1)  # the file names are to the second
    assert "removed" in done.stdout
    names = sorted(p.name for p in (tmp_path / "backup_scripts").iterdir())
    assert len(names) == 2, names
    assert all(name.startswith("backup_scripts-") and name.endswith("Z.dump") for name in names)


def test_a_failed_dump_leaves_nothing(postgres: Postgres, db: str, tmp_path: Path) -> None:
    bad = env(postgres, BACKUP_DIR=str(tmp_path), PGPASSWORD="wrong")
    done = sh("backup.sh", env=bad)
    assert done.returncode != 0
    assert "password authentication failed" in done.stderr
    assert list((tmp_path / "backup_scripts").iterdir()) == []


def test_restore_replaces_the_contents_and_refuses_a_truncated_dump(
    postgres: Postgres, db: str, tmp_path: Path
) -> None:
    assert sh("backup.sh", env=env(postgres, BACKUP_DIR=str(tmp_path))).returncode == 0
    (dump,) = (tmp_path / "backup_scripts").iterdir()
    fetch(db, "DELETE FROM orders WHERE id > 100")

    truncated = tmp_path / "truncated.dump"
    truncated.write_bytes(dump.read_bytes()[: dump.stat().st_size // 2])
    refused = sh("restore.sh", str(truncated), env=env(postgres))
    assert refused.returncode != 0
    assert fetch(db, "SELECT count(*) FROM orders") == [(100,)]  # untouched

    done = sh("restore.sh", str(dump), env=env(postgres))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"restore: {dump} -> backup_scripts"
    assert fetch(db, "SELECT count(*), max(note) FROM orders") == [(500, "order 99")]


def test_restore_needs_a_dump_file(postgres: Postgres) -> None:
    done = sh("restore.sh", "/nonexistent.dump", env=env(postgres))
    assert done.returncode == 2
    assert done.stderr.startswith("usage: restore.sh <dump file>")
