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
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "services") not in sys.path:  # `make down` may run before the virtualenv exists
    sys.path.append(str(ROOT / "services"))
from gozon.processes import PROCESSES  # noqa: E402 (the process table: standard library only)

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
    log: Path | None = None,
) -> None:
    """Polls `ready` until it is true; fails fast when `alive` turns false, or at the deadline."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        if ready():
            return
        if not alive():
            raise StackError(f"{what} exited while starting{_log_tail(log)}")
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
        if _pid_alive(pid) and self.marker in _cmdline(pid):
            return pid
        return None

    def write(self, pid: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"{pid}\n")

    def stop(self, *, timeout: float, group: bool = False) -> bool:
        """SIGTERM, then SIGKILL after `timeout`; True if something of ours was running."""
        pid = self.pid()
        if pid is None:
            self.path.unlink(missing_ok=True)
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
    _run(["apt-get", "update", "-q"], what="apt-get update", env=env)
    _run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
        what=f"apt-get install {' '.join(packages)}",
        env=env,
    )


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

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

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
            **self.extra_config,
        }
        self.config.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        (self.data_dir / "log4j2.properties").write_text(_LOG4J2)

    def _java(self, libs: Path, main: str, *args: str) -> list[str]:
        return [
            "java",
            "-Xms256m",
            f"-Xmx{self.heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
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
                libs, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self.config)
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
        }


PROCFILE = ROOT / "Procfile"
# Each platform process, with the setting that names its HTTP port and the default: from the
# process table, the one list that the Procfile, the tests, compose and the chart follow.
HEALTH_PORTS: dict[str, tuple[str, int]] = {
    p.name: (p.port_setting, p.default_port) for p in PROCESSES
}


def procfile_entries(path: Path = PROCFILE) -> dict[str, str]:
    entries: dict[str, str] = {}
    if not path.exists():
        return entries
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            name, command = line.split(":", 1)
            entries[name.strip()] = command.strip()
    return entries


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 (loopback)
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _health_urls(env: Mapping[str, str]) -> dict[str, str]:
    urls = {}
    for name in procfile_entries():
        if name in HEALTH_PORTS:
            setting, default = HEALTH_PORTS[name]
            urls[name] = f"http://127.0.0.1:{env.get(setting, default)}"
    return urls


@dataclass
class Platform:
    """The platform's processes, run by honcho from the Procfile, logs in the data folder."""

    config: StackConfig

    def __post_init__(self) -> None:
        self.pidfile = PidFile(self.config.data_dir / "platform.pid", marker=str(PROCFILE))

    @property
    def log(self) -> Path:
        return self.config.data_dir / "logs" / "platform.log"

    def start(self, env: Mapping[str, str]) -> dict[str, str]:
        entries = procfile_entries()
        if not entries:
            return {}
        urls = _health_urls({**os.environ, **env})
        if self.pidfile.pid() is None:
            for name, url in urls.items():
                port = int(url.rsplit(":", 1)[1])
                require_free_port(port, name)
            honcho = Path(sys.executable).with_name("honcho")
            self.pidfile.spawn(
                [str(honcho), "start", "-f", str(PROCFILE), "-d", str(ROOT)],
                log=self.log,
                env={
                    **os.environ,
                    **env,
                    "PYTHONUNBUFFERED": "1",
                    # the Procfile's `gozon …` is the one installed beside this interpreter
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                },
                cwd=ROOT,
            )
        pid = self.pidfile.pid()
        for name, url in urls.items():
            wait_until(
                partial(_http_ok, f"{url}/health/ready"),
                timeout=60,
                what=f"the {name} process",
                alive=lambda: self.pidfile.pid() == pid,
                log=self.log,
            )
        return urls

    def stop(self) -> bool:
        return self.pidfile.stop(timeout=30, group=True)


def _migrate_and_create_topics(env: Mapping[str, str], kafka: Kafka) -> None:
    gozon = Path(sys.executable).with_name("gozon")
    entries = procfile_entries()
    full_env = {**os.environ, **env}
    for service in ("orders", "payments"):
        if any(cmd.startswith(f"gozon {service} ") for cmd in entries.values()):
            _run([str(gozon), service, "migrate"], what=f"migrating {service}", env=full_env)
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
        ("platform", Platform(config).stop),
        ("Kafka", config.kafka().stop),
        ("PostgreSQL", config.postgres().stop),
    ):
        print(f"{what}: {'stopped' if stop() else 'was not running'}")


def status(config: StackConfig) -> int:
    pg, kafka, platform = config.postgres(), config.kafka(), Platform(config)
    rows = [
        ("PostgreSQL", pg.running_pid(), f"127.0.0.1:{pg.port}"),
        ("Kafka", kafka.running_pid(), kafka.bootstrap),
        ("platform", platform.pidfile.pid(), str(PROCFILE.name)),
    ]
    for name, pid, where in rows:
        print(f"{name:<12} {'running, pid ' + str(pid) if pid else 'stopped':<22} {where}")
    env = {**os.environ, **config.platform_env(pg, kafka)}
    for name, url in _health_urls(env).items():
        print(f"  {name:<18} {'ready' if _http_ok(url + '/health/ready') else 'not ready'}  {url}")
    return 0 if all(pid for _, pid, _ in rows[:2]) else 3


def _log_files(config: StackConfig) -> Iterator[Path]:
    for path in (config.postgres().log, config.kafka().log, Platform(config).log):
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
