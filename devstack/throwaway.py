"""Throwaway servers, for the tests and the benches: free ports, a temporary folder.

    with workdir("gozon-bench-") as work, throwaway_postgres(work / "pg", ("bench",)) as pg:
        url = pg.url("bench", driver="postgresql")

Each context manager stops or removes what it made on the way out, whatever happened. The
servers are the ones `make up` runs (`Postgres`, `Kafka`), set for speed over durability
(PostgreSQL without fsync), on ports picked by port_for (a development dependency: imported
when a port is picked). A whole platform on a throwaway stack is `stack_env`'s variables given
to `StackConfig.from_env` (`bench.capacity` does so).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from devstack.kafka import Kafka
from devstack.platform import StackConfig
from devstack.postgres import DATABASES, Postgres
from gozon.processes import PROCESSES, Process


def free_ports(count: int, exclude: Sequence[int] = ()) -> list[int]:
    """`count` distinct loopback ports that nothing listens on, outside the ephemeral range."""
    import port_for

    ports: list[int] = []
    while len(ports) < count:
        port = port_for.select_random(exclude_ports=[*exclude, *ports])
        if port not in ports:
            ports.append(port)
    return ports


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
def throwaway_postgres(folder: Path, databases: Sequence[str] = DATABASES) -> Iterator[Postgres]:
    """A PostgreSQL without fsync in `folder`, on a free port, with `databases` (empty)."""
    server = Postgres(folder, free_ports(1)[0], durable=False, databases=databases)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def throwaway_kafka(
    folder: Path,
    *,
    heap: str = "512m",
    scram_users: Mapping[str, str] | None = None,
    tls_keystore: Path | None = None,
) -> Iterator[Kafka]:
    """A Kafka node in `folder` on free ports, its jars from `make up`'s cache.

    With `scram_users` (name → password) it also has a SASL SCRAM-SHA-512 listener
    (`sasl_bootstrap`) with ACLs enforced, as the chart's Strimzi Kafka has (`Kafka.allow`);
    with `tls_keystore` too (PEM: a PKCS#8 key, then its certificate chain) that listener is
    TLS (SASL_SSL)."""
    port, controller, sasl = free_ports(3)
    server = Kafka(
        folder,
        port,
        controller,
        cache_dir=StackConfig.from_env().cache_dir,
        heap=heap,
        sasl_port=sasl if scram_users else None,
        scram_users=dict(scram_users or {}),
        sasl_tls_keystore=tls_keystore,
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


def stack_env(data_dir: Path, processes: Sequence[Process] = PROCESSES) -> dict[str, str]:
    """The GOZON_* variables of a whole stack in `data_dir` on free ports: PostgreSQL, Kafka
    and every port of every process. Kafka's jars come from `make up`'s cache."""
    ports = iter(free_ports(3 + sum(len(p.ports) for p in processes)))
    env = {
        "GOZON_DATA_DIR": str(data_dir),
        "GOZON_CACHE_DIR": str(StackConfig.from_env().cache_dir),
        "GOZON_PG_PORT": str(next(ports)),
        "GOZON_KAFKA_PORT": str(next(ports)),
        "GOZON_KAFKA_CONTROLLER_PORT": str(next(ports)),
    }
    for process in processes:
        for setting in process.ports:
            env[setting] = str(next(ports))
    return env
