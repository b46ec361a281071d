"""PostgreSQL: one cluster in a data folder of ours, on 127.0.0.1, with the platform's databases.

The server binaries are Debian's (15 or newer; the `postgresql` package is installed only where
none is found). Run as root, the cluster runs as the `postgres` user, as PostgreSQL requires.
`start` creates the cluster once and is idempotent: a cluster of ours already running is
reused (and its databases created if missing). `stop` stops only a cluster of ours.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from devstack.apt import apt_install
from devstack.system import (
    StackError,
    cmdline,
    log_tail,
    pid_alive,
    require_free_port,
    run,
    wait_until,
)

DATABASES = ("order_db", "account_db")


def postgres_bin_dir() -> Path | None:
    """The newest Debian PostgreSQL (15 or newer) server binaries on this machine, if any."""
    found: list[tuple[int, Path]] = []
    for pg_ctl in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"):
        with contextlib.suppress(ValueError):
            major = int(pg_ctl.parent.parent.name)
            if major >= 15:
                found.append((major, pg_ctl.parent))
    return max(found)[1] if found else None


@dataclass
class Postgres:
    """One PostgreSQL cluster in `data_dir`, listening on 127.0.0.1:`port`.

    `durable=False` turns fsync off: for the test session's throwaway clusters only.
    """

    data_dir: Path
    port: int
    password: str = "postgres"  # noqa: S105 (a loopback-only development cluster)
    user: str = "postgres"
    durable: bool = True
    databases: Sequence[str] = DATABASES
    start_timeout: float = 60.0

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def log(self) -> Path:
        return self.data_dir / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        return self.data_dir / "run"

    def url(self, database: str, driver: str = "postgresql+asyncpg") -> str:
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    # -- install

    def install(self) -> Path:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            apt_install("postgresql", why="no PostgreSQL 15+ server binaries were found")
            bin_dir = postgres_bin_dir()
            if bin_dir is None:
                raise StackError("installed Debian's postgresql, but found no server binaries")
        return bin_dir

    # -- running as an unprivileged user: PostgreSQL refuses to run as root

    def _as_owner(self, cmd: Sequence[str]) -> list[str]:
        if os.geteuid() != 0:
            return list(cmd)
        _ensure_postgres_user()
        return ["runuser", "-u", "postgres", "--", *cmd]

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, "postgres", "postgres")
            for child in path.rglob("*"):
                shutil.chown(child, "postgres", "postgres")

    # -- lifecycle

    def running_pid(self) -> int | None:
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
            pid = int(lines[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid_alive(pid) and "postgres" in cmdline(pid) else None

    def running_port(self) -> int | None:
        try:
            return int((self.pgdata / "postmaster.pid").read_text().splitlines()[3])
        except (OSError, ValueError, IndexError):
            return None

    def is_ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
        except OSError:
            return False
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            return False
        done = subprocess.run(
            [str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
            check=False,
        )
        return done.returncode == 0

    def start(self) -> bool:
        """Starts the cluster (creating it first if needed); False when it already ran."""
        bin_dir = self.install()
        if self.running_pid() is not None:
            running = self.running_port()
            if running != self.port:
                raise StackError(
                    f"our PostgreSQL in {self.pgdata} already runs on port {running}, not "
                    f"{self.port}: run `make down` first to change its port"
                )
            wait_until(self.is_ready, timeout=self.start_timeout, what="PostgreSQL", log=self.log)
            self._create_databases(bin_dir)
            return False
        require_free_port(self.port, "PostgreSQL")
        self._init(bin_dir)
        options = [
            f"-p {self.port}",
            "-c listen_addresses=127.0.0.1",
            f"-k {self.socket_dir}",
            "-c max_connections=200",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        run(
            self._as_owner(
                [
                    str(bin_dir / "pg_ctl"),
                    "-D",
                    str(self.pgdata),
                    "-l",
                    str(self.log),
                    "-o",
                    " ".join(options),
                    "-w",
                    "-t",
                    str(int(self.start_timeout)),
                    "start",
                ]
            ),
            what=f"starting PostgreSQL on port {self.port}{log_tail(self.log)}",
        )
        wait_until(
            self.is_ready,
            timeout=self.start_timeout,
            what="PostgreSQL",
            log=self.log,
            alive=lambda: self.running_pid() is not None,
        )
        self._create_databases(bin_dir)
        return True

    def _init(self, bin_dir: Path) -> None:
        if (self.pgdata / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        pwfile = self.data_dir / ".pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        self.log.touch()
        self._chown(self.data_dir)
        try:
            run(
                self._as_owner(
                    [
                        str(bin_dir / "initdb"),
                        "-D",
                        str(self.pgdata),
                        "-U",
                        self.user,
                        f"--pwfile={pwfile}",
                        "--auth-local=trust",
                        "--auth-host=scram-sha-256",
                        "-E",
                        "UTF8",
                        "--no-locale",
                        "--no-sync",
                    ]
                ),
                what="initdb",
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def _create_databases(self, bin_dir: Path) -> None:
        env = {**os.environ, "PGPASSWORD": self.password}
        psql = [
            str(bin_dir / "psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            self.user,
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-tAc",
        ]
        existing = set(
            run([*psql, "SELECT datname FROM pg_database"], what="psql", env=env).split()
        )
        for name in self.databases:
            if name not in existing:
                run([*psql, f'CREATE DATABASE "{name}"'], what=f"creating {name}", env=env)

    def stop(self) -> bool:
        if self.running_pid() is None:
            return False
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise StackError("PostgreSQL runs but its pg_ctl is gone")
        run(
            self._as_owner(
                [
                    str(bin_dir / "pg_ctl"),
                    "-D",
                    str(self.pgdata),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    "60",
                    "stop",
                ]
            ),
            what="stopping PostgreSQL",
        )
        return True


def _ensure_postgres_user() -> None:
    with contextlib.suppress(KeyError):
        import pwd

        pwd.getpwnam("postgres")
        return
    run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--home-dir",
            "/var/lib/postgresql",
            "--shell",
            "/bin/bash",
            "postgres",
        ],
        what="creating the postgres system user",
    )
