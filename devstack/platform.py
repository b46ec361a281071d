"""The platform: where the `make up` stack lives (`StackConfig`, from GOZON_* variables) and its
seven processes under supervisord (`Platform`), configured from the process table.

`Platform.start` is idempotent (a supervisord of ours already running is reused, and what it
gave up on is started again) and waits until every process answers `/health/ready`; it fails
only when a process really failed (supervisord gave up on it, or supervisord itself exited).
`Platform.stop` stops supervisord, then any process of ours that outlived it, and nothing else.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import sys
import urllib.error
import urllib.request
import xmlrpc.client
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from devstack import supervisor
from devstack.kafka import DEFAULT_KAFKA_VERSION, Kafka
from devstack.postgres import Postgres
from devstack.supervisor import (
    START_RETRIES,
    STOP_WAIT_SECS,
    SUPERVISED_MARKER,
    ProcessState,
    gozon_command,
    process_log,
    processes_marked,
    restart_counts,
    supervisor_config,
)
from devstack.system import (
    ROOT,
    PidFile,
    StackError,
    log_tail,
    require_free_port,
    run,
    terminate,
    wait_until,
)
from gozon.processes import MIGRATIONS, PROCESSES, Process

# The topics the platform's processes use, created by `migrate_and_create_topics`.
TOPICS = (
    "order.created.event",
    "order.created.event.dlq",
    "payment.processed.event",
    "payment.processed.event.dlq",
)


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


def health_urls(env: Mapping[str, str], processes: Sequence[Process] = PROCESSES) -> dict[str, str]:
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


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 (loopback)
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


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
    command: Callable[[Process], str] = gozon_command
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
        with supervisor.rpc(self.config.data_dir, timeout) as proxy:
            yield proxy

    def states(self) -> dict[str, ProcessState]:
        """What supervisord reports for each process; empty when it does not run."""
        if self.pidfile.pid() is None:
            return {}
        try:
            with self.rpc() as proxy:
                infos = proxy.getAllProcessInfo()
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
        urls = health_urls({**os.environ, **env}, self.processes)
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
                    f"supervisord exited at once{log_tail(self.logs / 'supervisord.out')}"
                )
        else:
            self._restart_given_up()
        for name, url in urls.items():
            wait_until(
                partial(http_ok, f"{url}/health/ready"),
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
                with contextlib.suppress(OSError, xmlrpc.client.Error), self.rpc() as proxy:
                    proxy.startProcess(name, False)

    def stop(self) -> bool:
        """Stops supervisord (which stops its processes), then any process of ours it left."""
        stopped = self.pidfile.stop(timeout=STOP_WAIT_SECS + 30)
        for pid in processes_marked(str(self.conf)):
            stopped = True
            terminate(pid, timeout=STOP_WAIT_SECS)
        return stopped


def migrate_and_create_topics(env: Mapping[str, str], kafka: Kafka) -> None:
    """What the processes need before they start: both databases migrated to head (`gozon …
    migrate`, with the platform's `env`) and the platform's topics on `kafka`."""
    gozon = Path(sys.executable).with_name("gozon")
    full_env = {**os.environ, **env}
    for migration in MIGRATIONS:
        run([str(gozon), *migration.args], what=migration.name, env=full_env)
    kafka.create_topics(TOPICS)
