"""The local stack: real PostgreSQL and Apache Kafka, and the platform's processes.

This module is the one launcher behind `make up / down / status / logs`, and the test session's
fixtures import its `Postgres` and `Kafka` classes to start throwaway servers of their own.

What it guarantees:
- Installing is idempotent: PostgreSQL's server binaries come from Debian's packages (installed
  only where none are found), Kafka's jars are resolved once by Maven into the cache folder and
  reused after that (a second `make up` downloads nothing).
- Starting is idempotent: a server of ours that already runs is reused. A start waits for
  readiness against a deadline and fails with a message that names the cause (a port taken by
  another program, Java missing, a download that failed, the tail of the server's log).
- Stopping stops what we started, found by the pid file in our data folder and checked against
  the process's command line, and nothing else.

Only the standard library is imported at module level, so `make down` and `make status` work
before the virtualenv exists; the Kafka readiness probe imports aiokafka when it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import http.client
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import xmlrpc.client
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "services") not in sys.path:  # `make down` may run before the virtualenv exists
    sys.path.append(str(ROOT / "services"))
from gozon.processes import (  # noqa: E402 (the process table: standard library only)
    MIGRATIONS,
    PROCESSES,
    Process,
)

KAFKA_POM = ROOT / "scripts" / "kafka" / "pom.xml"
DEFAULT_KAFKA_VERSION = "4.4.0"
DATABASES = ("order_db", "account_db")


class StackError(RuntimeError):
    """A failure a person can act on; the message names the cause."""


# --------------------------------------------------------------------------- helpers


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on the port (a TIME_WAIT leftover does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def require_free_port(port: int, what: str) -> None:
    if not port_is_free(port):
        raise StackError(
            f"port {port} is taken by another program, so {what} cannot listen on it; "
            f"stop that program or choose another port (see README: changing ports)"
        )


def wait_until(
    ready: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    alive: Callable[[], bool] = lambda: True,
    failed: Callable[[], str | None] = lambda: None,
    log: Path | None = None,
) -> None:
    """Polls `ready` until it is true; fails fast when `alive` turns false or `failed` names a
    failure (its message is used), or at the deadline."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        if ready():
            return
        if not alive():
            raise StackError(f"{what} exited while starting{_log_tail(log)}")
        failure = failed()
        if failure is not None:
            raise StackError(f"{failure}{_log_tail(log)}")
        if time.monotonic() > deadline:
            raise StackError(f"{what} was not ready after {timeout:.0f} s{_log_tail(log)}")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def _log_tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    return f"; the last lines of {log}:\n  " + "\n  ".join(tail)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not running.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass
class PidFile:
    """A process we started: its pid, recorded with a marker that must be on its command line.

    The marker (a path inside our data folder) makes a recycled pid harmless: a process whose
    command line lacks it is not ours and is never signalled.
    """

    path: Path
    marker: str
    _child: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def spawn(
        self,
        cmd: Sequence[str],
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Starts a detached process (own session), output appended to `log`, pid recorded."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self._child = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        self.write(self._child.pid)
        return self._child

    def pid(self) -> int | None:
        try:
            pid = int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None
        if self._child is not None and self._child.pid == pid:
            # Our own unreaped child: its pid cannot have been recycled. (Just after exec its
            # /proc cmdline can still read empty, so the marker test would call it gone.)
            return pid if self._child.poll() is None else None
        if _pid_alive(pid) and self.marker in _cmdline(pid):
            return pid
        return None

    def running(self, pid: int) -> bool:
        """Whether `pid`, found ours by `pid()` earlier, still runs. The command line is not
        read again: a read that comes back empty (it can, for a live process) would call a
        running process gone; a pid recycled within the seconds of a start is not a risk."""
        if self._child is not None and self._child.pid == pid:
            return self._child.poll() is None
        return _pid_alive(pid)

    def write(self, pid: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"{pid}\n")

    def stop(self, *, timeout: float, group: bool = False) -> bool:
        """SIGTERM, then SIGKILL after `timeout`; True if something of ours was running."""
        pid = self.pid()
        if pid is None:
            self.path.unlink(missing_ok=True)
            if self._child is not None:
                # Our own child, yet its pid file is gone: stop it all the same (never wait on
                # a live child), then reap it; one that died on its own is only reaped.
                running = self._child.poll() is None
                if running:
                    self._child.kill()
                self._child.wait()
                self._child = None
                return running
            return False
        kill = os.killpg if group else os.kill
        with contextlib.suppress(ProcessLookupError):
            kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                kill(pid, signal.SIGKILL)
            while _pid_alive(pid):
                time.sleep(0.05)
        if group:
            # Children that outlived their parent still carry its process group id.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self.path.unlink(missing_ok=True)
        if self._child is not None:  # we are its parent (a test session): reap it
            self._child.wait()
            self._child = None
        return True


def _run(
    cmd: Sequence[str], *, what: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> str:
    try:
        done = subprocess.run(
            list(cmd),
            capture_output=True,
            text=True,
            env=dict(env) if env else None,
            cwd=cwd,
            check=False,
        )
    except FileNotFoundError as exc:
        raise StackError(f"{what} failed: {cmd[0]} is not installed") from exc
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip().splitlines()[-20:]
        raise StackError(f"{what} failed (exit {done.returncode}):\n  " + "\n  ".join(output))
    return done.stdout


def _apt_install(*packages: str, why: str) -> None:
    if os.geteuid() != 0:
        raise StackError(f"{why}; install the Debian packages {' '.join(packages)} (needs root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"installing {' '.join(packages)} from Debian's packages ({why})", file=sys.stderr)
    # another apt-get on the machine (a second helper, unattended upgrades) is waited for
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    _run(["apt-get", *lock, "update", "-q"], what="apt-get update", env=env)
    _run(
        ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", *packages],
        what=f"apt-get install {' '.join(packages)}",
        env=env,
    )


# --------------------------------------------------------------------------- Prometheus


def prometheus_tool(name: str = "promtool") -> Path:
    """Debian's `prometheus` or `promtool` binary, installing the `prometheus` package when it
    is missing (the alert rules' unit tests and the live dashboard and alert checks use them).

    The tests run their own servers on free ports; where systemd runs, the package also
    enables a server of its own on :9090 (`systemctl disable --now prometheus` stops it).
    """
    found = shutil.which(name)
    if found is None:
        _apt_install("prometheus", why=f"{name} was not found")
        found = shutil.which(name)
        if found is None:
            raise StackError(f"installed Debian's prometheus, but found no {name}")
    return Path(found)


# --------------------------------------------------------------------------- PostgreSQL


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
            _apt_install("postgresql", why="no PostgreSQL 15+ server binaries were found")
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
        return pid if _pid_alive(pid) and "postgres" in _cmdline(pid) else None

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
        _run(
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
            what=f"starting PostgreSQL on port {self.port}{_log_tail(self.log)}",
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
            _run(
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
            _run([*psql, "SELECT datname FROM pg_database"], what="psql", env=env).split()
        )
        for name in self.databases:
            if name not in existing:
                _run([*psql, f'CREATE DATABASE "{name}"'], what=f"creating {name}", env=env)

    def stop(self) -> bool:
        if self.running_pid() is None:
            return False
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise StackError("PostgreSQL runs but its pg_ctl is gone")
        _run(
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
    _run(
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


# --------------------------------------------------------------------------- Kafka


def java_major_version(java: str = "java") -> int | None:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def kafka_jars(cache_dir: Path, version: str = DEFAULT_KAFKA_VERSION) -> Path:
    """The folder of Kafka's jars, resolved by Maven on first use and reused after that."""
    libs = cache_dir / f"kafka-{version}" / "libs"
    complete = libs.parent / ".complete"
    if complete.exists():
        return libs
    if shutil.which("mvn") is None:
        _apt_install("maven", why="Maven is needed to resolve Kafka's jars")
    staging = libs.parent / "libs.partial"
    shutil.rmtree(staging, ignore_errors=True)
    print(f"resolving Apache Kafka {version} with Maven into {libs}", file=sys.stderr)
    try:
        _run(
            [
                "mvn",
                "-q",
                "-B",
                "-f",
                str(KAFKA_POM),
                f"-Dkafka.version={version}",
                "dependency:copy-dependencies",
                f"-DoutputDirectory={staging}",
                "-DincludeScope=runtime",
            ],
            what=f"downloading Apache Kafka {version} with Maven",
        )
    except StackError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not any(staging.glob(f"kafka_2.13-{version}.jar")):
        raise StackError(f"Maven finished but kafka_2.13-{version}.jar is not in {staging}")
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    complete.write_text(f"{version}\n")
    return libs


_LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
# every client and server prints its whole configuration at INFO: keep the log readable
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
"""


# A single-node development broker on a small machine: fewer threads and fewer timers than
# Kafka's defaults, which are sized for a broker of a cluster with many clients. Each idle
# request handler and network thread wakes every 300 ms, and the controller, the broker and
# the group coordinator each run their own pool (8 request handlers each for the broker and
# the controller, 3 network threads per listener, 4 group coordinator threads): 29 threads
# polling for a handful of clients. The active controller writes a no-op record to the
# metadata log every `metadata.max.idle.interval.ms` (500 ms by default: KIP-835, so that a
# cluster's brokers can tell a live controller from a stuck one); one node in one JVM has
# nobody to tell. Measured in docs/adr/0011-development-broker.md;
# docker-compose.yml sets the same (tests/unit/test_compose.py); the Helm chart's Strimzi
# cluster keeps Kafka's defaults (docs/local-stack.md).
DEV_BROKER_CONFIG: Mapping[str, str] = {
    "num.network.threads": "1",
    "num.io.threads": "2",
    "group.coordinator.threads": "1",
    "metadata.max.idle.interval.ms": "5000",
}
# The JVM: the serial collector has no concurrent or periodic threads (G1 has its refinement,
# marking and service threads) and the cheapest write barrier; its cost is a longer pause (a
# young collection every several minutes, ~0.1 s on a starved machine, against G1's ~10 ms:
# docs/local-stack.md). `-UsePerfData` stops the 20-times-a-second sampler that feeds `jstat`
# (jcmd and JMX still work).
DEV_JVM_OPTIONS: tuple[str, ...] = ("-XX:+UseSerialGC", "-XX:-UsePerfData")


@dataclass
class Kafka:
    """One Apache Kafka 4.x node in KRaft mode (broker and controller in one JVM)."""

    data_dir: Path
    port: int
    controller_port: int
    cache_dir: Path
    version: str = DEFAULT_KAFKA_VERSION
    heap: str = "768m"
    partitions: int = 3
    start_timeout: float = 90.0
    extra_config: Mapping[str, str] = field(default_factory=dict)
    # A second listener that authenticates with SASL SCRAM-SHA-512, as the chart's Strimzi
    # Kafka does, with these users (name → password, made when the storage is formatted)
    # and ACLs enforced (StandardAuthorizer). The plaintext listener stays, its anonymous
    # principal a super user: readiness, topic creation and `allow` go through it.
    sasl_port: int | None = None
    scram_users: Mapping[str, str] = field(default_factory=dict)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        if self.sasl_port is None:
            raise StackError("this Kafka has no SASL listener")
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def config(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def log(self) -> Path:
        return self.data_dir / "kafka.log"

    def __post_init__(self) -> None:
        self.pidfile = PidFile(self.data_dir / "kafka.pid", marker=str(self.config))

    def running_pid(self) -> int | None:
        return self.pidfile.pid()

    def install(self) -> Path:
        major = java_major_version()
        if major is None:
            _apt_install("openjdk-17-jre-headless", why="Java is missing (Kafka needs 17+)")
            major = java_major_version()
        if major is None or major < 17:
            raise StackError(f"Kafka {self.version} needs Java 17 or newer; `java` is {major}")
        return kafka_jars(self.cache_dir, self.version)

    def _write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            # A static voter set: the ports can change between runs without reformatting.
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir / "data"),
            "num.partitions": str(self.partitions),
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "3",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Topics are created on purpose (by the relays and `make up`), never by a typo.
            "auto.create.topics.enable": "false",
            **DEV_BROKER_CONFIG,
            **self._sasl_config(),
            **self.extra_config,
        }
        self.config.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        (self.data_dir / "log4j2.properties").write_text(_LOG4J2)

    def _sasl_config(self) -> dict[str, str]:
        if self.sasl_port is None:
            return {}
        return {
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{self.port},SASL_PLAINTEXT://127.0.0.1:{self.sasl_port},"
                f"CONTROLLER://127.0.0.1:{self.controller_port}"
            ),
            "advertised.listeners": (
                f"PLAINTEXT://127.0.0.1:{self.port},SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}"
            ),
            "listener.security.protocol.map": (
                "PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT"
            ),
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": "User:ANONYMOUS",
            "allow.everyone.if.no.acl.found": "false",
        }

    def allow(
        self,
        user: str,
        operations: Sequence[str],
        *,
        topics: Sequence[str] = (),
        groups: Sequence[str] = (),
        prefixed: bool = False,
    ) -> None:
        """Adds ACLs allowing `user` the operations (READ, WRITE, CREATE, DESCRIBE, …) on the
        topics and groups, named or (`prefixed`) every name starting with them."""
        resources = [(_ACL_TOPIC, t) for t in topics] + [(_ACL_GROUP, g) for g in groups]
        asyncio.run(create_acls(self.bootstrap, user, operations, resources, prefixed=prefixed))

    def _java(self, libs: Path, main: str, *args: str) -> list[str]:
        return [
            "java",
            "-Xms256m",
            f"-Xmx{self.heap}",
            *DEV_JVM_OPTIONS,
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-cp",
            f"{libs}/*",
            main,
            *args,
        ]

    def _format(self, libs: Path) -> None:
        if (self.data_dir / "data" / "meta.properties").exists():
            return
        cluster_id = "-"
        while cluster_id.startswith("-"):  # as Kafka's own ids: the CLI would read it as a flag
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        _run(
            self._java(
                libs,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(self.config),
                *(
                    f"--add-scram=SCRAM-SHA-512=[name={name},password={password}]"
                    for name, password in self.scram_users.items()
                ),
            ),
            what="formatting Kafka's storage",
        )

    def is_ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
        except OSError:
            return False
        return asyncio.run(kafka_answers(self.bootstrap))

    def start(self) -> bool:
        """Starts the broker (formatting its storage once); False when it already ran."""
        libs = self.install()
        if self.running_pid() is not None:
            wait_until(self.is_ready, timeout=self.start_timeout, what="Kafka", log=self.log)
            return False
        require_free_port(self.port, "Kafka")
        require_free_port(self.controller_port, "Kafka's controller")
        if self.sasl_port is not None:
            require_free_port(self.sasl_port, "Kafka's SASL listener")
        self._write_config()
        self._format(libs)
        process = self.pidfile.spawn(
            self._java(libs, "kafka.Kafka", str(self.config)), log=self.log
        )
        try:
            wait_until(
                self.is_ready,
                timeout=self.start_timeout,
                what="Kafka",
                log=self.log,
                alive=lambda: process.poll() is None,
            )
        except StackError:
            self.stop()
            raise
        return True

    def stop(self) -> bool:
        return self.pidfile.stop(timeout=60)

    def create_topics(self, names: Sequence[str], partitions: int | None = None) -> None:
        asyncio.run(create_topics(self.bootstrap, names, partitions or self.partitions))


async def kafka_answers(bootstrap: str) -> bool:
    """True when the broker answers a metadata request with itself in the broker list."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    try:
        await asyncio.wait_for(admin.start(), timeout=3)
        cluster = await asyncio.wait_for(admin.describe_cluster(), timeout=3)
        return bool(cluster.get("brokers"))
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


# Kafka's ACL codes (org.apache.kafka.common.acl and .resource).
_ACL_TOPIC, _ACL_GROUP = 2, 3
_ACL_LITERAL, _ACL_PREFIXED, _ACL_ALLOW = 3, 4, 3
_ACL_OPERATIONS = {
    "ALL": 2,
    "READ": 3,
    "WRITE": 4,
    "CREATE": 5,
    "DELETE": 6,
    "ALTER": 7,
    "DESCRIBE": 8,
    "DESCRIBE_CONFIGS": 10,
    "ALTER_CONFIGS": 11,
}


async def create_acls(
    bootstrap: str,
    user: str,
    operations: Sequence[str],
    resources: Sequence[tuple[int, str]],
    *,
    prefixed: bool = False,
) -> None:
    """Allows `User:user` the operations on the (resource type, name) pairs: Kafka's
    CreateAcls request, v1 (aiokafka has no call for it and Kafka's own AclCommand is not
    among the broker's jars)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.protocol.api import Request, RequestStruct, Response
    from aiokafka.protocol.types import Array, Int8, Int16, Int32, Schema, String

    class CreateAclsResponseV1(Response):  # type: ignore[misc]  # aiokafka: untyped
        API_KEY = 30
        API_VERSION = 1
        SCHEMA = Schema(
            ("throttle_time_ms", Int32),
            ("results", Array(("error_code", Int16), ("error_message", String("utf-8")))),
        )

    class CreateAclsRequestV1(RequestStruct):  # type: ignore[misc]
        API_KEY = 30
        API_VERSION = 1
        RESPONSE_TYPE = CreateAclsResponseV1
        SCHEMA = Schema(
            (
                "creations",
                Array(
                    ("resource_type", Int8),
                    ("resource_name", String("utf-8")),
                    ("resource_pattern_type", Int8),
                    ("principal", String("utf-8")),
                    ("host", String("utf-8")),
                    ("operation", Int8),
                    ("permission_type", Int8),
                ),
            ),
        )

    pattern = _ACL_PREFIXED if prefixed else _ACL_LITERAL
    creations = [
        (kind, name, pattern, f"User:{user}", "*", _ACL_OPERATIONS[op.upper()], _ACL_ALLOW)
        for kind, name in resources
        for op in operations
    ]

    class CreateAcls(Request[CreateAclsRequestV1]):  # type: ignore[misc]
        API_KEY = 30

        def build(self, request_struct_class: type[CreateAclsRequestV1]) -> CreateAclsRequestV1:
            return request_struct_class(creations)

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        response = await admin._send_request(CreateAcls())
    finally:
        await admin.close()
    errors = [message or str(code) for code, message in response.results if code]
    if errors:
        raise StackError(f"Kafka refused ACLs for {user}: {'; '.join(errors)}")


async def create_topics(bootstrap: str, names: Sequence[str], partitions: int) -> None:
    """Creates the topics that are missing; existing ones are left as they are."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        missing = set(names) - set(await admin.list_topics())
        if missing:
            await admin.create_topics(
                [
                    NewTopic(name, num_partitions=partitions, replication_factor=1)
                    for name in sorted(missing)
                ]
            )
    finally:
        await admin.close()


# --------------------------------------------------------------------------- the platform


@dataclass(frozen=True)
class StackConfig:
    """Where the `make up` stack lives and which ports it takes; read from GOZON_* variables."""

    data_dir: Path
    cache_dir: Path
    pg_port: int
    pg_password: str
    kafka_port: int
    kafka_controller_port: int
    kafka_version: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> StackConfig:
        data_dir = Path(env.get("GOZON_DATA_DIR", ROOT / ".gozon")).resolve()

        def port(name: str, default: int) -> int:
            raw = env.get(name, str(default))
            if not raw.isdigit() or not 0 < int(raw) < 65536:
                raise StackError(f"{name}={raw!r} is not a port number")
            return int(raw)

        return cls(
            data_dir=data_dir,
            cache_dir=Path(env.get("GOZON_CACHE_DIR", data_dir / "cache")).resolve(),
            pg_port=port("GOZON_PG_PORT", 5432),
            pg_password=env.get("GOZON_PG_PASSWORD", "postgres"),
            kafka_port=port("GOZON_KAFKA_PORT", 9092),
            kafka_controller_port=port("GOZON_KAFKA_CONTROLLER_PORT", 9093),
            kafka_version=env.get("GOZON_KAFKA_VERSION", DEFAULT_KAFKA_VERSION),
        )

    def postgres(self) -> Postgres:
        return Postgres(self.data_dir / "postgres", self.pg_port, password=self.pg_password)

    def kafka(self) -> Kafka:
        return Kafka(
            self.data_dir / "kafka",
            self.kafka_port,
            self.kafka_controller_port,
            cache_dir=self.cache_dir,
            version=self.kafka_version,
        )

    def platform_env(self, pg: Postgres, kafka: Kafka) -> dict[str, str]:
        """The settings every platform process reads (same names as compose and the chart)."""
        orders_port = os.environ.get("GOZON_ORDERS_API_PORT", "8081")
        payments_port = os.environ.get("GOZON_PAYMENTS_API_PORT", "8082")
        return {
            "GOZON_ORDERS_DATABASE_URL": pg.url("order_db"),
            "GOZON_PAYMENTS_DATABASE_URL": pg.url("account_db"),
            "GOZON_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
            # the gateway follows the APIs wherever their ports were moved
            "GOZON_GATEWAY_ORDERS_URL": f"http://127.0.0.1:{orders_port}",
            "GOZON_GATEWAY_PAYMENTS_URL": f"http://127.0.0.1:{payments_port}",
            # supervisord restarts a crashing process at once: the workers back off themselves
            "GOZON_CRASH_STATE_DIR": str(self.data_dir / "crashes"),
        }


# --------------------------------------------------------------------------- supervision

# Every process supervisord starts carries this variable (the config's path), so that `down`
# can find, and stop, a process of ours that outlived a killed supervisord, and nothing else.
SUPERVISED_MARKER = "GOZON_SUPERVISOR_CONF"
# A process that exits sooner than this after its start counts as a failed start: it is tried
# again after 1 s, 2 s, 3 s, … (supervisord's backoff) and given up (FATAL, shown by `make
# status`) after START_RETRIES failed starts in a row, about 7 minutes. One that ran longer and
# then died is restarted at once.
START_SECS = 3
START_RETRIES = 30
STOP_WAIT_SECS = 30


def _conf_value(text: str) -> str:
    """supervisord expands `%(name)s` in values: a literal % is written %%."""
    return text.replace("%", "%%")


def supervisor_socket(data_dir: Path) -> Path:
    """The control socket; a path too long for a Unix socket moves to the temp folder."""
    path = data_dir / "supervisor.sock"
    if len(str(path)) < 100:
        return path
    digest = hashlib.sha1(str(data_dir).encode(), usedforsecurity=False).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"gozon-supervisor-{digest}.sock"


def process_log(data_dir: Path, name: str) -> Path:
    return data_dir / "logs" / f"{name}.log"


def _gozon_command(entry: Process) -> str:
    return entry.command


def supervisor_config(
    data_dir: Path,
    processes: Sequence[Process] = PROCESSES,
    *,
    command: Callable[[Process], str] = _gozon_command,
    start_retries: int = START_RETRIES,
) -> str:
    """supervisord's configuration, generated from the process table (never hand-written).

    Each process writes its output straight to its own file in the data folder (the shell
    `exec`s the process with its output redirected), so no supervisor reads and copies every
    log line through a pipe; supervisord's own log records each start, exit and restart.
    """
    logs = data_dir / "logs"
    socket_path = supervisor_socket(data_dir)
    sections: dict[str, dict[str, str]] = {
        "supervisord": {
            "logfile": str(logs / "supervisord.log"),
            "logfile_maxbytes": "10MB",
            "logfile_backups": "3",
            "loglevel": "info",
            "pidfile": str(data_dir / "supervisord.pid"),
            "nodaemon": "true",  # the launcher runs it in the background and keeps its pid
            "silent": "true",
            "directory": str(ROOT),
        },
        "unix_http_server": {"file": str(socket_path), "chmod": "0700"},
        "rpcinterface:supervisor": {
            "supervisor.rpcinterface_factory": "supervisor.rpcinterface:make_main_rpcinterface"
        },
        "supervisorctl": {"serverurl": f"unix://{socket_path}"},
    }
    for entry in processes:
        log = shlex.quote(str(process_log(data_dir, entry.name)))
        sections[f"program:{entry.name}"] = {
            "command": f"/bin/sh -c {shlex.quote(f'exec {command(entry)} >>{log} 2>&1')}",
            "directory": str(ROOT),
            # the gateway starts after its upstreams (a lower priority starts first)
            "priority": "200" if entry.kind == "gateway" else "100",
            "autostart": "true",
            "autorestart": "true",
            "startsecs": str(START_SECS),
            "startretries": str(start_retries),
            "stopsignal": "TERM",
            "stopwaitsecs": str(STOP_WAIT_SECS),
            "stopasgroup": "true",
            "killasgroup": "true",
            "redirect_stderr": "true",
            "stdout_logfile": "NONE",  # the process writes its own file (see above)
        }
    lines = ["; generated by scripts/stack.py from gozon.processes: do not edit"]
    for section, values in sections.items():
        lines += ["", f"[{section}]"]
        lines += [f"{key}={_conf_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__()
        self._path = path
        self._timeout = timeout

        self._opened: list[http.client.HTTPConnection] = []

    def make_connection(self, host: object) -> http.client.HTTPConnection:
        connection = _UnixHTTPConnection(self._path, self._timeout)
        self._opened.append(connection)
        return connection

    def close(self) -> None:
        super().close()
        while self._opened:
            self._opened.pop().close()


@dataclass(frozen=True)
class ProcessState:
    """One supervised process as supervisord reports it."""

    name: str
    state: str  # RUNNING, STARTING, BACKOFF, EXITED, FATAL, STOPPED, …
    pid: int
    uptime: float  # seconds since its last start; 0 when not running
    restarts: int  # starts since supervisord started, the first one not counted


_SPAWNED = re.compile(r"spawned: '([^']+)' with pid")
_STARTED = "supervisord started with pid"


def restart_counts(supervisor_log: Path) -> dict[str, int]:
    """Restarts per process, from supervisord's log: its spawns since its own last start."""
    if not supervisor_log.exists():
        return {}
    lines = supervisor_log.read_text(errors="replace").splitlines()
    first = max((i for i, line in enumerate(lines) if _STARTED in line), default=0)
    spawns: dict[str, int] = {}
    for line in lines[first:]:
        match = _SPAWNED.search(line)
        if match:
            spawns[match.group(1)] = spawns.get(match.group(1), 0) + 1
    return {name: count - 1 for name, count in spawns.items()}


def _health_urls(
    env: Mapping[str, str], processes: Sequence[Process] = PROCESSES
) -> dict[str, str]:
    """Each process's base URL (its API port or its side port), from the process table."""
    return {
        p.name: f"http://127.0.0.1:{env.get(p.port_setting, p.default_port)}" for p in processes
    }


def _ports(env: Mapping[str, str], processes: Sequence[Process]) -> list[tuple[str, int]]:
    """Every port the processes listen on (the gateway's side port too), named by process."""
    return [
        (p.name, int(env.get(setting, default)))
        for p in processes
        for setting, default in p.ports.items()
    ]


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 (loopback)
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _processes_marked(marker: str) -> list[int]:
    """Pids of the processes whose environment carries `SUPERVISED_MARKER=marker`."""
    needle = f"{SUPERVISED_MARKER}={marker}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
    return found


@dataclass
class Platform:
    """The platform's processes under supervisord, configured from the process table.

    A process that dies is restarted (with backoff when it keeps dying at start-up) while the
    others keep running. Each process logs to `logs/<name>.log` in the data folder.

    `processes`, `command` and `start_retries` are the process table, how a process is run
    and how many failed starts in a row supervisord allows; tests change them.
    """

    config: StackConfig
    processes: Sequence[Process] = PROCESSES
    command: Callable[[Process], str] = _gozon_command
    start_retries: int = START_RETRIES

    def __post_init__(self) -> None:
        self.conf = self.config.data_dir / "supervisord.conf"
        self.pidfile = PidFile(self.config.data_dir / "platform.pid", marker=str(self.conf))

    @property
    def logs(self) -> Path:
        return self.config.data_dir / "logs"

    @property
    def log(self) -> Path:
        """supervisord's own log: every start, exit and restart of every process."""
        return self.logs / "supervisord.log"

    @contextlib.contextmanager
    def rpc(self, timeout: float = 5.0) -> Iterator[Any]:
        """supervisord's XML-RPC interface (`supervisor.*`) over its Unix socket."""
        transport = _UnixTransport(supervisor_socket(self.config.data_dir), timeout)
        with xmlrpc.client.ServerProxy("http://localhost", transport=transport) as proxy:
            yield proxy.supervisor

    def states(self) -> dict[str, ProcessState]:
        """What supervisord reports for each process; empty when it does not run."""
        if self.pidfile.pid() is None:
            return {}
        try:
            with self.rpc() as supervisor:
                infos = supervisor.getAllProcessInfo()
        except (OSError, xmlrpc.client.Error, http.client.HTTPException):
            return {}
        restarts = restart_counts(self.log)
        return {
            info["name"]: ProcessState(
                name=info["name"],
                state=info["statename"],
                pid=int(info["pid"]),
                uptime=float(info["now"] - info["start"]) if info["pid"] else 0.0,
                restarts=restarts.get(info["name"], 0),
            )
            for info in infos
        }

    def start(self, env: Mapping[str, str], timeout: float = 90) -> dict[str, str]:
        """Starts supervisord (or reuses the one running) and waits until every process is
        ready; answers each process's base URL.

        A process counts as failed only when it really is: supervisord gave up on it (FATAL,
        after `start_retries` failed starts in a row), or supervisord itself exited. A process
        that exits during its start is restarted by supervisord and simply waited for, and a
        process that is slow to answer is waited for until `timeout`. supervisord's liveness
        is its pid (our child, or the pid file's process found ours once), never a new read
        of its command line, which can come back empty for a live process.
        """
        urls = _health_urls({**os.environ, **env}, self.processes)
        pid = self.pidfile.pid()
        if pid is None:
            for name, port in _ports({**os.environ, **env}, self.processes):
                require_free_port(port, name)
            self.logs.mkdir(parents=True, exist_ok=True)
            self.conf.write_text(
                supervisor_config(
                    self.config.data_dir,
                    self.processes,
                    command=self.command,
                    start_retries=self.start_retries,
                )
            )
            supervisord = Path(sys.executable).with_name("supervisord")
            self.pidfile.spawn(
                [str(supervisord), "-c", str(self.conf)],
                log=self.logs / "supervisord.out",
                env={
                    **os.environ,
                    **env,
                    "PYTHONUNBUFFERED": "1",
                    SUPERVISED_MARKER: str(self.conf),
                    # the table's `gozon …` is the one installed beside this interpreter
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                },
                cwd=ROOT,
            )
            pid = self.pidfile.pid()  # our child: its pid, unless it has exited already
            if pid is None:
                raise StackError(
                    f"supervisord exited at once{_log_tail(self.logs / 'supervisord.out')}"
                )
        else:
            self._restart_given_up()
        for name, url in urls.items():
            wait_until(
                partial(_http_ok, f"{url}/health/ready"),
                timeout=timeout,
                what=f"the {name} process",
                failed=partial(self._start_failure, pid, name),
                log=process_log(self.config.data_dir, name),
            )
        return urls

    def _start_failure(self, supervisord: int, name: str) -> str | None:
        """Why process `name` will not come up, or None while it still may."""
        if not self.pidfile.running(supervisord):
            return f"supervisord exited while the {name} process was starting (see {self.log})"
        state = self.states().get(name)
        if state is not None and state.state == "FATAL":
            return (
                f"the {name} process kept exiting at start-up: supervisord gave up after "
                f"{self.start_retries} tries (FATAL; `make status`)"
            )
        return None

    def _restart_given_up(self) -> None:
        """A second `make up` starts again what supervisord gave up on (after a fix, say)."""
        for name, state in self.states().items():
            if state.state == "FATAL":
                with contextlib.suppress(OSError, xmlrpc.client.Error), self.rpc() as supervisor:
                    supervisor.startProcess(name, False)

    def stop(self) -> bool:
        """Stops supervisord (which stops its processes), then any process of ours it left."""
        stopped = self.pidfile.stop(timeout=STOP_WAIT_SECS + 30)
        for pid in _processes_marked(str(self.conf)):
            stopped = True
            _terminate(pid, timeout=STOP_WAIT_SECS)
        return stopped


def _terminate(pid: int, *, timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout`."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _migrate_and_create_topics(env: Mapping[str, str], kafka: Kafka) -> None:
    gozon = Path(sys.executable).with_name("gozon")
    full_env = {**os.environ, **env}
    for migration in MIGRATIONS:
        _run([str(gozon), *migration.args], what=migration.name, env=full_env)
    from_topics = [
        "order.created.event",
        "order.created.event.dlq",
        "payment.processed.event",
        "payment.processed.event.dlq",
    ]
    kafka.create_topics(from_topics)


def up(config: StackConfig) -> None:
    pg, kafka = config.postgres(), config.kafka()
    started = pg.start()
    print(
        f"PostgreSQL  {'started' if started else 'already running'} on 127.0.0.1:{pg.port} "
        f"(databases: {', '.join(pg.databases)})"
    )
    started = kafka.start()
    print(
        f"Kafka {kafka.version} {'started' if started else 'already running'} on {kafka.bootstrap}"
    )
    env = config.platform_env(pg, kafka)
    _migrate_and_create_topics(env, kafka)
    urls = Platform(config).start(env)
    for name, url in urls.items():
        print(f"{name:<18} {url}")
    print(f"logs: {config.data_dir / 'logs'} and {pg.log}, {kafka.log}  (make logs)")


def down(config: StackConfig) -> None:
    for what, stop in (
        ("supervisord and the platform", Platform(config).stop),
        ("Kafka", config.kafka().stop),
        ("PostgreSQL", config.postgres().stop),
    ):
        print(f"{what}: {'stopped' if stop() else 'was not running'}")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def status(config: StackConfig) -> int:
    pg, kafka, platform = config.postgres(), config.kafka(), Platform(config)
    rows = [
        ("PostgreSQL", pg.running_pid(), f"127.0.0.1:{pg.port}"),
        ("Kafka", kafka.running_pid(), kafka.bootstrap),
        ("supervisord", platform.pidfile.pid(), str(platform.conf)),
    ]
    for name, pid, where in rows:
        print(f"{name:<12} {'running, pid ' + str(pid) if pid else 'stopped':<22} {where}")
    states = platform.states()
    env = {**os.environ, **config.platform_env(pg, kafka)}
    healthy = True
    for name, url in _health_urls(env).items():
        state = states.get(name)
        if state is None:
            print(f"  {name:<18} {'not supervised':<10}")
            healthy = False
            continue
        ready = _http_ok(url + "/health/ready")
        healthy = healthy and state.state == "RUNNING" and ready
        print(
            f"  {name:<18} {state.state:<9} pid {state.pid or '-':<8} "
            f"up {_duration(state.uptime):>8}  restarts {state.restarts:<3} "
            f"{'ready' if ready else 'not ready':<9}  {url}"
        )
    return 0 if all(pid for _, pid, _ in rows) and healthy else 3


def _log_files(config: StackConfig) -> Iterator[Path]:
    platform = Platform(config)
    paths = [
        config.postgres().log,
        config.kafka().log,
        platform.log,
        *(process_log(config.data_dir, p.name) for p in PROCESSES),
    ]
    for path in paths:
        if path.exists():
            yield path


def logs(config: StackConfig, follow: bool, lines: int) -> None:
    files = [str(path) for path in _log_files(config)]
    if not files:
        print("no logs yet: run `make up`")
        return
    cmd = ["tail", f"-n{lines}", *(["-F"] if follow else []), *files]
    os.execvp("tail", cmd)  # noqa: S606 (replaces this process with tail, on purpose)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stack", description="The local Gozon stack.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="install what is missing, start everything, wait until it answers")
    sub.add_parser("down", help="stop what `up` started")
    sub.add_parser("status", help="what runs and what answers")
    logs_parser = sub.add_parser("logs", help="the servers' and processes' logs")
    logs_parser.add_argument("-f", "--follow", action="store_true")
    logs_parser.add_argument("-n", "--lines", type=int, default=50)
    args = parser.parse_args(argv)
    try:
        config = StackConfig.from_env()
        if args.command == "up":
            up(config)
        elif args.command == "down":
            down(config)
        elif args.command == "status":
            return status(config)
        elif args.command == "logs":
            logs(config, args.follow, args.lines)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
