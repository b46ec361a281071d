"""Session fixtures: a real PostgreSQL and a real Kafka of the test session's own.

Each starts once per session, on free ports, in a throwaway folder, through the same launcher
as `make up` (scripts/stack.py), and stops at the end. A test run never touches the `make up`
stack. Fixtures start lazily: a unit-test run starts no server.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import port_for
import pytest

from scripts.stack import Kafka, Postgres, StackConfig


@pytest.fixture(scope="session")
def servers_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gozon-test-"))
    # PostgreSQL runs as the postgres user when the session runs as root: it must reach in.
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres(servers_dir: Path) -> Iterator[Postgres]:
    server = Postgres(servers_dir / "postgres", port_for.select_random(), durable=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kafka(servers_dir: Path) -> Iterator[Kafka]:
    port = port_for.select_random()
    server = Kafka(
        servers_dir / "kafka",
        port=port,
        controller_port=port_for.select_random(exclude_ports=[port]),
        cache_dir=StackConfig.from_env().cache_dir,
        heap="512m",
    )
    server.start()
    yield server
    server.stop()
